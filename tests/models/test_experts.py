"""The grouped expert path must equal the per-expert loop, in outputs and gradients."""

import pytest
import torch

from moelab.config import ModelConfig
from moelab.models.experts import Experts, experts_reference
from moelab.models.moe import MoE


def _inputs(T=64, D=16, E=4, K=2, starve=None):
    x = torch.randn(T, D, dtype=torch.float64)
    scores = torch.randn(T, E)
    if starve is not None:
        scores[:, starve] = -1e9  # this expert receives no token
    w, idx = scores.softmax(-1).topk(K, dim=-1)
    return x, idx, w.double(), torch.bincount(idx.flatten(), minlength=E)


@pytest.mark.parametrize("backend,dtype", [("grouped", torch.float32), ("padded", torch.float64),
                                           ("padded", torch.float32)])
@pytest.mark.parametrize("starve", [None, 2])
def test_grouped_matches_reference_outputs_and_grads(backend, dtype, starve):
    E, D, F = 4, 16, 24
    x, idx, w, counts = _inputs(D=D, E=E, starve=starve)
    x, w = x.to(dtype), w.to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    experts = Experts(E, D, F, backend=backend).to(dtype)
    experts.reset_parameters(0.2, 0.2)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = experts(x1, idx, w1, counts)
    ref = experts_reference(x2, idx, w2, experts.gate_proj, experts.up_proj, experts.down_proj)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x1, w1, *experts.parameters()])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x2, w2, *experts.parameters()])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if starve is not None:
        assert counts[starve] == 0
        assert grads[2][starve].abs().max() == 0  # the idle expert gets exactly zero gradient


@pytest.mark.parametrize("backend,dtype", [("grouped", torch.float32), ("grouped", torch.bfloat16),
                                           ("padded", torch.float64)])
def test_inference_path_without_gradients_equals_the_reference(backend, dtype):
    """Without autograd (generation, evaluation) gate and up run as two GEMMs instead of one over
    copied weights: the same outputs as the per-expert loop, for 1 token (decoding) and many."""
    E, D, F = 4, 16, 24
    experts = Experts(E, D, F, backend=backend).double()
    experts.reset_parameters(0.2, 0.2)
    fast = Experts(E, D, F, backend=backend).to(dtype)
    fast.load_state_dict(experts.state_dict())
    for T in (1, 2, 203):
        x, idx, w, counts = _inputs(T=T, D=D, E=E)
        with torch.no_grad():
            ref = experts_reference(x, idx, w, experts.gate_proj, experts.up_proj, experts.down_proj)
            out = fast(x.to(dtype), idx, w.to(dtype), counts)
        assert not out.requires_grad
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
        assert float((out.double() - ref).norm() / ref.norm()) < tol, T


