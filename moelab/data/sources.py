"""Document sources. A document is one file, or one record of a JSONL/Parquet file (its text
field); splits are made over documents, never windows.

The embedded default corpus is the running interpreter's standard library (`.py` files under
sysconfig's stdlib path, without test folders or site-packages), so training needs no download.
Unreadable inputs are skipped and reported with their reason, never a crash.
"""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from moelab.errors import UserError

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ""}
RECORD_SUFFIXES = {".jsonl", ".parquet"}
PDF_SUFFIXES = {".pdf"}


@dataclass
class Document:
    name: str  # stable identifier: the path relative to the source root
    text: str


@dataclass
class Corpus:
    source: str
    documents: list[Document]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def _read_text(path: Path) -> tuple[str | None, str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if not raw.strip():
        return None, "empty"
    if b"\x00" in raw[:8192]:
        return None, "binary"
    try:
        return raw.decode("utf-8-sig"), ""  # a byte-order mark is no part of the text
    except UnicodeDecodeError:
        return None, "not UTF-8"


def jsonl_lines(path: Path) -> list[str]:
    """The lines of a JSONL file: split on newlines only (str.splitlines also splits at U+2028, U+0085
    and others, which JSON strings may hold unescaped), without a leading byte-order mark.
    Raises OSError or UnicodeDecodeError."""
    lines = path.read_bytes().decode("utf-8-sig").split("\n")
    return lines[:-1] if lines and not lines[-1].strip() else lines  # nothing after the last newline


def _records(path: Path, name: str, text_field: str):
    """(record name, text or None, reason) for each record of a JSONL or Parquet file."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading Parquet needs pyarrow: pip install 'moelab[data]'") from None
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            yield name, None, f"unreadable Parquet: {str(exc).splitlines()[0][:80]}"
            return
        if text_field not in table.column_names:
            yield name, None, f"no column '{text_field}' (has {', '.join(table.column_names[:8])})"
            return
        values = table.column(text_field).to_pylist()
    else:
        try:
            lines = jsonl_lines(path)
        except (OSError, UnicodeDecodeError) as exc:
            yield name, None, f"unreadable JSONL: {getattr(exc, 'strerror', None) or exc}"
            return
        values = []
        for line in lines:
            try:
                rec = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                rec = ValueError("invalid JSON")
            values.append(rec.get(text_field, KeyError(", ".join(list(rec)[:8])))
                          if isinstance(rec, dict) else rec)
    for i, v in enumerate(values):
        rec_name = f"{name}#{i + 1}"
        if isinstance(v, str) and v.strip():
            yield rec_name, v, ""
        elif v is None or isinstance(v, str):
            yield rec_name, None, "empty"
        elif isinstance(v, ValueError):
            yield rec_name, None, "invalid JSON"
        elif isinstance(v, KeyError):
            yield rec_name, None, f"no field '{text_field}'" + (f" (has {v.args[0]})" if v.args[0] else "")
        else:
            yield rec_name, None, f"field '{text_field}' is not text"


def _collect(root: Path, files: list[Path], max_docs: int, source: str, text_field: str = "text",
             pdf_filters=None) -> Corpus:
    corpus = Corpus(source=source, documents=[])
    files = sorted(files, key=lambda f: f.parts)  # Path order, without Path comparisons
    prefetched = {}
    if not max_docs:  # plain text files are read on threads (file reads release the GIL)
        from moelab.data.parallel import thread_map

        plain = [f for f in files if _suffix(f.name) in TEXT_SUFFIXES]
        prefetched = dict(zip(plain, thread_map(_read_text, plain, threads=8)))
    prefix = str(root) + os.sep
    for path in files:
        full = str(path)
        name = (full[len(prefix):].replace(os.sep, "/") if full.startswith(prefix)
                else path.relative_to(root).as_posix() if path != root else path.name)
        if path.suffix.lower() in RECORD_SUFFIXES:
            records = 0
            for rec_name, text, reason in _records(path, name, text_field):
                records += 1
                if text is None:
                    corpus.skipped.append((rec_name, reason))
                    continue
                corpus.documents.append(Document(rec_name, text))
                if max_docs and len(corpus.documents) >= max_docs:
                    return corpus
            if not records:
                corpus.skipped.append((name, "no records"))
            continue
        if path.suffix.lower() in PDF_SUFFIXES:
            from moelab.data.pdf import pdf_document

            text, reason = pdf_document(path, pdf_filters)
        else:
            text, reason = prefetched.pop(path, None) or _read_text(path)
        if text is None:
            corpus.skipped.append((name, reason))
            continue
        corpus.documents.append(Document(name, text))
        if max_docs and len(corpus.documents) >= max_docs:
            break
    return corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(max_docs: int = 0) -> Corpus:
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return _collect(root, files, max_docs, f"stdlib:{root}")


def files_corpus(path: str, max_docs: int = 0, text_field: str = "text", pdf_filters=None) -> Corpus:
    if any(c in path for c in "*?["):  # a glob such as papers/**/*.pdf
        import glob

        matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(path), recursive=True))]
        files = [m for m in matches if m.is_file()]
        if not files:
            raise UserError(f"no file matches {path}")
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
        return _collect(root, files, max_docs, path, text_field, pdf_filters)
    p = Path(path).expanduser()
    if p.is_file():
        return _collect(p.parent, [p], max_docs, str(p), text_field, pdf_filters)
    if not p.is_dir():
        raise UserError(f"data source not found: {path} (give a text, JSONL or Parquet file, a "
                        "directory, or 'stdlib')")
    return _collect(p, _walk_files(p), max_docs, str(p), text_field, pdf_filters)


def _walk_files(root: Path) -> list[Path]:
    """Regular files under `root` with a known suffix, skipping hidden files and directories and not
    following directory symlinks (no cycles); one scandir per directory, no per-file stat calls
    beyond the directory entry's."""
    suffixes = TEXT_SUFFIXES | RECORD_SUFFIXES | PDF_SUFFIXES
    found, stack = [], [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif _suffix(e.name) in suffixes and e.is_file():
                found.append(e.path)
    return [Path(f) for f in found]


def _known_suffixes() -> list[str]:
    return sorted(x for x in TEXT_SUFFIXES | RECORD_SUFFIXES | PDF_SUFFIXES if x) + ["suffix-less"]


def _suffix(name: str) -> str:
    """pathlib's Path.suffix, lower-cased, without building a Path."""
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


def hf_corpus(source: str, max_docs: int = 0, text_field: str = "text") -> Corpus:
    """A Hugging Face dataset: `hf:NAME[:CONFIG][@SPLIT]` (hub or local cache; HF_DATASETS_OFFLINE=1
    uses the cache only), or a directory written by `Dataset.save_to_disk`. Each record is one
    document (its `text_field`), named NAME#i."""
    try:
        import datasets
    except ImportError:
        raise UserError("Hugging Face datasets need the datasets library: pip install 'moelab[hf]'") from None
    disk = Path(source).expanduser()
    if source.startswith("hf:") and not source[3:].partition("@")[0].partition(":")[0].strip():
        raise UserError(f"'{source}' names no dataset: write hf:NAME[:CONFIG][@SPLIT], "
                        "e.g. hf:wikitext:wikitext-2-raw-v1@train")
    try:
        if not source.startswith("hf:"):
            ds, label = datasets.load_from_disk(str(disk)), disk.name
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            spec, _, split = source[3:].partition("@")
            name, _, config = spec.partition(":")
            # streaming reads the hub's files; offline, only the prepared cache can answer
            offline = datasets.config.HF_DATASETS_OFFLINE or datasets.config.HF_HUB_OFFLINE
            ds = datasets.load_dataset(name, config or None, split=split or "train",
                                       streaming=bool(max_docs) and not offline)
            label = name
    except Exception as exc:  # network, missing cache, unknown name: one clear line
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load Hugging Face dataset '{source}': {first} (no network and not in "
                        "the local cache? set HF_DATASETS_OFFLINE=1 to use the cache only)") from None
    corpus = Corpus(source=source, documents=[])
    for i, rec in enumerate(ds):
        value = rec.get(text_field) if isinstance(rec, dict) else None
        name = f"{label}#{i + 1}"
        if not isinstance(value, str) or not value.strip():
            fields = ", ".join(list(rec)[:8]) if isinstance(rec, dict) else ""
            corpus.skipped.append((name, "empty" if value is not None else f"no text in field '{text_field}'"
                                   + (f" (has {fields})" if fields and text_field not in rec else "")))
            continue
        corpus.documents.append(Document(name, value))
        if max_docs and len(corpus.documents) >= max_docs:
            break
    return corpus


def _is_saved_dataset(path: str) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file())


def load_corpus(source: str, max_docs: int = 0, text_field: str = "text", pdf_filters=None) -> Corpus:
    """`pdf_filters`: a moelab.data.pdf.PdfFilters for PDF segments (None: its defaults)."""
    if not source.strip():  # Path("") is the current folder: never read it by accident
        raise UserError("the data source is empty: give stdlib, a file, a folder, a glob or hf:NAME")
    if source == "stdlib":
        corpus = stdlib_corpus(max_docs)
    elif source.startswith("hf:") or _is_saved_dataset(source):
        corpus = hf_corpus(source, max_docs, text_field)
    else:
        corpus = files_corpus(source, max_docs, text_field, pdf_filters)
    if not corpus.documents:
        why = "; ".join(f"{n}: {r}" for n, r in corpus.skipped[:3])
        field = any(r.startswith(("no field", "no column", "no text in field")) for _, r in corpus.skipped[:3])
        raise UserError(f"no usable text in data source '{source}'"
                        + (f" (skipped {len(corpus.skipped)}: {why})" if why else
                           f" (no file read: moelab reads {', '.join(_known_suffixes())} files)")
                        + ("; name the text field with data.text_field=NAME (data prepare: --text-field NAME)"
                           if field else ""))
    return corpus
