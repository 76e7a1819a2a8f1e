"""No validation document may reach training data; the split is stable; windows never overlap."""

import json

import pytest
import torch

from moelab.config import DataConfig
from moelab.data.loader import BatchLoader, make_windows, pack
from moelab.data.pipeline import build_dataset
from moelab.data.sources import Document, load_corpus
from moelab.data.split import split_documents
from moelab.errors import UserError


def test_no_validation_document_in_training_windows(text_corpus, tmp_path):
    cfg = DataConfig(source=str(text_corpus), val_fraction=0.2, vocab_size=400)
    ds = build_dataset(cfg, seq_len=32, run_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "data" / "split.json").read_text())
    val_names, train_names = set(report["val_documents"]), set(report["train_documents"])
    assert val_names and train_names and not (val_names & train_names)
    assert len(val_names) + len(train_names) == 60
    train_text = ds.tokenizer.decode(ds.train_windows[:].flatten().tolist())
    val_text = ds.tokenizer.decode(ds.val_windows[:].flatten().tolist())
    for name in val_names:  # each document carries its own marker word
        marker = f"marker{name[3:6]}x"
        assert marker not in train_text
    assert any(f"marker{n[3:6]}x" in val_text for n in val_names)
    assert any(f"marker{n[3:6]}x" in train_text for n in train_names)


def test_split_is_stable_when_documents_are_added():
    docs = [Document(f"d{i}.txt", f"x{i}") for i in range(200)]
    _, val = split_documents(docs, 0.1)
    _, val_more = split_documents(docs + [Document(f"new{i}.txt", f"y{i}") for i in range(100)], 0.1)
    assert {d.name for d in val} <= {d.name for d in val_more}
    assert 5 <= len(val) <= 40


def test_windows_are_disjoint_and_loader_resumes_exactly():
    stream = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_id=0)
    assert stream.tolist() == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0]
    w = make_windows(torch.arange(100), seq_len=9)
    assert w.shape == (10, 10) and w.flatten().unique().numel() == 100
    loader = BatchLoader(torch.arange(400).view(40, 10), batch_size=3, seed=7)
    for _ in range(25):  # crosses an epoch boundary (13 batches per epoch)
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch()[0] for _ in range(8)]
    fresh = BatchLoader(torch.arange(400).view(40, 10), batch_size=3, seed=7)
    fresh.load_state_dict(state)
    for want in expected:
        assert torch.equal(fresh.next_batch()[0], want)
    # a checkpoint written when the position was a batch index resumes at the same window
    old_style = {k: v for k, v in state.items() if k != "position"} | {"index": state["position"] // 3}
    fresh = BatchLoader(torch.arange(400).view(40, 10), batch_size=3, seed=7)
    fresh.load_state_dict(old_style)
    assert torch.equal(fresh.next_batch()[0], expected[0])


def test_each_epoch_is_one_permutation_in_whole_batches():
    windows = torch.arange(40).view(40, 1).expand(40, 10)
    loader = BatchLoader(windows, batch_size=3, seed=7)
    for epoch in range(2):  # 13 batches of 3 from one permutation of the 40 windows; the 40th is left out
        seen = torch.cat([loader.next_batch()[0][:, 0] for _ in range(13)])
        assert seen.unique().numel() == 39 and torch.equal(seen, loader._perm(epoch)[:39])
    assert loader.epoch == 1 and loader.next_batch()[0].shape == (3, 9) and loader.epoch == 2


def test_a_resume_may_change_the_batch_size_and_continues_from_the_same_window():
    """batch 8 becoming 4 (the out-of-memory advice: half the micro-batch, twice the accumulation):
    each pair of batches of 4 is the batch of 8 the run would have drawn."""
    windows = torch.arange(4000).view(400, 10)
    eights = BatchLoader(windows, batch_size=8, seed=3)
    for _ in range(30):
        eights.next_batch()
    state = eights.state_dict()
    fours = BatchLoader(windows, batch_size=4, seed=3)
    fours.load_state_dict(state)
    for _ in range(40):  # crosses the epoch boundary (50 batches of 8)
        assert torch.equal(eights.next_batch()[0], torch.cat([fours.next_batch()[0], fours.next_batch()[0]]))
    other = BatchLoader(windows, batch_size=8, seed=4)
    with pytest.raises(ValueError, match=r"loader seed changed since the checkpoint \(3 -> 4\)"):
        other.load_state_dict(state)


def test_stdlib_corpus_skips_tests_and_site_packages():
    corpus = load_corpus("stdlib")
    names = [d.name for d in corpus.documents]
    assert len(names) > 100 and all(n.endswith(".py") for n in names)
    assert not any(n.startswith(("test/", "site-packages/")) or "/tests/" in n for n in names)


def test_tiny_corpora_hold_out_whole_near_duplicate_groups():
    """With too few documents for val_fraction, one unit is held out: a document together with its
    near-copies (holding out one copy of three put 100% leaked windows into validation)."""
    import pytest

    from moelab.errors import UserError

    text = " ".join(f"line {i} of the services table maps a port to a name" for i in range(300))
    copies = [Document(f"copy{i}.txt", text + f" copy {i}") for i in range(3)]
    other = [Document(f"other{i}.txt", " ".join(f"word{j * (i + 2)} text" for j in range(400))) for i in range(2)]
    for val_fraction in (0.01, 0.99):  # nothing below the fraction, or everything
        train, val = split_documents(copies + other, val_fraction, near_duplicates=True)
        assert train and val and len({d in val for d in copies}) == 1  # every copy on one side
    with pytest.raises(UserError, match="near-copies of each other"):
        split_documents(copies, 0.05, near_duplicates=True)
    train, val = split_documents(copies, 0.05)  # without near-duplicate grouping: documents as they are
    assert len(train) == 2 and len(val) == 1


@pytest.mark.parametrize("near_duplicates", [False, True])
def test_exact_copies_share_a_side_even_with_near_copy_grouping_off(near_duplicates):
    """data.near_dup_split=false (--no-near-dup-split) split every document by its own name, so a
    file copied under another name could sit in validation with its twin in training."""
    import random

    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(5000)}" for _ in range(80)) for i in range(60)]
    docs = [Document(f"d{i:02d}.txt", t) for i, t in enumerate(texts)]
    copies = [Document(f"copy{i:02d}.txt", t) for i, t in enumerate(texts[:20])]
    train, val = split_documents(docs + copies, 0.3, near_duplicates=near_duplicates)
    assert val and train and len(train) + len(val) == 80
    assert not {d.text for d in train} & {d.text for d in val}
    assert sum(d.text in {c.text for c in copies} for d in val) % 2 == 0  # whole pairs
    alone = {d.name for d in split_documents(docs, 0.3, near_duplicates=near_duplicates)[1]}
    assert {d.name for d in val if d.name >= "d20"} == {n for n in alone if n >= "d20"}  # the others stay


