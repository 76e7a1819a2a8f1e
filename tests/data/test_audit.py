"""The leakage audit flags a stride-1 randomly split dataset and passes moelab's own split of the
same text; near-copies are grouped by MinHash and split together."""

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moelab.data.audit import audit, ngram_hashes
from moelab.data.neardup import near_duplicate_groups
from moelab.data.sources import Document, load_corpus
from moelab.data.split import split_documents
from moelab.data.tokenizer import train_bpe


@pytest.fixture(scope="module")
def documents():
    """40 real, distinct documents: mid-sized stdlib modules outside the template-generated codec
    tables (the stdlib also holds byte-identical files, e.g. __phello__/__init__.py and spam.py),
    at most one per package: a package's files can share a long header (Python 3.13's _pyrepl/
    modules each open with the same license), which the audit rightly counts as overlap."""
    docs, seen, packages = [], set(), set()
    for d in load_corpus("stdlib").documents:
        package = d.name.rpartition("/")[0] or d.name
        if 1500 < len(d.text) < 6000 and not d.name.startswith(("encodings/", "distutils/")) \
                and d.text not in seen and package not in packages:
            seen.add(d.text)
            packages.add(package)
            docs.append(d)
    return docs[:40]


def _stride1_random_split(docs, chars=1200, stride=100, seed=0):
    """The failure mode moelab replaces: overlapping windows of the text, split at random."""
    text = "\n".join(d.text for d in docs)
    windows = [Document(f"w{i}", text[i:i + chars]) for i in range(0, len(text) - chars, stride)]
    random.Random(seed).shuffle(windows)
    cut = len(windows) // 10
    return windows[cut:], windows[:cut]


def test_ngram_hash_equality_matches_tuple_equality():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, 400)  # a 3-letter alphabet: many repeated 6-grams
    h = ngram_hashes(ids, 6)
    grams = [tuple(ids[i:i + 6]) for i in range(len(ids) - 5)]
    for i in range(0, len(grams), 7):
        for j in range(len(grams)):
            assert (h[i] == h[j]) == (grams[i] == grams[j])


def test_word_hashes_and_the_jaccard_estimate():
    """Words hash equal exactly when their text is equal; the one-permutation signature estimates
    the Jaccard similarity of two documents' 5-word shingle sets within sampling error."""
    import re

    from moelab.data.neardup import minhash, word_hashes

    text = "def f(x_1):\n    return x_1+ café  # café, x_1\n"
    words = re.findall(r"[0-9A-Za-z_\x80-\U0010ffff]+|[^\s]", text)
    h = word_hashes(text)
    assert len(h) == len(words) == 14
    assert all((h[i] == h[j]) == (words[i] == words[j]) for i in range(len(words)) for j in range(len(words)))
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(5000)]
    for share in (0.2, 0.5, 0.8):
        common = [rng.choice(vocab) for _ in range(int(3000 * share))]
        a = " ".join(common + [rng.choice(vocab) for _ in range(3000 - len(common))])
        b = " ".join(common + [rng.choice(vocab) for _ in range(3000 - len(common))])
        sh = [{tuple(t.split()[i:i + 5]) for i in range(len(t.split()) - 4)} for t in (a, b)]
        exact = len(sh[0] & sh[1]) / len(sh[0] | sh[1])
        estimate = float((minhash(a) == minhash(b)).mean())
        assert abs(estimate - exact) < 0.15, (share, exact, estimate)  # ~3.5 sd of 128 bins
    assert (minhash("one two three") == minhash("one two three")).all()
    assert (minhash("one two three") != minhash("four five six")).all()


def test_signatures_on_threads_equal_one_thread():
    """Threads share the power tables, which grow while they run, and documents are hashed in
    batches: the same signatures as one document at a time on one thread, short documents
    (fewer than 5 words, none) included."""
    from moelab.data import neardup

    texts = [" ".join(f"w{i * j % 997}" for j in range(40 * i + 5)) for i in range(1, 120)]
    texts[::17] = ["", "one", "two words", "x, y", "  \n ", "a b c d e", "é ü"][:len(texts[::17])]
    one = np.stack([neardup.minhash(t) for t in texts])
    assert np.array_equal(neardup.signatures(texts, threads=1, batch_chars=1 << 30), one)
    for _ in range(3):
        neardup._tables = neardup._tables[0][:1], neardup._tables[1][:1]  # start from empty tables
        assert np.array_equal(neardup.signatures(texts[::-1], threads=4, batch_chars=2000)[::-1], one)


