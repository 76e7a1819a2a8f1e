"""Shared by the benchmarks: timing with warm-up and device synchronisation."""

from __future__ import annotations

import time

import torch


def bench(fn, iters: int, warmup: int = 3) -> float:
    """Seconds per call; an implementation slower than 1 s per call gets 2 timed calls only."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t = time.perf_counter()
    fn()
    sync()
    if time.perf_counter() - t > 1.0:
        warmup, iters = 0, 2
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters
