"""The data pipeline's two shared helpers: cut a list into runs of about a given size, and map a
function over a list on threads, in order, a group of items per task.

Threads suit the work here: tiktoken's encoder, numpy's array work and file reads release the GIL.
`ThreadPoolExecutor.map` has no `chunksize` for threads, and one future per small item costs more
in locking than the item's own work, so items go to the pool in groups.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

from moelab.cgroups import cpu_quota

T = TypeVar("T")
R = TypeVar("R")


def cores() -> int:
    """CPU cores this process may use: those it may run on (`affinity_cores`), and at most as many
    as its cgroup's CPU quota pays for, rounded down (a partial CPU's time is not a thread's)."""
    n, quota = affinity_cores(), cpu_quota()
    return min(n, max(1, int(quota))) if quota else n


def affinity_cores() -> int:
    """CPU cores this process may run on (its affinity mask), whatever time its cgroup grants."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
