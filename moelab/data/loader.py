"""Packing documents into non-overlapping windows, and the resumable shuffled batch loader.

Each split's documents are concatenated (document tokens, then EOS) into one stream and cut into
disjoint windows of seq_len + 1 tokens (inputs = w[:-1], targets = w[1:]). Windows never overlap
and never cross the split, because each split is packed separately.
"""

from __future__ import annotations

import numpy as np
import torch


def pack(token_lists: list[list[int]], eos_id: int, prefix: list[int] = ()) -> torch.Tensor:
    """One int64 stream: doc0 EOS doc1 EOS ..., each document after `prefix` (a tokenizer's doc_prefix)."""
    p = len(prefix)
    total = sum(p + len(t) + 1 for t in token_lists)
    out = np.empty(total, dtype=np.int64)
    pos = 0
    for ids in token_lists:
        out[pos:pos + p] = prefix
        out[pos + p:pos + p + len(ids)] = ids
        out[pos + p + len(ids)] = eos_id
        pos += p + len(ids) + 1
    return torch.from_numpy(out)


def make_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(N, seq_len + 1) disjoint windows; the tail shorter than one window is dropped."""
    n = stream.numel() // (seq_len + 1)
    return stream[: n * (seq_len + 1)].view(n, seq_len + 1)


class BatchLoader:
    """Deterministic per-epoch shuffle of windows with an exact, resumable position.

    The order of epoch e is randperm(N) drawn from a generator seeded with (seed, e), so the
    state is just (epoch, position in windows): nothing depends on how many batches were drawn
    before. A batch that would run past the end of the epoch's order is not drawn (every batch
    has the same shape); the next epoch begins instead. Because the position counts windows, not
    batches, a resume may change the batch size: the next batches continue from the same window
    (train.batch_size=8 becoming 4 with train.grad_accum=2 forms each update from the same 8).
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int):
        if windows.shape[0] < batch_size:
            raise ValueError("fewer windows than one batch")
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.windows.shape[0], generator=g)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > self.windows.shape[0]:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        rows = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        w = self.windows[rows]  # a tensor, or prepared data's memory-mapped windows (int64 out)
        return w[:, :-1], w[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "n_windows": int(self.windows.shape[0]), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "n_windows"):
            if state[key] != mine[key]:
                raise ValueError(f"loader {key} changed since the checkpoint ({state[key]} -> {mine[key]})")
        # checkpoints before the position in windows hold a batch index
        position = state["position"] if "position" in state else state["index"] * state["batch_size"]
        self.epoch, self.position = state["epoch"], position
        self._order = self._perm(self.epoch)
