"""Key/value cache for incremental decoding.

Each attention layer gets a `LayerCache`: preallocated buffers filled along the sequence axis.
Multi-head / grouped-query attention stores keys and values per kv head (B, G, S, Dh). DeepSeek MLA
stores what it is designed to store: the normed compressed latent (B, S, kv_lora_rank) and the one
shared rotated key (B, S, R); per-head keys and values are expanded from the latent at each step.
`KVCache.pos` is the number of positions already cached; the next forward's tokens start there.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self.buffers: list[torch.Tensor] = []
        self.len = 0

    def append(self, *tensors: torch.Tensor, dim: int) -> list[torch.Tensor]:
        """Write `tensors` at positions [len, len + S) along `dim`; return every cached position."""
        S = tensors[0].shape[dim]
        if self.len + S > self.max_len:
            raise ValueError(f"KV cache full: {self.len} + {S} positions > {self.max_len}")
        if not self.buffers:
            for t in tensors:
                shape = list(t.shape)
                shape[dim] = self.max_len
                self.buffers.append(t.new_empty(shape))
        for buf, t in zip(self.buffers, tensors):
            buf.narrow(dim, self.len, S).copy_(t)
        self.len += S
        return [buf.narrow(dim, 0, self.len) for buf in self.buffers]


class KVCache:
    def __init__(self, n_layers: int, max_len: int):
        self.layers = [LayerCache(max_len) for _ in range(n_layers)]
        self.max_len = max_len

    @property
    def pos(self) -> int:
        return self.layers[0].len if self.layers else 0


def attention_mask(q_start: int, S: int, device) -> torch.Tensor | None:
    """Boolean mask (S, q_start + S) letting query i (at position q_start + i) see keys <= its
    position. None when no mask is needed (one new token sees everything cached)."""
    if S == 1:
        return None
    q_pos = torch.arange(q_start, q_start + S, device=device)
    return torch.arange(q_start + S, device=device)[None, :] <= q_pos[:, None]
