"""Run directories: choosing one without clobbering, recording provenance, the metrics log."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from moelab.errors import UserError
from moelab.files import write_atomic


def new_run_dir(out: str | None, preset: str, resumable: bool = True) -> Path:
    """`out` must be new or empty; without `out`, runs/<preset>, runs/<preset>-2, ...
    `resumable`: the command has --resume (train), so the error can point to it."""
    if out:
        p = Path(out).expanduser()
        if p.exists() and (not p.is_dir() or has_entries(p)):
            if resumable and not (p / "config.yaml").is_file():  # a folder of other files: nothing to continue
                raise UserError(f"{p} is not empty and holds no run; a new run would write among its files: "
                                "choose another --out")
            hint = "pass --resume auto to continue it, or choose" if resumable else "choose"
            raise UserError(f"run directory {p} is not empty; {hint} another --out")
        return p
    base = Path("runs") / preset
    p, i = base, 2
    while p.exists():
        p, i = base.with_name(f"{preset}-{i}"), i + 1
    return p


class RunLock:
    """An advisory lock on a run directory, held by the one process that trains it, so that a
    second `moelab train --resume auto` (a requeued job, another terminal) cannot interleave its
    checkpoints and metrics with the first. `flock` on RUN/.moelab.lock: the kernel releases it when
    the holder exits, however it dies, so no stale lock survives a kill. POSIX only (elsewhere: no
    lock)."""

    NAME = ".moelab.lock"

    def __init__(self, run_dir: Path):
        self.path, self._fh = run_dir / self.NAME, None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # Windows
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: another process holds it
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise UserError(f"{self.path.parent} is being trained by another process"
                            + (f" (pid {holder})" if holder.isdigit() else "")
                            + "; wait for it to finish or stop it, or choose another --out") from None
        except OSError:  # a file system without locks (ENOLCK on some network mounts): train unlocked
            fh.close()
            return self
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the lock
            self._fh = None


def has_entries(folder: Path) -> bool:
    """Whether `folder` holds anything besides a run lock (all a run killed at its start may leave)."""
    return any(p.name != RunLock.NAME for p in folder.iterdir())


def git_sha(root: Path | None = None) -> str | None:
    """The commit of the moelab source a process runs, with "-dirty" when tracked files differ from
    it (the commit alone would not reproduce the run); None for an installed copy, whose version
    says what it is. Only a checkout whose top is moelab's own: a copy installed into a virtual
    environment inside some other repository would otherwise report that repository's commit."""
    root = root or Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None

    def git(*args) -> str | None:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        sha = git("rev-parse", "HEAD")
        if not sha:
            return None
        return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    import tokenizers
    import torch

    import moelab

    return {"command": sys.argv, "cwd": os.getcwd(), "git_sha": git_sha(), "moelab": moelab.__version__,
            "python": platform.python_version(), "torch": torch.__version__,
            "tokenizers": tokenizers.__version__, "platform": platform.platform(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _metric_lines(path: Path):
    """(line, record) for each record of a metrics.jsonl. A line that is not a JSON object is
    passed over: the last one while the run is writing it (`moelab report` or `routing` during
    training), or one cut short when a run was killed mid-write."""
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield ln, rec


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in order (see `_metric_lines`)."""
    return [rec for _, rec in _metric_lines(path)]


def metrics_until(path: Path, step: int) -> str:
    """The records of a metrics.jsonl up to and including `step`, as the file's text; a line cut
    short by a kill is dropped, so the resumed run does not append to it."""
    return "".join(ln + "\n" for ln, rec in _metric_lines(path) if rec.get("step", 0) <= step)


class MetricsLog:
    """Append-only JSON lines. On resume, records after the resumed step are dropped first, so
    the file reads as one uninterrupted run."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        if keep_until_step is not None and path.is_file():
            write_atomic(path, metrics_until(path, keep_until_step))  # a kill here must not cut the history
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
