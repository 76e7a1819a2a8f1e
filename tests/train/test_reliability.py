"""The loop's promises under faults (../shared/guide/reliability.md), each on the real CLI in a
child process: SIGKILL mid-run and mid-save, SIGTERM, injected NaN, loss spikes, out-of-memory,
pickled checkpoints. Faults are injected with MOELAB_FAULTS (see moelab/train/faults.py); kills
and SIGTERM are real signals."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from moelab import load_model
from moelab.train.checkpoint import list_checkpoints, load_trainer_state

# 2 layers, d=64, 4 experts top-2, seq 64, fp32, save every 10 (the reliability guide's model).
BASE = ["train.steps=40", "train.save_every=10", "train.eval_every=20", "train.log_every=1",
        "train.threads=1"]


def _moelab(*args, faults: str = "", timeout=300):
    env = dict(os.environ, MOELAB_FAULTS=faults)
    return subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _train(out, prepared, *extra, faults="", resume=False):
    args = ["train", "--preset", "test", "--out", str(out), f"data.path={prepared}", *BASE, *extra]
    if resume:
        args = ["train", "--resume", "auto", "--out", str(out), *extra]
    return _moelab(*args, faults=faults)


def _train_losses(run) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}


def _assert_same_weights(a, b):
    for (name, x), y in zip(load_model(a).state_dict().items(), load_model(b).state_dict().values()):
        assert torch.equal(x, y), name


def _assert_same_run(ref, run, steps=40):
    """Every one of the updates' losses bit-equal, and the final weights equal."""
    a, b = _train_losses(ref), _train_losses(run)
    assert sorted(b) == list(range(1, steps + 1))
    assert all(b[s] == a[s] for s in b), [(s, a[s], b[s]) for s in b if b[s] != a[s]]
    _assert_same_weights(ref, run)


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    res = _train(out, prepared)
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.slow
def test_sigkill_twice_then_resume_is_bit_identical(prepared, reference, tmp_path):
    run = tmp_path / "run"
    res = _train(run, prepared, faults="kill@27")
    assert res.returncode == -9  # really killed, mid-update 27; the last save was 20
    assert [c.name for c in list_checkpoints(run)] == ["step_0000010", "step_0000020"]
    with (run / "metrics.jsonl").open("a") as fh:  # as if killed while writing a record
        fh.write('{"step": 27, "split": "train", "lo')
    res = _train(run, prepared, faults="kill@33", resume=True)  # resumes at 20, dies again
    assert res.returncode == -9 and "resumed at step 20" in res.stderr
    res = _train(run, prepared, resume=True)
    assert res.returncode == 0 and "resumed at step 30" in res.stderr, res.stderr
    _assert_same_run(reference, run)
    a, b = (json.loads((r / "summary.json").read_text()) for r in (reference, run))
    assert a["expert_counts"] == b["expert_counts"] and a["val_loss"] == b["val_loss"]


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_the_previous_one(prepared, reference, tmp_path):
    """SIGKILL after each of the four files of the step-20 save: the step-10 checkpoint stays the
    newest complete one, the half-written directory is never picked, and resuming ends where the
    uninterrupted run does."""
    for n_files in (1, 2, 3, 4):
        run = tmp_path / f"run{n_files}"
        res = _train(run, prepared, faults=f"kill_save@20:{n_files}")
        assert res.returncode == -9
        assert [c.name for c in list_checkpoints(run)] == ["step_0000010"]
        assert any(p.name.startswith(".tmp-step_0000020") for p in (run / "checkpoints").iterdir())
    res = _train(tmp_path / "run2", prepared, resume=True)
    assert res.returncode == 0 and "resumed at step 10" in res.stderr, res.stderr
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "run2" / "checkpoints").iterdir())
    _assert_same_weights(reference, tmp_path / "run2")


