"""Named run presets as plain functions returning a full Config (model + training defaults).

`tiny` is the default CPU run: about 3M parameters, a few minutes on 2 cores.
`exp3` is the "DeepSeek attention + GLM4 MoE" experiment's size (256-d, 6 layers, 8 heads,
expert width 512, 4 experts top-2, seq 128, batch 16, Muon LR 3e-3).

Each architecture family has a `<family>-tiny` preset (same design at a CPU-trainable size; the
Hugging Face parity tests use these) and a preset at the published size of a well-known model of
that family (train it on GPUs; `moelab info` accounts for it on any machine).
"""

from __future__ import annotations

import difflib

from moelab.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from moelab.errors import UserError


def tiny() -> Config:
    return Config(
        preset="tiny",
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, n_experts=4, top_k=2, expert_dim=256),
        data=DataConfig(),
        optim=OptimConfig(muon_lr=1e-2, adamw_lr=3e-3, warmup=50),
        train=TrainConfig(steps=600, seq_len=128, batch_size=16, eval_every=100, save_every=200),
    )


def exp3() -> Config:
    return Config(
        preset="exp3",
        model=ModelConfig(d_model=256, n_layers=6, n_heads=8, n_experts=4, top_k=2, expert_dim=512),
        data=DataConfig(),
        optim=OptimConfig(muon_lr=3e-3, adamw_lr=3e-3, warmup=100),
        train=TrainConfig(steps=10_000, seq_len=128, batch_size=16, eval_every=500,
                          save_every=3000, log_every=50),
    )


def test() -> Config:
    """Smallest useful run, for the test-suite: seconds on a CPU."""
    return Config(
        preset="test",
        model=ModelConfig(d_model=64, n_layers=2, n_heads=4, n_experts=4, top_k=2, expert_dim=64,
                          max_seq_len=64),
        data=DataConfig(vocab_size=512, max_docs=40, tokenizer_train_bytes=400_000),
        optim=OptimConfig(muon_lr=2e-2, adamw_lr=1e-2, warmup=5),
        train=TrainConfig(steps=30, seq_len=64, batch_size=8, eval_every=10, eval_windows=16,
                          log_every=5, save_every=10, plot=False, report=False),
    )


def apply_family(model: ModelConfig, family: str, **sizes) -> ModelConfig:
    """Give model a family's design, then sizes, then the balancing its recipe has at that depth."""
    for k, v in {**FAMILIES[family], **sizes}.items():
        setattr(model, k, v)
    if family in SEQ_AUX_PER_LAYER:
        model.seq_aux_loss_coef = recipe_seq_aux(family, model)
    return model


# Granite's logits are divided by 6 with its head tied to the embedding, which AdamW trains: at the
# tiny preset's AdamW rate its logits move 6x slower (val loss 5.01 after the 600 updates, Mixtral's
# 4.52); 6x the rate gives 4.48 (`moelab train --preset granitemoe-tiny [optim.adamw_lr=1.8e-2]`).
TINY_OPTIM = {"granitemoe": dict(adamw_lr=1.8e-2)}


def _tiny_family(family: str) -> Config:
    cfg = tiny()
    cfg.preset = f"{family}-tiny"
    apply_family(cfg.model, family, **TINY[family])
    for k, v in TINY_OPTIM.get(family, {}).items():
        setattr(cfg.optim, k, v)
    return cfg


# Design features per family, shared by the tiny and the published-size preset.
FAMILIES = {
    "mixtral": dict(n_kv_heads=2, tie_embeddings=False),
    "qwen3_moe": dict(n_kv_heads=2, qk_norm="head", tie_embeddings=False, norm_topk_prob=True),
    "olmoe": dict(qk_norm="full", norm_topk_prob=False, tie_embeddings=False),
    "deepseek_v3": dict(attention="mla", router="sigmoid", n_shared_experts=1, rope_interleave=True,
                        norm_topk_prob=True, tie_embeddings=False, aux_loss_coef=0.0, bias_update_rate=1e-3),
    "glm4_moe": dict(router="sigmoid", n_shared_experts=1, qkv_bias=True, partial_rotary=0.5,
                     norm_topk_prob=True, tie_embeddings=False, aux_loss_coef=0.0, bias_update_rate=1e-3),
    # DeepSeek-V2(-Lite) balanced experts with a per-sequence loss (seq_aux), alpha 0.001-0.003 in every MoE
    # layer: 0.03-0.18 as moelab's average over layers; 0.01 at the tiny size (1e-3 let its routing collapse)
    "deepseek_v2": dict(attention="mla", router="softmax", norm_topk_prob=False, n_shared_experts=2,
                        rope_interleave=True, tie_embeddings=False, aux_loss_coef=0.0, seq_aux_loss_coef=0.01,
                        bias_update_rate=0.0),
    # ERNIE 4.5: aux-loss-free selection bias (its moe_statics) beside a load-balancing loss (0.001 per pick)
    "ernie4_5_moe": dict(n_kv_heads=2, rope_interleave=True, norm_topk_prob=True, n_shared_experts=2,
                         tie_embeddings=True, bias_update_rate=1e-3),
    "qwen2_moe": dict(qkv_bias=True, n_shared_experts=1, shared_expert_gate=True, norm_topk_prob=False,
                      tie_embeddings=False),
    # MiniCPM5-MoE: GQA with a gated output, DeepSeek-V3's MoE (and, as it publishes none, its balancing)
    "minicpm5_moe": dict(n_kv_heads=2, attn_gate=True, router="sigmoid", n_shared_experts=1, norm_topk_prob=True,
                         tie_embeddings=False, aux_loss_coef=0.0, bias_update_rate=1e-3),
    # Granite 3.x MoE: muP multipliers (the attention scale 1 / head_dim, not its square root), softmax over
    # the top-k logits (softmax, top-k, renormalised), tied embeddings
    "granitemoe": dict(n_kv_heads=2, tie_embeddings=True, norm_topk_prob=True, embed_scale=12.0, residual_scale=0.22,
                       logits_divisor=6.0),
    "switch": dict(router="switch", top_k=1, capacity_factor=1.25, ffn_glu=False, ffn_act="gelu"),
    "llama": dict(n_experts=0, n_kv_heads=2, tie_embeddings=False),
    "qwen3": dict(n_experts=0, n_kv_heads=2, qk_norm="head", tie_embeddings=True),
}

