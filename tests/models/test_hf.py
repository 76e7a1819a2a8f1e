"""moelab's models are exactly the transformers architectures they claim to be: logits match both
ways for every family, weights round-trip bit-exactly, inexpressible configs are refused."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab.errors import UserError  # noqa: E402
from moelab.models import MoETransformer  # noqa: E402
from moelab.models.hf import ARCHS, export_hf, from_hf, hf_config, load_hf, pick_arch, to_hf  # noqa: E402
from moelab.models.presets import PUBLISHED, get_preset  # noqa: E402

V = 211
# (family preset, overrides): covers GQA, MHA, QK-norm (head/full), qkv bias, partial rotary,
# shared experts, group-limited sigmoid routing, first_k_dense, MLA with and without query
# low-rank, interleaved and half RoPE, linear / yarn / llama3 RoPE scaling, tied and untied heads,
# dense baselines.
CASES = {
    "mixtral": ("mixtral-tiny", {}),
    "mixtral-tied-mha": ("mixtral-tiny", {"tie_embeddings": True, "n_kv_heads": 4}),
    "qwen3_moe": ("qwen3_moe-tiny", {"norm_topk_prob": False, "qkv_bias": True, "out_bias": True}),
    # Qwen1.5-MoE: qkv bias, a shared expert scaled per token by a sigmoid gate; then GQA, a wider head
    # than d_model / n_heads, a leading dense layer, renormalised top-k, no qkv bias, 2 shared experts' width
    "qwen2_moe": ("qwen2_moe-tiny", {}),
    # DeepSeek-V2: MLA, softmax routing within the groups whose best expert scores highest, unnormalised
    # weights scaled; then V2-Lite's design: no groups, full-rank... here low-rank queries, yarn with both mscales
    "deepseek_v2": ("deepseek_v2-tiny", {}),
    # ERNIE 4.5: interleaved RoPE, a softmax router choosing by score + selection bias, shared experts;
    # then untied, no shared experts, no dense layer
    "ernie4_5_moe": ("ernie4_5_moe-tiny", {}),
    "ernie4_5_moe-untied-no-shared": ("ernie4_5_moe-tiny", {"tie_embeddings": False, "n_shared_experts": 0,
                                                            "first_k_dense": 0}),
    "deepseek_v2-lite-yarn": ("deepseek_v2-tiny", {
        "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "n_shared_experts": 1, "rope_scaling": "yarn",
        "rope_factor": 4.0, "rope_original_max_len": 16, "yarn_mscale": 0.707, "yarn_mscale_all_dim": 0.707}),
    "qwen2_moe-gqa-dense-first": ("qwen2_moe-tiny", {"n_kv_heads": 2, "head_dim": 24, "first_k_dense": 1,
                                                     "norm_topk_prob": True, "qkv_bias": False,
                                                     "n_shared_experts": 2, "shared_expert_dim": 40}),
    "olmoe": ("olmoe-tiny", {"n_kv_heads": 2}),
    "deepseek_v3": ("deepseek_v3-tiny", {}),
    "deepseek_v3-full-q-yarn": ("deepseek_v3-tiny", {
        "q_lora_rank": 0, "rope_interleave": False, "n_shared_experts": 2, "rope_scaling": "yarn",
        "rope_factor": 4.0, "rope_original_max_len": 16, "yarn_mscale": 1.0, "yarn_mscale_all_dim": 0.8}),
    "glm4_moe": ("glm4_moe-tiny", {"n_kv_heads": 2}),
    # rotary over the whole head (GLM4-MoE's config defaults to half); no shared experts (its layers
    # and DeepSeek-V3's always hold them: zero wide)
    "glm4_moe-full-rotary-no-shared": ("glm4_moe-tiny", {"partial_rotary": 1.0, "n_shared_experts": 0}),
    "deepseek_v3-no-shared": ("deepseek_v3-tiny", {"n_shared_experts": 0}),
    # dots.llm1: Qwen3's attention (per-head QK-norm; biases on q, k, v and o) with DeepSeek-V3's MoE
    # MiniMax-M2: QK-norm over all heads with GQA and a head wider than d_model / n_heads, half the head
    # rotated, a sigmoid router choosing with a selection bias, no shared experts
    "minimax_m2": ("olmoe-tiny", {"router": "sigmoid", "n_kv_heads": 2, "head_dim": 24, "partial_rotary": 0.5,
                                  "norm_topk_prob": True, "bias_update_rate": 1e-3}),
    "dots1": ("glm4_moe-tiny", {"partial_rotary": 1.0, "qk_norm": "head", "qkv_bias": True, "out_bias": True,
                                "n_kv_heads": 2, "routed_scaling": 2.5}),
    # Granite MoE: embedding, residual and logits multipliers, attention scaled by 1 / head_dim; then
    # GraniteMoeShared: with one ungated shared expert, biases on the four attention projections, untied
    "granitemoe": ("granitemoe-tiny", {}),
    # MiniCPM5-MoE: each head's attention output gated by a sigmoid of its own projection (held with the
    # query's rows, head by head), biases on all four projections, DeepSeek-V3's MoE after a dense layer
    "minicpm5_moe": ("minicpm5_moe-tiny", {"qkv_bias": True, "out_bias": True}),
    "granitemoeshared": ("granitemoe-tiny", {"n_shared_experts": 1, "shared_expert_dim": 40, "qkv_bias": True,
                                             "out_bias": True, "tie_embeddings": False}),
    "llama": ("llama-tiny", {"qkv_bias": True, "out_bias": True}),
    # Llama 3.1's RoPE: at head_dim 16 and an original context of 48 the wavelengths 6.3, 20 and
    # 63+ fall in its kept, blended and stretched bands (under 48/5, between, over 48/1.5)
    "llama-llama3-rope": ("llama-tiny", {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_len": 48,
                                         "llama3_low_freq_factor": 1.5, "llama3_high_freq_factor": 5.0}),
    "qwen3_moe-linear-rope": ("qwen3_moe-tiny", {"rope_scaling": "linear", "rope_factor": 2.0}),
    "qwen3": ("qwen3-tiny", {}),
    "qwen3-yarn": ("qwen3-tiny", {"rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max_len": 16}),  # GQA
}
EXPECTED_ARCH = {"mixtral-tied-mha": "mixtral", "deepseek_v3-full-q-yarn": "deepseek_v3",
                 "qwen2_moe-gqa-dense-first": "qwen2_moe", "deepseek_v2-lite-yarn": "deepseek_v2",
                 "ernie4_5_moe-untied-no-shared": "ernie4_5_moe",
                 "glm4_moe-full-rotary-no-shared": "glm4_moe", "deepseek_v3-no-shared": "deepseek_v3",
                 "llama-llama3-rope": "llama", "qwen3_moe-linear-rope": "qwen3_moe", "qwen3-yarn": "qwen3"}


def _model(preset: str, overrides: dict, seed: int = 0) -> MoETransformer:
    cfg = get_preset(preset)
    cfg.model.n_layers, cfg.model.d_model = 3, 64  # small, but still 2+ MoE layers after dense ones
    cfg.model.expert_dim, cfg.model.dense_dim, cfg.model.norm_eps = 32, 80, 1e-5
    if cfg.model.attention == "gqa" and cfg.model.head_dim:
        cfg.model.head_dim = 24 if cfg.model.qk_norm != "full" else 0
    for k, v in overrides.items():
        setattr(cfg.model, k, v)
    cfg.train.seq_len = cfg.model.max_seq_len = 64
    cfg.resolve(vocab_size=V)
    torch.manual_seed(seed)
    model = MoETransformer(cfg.model)
    with torch.no_grad():  # decisive routing, non-trivial norms, biases and selection biases
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "router.weight" in name or "shared_gate" in name:  # gates far from 0.5
                p.normal_(std=0.5)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
        for r in model.routers:
            if hasattr(r, "selection_bias"):
                r.selection_bias.normal_(std=0.1)
    return model.eval()


def _max_diff(a, b, ids) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_both_ways(tmp_path, case):
    ours = _model(*CASES[case])
    arch = EXPECTED_ARCH.get(case, case)
    assert pick_arch(ours.cfg) == arch
    ids = torch.randint(0, V, (2, 48))
    hf = to_hf(ours)
    assert type(hf).__name__ == ARCHS[arch] + "ForCausalLM"
    assert _max_diff(hf, ours, ids) <= 1e-4
    export_hf(ours, tmp_path / "hf")  # moelab -> HF directory, read by transformers alone
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(reloaded).__name__ == ARCHS[arch] + "ForCausalLM"
    assert _max_diff(reloaded, ours, ids) <= 1e-4
    back = load_hf(tmp_path / "hf")  # HF directory -> moelab
    assert _max_diff(reloaded, back, ids) <= 1e-4
    assert ours.state_dict().keys() == back.state_dict().keys()
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name  # moelab -> HF -> moelab is bit-exact


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_moelab_to_hf_is_bit_exact(case):
    config = hf_config(_model(*CASES[case]).cfg)
    torch.manual_seed(3)
    hf = getattr(transformers, type(config).__name__.replace("Config", "ForCausalLM"))(config).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: randomise them
        for name, t in hf.state_dict().items():
            if t.ndim == 1:
                t.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    ours = from_hf(hf)
    again = to_hf(ours)
    sd_a, sd_b = hf.state_dict(), again.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    ids = torch.randint(0, V, (2, 48))
    assert _max_diff(hf, ours, ids) <= 1e-4


# Settings each family varies, drawn at random together: combinations the named CASES leave out
# (two parity bugs were in such combinations: GLM4-MoE at full rotary, shared experts set to 0).
SWEEP = {
    "mixtral-tiny": dict(n_kv_heads=[1, 2, 4], head_dim=[0, 8, 24], tie_embeddings=[False, True],
                         top_k=[1, 2, 3], n_experts=[3, 4, 8]),
    "qwen3_moe-tiny": dict(n_kv_heads=[1, 2, 4], head_dim=[8, 24], norm_topk_prob=[False, True],
                           first_k_dense=[0, 1, 2], top_k=[1, 2, 4], n_experts=[4, 8],
                           rope_scaling=["none", "linear", "yarn"]),
    "olmoe-tiny": dict(n_kv_heads=[1, 2, 4], norm_topk_prob=[False, True], top_k=[1, 2, 3], n_experts=[4, 8]),
    "deepseek_v2-tiny": dict(q_lora_rank=[0, 16], kv_lora_rank=[8, 32], n_shared_experts=[0, 1, 2],
                             first_k_dense=[0, 1, 2], n_group=[1, 2, 4], topk_group=[1, 2], n_experts=[8, 16],
                             top_k=[1, 2, 3], routed_scaling=[1.0, 2.5], qk_rope_head_dim=[8, 16], v_head_dim=[8, 32],
                             rope_scaling=["none", "yarn"], tie_embeddings=[False, True]),
    "ernie4_5_moe-tiny": dict(n_kv_heads=[1, 2, 4], head_dim=[0, 8, 24], n_shared_experts=[0, 1, 2],
                              first_k_dense=[0, 1, 2], top_k=[1, 2, 3], n_experts=[4, 8], tie_embeddings=[False, True],
                              rope_scaling=["none", "linear", "yarn"]),
    # designs built from another family's preset (CASES): MiniMax-M2, dots.llm1
    "minimax_m2": dict(n_kv_heads=[1, 2, 4], head_dim=[8, 24], partial_rotary=[0.5, 1.0], top_k=[1, 2, 3],
                       n_experts=[4, 8], tie_embeddings=[False, True], rope_scaling=["none", "yarn"]),
    "granitemoe-tiny": dict(n_kv_heads=[1, 2, 4], head_dim=[0, 8, 24], tie_embeddings=[False, True], top_k=[1, 2, 3],
                            n_experts=[4, 8], n_shared_experts=[0, 1, 2], shared_expert_dim=[8, 48],
                            embed_scale=[1.0, 12.0], residual_scale=[0.22, 1.0], logits_divisor=[1.0, 6.0],
                            attn_scale=[0.0, 0.015625, 0.3], rope_scaling=["none", "linear", "yarn"]),
    "minicpm5_moe-tiny": dict(n_kv_heads=[1, 2, 4], head_dim=[0, 8, 24], qkv_bias=[False, True],
                              n_shared_experts=[0, 1, 2], first_k_dense=[0, 1, 2], n_group=[1, 2, 4], topk_group=[1, 2],
                              n_experts=[8, 16], top_k=[1, 2], routed_scaling=[1.0, 2.5], norm_topk_prob=[False, True],
                              rope_scaling=["none", "yarn"], tie_embeddings=[False, True]),
    "dots1": dict(n_kv_heads=[1, 2, 4], qkv_bias=[False, True], n_shared_experts=[0, 1, 2], first_k_dense=[0, 1],
                  n_group=[1, 2], topk_group=[1, 2], n_experts=[4, 8], top_k=[1, 2], routed_scaling=[1.0, 2.5]),
    "qwen2_moe-tiny": dict(n_kv_heads=[1, 2, 4], head_dim=[0, 8, 24], qkv_bias=[False, True],
                           norm_topk_prob=[False, True], first_k_dense=[0, 1, 2], top_k=[1, 2, 4], n_experts=[4, 8],
                           n_shared_experts=[1, 2], shared_expert_dim=[8, 48], tie_embeddings=[False, True],
                           rope_scaling=["none", "linear", "yarn"]),
    "deepseek_v3-tiny": dict(q_lora_rank=[0, 16], kv_lora_rank=[8, 32], n_shared_experts=[0, 1, 2],
                             first_k_dense=[0, 1, 2], n_group=[1, 2, 4], topk_group=[1, 2], n_experts=[8, 16],
                             top_k=[1, 2], routed_scaling=[1.0, 2.5], rope_interleave=[False, True],
                             norm_topk_prob=[False, True], qk_rope_head_dim=[8, 16], v_head_dim=[8, 32],
                             rope_scaling=["none", "yarn"], tie_embeddings=[False, True]),
    "glm4_moe-tiny": dict(n_kv_heads=[1, 2, 4], partial_rotary=[0.5, 1.0], qk_norm=["none", "head"],
                          qkv_bias=[False, True], n_shared_experts=[0, 1, 2], first_k_dense=[0, 1], n_group=[1, 2],
                          topk_group=[1, 2], n_experts=[4, 8], top_k=[1, 2], routed_scaling=[1.0, 1.8],
                          norm_topk_prob=[False, True]),
}


@pytest.mark.parametrize("seed", range(3))
def test_random_combinations_of_settings_match_transformers(seed):
    import random

    rng = random.Random(seed)
    for i in range(8):
        design = preset = rng.choice(list(SWEEP))
        over = {k: rng.choice(v) for k, v in SWEEP[design].items()}
        if design in CASES:  # a design built on another family's preset
            preset, fixed = CASES[design]
            over = {**fixed, **over}
        if design in ("dots1", "minicpm5_moe-tiny"):  # biases on all four projections or none
            over["out_bias"] = over["qkv_bias"]
        over["topk_group"] = min(over.get("topk_group", 1), over.get("n_group", 1))
        if over.get("rope_scaling", "none") != "none":
            over.update(rope_factor=4.0, rope_original_max_len=16)
        ours = _model(preset, over, seed=i)
        ids = torch.randint(0, V, (2, 40))
        assert _max_diff(to_hf(ours), ours, ids) <= 1e-4, (preset, over)


@pytest.mark.parametrize("case", list(CASES))
def test_training_gradients_equal_transformers(case):
    """Fine-tuning a converted model takes the gradients transformers' own model would: the
    next-token loss's gradient of every weight (the shared-expert gate, routers, experts, biases)
    equals that of the same weights in transformers, under its name."""
    grads = _gradients_match(_model(*CASES[case]))
    gate = [k for k in grads if "shared_expert_gate" in k]
    assert bool(gate) == (case.startswith("qwen2_moe")) and all(grads[k].abs().sum() > 0 for k in gate)


def _gradients_match(ours, arch: str = "auto") -> dict:
    """Asserts that the next-token loss gives every weight of `ours` the gradient transformers' model
    of `arch` gives the same weight; returns transformers' gradients by name."""
    from moelab.models.hf import to_hf_state_dict

    ours.train()
    hf = to_hf(ours, arch).train()
    ids = torch.randint(0, V, (2, 40))

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))

    loss(ours(ids).logits).backward()
    loss(hf(ids).logits).backward()
    ours_named = dict(ours.named_parameters())
    grads = {k: v.grad for k, v in hf.named_parameters() if v.requires_grad}
    for name, p in ours_named.items():
        # the gradients under transformers' names, laid out as it lays out its weights (none: zero)
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    expected = to_hf_state_dict(ours, hf.config.model_type)
    assert grads.keys() <= expected.keys()  # every weight transformers trains (not a selection bias)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    return grads


