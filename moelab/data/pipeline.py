"""From a source name to ready windows: corpus -> document split -> tokenizer -> packed windows.

Writes into the run directory: `tokenizer/` and `data/split.json` (which document went where,
bytes and tokens per split, skipped inputs with reasons, and a fingerprint checked on resume).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.config import DataConfig
from moelab.data.loader import make_windows, pack
from moelab.data.sources import load_corpus
from moelab.data.split import hash_unit, split_documents
from moelab.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe
from moelab.errors import UserError


@dataclass
class Dataset:
    tokenizer: TextTokenizer
    train_windows: torch.Tensor  # (N, seq_len + 1) int64
    val_windows: torch.Tensor
    token_bytes: torch.Tensor  # (V,) UTF-8 bytes per token id, for bits per byte
    fingerprint: str
    report: dict


def _fingerprint(train, val, tokenizer: TextTokenizer, seq_len: int) -> str:
    h = hashlib.sha256()
    for tag, docs in (("train", train), ("val", val)):
        for d in docs:
            h.update(f"{tag}\x00{d.name}\x00".encode())
            h.update(hashlib.sha256(d.text.encode("utf-8")).digest())
    h.update(tokenizer.tk.to_str().encode())
    h.update(str(seq_len).encode())
    return h.hexdigest()[:16]


def tokenizer_texts(train, budget: int):
    """Training-split texts for BPE, in hash order (an unbiased sample) up to `budget` bytes."""
    used = 0
    for d in sorted(train, key=lambda d: hash_unit(d.name, "tokenizer")):
        if budget and used >= budget:
            return
        used += len(d.text)
        yield d.text


def pdf_filters(cfg: DataConfig):
    from moelab.data.pdf import PdfFilters

    return PdfFilters(cfg.pdf_min_chars, cfg.pdf_max_chars, cfg.pdf_min_words, cfg.pdf_max_words,
                      cfg.pdf_ascii_only)


def _from_prepared(cfg: DataConfig, seq_len: int, run_dir: Path | None) -> Dataset:
    from moelab.data.prepare import load_prepared

    tokenizer, train_w, val_w, manifest = load_prepared(cfg.path, seq_len)
    for name, w in (("validation", val_w), ("training", train_w)):
        if w.shape[0] == 0:
            raise UserError(f"the {name} split of {cfg.path} has fewer tokens than one sequence of "
                            f"{seq_len + 1}; prepare more text or lower train.seq_len")
    if run_dir is not None and not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        tokenizer.save(run_dir / "tokenizer")  # so the run is self-contained (export, eval)
    report = {"source": str(cfg.source if Path(cfg.path).name == RUN_PREPARED.name else cfg.path),
              "prepared": str(cfg.path), "prepared_fingerprint": manifest["fingerprint"], "seq_len": seq_len,
              "fingerprint": hashlib.sha256(f"{manifest['fingerprint']}/{seq_len}".encode()).hexdigest()[:16],
              "vocab_size": tokenizer.vocab_size,
              "splits": {k: {kk: v[kk] for kk in ("documents", "bytes", "tokens")} | {"windows": w.shape[0]}
                         for (k, v), w in zip(manifest["splits"].items(), (train_w, val_w))},
              "skipped": manifest["skipped"],
              "val_documents": manifest["splits"]["val"]["document_names"],
              "train_documents": manifest["splits"]["train"]["document_names"]}
    if run_dir is not None:
        (run_dir / "data").mkdir(parents=True, exist_ok=True)
        (run_dir / "data" / "split.json").write_text(json.dumps(report, indent=1))
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float64)
    return Dataset(tokenizer, train_w, val_w, token_bytes, report["fingerprint"], report)


RUN_PREPARED = Path("data") / "prepared"


def _request(cfg: DataConfig) -> dict:
    """The data settings a run's prepared copy was made with."""
    keys = ("source", "max_docs", "text_field", "val_fraction", "split_salt", "near_dup_split", "tokenizer",
            "vocab_size", "tokenizer_train_bytes", "pdf_min_chars", "pdf_max_chars", "pdf_min_words",
            "pdf_max_words", "pdf_ascii_only")
    return {k: getattr(cfg, k) for k in keys}


