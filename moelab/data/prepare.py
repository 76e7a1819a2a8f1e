"""`moelab data prepare`: sources -> document split -> tokenizer -> token shards on disk.

Layout of a prepared directory (format 2):
  manifest.json        sources, documents/bytes/tokens per split and per source within each split,
                       the shards, skipped inputs with reasons, near-duplicates dropped, the
                       dataset fingerprint, and how long each stage took
  tokenizer/           tokenizer.json (+ tokenizer_config.json)
  train-00000.bin ...  each split's documents as token streams (doc EOS doc EOS ...), raw little-endian
  val-00000.bin        uint16 (vocab <= 65536) or uint32, cut into shards of about `shard_tokens`
                       tokens at document boundaries: memory-mapped, never loaded whole
  train-00000_docs.npy ...   start offset of each document in its shard (int64)
Format 1 (one `train.bin`/`val.bin` per split, from earlier versions) is still read.
Sources are read as they come and each document's text goes to a spill file beside the output
(`.tmp-NAME-HOST-PID/.text`, on the output's disk: /tmp may be memory; a killed prepare's is
removed by the next prepare to the same output, see moelab.files.staged_folder), so memory holds each document's
name, size and offset, never the corpus; MinHash, the split, BPE training and tokenization read the
texts back from it (deleted once the shards are written). Documents are tokenized in
chunks of `CHUNK_BYTES` of text on every core and each chunk is written out before the next is read
into tokens, so the token arrays of a whole split are never in memory either (except with --weights,
whose resampling needs every training document's length first).
`moelab train data.path=DIR` trains on it: windows of seq_len + 1 tokens are views into the
memory-mapped shards, cut disjoint within each shard (a shard's tail shorter than a window is
dropped, exactly as a single stream's tail is).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moelab.config import SHARD_TOKENS, TOKENIZER_SAMPLE
from moelab.data.parallel import batches
from moelab.data.sources import cut_text, iter_corpus, overlapping_sources
from moelab.data.split import hash_unit, split_documents
from moelab.data.tokenizer import load_tokenizer, train_bpe
from moelab.errors import UserError
from moelab.files import staged_folder

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
CHUNK_BYTES = 16 << 20  # text tokenized per batch


class TokenWindows:
    """Disjoint windows of `seq_len + 1` tokens over one or more (memory-mapped) 1-D token streams,
    numbered shard after shard. Indexing (slice, index array or tensor) returns an int64 tensor;
    nothing else is read."""

    def __init__(self, streams, seq_len: int):
        streams = [streams] if isinstance(streams, np.ndarray) else list(streams)
        self.width = seq_len + 1
        counts = [s.shape[0] // self.width for s in streams]
        self._views = [s[: c * self.width].reshape(c, self.width) for s, c in zip(streams, counts)]
        self._starts = np.cumsum([0, *counts])  # first window of each shard
        self.n = int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.width)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx) -> torch.Tensor:
        import torch  # here: `moelab data prepare` never needs it (2 s of its start-up)

        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        if len(self._views) == 1:
            return torch.from_numpy(np.asarray(self._views[0][idx], dtype=np.int64))
        rows = np.arange(self.n)[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < -self.n or flat.max() >= self.n):
            raise IndexError(f"window index out of range for {self.n} windows")
        flat = flat % max(self.n, 1)
        shard = np.searchsorted(self._starts, flat, side="right") - 1
        out = np.empty((flat.shape[0], self.width), dtype=np.int64)
        for k in np.unique(shard):  # a loop over the shards a batch touches, not over windows
            sel = shard == k
            out[sel] = self._views[k][flat[sel] - self._starts[k]]
        return torch.from_numpy(out.reshape(*rows.shape, self.width))


class _ShardWriter:
    """Appends whole documents to `{split}-NNNNN.bin` files, starting a new shard once the current
    one holds `shard_tokens` tokens (a document is never cut; one longer than a shard gets its own).
    Feeds every byte written to `hasher`, in order."""

    def __init__(self, root: Path, split: str, dtype, shard_tokens: int, hasher):
        self.root, self.split, self.dtype, self.limit, self.h = root, split, dtype, shard_tokens, hasher
        self.shards: list[dict] = []
        self._file, self._starts, self._tokens = None, [], 0

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        info = self.shards[-1]
        np.save(self.root / info["docs"], np.asarray(self._starts, dtype=np.int64))
        info.update(tokens=self._tokens, documents=len(self._starts))
        self._file, self._starts, self._tokens = None, [], 0

    def add(self, stream: np.ndarray, lengths: np.ndarray) -> None:
        """`stream`: whole documents, each followed by EOS; `lengths`: their lengths with the EOS."""
        ends = np.cumsum(lengths)
        begin = 0
        while begin < len(lengths):
            if self._file is not None and self._tokens >= self.limit:
                self._close_shard()
            if self._file is None:
                name = f"{self.split}-{len(self.shards):05d}"
                self.shards.append({"file": f"{name}.bin", "docs": f"{name}_docs.npy"})
                self._file = open(self.root / f"{name}.bin", "wb")
            offset = int(ends[begin - 1]) if begin else 0
            room = self.limit - self._tokens
            # documents that fit in this shard (at least one, so a long document gets a shard)
            stop = max(begin + 1, int(np.searchsorted(ends, offset + room, side="right")))
            stop = min(stop, len(lengths))
            piece = stream[offset:int(ends[stop - 1])].astype(self.dtype, copy=False)
            self._starts += (np.concatenate([[offset], ends[begin:stop - 1]]) - offset + self._tokens).tolist()
            data = piece.astype(piece.dtype.newbyteorder("<"), copy=False).tobytes()
            self._file.write(data)
            self.h.update(data)
            self._tokens += piece.shape[0]
            begin = stop

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards


def _join(arrays: list[np.ndarray], eos_id: int, prefix: list[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(doc0 EOS doc1 EOS ..., lengths with the EOS) without a loop over tokens; each document
    after `prefix` (the tokenizer's doc_prefix, counted in its length)."""
    lengths = np.fromiter((len(prefix) + a.shape[0] + 1 for a in arrays), dtype=np.int64, count=len(arrays))
    out = np.empty(int(lengths.sum()), dtype=np.uint32)
    eos_at = np.cumsum(lengths) - 1
    body = np.ones(out.shape[0], dtype=bool)
    body[eos_at] = False
    for j, token in enumerate(prefix):  # a loop over the prefix (one <s>), not over tokens
        body[eos_at + 1 - lengths + j] = False
        out[eos_at + 1 - lengths + j] = token
    out[body] = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
    out[eos_at] = eos_id
    return out, lengths