def test_long_documents_hashed_in_segments_get_the_whole_documents_signature(monkeypatch):
    """A document longer than SEGMENT is hashed a piece at a time (bounded memory); cut between words
    with the previous piece's last words carried over, it must give exactly the signature of the
    whole text hashed at once: cuts next to punctuation, inside runs of spaces, beside multi-byte
    characters, in a word too long for one piece, and documents of a few huge words."""
    from moelab.data import neardup

    rng = np.random.default_rng(1)
    vocab = ["alpha", "beta_2", "γάμμα", "naïve", "x", "(", ")", ",", "==", "\n", "   ", "\t", "日本語", "9"]
    texts = ["".join(rng.choice(vocab, 3000)) + " " + " ".join(rng.choice(vocab, 2000)) for _ in range(6)]
    texts += ["w" * 500 + " tail words here", "a" * 300, "one " + "b" * 400 + " two", "short text"]
    whole = neardup.signatures(texts, threads=1)
    for segment in (17, 64, 301):
        monkeypatch.setattr(neardup, "SEGMENT", segment)
        assert np.array_equal(neardup.signatures(texts, threads=2, batch_chars=5000), whole), segment


def _groups_by_dicts(sigs, threshold=0.5):
    """signature_groups' rule, written plainly: in each band, a document joins the band's first
    document with the same band values when their signatures agree in at least `threshold` bins."""
    from moelab.data.neardup import BANDS, NUM_PERM

    parent = list(range(len(sigs)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    rows = NUM_PERM // BANDS
    for b in range(BANDS):
        first = {}
        for i, row in enumerate(sigs):
            j = first.setdefault(tuple(row[b * rows:(b + 1) * rows]), i)
            if j != i and (sigs[i] == sigs[j]).mean() >= threshold:
                ri, rj = find(i), find(j)
                parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(len(sigs))]


def test_signature_groups_follow_the_rule():
    from moelab.data import neardup

    rng = np.random.default_rng(0)
    for values in (3, 65536):  # 81 distinct bands, so many alike; and the full 16-bit range
        sigs = rng.integers(0, values, (300, neardup.NUM_PERM)).astype(neardup.SIG_DTYPE)
        for i in range(200, 300):  # near-copies of earlier rows: 40% of bins redrawn
            redraw = rng.random(neardup.NUM_PERM) < 0.4
            sigs[i] = np.where(redraw, rng.integers(0, values, neardup.NUM_PERM), sigs[rng.integers(0, 200)])
        want = _groups_by_dicts(sigs)
        assert len(set(want)) < 250  # the near-copies did join
        assert neardup.signature_groups(sigs) == want
    with pytest.raises(ValueError, match="signatures must be"):
        neardup.signature_groups(sigs.astype(np.uint64))
    texts = ["café au lait " * 20, "plain words only here and there", "x"]
    assert np.array_equal(neardup.signatures([t.encode() for t in texts]), neardup.signatures(texts))


def test_audit_flags_stride1_random_split_and_passes_document_split(documents):
    train, val = _stride1_random_split(documents)
    tok = train_bpe((d.text for d in train), 2000)
    leaky = audit(train, val, tok, ngram=32, seq_len=64)
    assert leaky.verdict == "leakage" and leaky.leaked_share > 0.9
    train, val = split_documents(documents, 0.2, near_duplicates=True)
    tok = train_bpe((d.text for d in train), 2000)
    honest = audit(train, val, tok, ngram=32, seq_len=64)
    assert honest.val_windows > 50 and not honest.duplicate_documents
    assert honest.verdict != "leakage" and honest.leaked_share < 0.05


def test_audit_reports_exact_duplicate_documents(documents):
    train, val = documents[:30], documents[30:35] + [Document("copy.py", documents[3].text + "\n  ")]
    tok = train_bpe((d.text for d in train), 1000)
    result = audit(train, val, tok)
    assert result.duplicate_documents == [{"val": "copy.py", "train": documents[3].name}]
    assert result.verdict == "leakage"
    assert result.overlapping_documents[0]["val"] == "copy.py"
    assert result.overlapping_documents[0]["share"] > 0.95  # all but the n-grams of the added tail


def test_near_copies_are_grouped_and_split_together(documents):
    base = documents[10].text
    words = base.split(" ")
    edited = " ".join(w if i % 50 else "changed" for i, w in enumerate(words))  # 2% of words
    docs = documents + [Document("zz_near_copy.py", edited)]
    groups = near_duplicate_groups([d.text for d in docs])
    assert groups[-1] == groups[10]
    assert len(set(groups[:-1])) == len(documents)  # distinct modules stay apart
    for salt in ("a", "b", "c", "d"):
        train, val = split_documents(docs, 0.3, salt, near_duplicates=True)
        sides = {d.name: "val" if d in val else "train" for d in docs}
        assert sides["zz_near_copy.py"] == sides[documents[10].name]


def test_data_check_cli_exit_codes(tmp_path, documents):
    def write(docs, folder):
        folder.mkdir()
        for i, d in enumerate(docs):
            (folder / f"{i:05d}.txt").write_text(d.text)

    train, val = _stride1_random_split(documents[:20])
    write(train, tmp_path / "leaky_train")
    write(val, tmp_path / "leaky_val")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moelab", "data", "check", *args],
                              capture_output=True, text=True)

    res = cli("--train", str(tmp_path / "leaky_train"), "--val", str(tmp_path / "leaky_val"),
              "--seq-len", "64", "--json", str(tmp_path / "r.json"))
    assert res.returncode == 1 and res.stdout.startswith("LEAKAGE"), res.stderr
    assert (tmp_path / "r.json").is_file()
    train, val = split_documents(documents, 0.2, near_duplicates=True)
    write(train, tmp_path / "train")
    write(val, tmp_path / "val")
    res = cli("--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--seq-len", "64")
    assert res.returncode == 0, res.stdout + res.stderr
    res = cli("--train", str(tmp_path / "train"))
    assert res.returncode == 2 and "--val" in res.stderr and "Traceback" not in res.stderr


