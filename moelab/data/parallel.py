"""The data pipeline's two shared helpers: cut a list into runs of about a given size, and map a
function over a list on threads, in order, a group of items per task.

Threads suit the work here: tiktoken's encoder, numpy's array work and file reads release the GIL.
`ThreadPoolExecutor.map` has no `chunksize` for threads, and one future per small item costs more
in locking than the item's own work, so items go to the pool in groups.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@functools.lru_cache(maxsize=1)
def cores() -> int:
    """CPU cores this process may use: those it may run on (affinity), and at most as many as its
    cgroup's CPU quota pays for, rounded down (a partial CPU's time is not a thread's)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return min(n, max(1, int(quota))) if quota else n


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time per period that this process's cgroups grant it, the smallest along its
    cgroup's path (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us); None where none is set or
    there are no cgroups. `docker run --cpus N` and a Kubernetes CPU limit are such a quota: neither
    os.cpu_count() nor the affinity mask shows it, so torch starts a thread per host core, which the
    kernel then stops for most of each period (several times slower than N threads)."""
    try:
        groups = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in mounts:
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        fstype, options = fields[sep + 1], fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype == "cgroup2":
            path, read = next((g[2] for g in groups if len(g) == 3 and g[0] == "0" and not g[1]), None), _v2_quota
        elif fstype == "cgroup" and "cpu" in options:
            path, read = next((g[2] for g in groups if len(g) == 3 and "cpu" in g[1].split(",")), None), _v1_quota
        else:
            continue
        if path is None:
            continue
        rel = os.path.relpath(path, fields[3])  # the process's group, below this mount's root
        if rel.startswith(".."):
            continue
        top = Path(fields[4])
        folder = Path(os.path.normpath(top / rel))
        while True:
            quota = read(folder)
            if quota:
                quotas.append(quota)
            if folder == top or top not in folder.parents:
                break
            folder = folder.parent
    return min(quotas) if quotas else None


def _v2_quota(folder: Path) -> float | None:
    try:
        limit, period = (folder / "cpu.max").read_text().split()[:2]
        return int(limit) / int(period) if limit != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        limit = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return limit / period if limit > 0 and period > 0 else None  # -1: no quota


def batches(items: Sequence[T], budget: int, size: Callable[[T], int] = len) -> Iterator[Sequence[T]]:
    """Consecutive runs of `items` whose sizes add up to about `budget` (each run ends with the item
    that reaches it; an item larger than `budget` is a run of its own)."""
    start, total = 0, 0
    for i, item in enumerate(items):
        total += size(item)
        if total >= budget:
            yield items[start:i + 1]
            start, total = i + 1, 0
    if start < len(items):
        yield items[start:]


def thread_map(fn: Callable[[T], R], items: Sequence[T], threads: int = 0, tasks_per_thread: int = 16) -> list[R]:
    """[fn(x) for x in items] on `threads` threads (0: every core), in order."""
    threads = threads or cores()
    if threads == 1 or len(items) < 2:
        return [fn(x) for x in items]
    step = max(1, len(items) // (tasks_per_thread * threads))
    groups = [items[i:i + step] for i in range(0, len(items), step)]
    with ThreadPoolExecutor(threads) as pool:
        return [r for part in pool.map(lambda g: [fn(x) for x in g], groups) for r in part]