class _TextSpill:
    """Document texts appended to one file as they are read, then read back with pread (the page
    cache holds what fits; no memory map, whose pages would count as the process's own)."""

    def __init__(self, path: Path):
        self.path, self._file, self._size, self._fd = path, open(path, "wb"), 0, None

    def add(self, text: str) -> tuple[int, int]:
        """(offset, UTF-8 size) of `text` in the file."""
        data = text.encode("utf-8")
        self._file.write(data)
        self._size += len(data)
        return self._size - len(data), len(data)

    def seal(self) -> None:
        """Done adding: open the file for reading."""
        self._file.close()
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, at: int, size: int) -> bytes:
        data = os.pread(self._fd, size, at)
        if len(data) != size:
            raise OSError(f"{self.path} was cut short while in use")
        return data

    def read_many(self, docs: list["_Doc"]) -> list[bytes]:
        """The UTF-8 bytes of several documents: one read of the stretch that holds them when they lie
        close together (a chunk of the corpus, of a split), else one read each."""
        if not docs:
            return []
        lo, hi = min(d._at for d in docs), max(d._at + d.nbytes for d in docs)
        if hi - lo > 2 * sum(d.nbytes for d in docs):
            return [d.data for d in docs]
        block = self.read(lo, hi - lo)
        return [block[d._at - lo:d._at - lo + d.nbytes] for d in docs]

    def texts(self, docs: list["_Doc"]) -> list[str]:
        return [b.decode("utf-8") for b in self.read_many(docs)]

    def __enter__(self) -> "_TextSpill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Discard the file (its texts are no longer needed, or the prepare failed); closing twice is harmless."""
        try:
            self._file.close()
        except OSError:  # a full disk: flushing the last texts fails too; the file goes anyway
            pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


