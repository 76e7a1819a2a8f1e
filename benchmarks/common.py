"""Shared by the benchmarks: timing with warm-up and device synchronisation."""

from __future__ import annotations

import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn, iters: int, warmup: int = 3) -> float:
    """Seconds per call; an implementation slower than 1 s per call gets 2 timed calls only."""
    t = time.perf_counter()
    fn()
    _sync()
    if time.perf_counter() - t > 1.0:
        warmup, iters = 0, 2
    for _ in range(warmup):
        fn()
    _sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - t) / iters


def compare(fns: dict, iters: int, rounds: int = 3, warmup: int = 2) -> dict[str, float]:
    """Best seconds per call of each function, timed in interleaved rounds (a, b, c, a, b, c, ...)
    so that a slow spell on a shared machine hits every contender alike instead of whichever ran
    during it. A function slower than 1 s per call is timed once per round."""
    slow = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        _sync()
        slow[name] = time.perf_counter() - t > 1.0
        for _ in range(0 if slow[name] else warmup):
            fn()
        _sync()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = 1 if slow[name] else iters
            t = time.perf_counter()
            for _ in range(n):
                fn()
            _sync()
            best[name] = min(best[name], (time.perf_counter() - t) / n)
    return best


def matmul_time(fn, iters: int = 5) -> tuple[float, float]:
    """(seconds per call, of which in matrix multiplications) from torch.profiler's CPU self
    times: what a contender spends outside its GEMMs is what a faster implementation can save."""
    from torch.profiler import profile

    fn()
    with profile() as prof:
        for _ in range(iters):
            fn()
        _sync()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm"))
    return total / iters / 1e6, mm / iters / 1e6


def print_matmul_split(steps: dict, seconds: dict, ours: str, theirs: str, iters: int = 5) -> None:
    """Print each side's matmul share of a step (profiled) applied to its best timed step, and the
    ceiling of the ratio: both sides run the same GEMMs (same shapes, same BLAS), so a ratio above
    theirs_total / ours_matmul would need faster matrix multiplications, not less overhead."""
    print("\n  profiled (torch.profiler, CPU self time), scaled to the best timed step:")
    share = {}
    for name in (ours, theirs):
        total, mm = matmul_time(steps[name], iters)
        share[name] = mm / total
        print(f"  {name:<44}matmuls {share[name]:6.1%}: {seconds[name] * share[name] * 1e3:8.1f} ms, "
              f"rest {seconds[name] * (1 - share[name]) * 1e3:8.1f} ms")
    ceiling = seconds[theirs] / (seconds[ours] * share[ours])
    print(f"  ceiling of the ratio at equal matmul speed: {ceiling:.2f}x ({ours} doing nothing but "
          f"its matmuls)")