def test_a_corpus_of_one_text_copied_is_refused_with_near_copy_grouping_off():
    docs = [Document(f"d{i}.txt", "the same text") for i in range(5)]
    with pytest.raises(UserError, match="all 5 documents are copies of one text"):
        split_documents(docs, 0.2)


def test_a_validation_split_of_a_few_documents_is_said_with_the_fraction_that_holds_out_more(text_corpus, tmp_path):
    """One held-out text decides early stopping and the best checkpoint without a word; the note names
    the smallest fraction (to 0.3) that would hold out 5, and is not said where none would."""
    from moelab.data.split import few_val_note
    from tests.conftest import run_cli

    assert "x=0.2 would hold out about 6" in few_val_note(1, 30, 4502, 0.05, "x={}")
    for enough in ((5, 30, 0.05), (1, 12, 0.05), (2, 100, 0.3)):  # 5 held out; 0.3 of 12 is 3.6; 0.3 asked
        assert few_val_note(enough[0], enough[1], 100, enough[2], "x={}") is None
    # the tiny-corpus fallback holds out one document (60 in all): prepare and train say so
    res = run_cli("data", "prepare", text_corpus, "--out", tmp_path / "p", "--val-fraction", "0.001",
                  "--vocab-size", "300")
    assert res.returncode == 0, res.stderr
    said = "note: the validation split is 1 of 60 documents"
    assert said in res.stderr and "`--val-fraction 0.1` would hold out about 6" in res.stderr, res.stderr
    common = ("train", "--preset", "test", "train.steps=1", "train.eval_every=1", "train.report=false", "--out")
    res = run_cli(*common, tmp_path / "run", f"data.path={tmp_path / 'p'}")
    assert res.returncode == 0 and said in res.stderr and "data prepare ... --val-fraction 0.1`" in res.stderr
    res = run_cli(*common, tmp_path / "raw", f"data.source={text_corpus}", "data.val_fraction=0.001",
                  "data.vocab_size=300")
    total = sum(json.loads((tmp_path / "raw" / "data" / "split.json").read_text())["splits"][k]["documents"]
                for k in ("train", "val"))  # the test preset reads data.max_docs of them
    f = next(f for f in (0.1, 0.15, 0.2) if total * f >= 5)
    assert res.returncode == 0 and f"is 1 of {total} documents" in res.stderr, res.stderr
    assert f"data.val_fraction={f} would hold out about {round(total * f)}" in res.stderr, res.stderr
    assert run_cli("report", tmp_path / "raw").returncode == 0  # the report's metrics say it too
    page = (tmp_path / "raw" / "report.md").read_text()
    assert "Validation split (1 document, " in page and "so few that these figures measure those texts" in page
    res = run_cli(*common, tmp_path / "more", f"data.source={text_corpus}", "data.val_fraction=0.3",
                  "data.vocab_size=300")
    held = json.loads((tmp_path / "more" / "data" / "split.json").read_text())["splits"]["val"]["documents"]
    assert res.returncode == 0 and (said[:33] in res.stderr) == (held < 5), (held, res.stderr)
