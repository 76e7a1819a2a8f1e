"""End to end on CPU: a short run lowers the loss; save then load gives the same logits."""

import json
import re

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
    assert state["step"] == 30 and state["loader"]["position"] + state["loader"]["epoch"] > 0
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
    for r in (run, fresh):  # what train() would close at its end
        r.sinks.close()
        r.lock.release()


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


def test_an_moe_trained_without_any_balancing_is_told_so(tmp_path, capsys):
    train(_cfg("train.steps=1", "model.aux_loss_coef=0"), out=str(tmp_path / "none"))
    assert "balancing: none; routers trained without a balancing term can collapse" in capsys.readouterr().err
    train(_cfg("train.steps=1", "model.aux_loss_coef=0", "model.bias_update_rate=0.001"), out=str(tmp_path / "bias"))
    err = capsys.readouterr().err
    assert "balancing: bias_update_rate 0.001" in err and "balancing: none" not in err


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


def _cgroup(controller: str, name: str, limit: str):
    """(outer, inner) folders of a real cgroup with `limit` set on the outer one, or None where this
    machine does not let the test make them (not root, no cgroup file system, cgroup v2 inside a
    container). `controller` cpu: `limit` in CPUs; memory: in bytes. The kernel enforces the limit
    on a process put in inner, and moelab must find it one level up from its own group."""
    import os
    from pathlib import Path

    v1 = Path("/sys/fs/cgroup") / controller
    v1_file = {"cpu": "cpu.cfs_quota_us", "memory": "memory.limit_in_bytes"}[controller]
    outer = None
    try:
        if (v1 / v1_file).is_file() and os.access(v1, os.W_OK):
            outer = v1 / name
            outer.mkdir()
            if controller == "cpu":
                limit = str(int(float(limit) * int((outer / "cpu.cfs_period_us").read_text())))
            (outer / v1_file).write_text(limit)
        elif controller in Path("/sys/fs/cgroup/cgroup.controllers").read_text().split():
            Path("/sys/fs/cgroup/cgroup.subtree_control").write_text(f"+{controller}")
            outer = Path("/sys/fs/cgroup") / name
            outer.mkdir()
            if controller == "cpu":
                (outer / "cpu.max").write_text(f"{int(float(limit) * 100000)} 100000")
            else:
                (outer / "memory.max").write_text(limit)
        else:
            return None
        (outer / "inner").mkdir()
        return outer, outer / "inner"
    except OSError:
        for folder in (outer / "inner", outer) if outer is not None else ():
            if folder.is_dir():
                folder.rmdir()  # a cgroup folder goes with rmdir, its control files with it
        return None


def _run_in_cgroup(made, code: str):
    """`code` run by a new Python process that first moves itself into the cgroup's inner group."""
    import subprocess
    import sys

    outer, inner = made
    try:
        return subprocess.run([sys.executable, "-c", f"import os; open({str(inner / 'cgroup.procs')!r}, 'w')"
                               f".write(str(os.getpid()))\n" + code], capture_output=True, text=True, timeout=300)
    finally:
        for folder in (inner, outer):
            folder.rmdir()


def test_torch_threads_fit_a_cgroup_cpu_quota(trained):
    """docker --cpus and Kubernetes CPU limits are a cgroup CPU quota, which neither os.cpu_count()
    nor the affinity mask shows: torch started a thread per core it saw, and the kernel stopped them
    for most of each period (1.4x slower at 2 threads under a 1-CPU quota here; worse with more
    cores). In a real cgroup with 0.9 CPU of quota on its parent group, a command where torch is
    set to 4 threads runs one and says why."""
    import os

    made = _cgroup("cpu", f"moelab-test-{os.getpid()}", "0.9")
    if made is None:
        pytest.skip("cannot make a cgroup with a CPU quota here (needs root and a cgroup file system)")
    res = _run_in_cgroup(made, "import torch; torch.set_num_threads(4)  # what torch starts on a 4-core host\n"
                               "from moelab.cgroups import cpu_quota\n"
                               "from moelab.cli import main\n"
                               "from moelab.data.parallel import cores\n"
                               f"rc = main(['generate', {str(trained / 'run')!r}, '--prompt', 'def', "
                               "'--max-new-tokens', '2'])\n"
                               "print(rc, cores(), cpu_quota(), torch.get_num_threads())\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-4:] == ["0", "1", "0.9", "1"], res.stdout
    assert ("note: this process may use 1 CPU core (its cgroup's CPU quota is 0.9 CPUs, as docker --cpus or a "
            "Kubernetes CPU limit sets); torch would start 4 threads: running 1") in res.stderr


def test_a_run_too_big_for_its_cgroups_memory_limit_is_refused_not_killed(trained):
    """A memory limit one level above the process's own cgroup (a Slurm job's, a systemd slice's;
    only a container sees its own group as the root) was not read: the run saw the host's memory,
    started, and the kernel's OOM killer ended it with no message. Now it is refused in one line
    that gives the memory the cgroup leaves."""
    import os

    limit = 1 << 30
    made = _cgroup("memory", f"moelab-test-{os.getpid()}", str(limit))
    if made is None:
        pytest.skip("cannot make a cgroup with a memory limit here (needs root and a cgroup file system)")
    res = _run_in_cgroup(made, "import sys, torch\n"
                               "from moelab.cli import main\n"
                               "from moelab.train.memory import available_bytes\n"
                               "print(available_bytes(torch.device('cpu')), flush=True)\n"
                               f"sys.exit(main(['train', '--preset', 'test', '--out', {str(trained / 'big')!r}, "
                               f"'data.path={trained / 'run' / 'data' / 'prepared'}', 'model.d_model=512', "
                               "'model.expert_dim=4096', 'train.steps=1']))\n")  # 0.1B parameters
    assert 0 < int(res.stdout.split()[0]) < limit, res.stdout
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])  # -9: killed for memory
    said = re.search(r"cannot fit.* ([\d.]+) GB (?:is )?available", res.stderr)
    assert said and float(said.group(1)) < limit / 2 ** 30, res.stderr  # what the cgroup leaves, not the host's
    assert not (trained / "big").exists()
