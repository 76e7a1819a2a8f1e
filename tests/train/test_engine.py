"""The loop's options in process: precisions, activation checkpointing, keep-last and best
checkpoints, early stopping, --smoke, logging (MFU, routing metrics, TensorBoard, curves)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from moelab import load_model
from moelab.config import build_config
from moelab.errors import UserError
from moelab.train.checkpoint import list_checkpoints, load_trainer_state
from moelab.train.loop import schedule_note, train
from tests.conftest import has_module


def test_a_resume_that_moves_the_lr_schedule_is_pointed_out(tmp_path, prepared):
    """train.steps raised on a finished cosine run: its LR had decayed to the minimum and now jumps
    back up to most of the peak; the note says so. Nothing to say where the schedule stays put."""
    from tests.conftest import run_cli

    args = ("train", "--preset", "test", f"data.path={prepared}", "train.eval_every=4", "optim.warmup=1",
            "train.report=false", "train.plot=false")
    for schedule in ("cosine", "constant"):
        out = tmp_path / schedule
        res = run_cli(*args, "--out", out, "train.steps=4", f"optim.schedule={schedule}")
        assert res.returncode == 0, res.stderr
        res = run_cli("train", "--resume", "auto", "--out", out, "train.steps=8")
        assert res.returncode == 0, res.stderr
        if schedule == "cosine":  # update 4 ran at min_lr_ratio 0.1; update 5 of 8 halfway: 0.1 + 0.9 / 2
            assert ("note: these settings move the LR schedule: update 5 runs at 0.55 x the base LR, update 4 ran "
                    "at 0.1 x (a cosine schedule spans all of train.steps") in res.stderr, res.stderr
        else:
            assert "LR schedule" not in res.stderr, res.stderr
    cfg = build_config("test", None, ["train.steps=8"])
    assert schedule_note(cfg, cfg, 3) is None and schedule_note(cfg, cfg, 0) is None


def test_gradient_accumulation_updates_like_the_whole_batch(tmp_path, prepared):
    """batch 16 in one micro-batch, 2 x 8 and 4 x 4: the same windows, the same mean loss gradient,
    so the same weights after three hybrid Muon + AdamW updates (the balancing loss, computed per
    micro-batch as in Megatron, is off: it is not linear in the batch)."""
    base = ("train.steps=3", "model.aux_loss_coef=0", "optim.ns_dtype=fp32", "train.eval_every=100",
            "train.log_every=1", "train.report=false", "train.plot=false")
    for b, a in ((16, 1), (8, 2), (4, 4)):
        _run(tmp_path, prepared, *base, f"train.batch_size={b}", f"train.grad_accum={a}", name=f"b{b}")
    models = [load_model(tmp_path / f"b{b}") for b in (16, 8, 4)]
    whole = models[0].state_dict()
    for other in models[1:]:
        for name, x in other.state_dict().items():
            torch.testing.assert_close(x, whole[name], rtol=0, atol=1e-6, msg=name)
    # the logged loss and gradient norm are the whole batch's too (Adam and Muon would hide a gradient
    # summed rather than averaged over micro-batches; these would not)
    logged = [[r[k] for r in _records(tmp_path / f"b{b}") if r["split"] == "train" for k in ("loss", "grad_norm")]
              for b in (16, 8, 4)]
    assert len(logged[0]) == 6
    for other in logged[1:]:
        assert other == pytest.approx(logged[0], rel=1e-5)


def test_a_resume_with_half_the_micro_batch_and_twice_the_accumulation_continues_the_run(tmp_path, prepared):
    """What the out-of-memory message advises (train.batch_size=4 train.grad_accum=2 for 8) on a run
    to resume: refused before ('loader batch_size changed'). Each update now takes the same 8
    windows, so the run ends where the uninterrupted one does, up to float rounding."""
    import shutil

    base = ("train.steps=6", "train.save_every=3", "model.aux_loss_coef=0", "optim.ns_dtype=fp32",
            "train.report=false", "train.plot=false", "train.log_every=1")
    _run(tmp_path, prepared, *base, name="whole")
    _run(tmp_path, prepared, *base, name="halved")
    for later in list_checkpoints(tmp_path / "halved")[1:]:  # as if stopped after update 3
        shutil.rmtree(later)
    s = _run(tmp_path, prepared, name="halved", resume="auto",
             overrides=("train.batch_size=4", "train.grad_accum=2"))
    assert s["steps"] == 6
    a, b = load_model(tmp_path / "whole").state_dict(), load_model(tmp_path / "halved").state_dict()
    for name, x in a.items():
        torch.testing.assert_close(b[name], x, rtol=0, atol=1e-5, msg=name)
    losses = [[r["loss"] for r in _records(tmp_path / n) if r["split"] == "train"][-3:] for n in ("whole", "halved")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_the_report_of_a_resumed_and_forked_run_gives_every_command_that_made_it(tmp_path, prepared, monkeypatch):
    """run.json held only the last process's command, so the report of a resumed run said
    `moelab train --out RUN --resume auto ...`, which reproduces nothing on its own."""
    import sys

    from tests.conftest import run_cli

    def cli(*args):
        monkeypatch.setattr(sys, "argv", ["moelab", *map(str, args)])  # what run.json records
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr
        return args

    run, fork = tmp_path / "run", tmp_path / "fork"
    first = cli("train", "--preset", "test", "--out", run, f"data.path={prepared}", "train.steps=2",
                "train.save_every=2", "train.eval_every=2")
    again = cli("train", "--out", run, "--resume", "auto", "train.steps=4")
    forked = cli("train", "--resume", run / "checkpoints" / "step_0000004", "--out", fork, "train.steps=5")
    record = json.loads((fork / "run.json").read_text())
    assert [r["command"][1:] for r in [*record["history"], record]] == [[str(a) for a in c]
                                                                         for c in (first, again, forked)]
    assert [r.get("resumed_at") for r in [*record["history"], record]] == [None, 2, 4]
    assert "history" not in json.loads((run / "run.json").read_text())["history"][0]
    cli("report", fork)
    md = (fork / "report.md").read_text()
    shown = md[md.index("## Reproduce"):md.index("## Configuration")]
    lines = [ln for ln in shown.splitlines() if ln.startswith(("cd ", "# resumed"))]
    assert len(lines) == 5 and lines[0].endswith(f"moelab train --preset test --out {run} data.path={prepared} "
                                                 "train.steps=2 train.save_every=2 train.eval_every=2")
    assert lines[1].startswith("# resumed at update 2, ") and lines[2].endswith("--resume auto train.steps=4")
    assert lines[3].startswith("# resumed at update 4, ") and lines[4].endswith(f"--out {fork} train.steps=5")


def _run(tmp_path, prepared, *extra, name="run", resume=None, overrides=()):
    cfg = build_config("test", None, [f"data.path={prepared}", *extra])
    return train(cfg, out=str(tmp_path / name), resume=resume, overrides=overrides, progress=False)


def _records(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_evaluates_and_resumes_exactly(tmp_path, prepared, precision):
    """Autocast training with fp32 master weights; the final evaluation runs in the same precision
    (no Half/Float mismatch); fp16 keeps its loss scale across a resume."""
    args = (f"train.precision={precision}", "train.steps=20", "train.save_every=10")
    full = _run(tmp_path, prepared, *args, name="full")
    first = _records(tmp_path / "full")[0]
    assert full["val_loss"] < first["loss"] - 0.5
    model = load_model(tmp_path / "full")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = load_trainer_state(list_checkpoints(tmp_path / "full")[-1])
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0
        assert "loss_scale" in [r for r in _records(tmp_path / "full") if r["split"] == "train"][-1]
    _run(tmp_path, prepared, *args, name="part")
    import shutil

    shutil.rmtree(list_checkpoints(tmp_path / "part")[-1])
    _run(tmp_path, prepared, name="part", resume="auto")
    for (n, a), b in zip(model.state_dict().items(), load_model(tmp_path / "part").state_dict().values()):
        assert torch.equal(a, b), n


def test_activation_checkpointing_trains_like_without(tmp_path, prepared):
    a = _run(tmp_path, prepared, "train.steps=6", name="plain")
    b = _run(tmp_path, prepared, "train.steps=6", "train.activation_checkpointing=true", name="ckpt")
    assert a["expert_counts"] == b["expert_counts"]
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4)


def test_keep_last_three_plus_best(tmp_path, prepared):
    _run(tmp_path, prepared, "train.steps=40", "train.save_every=5", "train.keep_last=3", "train.eval_every=5")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step_0000030", "step_0000035", "step_0000040"]
    best = json.loads((ckpts / "best" / "meta.json").read_text())
    vals = {r["step"]: r["loss"] for r in _records(tmp_path / "run") if r["split"] == "val" and not r.get("final")
            and r["step"] > 0}
    assert best["step"] == min(vals, key=vals.get) and best["val"]["loss"] == min(vals.values())


def test_early_stopping_keeps_the_best(tmp_path, prepared):
    """min_delta so large that nothing after the first evaluation counts as better: with patience 2
    the run stops at the third evaluation, and `best` is the first."""
    s = _run(tmp_path, prepared, "train.steps=30", "train.eval_every=5", "train.patience=2", "train.min_delta=100")
    assert s["early_stopped"] and s["steps"] == 15
    best = tmp_path / "run" / "checkpoints" / "best"
    assert json.loads((best / "meta.json").read_text())["step"] == 5
    assert load_trainer_state(best)["step"] == 5
    assert list_checkpoints(tmp_path / "run")[-1].name == "step_0000015"


def test_an_early_stopped_run_is_complete_until_its_patience_is_raised(tmp_path, prepared):
    """--resume auto on a run that stopped early trained train.eval_every more updates, stopped
    early again and rewrote its results: at every requeue of a job that always passes --resume
    auto. It is complete, as a finished run is, until train.patience is raised past its count."""
    from tests.conftest import run_cli

    args = ("train.eval_every=5", "train.patience=2", "train.min_delta=100", "optim.schedule=constant")
    s = _run(tmp_path, prepared, *args, "train.steps=40")
    assert s["early_stopped"] and s["steps"] == 15 and s["best"]["bad_evals"] == 2
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = _run(tmp_path, prepared, name="run", resume="auto")
    assert again["already_complete"] and again["steps"] == 15
    res = run_cli("train", "--out", str(run), "--resume", "auto", "train.patience=2")
    assert res.returncode == 0 and "already complete (15 updates, early stop" in res.stdout, res.stderr
    assert "raise train.patience above 2" in res.stdout
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing rewritten
    more = _run(tmp_path, prepared, name="run", resume="auto", overrides=("train.patience=3",))
    assert more["early_stopped"] and more["steps"] == 20 and more["best"]["bad_evals"] == 3


def test_an_extended_run_evaluates_where_a_longer_run_does(tmp_path, prepared):
    """A finished run ends with its full final evaluation in place of the periodic one. Extended
    (train.steps raised), it runs that periodic evaluation first, so the best checkpoint and early
    stopping count it as a run of the longer length does: here patience runs out there, at update
    15, not at 20."""
    args = ("train.eval_every=5", "train.patience=2", "train.min_delta=100", "optim.schedule=constant")
    whole = _run(tmp_path, prepared, *args, "train.steps=30", name="whole")
    assert whole["early_stopped"] and whole["steps"] == 15
    _run(tmp_path, prepared, *args, "train.steps=10", name="ext")
    s = _run(tmp_path, prepared, name="ext", resume="auto", overrides=("train.steps=30",))
    assert s["early_stopped"] and s["steps"] == 15 and s["val_loss"] == whole["val_loss"]

    def periodic(run):
        return [(r["step"], r["loss"]) for r in _records(tmp_path / run) if r["split"] == "val" and not r.get("final")]
    assert periodic("ext") == periodic("whole") and [st for st, _ in periodic("whole")] == [0, 5, 10, 15]
    # a run stopped on its way (not finished) held its evaluation at update 10 already: no second one
    _run(tmp_path, prepared, *args, "train.steps=30", "train.save_every=10", name="cut")
    for later in list_checkpoints(tmp_path / "cut")[1:]:
        shutil.rmtree(later)
    _run(tmp_path, prepared, name="cut", resume="auto")
    assert periodic("cut") == periodic("whole")


def test_the_best_checkpoint_takes_in_the_last_update(tmp_path, prepared):
    """The last update is evaluated on the periodic windows too, off the train.eval_every cadence
    included: `best` could otherwise never be the final weights, the ones a decayed LR makes best,
    and the validation curve stopped short of the run's end."""
    _run(tmp_path, prepared, "train.steps=12", "train.eval_every=5")
    periodic = {r["step"]: r["loss"] for r in _records(tmp_path / "run") if r["split"] == "val" and not r.get("final")}
    assert sorted(periodic) == [0, 5, 10, 12]
    del periodic[0]  # the untrained model is not a candidate
    best = tmp_path / "run" / "checkpoints" / "best"
    meta = json.loads((best / "meta.json").read_text())
    assert meta["step"] == min(periodic, key=periodic.get) and meta["val"]["loss"] == min(periodic.values())
    last = load_trainer_state(list_checkpoints(tmp_path / "run")[-1])
    assert last["best"]["step"] == meta["step"] and last["evaluated_at"] == 12
    if meta["step"] == 12:  # the usual case: then `best` holds the final weights
        assert (best / "model.safetensors").read_bytes() == \
            (list_checkpoints(tmp_path / "run")[-1] / "model.safetensors").read_bytes()


