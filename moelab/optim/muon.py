"""Muon: momentum SGD whose update is orthogonalised by a quintic Newton-Schulz iteration.

For a gradient G (out x in), the update is ~ U V^T from G's SVD: every singular direction moves by
the same amount. 3-D parameters (E, out, in) are orthogonalised per expert in one batched call.
Scale options: "match_adamw" multiplies by 0.2*sqrt(max(out, in)) so the update RMS matches
AdamW's (Moonlight), letting Muon and AdamW share LR values; "spectral" uses sqrt(max(1, out/in))
(Keller Jordan's original).
"""

from __future__ import annotations

import torch

from moelab.hardware import fast_bf16_matmuls

# Quintic coefficients tuned for fast convergence of small singular values (Keller Jordan).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor of each matrix in G (..., m, n).

    Each step is X <- a X + (b A + c A^2) X with A = X X^T. The scaled sums ride in the GEMMs'
    beta/alpha (baddbmm), so the bf16 iteration rounds once per product instead of after every
    scale and add: on CPU 1.5x faster for exp3's expert matrices and half the error against float64.
    """
    a, b, c = NS_COEFFS
    shape = G.shape
    X = G.to(dtype).reshape(-1, *shape[-2:])  # one batch axis: baddbmm takes 3-D only
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X.reshape(shape).to(G.dtype)


def update_scale(shape: torch.Size, mode: str) -> float:
    out_dim, in_dim = shape[-2], shape[-1]
    if mode == "match_adamw":
        return 0.2 * max(out_dim, in_dim) ** 0.5
    return max(1.0, out_dim / in_dim) ** 0.5


def auto_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where bf16 products beat fp32 (CUDA, CPUs with AMX), else fp32: on an AVX2-only CPU a
    bf16 iteration takes ~40x longer (exp3's Muon step: 33 s against 0.7 s in fp32)."""
    return torch.bfloat16 if fast_bf16_matmuls(device) else torch.float32


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 scale: str = "match_adamw"):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, scale=scale)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon needs matrices; got a parameter of shape {tuple(p.shape)}")
        # None ("auto") is decided once, here, and saved with the state: the choice is timed, so
        # another process (a resume) could measure the other way and iterate in another dtype.
        self.ns_dtype_asked = ns_dtype
        self.device_type = self.param_groups[0]["params"][0].device.type
        self.ns_dtype = ns_dtype or auto_ns_dtype(torch.device(self.device_type))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            for batch in _same_shape_batches([p for p in group["params"] if p.grad is not None]):
                gs = []
                for p in batch:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - mu)
                    gs.append(p.grad.lerp(buf, mu) if group["nesterov"] else buf)
                us = newton_schulz(torch.stack(gs) if len(gs) > 1 else gs[0], group["ns_steps"], self.ns_dtype)
                for p, u in zip(batch, us if len(gs) > 1 else [us]):
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(u, alpha=-lr * update_scale(p.shape, group["scale"]))
        return loss

    @property
    def ns_dtype_name(self) -> str:
        """"bfloat16" or "float32": a plain string (loads with weights_only), also for messages."""
        return str(self.ns_dtype).removeprefix("torch.")

    def state_dict(self) -> dict:
        return dict(super().state_dict(), ns_dtype=self.ns_dtype_name, device_type=self.device_type)

    def load_state_dict(self, state_dict: dict) -> None:
        """An "auto" Muon resumed on the same kind of device iterates in the dtype the saved run
        chose, so the resumed updates are bit-identical; an explicit ns_dtype always wins."""
        super().load_state_dict(state_dict)
        saved = getattr(torch, str(state_dict.get("ns_dtype")), None)
        if (self.ns_dtype_asked is None and isinstance(saved, torch.dtype)
                and state_dict.get("device_type") == self.device_type):
            self.ns_dtype = saved


# Same-shape matrices are orthogonalised in one batched call: 24 of exp3's (256, 256) attention
# matrices take 31 ms together against 81 ms one by one on 2 CPU cores (a small GEMM does not keep
# every core busy; on a GPU, fewer launches). A batch stops at this many elements so the stacked
# copy stays small next to large matrices, which run alone as before.
BATCH_NUMEL = 1 << 22


def _same_shape_batches(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """2-D parameters grouped by shape (and device, dtype) into batches of at most BATCH_NUMEL
    elements, in first-seen order; 3-D expert stacks are already one batched call each."""
    batches, open_batch = [], {}
    for p in params:
        if p.ndim != 2:
            batches.append([p])
            continue
        key = (tuple(p.shape), p.device, p.dtype)
        batch = open_batch.get(key)
        if batch is None or (len(batch) + 1) * p.numel() > BATCH_NUMEL:
            batch = open_batch[key] = []
            batches.append(batch)
        batch.append(p)
    return batches
