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

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 21  # logits per chunk (fp32: 8 MiB) ...
# ... but at least this many rows: every chunk adds its (V, D) share to dw, one pass over a
# weight-sized tensor, while its GEMMs do 6 * rows * V * D flops; with fewer rows that pass,
# not the GEMMs, sets the pace (2-core CPU, bf16: 256 rows 1.35x slower than 512).
# So above V = 4096 the floor sets the chunk, and the per-chunk buffers (fp32 logits and
# log-softmax, plus half logits and gradient under bf16/fp16: 8-12 bytes per logit) grow with V:
# 512 rows x 152K vocab ~ 0.9 GiB while the loss runs, freed after it; unfused fp32 logits of
# the same batch are N/512 times that per (N, V) tensor. Pass `chunk` for a smaller peak.
MIN_CHUNK_ROWS = 512


@torch.library.custom_op("moelab::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(h_ND: torch.Tensor, weight_VD: torch.Tensor, t_N: torch.Tensor, chunk: int,
                             need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of the row losses, number of valid rows, d(sum)/dh, d(sum)/dw). A custom op, so that
    torch.compile calls it as one opaque kernel instead of tracing the chunk loop (or falling back
    to plain logits, which materialise the (N, V) tensors this exists to avoid). Without
    need_grad the two gradients are empty."""
    # the weight is cast here, not before: its gradient is summed and returned in its own
    # (fp32 master) dtype, with no bf16 rounding and no cast back by autograd
    w_VD = weight_VD.to(h_ND.dtype)
    N, V = h_ND.shape[0], w_VD.shape[0]
    acc = torch.promote_types(h_ND.dtype, torch.float32)  # half-precision logits upcast
    total = torch.zeros((), dtype=acc, device=h_ND.device)
    valid_N = t_N != IGNORE_INDEX
    dh_ND, dw_VD = _gradient_buffers(h_ND, weight_VD, need_grad)
    half = h_ND.dtype != acc
    rows = min(chunk, N)
    x_cV = torch.empty(rows, V, dtype=acc, device=h_ND.device)  # logits, reused per chunk
    lp_cV = torch.empty_like(x_cV)  # their log-softmax
    if half:  # matmul-dtype buffers: the logits as the GEMM writes them, the gradient
        xh_cV = torch.empty(rows, V, dtype=h_ND.dtype, device=h_ND.device)
        g_cV = torch.empty_like(xh_cV) if need_grad else None
    rows_c = torch.arange(rows, device=h_ND.device)
    for s in range(0, N, chunk):
        h_cD, t_c, valid_c = h_ND[s:s + chunk], t_N[s:s + chunk], valid_N[s:s + chunk]
        n = h_cD.shape[0]
        if half:  # bf16/fp16 logits (as an autocast Linear gives), upcast for the loss
            xh_c = torch.mm(h_cD, w_VD.t(), out=xh_cV[:n])
            x_c = x_cV[:n].copy_(xh_c)
        else:
            x_c = torch.mm(h_cD, w_VD.t(), out=x_cV[:n])
        lp_c = torch.log_softmax(x_c, dim=-1, out=lp_cV[:n])
        at_c = (rows_c[:n], t_c.clamp_min(0))  # each row's target
        picked_c = lp_c[at_c]  # log-probability of each target
        total -= torch.where(valid_c, picked_c, 0.0).sum()
        if not need_grad:
            continue
        # d(sum of row losses)/dlogits = softmax - one-hot. The softmax is exp(log-softmax)
        # in fp32; in half precision it is computed from the half logits straight into the
        # half gradient buffer (fp32 inside, rounded once, as the cast of an fp32 gradient)
        g_c = torch.softmax(xh_c, dim=-1, out=g_cV[:n]) if half else lp_c.exp_()
        g_c.index_put_(at_c, (picked_c.exp() - 1).to(g_c.dtype))
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
def _(h_ND, weight_VD, t_N, chunk, need_grad):
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
    return dh_ND * grad.to(dh_ND.dtype), (dw_VD * grad).to(ctx.w_dtype), None, None, None


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
        total, n_valid = _linear_cross_entropy_op(h_ND, w_VD, targets_N, chunk, need_grad)[:2]
    return total / n_valid