def test_a_full_disk_at_a_save_is_one_line_and_the_run_resumes(prepared, reference, tmp_path):
    """RLIMIT_FSIZE fails every write past 256 KB (EFBIG), as a full disk or quota would; the model file
    is bigger. Before, safetensors' own exception type escaped as a traceback and the half-written
    checkpoint stayed on the full disk."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))

    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "moelab", "train", "--preset", "test", "--out", str(run),
                          f"data.path={prepared}", *BASE], capture_output=True, text=True, timeout=300,
                         preexec_fn=small_files)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("moelab: error: cannot write checkpoint step_0000010") and "too large" in last, last
    assert "earlier checkpoints are untouched: make room, then continue with --resume auto" in last, last
    assert list((run / "checkpoints").iterdir()) == []  # nothing half-written left taking the space
    res = _train(run, prepared, resume=True)
    assert res.returncode == 0, res.stderr
    _assert_same_run(reference, run)


@pytest.mark.slow
def test_sigterm_finishes_the_update_saves_and_exits_0(prepared, reference, tmp_path):
    run = tmp_path / "run"
    res = _train(run, prepared, faults="term@13")
    assert res.returncode == 0, res.stderr
    assert "stopped by SIGTERM after 13 updates" in res.stdout
    ckpts = list_checkpoints(run)
    assert ckpts[-1].name == "step_0000013" and load_trainer_state(ckpts[-1])["step"] == 13
    res = _train(run, prepared, resume=True)
    assert res.returncode == 0 and "resumed at step 13" in res.stderr, res.stderr
    _assert_same_run(reference, run)


@pytest.mark.slow
def test_bf16_cpu_run_resumes_bit_identically(prepared, tmp_path):
    """fp32 runs on a CPU with fast bf16 are told to try train.precision=bf16, so its resume must
    be exact too: autocast, the bucketed expert row blocks and Muon's Newton-Schulz dtype all come
    back the same after a SIGKILL."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    short = ["train.precision=bf16", "train.steps=16", "train.save_every=5", "train.eval_every=8"]  # bf16: 3x fp32
    res = _train(ref, prepared, *short)
    assert res.returncode == 0 and "cpu bf16" in res.stdout + res.stderr, res.stderr
    assert _train(run, prepared, *short, faults="kill@13").returncode == -9
    res = _train(run, prepared, resume=True)
    assert res.returncode == 0 and "resumed at step 10" in res.stderr, res.stderr
    _assert_same_run(ref, run, steps=16)


def test_a_run_on_onednn_fp32_products_resumes_on_them_bit_identically(prepared, tmp_path):
    """Where fp32 products run faster through oneDNN, a run wide enough uses that path: a resume
    takes the path its checkpoint records (not a new measurement, which a busy machine could
    tip), so every later update is bit-equal; one told train.fast_fp32_matmul=false says why it
    no longer is."""
    from moelab.hardware import onednn_fp32_speedup

    ref, run = tmp_path / "ref", tmp_path / "run"
    wide = ["model.d_model=128", "train.batch_size=16", "train.steps=12", "train.save_every=5", "train.eval_every=6"]
    res = _train(ref, prepared, *wide)
    assert res.returncode == 0, res.stderr
    path = "onednn" if "fp32 products through oneDNN" in res.stderr else "default"
    if onednn_fp32_speedup() == 0.0:  # oneDNN would round fp32 here (or is missing): never switched
        assert path == "default"
    assert load_trainer_state(list_checkpoints(ref)[-1])["fp32_matmul"] == path
    assert _train(run, prepared, *wide, faults="kill@8").returncode == -9
    res = _train(run, prepared, resume=True)
    assert res.returncode == 0 and "resumed at step 5" in res.stderr, res.stderr
    _assert_same_run(ref, run, steps=12)
    if path == "onednn":
        res = _moelab("train", "--resume", str(list_checkpoints(ref)[0]), "--out", str(tmp_path / "blas"),
                      "train.fast_fp32_matmul=false")
        assert res.returncode == 0 and "oneDNN, which train.fast_fp32_matmul=false turns off" in res.stderr, res.stderr
        assert "fp32 products through oneDNN" not in res.stderr
        # a checkpoint of the default BLAS resumes on it, though this machine would pick oneDNN
        old = tmp_path / "old" / "checkpoints" / "step_0000005"
        shutil.copytree(list_checkpoints(ref)[0], old)
        state = torch.load(old / "trainer_state.pt", weights_only=True)
        torch.save({**state, "fp32_matmul": "default"}, old / "trainer_state.pt")
        res = _moelab("train", "--resume", str(old), "--out", str(tmp_path / "again"))
        assert res.returncode == 0 and "fp32 products through oneDNN" not in res.stderr, res.stderr


