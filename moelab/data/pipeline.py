"""From a data config to ready windows. A raw source goes through `moelab data prepare` once, into
the run's `data/prepared/`; prepared data (`data.path`) is used as is. Either way the windows are
views into the memory-mapped token streams.

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
from moelab.data.prepare import TokenWindows
from moelab.data.tokenizer import TextTokenizer
from moelab.errors import UserError


@dataclass
class Dataset:
    tokenizer: TextTokenizer
    train_windows: TokenWindows  # (N, seq_len + 1); indexing gives int64 tensors
    val_windows: TokenWindows
    token_bytes: torch.Tensor  # (V,) UTF-8 bytes per token id, for bits per byte
    fingerprint: str
    report: dict


def pdf_filters(cfg: DataConfig):
    from moelab.data.pdf import PdfFilters

    return PdfFilters(cfg.pdf_min_chars, cfg.pdf_max_chars, cfg.pdf_min_words, cfg.pdf_max_words,
                      cfg.pdf_ascii_only)


def _from_prepared(cfg: DataConfig, seq_len: int, run_dir: Path, write_report: bool = True) -> Dataset:
    from moelab.data.prepare import load_prepared

    tokenizer, train_w, val_w, manifest = load_prepared(cfg.path, seq_len)
    for name, w in (("validation", val_w), ("training", train_w)):
        if w.shape[0] == 0:
            raise UserError(f"the {name} split of {cfg.path} has fewer tokens than one sequence of "
                            f"{seq_len + 1}; prepare more text or lower train.seq_len")
    if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
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
    if write_report:
        write_split_report(run_dir, report)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float64)
    return Dataset(tokenizer, train_w, val_w, token_bytes, report["fingerprint"], report)


def write_split_report(run_dir: Path, report: dict) -> None:
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "data" / "split.json").write_text(json.dumps(report, indent=1))


RUN_PREPARED = Path("data") / "prepared"


def _request(cfg: DataConfig) -> dict:
    """The data settings a run's prepared copy was made with."""
    keys = ("source", "max_docs", "text_field", "val_fraction", "split_salt", "near_dup_split", "tokenizer",
            "vocab_size", "tokenizer_train_bytes", "pdf_min_chars", "pdf_max_chars", "pdf_min_words",
            "pdf_max_words", "pdf_ascii_only", "doc_chars")
    return {k: getattr(cfg, k) for k in keys}


# settings added after runs were prepared without them: a run's manifest that lacks one used its value here
LATER_KEYS = {"doc_chars": 0}


def _prepare_into_run(cfg: DataConfig, run_dir: Path, say=None) -> Path:
    """A raw source is prepared into the run directory once; a resume reuses that copy, so the run's
    data can neither drift nor be re-tokenised. Changed data settings on resume are an error."""
    from moelab.data.prepare import MANIFEST, prepare, read_manifest

    target = run_dir / RUN_PREPARED
    want = _request(cfg)
    if (target / MANIFEST).is_file():
        have = read_manifest(target).get("request") or {}
        have = {**LATER_KEYS, **have}
        changed = [f"data.{k} ({have.get(k)!r} -> {v!r})" for k, v in want.items() if have.get(k) != v]
        if changed:
            raise UserError("this run's data was prepared with other settings: " + ", ".join(changed)
                            + "; resuming would silently train on other data (start a new run instead)")
        return target
    tok = cfg.tokenizer or (str(run_dir / "tokenizer") if (run_dir / "tokenizer" / "tokenizer.json").is_file()
                            else None)
    return prepare([cfg.source], str(target), cfg.val_fraction, cfg.split_salt, cfg.text_field, tok,
                   cfg.vocab_size, cfg.near_dup_split, max_docs=cfg.max_docs, pdf_filters=pdf_filters(cfg),
                   tokenizer_train_bytes=cfg.tokenizer_train_bytes, request=want, doc_chars=cfg.doc_chars, say=say)


def build_dataset(cfg: DataConfig, seq_len: int, run_dir: Path, write_report: bool = True, say=None) -> Dataset:
    """Prepared data (`data.path`) as is; a raw source is first prepared into the run directory
    (`say`: its progress lines). `write_report`: write RUN/data/split.json now (else the caller
    writes `Dataset.report` once the run is set up, so a resume that fails leaves the run's files
    as they were)."""
    if cfg.path:
        return _from_prepared(cfg, seq_len, run_dir, write_report)
    prepared = _prepare_into_run(cfg, run_dir, say)
    return _from_prepared(DataConfig(**{**cfg.__dict__, "path": str(prepared)}), seq_len, run_dir, write_report)