class _Doc:
    """A document of a source being prepared: its name, UTF-8 size and source, and its text, read
    back from the spill file on each access (a document is read a few times, never held)."""
    __slots__ = ("name", "nbytes", "source", "_spill", "_at")

    def __init__(self, name: str, source: str, spill: _TextSpill, text: str):
        self.name, self.source, self._spill = name, source, spill
        self._at, self.nbytes = spill.add(text)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")

    @property
    def data(self) -> bytes:
        """The text's UTF-8 bytes."""
        return self._spill.read(self._at, self.nbytes)


def _nbytes(d: _Doc) -> int:
    return d.nbytes


def tokenizer_texts(train, budget: int):
    """Training-split texts for BPE, in hash order (an unbiased sample) up to `budget` bytes."""
    used = 0
    for d in sorted(train, key=lambda d: hash_unit(d.name, "tokenizer")):
        if budget and used >= budget:
            return
        text = d.text
        used += len(text)
        yield text


def _dedup_training(train: list[_Doc], group_of: dict[str, int]) -> tuple[list[_Doc], list[dict]]:
    """Keep one document of each near-duplicate group (MinHash) in the training split."""
    kept, dropped, first = [], [], {}
    for d in train:
        g = group_of[d.name]
        if g in first:
            dropped.append({"name": d.name, "near_duplicate_of": first[g]})
        else:
            first[g] = d.name
            kept.append(d)
    return kept, dropped