def _prepare_into_run(cfg: DataConfig, run_dir: Path) -> Path:
    """A raw source is prepared into the run directory once; a resume reuses that copy, so the run's
    data can neither drift nor be re-tokenised. Changed data settings on resume are an error."""
    from moelab.data.prepare import MANIFEST, prepare

    target = run_dir / RUN_PREPARED
    want = _request(cfg)
    if (target / MANIFEST).is_file():
        have = json.loads((target / MANIFEST).read_text()).get("request") or {}
        changed = [f"data.{k} ({have.get(k)!r} -> {v!r})" for k, v in want.items() if have.get(k) != v]
        if changed:
            raise UserError("this run's data was prepared with other settings: " + ", ".join(changed)
                            + "; resuming would silently train on other data (start a new run instead)")
        return target
    tok = cfg.tokenizer or (str(run_dir / "tokenizer") if (run_dir / "tokenizer" / "tokenizer.json").is_file()
                            else None)
    return prepare([cfg.source], str(target), cfg.val_fraction, cfg.split_salt, cfg.text_field, tok,
                   cfg.vocab_size, cfg.near_dup_split, max_docs=cfg.max_docs, pdf_filters=pdf_filters(cfg),
                   tokenizer_train_bytes=cfg.tokenizer_train_bytes, request=want)


def build_dataset(cfg: DataConfig, seq_len: int, run_dir: Path | None) -> Dataset:
    if cfg.path:
        return _from_prepared(cfg, seq_len, run_dir)
    if run_dir is not None:
        prepared = _prepare_into_run(cfg, run_dir)
        return _from_prepared(DataConfig(**{**cfg.__dict__, "path": str(prepared)}), seq_len, run_dir)
    corpus = load_corpus(cfg.source, cfg.max_docs, cfg.text_field, pdf_filters(cfg))
    train, val = split_documents(corpus.documents, cfg.val_fraction, cfg.split_salt, cfg.near_dup_split)
    if not train or not val:
        raise UserError(f"data source '{cfg.source}' has {len(corpus.documents)} usable document(s); "
                        "need at least 2 (one for training, one for validation)")
    tok_dir = run_dir / "tokenizer" if run_dir else None
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif tok_dir is not None and (tok_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tok_dir)  # resuming: reuse the run's own tokenizer
    else:
        tokenizer = train_bpe(tokenizer_texts(train, cfg.tokenizer_train_bytes), cfg.vocab_size)
    if tok_dir is not None and not (tok_dir / "tokenizer.json").is_file():
        tokenizer.save(tok_dir)

    ids_train = tokenizer.encode_batch([d.text for d in train])
    ids_val = tokenizer.encode_batch([d.text for d in val])
    train_w = make_windows(pack(ids_train, tokenizer.eos_id), seq_len)
    val_w = make_windows(pack(ids_val, tokenizer.eos_id), seq_len)
    if val_w.shape[0] == 0:
        raise UserError(f"validation split has {sum(map(len, ids_val))} tokens, fewer than one sequence "
                        f"of {seq_len + 1}; raise data.val_fraction or lower train.seq_len")
    if train_w.shape[0] == 0:
        raise UserError(f"training split has fewer tokens than one sequence of {seq_len + 1}; "
                        "use more text or lower train.seq_len")

    report = {
        "source": corpus.source,
        "fingerprint": _fingerprint(train, val, tokenizer, seq_len),
        "seq_len": seq_len,
        "vocab_size": tokenizer.vocab_size,
        "splits": {
            name: {"documents": len(docs), "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
                   "tokens": sum(map(len, ids)), "windows": int(w.shape[0])}
            for name, docs, ids, w in (("train", train, ids_train, train_w), ("val", val, ids_val, val_w))
        },
        "skipped": [{"name": n, "reason": r} for n, r in corpus.skipped],
        "val_documents": [d.name for d in val],
        "train_documents": [d.name for d in train],
    }
    if run_dir is not None:
        (run_dir / "data").mkdir(parents=True, exist_ok=True)
        (run_dir / "data" / "split.json").write_text(json.dumps(report, indent=1))
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float64)
    return Dataset(tokenizer, train_w, val_w, token_bytes, report["fingerprint"], report)
