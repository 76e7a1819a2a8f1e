"""Changing token t+1 must never change logits at positions <= t, for every attention variant."""

import pytest
import torch

from moelab.config import Config
from moelab.models import MoETransformer

VARIANTS = {
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
    # top-1 capacity gives priority by token order, so it stays causal (top-k>1 GShard priority is not)
    "switch-capacity": dict(router="switch", top_k=1, capacity_factor=1.0),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_future_tokens_do_not_change_past_logits(variant):
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 4
    cfg.model.expert_dim = 32
    for k, v in VARIANTS[variant].items():
        setattr(cfg.model, k, v)
    cfg.resolve(vocab_size=97)
    torch.manual_seed(0)
    model = MoETransformer(cfg.model).eval()
    S = 24
    ids = torch.randint(0, 97, (1, S))
    with torch.no_grad():
        base = model(ids).logits
        for t in (0, 5, S - 2):
            changed = ids.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 13) % 97
            out = model(changed).logits
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-4  # the future did change
