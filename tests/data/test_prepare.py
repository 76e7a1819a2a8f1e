"""`moelab data prepare`: memory-mapped streams equal in-memory packing; training and resuming on a
prepared directory; the output directory is never clobbered without --overwrite."""

import json
import re
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from moelab.data.loader import BatchLoader, make_windows, pack
from moelab.data.prepare import load_prepared, prepare, split_streams
from moelab.data.sources import overlapping_sources, stdlib_root
from moelab.data.tokenizer import load_tokenizer
from moelab.errors import UserError


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True)


def test_prepared_streams_equal_in_memory_packing(tmp_path, text_corpus):
    extra = tmp_path / "extra.jsonl"
    extra.write_text("\n".join(json.dumps({"text": f"record {i} " * 50}) for i in range(10)) + "\n{bad\n")
    out = prepare([str(text_corpus), str(extra)], str(tmp_path / "prep"), val_fraction=0.2, vocab_size=300)
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["sources"]) == {str(text_corpus), str(extra)}
    assert m["sources"][str(extra)] == {"documents": 10, "skipped": 1, "bytes": m["sources"][str(extra)]["bytes"]}
    assert {"name": "extra.jsonl/extra.jsonl#11", "reason": "invalid JSON"} in m["skipped"]
    names = m["splits"]["train"]["document_names"] + m["splits"]["val"]["document_names"]
    assert len(names) == len(set(names)) == 70
    for split in m["splits"].values():  # per source within each split: they add up to the split
        per = split["sources"]
        assert set(per) == {str(text_corpus), str(extra)}
        for key in ("documents", "bytes", "tokens"):
            assert sum(r[key] for r in per.values()) == split[key]
    tok = load_tokenizer(out / "tokenizer")
    texts = {}
    for p in sorted(text_corpus.iterdir()):
        texts[f"corpus/{p.name}"] = p.read_text()
    for i in range(10):
        texts[f"extra.jsonl/extra.jsonl#{i + 1}"] = f"record {i} " * 50
    for split in ("train", "val"):
        ref = pack(tok.encode_batch([texts[n] for n in m["splits"][split]["document_names"]]), tok.eos_id)
        (stream, starts), = split_streams(out, split)  # one shard at this size
        assert stream.dtype == np.uint16 and np.array_equal(stream.astype(np.int64), ref.numpy())
        assert (stream[starts[1:] - 1] == tok.eos_id).all()
    _, train_w, val_w, _ = load_prepared(out, 16)
    assert torch.equal(val_w[torch.arange(val_w.shape[0])], make_windows(ref, 16))
    # the loader over memory-mapped windows resumes exactly
    a = BatchLoader(train_w, 4, seed=3)
    for _ in range(5):
        a.next_batch()
    b = BatchLoader(load_prepared(out, 16)[1], 4, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        x1, y1 = a.next_batch()
        x2, y2 = b.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.dtype == torch.int64


def test_shards_hold_the_same_stream_and_windows_span_them(tmp_path, text_corpus):
    """Cut into many shards at document boundaries, a split holds exactly the single-shard tokens
    (same fingerprint), each shard starts with a whole document, windows are cut within shards,
    and the loader over sharded windows resumes exactly."""
    one = prepare([str(text_corpus)], str(tmp_path / "one"), val_fraction=0.2, vocab_size=300)
    res = _cli("data", "prepare", str(text_corpus), "--out", str(tmp_path / "many"), "--val-fraction", "0.2",
               "--tokenizer", str(one / "tokenizer"), "--shard-tokens", "2000")
    assert res.returncode == 0 and "shard(s)" in res.stdout, res.stderr
    many = tmp_path / "many"
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, many))
    assert m1["fingerprint"] == m2["fingerprint"] and m2["format"] == 2
    shards = m2["splits"]["train"]["shards"]
    assert len(shards) >= 4 and sum(s["documents"] for s in shards) == m2["splits"]["train"]["documents"]
    eos = m2["eos_id"]
    (ref, ref_starts), = split_streams(one, "train")
    parts = split_streams(many, "train")
    assert np.array_equal(np.concatenate([s for s, _ in parts]), ref)
    offset, starts = 0, []
    for (stream, doc_starts), info in zip(parts, shards):
        assert stream[-1] == eos and doc_starts[0] == 0 and info["tokens"] == stream.shape[0]
        assert all(s["tokens"] >= 2000 for s in shards[:-1])  # a shard closes once it is full
        starts.append(doc_starts + offset)
        offset += stream.shape[0]
    assert np.array_equal(np.concatenate(starts), ref_starts)
    seq = 16
    _, train_w, _, _ = load_prepared(many, seq)
    expect = torch.cat([make_windows(torch.from_numpy(s.astype(np.int64)), seq) for s, _ in parts])
    assert train_w.shape == tuple(expect.shape)
    rows = torch.randperm(train_w.shape[0])[:50]
    assert torch.equal(train_w[rows], expect[rows]) and torch.equal(train_w[3:9], expect[3:9])
    a = BatchLoader(train_w, 4, seed=1)
    for _ in range(7):
        a.next_batch()
    b = BatchLoader(load_prepared(many, seq)[1], 4, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    res = _cli("data", "check", str(many), "--seq-len", "32")  # the audit reads every shard
    assert res.returncode == 0 and "clean" in res.stdout.lower(), res.stdout + res.stderr


def test_train_on_prepared_data_and_resume(tmp_path, text_corpus):
    from moelab import load_model
    from moelab.config import build_config
    from moelab.train.checkpoint import list_checkpoints
    from moelab.train.loop import train

    res = _cli("data", "prepare", str(text_corpus), "--out", str(tmp_path / "prep"), "--vocab-size", "300",
               "--val-fraction", "0.2")
    assert res.returncode == 0 and res.stdout.startswith("prepared"), res.stderr
    args = [f"data.path={tmp_path / 'prep'}", "train.steps=6", "train.save_every=3", "train.eval_every=3"]
    full = train(build_config("test", None, args), out=str(tmp_path / "full"), progress=False)
    val = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"]
    assert full["val_loss"] < val[0]["loss"] - 0.3  # it learned from the prepared tokens
    part = tmp_path / "part"
    train(build_config("test", None, args), out=str(part), progress=False)
    import shutil

    shutil.rmtree(list_checkpoints(part)[-1])
    train(build_config("test", None, args), out=str(part), resume="auto", progress=False)
    for (n, x), y in zip(load_model(tmp_path / "full").state_dict().items(), load_model(part).state_dict().values()):
        assert torch.equal(x, y), n
    assert (tmp_path / "full" / "tokenizer" / "tokenizer.json").is_file()


def test_prepare_never_clobbers_without_overwrite(tmp_path, text_corpus):
    out = tmp_path / "prep"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = _cli("data", "prepare", str(text_corpus), "--out", str(out), "--vocab-size", "300")
    assert res.returncode == 2 and "--overwrite" in res.stderr and "Traceback" not in res.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    # --overwrite replaces earlier prepared data, never a folder of other files (--out ~ --overwrite)
    res = _cli("data", "prepare", str(text_corpus), "--out", str(out), "--vocab-size", "300", "--overwrite")
    assert res.returncode == 2 and "also holds precious.txt" in res.stderr
    assert (out / "precious.txt").read_text() == "keep me" and not (out / "manifest.json").exists()
    (out / "precious.txt").unlink()
    for vocab in ("300", "280"):
        res = _cli("data", "prepare", str(text_corpus), "--out", str(out), "--vocab-size", vocab, "--overwrite")
        assert res.returncode == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 280  # replaced
    (out / "notes.md").write_text("mine")  # beside prepared data: refused too
    res = _cli("data", "prepare", str(text_corpus), "--out", str(out), "--vocab-size", "300", "--overwrite")
    assert res.returncode == 2 and "also holds notes.md" in res.stderr and (out / "notes.md").is_file()
    res = _cli("train", "--preset", "test", f"data.path={tmp_path / 'nothing'}", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "not a prepared data directory" in res.stderr


def test_data_check_on_prepared_directories(tmp_path, text_corpus):
    """The audit reads prepared token streams: a directory whose validation documents copy
    training documents is flagged; moelab's own split of distinct documents is not."""
    import shutil

    clean = prepare([str(text_corpus)], str(tmp_path / "clean"), val_fraction=0.2, vocab_size=300)
    res = _cli("data", "check", str(clean), "--seq-len", "64", "--json", str(tmp_path / "c.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["val_windows"] > 10 and result["leaked_windows"] == 0
    leaky_src = tmp_path / "leaky_src"
    shutil.copytree(text_corpus, leaky_src)
    for p in sorted(text_corpus.iterdir())[:30]:  # near-copies under other names (exact ones always
        (leaky_src / f"copy_{p.name}").write_text(p.read_text() + "edited\n")  # share a side)
    leaky = prepare([str(leaky_src)], str(tmp_path / "leaky"), val_fraction=0.3, vocab_size=300,
                    near_dup_split=False)
    res = _cli("data", "check", str(leaky), "--seq-len", "64")
    assert res.returncode == 1 and "duplicate" in res.stdout, res.stdout + res.stderr


def test_sources_with_the_same_folder_name_keep_apart(tmp_path):
    """a/docs and b/docs both named their documents docs/f1.txt...: the names collided, so the
    per-source bytes, the mixing and the near-duplicate map mixed the two sources up."""
    sizes = {}
    for side, words in (("a", "alpha beta gamma delta"), ("b", "one two three four five")):
        (tmp_path / side / "docs").mkdir(parents=True)
        for i in range(6):
            text = f"{side} document {i} " + " ".join(words.split()[(i + j) % 4] for j in range(300 + 40 * i))
            (tmp_path / side / "docs" / f"f{i}.txt").write_text(text)
            sizes[side] = sizes.get(side, 0) + len(text.encode())
    a, b = str(tmp_path / "a" / "docs"), str(tmp_path / "b" / "docs")
    m = json.loads((prepare([a, b], str(tmp_path / "p"), val_fraction=0.2, vocab_size=300) / "manifest.json")
                   .read_text())
    names = m["splits"]["train"]["document_names"] + m["splits"]["val"]["document_names"]
    assert len(names) == len(set(names)) == 12
    assert m["sources"][a]["bytes"] == sizes["a"] and m["sources"][b]["bytes"] == sizes["b"]
    with pytest.raises(UserError, match="given twice"):
        prepare([a, a + "/"], str(tmp_path / "q"), vocab_size=300)


def test_sources_that_read_the_same_files_are_refused(tmp_path, monkeypatch):
    """`notes notes/2024` or `./docs /abs/docs` read each file twice, so its documents counted double
    in training without a word (only the same spelling twice was refused)."""
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / ".hidden").mkdir()
    for i in range(8):
        (docs / ("sub" if i % 2 else ".") / f"f{i}.txt").write_text(f"document {i} " + "alpha beta " * (50 + i))
    (docs / ".hidden" / "h.txt").write_text("a hidden document " * 40)
    (docs / "notes.csv").write_text("a,b\n1,2\n")
    monkeypatch.chdir(tmp_path)
    for sources, msg in (([str(docs), "docs"], "given twice (as "), ([str(docs), "docs/sub"], "docs/sub is inside"),
                         (["docs/sub/f1.txt", "docs"], "docs/sub/f1.txt is inside data source docs,"),
                         (["stdlib", str(stdlib_root() / "json")], "json is inside data source stdlib")):
        with pytest.raises(UserError, match=re.escape(msg)):
            prepare(sources, str(tmp_path / "q"), vocab_size=300)
        assert not (tmp_path / "q").exists()
    # what the folder's walk never reads does not overlap: hidden parts, files it skips, stdlib tests
    for sources in (["docs", "docs/.hidden"], ["docs", "docs/notes.csv"]):
        assert overlapping_sources(sources) is None, sources
    assert overlapping_sources(["stdlib", str(stdlib_root() / "test")]) is None
    assert overlapping_sources(["docs/*.txt", "docs", "hf:x"]) is None  # a glob's files are not known before


def test_source_weights_set_the_training_token_shares(tmp_path, text_corpus):
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"text": f"other source {i} " + "gamma delta " * 60})
                               for i in range(40)) + "\n")
    plain = prepare([str(text_corpus), str(other)], str(tmp_path / "plain"), val_fraction=0.2, vocab_size=300)
    mixed = prepare([str(text_corpus), str(other)], str(tmp_path / "mixed"), val_fraction=0.2, vocab_size=300,
                    weights=[3.0, 1.0])
    mp, mm = (json.loads((d / "manifest.json").read_text()) for d in (plain, mixed))
    mix = mm["mixing"]
    total = sum(r["tokens"] for r in mix.values())
    natural = {k: r["natural_tokens"] / sum(x["natural_tokens"] for x in mix.values()) for k, r in mix.items()}
    assert natural[str(other)] < 0.1  # the weights change the mixture a lot...
    for src, want in ((str(text_corpus), 0.75), (str(other), 0.25)):  # ...to within one document
        assert abs(mix[src]["tokens"] / total - want) < 0.03
    assert mm["splits"]["train"]["tokens"] == total
    assert mm["splits"]["val"] == mp["splits"]["val"]  # validation keeps its natural mixture
    for bad in (["1"], ["0", "1"], ["nan", "1"], ["inf", "1"]):  # nan and inf were tracebacks
        res = _cli("data", "prepare", str(text_corpus), str(other), "--out", str(tmp_path / "bad"), "--weights", *bad)
        assert res.returncode == 2 and "--weights needs one positive weight" in res.stderr, res.stderr
        assert f"got {' '.join(bad)})" in res.stderr, res.stderr  # the values, not only their count


