"""`moelab data prepare`: sources -> document split -> tokenizer -> token streams on disk.

Layout of a prepared directory:
  manifest.json        sources, documents/bytes/tokens per split and per source, skipped inputs with
                       reasons, near-duplicates dropped, the dataset fingerprint
  tokenizer/           tokenizer.json (+ tokenizer_config.json)
  train.bin, val.bin   each split's documents as one token stream (doc EOS doc EOS ...), raw
                       little-endian uint16 (vocab <= 65536) or uint32: memory-mapped, never loaded whole
  train_docs.npy, val_docs.npy   start offset of each document in its stream (int64)
`moelab train data.path=DIR` trains on it: windows of seq_len + 1 tokens are views into the
memory map, cut disjoint exactly as for in-memory data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from moelab.data.sources import Document, load_corpus
from moelab.data.split import hash_unit, split_documents
from moelab.data.tokenizer import load_tokenizer, train_bpe
from moelab.errors import UserError

MANIFEST = "manifest.json"


class TokenWindows:
    """Disjoint windows of `seq_len + 1` tokens over a (memory-mapped) 1-D token stream.
    Indexing (slice, index array or tensor) returns an int64 tensor; nothing else is read."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        self.width = seq_len + 1
        self.n = stream.shape[0] // self.width
        self._view = stream[: self.n * self.width].reshape(self.n, self.width)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.width)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        return torch.from_numpy(np.asarray(self._view[idx], dtype=np.int64))


def tokenizer_texts(train, budget: int):
    """Training-split texts for BPE, in hash order (an unbiased sample) up to `budget` bytes."""
    used = 0
    for d in sorted(train, key=lambda d: hash_unit(d.name, "tokenizer")):
        if budget and used >= budget:
            return
        used += len(d.text)
        yield d.text


def _dedup_training(train: list[Document], group_of: dict[str, int]) -> tuple[list[Document], list[dict]]:
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


