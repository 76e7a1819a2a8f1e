"""End to end on CPU: a short run lowers the loss; save then load gives the same logits."""

import json

import pytest
import torch

from moelab import load_model
from moelab.config import build_config
from moelab.train.checkpoint import list_checkpoints, load_trainer_state
from moelab.train.loop import setup, train


def _cfg(*extra):
    return build_config("test", None, list(extra))


def test_short_run_lowers_loss_and_writes_run_dir(tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(), out=str(out), progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert val[0]["step"] == 0 and val[-1].get("final")
    assert summary["val_loss"] < val[0]["loss"] - 1.0  # ~6.2 at init for vocab 512
    assert 0 < summary["val_bpb"] < val[0]["bpb"]
    train_recs = [r for r in records if r["split"] == "train"]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and len(r["load_max_mean"]) == 2 for r in train_recs)
    for f in ("config.yaml", "run.json", "tokenizer/tokenizer.json", "data/split.json"):
        assert (out / f).is_file(), f
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["step_0000010", "step_0000020", "step_0000030"]
    state = load_trainer_state(ckpts[-1])
    assert state["step"] == 30 and state["loader"]["index"] + state["loader"]["epoch"] > 0
    assert {"torch", "python", "numpy"} <= set(state["rng"])


def test_save_then_load_reproduces_logits(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg("train.steps=4", "train.save_every=4", "train.eval_every=4")
    train(cfg, out=str(out), progress=False)
    run = setup(_cfg("train.steps=4"), out=str(out), resume="auto")  # rebuilt from the checkpoint
    assert run.step == 4
    loaded = load_model(out)
    ids = run.data.val_windows[:2, :-1]
    with torch.no_grad():
        a = loaded(ids).logits
        b = run.model.eval()(ids).logits
    assert torch.equal(a, b)
    fresh = setup(_cfg(), out=str(tmp_path / "other"))  # untrained weights differ
    with torch.no_grad():
        assert not torch.allclose(fresh.model.eval()(ids).logits, a)


def test_resume_continues_exactly(tmp_path):
    """Stopping after step 10 (a checkpoint) and resuming gives the same weights as one run."""
    full = tmp_path / "full"
    train(_cfg("train.steps=20"), out=str(full), progress=False)
    part = tmp_path / "part"
    train(_cfg("train.steps=20", "train.save_every=10"), out=str(part), progress=False)
    # drop the later checkpoint to simulate a run that died after step 10, then resume
    import shutil

    for c in list_checkpoints(part)[1:]:
        shutil.rmtree(c)
    summary = train(_cfg(), out=str(part), resume="auto", progress=False)
    assert summary["steps"] == 20
    a, b = load_model(full), load_model(part)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


DEEPSEEK_STYLE = ("model.attention=mla", "model.q_lora_rank=32", "model.kv_lora_rank=16",
                  "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
                  "model.router=sigmoid", "model.n_experts=8", "model.n_group=4", "model.topk_group=2",
                  "model.n_shared_experts=1",
                  "model.n_layers=3", "model.first_k_dense=1", "model.aux_loss_coef=0",
                  "model.seq_aux_loss_coef=0.001", "model.bias_update_rate=0.001", "train.grad_accum=2")


def test_deepseek_style_run_balances_with_bias_and_resumes_exactly(tmp_path):
    """MLA + sigmoid group-limited router + shared expert + leading dense layer + aux-free bias
    balancing under gradient accumulation: trains, logs its balance terms, moves the selection
    biases in steps of the rate, and resumes bit-exactly (the biases are part of the state)."""
    import shutil

    full = tmp_path / "full"
    summary = train(_cfg(*DEEPSEEK_STYLE, "train.steps=20"), out=str(full), progress=False)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["split"] == "train"]
    assert "seq_aux_loss" in train_recs[0] and "z_loss" not in train_recs[0]
    assert len(train_recs[0]["load_max_mean"]) == 2  # the two MoE layers, not the dense one
    val = [r for r in records if r["split"] == "val"]
    assert summary["val_loss"] < val[0]["loss"] - 0.5
    model = load_model(full)
    biases = torch.stack([r.selection_bias for r in model.routers])
    steps = biases / 0.001
    assert biases.abs().max() > 0 and biases.abs().max() <= 20 * 0.001 + 1e-6
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)  # whole steps of the rate
    part = tmp_path / "part"
    train(_cfg(*DEEPSEEK_STYLE, "train.steps=20", "train.save_every=10"), out=str(part), progress=False)
    for c in list_checkpoints(part)[1:]:
        shutil.rmtree(c)
    train(_cfg(*DEEPSEEK_STYLE), out=str(part), resume="auto", progress=False)
    for (name, x), y in zip(model.state_dict().items(), load_model(part).state_dict().values()):
        assert torch.equal(x, y), name


