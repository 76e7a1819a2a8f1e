"""End to end on CPU: a short run lowers the loss; save then load gives the same logits."""

import json

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
