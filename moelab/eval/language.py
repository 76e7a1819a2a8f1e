"""`moelab eval`: language-modelling metrics of a model on a prepared split or a raw source, with
the bits per byte `xz -9` achieves on the very same bytes as a reference point.

The bytes are those of the evaluated target tokens (each window's tokens after its first), so the
model's bits per byte and xz's share a denominator. xz compresses them as one stream: it may use
matches across the whole split, while the model sees only its context window.
"""

from __future__ import annotations

import lzma
import sys
from pathlib import Path

import torch

from moelab.errors import UserError
from moelab.eval.metrics import evaluate, spread_windows
from moelab.hardware import fast_fp32_matmuls, fp32_mode_for


def xz_bits_per_byte(windows, token_table: list[bytes], batch: int = 4096) -> dict:
    """Bits per byte of `xz -9` (LZMA2, preset 9, the .xz container included) on the target bytes
    of `windows`."""
    data = b"".join(b"".join(map(token_table.__getitem__, windows[i:i + batch][:, 1:].flatten().tolist()))
                    for i in range(0, len(windows), batch))
    if not data:
        return {"xz_bpb": float("nan"), "bytes": 0}
    return {"xz_bpb": 8 * len(lzma.compress(data, preset=9)) / len(data), "bytes": len(data)}


def no_hf_data(what: str = "a Hugging Face directory"):
    raise UserError(f"{what} has no data of its own: give --data PREPARED_DIR or --source FILE|DIR")


def check_own_data(path: str | Path) -> None:
    """The one-line error for a model with no data of its own (a Hugging Face directory, a converted
    run), said before its weights are loaded; nothing for one that has data."""
    from moelab.config import load_yaml
    from moelab.data.pipeline import RUN_PREPARED
    from moelab.train.checkpoint import is_hf_dir

    p = Path(path).expanduser()
    if is_hf_dir(p):
        no_hf_data()
    if (p / "config.yaml").is_file() and not (p / RUN_PREPARED).exists():
        cfg = load_yaml(p / "config.yaml")
        if cfg.get("preset") == "converted" and not (cfg.get("data") or {}).get("path"):
            no_hf_data(f"{path} is a converted model and")


def training_copies(target, texts: list[str], ids: list[list[int]]) -> int | None:
    """How many of the documents `texts` (tokenized with the target's tokenizer: `ids`) the run
    trained on: exact copies of a document of its training split, or of a piece of one where the
    data was cut into documents (data.doc_chars). None where that cannot be known: no run, its
    prepared data gone or damaged, another tokenizer (see moelab.data.overlap)."""
    from moelab.data.overlap import copies, doc_key, run_data_dir, training_split
    from moelab.data.sources import cut_text

    data = run_data_dir(target.run_dir, target.cfg) if target.run_dir and target.cfg else None
    train = training_split(data, target.tokenizer) if data else None
    if train is None:
        return None
    spans, manifest = train
    tok = target.tokenizer
    doc_chars = manifest.get("doc_chars") or (manifest.get("request") or {}).get("doc_chars") or 0
    wanted: dict[tuple[int, bytes], list[int]] = {}  # each document's (or piece's) key -> its texts
    for i, (text, doc_ids) in enumerate(zip(texts, ids)):
        pieces = cut_text(text, doc_chars)
        for piece_ids in ([doc_ids] if len(pieces) == 1 else tok.encode_batch(pieces)):
            wanted.setdefault(doc_key(tok.doc_prefix + list(piece_ids) + [tok.eos_id]), []).append(i)  # as stored
    return len(copies(spans, wanted))


def _prepared_copies(target, data: Path, split: str) -> tuple[int, int] | None:
    """(documents of the prepared `data`'s `split` that the run trained on, documents of the split);
    None where that cannot be known, or `data` is the run's own (its validation split is held out by
    construction, its training split is what --split train asks for)."""
    from moelab.data import overlap

    own = overlap.run_data_dir(target.run_dir, target.cfg) if target.run_dir and target.cfg else None
    if own is None or own.resolve() == Path(data).expanduser().resolve():
        return None
    return overlap.split_copies(own, Path(data).expanduser(), split, target.tokenizer)