def test_a_minimax_m2_config_json_with_its_rotary_dim_converts(tmp_path):
    """MiniMax-M2's config.json on the Hub says its partial RoPE as `rotary_dim` (of head_dim), not
    partial_rotary_factor: the same rotated width, bias and logits as transformers reads from it."""
    import json

    want = _model(*CASES["minimax_m2"])
    hf = to_hf(want)
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_parameters"].pop("partial_rotary_factor")
    raw["rotary_dim"] = 12
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = load_hf(tmp_path)
    assert (ours.cfg.partial_rotary, ours.cfg.head_dim, ours.cfg.qk_norm) == (0.5, 24, "full")
    assert torch.equal(ours.routers[0].selection_bias, want.routers[0].selection_bias)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _max_diff(theirs, ours, torch.randint(0, V, (2, 48))) <= 1e-4


@pytest.mark.parametrize("name", ["SarvamMoE", "Param2Moe"])
def test_sarvam_and_param2_checkpoints_convert_as_the_glm4_moe_model_transformers_runs(tmp_path, name):
    """Sarvam-30B's and Param2's configs are their own, their model GLM4-MoE's (full rotary, QK-norm):
    read from a directory as transformers loads it, the same logits; exported, a GLM4-MoE that
    transformers loads with them too."""
    if not hasattr(transformers, name + "Config"):
        pytest.skip(f"transformers {transformers.__version__} predates {name}")
    config = getattr(transformers, name + "Config")(
        vocab_size=V, hidden_size=64, intermediate_size=80, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, attention_bias=True)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers initialises norms to 1, biases and the selection bias to 0
        for key, t in theirs.state_dict().items():
            if t.ndim == 1:
                t.normal_(mean=1.0 if "norm" in key else 0.0, std=0.1)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert (ours.cfg.partial_rotary, ours.cfg.qk_norm, ours.cfg.qkv_bias, ours.cfg.n_group) == (1.0, "head", True, 2)
    ids = torch.randint(0, V, (2, 48))
    assert _max_diff(theirs, ours, ids) <= 1e-4
    export_hf(ours, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert again.config.model_type == "glm4_moe" and _max_diff(again, theirs, ids) <= 1e-4


def test_a_dots1_model_with_sliding_window_layers_is_refused_on_convert():
    """dots.llm1's config can make layers from max_window_layers on attend within a window, which
    moelab does not apply: refused, naming the field, rather than converted to full attention."""
    from moelab.models.hf import model_config_from_hf

    config = hf_config(_model(*CASES["dots1"]).cfg)
    assert config.model_type == "dots1" and model_config_from_hf(config).qk_norm == "head"
    config.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(UserError, match="layer_types=.*sliding_attention"):
        model_config_from_hf(config)


def test_a_qwen2_moe_without_a_shared_expert_is_refused_on_convert():
    from moelab.models.hf import model_config_from_hf

    config = hf_config(_model(*CASES["qwen2_moe"]).cfg)
    config.shared_expert_intermediate_size = 0
    with pytest.raises(UserError, match="shared_expert_intermediate_size=0"):
        model_config_from_hf(config)


@pytest.mark.parametrize("case", ["mixtral", "mixtral-tied-mha", "deepseek_v3"])
def test_model_built_from_weights_holds_them_without_a_copy(case):
    ours = _model(*CASES[case])
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    if ours.cfg.tie_embeddings:
        del sd["lm_head.weight"]  # safetensors keeps one name of a tied pair
    built = MoETransformer.from_weights(ours.cfg, sd)
    assert not built.training
    for name, t in built.state_dict().items():
        assert t.device.type == "cpu" and torch.equal(t, ours.state_dict()[name]), name
    w = "blocks.1.moe.experts.gate_proj"
    assert built.state_dict()[w].data_ptr() == sd[w].data_ptr()  # assigned, not copied
    assert (built.lm_head.weight is built.embed.weight) == ours.cfg.tie_embeddings
    assert all(p.requires_grad for p in built.parameters())  # trainable, as a fresh model is
    assert torch.equal(built.rope_cos, ours.rope_cos) and torch.equal(built.rope_sin, ours.rope_sin)
    assert _max_diff(built, ours, torch.randint(0, V, (2, 48))) == 0


def test_model_built_from_misaligned_weights_copies_only_those():
    """safetensors maps a file's tensors at 8-byte offsets; torch 2.10's CPU `_grouped_mm` refuses
    a weight not 16-byte aligned. from_weights copies each such tensor to an aligned one (and only
    those), so a loaded model's grouped experts run on every torch the project supports."""
    ours = _model(*CASES["deepseek_v3"])
    sd = {}
    for i, (name, t) in enumerate(ours.state_dict().items()):
        shift = 2 if i % 2 == 0 else 0  # every other tensor 8 bytes past a 64-byte boundary
        buf = torch.empty(t.numel() + shift, dtype=t.dtype)
        sd[name] = buf[shift:].view(t.shape).copy_(t)
    misaligned = {name for name, t in sd.items() if t.data_ptr() % 16}
    assert misaligned and len(misaligned) < len(sd)
    built = MoETransformer.from_weights(ours.cfg, sd)
    for name, t in built.state_dict().items():
        if name in sd:
            assert t.data_ptr() % 64 == 0, name
            assert (t.data_ptr() == sd[name].data_ptr()) == (name not in misaligned), name
    assert _max_diff(built, ours, torch.randint(0, V, (2, 48))) == 0


def test_to_hf_copies_unless_asked_to_share():
    ours = _model(*CASES["mixtral-tied-mha"])
    q = ours.blocks[0].attn.q_proj.weight
    copy, shared = to_hf(ours), to_hf(ours, share=True)  # export writes from the shared one
    for hf in (copy, shared):
        assert hf.lm_head.weight is hf.model.embed_tokens.weight  # still tied after the weights went in
    assert shared.model.layers[0].self_attn.q_proj.weight.data_ptr() == q.data_ptr()
    with torch.no_grad():
        copy.model.layers[0].self_attn.q_proj.weight.zero_()
        copy.model.embed_tokens.weight.zero_()
    assert q.abs().sum() > 0 and ours.embed.weight.abs().sum() > 0


@pytest.mark.parametrize("case", ["minicpm5_moe", "granitemoeshared", "ernie4_5_moe"])
def test_to_hf_shares_no_memory_with_the_model(case):
    """to_hf copies: the fused tensors (the experts' gate_up_proj, MiniCPM5's q_gate_proj, Granite's
    shared input_linear) are new concatenations, which it does not copy again; every other tensor
    (ERNIE's selection bias is a (1, E) view of moelab's) is copied, so none shares moelab's memory."""
    ours = _model(*CASES[case])
    own = {t.untyped_storage().data_ptr() for t in ours.state_dict().values()}
    hf = to_hf(ours)
    assert not own & {t.untyped_storage().data_ptr() for t in hf.state_dict().values()}
    assert _max_diff(hf, ours, torch.randint(0, V, (2, 24))) <= 1e-4


def test_a_sharded_export_loads_in_transformers_and_back(tmp_path):
    ours = _model(*CASES["deepseek_v3"])
    export_hf(ours, tmp_path / "hf", max_shard_size="200KB")
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 2
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, V, (2, 48))
    assert _max_diff(reloaded, ours, ids) <= 1e-4
    back = load_hf(tmp_path / "hf")
    for name, t in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def _files(folder) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_export_writes_what_save_pretrained_writes(tmp_path, case):
    """moelab writes the directory a layer at a time, not through save_pretrained (which holds a
    second copy of the experts): every tensor's name, dtype and value, config.json and
    generation_config.json equal what transformers' own save_pretrained writes, in fp32 and bf16,
    in one file and in shards. In bf16, of transformers' own bf16 model, loaded as it loads one:
    DeepSeek-V3 and GLM4-MoE keep their routers in fp32 there (moelab rounded them to bf16)."""
    import json

    ours = _model(*CASES[case])
    for dtype, shard in (("fp32", "5GB"), ("bf16", "60KB")):
        mine, ref = tmp_path / f"moelab-{dtype}", tmp_path / f"ref-{dtype}"
        export_hf(ours, mine, dtype=dtype, max_shard_size=shard)
        if dtype == "fp32":
            to_hf(ours).save_pretrained(ref, max_shard_size=shard)
        else:
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref-fp32", dtype=torch.bfloat16) \
                .save_pretrained(ref, max_shard_size=shard)
        a, b = _files(mine), _files(ref)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        for name in ("config.json", "generation_config.json"):
            assert json.loads((mine / name).read_text()) == json.loads((ref / name).read_text()), name
        shards = sorted(mine.glob("model-*-of-*.safetensors"))
        if shard == "5GB":
            assert not shards and (mine / "model.safetensors").is_file()
            continue
        assert len(shards) > 2 and not (mine / "model.safetensors").exists()
        index = json.loads((mine / "model.safetensors.index.json").read_text())
        assert index["metadata"] == json.loads((ref / "model.safetensors.index.json").read_text())["metadata"]
        assert sorted(set(index["weight_map"].values())) == [f.name for f in shards]
        assert index["weight_map"].keys() == a.keys()
        for f in shards:  # each shard under the limit, unless it is a single larger tensor
            held = [k for k, v in index["weight_map"].items() if v == f.name]
            assert sum(a[k].nbytes for k in held) <= 60_000 or len(held) == 1, f.name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moelab-bf16", dtype="auto")
    assert reloaded.dtype == torch.bfloat16


