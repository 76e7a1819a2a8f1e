"""Key/value cache for incremental decoding.

Each attention layer gets a `LayerCache`: preallocated buffers filled along the sequence axis.
Multi-head / grouped-query attention stores keys and values per kv head (B, G, S, Dh). DeepSeek MLA
stores what it is designed to store: the normed compressed latent (B, S, kv_lora_rank) and the one
shared rotated key (B, S, R); per-head keys and values are expanded from the latent at each step.
`KVCache.pos` is the number of positions already cached; the next forward's tokens start there.

Several prompts of different lengths decode together left-padded (`KVCache(pad=...)`): row b's
first `pad[b]` cached positions are padding. Its queries see only its own keys (`rows_mask`); a
padding position sees itself alone, so its (unused) keys and values stay finite. Its tokens take
RoPE positions counted from its own first token: the rotations, and so their rounding, it gets
alone. `keep` drops the rows that are done and the padding no remaining row needs, so a batch runs
as far as each of its prompts would alone.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self.buffers: list[torch.Tensor] = []
        self.dims: list[int] = []
        self.len = 0
        self.mask: torch.Tensor | None = None  # (B, 1, S, len + S): the next forward's, when rows are padded

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
                self.dims.append(dim)
        for buf, t in zip(self.buffers, tensors):
            buf.narrow(dim, self.len, S).copy_(t)
        self.len += S
        return [buf.narrow(dim, 0, self.len) for buf in self.buffers]

    def keep(self, rows_B: torch.Tensor, drop: int) -> None:
        """Only these batch rows (dim 0), and the positions after the first `drop`."""
        kept = self.len - drop
        for i, (buf, dim) in enumerate(zip(self.buffers, self.dims)):
            new = buf.new_empty(len(rows_B), *buf.shape[1:])
            new.narrow(dim, 0, kept).copy_(buf.index_select(0, rows_B).narrow(dim, drop, kept))
            self.buffers[i] = new
        self.len = kept


class KVCache:
    """`pad`: left padding of each batch row (batched decoding of prompts of different lengths);
    None when every row starts at position 0."""

    def __init__(self, n_layers: int, max_len: int, pad: torch.Tensor | None = None):
        self.layers = [LayerCache(max_len) for _ in range(n_layers)]
        self.max_len = max_len
        self.pad = pad if pad is not None and bool(pad.any()) else None

    @property
    def pos(self) -> int:
        return self.layers[0].len if self.layers else 0

    def next_positions(self, S: int) -> torch.Tensor | None:
        """(B, S) RoPE positions of each row's next S tokens (padding: 0), and each layer's attention
        mask for them set; None (and no masks) when no row is padded."""
        if self.pad is None:
            return None
        q_S = torch.arange(self.pos, self.pos + S, device=self.pad.device)
        mask = rows_mask(self.pad, self.pos, S)
        for layer in self.layers:
            layer.mask = mask
        return (q_S[None, :] - self.pad[:, None]).clamp(min=0)

    def keep(self, rows: list[int]) -> None:
        """Go on with these batch rows only, dropping the leading positions that are padding in
        every one of them."""
        held = [layer for layer in self.layers if layer.buffers]
        rows_B = torch.tensor(rows, device=held[0].buffers[0].device if held else None)
        drop = 0
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows_B.to(self.pad.device))
            drop = int(self.pad.min())
            self.pad -= drop
        for layer in held:
            layer.keep(rows_B, drop)
        if self.pad is not None and not bool(self.pad.any()):
            self.pad = None
            for layer in self.layers:
                layer.mask = None


def rows_mask(pad_B: torch.Tensor, start: int, S: int) -> torch.Tensor:
    """Boolean (B, 1, S, start + S) mask for left-padded rows: query i (at position start + i) sees
    the keys of its own row from its first token up to its position; a padding query sees itself."""
    q_S1 = torch.arange(start, start + S, device=pad_B.device)[:, None]
    k_1L = torch.arange(start + S, device=pad_B.device)[None, :]
    own_BSL = k_1L[None] >= pad_B[:, None, None]
    return ((own_BSL & (k_1L <= q_S1)[None]) | (k_1L == q_S1)[None]).unsqueeze(1)


def attention_mask(q_start: int, S: int, device) -> torch.Tensor | None:
    """Boolean mask (S, q_start + S) letting query i (at position q_start + i) see keys <= its
    position. None when no mask is needed (one new token sees everything cached)."""
    if S == 1:
        return None
    q_pos = torch.arange(q_start, q_start + S, device=device)
    return torch.arange(q_start + S, device=device)[None, :] <= q_pos[:, None]
