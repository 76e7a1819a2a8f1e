"""Shared by the benchmarks: timing with warm-up and device synchronisation."""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


ROUND_BUDGET_S = 10.0  # per contender and round: enough calls to average out, few for slow ones


class Timings(dict):
    """Best seconds per call of each contender (the dict), and each round's seconds per call
    (`rounds`), from which `ratio_range` gives the spread of a ratio over the rounds."""

    rounds: dict[str, list[float]]

    def ratio_range(self, ours: str, theirs: str) -> tuple[float, float]:
        """Lowest and highest of theirs / ours over the rounds, each round's two timings taken
        back to back: how far the host's noise moves the ratio."""
        per_round = [t / o for o, t in zip(self.rounds[ours], self.rounds[theirs])]
        return min(per_round), max(per_round)


def compare(fns: dict, iters: int, rounds: int = 3, warmup: int = 2) -> Timings:
    """Best seconds per call of each function, timed in interleaved rounds (a, b, c, a, b, c, ...)
    so that a slow spell on a shared machine hits every contender alike instead of whichever ran
    during it. Each round times `iters` calls of a function, or as many as fit in ROUND_BUDGET_S
    (at least one) when its second call (the first may compile) says that `iters` would take
    longer: a 1 s training step is still averaged over ~10 calls, a 15 s one is timed once per
    round and not warmed up further."""
    calls = {}
    for name, fn in fns.items():
        fn()  # the first call may compile (torch.compile, oneDNN kernels): not a call's cost
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        calls[name] = max(1, min(iters, int(ROUND_BUDGET_S / (time.perf_counter() - t))))
        for _ in range(warmup - 1 if calls[name] > 1 else 0):  # not for those timed once a round
            fn()
        _sync()
    out = Timings({name: float("inf") for name in fns})
    out.rounds = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            _sync()
            out.rounds[name].append((time.perf_counter() - t) / calls[name])
            out[name] = min(out[name], out.rounds[name][-1])
    return out


SAME_INPUT_HELP = ("time every call on one input, as these benchmarks did before: the routing, and so the "
                   "experts' row counts, then repeat from call to call, which a real run's new batches do "
                   "not, and favours kernels built per shape (oneDNN's bf16 matmuls on CPU)")


def add_host_settings(ap) -> None:
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="apply moelab train's CPU malloc settings (train.keep_freed_memory) to this "
                         "process, so both sides run with them")
    ap.add_argument("--fast-fp32-matmul", action="store_true",
                    help="fp32 products through oneDNN where moelab train would switch to it "
                         "(train.fast_fp32_matmul; in bf16 runs too, for the fp32 attention scores), for "
                         "this whole process, so both sides run with it")


_HOST = contextlib.ExitStack()  # settings kept until the process ends


def apply_host_settings(args) -> None:
    if args.keep_freed_memory:
        from moelab.train.host import keep_freed_memory

        print(f"malloc settings of moelab train: {'applied' if keep_freed_memory() else 'not applicable here'}")
    if args.fast_fp32_matmul:
        from moelab.hardware import fast_fp32_matmuls

        path, speedup = _HOST.enter_context(fast_fp32_matmuls("auto"))
        print("fp32 products: " + (f"through oneDNN ({speedup:.1f}x the default BLAS here)" if path == "onednn"
                                   else "on the default BLAS (oneDNN not faster or not exact here)"))


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm")


def matmul_time(fn, iters: int = 5) -> tuple[float, float, float]:
    """(seconds per call, of which in matrix multiplications, their FLOPs per call) from
    torch.profiler's CPU self times: what a contender spends outside its GEMMs is what a faster
    implementation can save. FLOPs count mm/bmm/addmm only (not attention kernels): a lower bound."""
    from torch.profiler import profile

    fn()
    with profile(with_flops=True) as prof:
        for _ in range(iters):
            fn()
        _sync()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = [e for e in events if e.key in MATMUL_OPS]
    return (total / iters / 1e6, sum(e.self_cpu_time_total for e in mm) / iters / 1e6,
            sum(e.flops or 0 for e in mm) / iters)


def peak_matmul_rate(dtype: torch.dtype) -> tuple[float, int]:
    """(FLOP/s, n) of this machine's fastest square (n x n) product in `dtype`, n doubled from 256
    while a product takes under 0.2 s, up to 4096; best of five: about the GEMM speed that no
    implementation's matrix multiplications beat on this machine with these threads."""
    best, n = (0.0, 0), 256
    while n <= 4096:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        t_best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            t_best = min(t_best, time.perf_counter() - t)
        best = max(best, (2 * n ** 3 / t_best, n))
        if t_best > 0.2:
            break
        n *= 2
    return best


def print_matmul_split(steps: dict, seconds: dict, ours: str, theirs: str, iters: int = 5,
                       dtype: torch.dtype = torch.float32) -> None:
    """Print each side's matmul share of a step (profiled) applied to its best timed step, and two
    ceilings of the ratio: at equal matmul speed (both sides run the same GEMMs: same shapes, same
    BLAS, so a ratio above theirs_total / ours_matmul would need faster matrix multiplications,
    not less overhead), and at the fastest GEMM rate seen on this machine (a large square product's,
    or either side's own): moelab's matmul FLOPs at that speed and nothing else, which no
    implementation doing the same products beats."""
    print("\n  profiled (torch.profiler, CPU self time), scaled to the best timed step:")
    share, flops, rates = {}, {}, {}
    for name in (ours, theirs):
        total, mm, flops[name] = matmul_time(steps[name], iters)
        share[name] = mm / total
        rates[name] = flops[name] / (seconds[name] * share[name]) if mm else 0.0
        print(f"  {name:<44}matmuls {share[name]:6.1%}: {seconds[name] * share[name] * 1e3:8.1f} ms, "
              f"rest {seconds[name] * (1 - share[name]) * 1e3:8.1f} ms, {flops[name] / 1e9:6.2f} GFLOP "
              f"at {rates[name] / 1e9:5.1f} GFLOP/s")
    ceiling = seconds[theirs] / (seconds[ours] * share[ours])
    print(f"  ceiling of the ratio at equal matmul speed: {ceiling:.2f}x ({ours} doing nothing but "
          f"its matmuls)")
    square, n = peak_matmul_rate(dtype)
    peak = max(square, *rates.values())
    print(f"  fastest GEMM rate seen: {peak / 1e9:.1f} GFLOP/s (a {n}x{n} {dtype} product: "
          f"{square / 1e9:.1f}; {torch.get_num_threads()} threads)")
    print(f"  ceiling at that rate: {seconds[theirs] / (flops[ours] / peak):.2f}x ({ours}'s "
          f"{flops[ours] / 1e9:.2f} GFLOP of matmuls at that rate and nothing else: no implementation "
          f"doing these products beats it)")


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def peak_above_now(fn) -> tuple[int, float]:
    """(peak RSS during fn() minus RSS before it, seconds). Memory an earlier contender freed but
    malloc kept is handed back first (glibc), or the second would grow into it unseen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - t
        done.set()
        watcher.join()
    return max(peak[0], rss()) - base, seconds