def test_more_threads_than_cores_runs_one_per_core(tmp_path, capsys):
    from moelab.data.parallel import cores

    before = torch.get_num_threads()
    try:
        train(_cfg("train.steps=1", f"train.threads={cores() + 7}"), out=str(tmp_path / "run"))
        assert torch.get_num_threads() == cores()  # not oversubscribed
        err = capsys.readouterr().err
        assert f"train.threads={cores() + 7}: this process may use {cores()} CPU cores; running {cores()}" in err
        train(_cfg("train.steps=1", "train.threads=1"), out=str(tmp_path / "one"))
        assert torch.get_num_threads() == 1 and "may use" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def _cpu_quota_cgroup(name: str, cpus: float):
    """(outer, inner) cgroup folders, `cpus` CPUs' quota on the outer one, or None where this
    machine does not let the test make them (not root, no cgroup file system, cgroup v2 inside a
    container). A real cgroup: the kernel then enforces the quota on the process put in inner."""
    import os
    from pathlib import Path

    v1 = Path("/sys/fs/cgroup/cpu")
    try:
        if (v1 / "cpu.cfs_quota_us").is_file() and os.access(v1, os.W_OK):
            outer = v1 / name
            outer.mkdir()
            period = int((outer / "cpu.cfs_period_us").read_text())
            (outer / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
        elif "cpu" in Path("/sys/fs/cgroup/cgroup.controllers").read_text().split():
            Path("/sys/fs/cgroup/cgroup.subtree_control").write_text("+cpu")
            outer = Path("/sys/fs/cgroup") / name
            outer.mkdir()
            (outer / "cpu.max").write_text(f"{int(cpus * 100000)} 100000")
        else:
            return None
        (outer / "inner").mkdir()
        return outer, outer / "inner"
    except OSError:
        return None


def test_torch_threads_fit_a_cgroup_cpu_quota(trained, tmp_path):
    """docker --cpus and Kubernetes CPU limits are a cgroup CPU quota, which neither os.cpu_count()
    nor the affinity mask shows: torch started a thread per core it saw, and the kernel stopped them
    for most of each period (1.4x slower at 2 threads under a 1-CPU quota here; worse with more
    cores). In a real cgroup with 0.9 CPU of quota on its parent group, a command where torch is
    set to 4 threads runs one and says why; the limit is read walking up from the process's group."""
    import os
    import subprocess
    import sys

    made = _cpu_quota_cgroup(f"moelab-test-{os.getpid()}", 0.9)
    if made is None:
        pytest.skip("cannot make a cgroup with a CPU quota here (needs root and a cgroup file system)")
    outer, inner = made
    child = (f"import os, sys; open({str(inner / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
             "import torch; torch.set_num_threads(4)  # what torch starts on a 4-core host\n"
             "from moelab.cli import main\n"
             "from moelab.data.parallel import cgroup_cpu_quota, cores\n"
             f"rc = main(['generate', {str(trained / 'run')!r}, '--prompt', 'def', '--max-new-tokens', '2'])\n"
             "print(rc, cores(), cgroup_cpu_quota(), torch.get_num_threads())\n")
    try:
        res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    finally:
        for folder in (inner, outer):
            folder.rmdir()
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-4:] == ["0", "1", "0.9", "1"], res.stdout
    assert ("note: this process may use 1 CPU core (its cgroup's CPU quota is 0.9 CPUs, as docker --cpus or a "
            "Kubernetes CPU limit sets); torch would start 4 threads: running 1") in res.stderr