def test_dedup_drops_near_duplicates_within_training(tmp_path, text_corpus):
    src = tmp_path / "src"
    src.mkdir()
    docs = sorted(text_corpus.iterdir())
    for p in docs:
        (src / p.name).write_text(p.read_text())
    words = docs[5].read_text().split(" ")
    (src / "zz_copy.txt").write_text(" ".join(w if i % 40 else "edited" for i, w in enumerate(words)))
    out = prepare([str(src)], str(tmp_path / "dedup"), val_fraction=0.2, vocab_size=300, dedup=True)
    m = json.loads((out / "manifest.json").read_text())
    kept = m["splits"]["train"]["document_names"] + m["splits"]["val"]["document_names"]
    # with this salt the pair lands in training (near-copies always share a side): the copy goes
    assert m["near_duplicates_dropped"] == [{"name": "zz_copy.txt", "near_duplicate_of": docs[5].name}]
    assert "zz_copy.txt" not in kept and len(kept) == len(docs)
    plain = json.loads((prepare([str(src)], str(tmp_path / "plain"), val_fraction=0.2, vocab_size=300)
                        / "manifest.json").read_text())
    assert plain["near_duplicates_dropped"] == [] and len(plain["splits"]["train"]["document_names"]) + len(
        plain["splits"]["val"]["document_names"]) == len(docs) + 1


