"""Language-model loss: the output projection and cross-entropy fused, in row chunks.

`linear_cross_entropy(h, w, targets)` equals `F.cross_entropy((h @ w.T).float(), targets,
ignore_index=-100)` (mean over the targets not ignored; NaN when all are), but never holds the
(N, V) logits: each chunk of rows is projected, reduced to its loss and, when a gradient is
needed, turned at once into its share of dh and dw (softmax - one-hot, then two matmuls). The
forward therefore does the backward's matmuls too, and the backward only scales the stored
gradients by the incoming one.

Memory: the unfused path keeps fp32 logits, their log-softmax and the logits' gradient, three
(N, V) fp32 tensors (N = batch x sequence); the fused one keeps dh and an fp32 dw the size of the
weight. Time: the same matmuls, no (N, V) tensor allocated or passed over several times.
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 21  # logits per chunk (fp32: 8 MiB) ...
# ... but at least this many rows: every chunk adds its (V, D) share to dw, one pass over a
# weight-sized tensor, while its GEMMs do 6 * rows * V * D flops; with fewer rows that pass,
# not the GEMMs, sets the pace (2-core CPU, bf16: 256 rows 1.35x slower than 512).
# So above V = 4096 the floor sets the chunk, and the per-chunk buffers (fp32 logits and
# log-softmax, plus half logits and gradient under bf16/fp16: 8-12 bytes per logit; compiled on
# CPU, only the logits and gradient in the matmul dtype: 4-8) grow with V:
# 512 rows x 152K vocab ~ 0.9 GiB while the loss runs, freed after it; unfused fp32 logits of
# the same batch are N/512 times that per (N, V) tensor. Pass `chunk` for a smaller peak.
MIN_CHUNK_ROWS = 512


def _softmax_cross_entropy(x_cV: torch.Tensor, t_c: torch.Tensor, valid_c: torch.Tensor, need_grad: bool):
    """One chunk of logits -> (sum over the valid rows of log p(target), and with need_grad the
    gradient softmax - one-hot in the logits' dtype, else None), in fp32 inside. What the eager
    chunk loop does in separate passes (an fp32 copy of half logits, log-softmax, softmax, the
    target scatter); compiled (`_compiled_softmax_cross_entropy`), two passes over the chunk."""
    x = x_cV.float()
    m = x.amax(-1, keepdim=True)
    e = torch.exp(x - m)
    s = e.sum(-1, keepdim=True)
    t = t_c.clamp_min(0).unsqueeze(1)
    logp_t = (x.gather(1, t) - m - s.log()).squeeze(1)
    logp_sum = torch.where(valid_c, logp_t, 0.0).sum()
    if not need_grad:
        return logp_sum, None
    p = e / s
    hot = torch.arange(x.shape[1], device=x.device) == t
    return logp_sum, torch.where(hot, p - 1, p).to(x_cV.dtype)


@functools.cache
def _compiled_softmax_cross_entropy():
    """`_softmax_cross_entropy` under torch.compile, built on first use. Used by the op when the
    model around it is compiled (train.compile): inductor already runs there, and the op itself,
    opaque to it, would otherwise take 3-4 passes per chunk in eager kernels (exp3, bf16, 2-core
    CPU: 3.6 -> 1.2 ms per 512 x 8192 chunk).

    It is one function for the whole process, so every vocabulary, dtype and need_grad it meets
    adds a compiled variant, and dynamo allows 8 per function: a process that met more (a sweep, the
    test-suite) failed outright under fullgraph. Now it runs without autograd (it writes the
    gradient itself), so training's and evaluation's grad modes share variants, and past the limit
    dynamo runs it eagerly instead of failing."""
    compiled = torch.compile(_softmax_cross_entropy)

    def run(x_cV, t_c, valid_c, need_grad):
        with torch.no_grad():
            return compiled(x_cV, t_c, valid_c, need_grad)
    return run


@torch.library.custom_op("moelab::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(h_ND: torch.Tensor, weight_VD: torch.Tensor, t_N: torch.Tensor, chunk: int,
                             need_grad: bool, compiled: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of the row losses, number of valid rows, d(sum)/dh, d(sum)/dw). A custom op, so that
    torch.compile calls it as one opaque kernel instead of tracing the chunk loop (or falling back
    to plain logits, which materialise the (N, V) tensors this exists to avoid). Without
    need_grad the two gradients are empty. `compiled` (set when the caller is being compiled):
    each chunk's softmax and gradient through `_compiled_softmax_cross_entropy`, on CPU."""
    # the weight is cast here, not before: its gradient is summed and returned in its own
    # (fp32 master) dtype, with no bf16 rounding and no cast back by autograd
    w_VD = weight_VD.to(h_ND.dtype)
    N, V = h_ND.shape[0], w_VD.shape[0]
    acc = torch.promote_types(h_ND.dtype, torch.float32)  # half-precision logits upcast
    total = torch.zeros((), dtype=acc, device=h_ND.device)
    valid_N = t_N != IGNORE_INDEX
    dh_ND, dw_VD = _gradient_buffers(h_ND, weight_VD, need_grad)
    half = h_ND.dtype != acc
    fused = compiled and h_ND.device.type == "cpu"
    rows = min(chunk, N)
    # the GEMM writes each chunk's logits into one reused buffer, in the matmul dtype
    xh_cV = torch.empty(rows, V, dtype=h_ND.dtype, device=h_ND.device)
    if half and not fused:  # their fp32 copy, and the half gradient
        x_cV = torch.empty(rows, V, dtype=acc, device=h_ND.device)
        g_cV = torch.empty_like(xh_cV) if need_grad else None
    if not fused:  # the log-softmax
        lp_cV = torch.empty(rows, V, dtype=acc, device=h_ND.device)
        rows_c = torch.arange(rows, device=h_ND.device)
    for s in range(0, N, chunk):
        h_cD, t_c, valid_c = h_ND[s:s + chunk], t_N[s:s + chunk], valid_N[s:s + chunk]
        n = h_cD.shape[0]
        xh_c = torch.mm(h_cD, w_VD.t(), out=xh_cV[:n])  # in the matmul dtype, as an (autocast) Linear gives
        if fused:
            logp_sum, g_c = _compiled_softmax_cross_entropy()(xh_c, t_c, valid_c, need_grad)
        else:
            x_c = x_cV[:n].copy_(xh_c) if half else xh_c  # half logits upcast for the loss
            lp_c = torch.log_softmax(x_c, dim=-1, out=lp_cV[:n])
            at_c = (rows_c[:n], t_c.clamp_min(0))  # each row's target
            picked_c = lp_c[at_c]  # log-probability of each target
            logp_sum = torch.where(valid_c, picked_c, 0.0).sum()
            if need_grad:
                # d(sum of row losses)/dlogits = softmax - one-hot. The softmax is exp(log-softmax)
                # in fp32; in half precision it is computed from the half logits straight into the
                # half gradient buffer (fp32 inside, rounded once, as the cast of an fp32 gradient)
                g_c = torch.softmax(xh_c, dim=-1, out=g_cV[:n]) if half else lp_c.exp_()
                g_c.index_put_(at_c, (picked_c.exp() - 1).to(g_c.dtype))
        total -= logp_sum
        if not need_grad:
            continue
        # ignored rows get no gradient: zeroed through the D-wide factors (rows of dh after
        # the product, rows of h for dw), not by another pass over the V-wide softmax
        mask_c1 = valid_c.unsqueeze(1).to(h_cD.dtype)
        torch.mm(g_c, w_VD, out=dh_ND[s:s + chunk]).mul_(mask_c1)
        hm_cD = h_cD * mask_c1
        if dw_VD.dtype == h_cD.dtype:  # summed in place by the GEMM
            if s == 0:
                torch.mm(g_c.t(), hm_cD, out=dw_VD)
            else:
                dw_VD.addmm_(g_c.t(), hm_cD)
        elif s == 0:  # half-precision products, summed over the chunks in fp32
            dw_VD.copy_(g_c.t() @ hm_cD)
        else:
            dw_VD += g_c.t() @ hm_cD
    return total, valid_N.sum().to(acc), dh_ND, dw_VD


def _gradient_buffers(h_ND: torch.Tensor, weight_VD: torch.Tensor, need_grad: bool):
    """dh (h's shape and dtype) and dw (the weight's shape, summed in fp32 or wider); both empty
    without need_grad. Shared by the kernel and its fake, so their outputs always agree."""
    acc = torch.promote_types(h_ND.dtype, torch.float32)
    if not need_grad:
        return h_ND.new_empty(0), h_ND.new_empty(0, dtype=acc)
    dw_dtype = torch.promote_types(acc, weight_VD.dtype)
    return torch.empty_like(h_ND), weight_VD.new_empty(weight_VD.shape, dtype=dw_dtype)


@_linear_cross_entropy_op.register_fake
def _(h_ND, weight_VD, t_N, chunk, need_grad, compiled=False):
    acc = torch.promote_types(h_ND.dtype, torch.float32)
    return (h_ND.new_empty((), dtype=acc), h_ND.new_empty((), dtype=acc),
            *_gradient_buffers(h_ND, weight_VD, need_grad))


def _lce_setup_context(ctx, inputs, output):
    _, n_valid, dh_ND, dw_VD = output
    ctx.save_for_backward(dh_ND, dw_VD)
    ctx.w_dtype = inputs[1].dtype
    ctx.mark_non_differentiable(n_valid, dh_ND, dw_VD)


def _lce_backward(ctx, grad, _n_valid, _dh, _dw):
    # the forward already did the matmuls of the backward; here they are only scaled by the
    # incoming gradient of the sum (1 / n_valid for the mean)
    dh_ND, dw_VD = ctx.saved_tensors
    return dh_ND * grad.to(dh_ND.dtype), (dw_VD * grad).to(ctx.w_dtype), None, None, None, None


_linear_cross_entropy_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ w.T against targets (-100 ignored), in row chunks.
    Under autocast the matmuls run in the autocast dtype, as an `nn.Linear` head would."""
    device = h_ND.device.type
    if torch.is_autocast_enabled(device):
        h_ND = h_ND.to(torch.get_autocast_dtype(device))
    chunk = chunk or max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // w_VD.shape[0])
    need_grad = torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad)
    with torch.autocast(device, enabled=False):
        total, n_valid = _linear_cross_entropy_op(h_ND, w_VD, targets_N, chunk, need_grad,
                                                  torch.compiler.is_compiling())[:2]
    return total / n_valid
