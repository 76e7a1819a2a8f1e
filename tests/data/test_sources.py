"""JSONL and Parquet sources: one document per record's text field, bad records skipped with reasons."""

import json
import sys
from pathlib import Path

import pytest

from moelab.data.sources import load_corpus
from moelab.errors import UserError


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_records_become_documents_and_bad_ones_are_skipped(tmp_path):
    f = _jsonl(tmp_path / "data.jsonl", [
        {"text": "first document", "id": 1}, {"body": "wrong field"}, "{not json", {"text": ""},
        {"text": 42}, {"text": "second document"}, [1, 2], json.dumps("a bare string line")])
    corpus = load_corpus(str(f))
    assert [(d.name, d.text) for d in corpus.documents] == [("data.jsonl#1", "first document"),
                                                            ("data.jsonl#6", "second document"),
                                                            ("data.jsonl#8", "a bare string line")]
    assert dict(corpus.skipped) == {"data.jsonl#2": "no field 'text' (has body)", "data.jsonl#3": "invalid JSON",
                                    "data.jsonl#4": "empty", "data.jsonl#5": "field 'text' is not text",
                                    "data.jsonl#7": "a JSON array, not an object or a string"}
    other = load_corpus(str(f), text_field="body")
    assert [d.text for d in other.documents] == ["wrong field", "a bare string line"]


def test_a_record_file_without_records_is_named_not_blamed_on_its_suffix(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")  # e.g. a failed export: the suffix is fine, the file is empty
    with pytest.raises(UserError, match=r"skipped 1: empty.jsonl: no records\)$"):
        load_corpus(str(tmp_path / "empty.jsonl"))
    _jsonl(tmp_path / "full.jsonl", [{"text": "a document"}])
    corpus = load_corpus(str(tmp_path))
    assert [d.text for d in corpus.documents] == ["a document"] and corpus.skipped == [("empty.jsonl", "no records")]


def test_jsonl_as_editors_write_it_keeps_every_record_whole(tmp_path):
    # unescaped U+2028 / U+0085 inside strings are valid JSON (json.dumps(ensure_ascii=False) writes them), and
    # a byte-order mark may lead the file: neither may split or drop a record
    texts = ["line one\u2028line two", "next\x85line and\u2029more", "plain"]
    f = tmp_path / "data.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n"
                                             for t in texts).encode())
    corpus = load_corpus(str(f))
    assert [d.text for d in corpus.documents] == texts and corpus.skipped == []
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_bytes(b"\xef\xbb\xbfdef f():\n    return 1\n")
    assert load_corpus(str(tmp_path / "txt")).documents[0].text == "def f():\n    return 1\n"