def test_raw_source_is_prepared_into_the_run_once_and_reused(tmp_path, text_corpus):
    """The run keeps its own prepared copy: a resume neither re-reads nor re-tokenises the source
    (so edits to it cannot leak in), and changed data settings on resume are refused."""
    import shutil

    from moelab.config import build_config
    from moelab.errors import UserError
    from moelab.train.loop import train

    src = tmp_path / "src"
    shutil.copytree(text_corpus, src)
    args = [f"data.source={src}", "data.vocab_size=300", "train.eval_every=2", "train.save_every=2"]
    run = tmp_path / "run"
    train(build_config("test", None, [*args, "train.steps=2"]), out=str(run), progress=False)
    manifest = run / "data" / "prepared" / "manifest.json"
    before = manifest.read_text()
    assert json.loads(before)["request"]["source"] == str(src)
    (src / "new_doc.txt").write_text("a document added after the run started " * 20)
    summary = train(build_config("test", None, [*args, "train.steps=4"]), out=str(run), resume="auto",
                    overrides=("train.steps=4",), progress=False)
    assert summary["steps"] == 4 and manifest.read_text() == before
    try:
        train(build_config("test", None, args), out=str(run), resume="auto",
              overrides=("train.steps=6", "data.val_fraction=0.3"), progress=False)
    except UserError as exc:
        assert "data.val_fraction" in str(exc)
    else:
        raise AssertionError("resuming with other data settings must be refused")
    with pytest.raises(UserError, match=r"data.doc_chars \(0 -> 500\)"):
        train(build_config("test", None, args), out=str(run), resume="auto",
              overrides=("train.steps=6", "data.doc_chars=500"), progress=False)
    m = json.loads(before)  # a run prepared before data.doc_chars existed resumes as one without cutting
    del m["request"]["doc_chars"]
    manifest.write_text(json.dumps(m))
    summary = train(build_config("test", None, args), out=str(run), resume="auto", overrides=("train.steps=6",),
                    progress=False)
    assert summary["steps"] == 6


