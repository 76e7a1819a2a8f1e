"""What this machine's matrix multiplications are fast at, measured once per process.

Half precision is not faster everywhere. CUDA GPUs and CPUs with native bf16/fp16 matrix units
(AVX512-BF16, AMX, AVX512-FP16) multiply half-precision matrices faster than fp32. CPUs without
them (AVX2-only x86, e.g. AMD EPYC Zen 3) fall back to scalar code: measured 0.9 GFLOP/s in bf16
against 160 GFLOP/s in fp32 (torch 2.13, 2 cores). No flag reliably tells the two apart across
vendors and PyTorch builds, so a small product is timed in each dtype instead.
"""

from __future__ import annotations

import functools
import time

import torch

# Half precision this many times slower than fp32 counts as "no native support" for the warning.
SLOW_HALF_FACTOR = 3.0
# bf16 this many times faster than fp32 is worth suggesting to an fp32 run (AVX512-BF16 on AMD
# Zen 4, 2 cores: a 256^3 product 1.7-1.8x faster, the default `moelab train` 1.7x more tokens/s).
FAST_HALF_FACTOR = 1.5


@functools.cache
def cpu_matmul_slowdown(dtype: torch.dtype, n: int = 256, reps: int = 5) -> float:
    """How many times longer an (n x n) @ (n x n) product takes in `dtype` than in fp32 on this
    CPU: the best of `reps` each, the two dtypes interleaved so that a busy spell on a shared
    machine slows both. A few ms where half precision is native, ~0.2 s where it is not.
    Cached: the answer does not change within a process."""
    pairs = {dt: (torch.ones(n, n, dtype=dt), torch.ones(n, n, dtype=dt)) for dt in (dtype, torch.float32)}
    best = dict.fromkeys(pairs, float("inf"))
    for dt, (a, b) in pairs.items():
        a @ b  # first call: kernel selection, page faults
    for _ in range(reps):
        for dt, (a, b) in pairs.items():
            t = time.perf_counter()
            a @ b
            best[dt] = min(best[dt], time.perf_counter() - t)
    return best[dtype] / max(best[torch.float32], 1e-9)


def fast_bf16_matmuls(device: torch.device) -> bool:
    """Whether bf16 products beat fp32 on `device`: always on CUDA, measured on CPU."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_matmul_slowdown(torch.bfloat16) < 1.0