def test_patience_spent_at_the_last_update_stops_an_extension_at_once(tmp_path, prepared):
    """A run ending where its patience runs out is complete, not stopped early. Extended (train.steps
    raised), it stops before any update, where a run of the longer length stopped."""
    args = ("train.eval_every=5", "train.patience=2", "train.min_delta=100", "optim.schedule=constant")
    whole = _run(tmp_path, prepared, *args, "train.steps=30", name="whole")
    assert whole["early_stopped"] and whole["steps"] == 15
    short = _run(tmp_path, prepared, *args, "train.steps=15", name="ext")
    assert not short["early_stopped"] and short["best"]["bad_evals"] == 2
    s = _run(tmp_path, prepared, name="ext", resume="auto", overrides=("train.steps=30",))
    assert s["early_stopped"] and s["steps"] == 15 and s["val_loss"] == whole["val_loss"]

    def periodic(run):
        return [(r["step"], r["loss"]) for r in _records(tmp_path / run) if r["split"] == "val" and not r.get("final")]
    assert periodic("ext") == periodic("whole")

    def finals(run):
        return [r for r in _records(tmp_path / run) if r.get("final")]
    # the same weights' final evaluation, recorded once: the extension ran no update, so it is not
    # repeated (it appended a second record at step 15 before)
    assert [r["step"] for r in finals("ext")] == [15] and finals("ext")[0]["loss"] == s["val_loss"]
    # a setting that changes the final evaluation makes it run again, on what it now names
    _run(tmp_path, prepared, *args, "train.steps=15", name="ext2")
    again = _run(tmp_path, prepared, name="ext2", resume="auto",
                 overrides=("train.steps=30", "train.final_eval_windows=3"))
    assert again["early_stopped"] and [r["step"] for r in finals("ext2")] == [15, 15]
    assert finals("ext2")[1]["tokens"] < finals("ext2")[0]["tokens"] and again["val_loss"] == finals("ext2")[1]["loss"]