def test_prepare_streams_the_corpus_instead_of_holding_it(tmp_path, monkeypatch):
    """Memory while preparing must not grow with the corpus: four times the text (one JSONL file, as
    large corpora come) may add only the per-document bookkeeping (name, offsets, MinHash signature),
    not the text. Measured with tracemalloc, which sees Python objects and numpy arrays."""
    import tracemalloc

    import moelab.data.prepare as prep

    monkeypatch.setattr(prep, "CHUNK_BYTES", 1 << 20)  # work in 1 MB pieces, so the text dwarfs them
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}x{i * 7919 % 997}" for i in range(5000)])

    def corpus(n_docs: int):
        f = tmp_path / f"c{n_docs}.jsonl"
        with open(f, "w") as out:
            for i in range(n_docs):  # distinct documents of about 32 KB
                out.write(json.dumps({"text": " ".join(words[rng.integers(0, 5000, 3200)])}) + "\n")
        return f

    small, large = corpus(100), corpus(400)
    prepare([str(large)], str(tmp_path / "warm"), vocab_size=512)  # MinHash's tables grow to their size once
    tok = str(tmp_path / "warm" / "tokenizer")

    def peak(source, out):
        tracemalloc.start()
        try:
            prepare([str(source)], str(tmp_path / out), tokenizer=tok)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    grown = peak(large, "large") - peak(small, "small")
    more_text = large.stat().st_size - small.stat().st_size  # about 9.6 MB
    assert grown < 0.2 * more_text, f"peak grew by {grown / 1e6:.1f} MB for {more_text / 1e6:.1f} MB more text"
    manifest = json.loads((tmp_path / "large" / "manifest.json").read_text())
    assert sum(s["documents"] for s in manifest["splits"].values()) == 400
    assert not list(tmp_path.glob(".tmp-*")) and sorted(p.name for p in (tmp_path / "large").iterdir())[0] != ".text"