def _mix(lengths: list[int], sources: list[str], weights: dict[str, float], salt: str):
    """Resample the training documents so each source supplies its weight's share of the tokens:
    every document of a source repeats floor(factor) times, then a seeded random subset of its
    documents covers the remainder. Validation keeps its natural mixture. `lengths`: tokens per
    document including its EOS. Returns the chosen document indices and a report per source."""
    rng = np.random.default_rng(int(hashlib.sha256(salt.encode()).hexdigest()[:8], 16))
    total = sum(lengths)
    wsum = sum(weights[s] for s in set(sources))
    out, report = [], {}
    for src in dict.fromkeys(sources):  # sources in order of appearance
        members = [k for k, s in enumerate(sources) if s == src]
        have = sum(lengths[k] for k in members)
        want = weights[src] / wsum * total
        chosen = members * int(want // have)
        rest = want - have * int(want // have)
        for k in rng.permutation(members):
            if rest <= 0:
                break
            chosen.append(int(k))
            rest -= lengths[k]
        out += chosen
        report[src] = {"weight": weights[src], "natural_tokens": have,
                       "tokens": sum(lengths[k] for k in chosen), "documents": len(chosen)}
    mixed_total = sum(r["tokens"] for r in report.values())
    for r in report.values():
        r["share"] = r["tokens"] / mixed_total
    return out, report


def _source_labels(sources: list[str]) -> list[str]:
    """What each source's document names start with when there are several: its last path part
    (`stdlib`, `notes`), or the whole path as given where two last parts are alike (a/docs and
    b/docs), so that no two documents share a name (names decide the split, the mixing and the audit)."""
    labels = [Path(src).name or src for src in sources]
    if len(set(labels)) < len(labels):
        labels = [src.rstrip("/") or src for src in sources]
    twice = sorted({lb for lb in labels if labels.count(lb) > 1})
    if twice:
        raise UserError(f"data source {twice[0]} is given twice; give each source once")
    return labels


def stage_printer(progress: bool | None = None):
    """The `say` for `prepare`: lines on stderr with progress=True; with None only when stderr is a
    terminal (in a log or pipe a refusal stays one line); with False none."""
    if progress or (progress is None and sys.stderr.isatty()):
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return None


def prepare(sources: list[str], out: str, val_fraction: float = 0.05, salt: str = "moelab",
            text_field: str = "text", tokenizer: str | None = None, vocab_size: int = 8192,
            near_dup_split: bool = True, dedup: bool = False, overwrite: bool = False,
            max_docs: int = 0, weights: list[float] | None = None, pdf_filters=None,
            tokenizer_train_bytes: int = TOKENIZER_SAMPLE, request: dict | None = None,
            shard_tokens: int = SHARD_TOKENS, doc_chars: int = 0, say=None) -> Path:
    """`request`: the settings that produced this directory, stored in the manifest (a run that
    prepares its raw source checks them when it resumes). `doc_chars`: texts longer are cut into
    documents NAME#1, NAME#2 ... of at most about that many characters (see sources.cut_text).
    `say`: called with a line as each long stage starts (reading, BPE training, tokenizing)."""
    say = say or (lambda msg: None)
    out_dir = Path(out).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise UserError(f"output directory {out_dir} is not empty; choose another --out or pass --overwrite")
        others = _not_prepared_data(out_dir)
        if others:  # --out ~ --overwrite must never delete a home directory
            raise UserError(f"--overwrite replaces earlier prepared data only, and {out_dir} also holds "
                            f"{', '.join(others[:3])}{' ...' if len(others) > 3 else ''}; choose another --out")
    if not 0.0 < val_fraction < 1.0:
        raise UserError("--val-fraction must be between 0 and 1")
    if weights is not None and (len(weights) != len(sources) or not all(0 < w < float("inf") for w in weights)):
        raise UserError(f"--weights needs one positive weight per source ({len(sources)} sources, "
                        f"got {' '.join(f'{w:g}' for w in weights)})")
    overlap = overlapping_sources(sources)
    if overlap:
        raise UserError(overlap)
    if shard_tokens < 1:
        raise UserError("--shard-tokens must be at least 1")
    if doc_chars < 0:
        raise UserError("--doc-chars must be 0 (off) or more")
    timings, clock = {}, time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(timings.get(stage, 0.0) + now - clock, 3)
        clock = now

    # Built beside the output and renamed into place when complete; out_dir is absent, empty, or
    # (checked above) earlier prepared data that --overwrite replaces.
    with staged_folder(out_dir, replace=True) as tmp, _TextSpill(tmp / ".text") as spill:
        say(f"preparing data: reading {', '.join(sources)}")
        docs, skipped, per_source = [], [], {}
        for src, label in zip(sources, _source_labels(sources)):
            prefix = f"{label}/" if len(sources) > 1 else ""
            n_docs, n_skipped, n_bytes = 0, 0, 0
            for name, text, reason in iter_corpus(src, max_docs, text_field, pdf_filters):
                if text is None:
                    skipped.append({"name": prefix + name, "reason": reason})
                    n_skipped += 1
                    continue
                pieces = cut_text(text, doc_chars)
                for k, piece in enumerate(pieces, 1):
                    docs.append(_Doc(prefix + name + (f"#{k}" if len(pieces) > 1 else ""), src, spill, piece))
                    n_docs, n_bytes = n_docs + 1, n_bytes + docs[-1].nbytes
            per_source[src] = {"documents": n_docs, "skipped": n_skipped, "bytes": n_bytes}
        spill.seal()
        lap("read")
        groups = None
        if near_dup_split or dedup:  # MinHash once, for the split and for --dedup
            from moelab.data.neardup import NUM_PERM, SIG_DTYPE, signature_groups, signatures

            sigs, at = np.empty((len(docs), NUM_PERM), dtype=SIG_DTYPE), 0  # filled in place: no second copy
            for chunk in batches(docs, CHUNK_BYTES, _nbytes):
                sigs[at:at + len(chunk)] = signatures(spill.read_many(chunk))
                at += len(chunk)
            groups = signature_groups(sigs)
            del sigs
        train, val = split_documents(docs, val_fraction, salt, groups=groups if near_dup_split else None)
        if not train or not val:
            size = str(max(1000, max((d.nbytes for d in docs), default=0) // 40))  # 40 or more documents
            size = int(size[0]) * 10 ** (len(size) - 1)  # rounded down to one significant digit
            cut = f"cut long texts into documents: data.doc_chars=N (data prepare: --doc-chars N), e.g. {size}"
            raise UserError(f"{len(docs)} usable document(s); need at least 2 (one for training, one for "
                            f"validation): give more files or records, or {cut}")
        dropped = []
        if dedup:
            train, dropped = _dedup_training(train, {d.name: g for d, g in zip(docs, groups)})
        lap("split")
        train_mb = sum(d.nbytes for d in train) / 1e6
        say(f"preparing data: {len(train):,} training / {len(val):,} validation documents ({train_mb:,.1f} / "
            f"{sum(d.nbytes for d in val) / 1e6:,.1f} MB, read and split in {sum(timings.values()):.1f} s)")
        if tokenizer:
            tok = load_tokenizer(tokenizer)
        else:
            sample = min(train_mb, tokenizer_train_bytes / 1e6) if tokenizer_train_bytes else train_mb
            say(f"preparing data: training a {vocab_size:,}-token BPE tokenizer on {sample:,.1f} of the "
                f"{train_mb:,.1f} MB of training text")
            tok = train_bpe(tokenizer_texts(train, tokenizer_train_bytes), vocab_size)
            lap("tokenizer training")
            say(f"preparing data: tokenizer trained in {timings['tokenizer training']:.1f} s; tokenizing")
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        tok.verify_fast([d.text for d in train[:64]])  # the fast encoder must agree here too, else it is off

        tok.save(tmp / "tokenizer")
        splits, h = {}, hashlib.sha256(tok.tk.to_str().encode())
        mixing = None
        for name, split_docs in (("train", train), ("val", val)):
            h.update(name.encode())
            writer = _ShardWriter(tmp, name, dtype, shard_tokens, h)
            by_source: dict[str, dict] = {}

            def count(docs: list[_Doc], lengths: np.ndarray) -> None:
                for d, n in zip(docs, lengths.tolist()):
                    r = by_source.setdefault(d.source, {"documents": 0, "bytes": 0, "tokens": 0})
                    r["documents"] += 1
                    r["bytes"] += d.nbytes
                    r["tokens"] += n
            if name == "train" and weights is not None:
                # resampling needs every document's length first: keep this split's tokens (compact)
                arrays = [a.astype(dtype) for c in batches(split_docs, CHUNK_BYTES, _nbytes)
                          for a in tok.encode_arrays(spill.texts(c))]
                lap("tokenize")
                chosen, mixing = _mix([len(tok.doc_prefix) + a.shape[0] + 1 for a in arrays],
                                      [d.source for d in split_docs], dict(zip(sources, weights)), salt)
                split_docs = [split_docs[k] for k in chosen]
                for start in range(0, len(chosen), 4096):
                    stream, lengths = _join([arrays[k] for k in chosen[start:start + 4096]], tok.eos_id,
                                            tok.doc_prefix)
                    writer.add(stream, lengths)
                    count(split_docs[start:start + 4096], lengths)
                del arrays
                lap("write")
            else:
                for chunk in batches(split_docs, CHUNK_BYTES, _nbytes):
                    arrays = tok.encode_arrays(spill.texts(chunk))
                    lap("tokenize")
                    stream, lengths = _join(arrays, tok.eos_id, tok.doc_prefix)
                    writer.add(stream, lengths)
                    count(chunk, lengths)
                    lap("write")
            shards = writer.close()
            splits[name] = {"documents": len(split_docs),
                            "bytes": sum(d.nbytes for d in split_docs),
                            "tokens": sum(s["tokens"] for s in shards), "shards": shards,
                            "sources": by_source,  # documents, bytes, tokens (with EOS) per source
                            "document_names": [d.name for d in split_docs]}
        spill.close()
        manifest = {
            "format": 2, "sources": per_source, "text_field": text_field, "val_fraction": val_fraction,
            "salt": salt, "near_dup_split": near_dup_split, "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "fingerprint": h.hexdigest()[:16],
            "encoder": "tiktoken" if tok.fast is not None else "tokenizers",
            "splits": splits, "skipped": skipped, "near_duplicates_dropped": dropped, "mixing": mixing,
            "doc_chars": doc_chars, "request": request, "seconds": timings,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out_dir


def skipped_note(skipped: list[dict], manifest: str | Path, kinds: int = 4) -> str | None:
    """One line saying which inputs the data lacks and why, by kind of reason (most frequent first,
    `kinds` of them, each with its first input), or None when nothing was skipped. The manifest
    keeps every one; without this line a JSONL whose records name their text in two ways, or a
    folder of encrypted PDFs, lost part of the data with only a count said."""
    if not skipped:
        return None
    groups: dict[str, list] = {}
    for s in skipped:  # "unreadable PDF: PdfReadError: ..." -> "unreadable PDF"
        groups.setdefault(s["reason"].split(": ")[0], [0, s["name"]])[0] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])  # stable: ties keep their first seen order
    parts = [f"{n:,} {why} ({'first: ' * (n > 1)}{first})" for why, (n, first) in ranked[:kinds]]
    if len(ranked) > kinds:
        rest = sum(n for _, (n, _) in ranked[kinds:])
        parts.append(f"{rest:,} for {len(ranked) - kinds} other reason{'s' * (len(ranked) - kinds > 1)}")
    return (f"note: {len(skipped):,} input{'s' * (len(skipped) > 1)} skipped, not in the data: " + "; ".join(parts)
            + f" (each with its reason: {manifest}, \"skipped\")")


def read_manifest(root: str | Path) -> dict:
    """A prepared directory's manifest, checked for the fields its readers use: a damaged or
    hand-broken one is a one-line error, not a traceback from deep in the loader."""
    path = Path(root).expanduser() / MANIFEST
    again = "prepare the data again (moelab data prepare)"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"{path} is damaged ({why}); {again}") from None
    try:
        ok = (np.dtype(m["dtype"]) in (np.uint16, np.uint32) and isinstance(m["fingerprint"], str)
              and all(isinstance(m["splits"][s], dict) for s in ("train", "val")))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{path} is not a manifest moelab wrote (a field is missing or changed); {again}")
    return m


def split_streams(root: str | Path, split: str, manifest: dict | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(memory-mapped token stream, document start offsets) of each shard of a prepared split."""
    root = Path(root).expanduser()
    manifest = manifest or read_manifest(root)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    info_split = manifest["splits"][split]
    shards = info_split.get("shards") or [{"file": f"{split}.bin", "docs": f"{split}_docs.npy",
                                           "tokens": info_split.get("tokens")}]
    again = "prepare the data again (moelab data prepare)"
    out = []
    for info in shards:
        file, docs_file = root / info["file"], root / info["docs"]
        if not file.is_file():
            raise UserError(f"{file} is missing; {again}")
        # A shard cut short (a partial copy) would otherwise train on part of the data without a word.
        size, want = file.stat().st_size, info.get("tokens")
        if (size != want * dtype.itemsize) if want is not None else size % dtype.itemsize:
            expected = f"the {want * dtype.itemsize:,} of its {want:,} tokens" if want is not None else "whole tokens"
            raise UserError(f"{file} holds {size:,} bytes, not {expected} (cut short, or changed since it was "
                            f"prepared); {again}")
        try:
            starts = np.load(docs_file)  # no pickles (allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # numpy's pickle advice is not ours to pass on
            why = "not a NumPy array file" if "pickle" in str(exc) else str(exc).splitlines()[0]
            raise UserError(f"{docs_file} is damaged ({why}); {again}") from None
        n_docs, n_tokens = info.get("documents"), size // dtype.itemsize
        if starts.ndim != 1 or (n_docs is not None and starts.shape[0] != n_docs) or (
                starts.size and not 0 <= starts[-1] < n_tokens):
            raise UserError(f"{docs_file} does not match {file.name} (changed since it was prepared); {again}")
        stream = np.memmap(file, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        out.append((stream, starts))
    return out


_PREPARED_FILE = re.compile(r"(train|val)(-\d+)?(\.bin|_docs\.npy)")


def _not_prepared_data(out_dir: Path) -> list[str]:
    """The names in `out_dir` that `prepare` would not have written (all of them when it is not a
    prepared directory at all)."""
    if not out_dir.is_dir():
        return [out_dir.name]
    names = sorted(p.name for p in out_dir.iterdir())
    if MANIFEST not in names:
        return names
    return [n for n in names if n not in (MANIFEST, "tokenizer") and not _PREPARED_FILE.fullmatch(n)]


def is_prepared(path: str | Path) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def load_prepared(path: str | Path, seq_len: int):
    """(tokenizer, train TokenWindows, val TokenWindows, manifest) of a prepared directory."""
    root = Path(path).expanduser()
    if not is_prepared(root):
        raise UserError(f"{path} is not a prepared data directory (no {MANIFEST}); "
                        "create one with: moelab data prepare SOURCE --out DIR")
    manifest = read_manifest(root)
    tok = load_tokenizer(root / "tokenizer")
    windows = {}
    for name in ("train", "val"):
        streams = [s for s, _ in split_streams(root, name, manifest)]
        if sum(s.shape[0] for s in streams) == 0:
            raise UserError(f"the {name} split of {root} holds no tokens")
        windows[name] = TokenWindows(streams, seq_len)
    return tok, windows["train"], windows["val"], manifest
