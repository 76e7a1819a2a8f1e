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

from moelab.errors import UserError, first_line

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


def _jsonl_raw_lines(path: Path):
    """The lines of a JSONL file as bytes, read as they come: split on b"\\n" only (str.splitlines also
    splits at U+2028, U+0085 and others, which JSON strings may hold unescaped), without a leading
    byte-order mark or a blank tail after the last newline. Raises OSError."""
    with open(path, "rb") as f:
        for k, line in enumerate(f):
            if k == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.endswith(b"\n"):
                yield line[:-1]
            elif line.strip():  # text after the last newline
                yield line


def jsonl_lines(path: Path) -> list[str]:
    """The lines of a JSONL file (see _jsonl_raw_lines). Raises OSError or UnicodeDecodeError."""
    return [line.decode("utf-8") for line in _jsonl_raw_lines(path)]


_JSON_NAMES = {list: "array", int: "number", float: "number", bool: "boolean"}


def _jsonl_values(path: Path, text_field: str):
    """Each line's value of `text_field` (or the line's own value when it is not an object), or an
    exception standing for what is wrong with the line."""
    for raw in _jsonl_raw_lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield ValueError("not UTF-8")
            continue
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            yield ValueError("invalid JSON")
            continue
        if rec is None or isinstance(rec, str):
            yield rec
        elif not isinstance(rec, dict):  # a list or a number: neither a record nor a text
            yield ValueError(f"a JSON {_JSON_NAMES.get(type(rec), type(rec).__name__)}, not an object or a string")
        elif text_field in rec:
            yield rec[text_field]
        else:  # the fields it has, named only when needed (not for every record)
            yield KeyError(", ".join(list(rec)[:8]))