def _mix(docs: list[Document], ids: list[list[int]], sources: list[str], weights: dict[str, float],
         salt: str):
    """Resample the training documents so each source supplies its weight's share of the tokens:
    every document of a source repeats floor(factor) times, then a seeded random subset of its
    documents covers the remainder. Validation keeps its natural mixture."""
    rng = np.random.default_rng(int(hashlib.sha256(salt.encode()).hexdigest()[:8], 16))
    total = sum(len(i) + 1 for i in ids)
    wsum = sum(weights[s] for s in set(sources))
    out_docs, out_ids, report = [], [], {}
    for src in dict.fromkeys(sources):  # sources in order of appearance
        members = [k for k, s in enumerate(sources) if s == src]
        have = sum(len(ids[k]) + 1 for k in members)
        want = weights[src] / wsum * total
        chosen = members * int(want // have)
        rest = want - have * int(want // have)
        for k in rng.permutation(members):
            if rest <= 0:
                break
            chosen.append(int(k))
            rest -= len(ids[k]) + 1
        out_docs += [docs[k] for k in chosen]
        out_ids += [ids[k] for k in chosen]
        report[src] = {"weight": weights[src], "natural_tokens": have,
                       "tokens": sum(len(ids[k]) + 1 for k in chosen), "documents": len(chosen)}
    mixed_total = sum(r["tokens"] for r in report.values())
    for r in report.values():
        r["share"] = r["tokens"] / mixed_total
    return out_docs, out_ids, report


def prepare(sources: list[str], out: str, val_fraction: float = 0.05, salt: str = "moelab",
            text_field: str = "text", tokenizer: str | None = None, vocab_size: int = 8192,
            near_dup_split: bool = True, dedup: bool = False, overwrite: bool = False,
            max_docs: int = 0, weights: list[float] | None = None, pdf_filters=None,
            tokenizer_train_bytes: int = 0, request: dict | None = None) -> Path:
    """`request`: the settings that produced this directory, stored in the manifest (a run that
    prepares its raw source checks them when it resumes)."""
    out_dir = Path(out).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise UserError(f"output directory {out_dir} is not empty; choose another --out or pass --overwrite")
    if not 0.0 < val_fraction < 1.0:
        raise UserError("--val-fraction must be between 0 and 1")
    if weights is not None and (len(weights) != len(sources) or min(weights) <= 0):
        raise UserError(f"--weights needs one positive weight per source ({len(sources)} sources, "
                        f"got {len(weights)})")
    docs, skipped, per_source, source_of = [], [], {}, {}
    for src in sources:
        corpus = load_corpus(src, max_docs, text_field, pdf_filters)
        prefix = f"{Path(src).name or src}/" if len(sources) > 1 else ""
        docs += [Document(prefix + d.name, d.text) for d in corpus.documents]
        source_of.update({prefix + d.name: src for d in corpus.documents})
        skipped += [{"name": prefix + n, "reason": r} for n, r in corpus.skipped]
        per_source[src] = {"documents": len(corpus.documents), "skipped": len(corpus.skipped),
                           "bytes": sum(len(d.text.encode("utf-8")) for d in corpus.documents)}
    groups = None
    if near_dup_split or dedup:  # MinHash once, for the split and for --dedup
        from moelab.data.neardup import near_duplicate_groups

        groups = near_duplicate_groups([d.text for d in docs])
    train, val = split_documents(docs, val_fraction, salt, groups=groups if near_dup_split else None)
    if not train or not val:
        raise UserError(f"{len(docs)} usable document(s); need at least 2 (one for training, one for validation)")
    dropped = []
    if dedup:
        train, dropped = _dedup_training(train, {d.name: g for d, g in zip(docs, groups)})
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        tok = train_bpe(tokenizer_texts(train, tokenizer_train_bytes), vocab_size)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32

    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tok.save(tmp / "tokenizer")
    splits, h = {}, hashlib.sha256(tok.tk.to_str().encode())
    mixing = None
    for name, split_docs in (("train", train), ("val", val)):
        ids = tok.encode_batch([d.text for d in split_docs])
        if name == "train" and weights is not None:
            split_docs, ids, mixing = _mix(split_docs, ids, [source_of[d.name] for d in split_docs],
                                           dict(zip(sources, weights)), salt)
        lengths = np.array([len(i) + 1 for i in ids], dtype=np.int64)
        stream = np.empty(int(lengths.sum()), dtype=dtype)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        for s, i in zip(starts, ids):
            stream[s:s + len(i)] = i
        stream[starts + lengths - 1] = tok.eos_id
        stream.astype(stream.dtype.newbyteorder("<"), copy=False).tofile(tmp / f"{name}.bin")
        np.save(tmp / f"{name}_docs.npy", starts)
        h.update(name.encode())
        h.update(stream.tobytes())
        splits[name] = {"documents": len(split_docs), "bytes": sum(len(d.text.encode("utf-8")) for d in split_docs),
                        "tokens": int(stream.shape[0]), "document_names": [d.name for d in split_docs]}
    manifest = {
        "format": 1, "sources": per_source, "text_field": text_field, "val_fraction": val_fraction,
        "salt": salt, "near_dup_split": near_dup_split, "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "fingerprint": h.hexdigest()[:16],
        "splits": splits, "skipped": skipped, "near_duplicates_dropped": dropped, "mixing": mixing,
        "request": request,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)  # only reached with --overwrite, after the new data is complete
    os.replace(tmp, out_dir)
    return out_dir


def is_prepared(path: str | Path) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def load_prepared(path: str | Path, seq_len: int):
    """(tokenizer, train TokenWindows, val TokenWindows, manifest) of a prepared directory."""
    root = Path(path).expanduser()
    if not is_prepared(root):
        raise UserError(f"{path} is not a prepared data directory (no {MANIFEST}); "
                        "create one with: moelab data prepare SOURCE --out DIR")
    manifest = json.loads((root / MANIFEST).read_text())
    tok = load_tokenizer(root / "tokenizer")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    windows = {}
    for name in ("train", "val"):
        file = root / f"{name}.bin"
        if file.stat().st_size == 0:
            raise UserError(f"{file} is empty")
        windows[name] = TokenWindows(np.memmap(file, dtype=dtype, mode="r"), seq_len)
    return tok, windows["train"], windows["val"], manifest