# DeepSeek-V3 and GLM-4.5 add a sequence-wise balance loss of weight 1e-4 in every MoE layer. moelab
# averages the layers' terms, so the recipe is 1e-4 x the MoE layers (see recipe_seq_aux).
SEQ_AUX_PER_LAYER = {"deepseek_v3": 1e-4, "glm4_moe": 1e-4, "minicpm5_moe": 1e-4}


def recipe_seq_aux(family: str, model: ModelConfig) -> float:
    """The family's per-layer sequence-wise loss weight as moelab's coefficient (an average over the
    MoE layers): the weight x the model's MoE layers, so each layer's term keeps the recipe's weight."""
    return float(f"{SEQ_AUX_PER_LAYER[family] * len(model.moe_layers):.12g}")


TINY = {
    "mixtral": dict(n_experts=8, top_k=2, expert_dim=128),
    "qwen3_moe": dict(n_experts=8, top_k=2, expert_dim=96, head_dim=48, first_k_dense=1, dense_dim=256),
    "olmoe": dict(n_experts=8, top_k=2, expert_dim=96),
    "deepseek_v3": dict(n_experts=8, top_k=2, expert_dim=96, n_group=4, topk_group=2, first_k_dense=1,
                        dense_dim=256, routed_scaling=2.5, q_lora_rank=64, kv_lora_rank=48,
                        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    "glm4_moe": dict(n_experts=8, top_k=2, expert_dim=96, n_group=2, topk_group=1, first_k_dense=1,
                     dense_dim=256, qk_norm="head"),
    "deepseek_v2": dict(n_experts=8, top_k=2, expert_dim=96, n_group=4, topk_group=2, group_score_top=1,
                        first_k_dense=1, dense_dim=256, routed_scaling=1.5, q_lora_rank=0, kv_lora_rank=48,
                        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    "qwen2_moe": dict(n_experts=8, top_k=2, expert_dim=64, shared_expert_dim=256),
    "ernie4_5_moe": dict(n_experts=8, top_k=2, expert_dim=96, first_k_dense=1, dense_dim=256),
    "minicpm5_moe": dict(n_experts=8, top_k=2, expert_dim=96, n_group=2, topk_group=1, first_k_dense=1, dense_dim=256,
                         routed_scaling=2.5),
    "granitemoe": dict(n_experts=8, top_k=2, expert_dim=96, attn_scale=1 / 32),  # head_dim 128 / 4
    "switch": dict(n_experts=8, expert_dim=256),
    "llama": dict(dense_dim=384),
    "qwen3": dict(dense_dim=384),
}

# Published sizes: Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B, DeepSeek-V3 (671B), GLM-4.5-Air, DeepSeek-V2-Lite,
# Qwen1.5-MoE-A2.7B, ERNIE-4.5-21B-A3B, Granite-3.1-1B-A400M, MiniCPM5-15B-A2.5B,
# a decoder-only Switch-Base-8 analogue, Llama-3-8B, Llama-3.2-1B (Llama 3.1's RoPE scaling), Qwen3-0.6B.
PUBLISHED = {
    "mixtral-8x7b": ("mixtral", dict(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, n_experts=8, top_k=2,
        expert_dim=14336, rope_theta=1e6, norm_eps=1e-5, max_seq_len=32768)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, n_experts=128,
        top_k=8, expert_dim=768, rope_theta=1e6, max_seq_len=40960)),
    "olmoe-1b-7b": ("olmoe", dict(
        vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, n_experts=64, top_k=8, expert_dim=1024,
        norm_eps=1e-5, max_seq_len=4096)),
    "deepseek-v3": ("deepseek_v3", dict(
        vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_experts=256, top_k=8,
        expert_dim=2048, dense_dim=18432, n_group=8, topk_group=4, first_k_dense=3, routed_scaling=2.5,
        rope_scaling="yarn", rope_factor=40.0, rope_original_max_len=4096, yarn_mscale=1.0,
        yarn_mscale_all_dim=1.0, max_seq_len=163840)),
    "glm-4.5-air": ("glm4_moe", dict(
        vocab_size=151552, d_model=4096, n_layers=46, n_heads=96, n_kv_heads=8, head_dim=128,
        n_experts=128, top_k=8, expert_dim=1408, dense_dim=10944, first_k_dense=1, rope_theta=1e6,
        norm_eps=1e-5, max_seq_len=131072)),
    # seq_aux_loss_coef: its aux_loss_alpha 0.001 in each of its 26 MoE layers, as moelab's average over layers
    "deepseek-v2-lite": ("deepseek_v2", dict(
        vocab_size=102400, d_model=2048, n_layers=27, n_heads=16, q_lora_rank=0, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_experts=64, top_k=6, expert_dim=1408,
        dense_dim=10944, first_k_dense=1, rope_scaling="yarn", rope_factor=40.0, rope_original_max_len=4096,
        yarn_mscale=0.707, yarn_mscale_all_dim=0.707, max_seq_len=163840, seq_aux_loss_coef=0.026)),
    # its aux_loss_coef is transformers' router_aux_loss_coef 0.001 per pick, x top_k (see models/hf.py)
    "qwen1.5-moe-a2.7b": ("qwen2_moe", dict(
        vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, n_experts=60, top_k=4, expert_dim=1408,
        shared_expert_dim=5632, dense_dim=5632, rope_theta=1e6, max_seq_len=8192, aux_loss_coef=0.004)),
    "ernie-4.5-21b-a3b": ("ernie4_5_moe", dict(
        vocab_size=103424, d_model=2560, n_layers=28, n_heads=20, n_kv_heads=4, head_dim=128, n_experts=64, top_k=6,
        expert_dim=1536, dense_dim=12288, first_k_dense=1, rope_theta=5e5, norm_eps=1e-5, max_seq_len=131072,
        aux_loss_coef=0.006)),  # its router_aux_loss_coef 0.001 per pick, x top_k
    "granite-3.1-1b-a400m": ("granitemoe", dict(
        vocab_size=49155, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, n_experts=32, top_k=8, expert_dim=512,
        attn_scale=0.015625, rope_theta=1.5e6, max_seq_len=131072,
        aux_loss_coef=0.008)),  # its router_aux_loss_coef 0.001 per pick, x top_k
    "minicpm5-15b-a2.5b": ("minicpm5_moe", dict(
        vocab_size=130560, d_model=2048, n_layers=28, n_heads=32, n_kv_heads=2, head_dim=128, n_experts=160, top_k=16,
        expert_dim=512, dense_dim=8192, first_k_dense=1, routed_scaling=3.66, rope_theta=5e6, max_seq_len=524288)),
    "switch-base-8": ("switch", dict(
        vocab_size=32128, d_model=768, n_layers=12, n_heads=12, n_experts=8, expert_dim=3072,
        max_seq_len=2048)),
    "llama3-8b": ("llama", dict(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, dense_dim=14336,
        rope_theta=5e5, norm_eps=1e-5, max_seq_len=8192)),
    "llama3.2-1b": ("llama", dict(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, dense_dim=8192,
        tie_embeddings=True, rope_theta=5e5, norm_eps=1e-5, max_seq_len=131072, rope_scaling="llama3",
        rope_factor=32.0, rope_original_max_len=8192, llama3_low_freq_factor=1.0, llama3_high_freq_factor=4.0)),
    "qwen3-0.6b": ("qwen3", dict(
        vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
        dense_dim=3072, rope_theta=1e6, max_seq_len=40960)),
}


def _published(name: str) -> Config:
    family, model = PUBLISHED[name]
    cfg = Config(preset=name, model=apply_family(ModelConfig(), family, **model),
                 data=DataConfig(vocab_size=model["vocab_size"]),
                 optim=OptimConfig(muon_lr=2e-3, adamw_lr=1e-3, warmup=2000),
                 train=TrainConfig(steps=100_000, seq_len=2048, batch_size=8, precision="bf16",
                                   eval_every=1000, save_every=2000, log_every=50))
    return cfg


PRESETS = {"tiny": tiny, "exp3": exp3, "test": test}
for _fam in FAMILIES:
    PRESETS[f"{_fam}-tiny"] = (lambda f: lambda: _tiny_family(f))(_fam)
for _name in PUBLISHED:
    PRESETS[_name] = (lambda n: lambda: _published(n))(_name)


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown preset '{name}'{hint} (available: {', '.join(PRESETS)})")
    return PRESETS[name]()
