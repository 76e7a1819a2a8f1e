"""Causal self-attention on torch's scaled_dot_product_attention.

`Attention`: multi-head / grouped-query attention with optional QK-norm (per head as in Qwen3 and
GLM4, or over all heads as in OLMoE), q/k/v and output biases, and partial rotary embeddings.
`LatentAttention`: DeepSeek multi-head latent attention (MLA). The query is full-rank or goes through
a low-rank bottleneck with its own norm. Keys and values come from one compressed latent
(kv_lora_rank, normed) plus a single RoPE key shared by all heads. Each head's query/key is
[no-RoPE part | RoPE part]; the value head dim may differ (on CPU it is zero-padded to match
so that SDPA runs its fused kernel; see `pad_for_flash`).

Shapes: B batch, S sequence, H query heads, G key/value heads, Dh head dim, D model dim,
R rotated dims (cos/sin come in as (S, R), already offset to the positions of x, or as (B, 1, S, R)
where the rows of a batch are at different positions: left-padded prompts decoded together).

With a `LayerCache` (incremental decoding) the new keys/values are appended and the queries attend
to every cached position up to their own; without one, plain causal attention over x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig
from moelab.hardware import onednn_fp32_active
from moelab.models.kvcache import LayerCache, attention_mask
from moelab.models.layers import RMSNorm, apply_rope, yarn_softmax_scale


def _attend(q, k, v, cache: LayerCache | None, q_start: int, **kw) -> torch.Tensor:
    """Causal SDPA; with a cache, queries start at position `q_start` of the cached keys (and
    left-padded rows see their own keys only: the cache's mask)."""
    if cache is not None and cache.mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, **kw)
    if cache is None or q_start == 0:
        if explicit_scores_cpu(q, k.shape[-2]) and q.shape[-2] == k.shape[-2]:
            return causal_attention_fp32_scores(q, k, v, kw.get("scale"))
        # causal even for one query (it sees its one key): a bool, where `S > 1` is a SymBool under
        # torch.compile once the sequence length is dynamic, which SDPA refuses
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(q_start, q.shape[-2], q.device), **kw)


# In bf16/fp16 torch's CPU flash kernel is slower than explicit scores on short sequences
# (measured, torch 2.13, 2 cores, fwd+bwd of 2048 tokens, 8 heads of 48: flash 53 / 67 / 49 / 66 /
# 77 ms at S = 64 / 128 / 256 / 512 / 1024, `causal_attention_fp32_scores` 16 / 28 / 50 / 109 /
# 280 ms). In fp32 flash is faster at every length tried (64 to 2048) while fp32 products go
# through the default BLAS; through oneDNN (`moelab.hardware.fast_fp32_matmuls`, where it is
# faster) the explicit scores' batched products run 2-3x faster and flash's own small blocked
# ones slower, so short fp32 sequences take explicit scores too (AMD Zen 5, 2 cores, whole
# training steps: tiny preset 1.28x, exp3 with MLA 1.42x against flash and the default BLAS).
FLASH_MIN_KEYS_CPU = 256
FP32_MAX = torch.finfo(torch.float32).max


def explicit_scores_cpu(q: torch.Tensor, n_keys: int) -> bool:
    """Short CPU attention that runs faster as `causal_attention_fp32_scores` than in SDPA: half
    precision, or fp32 while fp32 products go through oneDNN."""
    return q.device.type == "cpu" and n_keys < FLASH_MIN_KEYS_CPU and (
        q.dtype in (torch.bfloat16, torch.float16) or (q.dtype == torch.float32 and onednn_fp32_active()))


def causal_attention_fp32_scores(q_BHSD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSV: torch.Tensor,
                                 scale: float | None = None) -> torch.Tensor:
    """Causal attention with the (S, S) scores and their softmax in fp32, the probabilities
    times values in q's dtype: for short half-precision sequences on CPU, where it runs ~1.4x
    faster than SDPA's math path (which handles fully masked rows with extra passes) and
    2-4x faster than its flash kernel. Scores rounded to bf16 before the softmax (transformers'
    eager attention) err 4-6x more than SDPA; fp32 scores stay within 1.4x of it. With fewer
    key/value heads (GQA), the R query heads of a group are stacked as R*S rows against the
    group's keys and values, not repeated to each head: the gradients of k and v are summed over
    the group inside one matmul instead of from R rounded per-head parts (dv's error 1.35x
    SDPA's -> 1.13x), and no copies of k and v are made."""
    B, H, S, D = q_BHSD.shape
    G, V = k_BGSD.shape[1], v_BGSV.shape[-1]
    R = H // G
    mask_MS = torch.full((S, S), float("-inf"), device=q_BHSD.device).triu_(1)
    if R > 1:
        mask_MS = mask_MS.repeat(R, 1)  # each head's rows of the group
    # autocast off: it runs baddbmm in bf16 whatever its inputs, which rounded the scores to bf16
    # in every autocast (train.precision=bf16) run
    # a scale past fp32's range (a broken yarn mscale) is inf, as fp32 arithmetic makes it: the
    # scores go non-finite, as SDPA's do, instead of baddbmm refusing the float
    alpha = D ** -0.5 if scale is None else (math.inf if scale > FP32_MAX else scale)
    with torch.autocast(q_BHSD.device.type, enabled=False):
        scores = torch.baddbmm(mask_MS.expand(B * G, R * S, S), q_BHSD.reshape(B * G, R * S, D).float(),
                               k_BGSD.reshape(B * G, S, D).transpose(1, 2).float(), alpha=alpha)
        probs = scores.softmax(-1).to(v_BGSV.dtype)
        return torch.bmm(probs, v_BGSV.reshape(B * G, S, V)).view(B, H, S, V)


