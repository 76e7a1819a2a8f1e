"""What this machine's matrix multiplications are fast at, measured once per process.

Half precision is not faster everywhere. CUDA GPUs and CPUs with native bf16/fp16 matrix units
(AVX512-BF16, AMX, AVX512-FP16) multiply half-precision matrices faster than fp32. CPUs without
them (AVX2-only x86, e.g. AMD EPYC Zen 3) fall back to scalar code: measured 0.9 GFLOP/s in bf16
against 160 GFLOP/s in fp32 (torch 2.13, 2 cores). No flag reliably tells the two apart across
vendors and PyTorch builds, so a small product is timed in each dtype instead.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

# Half precision this many times slower than fp32 counts as "no native support" for the warning.
SLOW_HALF_FACTOR = 3.0
# bf16 this many times faster than fp32 is worth suggesting to an fp32 run (AVX512-BF16 on AMD
# Zen 4, 2 cores: a 256^3 product 1.7-1.8x faster, the default `moelab train` 1.7x more tokens/s).
FAST_HALF_FACTOR = 1.5


def cpu_matmul_slowdown(dtype: torch.dtype, n: int = 256, reps: int = 5) -> float:
    """How many times longer an (n x n) @ (n x n) product takes in `dtype` than in fp32 on this
    CPU: the best of `reps` each, the two dtypes interleaved so that a busy spell on a shared
    machine slows both. A few ms where half precision is native, ~0.2 s where it is not.
    Cached per fp32 path (`fast_fp32_matmuls` changes it): the answer does not change otherwise."""
    return _cpu_matmul_slowdown(dtype, n, reps, _fp32_precision())


@functools.cache
def _cpu_matmul_slowdown(dtype: torch.dtype, n: int, reps: int, _fp32_path: str) -> float:
    pairs = {dt: (torch.ones(n, n, dtype=dt), torch.ones(n, n, dtype=dt)) for dt in (dtype, torch.float32)}
    best = _best_times({dt: lambda a=a, b=b: a @ b for dt, (a, b) in pairs.items()}, reps)
    return best[dtype] / max(best[torch.float32], 1e-9)


def _best_times(calls: dict, reps: int) -> dict:
    """The best of `reps` timings of each call, the calls interleaved so that a busy spell on a
    shared machine slows them all; a first untimed round for kernel selection and page faults."""
    best = dict.fromkeys(calls, float("inf"))
    for i in range(reps + 1):
        for key, call in calls.items():
            t = time.perf_counter()
            call()
            if i:
                best[key] = min(best[key], time.perf_counter() - t)
    return best


def fast_bf16_matmuls(device: torch.device) -> bool:
    """Whether bf16 products beat fp32 on `device`: always on CUDA, measured on CPU."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_matmul_slowdown(torch.bfloat16) < 1.0


# fp32 products through oneDNN at least this many times faster than through torch's default CPU
# BLAS are worth switching to (AMD EPYC Zen 5, 2 cores, MKL 2024.2 against oneDNN 3.12: a
# 1024 x 256 x 256 product 1.9-2.2x; MKL runs narrower kernels on non-Intel CPUs). Far from the
# ratios seen either side, so a busy machine does not flip the choice.
FAST_FP32_FACTOR = 1.4
# ... and for micro-batches of at least this many token x model-width elements: smaller ones'
# products gain less than oneDNN's per-call overhead costs (whole fp32 steps, same machine: 512
# tokens x 64 wide 0.82x, x 128 1.03x, x 256 1.26x; 2048 tokens x 64 1.27x, x 128 1.30-1.60x).
FAST_FP32_MIN_WORK = 2048 * 64
_onednn_fp32 = False  # set inside `fast_fp32_matmuls` when it switched the path; read by attention


def _fp32_precision() -> str:
    return getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")


def _set_fp32_precision(value: str) -> None:
    torch.backends.mkldnn.matmul.fp32_precision = value


