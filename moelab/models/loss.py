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
CHUNK_ELEMENTS = 1 << 21  # logits per chunk (fp32: 8 MiB)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, weight_VD: torch.Tensor, t_N: torch.Tensor, chunk: int,
                need_grad: bool) -> torch.Tensor:
        # the weight is cast here, not before: its gradient is summed and returned in its own
        # (fp32 master) dtype, with no bf16 rounding and no cast back by autograd
        w_VD = weight_VD.to(h_ND.dtype)
        N, V = h_ND.shape[0], w_VD.shape[0]
        acc = torch.promote_types(h_ND.dtype, torch.float32)  # half-precision logits upcast
        total = torch.zeros((), dtype=acc, device=h_ND.device)
        valid_N = t_N != IGNORE_INDEX
        if need_grad:
            dh_ND = torch.empty_like(h_ND)
            dw_VD = torch.zeros(w_VD.shape, dtype=torch.promote_types(acc, weight_VD.dtype),
                                device=w_VD.device)  # fp32 sums of the chunks
        buf_cV = torch.empty(min(chunk, N), V, dtype=acc, device=h_ND.device)  # reused per chunk
        for s in range(0, N, chunk):
            h_cD, t_c, valid_c = h_ND[s:s + chunk], t_N[s:s + chunk], valid_N[s:s + chunk]
            x_cV = buf_cV[:h_cD.shape[0]]
            if h_cD.dtype == acc:
                torch.mm(h_cD, w_VD.t(), out=x_cV)
            else:
                x_cV.copy_(h_cD @ w_VD.t())
            tgt_c = t_c.clamp_min(0).unsqueeze(1)
            picked_c = x_cV.gather(1, tgt_c).squeeze(1)
            max_c1 = x_cV.amax(dim=-1, keepdim=True)
            sum_c1 = x_cV.sub_(max_c1).exp_().sum(dim=-1, keepdim=True)  # x now exp(logit - max)
            lse_c = (max_c1 + sum_c1.log()).squeeze(1)
            total += torch.where(valid_c, lse_c - picked_c, 0.0).sum()
            if need_grad:  # d(sum of row losses)/dlogits = softmax - one-hot, zero on ignored rows
                g_cV = x_cV.div_(sum_c1)
                g_cV.scatter_add_(1, tgt_c, torch.full_like(picked_c, -1.0).unsqueeze(1))
                g_cV.mul_(valid_c.unsqueeze(1))
                g_cV = g_cV.to(h_ND.dtype)
                torch.mm(g_cV, w_VD, out=dh_ND[s:s + chunk])
                if dw_VD.dtype == h_cD.dtype:
                    dw_VD.addmm_(g_cV.t(), h_cD)
                else:  # half-precision products, fp32 sum over the chunks
                    dw_VD += g_cV.t() @ h_cD
        n_valid = valid_N.sum().to(acc)
        if need_grad:
            ctx.save_for_backward(dh_ND, dw_VD, n_valid)
            ctx.w_dtype = weight_VD.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh_ND, dw_VD, n_valid = ctx.saved_tensors
        scale = grad / n_valid
        return dh_ND * scale.to(dh_ND.dtype), (dw_VD * scale).to(ctx.w_dtype), None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ w.T against targets (-100 ignored), in row chunks.
    Under autocast the matmuls run in the autocast dtype, as an `nn.Linear` head would."""
    device = h_ND.device.type
    if torch.is_autocast_enabled(device):
        h_ND = h_ND.to(torch.get_autocast_dtype(device))
    chunk = chunk or max(1, CHUNK_ELEMENTS // w_VD.shape[0])
    need_grad = torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, chunk, need_grad)
