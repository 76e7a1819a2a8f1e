"""The training process keeps freed memory for reuse (glibc malloc tuning), measured as page faults.

Each case runs in a fresh interpreter (malloc settings are process-wide and cannot be undone):
set up a CPU run, then allocate, touch and free four 24 MiB blocks in a loop through libc itself
(below glibc's largest mmap threshold, above its default heap top padding).
glibc's defaults hand that memory back to the kernel each time (every page faults again); the
tuned process reuses it.
"""

import os
import subprocess
import sys

import pytest

from moelab.train.host import _USER_ENV, _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")

MIB, BLOCKS = 24, 4
PAGES = MIB * 2**20 // 4096 * BLOCKS  # pages touched per round

CHURN = f"""
import ctypes, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = {MIB} << 20
def churn():
    blocks = [libc.malloc(n) for _ in range({BLOCKS})]
    for p in blocks:
        libc.memset(p, 1, n)
    for p in blocks:
        libc.free(p)
churn(); churn()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    churn()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5)
"""


def _faults(setup: str, env: dict | None = None) -> float:
    base = {k: v for k, v in os.environ.items() if k not in _USER_ENV and k != "LD_PRELOAD"}
    res = subprocess.run([sys.executable, "-c", setup + CHURN], capture_output=True, text=True,
                         env={**base, **(env or {})})
    assert res.returncode == 0, res.stderr
    return float(res.stdout.strip().splitlines()[-1])


def _setup_run(prepared, tmp_path, flag: str) -> str:
    return (f"from moelab.config import build_config\nfrom moelab.train.loop import setup\n"
            f"setup(build_config('test', None, ['data.path={prepared}', 'train.device=cpu', "
            f"'train.keep_freed_memory={flag}']), out={str(tmp_path / flag)!r})\n")


def test_cpu_run_reuses_freed_memory_and_the_switch_turns_it_off(prepared, tmp_path):
    on = _faults(_setup_run(prepared, tmp_path, "true"))
    off = _faults(_setup_run(prepared, tmp_path, "false"))
    assert off > PAGES / 2, f"glibc defaults should fault on reused blocks here ({off} per round)"
    assert on < PAGES / 50, f"tuned process still faults {on} times per round of {PAGES} pages"


def test_the_users_own_malloc_settings_win():
    code = "from moelab.train.host import keep_freed_memory\nassert not keep_freed_memory()\n"
    faults = _faults(code, {"MALLOC_TRIM_THRESHOLD_": "131072"})  # glibc's default, chosen explicitly
    assert faults > PAGES / 2


def test_a_cpu_evaluation_reuses_freed_memory_unless_its_run_turned_that_off(trained, tmp_path):
    """`load_target` (eval, generate, routing) tunes malloc as training does, and keeps a run's
    train.keep_freed_memory=false."""
    import shutil

    load = "from moelab.eval.target import load_target\nload_target({!r}, 'cpu')\n"
    on = _faults(load.format(str(trained / "run")))
    off_run = tmp_path / "run"
    shutil.copytree(trained / "run" / "tokenizer", off_run / "tokenizer")
    ckpt = sorted((trained / "run" / "checkpoints").iterdir())[-1]
    shutil.copytree(ckpt, off_run / "checkpoints" / ckpt.name)
    config = off_run / "checkpoints" / ckpt.name / "config.yaml"
    text = config.read_text()
    assert "keep_freed_memory: true" in text
    config.write_text(text.replace("keep_freed_memory: true", "keep_freed_memory: false"))
    off = _faults(load.format(str(off_run)))
    assert off > PAGES / 2, f"glibc defaults should fault on reused blocks here ({off} per round)"
    assert on < PAGES / 50, f"tuned process still faults {on} times per round of {PAGES} pages"
