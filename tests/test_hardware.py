"""fp32 products through oneDNN (`moelab.hardware.fast_fp32_matmuls`): switched only where that
path computes in fp32, and only for the span asked; inside, a model's loss and gradients are fp32's."""

import copy

import pytest
import torch

import moelab.hardware as hw
from moelab.config import build_config
from moelab.models import MoETransformer


def _rounded(bits: int):
    """A product of inputs first rounded to `bits` mantissa bits (bf16: 7, tf32: 10), in fp32."""
    def matmul(a, b):
        def r(t):
            m, e = torch.frexp(t)
            return torch.ldexp(torch.round(m * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), e)
        return r(a) @ r(b)
    return matmul


def test_exact_fp32_tells_fp32_products_from_rounded_ones():
    assert hw.exact_fp32(lambda a, b: a @ b)
    assert not hw.exact_fp32(lambda a, b: (a.bfloat16() @ b.bfloat16()).float())
    assert not hw.exact_fp32(_rounded(10))  # tf32: 10 mantissa bits
    assert not hw.exact_fp32(_rounded(7))


def test_the_switch_holds_only_inside_and_leaves_a_users_own_setting():
    before = torch.backends.mkldnn.matmul.fp32_precision
    with hw.fast_fp32_matmuls("default") as (path, speedup):
        assert (path, speedup) == ("default", None) and not hw.onednn_fp32_active()
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    with hw.fast_fp32_matmuls("onednn") as (path, speedup):
        if hw.onednn_fp32_speedup() == 0.0:  # oneDNN would not compute in fp32 here (AMX) or is missing
            assert path == "default" and torch.backends.mkldnn.matmul.fp32_precision == before
        else:
            assert path == "onednn" and speedup > 0 and hw.onednn_fp32_active()
            assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
            with hw.fast_fp32_matmuls("onednn") as inner:  # nested: the outer one keeps it
                assert inner == ("default", None) and hw.onednn_fp32_active()
            assert hw.onednn_fp32_active()
    assert torch.backends.mkldnn.matmul.fp32_precision == before and not hw.onednn_fp32_active()
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # the user's own choice (bf16 where it can)
    try:
        with hw.fast_fp32_matmuls("onednn") as (path, _):
            assert path == "default" and not hw.onednn_fp32_active()
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    with pytest.raises(ValueError), hw.fast_fp32_matmuls("onednn"):  # restored after an error too
        raise ValueError
    assert torch.backends.mkldnn.matmul.fp32_precision == before and not hw.onednn_fp32_active()


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_a_model_through_onednn_keeps_fp32_loss_and_gradients(attention):
    """Loss and every gradient within fp32 rounding of float64, as on the default BLAS: the
    products (explicit attention scores included) are not rounded to bf16 on the way."""
    if hw.onednn_fp32_speedup() == 0.0:
        pytest.skip("oneDNN does not compute fp32 products in fp32 on this machine")
    cfg = build_config("test", None, [f"model.attention={attention}", "model.d_model=128"])
    m = cfg.resolve(vocab_size=300).model
    torch.manual_seed(0)
    model = MoETransformer(m).train()
    ref = copy.deepcopy(model).double()
    x = torch.randint(0, 300, (4, 65))

    def run(mod):
        mod.zero_grad(set_to_none=True)
        loss = mod(x[:, :-1], targets=x[:, 1:]).loss
        loss.backward()
        return loss.detach().double(), [p.grad.double() for p in mod.parameters()]

    ref_loss, ref_grads = run(ref)
    errors = {}
    for mode in ("default", "onednn"):
        with hw.fast_fp32_matmuls(mode) as (path, _):
            assert path == mode
            loss, grads = run(model)
        errors[mode] = (abs(loss - ref_loss).item(),
                        max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads) if r.norm() > 0))
    assert errors["onednn"][0] < 1e-5 and errors["onednn"][1] < 1e-5, errors  # bf16 products: ~1e-3
    assert errors["onednn"][1] < 10 * errors["default"][1] + 1e-6, errors