def test_a_jsonl_line_that_is_not_utf8_costs_that_record_only(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(b'{"text": "first"}\n{"text": "caf\xe9"}\n{"text": "third"}\n')  # line 2: Latin-1
    corpus = load_corpus(str(f))
    assert [d.text for d in corpus.documents] == ["first", "third"]
    assert corpus.skipped == [("data.jsonl#2", "not UTF-8")]


def test_a_pyarrow_that_is_installed_but_fails_to_import_is_not_called_missing(tmp_path, monkeypatch):
    """pyarrow 26 with NumPy 1.x raises ImportError on import; the message said to install pyarrow."""
    pytest.importorskip("pyarrow")
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # its import fails, as that one's does
    with pytest.raises(UserError, match=r"pyarrow is installed but cannot be imported \(.*pyarrow.parquet"):
        load_corpus(str(tmp_path / "a.parquet"))


def test_a_corrupt_parquet_file_is_skipped_with_its_reason(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    (tmp_path / "notes.txt").write_text("plain file")
    corpus = load_corpus(str(tmp_path))
    assert [d.text for d in corpus.documents] == ["plain file"]
    assert [n for n, _ in corpus.skipped] == ["broken.parquet"]
    assert corpus.skipped[0][1].startswith("unreadable Parquet: ")


def test_an_empty_source_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("private notes in the working folder\n")
    monkeypatch.chdir(tmp_path)
    for source in ("", "  "):
        with pytest.raises(UserError, match="data source is empty"):
            load_corpus(source)
    for source in ("hf:", "hf::cfg@train", "hf:@val"):  # said as such, not "list index out of range"
        with pytest.raises(UserError, match="names no dataset: write hf:NAME"):
            load_corpus(source)


def test_parquet_column_and_mixed_directory(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path / "mixed"
    d.mkdir()
    pq.write_table(pa.table({"content": ["alpha text", None, "beta text"]}), d / "part.parquet")
    _jsonl(d / "more.jsonl", [{"content": "gamma text"}])
    (d / "notes.txt").write_text("plain file")
    corpus = load_corpus(str(d), text_field="content")
    assert sorted(doc.text for doc in corpus.documents) == ["alpha text", "beta text", "gamma text",
                                                            "plain file"]
    assert corpus.skipped == [("part.parquet#2", "empty")]
    with pytest.raises(UserError, match=r"no column 'missing' \(has content\).*data.text_field=NAME"):
        load_corpus(str(d / "part.parquet"), text_field="missing")
    with pytest.raises(UserError, match=r"no field 'missing' \(has content\).*data.text_field=NAME"):
        load_corpus(str(d / "more.jsonl"), text_field="missing")


def test_train_on_a_jsonl_source(tmp_path, text_corpus):
    from moelab.config import build_config
    from moelab.train.loop import train

    rows = [{"text": p.read_text()} for p in sorted(text_corpus.iterdir())]
    f = _jsonl(tmp_path / "corpus.jsonl", rows)
    summary = train(build_config("test", None, [f"data.source={f}", "data.max_docs=0", "train.steps=3",
                                                "train.eval_every=3", "data.vocab_size=300"]),
                    out=str(tmp_path / "run"), progress=False)
    split = json.loads((tmp_path / "run" / "data" / "split.json").read_text())
    assert split["splits"]["train"]["documents"] + split["splits"]["val"]["documents"] == len(rows)
    assert summary["steps"] == 3


def test_hugging_face_dataset_from_disk_and_clear_error_offline(tmp_path):
    import os
    import subprocess
    import sys

    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one paper body", "", "another paper"], "id": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "saved"))
    corpus = load_corpus(str(tmp_path / "saved"))
    assert [d.text for d in corpus.documents] == ["one paper body", "another paper"]
    assert corpus.skipped == [("saved#2", "empty")]
    with pytest.raises(UserError, match=r"no text in field 'body' \(has text, id\).*data.text_field=NAME"):
        load_corpus(str(tmp_path / "saved"), text_field="body")  # which field to name, and where
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    # offline as set by the user, or a hub that cannot be reached (nothing listens on port 9): one
    # line at once, not each request's retries and warnings for half a minute
    unreachable = {k: v for k, v in env.items() if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    unreachable.update(HF_ENDPOINT="http://127.0.0.1:9")
    for env, why in ((env, "offline mode is set"), (unreachable, "cannot be reached from this machine")):
        res = subprocess.run([sys.executable, "-m", "moelab", "data", "prepare", "hf:nobody/no-such-dataset",
                              "--out", str(tmp_path / "p")], capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 2, res.stderr
        assert "cannot load Hugging Face dataset 'hf:nobody/no-such-dataset'" in res.stderr and why in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "p").exists()


def test_hugging_face_dataset_by_name_from_the_offline_cache(tmp_path):
    """`hf:OWNER/NAME` with the network off reads the datasets cache that an earlier online
    `load_dataset` leaves (OWNER___NAME/CONFIG/VERSION/REVISION/, Arrow files + dataset_info.json).
    The cache is built here by datasets' own JSON builder, then placed under the hub name."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("datasets")
    from datasets.packaged_modules.json.json import Json

    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"text": f"cached record {i} about experts and routers"}) + "\n"
                           for i in range(12)))
    cache = tmp_path / "datasets_cache"
    builder = Json(cache_dir=str(cache), dataset_name="tiny", hash="0123456789abcdef", config_name="default",
                   data_files={"train": str(src)})
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # CACHE/tiny/default-<data files hash>/0.0.0/0123456789abcdef
    target = cache / "moelab___tiny" / "default" / built.parent.name / built.name
    target.parent.mkdir(parents=True)
    shutil.move(str(built), str(target))
    offline = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache),
                   HF_HOME=str(tmp_path / "hf_home"))
    # the same with no offline setting on a machine where the hub cannot be reached (port 9: nothing listens)
    unreachable = {k: v for k, v in offline.items() if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    unreachable.update(HF_ENDPOINT="http://127.0.0.1:9")
    runs = (([], 12, offline), (["--max-docs", "5"], 5, offline), (["--max-docs", "11"], 11, unreachable))
    for extra, n_docs, env in runs:  # --max-docs would stream when online
        out = tmp_path / f"prep{n_docs}"
        res = subprocess.run([sys.executable, "-m", "moelab", "data", "prepare", "hf:moelab/tiny", "--out",
                              str(out), "--vocab-size", "300", *extra], capture_output=True, text=True, env=env,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        assert "requesting" not in res.stderr and "Retrying" not in res.stderr, res.stderr
        m = json.loads((out / "manifest.json").read_text())
        names = m["splits"]["train"]["document_names"] + m["splits"]["val"]["document_names"]
        assert sorted(names) == sorted(f"moelab/tiny#{i + 1}" for i in range(n_docs))


def test_glob_sources(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.md").write_text("markdown text")
    (tmp_path / "a" / "two.txt").write_text("plain text")
    (tmp_path / "b.md").write_text("another markdown")
    corpus = load_corpus(str(tmp_path / "**" / "*.md"))
    assert sorted(d.text for d in corpus.documents) == ["another markdown", "markdown text"]
    with pytest.raises(UserError, match="no file matches"):
        load_corpus(str(tmp_path / "*.pdf"))


def test_directory_walk_order_hidden_links_and_special_files(tmp_path):
    """A directory source lists regular files with known suffixes in path order (as pathlib sorts
    them), skips hidden files and folders, does not follow directory symlinks (no cycles), and
    never opens a FIFO (which would block); 40 files go through the threaded reader."""
    import os

    root = tmp_path / "src"
    (root / "a-b").mkdir(parents=True)
    (root / "a" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i in range(40):
        (root / "a" / "deep" / f"f{i:02d}.py").write_text(f"print({i})\n")
    (root / "a-b" / "x.txt").write_text("dash folder")
    (root / "a" / "y.md").write_text("in a")
    (root / "a" / "noext").write_text("no suffix is text")
    (root / "a" / "file.").write_text("a trailing dot is no suffix")
    (root / "a" / "skip.bin").write_bytes(b"\x00\x01")
    (root / ".hidden" / "secret.txt").write_text("hidden")
    (root / "a" / ".dot.txt").write_text("hidden file")
    (root / "loop").symlink_to(root, target_is_directory=True)
    os.mkfifo(root / "a" / "pipe.txt")
    corpus = load_corpus(str(root))
    names = [d.name for d in corpus.documents]
    from pathlib import Path

    expected = sorted(["a-b/x.txt", "a/y.md", "a/noext", "a/file.", *(f"a/deep/f{i:02d}.py" for i in range(40))],
                      key=lambda n: Path(n).parts)
    assert names == expected
    assert corpus.documents[names.index("a/deep/f07.py")].text == "print(7)\n"
