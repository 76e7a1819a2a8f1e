"""`train.init_from`: a new run starts from another run's, a checkpoint's or a Hugging Face directory's
weights, with its model settings and tokenizer, and a fresh optimizer, schedule and data position."""

import json
import shutil

import pytest
import torch
import yaml

from moelab import load_model
from moelab.data.tokenizer import load_tokenizer
from tests.conftest import write_corpus
from tests.train.test_reliability import _moelab

# An LR so small that no update moves a weight in fp32: the run's weights stay the ones it started from.
FROZEN = ["optim.muon_lr=1e-30", "optim.adamw_lr=1e-30", "train.threads=1"]


@pytest.fixture(scope="module")
def source(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "run"
    res = _moelab("train", "--preset", "test", "--out", str(out), f"data.path={prepared}", "train.steps=4",
                  "train.eval_every=4", "train.threads=1")
    assert res.returncode == 0, res.stderr
    return out


def _assert_weights_close(a, b):
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:  # a fresh init differs by ~0.02; the tiny LR moves nothing but exact zeros
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=1e-12, msg=name)


def _model_section(run) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())["model"]


def test_a_run_starts_from_another_runs_weights_model_and_tokenizer(source, tmp_path):
    other = write_corpus(tmp_path / "other", n_docs=30)
    run = tmp_path / "ft"
    res = _moelab("train", "--out", str(run), f"train.init_from={source}", f"data.source={other}",
                  "train.steps=2", "train.eval_every=2", "model.aux_loss_coef=0.05", *FROZEN)
    assert res.returncode == 0, res.stderr
    assert f"weights from {source}" in res.stderr and f"weights from {source}" in (run / "report.md").read_text()
    want = _model_section(source) | {"aux_loss_coef": 0.05}  # the source's model, with the override
    assert _model_section(run) == want
    # the new data is tokenised with the source's tokenizer, not a BPE trained on it
    vocab = lambda d: load_tokenizer(d / "tokenizer").tk.get_vocab(True)  # noqa: E731
    assert vocab(run) == vocab(source)
    _assert_weights_close(source, run)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["split"] == "val"
    # resuming needs only the run itself: the source may be gone
    shutil.move(source, tmp_path / "moved")
    try:
        res = _moelab("train", "--resume", "auto", "--out", str(run), "train.steps=3")
        assert res.returncode == 0, res.stderr
        assert "resumed at step 2" in res.stderr and "weights from" not in res.stderr
    finally:
        shutil.move(tmp_path / "moved", source)


def test_validation_documents_the_source_trained_on_are_counted(source, prepared, tmp_path):
    """Fine-tuning from a run on the same corpus split another way: most new validation documents
    were the source model's training documents, and the validation loss read as held out."""
    corpus = prepared.parent / "corpus"
    run = tmp_path / "ft"
    res = _moelab("train", "--out", str(run), f"train.init_from={source}", f"data.source={corpus}",
                  "data.split_salt=another", "data.val_fraction=0.3", "train.steps=2", "train.eval_every=2", *FROZEN)
    assert res.returncode == 0, res.stderr
    def names(data, split):
        return set(json.loads((data / "manifest.json").read_text())["splits"][split]["document_names"])

    val = names(run / "data" / "prepared", "val")
    both = len(val & names(prepared, "train"))  # the same files, so their names say which they are
    assert 0 < both < len(val)
    assert f"note: {both} of the {len(val)} validation documents are training documents of " in res.stderr
    assert json.loads((run / "data" / "split.json").read_text())["val_documents_trained_on_by_init_from"] == both
    assert f"Not held out: {both} validation documents" in (run / "report.md").read_text()
    res = _moelab("train", "--resume", "auto", "--out", str(run), "train.steps=3")  # said again: still not held out
    assert res.returncode == 0 and f"note: {both} validation documents are training documents" in res.stderr
    res = _moelab("eval", str(run), "--json", str(tmp_path / "e.json"))  # and by eval of its validation split
    assert res.returncode == 0 and f"note: {both} validation documents of ft/" in res.stderr, res.stderr
    assert json.loads((tmp_path / "e.json").read_text())["language"]["documents_in_training"] == both
    res = _moelab("data", "check", str(run))  # and by the leakage audit of its split
    assert f"note: besides, {both} validation documents are training documents of the model" in res.stdout
    # a run started from that one, on its very data: its own source held them out, the source's source did not
    res = _moelab("train", "--out", str(tmp_path / "next"), f"train.init_from={run}",
                  f"data.path={run / 'data' / 'prepared'}", "train.steps=1", "train.eval_every=1", *FROZEN)
    assert res.returncode == 0, res.stderr
    assert f"note: {both} of the {len(val)} validation documents are training documents of " in res.stderr
    assert "(or of a run it started from)" in res.stderr
    # the source's own split (its data.path), or data the source never saw: nothing to say
    for data in (f"data.path={prepared}", f"data.source={write_corpus(tmp_path / 'other', n_docs=30)}"):
        res = _moelab("train", "--out", str(tmp_path / data[5:9]), f"train.init_from={source}", data,
                      "train.steps=1", "train.eval_every=1", *FROZEN)
        assert res.returncode == 0 and "validation documents are training documents" not in res.stderr, res.stderr


