"""CUDA: the expert paths, compile, autocast and the CLI loop on a GPU. Skipped where no GPU is
present (CI has none); run on a GPU machine with `pytest tests/models/test_cuda.py`."""

import json

import pytest
import torch

from moelab.config import ModelConfig
from moelab.models.experts import Experts, experts_reference, pick_backend
from moelab.models.moe import MoE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# relative error ||out - ref|| / ||ref|| against float64: fp32 arithmetic, then bf16/fp16 operands
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "grouped", "padded"])
def test_cuda_expert_paths_match_float64_reference(dtype, backend):
    E, D, F, T, K = 8, 64, 128, 512, 2
    dev = torch.device("cuda")
    if backend == "grouped" and pick_backend("grouped", dev, dtype, (D, F)) != "grouped":
        pytest.skip(f"torch._grouped_mm has only its per-group loop for {dtype} here; moelab pads instead")
    g = torch.Generator().manual_seed(7)
    x64 = torch.randn(T, D, dtype=torch.float64, generator=g)
    scores = torch.randn(T, E, generator=g)
    scores[:, 3] = -1e9  # expert 3 gets no token: an empty group must be handled
    w32, idx = scores.softmax(-1).topk(K, dim=-1)
    counts = torch.bincount(idx.flatten(), minlength=E)
    ref_experts = Experts(E, D, F, backend="loop").double()
    ref_experts.reset_parameters(0.1, 0.1)
    experts = Experts(E, D, F, backend=backend).to(dev, dtype)
    experts.load_state_dict(ref_experts.state_dict())
    gout = torch.randn(T, D, dtype=torch.float64, generator=g)

    x1, w1 = x64.clone().requires_grad_(), w32.double().requires_grad_()
    ref = experts_reference(x1, idx, w1, ref_experts.gate_proj, ref_experts.up_proj, ref_experts.down_proj)
    ref_grads = torch.autograd.grad((ref * gout).sum(), [x1, w1, *ref_experts.parameters()])

    x2 = x64.to(dev, dtype).requires_grad_()
    w2 = w32.to(dev, dtype).requires_grad_()
    out = experts(x2, idx.to(dev), w2, counts.to(dev))
    grads = torch.autograd.grad((out * gout.to(dev, dtype)).sum(), [x2, w2, *experts.parameters()])
    tol = REL_TOL[dtype]
    assert _rel(out, ref) < tol
    for name, a, b in zip(["x", "weights", "gate", "up", "down"], grads, ref_grads):
        assert _rel(a, b) < tol, name
    assert grads[2][3].abs().max() == 0  # the idle expert gets exactly zero gradient


def test_cuda_bf16_auto_backend_is_grouped_on_hopper():
    dev = torch.device("cuda")
    expected = "grouped" if torch.cuda.get_device_capability(dev)[0] >= 9 else "padded"
    assert pick_backend("auto", dev, torch.bfloat16, (256, 512)) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_moe_layer_compiled_equals_eager(dtype):
    cfg = ModelConfig(d_model=64, n_heads=4, n_experts=8, top_k=2, expert_dim=128, router="sigmoid",
                      n_group=4, topk_group=2, n_shared_experts=1, shared_expert_dim=64)
    torch.manual_seed(0)
    moe = MoE(cfg).cuda()
    moe.experts.reset_parameters(0.1, 0.1)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(4, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y, r = moe(x)
    y.float().square().sum().backward()
    grads = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y2, r2 = torch.compile(moe, fullgraph=True)(x)
    y2.float().square().sum().backward()
    assert torch.equal(r.idx_TK, r2.idx_TK)  # routing is fp32 in both: the same experts
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(y2, y) < tol
    for (name, p), g in zip(moe.named_parameters(), grads):
        assert _rel(p.grad, g) < tol * 10, name


def test_cuda_activation_checkpointing_routes_identically():
    from tests.models.test_checkpointing import VARIANTS, _model

    model = _model(**VARIANTS["sigmoid-groups-mla"]).cuda()
    x = torch.randint(0, 300, (2, 49), device="cuda")
    results = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x[:, :-1], targets=x[:, 1:])
        out.loss.backward()
        results.append(([r.idx_TK.clone() for r in out.router], [p.grad.clone() for p in model.parameters()]))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    for a, b in zip(results[0][1], results[1][1]):
        assert _rel(a, b) < 1e-2


def test_cuda_model_built_on_gpu_has_the_cpu_models_weights():
    """Initialised on its GPU a tensor at a time, from the CPU generator: a seed gives the same model
    on every device, and the CUDA generator is left alone."""
    from moelab.models import MoETransformer
    from tests.models.test_init import _config

    cfg = _config("mla-yarn-dense-first")
    torch.manual_seed(3)  # seeds the CUDA generator too: read its state after
    cuda_rng = torch.cuda.get_rng_state()
    on_gpu = MoETransformer(cfg, device="cuda")
    torch.manual_seed(3)
    on_cpu = MoETransformer(cfg)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert all(t.is_cuda for t in [*on_gpu.parameters(), *on_gpu.buffers()])
    for (name, a), b in zip(on_gpu.state_dict().items(), on_cpu.state_dict().values()):
        assert torch.equal(a.cpu(), b), name
    assert torch.equal(on_gpu.rope_cos.cpu(), on_cpu.rope_cos)