def test_a_damaged_shard_is_refused_instead_of_training_on_part_of_it(tmp_path):
    """A token shard cut short (a partial copy) was read as a shorter stream: training went on with
    part of the data and the same fingerprint. Each shard's size is checked against its manifest,
    and a damaged manifest or offsets file is one line (it was a traceback)."""
    import os
    import shutil

    from tests.conftest import write_corpus

    prepare([str(write_corpus(tmp_path / "corpus"))], str(tmp_path / "good"), vocab_size=300)
    assert load_prepared(tmp_path / "good", 16)[1].shape[0] > 0

    def damaged(how):
        bad = tmp_path / how
        shutil.copytree(tmp_path / "good", bad)
        stream, starts = bad / "train-00000.bin", bad / "train-00000_docs.npy"
        if how == "half":
            os.truncate(stream, stream.stat().st_size // 2)
        elif how == "odd":
            os.truncate(stream, stream.stat().st_size - 1)
        elif how == "garbage":
            starts.write_bytes(b"garbage")
        elif how == "cut-manifest":
            manifest = bad / "manifest.json"
            manifest.write_text(manifest.read_text()[:50])
        elif how == "edited-manifest":
            manifest = bad / "manifest.json"
            manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "dtype": "utf8"}))
        else:
            np.save(starts, np.load(starts)[:-1])
        with pytest.raises(UserError) as info:
            load_prepared(bad, 16)
        return str(info.value)

    size = (tmp_path / "good" / "train-00000.bin").stat().st_size
    half = tmp_path / "half" / "train-00000.bin"
    assert damaged("half").startswith(f"{half} holds {size // 2:,} bytes, not the {size:,}")
    assert "cut short" in damaged("odd")
    assert "train-00000_docs.npy is damaged (not a NumPy array file)" in damaged("garbage")
    assert "train-00000_docs.npy does not match train-00000.bin" in damaged("fewer")
    assert damaged("cut-manifest").startswith(f"{tmp_path / 'cut-manifest' / 'manifest.json'} is damaged (")
    assert "manifest.json is not a manifest moelab wrote" in damaged("edited-manifest")