def _parquet_values(path: Path, text_field: str):
    """The column `text_field` of a Parquet file, a batch of rows at a time; a KeyError naming the
    columns when there is no such column."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # not installed, or installed but unusable here (pyarrow 26 with NumPy 1.x)
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            raise UserError("reading Parquet needs pyarrow: pip install 'moelab[data]'") from None
        raise UserError(f"pyarrow is installed but cannot be imported ({first_line(exc)}); reading Parquet needs "
                        "a pyarrow that imports here") from None
    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    if text_field not in columns:
        yield KeyError(", ".join(columns[:8]))
        return
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        yield from batch.column(0).to_pylist()


def _records(path: Path, name: str, text_field: str):
    """(record name, text or None, reason) for each record of a JSONL or Parquet file, read as they
    come (a file larger than memory streams); a file that cannot be read (any further) is one
    skipped entry with its reason."""
    parquet = path.suffix.lower() == ".parquet"
    values = _parquet_values(path, text_field) if parquet else _jsonl_values(path, text_field)
    i = 0
    while True:
        try:
            v = next(values)
        except StopIteration:
            return
        except UserError:
            raise
        except Exception as exc:  # OSError, or one of the several types pyarrow raises for a corrupt file
            why = getattr(exc, "strerror", None) or first_line(exc, 80)
            yield f"{name}#{i + 1}" if i else name, None, f"unreadable {'Parquet' if parquet else 'JSONL'}: {why}"
            return
        i += 1
        if isinstance(v, str) and v.strip():
            yield f"{name}#{i}", v, ""
        elif v is None or isinstance(v, str):
            yield f"{name}#{i}", None, "empty"
        elif isinstance(v, ValueError):
            yield f"{name}#{i}", None, str(v)
        elif isinstance(v, KeyError):  # a Parquet file's missing column is the file's, not a record's
            yield (name, None, f"no column '{text_field}' (has {v.args[0]})") if parquet else (
                f"{name}#{i}", None, f"no field '{text_field}'" + (f" (has {v.args[0]})" if v.args[0] else ""))
        else:
            yield f"{name}#{i}", None, f"field '{text_field}' is not text"


PREFETCH_FILES = 256  # plain files read ahead on threads, a group at a time


def _file_items(root: Path, files: list[Path], text_field: str = "text", pdf_filters=None):
    """(name, text or None, reason) for each document of `files` (names relative to `root`), in path
    order. Plain text files are read ahead on threads (file reads release the GIL), a group of
    PREFETCH_FILES at a time, so only that group is ever held."""
    from moelab.data.parallel import thread_map

    files = sorted(files, key=lambda f: f.parts)  # Path order, without Path comparisons
    prefix = str(root) + os.sep
    for g in range(0, len(files), PREFETCH_FILES):
        group = files[g:g + PREFETCH_FILES]
        plain = [f for f in group if _suffix(f.name) in TEXT_SUFFIXES]
        prefetched = dict(zip(plain, thread_map(_read_text, plain, threads=8)))
        for path in group:
            full = str(path)
            name = (full[len(prefix):].replace(os.sep, "/") if full.startswith(prefix)
                    else path.relative_to(root).as_posix() if path != root else path.name)
            if path.suffix.lower() in RECORD_SUFFIXES:
                records = 0
                for item in _records(path, name, text_field):
                    records += 1
                    yield item
                if not records:
                    yield name, None, "no records"
                continue
            if path.suffix.lower() in PDF_SUFFIXES:
                from moelab.data.pdf import pdf_document

                text, reason = pdf_document(path, pdf_filters)
            else:
                text, reason = prefetched.pop(path, None) or _read_text(path)
            yield name, text, reason


def _gather(source: str, items) -> Corpus:
    corpus = Corpus(source=source, documents=[])
    for name, text, reason in items:
        if text is None:
            corpus.skipped.append((name, reason))
        else:
            corpus.documents.append(Document(name, text))
    return corpus


def _take(items, max_docs: int):
    """`items` up to and including the `max_docs`-th document (all of them for 0)."""
    n = 0
    for item in items:
        yield item
        n += item[1] is not None
        if max_docs and n >= max_docs:
            return


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_items():
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return _file_items(root, files)


def _path_items(path: str, text_field: str = "text", pdf_filters=None):
    if any(c in path for c in "*?["):  # a glob such as papers/**/*.pdf
        import glob

        matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(path), recursive=True))]
        files = [m for m in matches if m.is_file()]
        if not files:
            raise UserError(f"no file matches {path}")
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
        return _file_items(root, files, text_field, pdf_filters)
    p = Path(path).expanduser()
    if p.is_file():
        return _file_items(p.parent, [p], text_field, pdf_filters)
    if not p.is_dir():
        raise UserError(f"data source not found: {path} (give a text, JSONL or Parquet file, a "
                        "directory, or 'stdlib')")
    return _file_items(p, _walk_files(p), text_field, pdf_filters)


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


def _hf_items(source: str, text_field: str = "text", streaming: bool = False):
    """(name, text or None, reason) for each record of a Hugging Face dataset: `hf:NAME[:CONFIG][@SPLIT]`
    (hub or local cache; the cache only when the hub cannot be reached or HF_HUB_OFFLINE=1), or a
    directory written by `Dataset.save_to_disk`. Each record is one document (its `text_field`),
    named NAME#i. The dataset is opened before the first record is asked for (memory-mapped Arrow:
    records stream)."""
    if source.startswith("hf:") and not source[3:].partition("@")[0].partition(":")[0].strip():
        raise UserError(f"'{source}' names no dataset: write hf:NAME[:CONFIG][@SPLIT], "
                        "e.g. hf:wikitext:wikitext-2-raw-v1@train")
    try:
        import datasets
    except ImportError:
        raise UserError("Hugging Face datasets need the datasets library: pip install 'moelab[hf]'") from None
    disk = Path(source).expanduser()
    if not source.startswith("hf:"):
        try:
            ds, label = datasets.load_from_disk(str(disk)), disk.name
        except Exception as exc:  # a damaged or partial save_to_disk folder
            raise UserError(f"cannot load the saved dataset {disk}: {first_line(exc)}") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return _hf_records(ds, label, text_field)
    from moelab.hub import hub_access, offline_hint

    spec, _, split = source[3:].partition("@")
    name, _, config = spec.partition(":")
    with hub_access() as offline:
        try:  # streaming reads the hub's files; offline, only the prepared cache can answer
            ds = datasets.load_dataset(name, config or None, split=split or "train",
                                       streaming=streaming and not offline)
        except Exception as exc:  # network, missing cache, unknown name: one clear line
            raise UserError(f"cannot load Hugging Face dataset '{source}': {first_line(exc)}; "
                            f"{offline_hint(offline)}") from None
    return _hf_records(ds, name, text_field)


def _hf_records(ds, label: str, text_field: str):
    for i, rec in enumerate(ds):
        value = rec.get(text_field) if isinstance(rec, dict) else None
        name = f"{label}#{i + 1}"
        if not isinstance(value, str) or not value.strip():
            fields = ", ".join(list(rec)[:8]) if isinstance(rec, dict) else ""
            yield name, None, ("empty" if value is not None else f"no text in field '{text_field}'"
                               + (f" (has {fields})" if fields and text_field not in rec else ""))
        else:
            yield name, value, ""


def _read_root(source: str) -> tuple[Path, bool] | None:
    """The folder or file a source reads, resolved, and whether it is the stdlib; None for a glob or
    a Hugging Face dataset, whose files are not known before they are read."""
    if source == "stdlib":
        return stdlib_root().resolve(), True
    if source.startswith("hf:") or any(c in source for c in "*?["):
        return None
    p = Path(source).expanduser()
    return (p.resolve(), False) if p.exists() else None


def _reads(root: Path, stdlib: bool, inner: Path) -> bool:
    """Whether walking `root` as a source reaches `inner` (a folder or file below it): hidden parts
    are never walked, the stdlib's test and site-packages folders neither, and the stdlib reads
    .py files only."""
    parts = inner.relative_to(root).parts
    folders = parts if inner.is_dir() else parts[:-1]
    if any(p.startswith(".") for p in parts) or (stdlib and any(p in SKIP_DIRS for p in folders)):
        return False
    suffixes = {".py"} if stdlib else TEXT_SUFFIXES | RECORD_SUFFIXES | PDF_SUFFIXES
    return inner.is_dir() or _suffix(inner.name) in suffixes


def overlapping_sources(sources: list[str]) -> str | None:
    """Why two of `sources` would read the same files (the same folder spelt two ways, or one inside
    the other), so that their documents would count twice; None when they do not."""
    roots = [_read_root(s) for s in sources]
    for i, a in enumerate(roots):
        for j in range(i + 1, len(roots)):
            b = roots[j]
            if a is None or b is None:
                continue
            if a[0] == b[0]:
                return (f"data source {a[0]} is given twice (as {sources[i]} and {sources[j]}); "
                        "give each source once")
            for (outer, stdlib, o), (inner, _, n) in (((*a, i), (*b, j)), ((*b, j), (*a, i))):
                if outer.is_dir() and inner.is_relative_to(outer) and _reads(outer, stdlib, inner):
                    return (f"data source {sources[n]} is inside data source {sources[o]}, so its documents "
                            "would be read twice; give each once (--weights sets a source's share)")
    return None


def _is_saved_dataset(path: str) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file())


def iter_corpus(source: str, max_docs: int = 0, text_field: str = "text", pdf_filters=None):
    """(name, text, "") for each document of a data source and (name, None, reason) for each input
    skipped, in a stable order, read as they come: only a group of files (or one batch of records)
    is held at a time, so a source larger than memory streams. Stops after `max_docs` documents
    (0: all). Raises UserError for a source that cannot be read, and, once read, one that gave no
    document. `pdf_filters`: a moelab.data.pdf.PdfFilters for PDF segments (None: its defaults)."""
    if not source.strip():  # Path("") is the current folder: never read it by accident
        raise UserError("the data source is empty: give stdlib, a file, a folder, a glob or hf:NAME")
    if source == "stdlib":
        items = _stdlib_items()
    elif source.startswith("hf:") or _is_saved_dataset(source):
        items = _hf_items(source, text_field, streaming=bool(max_docs))
    else:
        items = _path_items(source, text_field, pdf_filters)
    documents, skipped, first_skipped = 0, 0, []
    for item in _take(items, max_docs):
        if item[1] is None:
            skipped += 1
            if len(first_skipped) < 3:
                first_skipped.append(item)
        else:
            documents += 1
        yield item
    if not documents:
        why = "; ".join(f"{n}: {r}" for n, _, r in first_skipped)
        field = any(r.startswith(("no field", "no column", "no text in field")) for _, _, r in first_skipped)
        raise UserError(f"no usable text in data source '{source}'"
                        + (f" (skipped {skipped}: {why})" if why else
                           f" (no file read: moelab reads {', '.join(_known_suffixes())} files)")
                        + ("; name the text field with --text-field NAME (moelab train: data.text_field=NAME)"
                           if field else ""))


def cut_text(text: str, max_chars: int) -> list[str]:
    """`text` in consecutive pieces of at most `max_chars` characters (all of it when shorter or
    `max_chars` is 0), each ending at the last line break of its second half, else at the last
    space there, else at max_chars. The pieces joined are the text."""
    if not max_chars or len(text) <= max_chars:
        return [text]
    pieces, at = [], 0
    while len(text) - at > max_chars:
        end = at + max_chars
        cut = text.rfind("\n", at + max_chars // 2, end) + 1 or text.rfind(" ", at + max_chars // 2, end) + 1 or end
        pieces.append(text[at:cut])
        at = cut
    pieces.append(text[at:])
    return pieces


def load_corpus(source: str, max_docs: int = 0, text_field: str = "text", pdf_filters=None) -> Corpus:
    """The whole source in memory (see iter_corpus; `moelab data prepare` streams it instead)."""
    return _gather(source, iter_corpus(source, max_docs, text_field, pdf_filters))