def test_tensorboard_keeps_the_updates_before_a_kill_and_a_resume_logs_each_once(prepared, tmp_path):
    """TensorBoard after a SIGKILL (the kernel's out-of-memory killer, a preempted job) has every
    update logged before it, as metrics.jsonl has (each record is flushed): 1-12 here. After the
    resume (from step 10) it has each of 1-14 once, with metrics.jsonl's values: the redone 11-12
    replace the killed process's (purge_step), which TensorBoard would otherwise plot twice."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def logged(run):
        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/loss")]

    run = tmp_path / "run"
    args = ["train.steps=14", "train.tensorboard=true"]
    assert _train(run, prepared, *args, faults="kill@13").returncode == -9
    assert [step for step, _ in logged(run)] == list(range(1, 13))
    res = _train(run, prepared, resume=True)
    assert res.returncode == 0 and "resumed at step 10" in res.stderr, res.stderr
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in recs if r["split"] == "train"]
    assert [step for step, _ in train] == list(range(1, 15)) and logged(run) == train


def test_nan_update_is_skipped_and_counted(prepared, tmp_path):
    """NaN in the loss of update 12: the weights after it equal those after update 11."""
    args = ["train.steps=12", "train.save_every=11"]
    clean = tmp_path / "clean"
    assert _train(clean, prepared, *args).returncode == 0
    bad = tmp_path / "bad"
    res = _train(bad, prepared, *args, faults="nan@12")
    assert res.returncode == 0, res.stderr
    after_11 = load_model(list_checkpoints(clean)[0])
    assert list_checkpoints(clean)[0].name == "step_0000011"
    for (name, x), y in zip(after_11.state_dict().items(), load_model(bad).state_dict().values()):
        assert torch.equal(x, y), name
    summary = json.loads((bad / "summary.json").read_text())
    assert summary["skipped"]["nonfinite"] == 1 and summary["steps"] == 12
    records = [json.loads(ln) for ln in (bad / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["split"] == "train"][-1]
    assert last["step"] == 12 and last["skipped_nonfinite"] == 1 and last["loss"] is None
    assert "update 12: nonfinite" in res.stderr


def test_nan_with_raise_stops_without_saving_the_bad_update(prepared, reference, tmp_path):
    run = tmp_path / "run"
    res = _train(run, prepared, "train.steps=12", "train.nonfinite=raise", faults="nan@12")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "non-finite loss at update 12" in res.stderr.strip().splitlines()[-1]
    assert [c.name for c in list_checkpoints(run)] == ["step_0000010"]
    early = tmp_path / "early"  # stopped before its first save: --resume auto starts it again
    res = _train(early, prepared, "train.nonfinite=raise", faults="nan@3")
    assert res.returncode == 2 and not list_checkpoints(early) and (early / "config.yaml").is_file()
    res = _train(early, prepared, resume=True)
    assert res.returncode == 0 and "stopped before its first checkpoint: starting it again" in res.stderr
    assert "held no run" not in res.stderr
    _assert_same_run(reference, early)  # and the 3 records of the first attempt are gone


@pytest.mark.slow
def test_a_run_killed_while_preparing_its_data_starts_again_on_resume_auto(prepared, reference, tmp_path):
    """A job preempted before its first checkpoint, then requeued with the same `--resume auto`
    command, was refused ('not a run and not empty' or 'no complete checkpoint') and needed a hand
    to delete the folder. Now it starts again, and ends as an uninterrupted run does."""
    run = tmp_path / "run"
    assert _train(run, prepared, faults="kill_data@0").returncode == -9
    assert (run / "config.yaml").is_file() and not list_checkpoints(run)
    res = _train(run, prepared, resume=True)
    assert res.returncode == 0 and "starting it again from update 0" in res.stderr, res.stderr
    _assert_same_run(reference, run)


def test_loss_spike_is_skipped_and_counted(prepared, tmp_path):
    run = tmp_path / "run"
    res = _train(run, prepared, "train.steps=25", "train.spike_window=10", faults="spike@18")
    assert res.returncode == 0, res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped"] == {"nonfinite": 0, "spike": 1, "overflow": 0}
    assert "update 18: spike loss/gradient, update skipped (skipped so far: spike 1)" in res.stderr


def test_out_of_memory_names_the_micro_batch_to_try(prepared, tmp_path):
    res = _train(tmp_path / "run", prepared, faults="oom@3")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "out of memory at update 3" in line and "train.batch_size=4 train.grad_accum=2" in line


def test_pickled_checkpoint_is_refused_and_its_code_never_runs(prepared, tmp_path):
    import pickle

    run = tmp_path / "run"
    assert _train(run, prepared, "train.steps=10").returncode == 0
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = list_checkpoints(run)[-1] / "trainer_state.pt"
    with open(state, "wb") as fh:
        pickle.dump({"step": Payload()}, fh)
    res = _train(run, prepared, "train.steps=20", resume=True)
    assert res.returncode == 2 and "refusing to load" in res.stderr and "Traceback" not in res.stderr
    assert "weights_only" not in res.stderr  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_with_the_one_before_it_which_resumes(prepared, reference, tmp_path):
    """A model file cut short (a partial copy, a disk error) after a kill: one line naming the file and
    the checkpoint before it; resuming from that one ends where the uninterrupted run does."""
    run = tmp_path / "run"
    assert _train(run, prepared, faults="kill@27").returncode == -9
    newest, before = list_checkpoints(run)[-1], list_checkpoints(run)[-2]
    model_file = newest / "model.safetensors"
    os.truncate(model_file, model_file.stat().st_size // 2)
    res = _train(run, prepared, resume=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    # safetensors' own words differ by release ("incomplete metadata, file not fully covered" in
    # 0.8, "MetadataIncompleteBuffer" in 0.4)
    assert re.fullmatch(
        re.escape(f"moelab: error: cannot load {model_file}: the file is damaged (Error while deserializing header: ")
        + r"[^()]+" + re.escape(f"); the checkpoint before it: {before}"),
        res.stderr.strip().splitlines()[-1]), res.stderr
    res = _moelab("eval", str(run), "--windows", "2")  # every reader of the weights says the same
    assert res.returncode == 2 and f"cannot load {model_file}: the file is damaged" in res.stderr, res.stderr
    (newest / "trainer_state.pt").write_bytes(b"not a torch file")
    res = _train(run, prepared, resume=True)
    assert res.returncode == 2 and f"refusing to load {newest / 'trainer_state.pt'}" in res.stderr
    res = _moelab("train", "--resume", str(before))  # rewinds the run to it, the damaged one set aside
    assert res.returncode == 0 and "resumed at step 10" in res.stderr, res.stderr
    _assert_same_run(reference, run)


def test_changed_prepared_data_is_refused_on_resume(prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    run = tmp_path / "run"
    assert _moelab("train", "--preset", "test", "--out", str(run), f"data.path={data}", *BASE,
                   "train.steps=10").returncode == 0
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * len(manifest["fingerprint"])  # as if re-prepared from edited files
    (data / "manifest.json").write_text(json.dumps(manifest))
    res = _train(run, data, "train.steps=20", resume=True)
    assert res.returncode == 2 and "data changed since checkpoint" in res.stderr, res.stderr


def _file_bytes(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_rewind_in_place_sets_the_later_checkpoints_aside(prepared, reference, tmp_path):
    """`--resume run/checkpoints/step_0000020` in a run that went on to 40 abandons updates 21-40.
    Their checkpoints must not stay among the new ones: with train.keep_last=1 pruning kept the
    old step 40 and deleted each new save, and after a kill `--resume auto` picked the abandoned
    step 40. They move, unchanged, to rewound-from-step_0000020/; the new updates then end where
    the uninterrupted run did."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    old = {name: _file_bytes(run / "checkpoints" / name) for name in ("step_0000030", "step_0000040")}
    old_metrics = (run / "metrics.jsonl").read_bytes()
    res = _moelab("train", "--resume", str(run / "checkpoints" / "step_0000020"), "train.keep_last=1",
                  faults="kill@33")
    assert res.returncode == -9 and "rewound: the checkpoints after update 20" in res.stderr, res.stderr
    aside = run / "rewound-from-step_0000020"
    assert {name: _file_bytes(aside / name) for name in old} == old
    assert (aside / "metrics.jsonl").read_bytes() == old_metrics
    assert [c.name for c in list_checkpoints(run)] == ["step_0000030"]
    res = _train(run, prepared, resume=True)
    assert res.returncode == 0 and "resumed at step 30" in res.stderr, res.stderr
    _assert_same_run(reference, run)
    # a set-aside checkpoint is continued in a new folder, with the log it was set aside with
    before = _file_bytes(run)
    res = _moelab("train", "--resume", str(aside / "step_0000030"))
    assert res.returncode == 2 and "--out NEW_DIR" in res.stderr and _file_bytes(run) == before, res.stderr
    res = _moelab("train", "--resume", str(aside / "step_0000030"), "--out", str(tmp_path / "old"))
    assert res.returncode == 0, res.stderr
    _assert_same_run(reference, tmp_path / "old")
    assert _file_bytes(run) == before


