"""Host-process settings for CPU training: glibc malloc tuned so a step's tensors reuse memory,
and the notes shown when the chosen precision is the slow one on this machine: on a CPU, half
precision without fast matrix multiplications, or fp32 where bf16 ones are markedly faster
(measured in `moelab.hardware`); on a CUDA GPU, fp32, which leaves the tensor cores idle.

A training step allocates and frees the same large activation and gradient buffers every step.
glibc's defaults hand some of that memory back to the kernel between steps (heap trimming, and
mmap for chunks above a threshold that adapts only after the first frees), so the next step
touches fresh pages and pays a page fault per 4 KiB. On the exp3 preset in bf16 on a 2-core CPU
that was 30-35K faults and 65-95 ms of kernel time per ~1 s step; with the settings below, under
500 faults and 2-10 ms (peak resident memory 1.21-1.22 -> 1.30-1.32 GB). They only keep freed
memory in the process for reuse: results are bit-identical.

Nothing happens off glibc (macOS, musl), when the user chose an allocator (LD_PRELOAD of jemalloc,
tcmalloc or mimalloc) or set malloc's own knobs in the environment, which win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from moelab.errors import first_line
from moelab.hardware import FAST_HALF_FACTOR, SLOW_HALF_FACTOR, cpu_matmul_slowdown

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: chunks below it come from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top is returned to the kernel only above this
TOP_PAD = 64 << 20  # grow the heap in steps of at least this (untouched pages cost no memory)

_USER_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_applied: bool | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Tune glibc malloc for a training process (see the module docstring); True when applied.
    Process-wide and idempotent."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    preload = os.environ.get("LD_PRELOAD", "")
    if any(k in os.environ for k in _USER_ENV) or any(a in preload for a in _OTHER_ALLOCATORS):
        return False
    libc = _glibc()
    if libc is None:
        return False
    _applied = all(libc.mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    return _applied


def half_precision_note(precision: str, slowdown: float, fix: str = "train.precision=fp32") -> str | None:
    """The line to show when `precision` (bf16/fp16) runs its matmuls `slowdown` times slower
    than fp32 on this CPU, or None when it is not markedly slower; `fix` is the setting to use."""
    if slowdown < SLOW_HALF_FACTOR:
        return None
    return (f"note: {precision} matrix multiplications run {slowdown:.0f}x slower than fp32 on this CPU "
            f"(no native {precision} support); {fix} will run faster here")


def bf16_speedup_note(slowdown: float, fix: str = "train.precision=bf16") -> str | None:
    """The line to show an fp32 run when bf16 matmuls take `slowdown` (< 1) times as long as fp32
    ones on this CPU, or None when bf16 is not markedly faster; `fix` is the setting to use."""
    if slowdown * FAST_HALF_FACTOR > 1:
        return None
    return (f"note: bf16 matrix multiplications run {1 / slowdown:.1f}x faster than fp32 on this CPU "
            f"(native bf16); {fix} (autocast, weights stay fp32) will run faster here")


def tensor_core_note(capability: tuple[int, int], setting: str = "train.precision") -> str | None:
    """The line to show an fp32 run on a CUDA GPU of this compute capability: torch multiplies
    fp32 matrices on the plain fp32 units (TF32 is off by default), an order of magnitude below
    the tensor cores' half-precision rate on Ampere and later (H100: 67 against 989 TFLOP/s).
    bf16 from Ampere (8.0) on, fp16 (with its gradient scaler) on Volta and Turing; None before."""
    if capability >= (8, 0):
        fix = f"{setting}=bf16 (autocast, weights stay fp32)"
    elif capability >= (7, 0):
        fix = f"{setting}=fp16 (autocast with a gradient scaler, weights stay fp32)"
    else:
        return None
    return (f"note: fp32 matrix multiplications on this GPU (compute capability {capability[0]}.{capability[1]}) "
            f"do not use its tensor cores; {fix} runs them there, typically several times faster")


def precision_note(device: torch.device, precision: str, dtype: torch.dtype | None,
                   fix: str = "train.precision=fp32", faster: str | None = None) -> str | None:
    """The note for a run on `device` in `precision` (autocast `dtype`, None for fp32), or None.
    On CPU, measured: `half_precision_note` for half precision; for fp32, with `faster` (the
    precision setting to suggest, e.g. "train.precision") given, `bf16_speedup_note`. On CUDA,
    an fp32 run given `faster` gets `tensor_core_note`; half precision is native there."""
    if device.type == "cuda":
        if dtype is None and faster:
            return tensor_core_note(torch.cuda.get_device_capability(device), faster)
        return None
    if device.type != "cpu":
        return None
    if dtype is None:
        return bf16_speedup_note(cpu_matmul_slowdown(torch.bfloat16), f"{faster}=bf16") if faster else None
    return half_precision_note(precision, cpu_matmul_slowdown(dtype), fix)


def fit_torch_threads(requested: int = 0, setting: str = "train.threads") -> str | None:
    """Set torch's intra-op threads to `requested` (0: torch's own default), at most the cores this
    process may use (`cores`: its affinity and its cgroup's CPU quota); the note to print where that
    changed the number, else None. More threads than that only take turns (tiny preset: 150x slower
    at 16 threads on 2 cores; 1.4x slower at 2 threads under a 1-CPU quota, this machine)."""
    from moelab.cgroups import cpu_quota
    from moelab.data.parallel import affinity_cores, cores

    usable, default = cores(), torch.get_num_threads()
    want = requested or default
    torch.set_num_threads(min(want, usable))
    if want <= usable:
        return None
    quota = cpu_quota() if usable < affinity_cores() else None  # the quota, not the affinity, binds
    why = f" (its cgroup's CPU quota is {quota:g} CPU{'s' if quota != 1 else ''}, as docker --cpus or a " \
        "Kubernetes CPU limit sets)" if quota is not None else ""
    cores_ = f"{usable} CPU core{'s' if usable > 1 else ''}"
    if requested:
        return (f"note: {setting}={requested}: this process may use {cores_}{why}; running {usable} "
                f"thread{'s' if usable > 1 else ''} (more would only contend for them)")
    return (f"note: this process may use {cores_}{why}; torch would start {default} threads: running {usable} "
            "(more would only contend for them)")


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile's default backend (inductor) cannot build kernels for `device` on this
    machine, or None. Checked when the run is set up: otherwise the first update fails after data
    preparation with an inductor traceback. A torch without these helpers is not second-guessed."""
    try:
        if device.type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        elif device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                return "torch.compile on CUDA needs triton (pip install triton)"
    except (ImportError, AttributeError):
        return None
    except Exception as exc:  # noqa: BLE001 - InvalidCxxCompiler and the like
        detail = first_line(exc)
        return f"torch.compile on CPU needs a working C++ compiler such as g++ or clang ({detail})"
    return None
