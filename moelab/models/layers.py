"""Building blocks shared by every architecture: RMSNorm, rotary embeddings, dense MLP.

Shapes: B batch, S sequence, H heads, Dh head dim, R rotated dims, D model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def init_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """`nn.init.normal_(t, std=std)` drawn from the CPU generator whatever `t`'s device, so that a
    seed gives the same initial weights on every device (and a model can be initialised on its
    GPU a tensor at a time, without first being whole in host memory)."""
    if t.device.type == "meta":  # no values to draw
        return t
    if t.device.type == "cpu":
        return nn.init.normal_(t, std=std)
    with torch.no_grad():
        return t.copy_(torch.empty(t.shape, dtype=t.dtype, device="cpu").normal_(0.0, std))


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as in Llama/DeepSeek), result cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same arithmetic in one fused kernel where torch has one (CUDA: 2 kernels
            # instead of ~7 forward, fewer in backward); on CPU it is bit-identical to the below.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(cfg, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) in float64 and the factor applied to cos/sin.

    none: theta^(-2i/dim). linear: divided by rope_factor (position interpolation).
    yarn (Peng et al. 2023, as DeepSeek-V3 and transformers compute it): interpolate the low
    frequencies, keep the high ones, blend linearly between beta_fast and beta_slow rotations.
    llama3 (Llama 3.1): divide the frequencies whose wavelength exceeds original/low_freq_factor
    by rope_factor, keep those under original/high_freq_factor, and blend those between by where
    original/wavelength falls from low_freq_factor to high_freq_factor; cos/sin unscaled.
    """
    base = cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.rope_scaling == "none":
        return inv, 1.0
    factor = cfg.rope_factor
    if cfg.rope_scaling == "linear":
        return inv / factor, 1.0
    if cfg.rope_scaling == "llama3":
        low, high = cfg.llama3_low_freq_factor, cfg.llama3_high_freq_factor
        ratio = cfg.rope_original_max_len * inv / (2 * math.pi)  # original context / wavelength
        keep = ((ratio - low) / (high - low)).clamp(0, 1)  # 1: high frequency, 0: low
        return (inv / factor) * (1 - keep) + inv * keep, 1.0
    # yarn
    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv = (inv / factor) * (1 - extrapolate) + inv * extrapolate
    if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
        attn_factor = _yarn_mscale(factor, cfg.yarn_mscale) / _yarn_mscale(factor, cfg.yarn_mscale_all_dim)
    else:
        attn_factor = _yarn_mscale(factor)
    return inv, attn_factor


def yarn_softmax_scale(cfg) -> float:
    """Extra softmax-scale factor DeepSeek-V3 applies in MLA under yarn with mscale_all_dim."""
    if cfg.rope_scaling == "yarn" and cfg.yarn_mscale_all_dim:
        return _yarn_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim) ** 2
    return 1.0


def rope_cache(cfg, seq_len: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, dim): each frequency twice, [f0..f_{R/2}, f0..f_{R/2}]."""
    inv, attn_factor = rope_inv_freq(cfg, dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * attn_factor).float(), (emb.sin() * attn_factor).float()


def apply_rope(x: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor,
               interleave: bool = False) -> torch.Tensor:
    """Rotate the first R dims of the last axis, pass the rest through.

    Half layout (Llama): pairs are (x_i, x_{i+R/2}). Interleaved layout (DeepSeek checkpoints):
    pairs are (x_{2i}, x_{2i+1}); the rotated result is written in half layout, which leaves
    q.k unchanged since queries and keys get the same permutation.
    """
    R = cos_SR.shape[-1]
    x_rot, x_pass = x[..., :R], x[..., R:]
    if interleave:
        c, s = cos_SR[..., : R // 2], sin_SR[..., : R // 2]
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    else:
        x1, x2 = x_rot[..., : R // 2], x_rot[..., R // 2:]
        out = x_rot * cos_SR + torch.cat([-x2, x1], dim=-1) * sin_SR
    out = out.to(x.dtype)
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


def activation(name: str):
    return F.silu if name == "silu" else (lambda x: F.gelu(x, approximate="tanh"))


def _swiglu_backward(dh, gate, up, s, d_gate, d_up) -> None:
    """d_up = dh * silu(gate); d_gate = silu'(gate) * dh * up (aten's fused silu_backward),
    written into the given buffers: three elementwise passes."""
    torch.mul(dh, s, out=d_up)
    torch.ops.aten.silu_backward.grad_input(dh * up, gate, grad_input=d_gate)


def _swiglu_forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    s = F.silu(gate)
    ctx.save_for_backward(gate, up, s)
    return s * up


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up with a hand-written backward. Autograd's silu + mul saves the same tensors
    (gate, up, silu(gate)) but takes one more elementwise pass in the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return _swiglu_forward(ctx, gate, up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up, s = ctx.saved_tensors
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        _swiglu_backward(dh, gate, up, s, d_gate, d_up)
        return d_gate, d_up


class _FusedSwiGLU(torch.autograd.Function):
    """The same from one (N, 2F) [gate | up] GEMM output: the backward writes both halves of the
    gradient into one (N, 2F) buffer, so no concatenation (autograd's chunk backward is a cat)."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor) -> torch.Tensor:
        return _swiglu_forward(ctx, *gu.chunk(2, dim=-1))

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> torch.Tensor:
        gate, up, s = ctx.saved_tensors
        n = gate.shape[-1]
        dgu = dh.new_empty(*dh.shape[:-1], 2 * n)
        _swiglu_backward(dh, gate, up, s, dgu[..., :n], dgu[..., n:])
        return dgu


def gated(gate: torch.Tensor, up: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """act(gate) * up; with up=None, gate is one fused GEMM output [gate | up] on the last axis.
    Under torch.compile the plain ops are traced instead: inductor fuses them itself. Without
    gradients (inference) too: the hand-written backward is not needed, and the autograd Function
    around the two ops cost a decoded token 4-9% (exp3, deepseek_v3-tiny on CPU, with `combine`)."""
    plain = torch.compiler.is_compiling() or not torch.is_grad_enabled()
    if up is None:
        if act == "silu" and not plain:
            return _FusedSwiGLU.apply(gate)
        gate, up = gate.chunk(2, dim=-1)
    if act == "silu" and not plain:
        return _SwiGLU.apply(gate, up)
    return activation(act)(gate) * up


class MLP(nn.Module):
    """Dense feed-forward: down(act(gate(x)) * up(x)) when gated (SwiGLU), else down(act(up(x)))."""

    def __init__(self, d_model: int, hidden: int, act: str = "silu", glu: bool = True):
        super().__init__()
        self.act, self.act_name, self.glu = activation(act), act, glu
        if glu:
            self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.glu:  # the projections stay modules, so hooks and adapters (LoRA) still apply
            return self.down_proj(gated(self.gate_proj(x), self.up_proj(x), self.act_name))
        return self.down_proj(self.act(self.up_proj(x)))


