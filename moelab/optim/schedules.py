"""LR schedules as pure functions of the optimizer-update index (never of micro-batches)."""

from __future__ import annotations

import math


def lr_factor(update: int, total: int, warmup: int, kind: str = "cosine",
              min_ratio: float = 0.1) -> float:
    """Multiplier of the base LR for 0-based update index `update` out of `total` updates.

    Linear warmup from 1/warmup to 1 over `warmup` updates, then cosine decay to `min_ratio` at
    the last update (or constant).
    """
    if warmup > 0 and update < warmup:
        return (update + 1) / warmup
    if kind == "constant":
        return 1.0
    decay_steps = max(total - warmup - 1, 1)
    progress = min(max(update - warmup, 0) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
