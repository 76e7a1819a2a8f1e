"""Run-directory files that other processes read (summary, metrics history, reports) are replaced
whole or not at all."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moelab.files import remove_stale_temps, temp_beside, write_atomic
from moelab.train.rundir import MetricsLog, read_metrics


def test_a_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "summary.json"
    write_atomic(path, '{"val_loss": 4.5}')
    with pytest.raises(UnicodeEncodeError):  # fails after much of the text is already out
        write_atomic(path, '{"val_loss": ' + "1" * 100_000 + "\ud800}")
    assert path.read_text() == '{"val_loss": 4.5}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombies are told apart through /proc (Linux)")
def test_a_killed_writers_temp_goes_even_while_its_process_is_an_unreaped_zombie(tmp_path):
    """A killed process that nobody has reaped (a container whose init does not reap) still answers
    signal 0: its temporary folder, possibly a copy of a whole corpus, was kept for good as if it
    still ran. A running process's stays."""
    target = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ours = temp_beside(target)
        theirs = ours.with_name(ours.name.rsplit("-", 1)[0] + f"-{child.pid}")
        theirs.mkdir()
        (theirs / ".text").write_text("spilled corpus")
        assert remove_stale_temps(target) == [] and theirs.is_dir()  # running
        child.kill()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert remove_stale_temps(target) == [theirs] and not theirs.exists()  # killed, not yet reaped
    finally:
        child.kill()
        child.wait()


def test_resumed_metrics_keep_the_records_up_to_the_step_and_drop_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write({"step": step, "split": "train", "loss": 1.0 / step})
    log.close()
    with path.open("a") as fh:
        fh.write('{"step": 4, "split": "tr')
    MetricsLog(path, keep_until_step=2).close()
    assert read_metrics(path) == [{"step": 1, "split": "train", "loss": 1.0},
                                  {"step": 2, "split": "train", "loss": 0.5}]
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 2


def test_git_sha_is_moelabs_own_commit_marked_dirty_when_it_was_changed(tmp_path):
    """The SHA a run records must reproduce it: one of a changed checkout says so, and a copy of
    moelab installed inside some other repository (a virtual environment in a project) records
    nothing rather than that project's commit."""
    import shutil

    from moelab.train.rundir import git_sha

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path / "moelab_src"
    (root / "moelab").mkdir(parents=True)
    (root / "moelab" / "x.py").write_text("a = 1\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "x")
    sha = git("rev-parse", "HEAD")
    assert git_sha(root) == sha
    (root / "notes.txt").write_text("untracked files do not change the code that ran\n")
    assert git_sha(root) == sha
    (root / "moelab" / "x.py").write_text("a = 2\n")
    assert git_sha(root) == sha + "-dirty"
    assert git_sha(root / "moelab") is None  # inside the repository, but not its top
