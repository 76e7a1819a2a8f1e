"""Library functions behind the model-level CLI commands: info, convert, export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from moelab.data.tokenizer import HF_SIDE_FILES
from moelab.errors import UserError, cannot_write, write_errors

TOKENIZER_FILES = ("tokenizer.json", *HF_SIDE_FILES)
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def model_config_for(target: str, overrides: list[str] | tuple[str, ...] = ()):
    """A resolved ModelConfig for a preset name or a train config file (YAML), either with `key=value`
    overrides as `moelab train` takes them, or for a run/checkpoint directory or an HF directory."""
    from moelab.config import Config, build_config
    from moelab.models.presets import PRESETS
    from moelab.train.checkpoint import is_hf_dir, list_checkpoints, resolve_checkpoint

    path = Path(target).expanduser()
    if (path / "config.yaml").is_file() and not (path / "model.safetensors").is_file() and not list_checkpoints(path):
        path = path / "config.yaml"  # a run before its first checkpoint: its config says what it trains
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml") or not path.exists() and target in PRESETS:
        cfg = build_config(None, str(path), overrides) if path.is_file() else build_config(target, None, overrides)
        return cfg.resolve(vocab_size=cfg.model.vocab_size or cfg.data.vocab_size).model  # or the one prepare trains
    if not path.exists():
        from moelab.hub import download_hint

        raise UserError(f"'{target}' is neither a preset ({', '.join(PRESETS)}), a config file (.yaml) nor an "
                        f"existing run, checkpoint or Hugging Face directory{download_hint(target)}")
    if overrides:
        raise UserError(f"{target} is a trained model; key=value overrides apply to a preset or a config file")
    if is_hf_dir(target):
        from moelab.models.hf import read_hf_model_config

        return read_hf_model_config(target)
    ckpt = resolve_checkpoint(target, hf_too=True)
    return Config.from_yaml_file(ckpt / "config.yaml").resolve().model


def info(target: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    from moelab.models.accounting import build_meta_model, format_table, parameter_table

    m = model_config_for(target, overrides)
    attn = (f"MLA {m.n_heads} heads (q rank {m.q_lora_rank or 'full'}, kv rank {m.kv_lora_rank})"
            if m.attention == "mla" else f"{m.n_heads} heads ({m.n_kv_heads} kv){', gated output' * m.attn_gate}")
    if m.n_experts:
        ffn = (f"{m.n_experts} experts top-{m.top_k} x width {m.expert_dim}, {m.router} router"
               + m.shared_text
               + (f", first {m.first_k_dense} dense" if m.first_k_dense else ""))
    else:
        ffn = f"dense MLP width {m.dense_dim}"
    scales = [f"{name} {value:g}" for name, value, off in (
        ("embed_scale", m.embed_scale, 1.0), ("residual_scale", m.residual_scale, 1.0),
        ("attn_scale", m.attn_scale, 0.0), ("logits_divisor", m.logits_divisor, 1.0)) if value != off]
    head = (f"{target}: d_model {m.d_model}, {m.n_layers} layers, {attn}, {ffn}, "
            f"vocab {m.vocab_size}, tied embeddings {m.tie_embeddings}"
            + (f", multipliers: {', '.join(scales)}" if scales else ""))
    meta = build_meta_model(m)
    return head + "\n" + format_table(parameter_table(meta)) + "\n\n" + _memory_table(meta)


def _memory_table(meta) -> str:
    from moelab.train.memory import memory_rows

    rows = memory_rows(meta)
    width = max(len(what) for what, _, _ in rows)
    return "memory\n" + "\n".join(f"{what:<{width}} {_size(n):>12}   {note}" for what, n, note in rows)


def _size(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def _generation_ids(src: Path) -> dict:
    """The token ids to write as a generation_config.json for an HF directory that has none (those
    of its config.json, which moelab's model config has no place for); {} where it has its own.
    The files convert copies (tokenizer.json, tokenizer_config.json, generation_config.json) are read
    here, so a damaged one is refused before the conversion: it was copied, and the run failed later."""
    if (src / "tokenizer.json").is_file():
        from moelab.data.tokenizer import read_tokenizer_file

        read_tokenizer_file(src / "tokenizer.json")
    if (src / "tokenizer_config.json").is_file():
        _token_ids(src / "tokenizer_config.json")
    if (src / "generation_config.json").is_file():
        _token_ids(src / "generation_config.json")
        return {}
    return _token_ids(src / "config.json")


def _copy_tokenizer(src: Path, dst: Path, ids: dict) -> None:
    """The HF directory's TOKENIZER_FILES, and a generation_config.json of `ids` (_generation_ids)."""
    files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    if files or ids:
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dst / f.name)
        if ids:
            (dst / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")


def _token_ids(file: Path) -> dict:
    """The bos/eos/pad token ids a config.json or generation_config.json gives (those not null)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {file}: {exc}; fix or remove it") from None
    if not isinstance(data, dict):
        raise UserError(f"cannot read {file}: it holds a JSON {type(data).__name__}, not an object; fix or remove it")
    return {k: data[k] for k in TOKEN_IDS if data.get(k) is not None}


def convert(hf_dir: str, out: str, dtype: str = "fp32") -> Path:
    """HF directory -> moelab run directory (config.yaml, tokenizer/, checkpoints/step_0000000), its
    weights stored in `dtype`: fp32 (exact from any source), bf16 or fp16 (the routers' in fp32:
    `held_as`), or auto: the directory's own (a bf16 model converts in half the memory and disk, and
    unrounded)."""
    from moelab.config import Config
    from moelab.files import staged_folder
    from moelab.models.hf import DTYPES, load_hf, stored_dtype
    from moelab.train.checkpoint import save_weights_only
    from moelab.train.memory import WeightsWontFit
    from moelab.train.rundir import new_run_dir

    if not Path(hf_dir, "config.json").is_file():
        from moelab.hub import download_hint

        raise UserError(f"{hf_dir} is not a Hugging Face model directory (no config.json){download_hint(hf_dir)}")
    ids = _generation_ids(Path(hf_dir))
    run_dir = new_run_dir(out, "converted", resumable=False)
    if dtype == "auto":
        dtype = stored_dtype(Path(hf_dir))
    try:
        model = load_hf(hf_dir, dtype=DTYPES[dtype])
    except WeightsWontFit as exc:
        if not exc.fits_in_half:
            raise
        raise UserError(f"{exc}, or convert it in bf16, where it fits (--dtype bf16)") from None
    cfg = Config(preset="converted", model=model.cfg)
    # within its context: a longer train.seq_len would widen max_seq_len (max_position_embeddings) on load
    cfg.train.seq_len = min(cfg.train.seq_len, model.cfg.max_seq_len)
    try:
        with staged_folder(run_dir) as tmp:  # a full disk leaves no run directory without weights
            (tmp / "config.yaml").write_text(cfg.to_yaml())
            save_weights_only(tmp, model, cfg.to_yaml(), {"converted_from": str(hf_dir), "weights_dtype": dtype})
            _copy_tokenizer(Path(hf_dir), tmp / "tokenizer", ids)
    except write_errors() as exc:
        raise cannot_write(f"the converted model to {run_dir}", exc, "nothing was left there", "convert again",
                           "choose another --out") from exc
    return run_dir


def export(run: str, to: str, out: str, arch: str = "auto", dtype: str = "auto") -> tuple[Path, str]:
    """Export to a Hugging Face directory in `dtype`; auto: the dtype the weights are stored in, so
    exactly them (fp32 for a trained run; a run converted in bf16, and an HF directory in bf16:
    bf16 in, bf16 out). Returns (directory, dtype)."""
    from moelab.models.hf import check_export_target, export_hf
    from moelab.train.checkpoint import is_hf_dir, load_model, resolve_checkpoint, stored_weights_dtype

    if to != "hf":
        from moelab.models.hf import ARCHS

        hint = f"; for that architecture: --to hf --arch {to}" if to in ARCHS else ""
        raise UserError(f"unknown export format '{to}' (supported: hf){hint}")
    check_export_target(out, "fp32" if dtype == "auto" else dtype)  # before the weights are read
    hf_in = is_hf_dir(run)
    if dtype == "auto":
        dtype = stored_weights_dtype(run)
    # an HF directory too (written again in moelab's layout: 5 GB shards, its tokenizer); held in bf16
    # for a bf16 export (the same rounding, half the memory), else fp32 (fp16's range is checked on the
    # fp32 values)
    model = load_model(run, dtype="bf16" if dtype == "bf16" else None)
    tok = Path(run).expanduser() if hf_in else resolve_checkpoint(run).parent.parent / "tokenizer"
    files = tuple(tok / f for f in TOKENIZER_FILES if (tok / f).is_file())
    if (tok / "generation_config.json").is_file():  # an HF model's own (copied as it is)
        ids = _token_ids(tok / "generation_config.json")
    elif hf_in:
        ids = _token_ids(tok / "config.json")
    else:  # a run trained here: its documents end with the tokenizer's end-of-text token
        from moelab.data.tokenizer import load_tokenizer

        eos = load_tokenizer(tok).eos_id if (tok / "tokenizer.json").is_file() else None
        ids = {} if eos is None else {"eos_token_id": eos}
    return export_hf(model, out, arch, extra_files=files, dtype=dtype, token_ids=ids), dtype


def data_check(run_dir: str | None, train: str | None, val: str | None, ngram: int, seq_len: int | None,
               threshold: float, tokenizer: str | None, text_field: str = "text", choice: list[str] | None = None,
               choice_ngram: int = 13, harness: str | None = None, include_path: str | None = None,
               limit: int = 0):
    """Leakage audit of a run's own split (re-derived from its config) or of any two text sources,
    and with `choice` (multiple-choice task files or hub names) or `harness` (lm_eval tasks, with
    their `include_path`) of those tasks' items against the training data (contamination, by
    `choice_ngram`-token sequences; `limit`: each task's first items only, as eval's). Returns the
    AuditResult."""
    from moelab.eval.choice import load_task

    tasks = [load_task(t, limit) for t in choice or []]  # a bad task file is said before the audit's work
    doc_ids = [None] * len(tasks)
    if harness:
        from moelab.eval.harness import task_texts

        for name, texts in task_texts(harness, include_path, limit or None).items():
            tasks.append((name, [text for _, text in texts]))
            doc_ids.append([i for i, _ in texts])
    result, tok, train_streams = _audit(run_dir, train, val, ngram, seq_len, threshold, tokenizer, text_field)
    if tasks:
        from moelab.data.audit import choice_contamination, prepared_sources

        sources = [(tok, train_streams())] + prepared_sources(_init_from_data(run_dir))
        result.choice = choice_contamination(tasks, sources, choice_ngram)
        for r, ids in zip(result.choice, doc_ids):
            if ids is not None:  # an lm_eval task's items are named by its doc_id
                r["doc_ids"] = [ids[i - 1] for i in r["contaminated"]]
    return result


def _init_from_data(run_dir: str | None) -> list[Path]:
    """The prepared data a run's weights saw before it: that of its train.init_from run and the runs
    that one started from (none for raw text, a prepared directory, or a run started from scratch)."""
    from moelab.config import Config
    from moelab.data.overlap import run_data_path, trained_data

    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return []
    cfg = Config.from_yaml_file(Path(run_dir) / "config.yaml")
    own = run_data_path(Path(run_dir), cfg).resolve()
    return [d for d in trained_data(Path(run_dir), cfg) if d.resolve() != own]


def _audit(run_dir, train, val, ngram, seq_len, threshold, tokenizer, text_field):
    """(AuditResult, the tokenizer, a callable giving the training split's token streams)."""
    import numpy as np

    from moelab.config import Config
    from moelab.data.audit import audit, check_lengths
    from moelab.data.sources import load_corpus
    from moelab.data.split import split_documents
    from moelab.data.tokenizer import load_tokenizer, train_bpe

    if (train is None) != (val is None):
        raise UserError("give both --train and --val (files or folders), or a run directory")
    if run_dir is None and train is None:
        raise UserError("nothing to check: give a run directory, or --train A --val B")
    if run_dir is not None and train is not None:
        raise UserError("give a run (or prepared) directory, or --train A --val B, not both")
    if run_dir is not None:
        from moelab.data.audit import audit_prepared
        from moelab.data.prepare import is_prepared, split_streams

        def prepared(path, length):
            if tokenizer:  # it was ignored: the tokens are already there
                raise UserError(f"--tokenizer does not apply to {path}: prepared data holds tokens already; "
                                "drop it, or audit raw text with --train A --val B --tokenizer T")
            check_lengths(ngram, length)
            return (audit_prepared(path, ngram, length, threshold), load_tokenizer(Path(path) / "tokenizer"),
                    lambda: (s for s, _ in split_streams(path, "train")))

        cfg_file = Path(run_dir) / "config.yaml"
        if is_prepared(run_dir):
            return prepared(run_dir, seq_len or 128)
        if not cfg_file.is_file():
            raise UserError(f"{run_dir} is neither a run directory (no config.yaml) nor a prepared "
                            "data directory (no manifest.json)")
        cfg = Config.from_yaml_file(cfg_file)
        from moelab.data.overlap import run_data_path

        data = run_data_path(Path(run_dir), cfg)  # data.path, or the copy a raw-source run trained on
        if cfg.data.path or is_prepared(data):
            return prepared(data, seq_len or cfg.train.seq_len)
        from moelab.data.pipeline import pdf_filters

        seq_len = seq_len or cfg.train.seq_len
        check_lengths(ngram, seq_len)  # before reading and tokenizing the corpus
        corpus = load_corpus(cfg.data.source, cfg.data.max_docs, cfg.data.text_field, pdf_filters(cfg.data))
        train_docs, val_docs = split_documents(corpus.documents, cfg.data.val_fraction, cfg.data.split_salt,
                                               cfg.data.near_dup_split)
        tok = load_tokenizer(tokenizer or Path(run_dir) / "tokenizer")
    else:
        seq_len = seq_len or 128
        check_lengths(ngram, seq_len)
        train_docs, val_docs = (load_corpus(s, text_field=text_field).documents for s in (train, val))
        tok = load_tokenizer(tokenizer) if tokenizer else train_bpe((d.text for d in train_docs), 8192)

    train_ids = tok.encode_batch([d.text for d in train_docs])  # once, for the audit and for --choice

    def streams():  # the training documents' tokens, each followed by end-of-text (as a run packs them)
        return [np.concatenate([np.append(np.asarray(ids, dtype=np.int64), tok.eos_id) for ids in train_ids]
                               or [np.zeros(0, np.int64)])]

    return audit(train_docs, val_docs, tok, ngram, seq_len, threshold, train_ids), tok, streams


def _json_safe(obj):
    """inf/nan (max/min with a dead expert, say) as strings, so the file is strict JSON."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _run_routing_dir(target: Path, run_dir: Path, other_data: str | None) -> Path:
    """RUN/routing holds the analysis of the run's newest checkpoint on its own data, the one
    RUN/report.md shows; an earlier checkpoint (or `best`) or other text goes beside it, in
    RUN/routing-<checkpoint>-<data>, instead of replacing the report's figures."""
    from moelab.train.checkpoint import list_checkpoints, resolve_checkpoint

    parts = []
    ckpt, newest = resolve_checkpoint(target), list_checkpoints(run_dir)
    if not newest or ckpt.resolve() != newest[-1].resolve():
        parts.append(ckpt.name)
    if other_data:
        name = Path(other_data).expanduser().resolve().name  # a folder, a file, a glob, hf:NAME
        parts.append(re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "data")
    return run_dir / "-".join(["routing", *parts])


def routing(target: str, out: str | None, windows: int = 64, batch_size: int = 8, device: str = "cpu",
            plots: bool = True, data: str | None = None, source: str | None = None,
            text_field: str | None = None, dtype=None) -> tuple[dict, Path]:
    """Routing analysis of a run or HF model (measured, its weights in `dtype`; on `data` or `source`
    if given) or a counts file; writes routing.json and heatmaps into `out` (default: RUN/routing, or
    routing-<name> beside it)."""
    import json

    from moelab.analysis.collect import load_routing
    from moelab.analysis.plots import plot_all
    from moelab.analysis.routing import analyze
    from moelab.files import write_atomic

    counts = load_routing(target, windows, batch_size, device, data, source, text_field, dtype)
    p = Path(target).expanduser()
    if out:
        out_dir = Path(out)
    elif counts.run_dir:
        out_dir = _run_routing_dir(p, counts.run_dir, data or source)
    else:
        out_dir = p.parent / f"routing-{p.stem}"
    analysis = analyze(counts)
    if plots:
        analysis["plots"] = plot_all(counts, analysis, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "routing.json", json.dumps(_json_safe(analysis), indent=1))
    return analysis, out_dir