def test_a_full_disk_during_prepare_is_one_line_and_leaves_nothing_behind(tmp_path):
    """RLIMIT_FSIZE fails every write past 256 KB (EFBIG), as a full disk would; the texts spilled
    to disk are 600 KB. Before, discarding the spill file flushed it, failed again, and left it."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))

    (tmp_path / "src").mkdir()
    for i in range(600):  # 1 KB each: written through the spill file's buffer
        (tmp_path / "src" / f"doc{i}.txt").write_text(f"document {i} " + "lorem ipsum dolor " * 55)
    res = subprocess.run([sys.executable, "-m", "moelab", "data", "prepare", str(tmp_path / "src"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         preexec_fn=small_files)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("moelab: error: File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out, no .tmp-* holding the space


def test_the_next_prepare_removes_what_a_killed_one_left(tmp_path):
    """SIGKILL leaves the temporary folder with its spill file (a copy of the corpus's text); the next
    prepare to that output removes it. One of a process still running, or another machine's, stays."""
    import os
    import time

    (tmp_path / "src").mkdir()
    for i in range(600):
        (tmp_path / "src" / f"doc{i}.txt").write_text(f"document {i} " + "lorem ipsum dolor " * 55)
    proc = subprocess.Popen([sys.executable, "-m", "moelab", "data", "prepare", str(tmp_path / "src"),
                             "--out", str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".tmp-out-*/.text")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    left = list(tmp_path.glob(".tmp-out-*"))
    assert len(left) == 1 and not (tmp_path / "out").exists()
    host = left[0].name[len(".tmp-out-"):].rsplit("-", 1)[0]
    running = tmp_path / f".tmp-out-{host}-{os.getppid()}"  # pytest's parent: alive
    elsewhere = tmp_path / f".tmp-out-otherhost-{proc.pid}"
    running.mkdir()
    elsewhere.mkdir()
    prepare([str(tmp_path / "src")], str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.glob(".tmp-*")) == sorted([running.name, elsewhere.name])
    assert load_prepared(tmp_path / "out", 16)[1].shape[0] > 0  # and the new one is complete


def test_a_failed_prepare_leaves_nothing_behind(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blank.txt").write_text("   \n")
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(UserError, match="no usable text"):
        prepare([str(tmp_path / "src")], str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out, no .tmp-*, no parent folders


def test_cut_text_pieces_join_to_the_text_and_end_at_line_breaks():
    from moelab.data.sources import cut_text

    rng = np.random.default_rng(0)
    lines = ["".join(rng.choice(list("abc de"), rng.integers(0, 90))) for _ in range(400)]
    for text in ("\n".join(lines), "x" * 5000, " ".join(["word"] * 900), "short"):
        pieces = cut_text(text, 700)
        assert "".join(pieces) == text and all(0 < len(p) <= 700 for p in pieces)
        assert (len(pieces) > 1) == (len(text) > 700)
        if "\n" in text:
            assert all(p.endswith("\n") for p in pieces[:-1])  # lines of < 350 characters: a break in every half
        elif " " in text:
            assert all(p.endswith(" ") for p in pieces[:-1])
    assert cut_text("abc", 0) == ["abc"]


def test_one_long_text_file_is_refused_with_the_fix_then_cut_into_documents(tmp_path):
    """A single text file (a book: the usual first corpus) is one document and cannot be split; the
    error names data.doc_chars, and with it the file becomes documents NAME#k split as usual."""
    from tests.conftest import run_cli

    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcdefghij"), rng.integers(2, 9))) for _ in range(800)]
    book = tmp_path / "book.txt"
    book.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(8000)))
    r = run_cli("data", "prepare", book, "--out", tmp_path / "no", "--vocab-size", "300")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert "1 usable document(s)" in r.stderr and "data.doc_chars=N (data prepare: --doc-chars N)" in r.stderr
    assert not (tmp_path / "no").exists()
    r = run_cli("data", "prepare", book, "--out", tmp_path / "yes", "--vocab-size", "300", "--doc-chars", "10000")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "yes" / "manifest.json").read_text())
    names = {s: m["splits"][s]["document_names"] for s in ("train", "val")}
    n = len(names["train"]) + len(names["val"])
    assert n >= book.stat().st_size // 10000 and names["val"] and not set(names["train"]) & set(names["val"])
    assert sorted(names["train"] + names["val"]) == sorted(f"book.txt#{k}" for k in range(1, n + 1))
    assert sum(m["splits"][s]["bytes"] for s in ("train", "val")) == book.stat().st_size


