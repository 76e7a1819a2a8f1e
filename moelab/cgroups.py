"""What this process's cgroups allow it: CPU time (a quota) and memory (a limit). Containers and
job schedulers set these (`docker run --cpus N --memory M`, Kubernetes limits, Slurm, systemd),
and neither os.cpu_count() nor /proc/meminfo shows them. Both are read along the process's own
group path, up to the cgroup mount, in cgroup v2 and v1 alike: a container sees its group as the
root, but a scheduler's job on a host (Slurm: /slurm/uid_U/job_J/...) is nested deeper, under
limits on any level. Linux only; elsewhere, or where nothing is set, None."""

from __future__ import annotations

import os
from pathlib import Path


def _group_folders(v1_controller: str) -> list[tuple[str, list[Path]]]:
    """For each cgroup mount that holds `v1_controller` (a v1 hierarchy) or is the v2 one: its
    version ("v1"/"v2") and the folders from this process's group up to the mount, innermost first."""
    try:
        groups = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in mounts:
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        fstype, options = fields[sep + 1], fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype == "cgroup2":
            version, path = "v2", next((g[2] for g in groups if len(g) == 3 and g[0] == "0" and not g[1]), None)
        elif fstype == "cgroup" and v1_controller in options:
            version = "v1"
            path = next((g[2] for g in groups if len(g) == 3 and v1_controller in g[1].split(",")), None)
        else:
            continue
        if path is None:
            continue
        rel = os.path.relpath(path, fields[3])  # the process's group, below this mount's root
        if rel.startswith(".."):
            continue
        top = Path(fields[4])
        folder, chain = Path(os.path.normpath(top / rel)), []
        while True:
            chain.append(folder)
            if folder == top or top not in folder.parents:
                break
            folder = folder.parent
        found.append((version, chain))
    return found


def _read(folder: Path, name: str) -> str | None:
    try:
        return (folder / name).read_text().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def cpu_quota() -> float | None:
    """CPUs' worth of time per period this process's cgroups grant it: the smallest quota along its
    group path (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us). `docker run --cpus N` and a
    Kubernetes CPU limit are such a quota: torch, seeing the host's cores only, starts a thread per
    core, which the kernel then stops for most of each period (several times slower than N)."""
    quotas = []
    for version, chain in _group_folders("cpu"):
        for folder in chain:
            if version == "v2":
                limit, _, period = (_read(folder, "cpu.max") or "max").partition(" ")
                quota, period_ = _int(limit), _int(period)
            else:
                quota, period_ = _int(_read(folder, "cpu.cfs_quota_us")), _int(_read(folder, "cpu.cfs_period_us"))
            if quota and quota > 0 and period_ and period_ > 0:  # v1 -1, v2 "max": no quota
                quotas.append(quota / period_)
    return min(quotas) if quotas else None


def memory_headroom() -> int | None:
    """Bytes this process's cgroups let it still take: the smallest (limit - usage) along its group
    path (v2 memory.max / memory.current, v1 memory.limit_in_bytes / memory.usage_in_bytes). Past
    it the kernel's OOM killer ends the process, with no message of its own."""
    room = []
    for version, chain in _group_folders("memory"):
        for folder in chain:
            names = ("memory.max", "memory.current") if version == "v2" else \
                ("memory.limit_in_bytes", "memory.usage_in_bytes")
            limit, used = _int(_read(folder, names[0])), _int(_read(folder, names[1]))
            if limit is not None and used is not None and limit < 1 << 60:  # v1 "no limit": a huge number
                room.append(max(limit - used, 0))
    return min(room) if room else None