def eval_windows_for(target, split: str, data: str | None, source: str | None, seq_len: int,
                     text_field: str | None = None, info: dict | None = None):
    """(windows, description) from --data, --source or the run's own prepared data. `text_field`:
    of --source's JSONL/Parquet records (default: the run's data.text_field, else "text"). With
    `info` (a dict), a --source's documents that the run trained on are counted there
    (`documents_in_training`, see training_copies)."""
    from moelab.data.prepare import is_prepared, load_prepared

    if split not in ("train", "val"):
        raise UserError(f"--split must be train or val, not '{split}'")
    if data and source is not None:
        raise UserError("give --data (prepared) or --source (raw text), not both")
    if text_field is not None and source is None:
        raise UserError("--text-field names the text of --source's records; give --source too")
    if source is not None:
        from moelab.data.loader import make_windows, pack
        from moelab.data.sources import load_corpus

        own = target.cfg.data.text_field if target.cfg else "text"
        corpus = load_corpus(source, text_field=text_field or own)
        ids = target.tokenizer.encode_batch([d.text for d in corpus.documents])
        windows = make_windows(pack(ids, target.tokenizer.eos_id, target.tokenizer.doc_prefix), seq_len)
        where = f"{source} ({len(corpus.documents)} documents, all of them"
        copies = training_copies(target, [d.text for d in corpus.documents], ids) if info is not None else None
        if copies:
            where += f"; {copies} of them in the run's training split"
            info.update(documents_in_training=copies, documents=len(corpus.documents))
        if corpus.skipped:  # said, not silently measured on part of the source
            name, reason = corpus.skipped[0]
            where += f"; {len(corpus.skipped)} skipped, such as {name}: {reason}"
        where += ")"
    else:
        if data is None:
            if target.run_dir is None:
                no_hf_data()
            from moelab.data.overlap import run_data_path

            data = str(run_data_path(target.run_dir, target.cfg))  # (a relative data.path from where it ran)
            if not is_prepared(data):
                if getattr(target.cfg, "preset", "") == "converted":
                    no_hf_data(f"{target.label} is a converted model and")
                raise UserError(f"the run's prepared data is missing ({data}); give --data or --source")
        tok, train_w, val_w, _ = load_prepared(data, seq_len)
        if tok.tk.to_str() != target.tokenizer.tk.to_str():
            raise UserError(f"{data} was tokenized with another tokenizer than {target.label}; "
                            "give its raw text with --source instead (tokenized with the model's own)")
        windows = train_w if split == "train" else val_w
        where = f"{data} [{split}]"
        copies = _prepared_copies(target, Path(data), split) if info is not None else None
        if copies and copies[0]:
            where += f" ({copies[0]} of its {copies[1]} documents in the run's training split)"
            info.update(documents_in_training=copies[0], documents=copies[1])
    if len(windows) == 0:
        raise UserError(f"{where} has fewer tokens than one window of {seq_len + 1}; lower --seq-len")
    return windows, where


def eval_language(target, split: str = "val", data: str | None = None, source: str | None = None,
                  seq_len: int | None = None, max_windows: int = 0, batch_size: int = 8,
                  precision: str | None = None, reference: bool = True, text_field: str | None = None) -> dict:
    from moelab.train.host import precision_note
    from moelab.train.loop import AUTOCAST_DTYPES

    run_cfg = target.cfg
    seq_len = seq_len or (run_cfg.train.seq_len if run_cfg else min(target.model.cfg.max_seq_len, 1024))
    if seq_len > target.model.cfg.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context {target.model.cfg.max_seq_len}")
    held = {v: k for k, v in AUTOCAST_DTYPES.items()}.get(target.model.embed.weight.dtype)  # bf16 weights
    if held:  # (load_model's dtype, --dtype) compute in their dtype
        if precision not in (None, held):
            raise UserError(f"the weights are held in {held}, so they compute in {held}, not --precision "
                            f"{precision}: drop --precision, or hold them in fp32 (--dtype fp32)")
        precision = held
    precision = precision or (run_cfg.train.precision if run_cfg else "fp32")
    if precision not in AUTOCAST_DTYPES:
        raise UserError(f"--precision must be one of {', '.join(AUTOCAST_DTYPES)}")
    info = {}
    windows, where = eval_windows_for(target, split, data, source, seq_len, text_field, info)
    if source is None and data is None and split == "val" and target.run_dir is not None:
        from moelab.data.overlap import recorded_init_overlap

        if n := recorded_init_overlap(target.run_dir):  # its own validation split, seen by its source model
            info.update(documents_in_training=n)
            print(f"note: {n} validation documents of {target.label} are training documents of the model it "
                  "started from (train.init_from), so this is not a held-out measure (it reads low)", file=sys.stderr)
    elif info:  # the loss on what the model trained on reads as a held-out figure unless said
        print(f"note: {info['documents_in_training']} of the {info['documents']} documents evaluated are in "
              f"{target.label}'s training split, so this is not a held-out measure (it reads low); "
              "without --source or --data, eval measures the run's validation split", file=sys.stderr)
    windows = spread_windows(windows, max_windows)
    table = target.tokenizer.token_bytes()
    token_bytes = torch.tensor([len(b) for b in table], dtype=torch.float64)
    device = next(target.model.parameters()).device
    note = precision_note(device, precision, AUTOCAST_DTYPES[precision], "--dtype fp32" if held else "--precision fp32")
    if note:
        print(note, file=sys.stderr)
    # fp32 products through oneDNN where exact and faster here, as in training (moelab eval of the
    # default run: 1.3x), unless the run turned that off
    fast = precision == "fp32" and (run_cfg is None or run_cfg.train.fast_fp32_matmul)
    width = min(batch_size, len(windows)) * seq_len
    with fast_fp32_matmuls(fp32_mode_for(device, width, target.model.cfg.d_model) if fast else "default") as (path, _):
        result = evaluate(target.model, windows, token_bytes, batch_size, device, AUTOCAST_DTYPES[precision])
    if path == "onednn":
        result.update(fp32_matmul=path)
    result.update(windows=len(windows), seq_len=seq_len, data=where, model=target.label, precision=precision,
                  weights=held or "fp32", **info)
    if reference:
        result.update(xz_bits_per_byte(windows, table))
    return result


def format_language(r: dict) -> str:
    line = (f"{r['model']} on {r['data']}: loss {r['loss']:.4f} | ppl {r['ppl']:.2f} | acc {r['acc']:.3f} | "
            f"bits/byte {r['bpb']:.3f}")
    if "xz_bpb" in r:
        line += f" (xz -9: {r['xz_bpb']:.3f})"
    line += f" | {r['tokens']:,} tokens in {r['windows']:,} windows of {r['seq_len']}"
    if r.get("weights", "fp32") != "fp32":
        return line + f" | {r['weights']} weights"
    return line + (f" | {r['precision']} autocast" if r.get("precision", "fp32") != "fp32" else "")
