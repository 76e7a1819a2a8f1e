"""What the evaluation commands work on: a run directory (its newest checkpoint), a checkpoint
directory or a Hugging Face model directory, loaded with its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moelab.errors import UserError


@dataclass
class Target:
    model: object  # MoETransformer, in eval mode
    tokenizer: object  # TextTokenizer
    label: str
    run_dir: Path | None = None  # the run the checkpoint belongs to (None for an HF directory)
    checkpoint: Path | None = None
    cfg: object = None  # the run's resolved Config (None for an HF directory)


def load_target(path: str, device: str = "cpu", dtype=None) -> Target:
    """The model at `path` on `device`, in eval mode, its weights in `dtype` (`load_model`: fp32 by
    default; bf16 or fp16 in half the memory), with its tokenizer. On CPU, glibc malloc is tuned
    to keep freed memory for reuse as a training process is (`keep_freed_memory`, unless the run
    set train.keep_freed_memory=false): evaluation allocates the same large logits buffers batch
    after batch (`moelab eval` of the default run: 8.2 -> 5.9 s)."""
    from moelab.config import Config
    from moelab.data.tokenizer import load_tokenizer
    from moelab.train.checkpoint import is_hf_dir, list_checkpoints, resolve_checkpoint
    from moelab.train.loop import resolve_device

    p = Path(path).expanduser()
    dev = resolve_device(device, "--device")
    if not p.is_dir():
        from moelab.hub import download_hint

        raise UserError(f"{path}: no such run, checkpoint or Hugging Face model directory{download_hint(path)}")
    if is_hf_dir(p):
        if not (p / "tokenizer.json").is_file():
            raise UserError(f"{path} has no tokenizer.json; save the tokenizer beside the model "
                            "(tokenizer.save_pretrained(DIR))")
        _keep_freed_memory(dev, None)
        return _checked(Target(_load(p, dev, dtype), load_tokenizer(p), p.name), path)
    if (p / "config.yaml").is_file() and not (p / "model.safetensors").is_file() and not list_checkpoints(p):
        raise UserError(f"run {path} has no checkpoint yet; let training save one "
                        f"(train.save_every) or continue it with `moelab train --resume auto --out {path}`")
    ckpt = resolve_checkpoint(p, hf_too=True)
    run_dir = ckpt.parent.parent
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"{run_dir} has no tokenizer/tokenizer.json; put the model's tokenizer.json there (a "
                        "converted model has one only if its Hugging Face directory had it)")
    cfg = Config.from_yaml_file(ckpt / "config.yaml").resolve()
    _keep_freed_memory(dev, cfg)
    label = f"{run_dir.name}/{ckpt.name}"
    return _checked(Target(_load(ckpt, dev, dtype), load_tokenizer(tok_dir), label, run_dir, ckpt, cfg), path)


def _load(path: Path, device, dtype):
    """load_model, whose refusal of weights too large for the device says where --dtype bf16 fits."""
    from moelab.train.checkpoint import load_model
    from moelab.train.memory import WeightsWontFit

    try:
        return load_model(path, device, dtype).eval()
    except WeightsWontFit as exc:
        if not exc.fits_in_half:
            raise
        raise UserError(f"{exc}, or hold the weights in bf16, where they fit (--dtype bf16, or dtype='bf16' in "
                        "Python: half the memory, computed in bf16)") from None


def _keep_freed_memory(device, cfg) -> None:
    if device.type == "cpu" and (cfg is None or cfg.train.keep_freed_memory):
        from moelab.train.host import keep_freed_memory

        keep_freed_memory()


def _checked(target: Target, path: str) -> Target:
    """The target, refused where its tokenizer has more tokens than the model's vocabulary: a text
    with one of those tokens gave an index error from the embedding, a traceback (on a GPU, a
    device-side assert that ends the process). Training refuses the same pairing."""
    have, rows = target.tokenizer.vocab_size, target.model.cfg.vocab_size
    if have > rows:
        raise UserError(f"{path}: the tokenizer has {have} tokens but the model's vocabulary only {rows}, so ids "
                        f"{rows} and up have no embedding; use the tokenizer the model was trained with")
    return target
