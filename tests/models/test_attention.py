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
    short, long_ = 8, attention.FLASH_MIN_KEYS_CPU
    assert not attention.pad_for_flash(q.bfloat16(), v.bfloat16(), short, True)
    assert attention.pad_for_flash(q.bfloat16(), v.bfloat16(), long_, True)
    # fp32: short sequences take explicit scores only while fp32 products go through oneDNN
    from moelab.hardware import fast_fp32_matmuls

    with fast_fp32_matmuls("onednn") as (path, _):
        assert attention.pad_for_flash(q, v, short, True) == (path == "default")
        assert attention.explicit_scores_cpu(q, short) == (path == "onednn")
        assert attention.pad_for_flash(q, v, long_, True) and not attention.explicit_scores_cpu(q, long_)
    assert attention.pad_for_flash(q, v, short, True) and not attention.explicit_scores_cpu(q, short)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_short_half_cpu_attention_keeps_fp32_scores(heads, kv_heads):
    """bf16 on CPU below FLASH_MIN_KEYS_CPU keys: explicit scores, not SDPA, and within bf16
    error of float64 in outputs and gradients: no worse than 1.6x SDPA's own bf16 error (scores
    rounded to bf16 before the softmax err ~4x more on these logits). The same under autocast, as
    bf16 training runs it (autocast ran the scores' matmul in bf16). With GQA the gradients of k
    and v are summed over each group's heads in one matmul: within 1.3x (repeated per head, 1.4x)."""
    torch.manual_seed(0)
    B, S, D, V = 2, 48, 16, 12
    q = (3 * torch.randn(B, heads, S, D)).bfloat16()  # large logits, where rounding them shows
    k = (3 * torch.randn(B, kv_heads, S, D)).bfloat16()
    v = torch.randn(B, kv_heads, S, V).bfloat16()
    g = torch.randn(B, heads, S, V)

    def run(fn, dtype, autocast=False):
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(*ins)
        y.backward(g.to(dtype))  # outside autocast, as training runs it
        return [y.detach()] + [t.grad for t in ins]

    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    with profile() as prof:
        ours = run(lambda q, k, v: attention._attend(q, k, v, None, 0), torch.bfloat16)
    assert not any("scaled_dot_product" in e.key for e in prof.key_averages())
    for a, b in zip(ours, run(lambda q, k, v: attention._attend(q, k, v, None, 0), torch.bfloat16, autocast=True)):
        assert torch.equal(a, b)
    ref, theirs = run(sdpa, torch.float64), run(sdpa, torch.bfloat16)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    for name, a, b, r in zip(["out", "dq", "dk", "dv"], ours, theirs, ref):
        assert a.dtype == torch.bfloat16
        assert rel(a, r) < 1.6 * rel(b, r) + 1e-4, name
        if heads != kv_heads and name in ("dk", "dv"):
            assert rel(a, r) < 1.3 * rel(b, r), name

    def bf16_scores(q, k, v):  # what the bound rules out: scores rounded to bf16 first
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        mask = torch.full((S, S), float("-inf")).triu(1).bfloat16()
        return ((q @ k.transpose(-1, -2)) * D ** -0.5 + mask).softmax(-1) @ v

    assert rel(run(bf16_scores, torch.bfloat16)[0], ref[0]) > 1.6 * rel(theirs[0], ref[0])
