"""Small models of every attention type (and the routers whose behaviour depends on position),
shared by the causality and generation tests."""

import torch

from moelab.config import Config
from moelab.models import MoETransformer

VARIANTS = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "qk-norm-head-partial-rope-bias": dict(qk_norm="head", partial_rotary=0.5, qkv_bias=True),
    "qk-norm-full": dict(qk_norm="full"),
    "mla-q-lowrank-interleaved": dict(attention="mla", q_lora_rank=16, kv_lora_rank=16,
                                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                                      rope_interleave=True),
    "mla-yarn-dense-first": dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                 v_head_dim=8, rope_scaling="yarn", rope_factor=4.0,
                                 rope_original_max_len=8, first_k_dense=1, router="sigmoid",
                                 n_shared_experts=1),
    # Granite's multipliers (the attention scale reaches the cached and masked attention paths too)
    # and MiniCPM5's gated attention output
    "gqa-multipliers-gated": dict(n_kv_heads=2, embed_scale=12.0, residual_scale=0.22, attn_scale=0.1,
                                  logits_divisor=6.0, attn_gate=True, qkv_bias=True),
    # top-1 capacity gives priority by token order, so it stays causal (top-k>1 GShard priority is not)
    "switch-capacity": dict(router="switch", top_k=1, capacity_factor=1.0),
}


def tiny_model(variant: str, vocab: int = 97, seed: int = 0, **extra) -> MoETransformer:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 4
    cfg.model.expert_dim = 32
    for k, v in {**VARIANTS[variant], **extra}.items():
        setattr(cfg.model, k, v)
    cfg.resolve(vocab_size=vocab)
    torch.manual_seed(seed)
    return MoETransformer(cfg.model).eval()
