"""LR schedules as pure functions of the optimizer-update index (never of micro-batches).

Because the factor depends only on the update index, the schedule needs no state of its own: a
resumed run recomputes it from the saved update counter.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "wsd", "constant")


def lr_factor(update: int, total: int, warmup: int, kind: str = "cosine",
              min_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Multiplier of the base LR for 0-based update index `update` out of `total` updates.

    All kinds start with a linear warmup from 1/warmup to 1 over `warmup` updates. Then:
      cosine    half-cosine from 1 to `min_ratio`, reached at the last update
      linear    straight line from 1 to `min_ratio`, reached at the last update
      wsd       warmup-stable-decay: 1 until the last `decay_frac` of all updates, then a straight
                line to `min_ratio` at the last update (MiniCPM, DeepSeek-V3's recipe)
      constant  1
    """
    if warmup > 0 and update < warmup:
        return (update + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_steps = max(1, round(decay_frac * total))
        start = max(total - decay_steps, warmup)
        if update < start:
            return 1.0
        progress = min((update - start + 1) / max(total - start, 1), 1.0)
        return 1.0 - (1.0 - min_ratio) * progress
    decay_steps = max(total - warmup - 1, 1)
    progress = min(max(update - warmup, 0) / decay_steps, 1.0)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_state(update: int, total: int, warmup: int, kind: str, min_ratio: float,
                   decay_frac: float) -> dict:
    """What a checkpoint records of the schedule: its settings and where it stands."""
    return {"kind": kind, "update": update, "total": total, "warmup": warmup, "min_ratio": min_ratio,
            "decay_frac": decay_frac,
            "factor": lr_factor(update, total, warmup, kind, min_ratio, decay_frac)}