def test_data_check_rederives_a_runs_own_split(tmp_path):
    import json

    from moelab.config import build_config
    from moelab.train.loop import train

    run = tmp_path / "run"
    train(build_config("test", None, ["train.steps=2", "train.eval_every=2"]), out=str(run), progress=False)
    split = json.loads((run / "data" / "split.json").read_text())
    res = subprocess.run([sys.executable, "-m", "moelab", "data", "check", str(run), "--json",
                          str(tmp_path / "r.json")], capture_output=True, text=True)
    assert res.returncode in (0, 1), res.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["train_documents"] == split["splits"]["train"]["documents"]
    assert result["val_documents"] == split["splits"]["val"]["documents"]
    assert result["seq_len"] == 64 and not result["duplicate_documents"]
    # audits that compare nothing are refused, not passed as CLEAN: an n-gram longer than the windows,
    # a window longer than the whole validation split; and a --tokenizer prepared tokens never used
    from tests.conftest import run_cli

    for args, said in ((["--seq-len", "8"], "need 2 <= --ngram (32) <= --seq-len (8)"),
                       (["--ngram", "100"], "need 2 <= --ngram (100) <= --seq-len (64)"),
                       (["--seq-len", str(10**9)], "fewer than one window of 1000000000"),
                       (["--tokenizer", str(run / "tokenizer")], "--tokenizer does not apply")):
        res = run_cli("data", "check", run, *args)
        assert res.returncode == 2 and said in res.stderr and res.stdout == "", (args, res.stderr)