def test_smoke_checks_a_config_end_to_end(tmp_path, prepared):
    res = subprocess.run([sys.executable, "-m", "moelab", "train", "--preset", "test", "--smoke", "--out",
                          str(tmp_path / "smoke"), f"data.path={prepared}", "train.steps=500"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "done: 4 updates" in res.stdout and "smoke check passed" in res.stdout
    assert [c.name for c in list_checkpoints(tmp_path / "smoke")] == ["step_0000002", "step_0000004"]
    # on an existing run it rewrote the run's config (train.steps: 4) and summary: refused, nothing touched
    before = {p: p.read_bytes() for p in (tmp_path / "smoke").rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="does not combine with --resume"):
        train(build_config("test", None, [f"data.path={prepared}"]), out=str(tmp_path / "smoke"), resume="auto",
              progress=False, smoke=True)
    with pytest.raises(UserError, match="smoke is not empty; choose another --out") as refused:  # no --resume advice
        train(build_config("test", None, [f"data.path={prepared}"]), out=str(tmp_path / "smoke"), progress=False,
              smoke=True)
    assert "--resume" not in str(refused.value)
    assert {p: p.read_bytes() for p in (tmp_path / "smoke").rglob("*") if p.is_file()} == before


def test_a_smoke_run_that_diverges_fails_naming_the_divergence(tmp_path, prepared):
    """optim.muon_lr=1e30 (a typo for 1e-3): the weights went to NaN, and the smoke check called it a
    checkpoint that does not reload (NaN != NaN in its comparison)."""
    with pytest.raises(UserError, match=r"smoke check failed: the validation loss is nan after 4 updates "
                                        r"\(\d skipped as non-finite\): training diverged; lower the learning rates"):
        train(build_config("test", None, [f"data.path={prepared}", "optim.muon_lr=1e30"]),
              out=str(tmp_path / "smoke"), progress=False, smoke=True)
    # a model that is non-finite from its first update is pointed at its settings, not the optimizer
    broken = ["model.attention=mla", "model.rope_scaling=yarn", "model.rope_factor=4",
              "model.rope_original_max_len=16", "model.yarn_mscale_all_dim=1e30"]
    for precision in ("fp32", "bf16"):  # bf16's explicit attention scores: baddbmm refused the huge scale
        with pytest.raises(UserError, match="all 4 updates had a non-finite loss or gradient: this model computes no"):
            train(build_config("test", None, [f"data.path={prepared}", *broken, f"train.precision={precision}"]),
                  out=str(tmp_path / f"broken-{precision}"), progress=False, smoke=True)


def test_logged_metrics_at_the_cadence(tmp_path, prepared):
    """Training records every log_every updates with loss, balance terms, LR, gradient norm,
    tokens/s, FLOPs and MFU (against the given peak), peak memory and per-layer routing metrics;
    TensorBoard (where installed: the dev extras) gets the same scalars; the curves PNG is written."""
    tensorboard = has_module("tensorboard")
    _run(tmp_path, prepared, "train.steps=12", "train.log_every=4", "train.peak_tflops=1.0",
         f"train.tensorboard={str(tensorboard).lower()}", "train.plot=true", "model.z_loss_coef=0.001")
    recs = [r for r in _records(tmp_path / "run") if r["split"] == "train"]
    assert [r["step"] for r in recs] == [4, 8, 12]
    for r in recs:
        for key in ("loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu",
                    "peak_mem_gb", "load_cv", "load_max_mean", "dead_experts"):
            assert key in r, key
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0) and r["peak_mem_gb"] > 0
        assert len(r["load_cv"]) == 2 and all(v >= 0 for v in r["load_cv"])
        from moelab.analysis.routing import THRESHOLDS, layer_stats  # the interval's verdict, as routing gives it

        assert r["routing_verdict"] == [layer_stats(c)["verdict"] for c in r["expert_counts"]]
        assert set(r["routing_verdict"]) <= set(THRESHOLDS)
    if tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
        acc.Reload()
        tb = [(e.step, e.value) for e in acc.Scalars("train/loss")]
        assert tb == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in recs]
        assert "routing/load_cv/moe1" in acc.Tags()["scalars"]
        val = [r for r in _records(tmp_path / "run") if r["split"] == "val"]  # periodic: one set of windows
        assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == \
            [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in val if not r.get("final")]
        assert [(e.step, e.value) for e in acc.Scalars("val_final/loss")] == \
            [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in val if r.get("final")]
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_throughput_leaves_out_the_first_update(tmp_path, prepared, monkeypatch):
    """The first update of a process carries compile and warm-up: the summary's tokens/s is the
    rate of the later ones, and the first update's time is reported on its own."""
    import time

    from moelab.train import loop
    from moelab.train.monitor import throughput_text

    real, calls = loop._update, []

    def slow_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2.0)  # what a compile would add
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_update", slow_first)
    s = _run(tmp_path, prepared, "train.steps=4", "train.log_every=2")
    assert s["first_update_s"] >= 2.0
    # counting the first update, 4 updates' tokens took over 2 s; the 3 later ones take ~0.1 s
    assert s["train_tokens_per_s"] > s["tokens"] / 2.0
    assert f"after a {s['first_update_s']:.1f} s first update" in throughput_text(s)
    assert "first update" not in throughput_text({**s, "first_update_s": 1e-6})
    fast = {**s, "train_tokens_per_s": 100 * s["tokens"] / s["steps"]}  # 10 ms updates
    assert "first update" not in throughput_text({**fast, "first_update_s": 0.04})  # was "after a 0.0 s first update"


