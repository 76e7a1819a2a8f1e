"""Data-parallel training (torchrun, gloo on CPU) trains what one process trains: with the same
global batch, every logged loss within 1e-5 of the single-process run, the same expert counts;
a NaN or a SIGTERM on one rank is acted on by all; a checkpoint of 2 ranks resumes on 2 or on 1."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from moelab import load_model
from moelab.hardware import FAST_FP32_FACTOR
from moelab.train.checkpoint import list_checkpoints

# grad_accum 2: accumulation and the per-micro-batch balancing loss over ranks; z-loss and the
# aux-free bias update (counts of the whole update, all ranks) are on too. Muon's Newton-Schulz
# runs in fp32: in bf16 (its default on a CPU with fast bf16 matmuls, e.g. AVX512-BF16) a gradient
# that differs in its last fp32 bit, as a sum over ranks does, can round to a different bf16 value,
# and over 12 updates the losses drift apart by 3e-4: rounding, not a difference in what is trained
ARGS = ["--preset", "test", "train.steps=12", "train.save_every=6", "train.eval_every=6", "train.log_every=1",
        "train.grad_accum=2", "model.z_loss_coef=0.001", "model.bias_update_rate=0.001", "train.threads=1",
        "optim.ns_dtype=fp32"]


def _run(*args, ranks: int = 1, faults: str = ""):
    launch = [sys.executable, "-m", "moelab"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "moelab"]
    return subprocess.run([*launch, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, MOELAB_FAULTS=faults, OMP_NUM_THREADS="1"))


def _records(run) -> dict:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["split"]): r for r in recs if r["split"] in ("train", "val")}


def _assert_same_training(ref, run, steps=range(1, 13)):
    a, b = _records(ref), _records(run)
    for step in steps:
        x, y = a[step, "train"], b[step, "train"]
        if x["loss"] is None:  # a skipped update: skipped in both
            assert y["loss"] is None and y["skipped_total"] == x["skipped_total"], step
            continue
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= 1e-5, (step, key, x[key], y[key])
    for key in a.keys() & b.keys():
        if key[1] == "val":
            assert abs(a[key]["loss"] - b[key]["loss"]) <= 1e-5, key
    for (name, x), y in zip(load_model(ref).state_dict().items(), load_model(run).state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5, rtol=0), name


@pytest.mark.slow
def test_two_gloo_ranks_train_what_one_process_trains(prepared, tmp_path):
    ref = tmp_path / "one"
    res = _run("train", "--out", ref, f"data.path={prepared}", *ARGS, faults="nan@3")
    assert res.returncode == 0, res.stderr

    # rank 1 alone gets a NaN loss at update 3 and a SIGTERM during update 7: both ranks skip
    # update 3 and stop after 7 with one checkpoint
    two = tmp_path / "two"
    res = _run("train", "--out", two, f"data.path={prepared}", *ARGS, ranks=2, faults="nan@3/1,term@7/1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("stopped by") == 1, res.stdout  # rank 0 reports, once
    assert [c.name for c in list_checkpoints(two)] == ["step_0000006", "step_0000007"]
    res = _run("train", "--resume", "auto", "--out", two, ranks=2)
    assert res.returncode == 0, res.stderr
    _assert_same_training(ref, two)
    one, both = (json.loads((r / "summary.json").read_text()) for r in (ref, two))
    assert both["skipped"]["nonfinite"] == one["skipped"]["nonfinite"] == 1
    assert both["expert_counts"] == one["expert_counts"]  # routed alike, counted over both ranks
    assert both["tokens"] == one["tokens"]
    # a refused resume is found by every rank and said by rank 0 alone
    res = _run("train", "--resume", "auto", "--out", two, "--preset", "tiny", ranks=2)
    errors = [line for line in res.stderr.splitlines() if line.startswith("moelab: error:")]
    assert res.returncode != 0 and len(errors) == 1 and "preset 'test' -> 'tiny'" in errors[0], res.stderr

    # the loader's position is the global batch's: the 2-rank checkpoint continues in one process
    fork = tmp_path / "fork"
    res = _run("train", "--resume", two / "checkpoints" / "step_0000006", "--out", fork)
    assert res.returncode == 0, res.stderr
    _assert_same_training(ref, fork, steps=range(7, 13))


@pytest.mark.slow
def test_a_batch_that_does_not_split_over_the_ranks_is_one_line(prepared, tmp_path):
    res = _run("train", "--out", tmp_path / "odd", f"data.path={prepared}", *ARGS, "train.batch_size=7", ranks=2)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("moelab: error:")]
    assert errors == ["moelab: error: train.batch_size=7 does not split evenly over 2 processes; "
                      "use a multiple of 2"], res.stderr
    assert not (tmp_path / "odd").exists()


def _fp32_choice(rank: int, init: str, speedups: tuple, out: str):
    """One gloo rank: the fp32 products' path a new run takes when this rank would time oneDNN at
    speedups[rank] (a busy machine's measurements differ by process)."""
    import torch.distributed as dist

    import moelab.hardware as hw
    from moelab.config import build_config
    from moelab.train.loop import _fp32_mode

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        real = hw.onednn_fp32_speedup()
        hw.onednn_fp32_speedup = lambda *a, **k: speedups[rank] if real else 0.0
        run = types.SimpleNamespace(device=torch.device("cpu"), cfg=build_config("exp3"), saved_fp32_path=None)
        with hw.fast_fp32_matmuls(_fp32_mode(run)) as (path, _):
            Path(out, f"rank{rank}").write_text(f"{path} {bool(real)}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("speedups", [(2.0, 1.0), (1.0, 2.0)])
def test_every_rank_takes_rank_0s_fp32_path(tmp_path, speedups):
    """Under torchrun the ranks run fp32 products on the path rank 0 measured, not each its own:
    a resume sets every rank to the checkpoint's (rank 0's) path, so a split would not repeat."""
    import torch.multiprocessing as mp

    mp.spawn(_fp32_choice, args=(f"file://{tmp_path / 'init'}", speedups, str(tmp_path)), nprocs=2)
    paths = [(tmp_path / f"rank{r}").read_text().split() for r in range(2)]
    exact = paths[0][1] == "True"  # oneDNN computes fp32 exactly here (no AMX rounding): the choice is open
    want = "onednn" if exact and speedups[0] >= FAST_FP32_FACTOR else "default"
    assert [p[0] for p in paths] == [want, want]