def exact_fp32(matmul, n: int = 256) -> bool:
    """Whether `matmul` (a, b) -> a @ b keeps fp32 inputs as fp32: on rows of 1 + u * 2^-12 against
    ones, rounding the inputs to bf16 (or tf32) drops every u and errs by ~n * 2^-13 (0.03 at n =
    256), while fp32 products err by ~1e-4. Checked for a product and a batched one with a transposed
    operand, the two forms moelab's layers and attention use."""
    g = torch.Generator().manual_seed(0)
    a = 1 + torch.rand(n, n, generator=g) * 2.0 ** -12
    b = torch.ones(n, n)
    ref = a.double() @ b.double()
    err = max((matmul(a, b).double() - ref).abs().max().item(),
              (matmul(a.expand(2, n, n), b.t().expand(2, n, n).transpose(1, 2)).double() - ref).abs().max().item())
    return err < 1e-3


@functools.cache
def onednn_fp32_speedup(shape: tuple[int, int, int] = (1024, 256, 256), reps: int = 5) -> float:
    """How many times faster an fp32 (m x k) @ (k x n) product (`shape`) runs through oneDNN
    (torch's `torch.backends.mkldnn.matmul.fp32_precision = "bf16"`) than through the default CPU
    BLAS here: the best of `reps` each, interleaved. 0.0 where that path would not compute in fp32
    (oneDNN may round fp32 inputs to bf16 where the CPU has AMX; checked with `exact_fp32`), or
    where this torch has no such switch. The switch is restored before returning."""
    if not torch.backends.mkldnn.is_available():
        return 0.0
    before = _fp32_precision()
    try:
        _set_fp32_precision("bf16")
    except (AttributeError, RuntimeError, ValueError):
        return 0.0
    try:
        if not exact_fp32(lambda x, y: x @ y):
            return 0.0
        m, k, n = shape
        a, b = torch.rand(m, k), torch.rand(k, n)

        def product(path: str):
            _set_fp32_precision(path)  # inside the timing: ~1 us against ~0.5 ms
            return a @ b

        best = _best_times({path: lambda path=path: product(path) for path in ("none", "bf16")}, reps)
        return best["none"] / max(best["bf16"], 1e-9)
    finally:
        _set_fp32_precision(before)


@contextlib.contextmanager
def fast_fp32_matmuls(mode: str = "auto"):
    """Within, fp32 products on CPU may go through oneDNN instead of the default BLAS. `mode`:
    "auto" switches where `onednn_fp32_speedup` finds that path exact to fp32 and at least
    FAST_FP32_FACTOR times faster; "onednn" wherever it is exact (a resumed run that used it: the
    same kernels, so the same numbers); "default" never. Switched, short fp32 attention takes
    explicit scores (`explicit_scores_cpu`), whose batched products gain the same way, and
    experts' row counts are bucketed as in bf16 (oneDNN builds a kernel per shape;
    `bucket_rows_here`). Yields (path, speedup): "onednn" with its measured speedup, or "default"
    with None. Left alone: a switch the user set (`set_float32_matmul_precision("medium")`
    selects bf16 there too). Restored on exit. Whole fp32 training steps, AMD Zen 5, 2 cores:
    tiny preset 1.60x, exp3 with MLA 1.76x."""
    global _onednn_fp32
    if mode == "default" or _fp32_precision() not in ("none", "ieee") or _onednn_fp32:
        yield "default", None
        return
    speedup = onednn_fp32_speedup()
    if speedup == 0.0 or (mode == "auto" and measured_fp32_path() == "default"):
        yield "default", None
        return
    before = _fp32_precision()
    _set_fp32_precision("bf16")
    _onednn_fp32 = True
    try:
        yield "onednn", speedup
    finally:
        _onednn_fp32 = False
        _set_fp32_precision(before)


def measured_fp32_path() -> str:
    """What "auto" chooses here: "onednn" where `onednn_fp32_speedup` finds that path exact and
    at least FAST_FP32_FACTOR times faster, else "default"."""
    return "onednn" if onednn_fp32_speedup() >= FAST_FP32_FACTOR else "default"


def fp32_mode_for(device: torch.device, tokens: int, width: int) -> str:
    """`fast_fp32_matmuls` mode for work of `tokens` x `width` activations per model call on
    `device`: "auto" (measure, switch where faster) on CPU from FAST_FP32_MIN_WORK up, else
    "default" (smaller products gain less than oneDNN's per-call overhead; GPUs are not concerned)."""
    return "auto" if device.type == "cpu" and tokens * width >= FAST_FP32_MIN_WORK else "default"


def onednn_fp32_active() -> bool:
    """Inside `fast_fp32_matmuls`, switched on."""
    return _onednn_fp32