def test_data_check_finds_multiple_choice_items_the_training_data_holds(tmp_path, documents, monkeypatch):
    """A benchmark whose items are in the training text scores high for having been read, not
    understood; `data check --choice` names those items (exit 1), on prepared data and on raw text."""
    import json

    from moelab.data.prepare import prepare
    from tests.conftest import run_cli

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in documents:
        (corpus / d.name.replace("/", "_")).write_text(d.text)
    data = prepare([str(corpus)], str(tmp_path / "p"), val_fraction=0.25, vocab_size=400)
    m = json.loads((data / "manifest.json").read_text())
    train_doc = (corpus / m["splits"]["train"]["document_names"][0]).read_text().split("\n")
    val_doc = (corpus / m["splits"]["val"]["document_names"][0]).read_text().split("\n")

    def item(lines, at):  # a context of lines and the next lines as the gold answer, verbatim
        return {"context": "\n".join(lines[at:at + 6]), "choices": ["something else entirely",
                                                                     "\n".join(lines[at + 6:at + 9])], "gold": 1}
    items = [{"context": "Which colour is the sky of the planet Zorbia at noon?", "choices": ["green", "mauve"],
              "gold": 0}, item(train_doc, 10), item(val_doc, 10), {"context": "a", "choices": ["b", "c"], "gold": 0}]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(it) + "\n" for it in items))
    res = run_cli("data", "check", data, "--seq-len", "64", "--choice", task, "--json", tmp_path / "r.json")
    assert res.returncode == 1, res.stdout + res.stderr  # contaminated, though the split itself is clean
    line = next(ln for ln in res.stdout.splitlines() if "items of task" in ln)
    assert line.startswith("CONTAMINATED: 1 of 4 items of task") and "(items 2);" in line, line
    assert "1 item(s) shorter than 13 tokens were not checked" in line
    got = json.loads((tmp_path / "r.json").read_text())["choice"]
    assert got == [{"task": "task (generic)", "items": 4, "ngram": 13, "contaminated": [2], "too_short": 1}]
    # --limit N: the first N items, those `eval --limit N` scores
    res = run_cli("data", "check", data, "--seq-len", "64", "--choice", task, "--limit", "1")
    assert res.returncode == 0 and "clean: 0 of 1 items of task" in res.stdout, res.stdout + res.stderr
    res = run_cli("data", "check", data, "--seq-len", "64", "--choice", task, "--limit", "2")
    assert res.returncode == 1 and "CONTAMINATED: 1 of 2 items of task" in res.stdout, res.stdout + res.stderr
    res = run_cli("data", "check", data, "--limit", "2")  # no task to pick items of
    assert res.returncode == 2 and "--limit 2 picks the items of --choice or --harness tasks" in res.stderr
    # raw text: the validation item counts once its document is training text
    (tmp_path / "val.txt").write_text(" ".join(f"word{i % 97} novel{i % 13}" for i in range(300)))
    res = run_cli("data", "check", "--train", corpus, "--val", tmp_path / "val.txt", "--seq-len", "64",
                  "--tokenizer", data / "tokenizer", "--choice", task)
    assert "CONTAMINATED: 2 of 4 items of task (generic) (context and gold answer) share" in res.stdout
    assert "(items 2, 3);" in res.stdout and res.returncode == 1
    # the training tokens stream past in chunks: an n-gram across a chunk's edge is still found
    from moelab.data import audit as audit_mod

    stream = np.arange(1000, dtype=np.int64)
    for chunk in (7, 50, 1 << 22):
        monkeypatch.setattr(audit_mod, "CHUNK_TOKENS", chunk)
        assert audit_mod.contaminated_items([stream], [list(range(45, 60)), [5, 4, 3] * 5, [1]], 13) == ([0], 1)
    res = run_cli("data", "check", data, "--choice", tmp_path / "none.jsonl")  # before the audit's work
    assert res.returncode == 2 and "no such task file" in res.stderr and res.stdout == ""
    # a run that tracks the task says so at its start, and past a size says how to check instead

    train = ("train", "--preset", "test", f"data.path={data}", "train.steps=1", "train.eval_every=1",
             "train.report=false", "model.max_seq_len=256", f"train.choice_tasks={task}", "--out")
    res = run_cli(*train, tmp_path / "run")
    assert res.returncode == 0, res.stderr
    assert "note: 1 of the 4 items of task (generic) share a 13-token sequence with the training data" in res.stderr
    assert f"`moelab data check {tmp_path / 'run'} --choice {task}` names them" in res.stderr
    monkeypatch.setattr(audit_mod, "CONTAMINATION_CHECK_TOKENS", 10)
    res = run_cli(*train, tmp_path / "big")
    assert res.returncode == 0 and "were not checked for contamination against" in res.stderr, res.stderr
    res = run_cli("eval", tmp_path / "run", "--choice", task, "--limit", "3")  # the command checks what eval scored
    said = f"`moelab data check {tmp_path / 'run'} --choice {task} --limit 3` does"
    assert res.returncode == 0 and said in res.stderr, res.stderr


