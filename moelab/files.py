"""Outputs written whole or not at all: a file replaced atomically, a folder built in a temporary
folder beside its target and renamed into place, and the clean-up of the temporary folders that
killed processes left behind (a prepare's can hold a copy of the whole corpus)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path


def temp_beside(target: Path) -> Path:
    """`.tmp-NAME-HOST-PID` beside `target`: on the same file system (so the rename is atomic), and
    named so that `remove_stale_temps` can tell whether its maker still runs."""
    return target.parent / f".tmp-{target.name}-{_host()}-{os.getpid()}"


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the `temp_beside(target)` folders or files of processes on this machine that no longer
    run (killed mid-write). Another machine's, on a shared file system, are left alone: whether
    those still run cannot be known from here. Returns what was removed."""
    removed = []
    prefix = f".tmp-{target.name}-{_host()}-"
    for p in target.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix):]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextmanager
def staged_folder(target: str | Path, replace: bool = False):
    """Build the folder `target` in a temporary folder beside it (yielded), renamed into place when
    the block ends without error: `target` must then be absent or empty, or, with `replace`, it is
    removed first (the caller has checked that it may be). On an error the temporary folder goes,
    with the parent folders this call created: nothing is left behind, not a folder half written."""
    target = Path(target)
    remove_stale_temps(target)
    made = [p for p in target.parents if not p.exists()]  # deepest first
    tmp = temp_beside(target)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if replace and target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()  # only while still empty
            except OSError:
                break
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: a kill, a full disk or an unencodable character
    mid-write leaves the previous file (or none), never a cut one that the next resume, report or
    reader would fail on. A temporary file beside it, synced, then renamed over it."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = temp_beside(path)
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # no cheap, safe test: keep it
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether `pid` has ended but its parent has not reaped it yet. Signal 0 still finds such a
    process, and in a container whose first process does not reap orphans (docker without --init)
    a killed prepare stays so for good, its temporary folder never cleaned. Linux only (/proc);
    elsewhere False, as before."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] in ("Z", "X")  # the state follows "(command) "