def test_a_hugging_face_model_with_a_padded_vocabulary_is_a_source(source, tmp_path, prepared):
    """Released models pad the embedding past the tokenizer (Qwen3: 151,936 rows for 151,669 tokens):
    the run keeps the model's vocabulary, not the tokenizer's."""
    pytest.importorskip("transformers")
    from moelab.models import MoETransformer
    from moelab.models.hf import export_hf

    ours = load_model(source)
    cfg = ours.cfg
    cfg.vocab_size += 16
    padded = MoETransformer(cfg)
    sd = ours.state_dict()
    for name in ("embed.weight", "lm_head.weight"):
        sd[name] = torch.cat([sd[name], torch.randn(16, cfg.d_model) * 0.02])
    padded.load_state_dict(sd)
    hf = export_hf(padded, tmp_path / "hf")
    shutil.copy(source / "tokenizer" / "tokenizer.json", hf)
    run = tmp_path / "ft"
    res = _moelab("train", "--out", str(run), f"train.init_from={hf}", f"data.path={prepared}", "train.steps=1",
                  "train.eval_every=1", *FROZEN)
    assert res.returncode == 0, res.stderr
    assert _model_section(run)["vocab_size"] == cfg.vocab_size > load_tokenizer(hf).vocab_size
    got = load_model(run).state_dict()
    for name, t in padded.state_dict().items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=1e-12, msg=name)


def test_what_cannot_start_from_the_weights_is_one_line(source, tmp_path, prepared, capsys):
    from moelab.cli import main

    def refused(*args):
        out = tmp_path / "new"
        capsys.readouterr()
        assert main(["train", "--out", str(out), f"data.path={prepared}", "train.steps=1", *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("moelab: error:"), err
        assert not out.exists()  # nothing left behind: the corrected command can use the same --out
        return err

    err = refused(f"train.init_from={source}", "model.d_model=32")
    assert "do not fit" in err and "model.d_model 64 -> 32" in err
    # data tokenised with another vocabulary: its token ids would mean other strings to the model
    corpus = write_corpus(tmp_path / "c2", n_docs=20)
    prep2 = tmp_path / "prep2"
    assert main(["data", "prepare", str(corpus), "--out", str(prep2), "--vocab-size", "280"]) == 0
    err = refused(f"train.init_from={source}", f"data.path={prep2}")
    assert "another vocabulary" in err and str(source / "tokenizer") in err
    # a checkpoint kept outside a run has no tokenizer with it: say which one to give
    loose = tmp_path / "loose"
    shutil.copytree(source / "checkpoints" / "step_0000004", loose)
    err = refused(f"train.init_from={loose}", "data.path=")
    assert "has no tokenizer.json" in err and "data.tokenizer=PATH" in err
    # weights without trainer state (a converted model's) cannot be resumed: the refusal says what starts from them
    (loose / "trainer_state.pt").unlink()
    err = refused("--resume", str(loose))
    assert "cannot be resumed" in err and f"train.init_from={loose}" in err
    assert "is not a directory: give a run" in refused(f"train.init_from={loose / 'model.safetensors'}")
    (tmp_path / "empty").mkdir()
    assert "no checkpoint found" in refused(f"train.init_from={tmp_path / 'empty'}")


def test_a_source_runs_relative_data_path_is_found_from_where_it_was_started(prepared, tmp_path, monkeypatch):
    """A run's config keeps data.path as typed; read from another folder, a relative one is looked
    up from the folder the run was first started in (RUN/run.json), not from here."""
    from moelab.config import Config
    from moelab.data.overlap import run_data_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"cwd": "/elsewhere", "history": [{"cwd": str(prepared.parent.parent)}]}))
    cfg = Config()
    cfg.data.path = f"{prepared.parent.name}/{prepared.name}"
    monkeypatch.chdir(tmp_path)  # where that relative path names nothing
    assert run_data_dir(run, cfg) == prepared.parent.parent / cfg.data.path
    (run / "run.json").write_text(json.dumps({"cwd": str(tmp_path)}))  # started here: not there
    assert run_data_dir(run, cfg) is None