def test_preparing_says_its_long_stages(tmp_path, text_corpus, capsys):
    """Reading, BPE training and tokenizing are said as they start (a 152K-token BPE on a large
    corpus takes minutes); a run passes them on when asked for progress, and in a pipe or log
    (progress=None, stderr not a terminal) says nothing before a refusal's one line."""
    from moelab.config import build_config
    from moelab.train.loop import train

    said = []
    prepare([str(text_corpus)], str(tmp_path / "prep"), vocab_size=300, say=said.append)
    m = json.loads((tmp_path / "prep" / "manifest.json").read_text())["splits"]
    assert said[0] == f"preparing data: reading {text_corpus}"
    assert f"{m['train']['documents']} training / {m['val']['documents']} validation documents" in said[1]
    assert "training a 300-token BPE tokenizer" in said[2] and "tokenizing" in said[3]
    said.clear()
    prepare([str(text_corpus)], str(tmp_path / "prep2"), tokenizer=str(tmp_path / "prep" / "tokenizer"),
            say=said.append)
    assert len(said) == 2 and not any("BPE" in s for s in said)  # a given tokenizer is not trained

    args = [f"data.source={text_corpus}", "data.vocab_size=300", "train.steps=1", "train.eval_every=1"]
    capsys.readouterr()
    train(build_config("test", None, args), out=str(tmp_path / "said"), progress=True)
    assert "preparing data: training a 300-token BPE tokenizer" in capsys.readouterr().err
    with pytest.raises(UserError):  # more windows per batch than the split has: refused after preparing
        train(build_config("test", None, args + ["train.batch_size=100000"]), out=str(tmp_path / "quiet"))
    assert capsys.readouterr().err == ""


def test_a_tokenizer_smaller_than_asked_is_pointed_out(tmp_path):
    """Text with few distinct words runs out of pairs to merge before --vocab-size: the tokenizer
    (and so the model's vocabulary) is smaller than asked, which is now said, not left to be found."""
    import random

    from tests.conftest import run_cli

    rng = random.Random(0)
    corpus = tmp_path / "few"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(2000)))
    # (documents of the same three words are near-copies of each other: split anyway)
    r = run_cli("data", "prepare", corpus, "--out", tmp_path / "p", "--vocab-size", "400", "--no-near-dup-split")
    learnt = json.loads((tmp_path / "p" / "manifest.json").read_text())["vocab_size"]
    assert r.returncode == 0 and learnt < 300, r.stderr
    assert f"note: the BPE tokenizer has {learnt} tokens, fewer than --vocab-size 400: its training" in r.stderr
    r = run_cli("data", "prepare", corpus, "--out", tmp_path / "q", "--vocab-size", str(learnt), "--no-near-dup-split")
    assert r.returncode == 0 and "note: the BPE" not in r.stderr, r.stderr
    r = run_cli("train", "--preset", "test", "--out", tmp_path / "run", f"data.source={corpus}", "data.vocab_size=400",
                "data.near_dup_split=false", "train.steps=1", "train.report=false", "train.plot=false")
    assert r.returncode == 0 and "tokens, fewer than data.vocab_size=400" in r.stderr, r.stderr