def test_moe_layer_fp32_grouped_equals_loop():
    cfg = ModelConfig(d_model=32, n_experts=8, top_k=2, expert_dim=48, n_heads=4)
    torch.manual_seed(1)
    fast = MoE(cfg)
    fast.experts.reset_parameters(0.1, 0.1)
    torch.nn.init.normal_(fast.router.weight, std=0.5)
    slow = MoE(ModelConfig(**{**cfg.__dict__, "expert_backend": "loop"}))
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(3, 10, 32)
    y_fast, r_fast = fast(x)
    y_slow, r_slow = slow(x)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-5, atol=1e-6)
    assert torch.equal(r_fast.idx_TK, r_slow.idx_TK)
    assert int(r_fast.counts_E.sum()) == 30 * 2
    y_fast.square().sum().backward()
    y_slow.square().sum().backward()
    for (n, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_router_aux_loss_is_one_when_uniform_and_larger_when_skewed():
    from moelab.models.router import Router

    r = Router(ModelConfig(d_model=8, n_experts=4, top_k=1, norm_topk_prob=False))
    torch.nn.init.zeros_(r.weight)
    x = torch.randn(400, 8)
    # zero logits: P_e = 1/4 exactly, so aux = 4 * sum_e f_e / 4 = 1 whatever the tie-breaking
    assert abs(r(x).aux_loss.item() - 1.0) < 1e-6
    with torch.no_grad():
        r.weight[0] = 10.0
    out = r(torch.ones(400, 8))
    assert out.counts_E.tolist() == [400, 0, 0, 0]
    assert out.aux_loss.item() > 3.9  # collapse onto one expert: aux -> E


def test_auto_backend_takes_the_grouped_path_on_cpu():
    from moelab.models.experts import pick_backend

    cpu = torch.device("cpu")
    assert pick_backend("auto", cpu, torch.float32) == "grouped"
    assert pick_backend("auto", cpu, torch.bfloat16) == "grouped"
    assert pick_backend("auto", cpu, torch.float64) == "padded"
    assert pick_backend("loop", cpu, torch.float32) == "loop"
    # _grouped_mm needs rows that are multiples of 16 bytes: a width of 30 fp32 / 12 bf16 is not
    assert pick_backend("auto", cpu, torch.float32, (32, 30)) == "padded"
    assert pick_backend("auto", cpu, torch.bfloat16, (32, 12)) == "padded"
    assert pick_backend("auto", cpu, torch.bfloat16, (32, 16)) == "grouped"


def test_hand_written_backwards_pass_gradcheck():
    """The SwiGLU and combine autograd Functions against finite differences in float64."""
    from moelab.models.experts import combine
    from moelab.models.layers import gated

    torch.manual_seed(0)
    gu = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    gate, up = (torch.randn(6, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda t: gated(t), (gu,))
    assert torch.autograd.gradcheck(lambda a, b: gated(a, b), (gate, up))
    torch.testing.assert_close(gated(gu), torch.nn.functional.silu(gu[:, :4]) * gu[:, 4:])
    T, K, D = 5, 3, 4
    order = torch.randperm(T * K)
    y = torch.randn(T * K, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: combine(y, w, order), (y, w))
    # slot n of y belongs to token order[n] // K, with weight w.flatten()[order[n]]
    expected = torch.zeros(T, D, dtype=torch.float64).index_add(
        0, order // K, y * w.flatten()[order].unsqueeze(1))
    torch.testing.assert_close(combine(y, w, order), expected)


@pytest.mark.parametrize("glu", [True, False])
def test_one_token_without_gradients_runs_only_its_experts_products(glu):
    """Decoding one sequence on CPU: the token's K experts' products alone (3 GEMMs each with a
    gate, 2 without), no sort and no grouped call over every expert; the reference's outputs, in
    fp32 and under bf16 autocast (each expert's weights cast alone, to the autocast dtype)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    E, D, F, K = 6, 16, 24, 2
    experts = Experts(E, D, F, glu=glu)
    experts.reset_parameters(0.2, 0.2)
    x, idx, w, counts = _inputs(T=1, D=D, E=E, K=K)
    x, w = x.float(), w.float()
    weights = [experts.gate_proj, experts.up_proj, experts.down_proj] if glu else [experts.up_proj, experts.down_proj]
    with torch.no_grad():
        with Ops() as ops:
            out = experts(x, idx, w, counts)
        ref = experts_reference(x.double(), idx, w.double(), *(p.double() for p in weights), glu=glu)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = experts(x, idx, w, counts)
        bf16 = Experts(E, D, F, glu=glu, backend="loop").to(torch.bfloat16)
        bf16.load_state_dict(experts.state_dict())
        half_ref = bf16(x.bfloat16(), idx, w, counts)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-6
    assert half.dtype == torch.bfloat16 and float((half - half_ref).float().norm() / half_ref.float().norm()) < 1e-2
    assert "_grouped_mm" not in ops.names and "sort" not in ops.names, ops.names
    assert ops.names.count("mm") == K * (3 if glu else 2), ops.names


@pytest.mark.parametrize("backend", ["grouped", "padded", "loop"])
def test_experts_under_autocast_run_in_the_autocast_dtype(backend):
    """x arrives in fp32 (a norm's output) under bf16 autocast: the experts' matmuls must run in
    bf16 as an autocast nn.Linear would, not silently in fp32 (autocast does not cover _grouped_mm)."""
    E, D, F = 4, 16, 32
    x, idx, w, counts = _inputs(D=D, E=E)
    experts = Experts(E, D, F, backend=backend)
    experts.reset_parameters(0.2, 0.2)
    x, w = x.float(), w.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, idx, w, counts)
    assert y.dtype == torch.bfloat16
    bf16 = Experts(E, D, F, backend=backend).to(torch.bfloat16)
    bf16.load_state_dict(experts.state_dict())
    assert torch.equal(y, bf16(x.bfloat16(), idx, w, counts))


def test_bucket_rows_bounds_padding_and_distinct_sizes():
    from moelab.models.experts import bucket_rows

    n = torch.arange(0, 20001)
    b = bucket_rows(n)
    assert torch.equal(b[:17], n[:17])  # small counts stay exact
    assert (b >= n).all() and (b[17:] <= n[17:] * 1.125).all()  # at most 12.5% padding
    assert torch.equal(bucket_rows(b), b)  # a bucket is its own bucket
    assert len(torch.unique(b[1:4097])) == 80  # few sizes recur, so their kernels are reused


def test_bucketed_layout_places_every_slot_once_in_its_experts_block():
    from moelab.models.experts import bucketed_layout, bucket_rows

    x, idx, w, counts = _inputs(T=300, E=4, K=2, starve=1)
    order = idx.flatten().argsort(stable=True)
    slot_R, offs = bucketed_layout(order, counts)
    N = idx.numel()
    assert torch.equal(offs.long(), bucket_rows(counts).cumsum(0))
    real = slot_R[slot_R < N]
    assert torch.equal(real, order)  # expert-sorted order kept, each slot exactly once
    expert_R = torch.repeat_interleave(torch.arange(4), bucket_rows(counts))
    assert torch.equal(expert_R[slot_R < N], idx.flatten()[order])  # each row in its expert's block


def test_bucketed_layout_with_static_rows_always_fits_its_groups():
    """Under torch.compile the layout has N + N // 8 rows whatever the counts: the padded groups
    must fit, even when every count sits just above a power of two (the most padding), and the
    rows after them are padding, read from the zero row."""
    from moelab.models.experts import bucket_rows, bucketed_layout

    worst = torch.tensor([17, 33, 65, 129, 257, 513, 1025, 2049, 4097])  # pad ~1/8 each
    for counts in (worst, torch.tensor([0, 3, 16, 9000, 17]), torch.tensor([4000])):
        N = int(counts.sum())
        order = torch.repeat_interleave(torch.arange(counts.numel()), counts).argsort(stable=True)
        exact_R, offs = bucketed_layout(order, counts)
        slot_R, offs_static = bucketed_layout(order, counts, static_rows=True)
        assert slot_R.numel() == N + N // 8 >= int(offs[-1]) and torch.equal(offs, offs_static)
        assert torch.equal(slot_R[:exact_R.numel()], exact_R)
        assert (slot_R[exact_R.numel():] == N).all()
    N = int(worst.sum())  # and the bound is nearly reached there: it cannot be any smaller
    assert int(bucket_rows(worst).sum()) - N > 0.95 * (N // 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bucketed_grouped_path_matches_float64_reference(dtype):
    """bf16/fp16 on CPU pad each expert's rows to a bucket: same outputs and gradients. So does
    fp32 while its products go through oneDNN (which, as for bf16, builds a kernel per shape)."""
    import contextlib

    from moelab.hardware import fast_fp32_matmuls
    from moelab.models import experts as ex

    E, D, F = 4, 16, 24
    x, idx, w, counts = _inputs(T=203, D=D, E=E, starve=2)
    assert not ex.bucket_rows_here(x.float())  # fp32 on the default BLAS: no padding
    with contextlib.ExitStack() as stack:
        if dtype == torch.float32 and stack.enter_context(fast_fp32_matmuls("onednn"))[0] == "default":
            pytest.skip("oneDNN does not compute fp32 products in fp32 on this machine")
        _check_bucketed(ex, dtype, x, idx, w, counts, E, D, F)


def _check_bucketed(ex, dtype, x, idx, w, counts, E, D, F):
    assert ex.bucket_rows_here(x.to(dtype)) and not torch.equal(ex.bucket_rows(counts), counts)
    ref_ex = Experts(E, D, F, backend="loop").double()
    ref_ex.reset_parameters(0.2, 0.2)
    fast = Experts(E, D, F, backend="grouped").to(dtype)
    fast.load_state_dict(ref_ex.state_dict())
    g = torch.randn(x.shape, dtype=torch.float64)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = experts_reference(x1, idx, w1, ref_ex.gate_proj, ref_ex.up_proj, ref_ex.down_proj)
    ref_grads = torch.autograd.grad((ref * g).sum(), [x1, w1, *ref_ex.parameters()])
    x2, w2 = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    out = fast(x2, idx, w2, counts)
    grads = torch.autograd.grad((out * g.to(dtype)).sum(), [x2, w2, *fast.parameters()])
    rel = lambda a, b: float((a.detach().double() - b.detach()).norm() / b.detach().norm())  # noqa: E731
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}[dtype]
    assert rel(out, ref) < tol
    for name, a, b in zip(["x", "w", "gate", "up", "down"], grads, ref_grads):
        assert rel(a, b) < tol, name
    assert grads[2][2].abs().max() == 0  # the starved expert: no rows, no gradient


def test_grouped_linear_op_zeroes_the_rows_after_the_last_group():
    """The op torch.compile runs: rows past the last offset (the static layout's tail) come out
    zero in the output and in dx, never uninitialised memory; the groups match per-group matmuls."""
    from moelab.models.experts import grouped_linear_op

    torch.manual_seed(0)
    x = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor([5, 20, 29], dtype=torch.int32)
    y = grouped_linear_op(x, w, offs)
    for _ in range(3):  # reuse freed memory that held non-zeros
        y = grouped_linear_op(x, w, offs)
    assert (y[29:] == 0).all()
    for e, (a, b) in enumerate([(0, 5), (5, 20), (20, 29)]):
        torch.testing.assert_close(y[a:b], x[a:b] @ w[e].T)
    y.backward(torch.randn_like(y))
    assert (x.grad[29:] == 0).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_runs_the_training_paths_forward_bit_for_bit(dtype):
    """Without gradients (decoding, evaluation) the experts' SwiGLU and combine skip their autograd
    Functions: the same values as the training path's forward, bit for bit."""
    from moelab.models.experts import combine
    from moelab.models.layers import gated

    g = torch.Generator().manual_seed(0)
    gu = torch.randn(37, 64, generator=g).to(dtype)
    y = torch.randn(37 * 2 + 5, 16, generator=g).to(dtype)  # (5 padding rows of a bucketed layout)
    w = torch.rand(37, 2, generator=g)
    slot = torch.cat([torch.randperm(74, generator=g), torch.full((5,), 74)])[torch.randperm(79, generator=g)]
    with torch.no_grad():
        fast = gated(gu), gated(*gu.chunk(2, dim=-1)), combine(y, w, slot)
    with torch.enable_grad():
        slow = (gated(gu.clone().requires_grad_()), gated(*gu.clone().requires_grad_().chunk(2, dim=-1)),
                combine(y.clone().requires_grad_(), w, slot))
    assert all(s.grad_fn is not None for s in slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b.detach())