def pad_for_flash(q: torch.Tensor, v: torch.Tensor, n_keys: int, causal_only: bool) -> bool:
    """Whether to pad MLA's value (or query/key) head dim so the two match. Only on CPU, where
    SDPA has no kernel for unequal head dims but the math path (O(S^2) memory, 3-4x slower at
    S=1024-2048); CUDA's memory-efficient kernel takes unequal dims already. Only for plain
    causal attention (training, prefill): decoding with a mask keeps the unpadded path."""
    if q.device.type != "cpu" or q.shape[-1] == v.shape[-1] or not causal_only:
        return False
    return not explicit_scores_cpu(q, n_keys)  # explicit fp32 scores instead


def rotary_dim(cfg: ModelConfig) -> int:
    return cfg.qk_rope_head_dim if cfg.attention == "mla" else int(cfg.head_dim * cfg.partial_rotary)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qk_norm, self.interleave = cfg.qk_norm, cfg.rope_interleave
        self.scale = cfg.attn_scale or None  # None: SDPA's head_dim ** -0.5
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.out_bias)
        if cfg.attn_gate:
            self.gate_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(kv_dim, cfg.norm_eps)

    def output_projections(self) -> list[nn.Linear]:
        return [self.o_proj]

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BSHD = q.view(B, S, self.n_heads, self.head_dim)
        k_BSGD = k.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BSHD, k_BSGD = self.q_norm(q_BSHD), self.k_norm(k_BSGD)
        q_BHSD, k_BGSD = q_BSHD.transpose(1, 2), k_BSGD.transpose(1, 2)
        v_BGSD = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSD = apply_rope(q_BHSD, cos_SR, sin_SR, self.interleave)
        k_BGSD = apply_rope(k_BGSD, cos_SR, sin_SR, self.interleave)
        start = cache.len if cache is not None else 0
        if cache is not None:
            k_BGSD, v_BGSD = cache.append(k_BGSD, v_BGSD, dim=2)
        y_BHSD = _attend(q_BHSD, k_BGSD, v_BGSD, cache, start, enable_gqa=self.n_kv_heads != self.n_heads,
                         scale=self.scale)
        y_BSX = y_BHSD.transpose(1, 2).reshape(B, S, -1)
        if hasattr(self, "gate_proj"):
            y_BSX = y_BSX * torch.sigmoid(self.gate_proj(x_BSD))
        return self.o_proj(y_BSX)


# DeepSeek's latent norms use eps 1e-6 whatever rms_norm_eps is (reference code and transformers).
MLA_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = self.n_heads = cfg.n_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.interleave = cfg.kv_lora_rank, cfg.rope_interleave
        qk_dim = self.nope + self.rope
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, H * qk_dim, bias=False)
        self.kv_a_proj = nn.Linear(cfg.d_model, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, MLA_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, cfg.d_model, bias=False)
        self.scale = qk_dim ** -0.5 * yarn_softmax_scale(cfg)

    def output_projections(self) -> list[nn.Linear]:
        return [self.o_proj]

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H = self.n_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        q_BHSQ = q.view(B, S, H, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rot = q_BHSQ.split([self.nope, self.rope], dim=-1)
        latent_BSC, k_rot_BSR = self.kv_a_proj(x_BSD).split([self.kv_rank, self.rope], dim=-1)
        latent_BSC = self.kv_a_norm(latent_BSC)
        k_rot_BSR = apply_rope(k_rot_BSR.unsqueeze(1), cos_SR, sin_SR, self.interleave).squeeze(1)
        q_rot = apply_rope(q_rot, cos_SR, sin_SR, self.interleave)
        start = cache.len if cache is not None else 0
        if cache is not None:  # cache the latent and the shared rotated key, not per-head keys/values
            latent_BSC, k_rot_BSR = cache.append(latent_BSC, k_rot_BSR, dim=1)
        Sk = latent_BSC.shape[1]
        kv_BHSX = self.kv_b_proj(latent_BSC).view(B, Sk, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v_BHSV = kv_BHSX.split([self.nope, self.v_dim], dim=-1)
        q_BHSQ = torch.cat([q_nope, q_rot], dim=-1)
        k_BHSQ = torch.cat([k_nope, k_rot_BSR.unsqueeze(1).expand(B, H, Sk, self.rope)], dim=-1)
        if pad_for_flash(q_BHSQ, v_BHSV, Sk, cache is None or (start == 0 and cache.mask is None)):
            # Equal head dims let SDPA take its fused kernel instead of the math path, which
            # materialises (B, H, S, S) scores and probabilities. The padding is zeros, so with the
            # explicit scale q.k and the first v_dim output dims are unchanged.
            W = max(q_BHSQ.shape[-1], self.v_dim)
            q_BHSQ, k_BHSQ, v_BHSV = (t if t.shape[-1] == W else F.pad(t, (0, W - t.shape[-1]))
                                      for t in (q_BHSQ, k_BHSQ, v_BHSV))
        y_BHSV = _attend(q_BHSQ, k_BHSQ, v_BHSV, cache, start, scale=self.scale)[..., :self.v_dim]
        return self.o_proj(y_BHSV.transpose(1, 2).reshape(B, S, H * self.v_dim))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return LatentAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