@pytest.mark.parametrize("weights", [None, [2.0, 1.0]])
def test_documents_begin_with_the_tokens_the_tokenizer_puts_before_a_text(tmp_path, text_corpus, weights):
    """A Llama- or Mixtral-style tokenizer puts <s> before each text, and its model saw every document
    begin with it: prepared streams (and eval --source windows) pack <s> doc </s> for each document."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator([p.read_text() for p in text_corpus.iterdir()],
                           trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    (tmp_path / "tok").mkdir()
    tk.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"text": f"other source {i} " + "gamma delta " * 20}) for i in range(10)))
    out = prepare([str(text_corpus), str(other)], str(tmp_path / "prep"), val_fraction=0.2,
                  tokenizer=str(tmp_path / "tok"), weights=weights)
    tok = load_tokenizer(out / "tokenizer")
    assert tok.doc_prefix == [0] and tok.eos_id == 1
    m = json.loads((out / "manifest.json").read_text())
    texts = {f"corpus/{p.name}": p.read_text() for p in text_corpus.iterdir()}
    texts.update({f"other.jsonl/other.jsonl#{i + 1}": f"other source {i} " + "gamma delta " * 20 for i in range(10)})
    for split in ("train", "val"):
        (stream, starts), = split_streams(out, split)
        assert (stream[starts] == 0).all() and (stream[starts[1:] - 1] == 1).all() and stream[-1] == 1
        assert (stream == 0).sum() == len(starts)  # <s> only where a document begins
        if weights is None or split == "val":  # (resampled training repeats documents in another order)
            ref = pack(tok.encode_batch([texts[n] for n in m["splits"][split]["document_names"]]), 1, [0])
            assert np.array_equal(stream.astype(np.int64), ref.numpy())
        assert m["splits"][split]["tokens"] == len(stream)
    if weights is None:  # `moelab eval --source` packs the same way
        from moelab.eval.language import eval_windows_for
        from moelab.eval.target import Target

        windows, _ = eval_windows_for(Target(None, tok, "x"), "val", None, str(other), 16)
        ref = make_windows(pack(tok.encode_batch([texts[f"other.jsonl/other.jsonl#{i + 1}"] for i in range(10)]),
                                1, [0]), 16)
        assert windows[0, 0].item() == 0 and torch.equal(windows, ref)


def test_skipped_inputs_are_said_by_reason_not_only_counted(tmp_path, text_corpus):
    """Records in another field, broken JSON and damaged PDFs are left out of the data: both ways of
    preparing it (`data prepare`, and `train` on a raw source) say how many, why and which one
    first, most frequent reason first; the manifest keeps each."""
    import shutil

    from moelab.data.prepare import skipped_note
    from tests.conftest import run_cli

    src = tmp_path / "src"
    shutil.copytree(text_corpus, src)
    records = [{"text": f"record {i} " * 40} for i in range(6)] + [{"body": f"other {i} " * 40} for i in range(3)]
    (src / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    for name in ("a.pdf", "b.pdf"):
        (src / name).write_bytes(b"%PDF-1.4 not a PDF at all")
    r = run_cli("data", "prepare", src, "--out", tmp_path / "p", "--vocab-size", "300")
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert r.returncode == 0 and len(m["skipped"]) == 6, r.stderr
    note = (f"note: 6 inputs skipped, not in the data: 3 no field 'text' (has body) (first: r.jsonl#7); "
            f"2 unreadable PDF (first: a.pdf); 1 invalid JSON (r.jsonl#10) (each with its reason: "
            f"{tmp_path / 'p' / 'manifest.json'}, \"skipped\")")
    assert note in r.stderr.splitlines(), r.stderr
    r = run_cli("train", "--preset", "test", "--out", tmp_path / "run", f"data.source={src}", "data.max_docs=0",
                "data.vocab_size=300", "train.steps=1", "train.report=false", "train.plot=false")
    assert r.returncode == 0, r.stderr
    assert note.replace(str(tmp_path / "p"), str(tmp_path / "run" / "data" / "prepared")) in r.stderr.splitlines()
    # past `kinds` reasons, the rest are counted together; nothing skipped, nothing said
    many = [{"name": f"f{i}", "reason": f"reason {i % 3}"} for i in range(7)]
    assert skipped_note(many, "M", kinds=2).startswith("note: 7 inputs skipped, not in the data: 3 reason 0 "
                                                       "(first: f0); 2 reason 1 (first: f1); 2 for 1 other reason (")
    assert skipped_note([], "M") is None
    r = run_cli("data", "prepare", text_corpus, "--out", tmp_path / "q", "--vocab-size", "300")
    assert r.returncode == 0 and "skipped, not in the data" not in r.stderr, r.stderr