def test_fp16_export_refuses_weights_fp16_cannot_hold(tmp_path):
    ours = _model(*CASES["mixtral"])
    export_hf(ours, tmp_path / "ok", dtype="fp16")
    for name, t in _files(tmp_path / "ok").items():
        assert t.dtype == torch.float16, name
    with torch.no_grad():
        ours.blocks[1].moe.experts.down_proj[2, 3, 4] = -7e4
    with pytest.raises(UserError, match=r"cannot export in fp16: .*down_proj.* values up to 7e\+04, .*--dtype bf16"):
        export_hf(ours, tmp_path / "hf", dtype="fp16", max_shard_size="50KB")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["ok"]


def test_bf16_checkpoint_converts_exactly_to_fp32_and_shares_nothing(tmp_path):
    ours = _model(*CASES["qwen3_moe"])
    hf = to_hf(ours).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    back = load_hf(tmp_path / "hf")  # read in bf16, widened tensor by tensor
    assert {t.dtype for t in back.state_dict().values()} == {torch.float32}
    for name, t in back.state_dict().items():
        assert torch.equal(t, ours.state_dict()[name].to(torch.bfloat16).float()), name
    wide = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert _max_diff(wide, back, torch.randint(0, V, (2, 48))) <= 1e-4
    copy = from_hf(hf)  # from a live model: an fp32 copy, independent of it
    assert {t.dtype for t in copy.state_dict().values()} == {torch.float32}
    with torch.no_grad():
        hf.model.embed_tokens.weight.zero_()
    assert torch.equal(copy.embed.weight, back.embed.weight)