def test_eval_and_init_from_runs_count_the_items_any_earlier_training_data_holds(tmp_path, documents, monkeypatch):
    """`eval RUN --choice` says which items the run trained on. A run started from another run's
    weights (train.init_from) has seen that run's training data too: its own data being clean does
    not make the benchmark clean, so train, eval and `data check RUN` count both."""
    import json

    from moelab.data import audit as audit_mod
    from moelab.data.prepare import prepare
    from tests.conftest import run_cli

    corpus, rest = tmp_path / "corpus", tmp_path / "rest"
    corpus.mkdir()
    rest.mkdir()
    for d in documents:
        (corpus / d.name.replace("/", "_")).write_text(d.text)
    data = prepare([str(corpus)], str(tmp_path / "p"), val_fraction=0.25, vocab_size=400)
    first = json.loads((data / "manifest.json").read_text())["splits"]["train"]["document_names"][0]
    for f in corpus.iterdir():  # the same text without the training document the item is taken from
        if f.name != first:
            (rest / f.name).write_text(f.read_text())
    data2 = prepare([str(rest)], str(tmp_path / "p2"), val_fraction=0.25, tokenizer=str(data / "tokenizer"))
    lines = (corpus / first).read_text().split("\n")
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "\n".join(lines[10:16]), "gold": 1,
                                "choices": ["something else entirely", "\n".join(lines[16:19])]}) + "\n"
                    + json.dumps({"context": "Which colour is the sky of the planet Zorbia at noon?",
                                  "choices": ["green", "mauve"], "gold": 0}) + "\n")
    res = run_cli("data", "check", data2, "--choice", task)
    assert "clean: 0 of 2 items of task" in res.stdout, res.stdout + res.stderr  # the second data alone is clean
    said = "note: 1 of the 2 items of task (generic) share a 13-token sequence with the training data this model"
    common = ("--preset", "test", "train.steps=1", "train.eval_every=1", "train.report=false", "model.max_seq_len=256")
    res = run_cli("train", *common, f"data.path={data}", "--out", tmp_path / "run")
    assert res.returncode == 0 and said not in res.stderr, res.stderr  # not tracked, not checked
    res = run_cli("eval", tmp_path / "run", "--choice", task, "--json", tmp_path / "e.json")
    assert res.returncode == 0 and said in res.stderr, res.stderr
    assert f"`moelab data check {tmp_path / 'run'} --choice {task}` names them" in res.stderr
    assert json.loads((tmp_path / "e.json").read_text())["choice"][0]["contaminated_items"] == 1
    res = run_cli("train", *common, f"data.path={data2}", f"train.init_from={tmp_path / 'run'}",
                  f"train.choice_tasks={task}", "--out", tmp_path / "ft")
    assert res.returncode == 0 and said in res.stderr and "not that of" not in res.stderr, res.stderr
    # recorded with the scores, and said where they are shown
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["choice"][0]["contaminated_items"] == 1
    assert run_cli("report", tmp_path / "ft").returncode == 0
    page = (tmp_path / "ft" / "report.md").read_text()
    assert "items in training data" in page and "Contaminated: 1 of the 2 items of task (generic)" in page
    # a resume checks the run's own saved tasks again (it checked none, and recorded no count); one whose
    # task file is gone says how to go on
    res = run_cli("train", "--resume", "auto", "--out", tmp_path / "ft", "train.steps=2")
    assert res.returncode == 0 and said in res.stderr, res.stderr
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["choice"][0]["contaminated_items"] == 1
    task.rename(tmp_path / "moved.jsonl")
    res = run_cli("train", "--resume", "auto", "--out", tmp_path / "ft", "train.steps=3")
    assert res.returncode == 2 and "put it back, or resume with train.choice_tasks= (no tasks)" in res.stderr
    res = run_cli("train", "--resume", "auto", "--out", tmp_path / "ft", "train.steps=3", "train.choice_tasks=")
    assert res.returncode == 0, res.stderr
    task = (tmp_path / "moved.jsonl").rename(task)
    res = run_cli("eval", tmp_path / "ft", "--choice", task, "--json", tmp_path / "e.json")
    assert said in res.stderr and json.loads((tmp_path / "e.json").read_text())["choice"][0]["contaminated_items"] == 1
    res = run_cli("data", "check", tmp_path / "ft", "--choice", task)
    assert res.returncode == 1 and "CONTAMINATED: 1 of 2 items of task" in res.stdout, res.stdout + res.stderr
    # a model whose training data is gone (or an HF model's, never known) is said to be left out of the count
    import shutil

    shutil.copytree(data, tmp_path / "gone")
    assert run_cli("train", *common, f"data.path={tmp_path / 'gone'}", "--out", tmp_path / "g").returncode == 0
    shutil.rmtree(tmp_path / "gone")
    res = run_cli("train", *common, f"data.path={data2}", f"train.init_from={tmp_path / 'g'}",
                  f"train.choice_tasks={task}", "--out", tmp_path / "g2")
    left_out = f"the contamination check read this run's training data (and that of the moelab runs it started " \
               f"from), not that of {tmp_path / 'g'}, whose weights it started from"
    assert res.returncode == 0 and left_out in res.stderr and said not in res.stderr, res.stderr
    got = json.loads((tmp_path / "g2" / "summary.json").read_text())["choice"][0]
    assert got["contaminated_items"] == 0 and got["training_data_not_read"] == [str(tmp_path / "g")]
    res = run_cli("eval", tmp_path / "g2", "--choice", task, "--json", tmp_path / "e.json")
    assert left_out in res.stderr and json.loads((tmp_path / "e.json").read_text())["choice"][0][
        "training_data_not_read"] == [str(tmp_path / "g")]
    assert run_cli("report", tmp_path / "g2").returncode == 0
    assert f"not in that of {tmp_path / 'g'}, whose weights" in (tmp_path / "g2" / "report.md").read_text()
    # past the size read at once, eval says how to check instead, and records that it did not
    monkeypatch.setattr(audit_mod, "CONTAMINATION_CHECK_TOKENS", 10)
    res = run_cli("eval", tmp_path / "ft", "--choice", task, "--json", tmp_path / "e.json")
    assert res.returncode == 0 and "were not checked for contamination against" in res.stderr, res.stderr
    assert json.loads((tmp_path / "e.json").read_text())["choice"][0]["contaminated_items"] is None


