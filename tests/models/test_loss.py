"""The fused projection + cross-entropy equals the unfused one, loss and gradients, without ever
keeping the (N, V) logits."""

import pytest
import torch
import torch.nn.functional as F

from moelab.models.loss import _linear_cross_entropy_op, linear_cross_entropy
from tests.models.variants import tiny_model


def _inputs(N=50, D=16, V=37, dtype=torch.float64):
    h = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::6] = -100
    return h, w, t


def _grads(loss, *xs, keep=False):
    return torch.autograd.grad(loss, xs, retain_graph=keep)


@pytest.mark.parametrize("chunk", [7, 50, None])  # uneven last chunk, one chunk, the default
def test_fused_loss_and_gradients_equal_cross_entropy(chunk):
    h, w, t = _inputs()
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    loss = linear_cross_entropy(h, w, t, chunk=chunk)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    # a non-unit upstream gradient must scale both gradients
    for g, r in zip(_grads(3 * loss, h, w), _grads(3 * ref, h, w)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_fused_loss_under_bf16_autocast_matches_the_unfused_head():
    h, w, t = _inputs(N=64, D=32, V=300, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100)
        loss = linear_cross_entropy(h, w, t, chunk=16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    for g, r in zip(_grads(loss, h, w), _grads(ref, h, w)):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0.02, atol=2e-3)


def test_all_targets_ignored_gives_nan_like_cross_entropy():
    h, w, t = _inputs()
    t[:] = -100
    assert F.cross_entropy(h @ w.t(), t, ignore_index=-100).isnan()
    assert linear_cross_entropy(h, w, t).isnan()


def test_model_loss_is_fused_equal_and_keeps_no_logits():
    model = tiny_model("mla-yarn-dense-first", tie_embeddings=True).train()
    x, y = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    y[0, :5] = -100
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = model(x, targets=y)
    assert out._logits is None
    assert not [s for s in saved if 97 in s and s.numel() >= x.numel() * 97]  # no (B*S, V) tensor kept
    grads = _grads(out.lm_loss, *model.parameters(), keep=True)
    # the unfused reference from the same forward's logits (computed on access)
    ref = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, ref, rtol=0, atol=1e-6)
    for g, r in zip(grads, _grads(ref, *model.parameters())):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype,need_grad", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)])
def test_fused_loss_custom_op_passes_torch_opcheck(dtype, need_grad):
    """The op torch.compile calls: its fake (meta) kernel, autograd registration and schema agree
    with the real kernel (torch.library.opcheck runs it eagerly, on fake tensors and through
    AOTAutograd)."""
    h, w, t = _inputs(N=40, D=16, V=24, dtype=torch.float32)
    h = h.detach().to(dtype).requires_grad_(need_grad)
    torch.library.opcheck(_linear_cross_entropy_op, (h, w.detach().requires_grad_(need_grad), t, 16, need_grad))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compiled_model_keeps_the_fused_loss_and_equals_eager(dtype):
    """Under torch.compile (one graph, fullgraph) the loss still goes through the fused op: no
    (B, S, V) logits are built, and loss and gradients equal eager's."""
    model = tiny_model("mla-yarn-dense-first").train()
    x, y = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    y[0, :5] = -100
    runs = []
    for fn in (model, torch.compile(model, fullgraph=True)):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = fn(x, targets=y)
        assert out._logits is None
        runs.append((out.lm_loss.detach(), _grads(out.loss, *model.parameters())))
    (ref, ref_grads), (loss, grads) = runs
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6 if dtype is None else 1e-3)
    for g, r in zip(grads, ref_grads):
        if dtype is None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
        else:  # bf16: inductor rounds its fused elementwise ops differently
            assert float((g - r).norm()) <= 0.02 * float(r.norm()) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_compiled_chunk_kernel_equals_float64(dtype):
    """Under torch.compile the op computes each chunk's softmax and gradient in a compiled kernel
    (`compiled=True`, what `linear_cross_entropy` passes while being compiled): loss and both
    gradients as the float64 cross-entropy of the same (rounded) inputs, an uneven last chunk and
    ignored rows included; without need_grad, the same loss."""
    h, w, t = _inputs(N=50, D=16, V=40, dtype=torch.float32)
    h, w = h.detach().to(dtype), w.detach()
    hr, wr = h.double().requires_grad_(), w.to(dtype).double().requires_grad_()
    ref = F.cross_entropy(hr @ wr.t(), t, ignore_index=-100, reduction="sum")
    dh_ref, dw_ref = _grads(ref, hr, wr)
    total, n_valid, dh, dw = _linear_cross_entropy_op(h, w, t, 16, True, True)
    assert dh.dtype == dtype and dw.dtype == torch.float32 and int(n_valid) == int((t != -100).sum())
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the logits and the gradient are rounded
    torch.testing.assert_close(total.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dh.double(), dh_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=tol, atol=tol)
    eager = _linear_cross_entropy_op(h, w, t, 16, True, False)  # the eager chunk loop: the same
    for a, b in zip((total, dh, dw), (eager[0], eager[2], eager[3])):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.testing.assert_close(_linear_cross_entropy_op(h, w, t, 16, False, True)[0], total)


@pytest.mark.slow
def test_compiled_chunk_kernel_takes_every_vocabulary_dtype_and_grad_mode_of_a_process():
    """The compiled chunk kernel is one function per process: a process meeting many vocabularies,
    dtypes, need_grad values and grad modes (a sweep, the test-suite) passed dynamo's 8 variants
    and failed under fullgraph. Now each call equals the eager kernel."""
    from moelab.models.loss import _compiled_softmax_cross_entropy, _softmax_cross_entropy

    g = torch.Generator().manual_seed(0)
    for V in (97, 300, 512, 1000):
        for dtype in (torch.float32, torch.bfloat16):
            for need_grad in (True, False):
                for grad_mode in (True, False):
                    x = torch.randn(37, V, generator=g).to(dtype)
                    t, valid = torch.randint(0, V, (37,), generator=g), torch.rand(37, generator=g) > 0.2
                    with torch.set_grad_enabled(grad_mode):
                        got = _compiled_softmax_cross_entropy()(x, t, valid, need_grad)
                    want = _softmax_cross_entropy(x, t, valid, need_grad)
                    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)
                    assert (got[1] is None) == (not need_grad)
                    if need_grad:
                        torch.testing.assert_close(got[1].float(), want[1].float(), rtol=0,
                                                   atol=1e-6 if dtype == torch.float32 else 8e-3)