@pytest.mark.parametrize("case", ["qwen3_moe", "deepseek_v3", "mixtral-tied-mha", "qwen2_moe"])
def test_a_bf16_checkpoint_held_in_bf16_keeps_its_tensors_and_errs_as_transformers_does(tmp_path, case):
    """load_model(dtype="bf16"): every tensor the checkpoint's own (no rounding on the way), the
    routers' in fp32 (DeepSeek-V3 stores its in fp32; Qwen3-MoE's bf16 ones are widened), RoPE
    tables in fp32, half the memory; computed in bf16, its logits as far from the same weights in
    fp32 as transformers' own bf16 model's are (mean error within 25% of it)."""
    from moelab.train.checkpoint import load_model

    export_hf(_model(*CASES[case]), tmp_path / "fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    half, wide = load_model(tmp_path / "hf", dtype="bf16"), load_model(tmp_path / "hf")
    assert half.state_dict().keys() == wide.state_dict().keys()
    auto = load_model(tmp_path / "hf", dtype="auto")  # the directory's own: bf16
    assert all(t.dtype == half.state_dict()[k].dtype for k, t in auto.state_dict().items())
    assert load_model(tmp_path / "fp32", dtype="auto").embed.weight.dtype == torch.float32
    for name, t in half.state_dict().items():
        assert t.dtype == (torch.float32 if ".router." in name else torch.bfloat16), name
        assert torch.equal(t.float(), wide.state_dict()[name]), name  # wide: the file's values, exactly
    assert half.rope_cos.dtype == half.rope_sin.dtype == torch.float32
    assert torch.equal(half.rope_cos, wide.rope_cos)
    if half.cfg.tie_embeddings:
        assert half.lm_head.weight is half.embed.weight

    def nbytes(m):
        return sum(p.numel() * p.element_size() for p in m.parameters())

    assert nbytes(half) < 0.51 * nbytes(wide)
    ids = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = wide(ids).logits
        ours, theirs = half(ids).logits, hf(ids).logits
    assert ours.dtype == theirs.dtype == torch.bfloat16
    err, hf_err = ((x.float() - ref).abs().mean().item() for x in (ours, theirs))
    assert 0 < err <= 1.25 * hf_err, (err, hf_err)


@pytest.mark.parametrize("case", ["deepseek_v3", "glm4_moe", "qwen3_moe", "ernie4_5_moe", "deepseek_v2", "dots1"])
def test_a_bf16_checkpoint_with_fp32_routers_converts_and_exports_back_to_itself(tmp_path, case):
    """transformers keeps DeepSeek-V3's and GLM4-MoE's routers in fp32 in a bf16 model, and so in its
    bf16 checkpoints (Qwen3-MoE's: bf16): convert + export in bf16, and the export of the directory
    itself (dtype auto: its bf16), rounded them to bf16. A conversion in the directory's own dtype
    (`convert --dtype auto`) stores bf16, routers in fp32 (widened where stored in bf16), and
    exports back to the same files."""
    from tests.conftest import run_cli

    export_hf(_model(*CASES[case]), tmp_path / "fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "src")
    src = _files(tmp_path / "src")
    fp32_routers = case != "qwen3_moe"
    assert {k for k, t in src.items() if t.dtype == torch.float32} == {
        k for k in src if fp32_routers and k.endswith(("mlp.gate.weight", "e_score_correction_bias"))}
    assert run_cli("convert", tmp_path / "src", "--out", tmp_path / "run").returncode == 0
    res = run_cli("export", tmp_path / "run", "--out", tmp_path / "back", "--dtype", "bf16")
    assert res.returncode == 0, res.stderr
    assert run_cli("export", tmp_path / "src", "--out", tmp_path / "again").returncode == 0
    # converted in its own dtype (auto): bf16 on disk, the routers fp32 as stored, and exported as it
    # is (auto: the run's stored bf16) with no --dtype
    res = run_cli("convert", tmp_path / "src", "--out", tmp_path / "half", "--dtype", "auto")
    assert res.returncode == 0, res.stderr
    assert run_cli("export", tmp_path / "half", "--out", tmp_path / "half_back").returncode == 0
    for folder in ("back", "again", "half_back"):
        back = _files(tmp_path / folder)
        assert back.keys() == src.keys()
        for k in src:
            assert back[k].dtype == src[k].dtype and torch.equal(back[k], src[k]), (folder, k)
    (half,), (wide,) = ((tmp_path / r).glob("checkpoints/*/model.safetensors") for r in ("half", "run"))
    stored = _files(half.parent)
    assert {k for k, t in stored.items() if t.dtype == torch.float32} == {k for k in stored if ".router." in k}
    assert half.stat().st_size < 0.55 * wide.stat().st_size
    from moelab.train.checkpoint import load_model, load_weights

    assert load_model(tmp_path / "half", dtype="auto").embed.weight.dtype == torch.bfloat16  # as stored
    widened, exact = load_weights(tmp_path / "half"), load_weights(tmp_path / "run")  # train.init_from's read
    assert widened.keys() == exact.keys()
    for k, t in widened.items():
        assert t.dtype == torch.float32 and torch.equal(t, exact[k]), k


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_presets_count_parameters_like_transformers(name):
    """moelab's accounting of a published-size preset equals transformers' own model of it, built
    on the meta device (no memory), and the preset maps to the family's architecture."""
    from moelab.models.accounting import build_meta_model, parameter_table

    cfg = get_preset(name).resolve()
    ours = parameter_table(build_meta_model(cfg.model))["total"]["total"]
    family = PUBLISHED[name][0]
    if family == "switch":
        with pytest.raises(UserError, match="capacity_factor"):
            hf_config(cfg.model)
        return
    config = hf_config(cfg.model)
    assert config.model_type == family
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    hf.tie_weights()  # transformers 5.0 leaves a model built on the meta device untied
    # trained ones: ERNIE 4.5's selection bias is a frozen parameter there, a buffer in moelab (and DeepSeek-V3's)
    assert ours == sum(p.numel() for p in hf.parameters() if p.requires_grad)


@pytest.mark.parametrize("preset,rope", [
    ("llama3-8b", dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8192, max_seq_len=131072)),
    ("llama3-8b", dict(rope_scaling="llama3", rope_factor=32.0, rope_original_max_len=8192,
                       llama3_low_freq_factor=2.0, llama3_high_freq_factor=6.0, max_seq_len=131072)),
    ("qwen3-0.6b", dict(rope_scaling="linear", rope_factor=4.0)),
    ("deepseek-v3", {}),  # yarn, mscale and mscale_all_dim as published
    ("deepseek-v2-lite", {}),  # the same, in DeepSeek-V2's complex-number RoPE
    ("glm-4.5-air", dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=32768)),  # partial rotary
])
def test_rope_frequencies_equal_transformers_at_published_sizes(preset, rope):
    """The inverse frequencies and cos/sin factor of every RoPE scaling moelab writes into an HF
    config are the ones transformers computes from that config (its float32 against moelab's float64),
    at real head dims, thetas and contexts: for llama3, every band of Llama 3.1's rule is populated."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moelab.models.attention import rotary_dim
    from moelab.models.layers import rope_inv_freq

    cfg = get_preset(preset)
    for k, v in rope.items():
        setattr(cfg.model, k, v)
    m = cfg.resolve().model
    config = hf_config(m)
    theirs, their_factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu")
    ours, our_factor = rope_inv_freq(m, rotary_dim(m))
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.float(), theirs, rtol=2e-6, atol=0)
    assert our_factor == pytest.approx(their_factor, rel=1e-12)
    if m.rope_scaling == "llama3":
        ratio = m.rope_original_max_len * ours / (2 * torch.pi)  # below low: stretched; above high: kept
        assert (ratio < m.llama3_low_freq_factor).any() and (ratio > m.llama3_high_freq_factor).any()
        assert ((ratio > m.llama3_low_freq_factor) & (ratio < m.llama3_high_freq_factor)).any()


@pytest.mark.parametrize("case,type_key", [("llama-llama3-rope", "rope_type"), ("deepseek_v3-full-q-yarn", "type"),
                                           ("deepseek_v2-lite-yarn", "type"),
                                           ("glm4_moe", "rope_type")])
def test_a_config_json_in_the_hubs_legacy_rope_layout_converts(tmp_path, case, type_key):
    """Llama 3.1/3.2, DeepSeek-V3 and GLM-4.5 checkpoints on the Hub carry their RoPE the legacy way:
    a `rope_scaling` dict (null when unscaled; DeepSeek-V3's says `type`, not `rope_type`) beside
    top-level `rope_theta` and `partial_rotary_factor`. Each converts to the same RoPE settings and
    the same logits as transformers reads from it."""
    import json

    want = _model(*CASES[case]).cfg
    torch.manual_seed(0)
    hf = getattr(transformers, ARCHS[EXPECTED_ARCH.get(case, case)] + "ForCausalLM")(hf_config(want))
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        raw["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    rope[type_key] = rope.pop("rope_type")
    raw["rope_scaling"] = rope if rope[type_key] != "default" else None
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = load_hf(tmp_path)
    keys = ("rope_theta", "partial_rotary", "rope_scaling", "rope_factor", "rope_original_max_len", "yarn_mscale",
            "yarn_mscale_all_dim", "llama3_low_freq_factor", "llama3_high_freq_factor")
    assert {k: getattr(ours.cfg, k) for k in keys} == {k: getattr(want, k) for k in keys}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _max_diff(theirs, ours, torch.randint(0, V, (2, 48))) <= 1e-4


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "longrope"}])
def test_a_rope_type_moelab_cannot_compute_is_refused_on_convert(rope):
    from moelab.models.hf import model_config_from_hf

    config = hf_config(_model(*CASES["llama"]).cfg)
    config.rope_parameters = {**config.rope_parameters, **rope}
    with pytest.raises(UserError, match=f"rope_type='{rope['rope_type']}'.*llama3"):
        model_config_from_hf(config)


@pytest.mark.parametrize("field,value,arch,match", [
    ("norm_topk_prob", False, "mixtral", "norm_topk_prob"),
    ("n_shared_experts", 1, "mixtral", "n_shared_experts"),
    ("capacity_factor", 1.0, "auto", "capacity_factor"),
    ("noisy_gating", True, "auto", "noisy_gating"),
    ("ffn_glu", False, "auto", "ffn_glu"),
    ("router", "softmax", "deepseek_v3", "router"),
    ("partial_rotary", 0.5, "qwen3_moe", "partial_rotary"),
    ("shared_expert_gate", False, "qwen2_moe", "shared_expert_gate=False"),  # its shared expert is always gated
    ("out_bias", True, "qwen2_moe", "out_bias"),
    ("shared_expert_gate", True, "deepseek_v3", "shared_expert_gate=True"),
    ("norm_topk_prob", True, "deepseek_v2", "norm_topk_prob=True"),  # transformers' V2 never renormalises
    ("group_score_top", 2, "deepseek_v2", "group_score_top=2"),  # V2 scores a group by its best expert
    ("group_score_top", 1, "deepseek_v3", "group_score_top=1"),  # V3 by its best two
    ("rope_interleave", False, "deepseek_v2", "rope_interleave=False"),
    ("qkv_bias", True, "ernie4_5_moe", "qkv_bias=True"),  # its use_bias would bias its MLPs and head too
    ("routed_scaling", 2.0, "ernie4_5_moe", "routed_scaling=2.0"),
    ("embed_scale", 12.0, "mixtral", "embed_scale=12.0"),  # Granite's multipliers: no other architecture has them
    ("residual_scale", 0.22, "qwen3_moe", "residual_scale=0.22"),
    ("logits_divisor", 6.0, "deepseek_v3", "logits_divisor=6.0"),
    ("attn_scale", 0.015625, "qwen2_moe", "attn_scale=0.015625"),
    ("n_shared_experts", 1, "granitemoe", "n_shared_experts=1"),  # GraniteMoeShared's
    ("first_k_dense", 1, "granitemoeshared", "first_k_dense=1"),
    ("out_bias", True, "granitemoe", "out_bias=True"),  # attention_bias: all four projections or none
])
def test_inexpressible_config_is_refused_naming_the_field(field, value, arch, match):
    preset = {"deepseek_v3": "deepseek_v3-tiny", "qwen3_moe": "qwen3_moe-tiny", "qwen2_moe": "qwen2_moe-tiny",
              "deepseek_v2": "deepseek_v2-tiny", "ernie4_5_moe": "ernie4_5_moe-tiny", "granitemoe": "granitemoe-tiny",
              "granitemoeshared": "granitemoe-tiny"}
    model = _model(preset.get(arch, "mixtral-tiny"), {})
    setattr(model.cfg, field, value)
    with pytest.raises(UserError, match=match):
        to_hf(model, arch)


@pytest.mark.parametrize("preset", ["mixtral-tiny", "qwen3_moe-tiny", "olmoe-tiny", "qwen2_moe-tiny",
                                    "ernie4_5_moe-tiny", "granitemoe-tiny"])
def test_the_aux_loss_coefficient_converts_to_the_same_balancing_term(preset):
    """transformers' load-balancing loss counts each of a token's top-k picks (top_k under uniform
    routing), moelab's the share of picks (1): the coefficient passed through unchanged, so a
    converted model was balanced top_k times more weakly than transformers trains it. (Without a
    selection bias: transformers' loss re-picks each token's experts from the scores alone, where
    moelab's counts the experts the bias made it pick.)"""
    ours = _model(preset, {"n_layers": 1, "first_k_dense": 0, "top_k": 3, "aux_loss_coef": 0.03,
                           "bias_update_rate": 0.0})
    hf = to_hf(ours)
    assert hf.config.router_aux_loss_coef == 0.01
    assert from_hf(hf).cfg.aux_loss_coef == 0.03
    ids = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        term = ours.cfg.aux_loss_coef * ours(ids, targets=ids).aux_loss
        hf_term = hf.config.router_aux_loss_coef * hf(ids, output_router_logits=True).aux_loss
    assert abs(float(term) - float(hf_term)) <= 1e-6 * float(hf_term)


@pytest.mark.parametrize("preset", ["deepseek_v3-tiny", "glm4_moe-tiny"])
def test_a_converted_deepseek_or_glm_model_trains_with_its_familys_balancing(preset):
    """transformers' DeepSeek-V3 and GLM4-MoE configs have no balancing fields: a converted model
    fine-tuned with no balancing at all, where its design updates the selection bias."""
    from moelab.models.presets import FAMILIES

    ours = _model(preset, {"seq_aux_loss_coef": 0.0, "bias_update_rate": 0.0})
    cfg = from_hf(to_hf(ours)).cfg
    family = FAMILIES[preset.removesuffix("-tiny")]
    assert cfg.bias_update_rate == family["bias_update_rate"] > 0
    # the recipe's 1e-4 in each MoE layer, as moelab's average over the MoE layers
    n = len(cfg.moe_layers)
    assert n >= 2 and cfg.seq_aux_loss_coef == pytest.approx(1e-4 * n, rel=1e-12)


@pytest.mark.parametrize("preset,moe_layers", [("deepseek-v3", 58), ("glm-4.5-air", 45), ("deepseek_v3-tiny", 3)])
def test_deepseek_v3_and_glm_presets_weigh_each_moe_layer_as_their_recipe(preset, moe_layers):
    """DeepSeek-V3 and GLM-4.5 add a 1e-4 sequence-wise loss in every MoE layer; moelab averages
    the layers' terms, so its coefficient is 1e-4 x the MoE layers: each layer's gradient the recipe's,
    not a 58th of it."""
    from moelab.models.presets import get_preset

    m = get_preset(preset).model
    assert len(m.moe_layers) == moe_layers
    assert m.seq_aux_loss_coef / moe_layers == pytest.approx(1e-4, rel=1e-12)


@pytest.mark.parametrize("method,alpha,seq_aux", [("greedy", 0.001, True), ("group_limited_greedy", 0.003, True),
                                                  ("greedy", 0.002, False), ("greedy", None, None)])
def test_a_deepseek_v2_hub_config_converts_its_routing_and_balancing(tmp_path, method, alpha, seq_aux):
    """DeepSeek-V2's config.json on the Hub says its routing by topk_method (groups only with
    group_limited_greedy) and its balance loss by aux_loss_alpha and seq_aux, fields transformers'
    config keeps but its model does not train with: the loss per sequence, or per batch without seq_aux.
    DeepSeek adds the loss at alpha in every MoE layer, moelab averages the layers': alpha x the MoE
    layers gives the same gradient. Without them, the family's recipe."""
    import json

    from moelab.models.presets import FAMILIES

    model = _model(*CASES["deepseek_v2"])
    to_hf(model).save_pretrained(tmp_path)
    raw = {k: v for k, v in json.loads((tmp_path / "config.json").read_text()).items()
           if k not in ("aux_loss_alpha", "seq_aux")}  # as a config.json without them
    raw["topk_method"] = method
    for key, value in (("aux_loss_alpha", alpha), ("seq_aux", seq_aux)):
        if value is not None:
            raw[key] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = load_hf(tmp_path)
    grouped = method == "group_limited_greedy"
    assert (ours.cfg.n_group, ours.cfg.topk_group) == ((4, 2) if grouped else (1, 1))
    want = alpha * 2 if alpha is not None else FAMILIES["deepseek_v2"]["seq_aux_loss_coef"]  # 2 MoE layers
    assert (ours.cfg.seq_aux_loss_coef, ours.cfg.aux_loss_coef) == ((want, 0.0) if seq_aux is not False else (0.0, want))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _max_diff(theirs, ours, torch.randint(0, V, (2, 48))) <= 1e-4
    raw["topk_method"] = "noaux_tc"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="topk_method='noaux_tc'"):
        load_hf(tmp_path)


@pytest.mark.parametrize("seq_aux,aux", [(0.04, 0.0), (0.0, 0.03)])
def test_a_deepseek_v2_export_carries_its_balance_loss_back(tmp_path, seq_aux, aux):
    """Exported as DeepSeek's own config fields (aux_loss_alpha per MoE layer, seq_aux), the
    balancing a run trained with comes back on convert, not the family's default."""
    import json

    ours = _model(*CASES["deepseek_v2"], seed=0)
    ours.cfg.seq_aux_loss_coef, ours.cfg.aux_loss_coef = seq_aux, aux
    export_hf(ours, tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (raw["aux_loss_alpha"], raw["seq_aux"]) == ((seq_aux or aux) / 2, seq_aux > 0)  # 2 MoE layers
    back = load_hf(tmp_path / "hf").cfg
    assert (back.seq_aux_loss_coef, back.aux_loss_coef) == (seq_aux, aux)


@pytest.mark.parametrize("case", ["deepseek_v3", "deepseek_v3-full-q-yarn", "deepseek_v3-no-shared"])
def test_glm4_moe_lite_holds_deepseek_v3s_design_exactly(tmp_path, case):
    """GLM-4.7-Flash's Glm4MoeLite is DeepSeek-V3's MLA and MoE under GLM's config names (dense layers
    listed in mlp_layer_types): `--arch glm4_moe_lite` writes it, and its checkpoints convert, both
    ways exactly; dense layers not all first, or RoPE over part of qk_rope_head_dim, are refused."""
    import json

    from moelab.models.hf import model_config_from_hf

    ours = _model(*CASES[case], seed=1)
    hf = to_hf(ours, "glm4_moe_lite")
    assert type(hf).__name__ == "Glm4MoeLiteForCausalLM"
    ids = torch.randint(0, V, (2, 48))
    assert _max_diff(hf, ours, ids) <= 1e-4
    export_hf(ours, tmp_path / "hf", arch="glm4_moe_lite")
    back = load_hf(tmp_path / "hf")
    assert ours.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
    _gradients_match(_model(*CASES[case], seed=1), "glm4_moe_lite")
    torch.manual_seed(3)
    theirs = transformers.Glm4MoeLiteForCausalLM(hf.config).eval()
    with torch.no_grad():
        for name, t in theirs.state_dict().items():
            if t.ndim == 1:
                t.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    again = to_hf(from_hf(theirs), "glm4_moe_lite").state_dict()
    assert all(torch.equal(t, again[k]) for k, t in theirs.state_dict().items())
    assert _max_diff(theirs, from_hf(theirs), ids) <= 1e-4
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value, match in (("mlp_layer_types", ["sparse", "dense", "sparse"], "mlp_layer_types"),
                              ("rope_parameters", {**raw["rope_parameters"], "partial_rotary_factor": 0.5},
                               "partial_rotary_factor=0.5")):
        with pytest.raises(UserError, match=match):
            model_config_from_hf(transformers.Glm4MoeLiteConfig.from_dict({**raw, key: value}))


def test_an_ernie_model_converts_its_selection_bias_and_refuses_what_moelab_cannot_hold(tmp_path):
    """ERNIE 4.5's routers choose by softmax score + a (1, E) selection bias (moe_statics): it is kept
    (and trained by the family's bias updates); a model without one exports a bias of zeros, which
    chooses as it did. Biased MLPs and head (use_bias), or MoE layers other than a start index to the
    last, are refused by name."""
    import json

    ours = _model(*CASES["ernie4_5_moe"])
    hf = to_hf(ours)
    biases = [r.selection_bias for r in ours.routers]
    theirs = [layer.mlp.gate.moe_statics.e_score_correction_bias for layer in hf.model.layers[1:]]
    assert all(torch.equal(a.view(1, -1), b) for a, b in zip(biases, theirs)) and biases[0].abs().sum() > 0
    plain = _model("ernie4_5_moe-tiny", {"bias_update_rate": 0.0})
    assert not hasattr(plain.routers[0], "selection_bias")
    assert _max_diff(to_hf(plain), plain, torch.randint(0, V, (2, 40))) <= 1e-4
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key, value, match in (("use_bias", True, "use_bias=True"), ("moe_layer_interval", 2, "MoE layers"),
                              ("moe_layer_end_index", 1, "MoE layers")):
        (tmp_path / "config.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(UserError, match=match):
            load_hf(tmp_path)


@pytest.mark.parametrize("field,value", [("capacity_factor", 1.25), ("noisy_gating", True)])
def test_router_settings_of_a_dense_model_do_not_stop_its_export(field, value):
    """A dense model (n_experts=0) has no router: its capacity factor or noisy gating change nothing,
    and export refused it for them ('closest is llama: model.capacity_factor=1.25')."""
    ours = _model("llama-tiny", {field: value})
    assert pick_arch(ours.cfg) == "llama"
    assert _max_diff(to_hf(ours), ours, torch.randint(0, V, (2, 24))) <= 1e-4


def test_trained_run_exports_and_converts_via_cli(tmp_path):
    import subprocess
    import sys

    from moelab import load_model
    from moelab.config import build_config
    from moelab.train.loop import train

    run = tmp_path / "run"
    train(build_config("test", None, ["train.steps=3", "train.eval_every=3"]), out=str(run), progress=False)

    from tests.conftest import moelab
    from tests.conftest import run_cli as cli  # in this process: transformers is loaded once (6 s a call)

    res = cli("export", str(run), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    # transformers' generate stops where the run's documents end, as moelab's does
    eos = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token_id
    assert eos is not None and hf.config.eos_token_id == hf.generation_config.eos_token_id == eos
    ours = load_model(run)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4
    bars = transformers.utils.logging.is_progress_bar_enabled()
    res = cli("convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert res.returncode == 0, res.stderr
    # not a terminal: no "Loading weights" bar redrawn into the log, and transformers' setting as it was
    assert "Loading weights" not in res.stderr + res.stdout and res.stdout.strip().startswith("converted")
    assert transformers.utils.logging.is_progress_bar_enabled() == bars
    back = load_model(tmp_path / "back")
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    res = cli("export", str(run), "--out", str(tmp_path / "hf"))  # never overwrite
    assert res.returncode == 2 and "not empty" in res.stderr
    res = cli("convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))  # convert has no --resume
    assert res.returncode == 2 and "not empty" in res.stderr and "--resume" not in res.stderr
    res = cli("export", str(run), "--to", "mixtral", "--out", str(tmp_path / "hf2"))  # the arch is --arch
    assert res.returncode == 2 and "--to hf --arch mixtral" in res.stderr and not (tmp_path / "hf2").exists()

    def small_files():  # every write past 256 KB fails (EFBIG), as on a full disk; the weights are bigger
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))

    res = subprocess.run([sys.executable, "-m", "moelab", "export", str(run), "--out", str(tmp_path / "new" / "hf")],
                         capture_output=True, text=True, preexec_fn=small_files)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"moelab: error: cannot write the export to {tmp_path}") and "make room, then export" in last
    assert not (tmp_path / "new").exists()  # no half model that would load as garbage, no .tmp-*
    res = moelab("export", str(run), "--out", "/proc/moelab-nowhere/hf")  # refused before the model loads
    assert res.returncode == 2 and "cannot write in /proc (" in res.stderr and res.stdout == "", res.stderr
    with pytest.raises(OSError, match="choose another --out, then export again"):  # a path refused: room won't help
        export_hf(load_model(run), "/proc/moelab-nowhere/hf")
    res = subprocess.run([sys.executable, "-m", "moelab", "convert", str(tmp_path / "hf"), "--out",
                          str(tmp_path / "conv")], capture_output=True, text=True, preexec_fn=small_files)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("moelab: error: cannot write the converted model")
    assert not (tmp_path / "conv").exists()
    check_hf_directory_as_source(tmp_path / "hf", tmp_path)


def check_hf_directory_as_source(hf_dir, tmp_path):
    """An HF directory exports again (same tensors, its tokenizer with them); --resume of one says
    what starts from its weights; an empty directory's refusal names every kind of model directory."""
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    res = run_cli("export", hf_dir, "--out", tmp_path / "again")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    a, b = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = run_cli("export", hf_dir, "--out", tmp_path / "half", "--dtype", "bf16")
    assert res.returncode == 0 and "(bf16, 1 weight file," in res.stdout, res.stderr
    res = run_cli("export", tmp_path / "half", "--out", tmp_path / "half2")  # auto: bf16 in, bf16 out
    assert res.returncode == 0 and "(bf16," in res.stdout, res.stderr
    c, d = load_file(tmp_path / "half" / "model.safetensors"), load_file(tmp_path / "half2" / "model.safetensors")
    assert c.keys() == a.keys() and d.keys() == a.keys()
    for k in a:
        assert c[k].dtype == torch.bfloat16 and torch.equal(c[k], a[k].to(torch.bfloat16)), k
        assert torch.equal(c[k], d[k]), k
    res = run_cli("train", "--resume", hf_dir, "--out", tmp_path / "resumed")
    assert res.returncode == 2 and f"train.init_from={hf_dir}" in res.stderr and not (tmp_path / "resumed").exists()
    (tmp_path / "empty").mkdir()
    res = run_cli("eval", tmp_path / "empty")
    assert res.returncode == 2 and "Hugging Face model directory" in res.stderr


def _hf_tokenizer(folder, chat_template: str = "", bos: bool = False) -> None:
    """A real tokenizer.json with bos/eos/pad tokens and a chat template, saved as transformers does;
    `bos`: it puts `<s>` before each text, as Llama's and Mixtral's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["the router sends each token to two experts"] * 5,
                           trainers.BpeTrainer(vocab_size=80, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)


def test_generation_from_an_hf_model_equals_transformers_generate(tmp_path):
    """moelab generate on an HF directory: the prompt encoded as transformers encodes it (here with
    the `<s>` the tokenizer puts first), the same greedy tokens, the same end-of-text id."""
    from moelab.eval.generate import Sampler, generate_text
    from moelab.eval.target import load_target

    src = export_hf(_model("mixtral-tiny", {}), tmp_path / "src", token_ids={"bos_token_id": 1, "eos_token_id": 2})
    _hf_tokenizer(src, bos=True)
    target = load_target(str(src))
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src)
    prompt = "the router sends"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1 and target.tokenizer.encode_prompt(prompt) == ids[0].tolist()
    padded = list(range(len(hf_tok), V))  # rows past the tokenizer, which moelab never draws
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, suppress_tokens=padded)[0, ids.shape[1]:].tolist()
    got = generate_text(target.model, target.tokenizer, prompt, 12, Sampler(temperature=0))
    assert got["new_tokens"] == len(want) and got["text"] == hf_tok.decode([t for t in want if t != 2])
    from tokenizers import processors  # a tokenizer that also appends </s>: the prompt must not end the text

    target.tokenizer.tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    assert target.tokenizer.encode_prompt(prompt) == ids[0].tolist()
    assert target.tokenizer.encode_prompt("") == [1]  # an empty prompt: generation from a document's start


def test_chat_generation_lays_out_the_messages_as_transformers_does(tmp_path):
    """generate --chat: the system and user messages through the model's own chat template, as
    transformers' apply_chat_template(add_generation_prompt=True) lays them out, then the same greedy
    reply as transformers' generate; from the HF directory and from the run converted from it."""
    from moelab.eval.generate import prompt_ids
    from moelab.eval.target import load_target
    from tests.conftest import run_cli

    src = export_hf(_model("qwen3_moe-tiny", {}), tmp_path / "src", token_ids={"bos_token_id": 1, "eos_token_id": 2})
    _hf_tokenizer(src, "{{ bos_token }}{% for m in messages %}{{ m.role }} {{ m.content }}</s>{% endfor %}"
                       "{% if add_generation_prompt %}the router{% endif %}")
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src)
    system, prompt = "two experts", "each token"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    target = load_target(str(src))
    assert prompt_ids(target.tokenizer, prompt, system, chat=True) == ids != target.tokenizer.encode_prompt(prompt)
    assert ids[0] == 1 and ids.count(2) == 2  # the template's <s>, and each message ended by </s>
    padded = list(range(len(hf_tok), V))  # rows past the tokenizer, which moelab never draws
    want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                       suppress_tokens=padded)[0, len(ids):].tolist()
    reply = hf_tok.decode([t for t in want if t != 2])
    assert run_cli("convert", src, "--out", tmp_path / "run").returncode == 0
    for where in (src, tmp_path / "run"):
        res = run_cli("generate", where, "--chat", "--system", system, "--prompt", prompt, "--temperature", "0",
                      "--max-new-tokens", "12")
        assert res.returncode == 0 and res.stdout == reply + "\n", res.stderr
        assert f"-- {len(want)} tokens" in res.stderr
    res = run_cli("generate", src, "--system", system, "--prompt", prompt)
    assert res.returncode == 2 and "--system is a chat message: give it with --chat" in res.stderr
    template = tmp_path / "run" / "tokenizer" / "chat_template.jinja"  # one that refuses a system message
    template.write_text("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
    res = run_cli("generate", tmp_path / "run", "--chat", "--system", system, "--prompt", prompt)
    assert res.returncode == 2 and "failed on these messages: TemplateError: System role not supported" in res.stderr
    template.unlink()  # a model without a template
    res = run_cli("generate", tmp_path / "run", "--chat", "--prompt", prompt)
    assert res.returncode == 2 and "has no chat template" in res.stderr and len(res.stderr.splitlines()) == 1


@pytest.mark.parametrize("own_generation_config", [True, False])
def test_token_ids_generation_defaults_and_chat_template_survive_convert_and_export(tmp_path, own_generation_config):
    """An HF model's end-of-text ids (what `generate` stops at), its sampling defaults and its chat
    template are not weights, but a model without them generates past the end of its answers."""
    import json

    from tests.conftest import run_cli

    src = export_hf(_model("qwen3_moe-tiny", {}), tmp_path / "src", token_ids={"bos_token_id": 1, "eos_token_id": 2,
                                                                               "pad_token_id": 0})
    template = "{% for m in messages %}{{ m.content }}</s>{% endfor %}"
    _hf_tokenizer(src, template)
    if own_generation_config:  # as instruction-tuned models have: several end ids, sampling defaults
        (src / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0, "do_sample": True, "temperature": 0.6}))
    else:
        (src / "generation_config.json").unlink()
    res = run_cli("convert", src, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    res = run_cli("export", tmp_path / "run", "--out", tmp_path / "back")
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "back"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["max_position_embeddings"] == json.loads((src / "config.json").read_text())["max_position_embeddings"]
    gen = transformers.GenerationConfig.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == template and tok.eos_token == "</s>"
    assert (cfg["bos_token_id"], cfg["pad_token_id"]) == (gen.bos_token_id, gen.pad_token_id) == (1, 0)
    if own_generation_config:
        assert (folder / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
        assert cfg["eos_token_id"] == gen.eos_token_id == [2, 3] and gen.temperature == 0.6
    else:
        assert cfg["eos_token_id"] == gen.eos_token_id == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.generation_config.eos_token_id == gen.eos_token_id
    from moelab.data.tokenizer import load_tokenizer  # moelab generate stops where transformers' does

    assert load_tokenizer(tmp_path / "run" / "tokenizer").end_ids == ({2, 3} if own_generation_config else {2})
    if own_generation_config:  # a model fine-tuned from it keeps them too, through its prepared data
        from tests.conftest import write_corpus

        res = run_cli("train", "--preset", "test", "--out", tmp_path / "ft", f"train.init_from={src}",
                      f"data.source={write_corpus(tmp_path / 'text', n_docs=20, words_per_doc=50)}",
                      "train.steps=1", "train.eval_every=1", "train.report=false")
        assert res.returncode == 0, res.stderr
        res = run_cli("export", tmp_path / "ft", "--out", tmp_path / "ft_hf")
        assert res.returncode == 0, res.stderr
        for name in ("generation_config.json", "chat_template.jinja", "tokenizer_config.json"):
            assert (tmp_path / "ft_hf" / name).read_bytes() == (src / name).read_bytes(), name


def test_a_damaged_generation_config_is_refused_by_convert_not_later_by_export(tmp_path):
    """convert copied a generation_config.json that is not JSON as it was; only `export`, later and
    from the run, refused it. Now convert says so at once, before any weight is read."""
    from tests.conftest import run_cli

    src = export_hf(_model("qwen3_moe-tiny", {}), tmp_path / "src")
    (src / "generation_config.json").write_text('{"eos_token_id": 2,')
    res = run_cli("convert", src, "--out", tmp_path / "run")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moelab: error: cannot read {src / 'generation_config.json'}: ")
    assert lines[0].endswith("; fix or remove it")
    assert not (tmp_path / "run").exists()
    (src / "generation_config.json").unlink()  # without one, convert writes one from config.json's ids
    assert run_cli("convert", src, "--out", tmp_path / "run").returncode == 0


def test_damaged_tokenizer_files_are_refused_by_convert_not_copied(tmp_path):
    """convert copied a cut tokenizer.json or a tokenizer_config.json that is not a JSON object into the
    run, and reported success; the run failed at its first use."""
    import shutil

    from moelab.data.tokenizer import load_tokenizer
    from tests.conftest import run_cli

    good = export_hf(_model("qwen3_moe-tiny", {}), tmp_path / "good")
    _hf_tokenizer(good)
    whole = (good / "tokenizer.json").read_text()
    for name, text, said in (("tokenizer.json", whole[:500], "cannot read tokenizer"),
                             ("tokenizer_config.json", "{x", "tokenizer_config.json: Expecting property name"),
                             ("tokenizer_config.json", "[1]", "tokenizer_config.json: it holds a JSON list")):
        src = tmp_path / "src"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(good, src)
        (src / name).write_text(text)
        res = run_cli("convert", src, "--out", tmp_path / "run")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and said in lines[0], res.stderr
        assert not (tmp_path / "run").exists()
    (src / "tokenizer_config.json").write_text('{"eos_token": 5}')  # not a token's text: tokenizers' traceback
    assert load_tokenizer(src).eos_token == "</s>"  # found among the usual names instead
    (src / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')  # it said: no end-of-text token
    with pytest.raises(UserError, match=r"end-of-text token '<\|nope\|>' \(its tokenizer_config.json's eos_token\) "
                                        "is not in its vocabulary"):
        load_tokenizer(src)
    (src / "tokenizer_config.json").write_text('{"eos_token": 5}')
    assert run_cli("convert", src, "--out", tmp_path / "run").returncode == 0


def test_a_damaged_config_json_is_one_line_for_info_convert_and_eval(tmp_path):
    """No model_type, a field of the wrong type, not JSON: transformers' tracebacks; vocab_size 0 (moelab's
    "from the tokenizer") an AssertionError in the model build."""
    import json
    import re

    from tests.conftest import run_cli

    src = export_hf(_model("qwen3_moe-tiny", {}), tmp_path / "src")
    good = json.loads((src / "config.json").read_text())
    for text, said in ((json.dumps({k: v for k, v in good.items() if k != "model_type"}), "should have a `model_type`"),
                       (json.dumps(good | {"hidden_size": "wide"}), "'hidden_size' expected int, got str"),
                       (json.dumps(good)[:-5], "is not a valid JSON file"),
                       (json.dumps(good | {"vocab_size": 0}), "config.json gives vocab_size=0"),
                       # said as "train.seq_len must be >= 2 (got 0)", a setting the file does not have
                       (json.dumps(good | {"max_position_embeddings": 0}), "gives max_position_embeddings=0")):
        (src / "config.json").write_text(text)
        for cmd in (["info", src], ["convert", src, "--out", tmp_path / "run"]):
            res = run_cli(*cmd)
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 2 and len(lines) == 1 and said.lower() in lines[0].lower(), (cmd, res.stderr)
        assert not (tmp_path / "run").exists()
        with pytest.raises(UserError, match="(?i)" + re.escape(said)):  # eval, generate, moelab.load
            load_hf(src)
    (src / "config.json").write_text(json.dumps(good))
    assert run_cli("info", src).returncode == 0


def test_a_damaged_hf_weights_file_is_one_line(tmp_path):
    """A weights file cut short by an interrupted download or copy: eval and convert ended in a
    SafetensorError traceback from inside transformers."""
    import shutil

    ours = _model(*CASES["mixtral"])
    export_hf(ours, tmp_path / "hf")
    shutil.copytree(tmp_path / "hf", tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=rf"cannot load {tmp_path / 'cut'}: a weights file is damaged \("):
        load_hf(tmp_path / "cut")
    assert torch.equal(load_hf(tmp_path / "hf").embed.weight, ours.embed.weight)
    # an --out that holds files is refused before any weight is read (for a large model, minutes
    # of loading came first): the damaged file is never reached
    from tests.conftest import run_cli

    r = run_cli("export", tmp_path / "cut", "--out", tmp_path / "hf")
    assert r.returncode == 2 and f"output directory {tmp_path / 'hf'} is not empty" in r.stderr, r.stderr


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3"])
def test_hf_weights_missing_or_of_another_shape_are_refused_not_filled_at_random(tmp_path, case, capfd):
    """transformers starts a tensor missing from the files (or of another shape than config.json)
    from a random initialisation, with only a log report: convert, eval and init_from then went on
    with a partly random model. A tensor the architecture does not use is left out, as there, and
    said in one line; transformers' report table (terminal colours in a log) is not printed."""
    import shutil

    from safetensors.torch import load_file, save_file

    ours = _model(*CASES[case])
    export_hf(ours, tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    router = next(k for k in weights if k.endswith(".gate.weight"))  # the router
    attn = next(k for k in weights if k.endswith("self_attn.o_proj.weight"))
    for name, edit, match in (
            # named as transformers names the module (Mixtral's block_sparse_moe is its mlp)
            ("missing", lambda w: w.pop(router),
             r"lack 1 tensor\(s\) its config.json needs \(model\.layers\.\d\.\w+\.gate"),
            ("shape", lambda w: w.update({attn: w[attn][:, :-1].contiguous()}),
             rf"1 tensor\(s\) have another shape than its config.json gives \({attn} "),
            ("extra", lambda w: w.update({"model.layers.0.unused.weight": torch.zeros(2)}), None)):
        shutil.copytree(tmp_path / "hf", tmp_path / name)
        changed = dict(weights)
        edit(changed)
        save_file(changed, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        capfd.readouterr()
        if match is None:
            for a, b in zip(load_hf(tmp_path / name).state_dict().values(), ours.state_dict().values()):
                assert torch.equal(a, b)
            hf_class = {"mixtral": "MixtralForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}[case]
            assert capfd.readouterr().err == (f"note: {tmp_path / name} holds 1 tensor(s) that {hf_class} does not "
                                              "use (model.layers.0.unused.weight), left out as transformers does\n")
            continue
        with pytest.raises(UserError, match=rf"cannot load {tmp_path / name}: .*{match}"):
            load_hf(tmp_path / name)
        assert capfd.readouterr().err == "", "the error is the whole output"