def test_a_checkpoint_kept_outside_a_run_is_resumed_only_into_a_new_folder(prepared, reference, tmp_path):
    """A checkpoint folder copied elsewhere (backup/step_0000020): its grandparent was taken for the
    run, and a whole run (config, data, metrics, checkpoints, report) was written into tmp_path."""
    (tmp_path / "backup").mkdir()
    shutil.copytree(reference / "checkpoints" / "step_0000020", tmp_path / "backup" / "step_0000020")
    res = _moelab("train", "--resume", str(tmp_path / "backup" / "step_0000020"))
    assert res.returncode == 2 and "is not in a run's checkpoints/ folder" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup"]
    res = _moelab("train", "--resume", str(tmp_path / "backup" / "step_0000020"), "--out", str(tmp_path / "run"))
    assert res.returncode == 0 and "resumed at step 20" in res.stderr, res.stderr
    _assert_same_weights(reference, tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup", "run"]


def test_resuming_a_checkpoint_past_train_steps_is_refused(reference, tmp_path):
    """step_0000020 with train.steps=10 used to rewind the run to 20 and write a summary of a
    finished 10-update run over it."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _file_bytes(run)
    res = _moelab("train", "--resume", str(run / "checkpoints" / "step_0000020"), "train.steps=10")
    assert res.returncode == 2 and "is at update 20, past train.steps=10" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and _file_bytes(run) == before


def test_a_run_being_trained_is_refused_to_a_second_process(prepared, tmp_path):
    """A second `--resume auto` on a run that another process is training (a requeued job, a second
    terminal) interleaved both processes' checkpoints and metrics. It is refused, naming the holder,
    and removes nothing; once the holder has exited (SIGTERM here), the run resumes."""
    import signal
    import time

    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "moelab", "train", "--preset", "test", "--out", str(run),
                              f"data.path={prepared}", "train.steps=100000", "train.save_every=5",
                              "train.threads=1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert list_checkpoints(run), first.stderr.read() if first.poll() is not None else "no checkpoint in 120 s"
        res = _train(run, prepared, resume=True)
        assert res.returncode == 2 and f"is being trained by another process (pid {first.pid})" in res.stderr, \
            res.stderr
        assert first.poll() is None and (run / "config.yaml").is_file() and list_checkpoints(run)
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
        first.stderr.close()
    step = load_trainer_state(list_checkpoints(run)[-1])["step"]
    res = _train(run, prepared, f"train.steps={step + 2}", resume=True)
    assert res.returncode == 0 and f"resumed at step {step}" in res.stderr, res.stderr


@pytest.mark.slow
def test_a_kill_or_sigterm_during_the_final_evaluation_loses_no_update(prepared, reference, tmp_path):
    """The last updates (31-40) were saved only after the final evaluation, so a kill during that
    evaluation lost them and a resume redid them from step 30. Now they are saved first: SIGKILL
    leaves step 40 to resume from (only the evaluation is redone), and SIGTERM lets the evaluation
    finish and the run complete, exit 0."""
    run = tmp_path / "run"
    assert _train(run, prepared, faults="kill_eval@40").returncode == -9
    assert list_checkpoints(run)[-1].name == "step_0000040" and not (run / "summary.json").exists()
    res = _train(run, prepared, resume=True)
    assert res.returncode == 0 and "resumed at step 40" in res.stderr, res.stderr
    _assert_same_run(reference, run)
    ref = json.loads((reference / "summary.json").read_text())
    assert json.loads((run / "summary.json").read_text())["val_loss"] == ref["val_loss"]
    meta = json.loads((list_checkpoints(run)[-1] / "meta.json").read_text())
    assert meta["val"]["loss"] == ref["val_loss"] and meta["step"] == 40
    termed = tmp_path / "termed"
    res = _train(termed, prepared, faults="term_eval@40")
    assert res.returncode == 0 and json.loads((termed / "summary.json").read_text())["val_loss"] == ref["val_loss"]
