"""MLA on CPU pads its unequal head dims so SDPA runs the fused (flash) kernel: same outputs and
gradients as the unpadded math path, and the fused kernel is what actually runs."""

import pytest
import torch
from torch.profiler import profile

import moelab.models.attention as attention
from moelab.config import Config
from moelab.models.attention import LatentAttention, rotary_dim
from moelab.models.layers import rope_cache


def _mla(v_head_dim: int) -> tuple[LatentAttention, torch.Tensor, torch.Tensor]:
    cfg = Config()
    for k, v in dict(d_model=32, n_heads=4, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=v_head_dim).items():
        setattr(cfg.model, k, v)
    m = cfg.resolve(vocab_size=97).model
    torch.manual_seed(0)
    cos, sin = rope_cache(m, 64, rotary_dim(m))
    return LatentAttention(m), cos, sin


def _run(layer, x, cos, sin):
    x = x.detach().requires_grad_()
    with profile() as prof:
        y = layer(x, cos, sin)
        y.square().sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return y, grads, {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("v_head_dim", [12, 24])  # value narrower / wider than the query-key dim 16
def test_padded_mla_equals_unpadded_and_runs_the_fused_kernel(v_head_dim, monkeypatch):
    layer, cos, sin = _mla(v_head_dim)
    x = torch.randn(3, 64, 32)
    y, grads, ops = _run(layer, x, cos, sin)
    assert any("flash_attention" in op for op in ops), sorted(ops)
    monkeypatch.setattr(attention, "pad_for_flash", lambda *a: False)  # the plain math path
    ref_y, ref_grads, ref_ops = _run(layer.double(), x.double(), cos.double(), sin.double())
    assert not any("flash_attention" in op for op in ref_ops)
    torch.testing.assert_close(y, ref_y.float(), rtol=0, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), rtol=1e-4, atol=1e-5)


def test_pad_for_flash_policy():
    q, v = torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 12)
    assert attention.pad_for_flash(q, v, 8, True)
    assert not attention.pad_for_flash(q, q, 8, True)  # equal dims: nothing to pad
    assert not attention.pad_for_flash(q, v, 8, False)  # decoding with a mask
    short, long_ = 8, attention.FLASH_MIN_KEYS_CPU_HALF
    assert not attention.pad_for_flash(q.bfloat16(), v.bfloat16(), short, True)
    assert attention.pad_for_flash(q.bfloat16(), v.bfloat16(), long_, True)