@pytest.mark.slow
def test_eval_harness_names_the_items_the_run_trained_on(tmp_path, documents, monkeypatch, capfd):
    """`eval RUN --harness` checks the lm_eval tasks' evaluated documents (context and gold answer)
    against the run's training data, as `--choice` does its JSONL tasks, and names them by doc_id.
    Run outside a git repository, it prints no git "fatal:" line (lm_eval's commit lookup).
    `data check --harness` reads the same documents from the tasks without a model."""
    import json

    lm_eval = pytest.importorskip("lm_eval")
    from moelab.data.prepare import prepare
    from tests.conftest import run_cli
    from tests.eval.test_choice import _local_harness_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in documents:
        (corpus / d.name.replace("/", "_")).write_text(d.text)
    data = prepare([str(corpus)], str(tmp_path / "p"), val_fraction=0.25, vocab_size=400)
    splits = json.loads((data / "manifest.json").read_text())["splits"]
    seen, unseen = ((corpus / splits[s]["document_names"][0]).read_text().split("\n") for s in ("train", "val"))

    def row(i, lines):  # a question and its gold answer (B) taken verbatim from a document
        return {"id": f"q{i}", "question": "\n".join(lines[10:16]), "answerKey": "B", "choices": {
            "text": ["something else entirely", "\n".join(lines[16:19]), "no", "yes"], "label": list("ABCD")}}
    rows = [row(0, unseen), row(1, seen), row(2, unseen)]
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    name = _local_harness_task(Path(lm_eval.__file__).parent / "tasks", "arc", tmp_path / "arc.jsonl",
                               tmp_path / "tasks")
    # the same task one-shot, with a description every prompt holds: text from the training data
    desc = next("\n".join(seen[i:i + 6]) for i in range(20, len(seen)) if len("".join(seen[i:i + 6])) > 200
                and not any(c in "".join(seen[i:i + 6]) for c in "{}%"))  # (no Jinja in the task YAML)
    fs, yaml_file = f"{name}_fs", tmp_path / "tasks" / f"{name}.yaml"
    yaml_file.write_text(yaml_file.read_text() + "tag:\n  - moelab_both\n")  # both tasks by one name
    (tmp_path / "tasks" / f"{fs}.yaml").write_text(yaml_file.read_text().replace(f"task: {name}", f"task: {fs}")
                                                   + f"num_fewshot: 1\ndescription: {json.dumps(desc + chr(10))}\n")
    res = run_cli("train", "--preset", "test", f"data.path={data}", "train.steps=1", "train.eval_every=1",
                  "train.report=false", "model.max_seq_len=512", "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    monkeypatch.chdir(tmp_path)  # not in a git repository
    capfd.readouterr()
    res = run_cli("eval", tmp_path / "run", "--harness", f"{name},{fs}", "--include-path", tmp_path / "tasks",
                  "--json", tmp_path / "e.json")
    assert res.returncode == 0, res.stderr
    assert "fatal:" not in capfd.readouterr().err  # git's own stderr, past Python's
    assert f"lm_eval {name}: acc " in res.stdout and " +- " in res.stdout and "| 3 items\n" in res.stdout
    assert "sample_len" not in res.stdout  # lm_eval's document count, printed as a metric
    for task in (name, fs):
        assert (f"note: 1 of the 3 items of {task} share a 13-token sequence with the training data this model has "
                "seen, so its score measures recall as well as skill; lm_eval doc_id 1\n" in res.stderr), res.stderr
        assert json.loads((tmp_path / "e.json").read_text())["harness"][task]["contaminated_items"] == 1
    # each item is checked by its own text: the harness's zero-shot prompt and gold answer; the
    # one-shot prompts also hold another item and the description
    from lm_eval.tasks import TaskManager

    from moelab.eval.harness import MoelabLM, sample_text, task_texts

    logged = lm_eval.simple_evaluate(model=MoelabLM(str(tmp_path / "run")), tasks=[name, fs], log_samples=True,
                                     task_manager=TaskManager(include_path=str(tmp_path / "tasks")))["samples"]
    logged = {t: sorted((sm["doc_id"], sample_text(sm)) for sm in logged[t]) for t in (name, fs)}
    ours = task_texts("moelab_both", str(tmp_path / "tasks"))  # a tag: the tasks within it
    assert ours[name] == ours[fs] == logged[name] and len(ours[name]) == 3
    assert all(text.startswith(desc) and text.count("Question:") == 2 for _, text in logged[fs])
    # so `data check` names the same item, on the run and on its prepared data alone
    for checked in (tmp_path / "run", data):
        res = run_cli("data", "check", checked, "--harness", f"{name},{fs}", "--include-path", tmp_path / "tasks",
                      "--json", tmp_path / "c.json")
        assert res.returncode == 1, res.stderr
        for task in (name, fs):
            assert (f"CONTAMINATED: 1 of 3 items of {task} (context and gold answer) share a 13-token sequence "
                    "with the training data (lm_eval doc_id 1)") in res.stdout, res.stdout
        found = json.loads((tmp_path / "c.json").read_text())["choice"]
        assert [(c["task"], c["contaminated"], c["doc_ids"]) for c in found] == [(name, [2], [1]), (fs, [2], [1])]
    for limit, code, said in (("1", 0, "clean: 0 of 1 items"), ("2", 1, "CONTAMINATED: 1 of 2 items")):
        res = run_cli("data", "check", data, "--harness", name, "--include-path", tmp_path / "tasks", "--limit", limit)
        assert res.returncode == code and f"{said} of {name}" in res.stdout, res.stdout + res.stderr
    res = run_cli("data", "check", data, "--include-path", tmp_path / "tasks")  # the folder alone does nothing
    assert res.returncode == 2 and "add --harness TASKS" in res.stderr and not res.stdout
    res = run_cli("data", "check", data, "--harness", "no_such_task", "--include-path", tmp_path / "tasks")
    assert res.returncode == 2 and "unknown lm_eval task 'no_such_task'" in res.stderr and not res.stdout
    # past the size eval reads at once, it gives that data check command
    from moelab.data import audit as audit_mod

    monkeypatch.setattr(audit_mod, "CONTAMINATION_CHECK_TOKENS", 10)
    res = run_cli("eval", tmp_path / "run", "--harness", name, "--include-path", tmp_path / "tasks", "--limit", "2")
    assert res.returncode == 0 and (f"`moelab data check {tmp_path / 'run'} --harness {name} --include-path "
                                    f"{tmp_path / 'tasks'} --limit 2` does") in res.stderr, res.stderr