def test_cuda_load_model_reads_a_checkpoint_straight_onto_the_gpu(tmp_path):
    from moelab import load_model
    from moelab.config import Config
    from moelab.models import MoETransformer
    from moelab.train.checkpoint import save_weights_only
    from tests.models.test_init import _config

    cfg = Config(model=_config("mla-yarn-dense-first"))
    model = MoETransformer(cfg.model)
    save_weights_only(tmp_path, model, cfg.to_yaml(), {})
    on_gpu = load_model(tmp_path, "cuda")
    assert all(t.is_cuda for t in [*on_gpu.parameters(), *on_gpu.buffers()])
    for (name, a), b in zip(on_gpu.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("variant", ["mla-yarn-dense-first", "gqa"])
def test_cuda_a_model_held_in_bf16_runs_on_the_gpu_within_bf16_error_of_fp32(tmp_path, variant):
    """load_model(dtype="bf16") onto a GPU: tensors read and cast one at a time, the routers and
    RoPE tables fp32; forward (grouped or padded bf16 experts, no autocast) and cached decoding
    within bf16 error of the fp32 model's logits."""
    from moelab import load_model
    from moelab.config import Config
    from moelab.eval.generate import inference_routing
    from moelab.models import MoETransformer
    from moelab.train.checkpoint import save_weights_only
    from tests.models.test_init import _config

    cfg = Config(model=_config(variant))
    torch.manual_seed(0)
    save_weights_only(tmp_path, MoETransformer(cfg.model), cfg.to_yaml(), {})
    half, wide = load_model(tmp_path, "cuda", dtype="bf16"), load_model(tmp_path, "cuda")
    for name, t in half.state_dict().items():
        assert t.is_cuda and t.dtype == (torch.float32 if ".router." in name else torch.bfloat16), name
    assert half.rope_cos.dtype == torch.float32
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), device="cuda")
    with torch.no_grad(), inference_routing(half):
        ref, full = wide(ids).logits, half(ids).logits
        cache = half.new_cache(24)
        parts = [half(ids[:, :16], cache=cache).logits] + [half(ids[:, t:t + 1], cache=cache).logits
                                                           for t in range(16, 24)]
    assert _rel(full, ref) < REL_TOL[torch.bfloat16]
    assert _rel(torch.cat(parts, dim=1), ref) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("variant", ["mla-q-lowrank-interleaved", "gqa"])
def test_cuda_prompts_decoded_together_get_the_logits_each_gets_alone(variant):
    """Left-padded batched decoding on a GPU (SDPA with the rows' boolean mask): each prompt's
    prefill and decoding logits equal its own forward's, in fp32."""
    from moelab.eval.generate import inference_routing
    from tests.models.variants import tiny_model

    model = tiny_model(variant, init_std=0.2).cuda()
    model.reset_parameters()
    lens = [7, 2, 11]
    prompts = [torch.randint(0, 97, (n,), device="cuda") for n in lens]
    width = max(lens)
    ids = torch.stack([torch.cat([prompts[b].new_zeros(width - n), prompts[b]]) for b, n in enumerate(lens)])
    more = torch.randint(0, 97, (len(lens), 4), device="cuda")
    with torch.no_grad(), inference_routing(model):
        cache = model.new_cache(width + 4, pad=torch.tensor([width - n for n in lens], device="cuda"))
        first = model(ids, cache=cache).logits
        steps = torch.cat([model(more[:, t:t + 1], cache=cache).logits for t in range(4)], dim=1)
        for b, n in enumerate(lens):
            alone = model(torch.cat([prompts[b], more[b]])[None]).logits[0]
            torch.testing.assert_close(first[b, width - n:], alone[:n], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(steps[b], alone[n:], rtol=1e-4, atol=1e-4)


def test_cuda_fp32_run_is_pointed_to_the_tensor_cores():
    from moelab.train.host import precision_note, tensor_core_note

    dev = torch.device("cuda")
    note = precision_note(dev, "fp32", None, faster="train.precision")
    assert note == tensor_core_note(torch.cuda.get_device_capability(dev))
    if torch.cuda.get_device_capability(dev) >= (8, 0):
        assert "train.precision=bf16" in note


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_cli_train_eval_and_resume(tmp_path, precision):
    from tests.conftest import moelab, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    res = moelab("train", "--preset", "test", "--device", "cuda", "--out", tmp_path / "run",
                 f"data.source={corpus}", "data.vocab_size=300", f"train.precision={precision}",
                 "train.save_every=10", "train.steps=20")
    assert res.returncode == 0, res.stderr
    res = moelab("train", "--out", tmp_path / "run", "--resume", "auto", "--device", "cuda", "train.steps=30")
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train" and r["loss"] is not None]
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # resumed, one uninterrupted record
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    final = [r for r in recs if r["split"] == "val" and r.get("final")]
    assert final and torch.isfinite(torch.tensor(final[-1]["loss"]))  # eval in training precision
    if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name():
        assert all(0 < r["mfu"] < 1 for r in train)
