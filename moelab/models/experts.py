"""Routed experts: grouped matmuls over expert-sorted tokens, and the per-expert reference.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token, N = T*K slots.
Weights use nn.Linear's (out, in) layout per expert, as transformers does: gate/up (E, F, D),
down (E, D, F). Gated experts (SwiGLU) compute down(act(gate x) * up x); plain experts
down(act(up x)) and have no gate.

Fast path: sort the N (token, expert) slots by expert, run three grouped matmuls over the
contiguous per-expert row blocks (`torch._grouped_mm`, offsets = cumulative counts, no host sync),
then un-sort and sum the K weighted outputs per token. No Python loop over tokens or experts.
Where `_grouped_mm` is unavailable for the device/dtype, a padded batched matmul is used instead.
On CPU in bf16/fp16 each expert's row block is padded up to one of a few recurring sizes
(`bucket_rows`), since oneDNN compiles a kernel for every new row count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moelab.hardware import onednn_fp32_active
from moelab.models.layers import activation, gated, init_normal_


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        # Hopper+ kernels are bf16; other dtypes/architectures fall back to the padded path.
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return False


def pick_backend(requested: str, device: torch.device, dtype: torch.dtype, dims: tuple[int, ...] = ()) -> str:
    """auto/grouped -> grouped where `_grouped_mm` runs, else padded (float64, pre-Hopper CUDA,
    or a width whose rows are not a multiple of 16 bytes, which `_grouped_mm` rejects)."""
    if requested in ("auto", "grouped"):
        aligned = all(d * torch.finfo(dtype).bits // 8 % 16 == 0 for d in dims)
        return "grouped" if aligned and grouped_mm_supported(device, dtype) else "padded"
    return requested


def _grouped_linear(x_ND: torch.Tensor, w_EOD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # torch's fake (meta) kernel for _grouped_mm accepts bf16 only, although the CPU kernel
        # runs fp32/fp16 too; under torch.compile the op goes through moelab's own custom op.
        return grouped_linear_op(x_ND, w_EOD, offs_E)
    return torch._grouped_mm(x_ND, w_EOD.transpose(-2, -1), offs=offs_E)


def _zero_tail(out_ND: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Zero the rows after the last group, which `_grouped_mm` leaves unwritten (the static row
    count of the bucketed layout under torch.compile, CPU only): no uninitialised memory, NaN
    included, flows on from them. Reading offs on host is free on CPU; elsewhere no rows trail."""
    if out_ND.device.type == "cpu":
        out_ND[int(offs_E[-1]):].zero_()
    return out_ND