def test_resuming_a_finished_run_changes_nothing(tmp_path, prepared):
    """--resume auto on a run that reached train.steps: nothing to train, so its summary, metrics
    and checkpoints stay as they were (no second final evaluation, no 0 tokens/s summary);
    raising train.steps continues it."""
    run = tmp_path / "run"
    first = _run(tmp_path, prepared, "train.steps=4", "train.save_every=2")
    files = sorted(p for p in run.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    again = _run(tmp_path, prepared, resume="auto")
    assert again["already_complete"] and again["val_loss"] == first["val_loss"] and again["not_applied"] == []
    # an override given to a finished run takes effect in no update: named, not dropped without a word
    given = _run(tmp_path, prepared, resume="auto", overrides=("model.aux_loss_coef=0.5",))
    assert given["already_complete"] and given["not_applied"] == ["model.aux_loss_coef 0.01 -> 0.5"]
    assert sorted(p for p in run.rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == before[p] for p in files)
    run.rename(tmp_path / "moved")  # a moved (or copied) run is named where it is now
    assert _run(tmp_path, prepared, name="moved", resume="auto")["run_dir"] == str(tmp_path / "moved")
    (tmp_path / "moved").rename(run)
    # killed during the final evaluation (no summary yet): the evaluation runs again, no update
    (run / "summary.json").unlink()
    redo = _run(tmp_path, prepared, resume="auto")
    assert redo["val_loss"] == pytest.approx(first["val_loss"], abs=1e-6) and redo["train_tokens_per_s"] is None
    from moelab.train.monitor import throughput_text

    assert throughput_text(redo) == "no training updates in this process"
    more = _run(tmp_path, prepared, resume="auto", overrides=("train.steps=6",))
    assert more["steps"] == 6 and not more.get("already_complete") and more["train_tokens_per_s"] > 0


def test_resume_from_a_checkpoint_into_a_new_folder_forks_the_run(tmp_path, text_corpus):
    """--resume CKPT --out NEW trained in CKPT's own run (rewinding its metrics and summary) and
    ignored --out. Now NEW continues from CKPT, bit-identical to continuing in place, and the source
    run keeps every byte."""
    def run(name, resume=None, steps=6):
        cfg = build_config("test", None, [f"data.source={text_corpus}", "data.vocab_size=300",
                                          f"train.steps={steps}", "train.save_every=2", "train.eval_every=2",
                                          "train.min_delta=100"])  # best: the first evaluation, update 2
        return train(cfg, out=str(tmp_path / name), resume=resume, overrides=(f"train.steps={steps}",),
                     progress=False)

    src = tmp_path / "src"
    first = run("src")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    fork = run("fork", resume=str(src / "checkpoints" / "step_0000002"))
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # the source untouched
    assert fork["run_dir"] == str(tmp_path / "fork") and fork["val_loss"] == first["val_loss"]
    for (name, a), b in zip(load_model(src).state_dict().items(), load_model(tmp_path / "fork").state_dict().values()):
        assert torch.equal(a, b), name
    upto2 = [r for r in _records(src) if r["step"] <= 2]
    assert upto2 and _records(tmp_path / "fork")[:len(upto2)] == upto2  # the curve up to the fork point
    assert (tmp_path / "fork" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (src / "tokenizer" / "tokenizer.json").read_bytes()
    assert [p.name for p in list_checkpoints(tmp_path / "fork")][-1] == "step_0000006"
    best = src / "checkpoints" / "best"
    assert json.loads((best / "meta.json").read_text())["step"] == 2
    run("fork4", resume=str(src / "checkpoints" / "step_0000004"))  # the source's best is the fork's too
    fork_best = tmp_path / "fork4" / "checkpoints" / "best"
    assert json.loads((fork_best / "meta.json").read_text())["step"] == 2
    assert (fork_best / "model.safetensors").read_bytes() == (best / "model.safetensors").read_bytes()
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):  # a fork needs a new (or empty) folder
        run("taken", resume=str(src))


def test_a_run_that_fails_to_start_leaves_no_directory(tmp_path, prepared):
    """A failed start left config.yaml, data/ and tokenizer/ behind, so the corrected command was
    refused: 'run directory ... is not empty; pass --resume auto'."""
    with pytest.raises(UserError, match="fewer than train.batch_size"):
        _run(tmp_path, prepared, "train.batch_size=100000", name="new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()  # one the user made stays, empty
    with pytest.raises(UserError, match="fewer than train.batch_size"):
        _run(tmp_path, prepared, "train.batch_size=100000", name="empty")
    assert list((tmp_path / "empty").iterdir()) == []
    src = tmp_path / "src"
    _run(tmp_path, prepared, "train.steps=2", "train.save_every=2", name="src")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    refused = r"loader seed changed since the checkpoint \(1234 -> 4\); a resume keeps the run.s data order: drop"
    with pytest.raises(UserError, match=refused):  # a fork that cannot resume
        _run(tmp_path, prepared, name="fork", resume=str(src), overrides=("train.seed=4",))
    assert not (tmp_path / "fork").exists() and sorted(p.relative_to(src) for p in src.rglob("*")) == before
    assert _run(tmp_path, prepared, "train.steps=2", name="new")["steps"] == 2  # the same --out now works
    with pytest.raises(UserError, match="run directory .*new is not empty; pass --resume auto to continue it"):
        _run(tmp_path, prepared, "train.steps=2", name="new")  # a run there now: it can be continued


def _wandb_history(run_dir):
    """(run id, history rows, exit code or None) of each offline W&B run under `run_dir`, read from the .wandb files
    (a LevelDB-style log of protobuf records: 7-byte header, 32 KiB blocks, records that are whole
    or split FIRST/MIDDLE/LAST); wandb itself no longer ships a reader."""
    import struct

    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.teardown()  # run.finish() returns before W&B's service process has written the whole file
    runs = []
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, buf, rows, run_id, exit_code = f.read_bytes(), 7, b"", [], None, None
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:  # block padding
                pos += left
                continue
            payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            buf = payload if kind in (1, 2) else buf + payload
            if kind not in (1, 4):
                continue
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "run":
                run_id = rec.run.run_id
            elif rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif rec.WhichOneof("record_type") == "exit":
                exit_code = rec.exit.exit_code
        runs.append((run_id, rows, exit_code))
    return runs


def test_wandb_gets_the_logged_scalars_and_a_resume_continues_its_run(tmp_path, prepared, monkeypatch):
    """W&B (offline mode, the real client): the run gets train and validation scalars and the
    per-layer routing metrics at the logged steps; a resumed run logs under the same W&B run id."""
    pytest.importorskip("wandb")
    import shutil

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ("train.steps=8", "train.log_every=2", "train.save_every=4", "train.eval_every=4",
            "train.wandb=moelab-test")
    _run(tmp_path, prepared, *args)
    run = tmp_path / "run"
    shutil.rmtree(list_checkpoints(run)[-1])  # lose steps 5-8, then resume from step 4
    _run(tmp_path, prepared, *args, resume="auto")
    (first_id, first, first_exit), (second_id, second, second_exit) = _wandb_history(run)
    assert first_id == second_id == (run / "wandb_id.txt").read_text().strip()
    assert first_exit == second_exit == 0  # each finished
    logged = {r["_step"]: r for r in first + second if "train/loss" in r}
    recs = [r for r in _records(run) if r["split"] == "train"]
    assert [r["step"] for r in recs] == [2, 4, 6, 8] and sorted(logged) == [2, 4, 6, 8]
    for r in recs:  # the resumed steps overwrite nothing: same values as metrics.jsonl
        assert logged[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert logged[r["step"]]["routing/load_cv/moe1"] == pytest.approx(r["load_cv"][1], rel=1e-6)
    val = [r for r in first + second if "val/loss" in r]
    assert {r["_step"] for r in val} >= {4, 8}


def test_a_failed_run_flushes_its_sinks_and_wandb_marks_it_failed(tmp_path, prepared, monkeypatch):
    """A run that stops on an error (here a NaN under train.nonfinite=raise) closes its sinks:
    TensorBoard's writer buffered the updates before the failure in a thread that dies with the
    process (they were lost, the ones a diverging run is read for), and W&B showed the run as
    finished. Now TensorBoard has every logged update, and W&B the same rows and exit code 1."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MOELAB_FAULTS", "nan@5")
    with pytest.raises(UserError, match="non-finite loss at update 5"):
        _run(tmp_path, prepared, "train.steps=8", "train.log_every=1", "train.nonfinite=raise",
             "train.tensorboard=true", "train.wandb=moelab-test")
    run = tmp_path / "run"
    recs = [r for r in _records(run) if r["split"] == "train"]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in recs]
    [(_, rows, exit_code)] = _wandb_history(run)
    assert sorted(r["_step"] for r in rows if "train/loss" in r) == [1, 2, 3, 4] and exit_code == 1


def test_wandb_that_cannot_start_is_one_line_and_leaves_no_run(tmp_path, prepared):
    """With no W&B login (and no offline mode) wandb.init raised a traceback after set-up, leaving a
    run directory without a checkpoint that blocked the corrected command. The real client, refused."""
    pytest.importorskip("wandb")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), NETRC=str(tmp_path / "no-netrc"))
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "moelab", "train", "--preset", "test", "--out", str(run),
                          f"data.path={prepared}", "train.steps=2", "train.wandb=moelab-test"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "train.wandb=moelab-test: W&B could not start" in res.stderr and "WANDB_MODE=offline" in res.stderr
    assert not run.exists()


def test_flops_per_token_counts_active_matmuls():
    """6 x active matmul parameters (no embedding lookup, no norms) + causal attention, checked
    against a hand count."""
    from moelab.config import Config
    from moelab.models import MoETransformer
    from moelab.models.accounting import parameter_table
    from moelab.train.monitor import flops_per_token

    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 64, 2, 4
    cfg.model.n_experts, cfg.model.top_k, cfg.model.expert_dim = 4, 2, 32
    cfg.resolve(vocab_size=100)
    rows = parameter_table(MoETransformer(cfg.model))
    D, V, L, F = 64, 100, 2, 32
    per_layer = 4 * D * D + 2 * 3 * D * F + 4 * D  # attention, 2 of 4 SwiGLU experts, router
    hand = 6 * (L * per_layer + V * D) + 6 * L * 4 * (16 + 16) * 128 / 2  # tied head is a matmul
    assert flops_per_token(cfg.model, 128, rows) == pytest.approx(hand)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, prepared):
    eager = _run(tmp_path, prepared, "train.steps=6", name="eager")
    compiled = _run(tmp_path, prepared, "train.steps=6", "train.compile=true", name="compiled")
    a = [r["loss"] for r in _records(tmp_path / "eager") if r["split"] == "train"]
    b = [r["loss"] for r in _records(tmp_path / "compiled") if r["split"] == "train"]
    assert b == pytest.approx(a, abs=2e-3)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=2e-3)


def test_model_vocab_size_pads_past_the_tokenizer_and_is_never_silently_replaced(tmp_path, prepared):
    """model.vocab_size=3 trained an 8192-token model without a word: a set size is kept (padding
    the embedding and head past the tokenizer's 300 tokens), and one too small to embed them is refused."""
    with pytest.raises(UserError, match=r"model.vocab_size=299 is smaller than the tokenizer's 300 tokens"):
        _run(tmp_path, prepared, "model.vocab_size=299", name="small")
    assert not (tmp_path / "small").exists()
    s = _run(tmp_path, prepared, "model.vocab_size=320", "train.steps=2", "train.save_every=2", name="padded")
    model = load_model(tmp_path / "padded")
    assert model.cfg.vocab_size == 320 and model(torch.tensor([[5, 299]])).logits.shape[-1] == 320
    assert s["steps"] == 2 and build_config(None, str(tmp_path / "padded" / "config.yaml"), []).model.vocab_size == 320
    assert _run(tmp_path, prepared, "train.steps=1", name="derived")["steps"] == 1  # 0: the tokenizer's size
    assert load_model(tmp_path / "derived").cfg.vocab_size == 300


def test_a_warmup_as_long_as_the_run_is_pointed_out(tmp_path, prepared):
    from tests.conftest import run_cli

    args = ("train", "--preset", "test", f"data.path={prepared}", "train.steps=4", "train.eval_every=4")
    res = run_cli(*args, "--out", tmp_path / "long", "optim.warmup=8")
    assert res.returncode == 0 and ("note: optim.warmup=8 is not below train.steps=4: the LR only ramps up, to 50% "
                                    "of its peak") in res.stderr, res.stderr
    res = run_cli(*args, "--out", tmp_path / "short", "optim.warmup=3")
    assert res.returncode == 0 and "optim.warmup" not in res.stderr, res.stderr
    res = run_cli(*args, "--smoke", "--out", tmp_path / "smoke", "optim.warmup=8")  # 4 updates by design
    assert res.returncode == 0 and "optim.warmup" not in res.stderr, res.stderr