@torch.library.custom_op("moelab::grouped_linear", mutates_args=())
def grouped_linear_op(x_ND: torch.Tensor, w_EOD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return _zero_tail(torch._grouped_mm(x_ND, w_EOD.transpose(-2, -1), offs=offs_E), offs_E)


@grouped_linear_op.register_fake
def _(x_ND, w_EOD, offs_E):
    return x_ND.new_empty(x_ND.shape[0], w_EOD.shape[1])


@torch.library.custom_op("moelab::grouped_linear_backward", mutates_args=())
def grouped_linear_backward_op(grad_NO: torch.Tensor, x_ND: torch.Tensor, w_EOD: torch.Tensor,
                               offs_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # dx = grad @ W_e per group; dW_e = grad_e^T x_e (grouped along the token dimension)
    return (_zero_tail(torch._grouped_mm(grad_NO, w_EOD, offs=offs_E), offs_E),
            torch._grouped_mm(grad_NO.t(), x_ND, offs=offs_E))


@grouped_linear_backward_op.register_fake
def _(grad_NO, x_ND, w_EOD, offs_E):
    return torch.empty_like(x_ND), torch.empty_like(w_EOD)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_NO):
    x_ND, w_EOD, offs_E = ctx.saved_tensors
    dx, dw = grouped_linear_backward_op(grad_NO.contiguous(), x_ND, w_EOD, offs_E)
    return dx, dw, None


grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _padded_linear(x_ND: torch.Tensor, w_EOD: torch.Tensor, expert_N: torch.Tensor,
                   pos_N: torch.Tensor, capacity: int) -> torch.Tensor:
    E, D = w_EOD.shape[0], x_ND.shape[1]
    buf_ECD = x_ND.new_zeros(E, capacity, D).index_put((expert_N, pos_N), x_ND)
    return torch.bmm(buf_ECD, w_EOD.transpose(-2, -1))[expert_N, pos_N]


class Experts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, hidden: int, backend: str = "auto",
                 act: str = "silu", glu: bool = True):
        super().__init__()
        self.n_experts, self.backend, self.glu, self.act_name = n_experts, backend, glu, act
        self.act = activation(act)
        if glu:
            self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))

    def reset_parameters(self, std: float, out_std: float) -> None:
        for w in self._in_weights():
            init_normal_(w, std=std)
        init_normal_(self.down_proj, std=out_std)

    def _in_weights(self) -> list[torch.Tensor]:
        return [self.gate_proj, self.up_proj] if self.glu else [self.up_proj]

    def _weights(self, dtype: torch.dtype) -> list[torch.Tensor]:
        # Under autocast (or with a bf16 x) the master weights stay fp32 and are cast per step.
        return [w.to(dtype) for w in (*self._in_weights(), self.down_proj)]

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weights_TK: torch.Tensor,
                counts_E: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        device = x_TD.device.type
        if torch.is_autocast_enabled(device):
            # Autocast does not cover _grouped_mm, and x arrives in fp32 (the norm's output):
            # cast here, as an autocast nn.Linear would, so the experts' matmuls run in bf16/fp16.
            x_TD = x_TD.to(torch.get_autocast_dtype(device))
        if backend == "loop":
            return experts_reference(x_TD, idx_TK, weights_TK, *self._weights(x_TD.dtype),
                                     act=self.act_name, glu=self.glu)
        T, K = idx_TK.shape
        if T == 1 and device == "cpu" and not torch.is_grad_enabled():
            return self._one_token(x_TD, idx_TK, weights_TK)
        order_N = idx_TK.flatten().argsort(stable=True)  # slots sorted by expert
        weights = self._weights(x_TD.dtype)
        backend = pick_backend(backend, x_TD.device, x_TD.dtype, tuple(self.down_proj.shape[1:]))
        slot_R = order_N  # the slot (t*K + k) each row of the expert matmuls computes
        if backend != "grouped":
            expert_N, rank_N = _rank_in_expert(counts_E, T * K)
            cap = int(counts_E.max())  # host sync; fallback path only
            lin = lambda x, w: _padded_linear(x, w, expert_N, rank_N, cap)  # noqa: E731
        elif bucket_rows_here(x_TD):
            slot_R, offs_E = bucketed_layout(order_N, counts_E, static_rows=torch.compiler.is_compiling())
            x_TD = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])  # row T: the padding's zeros
        else:
            offs_E = counts_E.cumsum(0).to(torch.int32)
        if backend == "grouped":
            lin = lambda x, w: _grouped_linear(x, w, offs_E)  # noqa: E731
        # index_select rather than x[idx]: its backward is index_add, not a slow index_put
        x_ND = x_TD.index_select(0, slot_R // K)
        if self.glu and not torch.is_grad_enabled():
            # inference (generation, evaluation): two GEMMs, no weight copy. The concatenation
            # below copies every expert's gate and up weights each call, which a decoding step's
            # few rows cannot amortise (exp3: 0.5 ms a layer, a third of a decoded token's time).
            h_NF = gated(lin(x_ND, weights[0]), lin(x_ND, weights[1]), act=self.act_name)
        elif self.glu:
            # gate and up in one GEMM over the concatenated (E, 2F, D) weight: one larger matmul
            # beats two, and the concatenation copies weights, not activations. `gated` splits
            # the (N, 2F) result and writes its gradient back into one buffer.
            h_NF = gated(lin(x_ND, torch.cat([weights[0], weights[1]], dim=1)), act=self.act_name)
        else:
            h_NF = self.act(lin(x_ND, weights[0]))
        y_ND = lin(h_NF, weights[-1])
        return combine(y_ND, weights_TK, slot_R)

    def _one_token(self, x_1D: torch.Tensor, idx_1K: torch.Tensor, weights_1K: torch.Tensor) -> torch.Tensor:
        """One token without autograd on CPU (decoding one sequence): its K experts' products
        directly, each expert's weights cast alone, summed in the grouped path's order. The grouped
        path's sort, layout and per-expert calls (most of them on no rows) cost more than the
        products here: exp3's MoE layer took 229 us a token, transformers' Mixtral block 136."""
        w_K = weights_1K[0].to(x_1D.dtype)
        out_1D = None
        for k, e in enumerate(idx_1K[0].tolist()):  # K, a handful: not a loop over tokens or experts
            w_in = [w[e].to(x_1D.dtype) for w in self._in_weights()]
            h_1F = gated(x_1D @ w_in[0].t(), x_1D @ w_in[1].t(), act=self.act_name) if self.glu \
                else self.act(x_1D @ w_in[0].t())
            y_1D = h_1F @ self.down_proj[e].to(x_1D.dtype).t()
            out_1D = y_1D.mul_(w_K[k]) if out_1D is None else out_1D.add_(y_1D.mul_(w_K[k]))
        return out_1D


def bucket_rows_here(x_TD: torch.Tensor) -> bool:
    """Whether to round each expert's row count up to a bucket (`bucketed_layout`). On CPU, bf16
    and fp16 matmuls go through oneDNN, which builds (JIT-compiles) a kernel for every new row
    count: with routing, every expert's count is new at every step, and each matmul cost 4-5x
    its cached time (exp3: ~20 ms instead of ~4.5 ms per grouped call). fp32 (MKL) and CUDA do not
    compile per shape, unless fp32 products go through oneDNN too (`fast_fp32_matmuls`). Under
    torch.compile too, with a static number of rows (`bucketed_layout`)."""
    return x_TD.device.type == "cpu" and (x_TD.dtype in (torch.bfloat16, torch.float16)
                                          or (x_TD.dtype == torch.float32 and onednn_fp32_active()))


def bucket_rows(counts_E: torch.Tensor) -> torch.Tensor:
    """Each count rounded up to keep 4 significant bits (counts up to 16 stay as they are): at most
    12.5% padding per expert, and only ~8 distinct sizes per power of two (80 up to 4096), so
    every size recurs and its kernel is reused."""
    n = counts_E.to(torch.int64)
    step = torch.exp2((torch.log2(n.clamp(min=1).double()).floor() - 3).clamp(min=0)).to(torch.int64)
    return torch.where(n <= 16, n, (n + step - 1) // step * step)


def bucketed_layout(order_N: torch.Tensor, counts_E: torch.Tensor,
                    static_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for the grouped matmuls with each expert's block padded to `bucket_rows`: (slot_R,
    offs_E). slot_R[r] is the slot t*K + k that row r computes, or N (= T*K, the padding
    sentinel) for a padding row, which reads a zero input row and carries a zero weight.

    static_rows: R = N + N // 8 rows whatever the counts (torch.compile needs shapes that do not
    depend on data); each expert pads fewer than n/8 rows, so the groups always fit, and the rows
    after the last group belong to none (`_zero_tail`)."""
    N = order_N.numel()
    padded_E = bucket_rows(counts_E)
    pend_E = padded_E.cumsum(0)
    expert_N, rank_N = _rank_in_expert(counts_E, N)
    pos_N = rank_N + (pend_E - padded_E)[expert_N]  # padded block start + rank
    R = N + N // 8 if static_rows else int(pend_E[-1])  # CPU: no device sync
    slot_R = order_N.new_full((R,), N).index_copy_(0, pos_N, order_N)
    return slot_R, pend_E.to(torch.int32)


def _rank_in_expert(counts_E: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the N expert-sorted slots: its expert, and its rank within that expert's block."""
    expert_N = torch.repeat_interleave(torch.arange(counts_E.numel(), device=counts_E.device), counts_E,
                                       output_size=N)
    starts_E = counts_E.cumsum(0) - counts_E
    return expert_N, torch.arange(N, device=counts_E.device) - starts_E[expert_N]


def _inverse(slot_R: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Row of each slot t*K + k: the inverse permutation of slot_R (padding rows, slot n_slots,
    all land in one extra entry that is never read)."""
    inverse = slot_R.new_empty(n_slots + (slot_R.numel() > n_slots))
    inverse[slot_R] = torch.arange(slot_R.numel(), device=slot_R.device)
    return inverse[:n_slots]


class _Combine(torch.autograd.Function):
    """out[t] = sum_k w[t, k] * y[row of slot (t, k)], y holding one row per slot in expert-sorted
    order (slot_R[r] = t*K + k of row r), plus zero padding rows (slot T*K) where row counts are
    bucketed.

    Forward: K gathers by the inverse permutation (deterministic, unlike a scatter-add's atomics
    on GPU), each accumulated with its weight. Backward: one gather of the output gradient per
    row gives both dy (scaled by the slot's weight) and dw (its dot product with y); padding rows
    gather a zero gradient and get weight 0. A batched (T,1,K) @ (T,K,D) matmul does the same work
    but runs as T tiny matmuls on CPU."""

    @staticmethod
    def forward(ctx, y_RD: torch.Tensor, w_TK: torch.Tensor, slot_R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_RD, w_TK, slot_R)
        return _combine_forward(y_RD, w_TK, slot_R)

    @staticmethod
    def backward(ctx, dout_TD: torch.Tensor):
        y_RD, w_TK, slot_R = ctx.saved_tensors
        N, K = w_TK.numel(), w_TK.shape[1]
        w_N = w_TK.reshape(-1)
        if slot_R.numel() > N:  # padding rows: gather row T of the output gradient, weight N
            dout_TD = torch.cat([dout_TD, dout_TD.new_zeros(1, dout_TD.shape[1])])
            w_N = torch.cat([w_N, w_N.new_zeros(1)])
        dy_RD = dout_TD.index_select(0, slot_R // K)
        dw_TK = None
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(y_RD.dtype, torch.float32)  # bf16 products, fp32 sums
            dw_R = (dy_RD * y_RD).sum(-1, dtype=acc).to(w_TK.dtype)
            dw_TK = dw_R.new_empty(w_N.numel()).index_copy_(0, slot_R, dw_R)[:N].view(w_TK.shape)
        return dy_RD.mul_(w_N.index_select(0, slot_R).to(dy_RD.dtype).unsqueeze(1)), dw_TK, None


def _combine_forward(y_RD: torch.Tensor, w_TK: torch.Tensor, slot_R: torch.Tensor) -> torch.Tensor:
    inverse_TK = _inverse(slot_R, w_TK.numel()).view(w_TK.shape)
    wy_TK = w_TK.to(y_RD.dtype)
    out_TD = y_RD.index_select(0, inverse_TK[:, 0]).mul_(wy_TK[:, :1])
    for k in range(1, w_TK.shape[1]):  # K experts per token: a handful
        out_TD.addcmul_(y_RD.index_select(0, inverse_TK[:, k]), wy_TK[:, k:k + 1])
    return out_TD


def combine(y_RD: torch.Tensor, w_TK: torch.Tensor, slot_R: torch.Tensor) -> torch.Tensor:
    """Un-sort the expert outputs and sum each token's K of them, weighted (see _Combine)."""
    if not torch.is_grad_enabled():  # inference (decoding: 4-9% of a token): no autograd Function to wrap it
        return _combine_forward(y_RD, w_TK, slot_R)
    if torch.compiler.is_compiling():
        y_TKD = y_RD.index_select(0, _inverse(slot_R, w_TK.numel())).view(*w_TK.shape, -1)
        return (y_TKD * w_TK.to(y_TKD.dtype).unsqueeze(-1)).sum(1)
    return _Combine.apply(y_RD, w_TK, slot_R)


def experts_reference(x_TD, idx_TK, weights_TK, *weights, act: str = "silu", glu: bool = True):
    """Slow, obviously-correct per-expert loop. Used by tests and `expert_backend=loop`.
    `weights` is (gate, up, down) for gated experts, (up, down) for plain ones."""
    fn = activation(act)
    out_TD = torch.zeros_like(x_TD)
    for e in range(weights[-1].shape[0]):
        tok, slot = torch.nonzero(idx_TK == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x_TD[tok]
        h = fn(xe @ weights[0][e].T) * (xe @ weights[1][e].T) if glu else fn(xe @ weights[0][e].T)
        ye = h @ weights[-1][e].T
        out_TD = out_TD.index_add(0, tok, ye * weights_TK[tok, slot].unsqueeze(-1).to(ye.dtype))
    return out_TD


def residual_std(std: float, n_layers: int) -> float:
    """GPT-2 style scaling of the projections that write into the residual stream."""
    return std / math.sqrt(2 * n_layers)
