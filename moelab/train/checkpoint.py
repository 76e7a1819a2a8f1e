"""Atomic checkpoints and model loading.

Layout: RUN/checkpoints/step_0000200/{model.safetensors, trainer_state.pt, config.yaml, meta.json},
and RUN/checkpoints/best/ (same files) for the lowest validation loss so far.
A checkpoint is written to a hidden temporary directory and renamed into place only when
complete, so a reader never sees half a checkpoint. Weights are safetensors; the trainer state
(optimizer, loader position, RNG) holds only tensors and plain containers and is read with
torch.load(weights_only=True), which refuses pickled code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from moelab.errors import UserError, cannot_write, write_errors
from moelab.files import write_atomic

CKPT_PREFIX = "step_"


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    state = {"python": list(py_keys), "python_gauss": py_gauss,
             "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32),
                         state["numpy"]["pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model, trainer_state: dict, config_yaml: str,
                    meta: dict, name: str | None = None, after_file=None) -> Path:
    """Write RUN/checkpoints/<name> (default step_NNNNNNN) atomically: every file goes to a hidden
    temporary directory, is flushed to disk, and the directory is renamed into place last. A kill
    at any moment leaves either the previous checkpoint set or the new one, never a partial one.
    `after_file(filename)` is called after each file (fault-injection tests)."""
    from safetensors.torch import save_model

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / (name or f"{CKPT_PREFIX}{step:07d}")
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writers = [
        ("model.safetensors", lambda p: save_model(model, str(p))),
        ("trainer_state.pt", lambda p: torch.save(trainer_state, p)),
        ("config.yaml", lambda p: p.write_text(config_yaml)),
        ("meta.json", lambda p: p.write_text(json.dumps(dict(meta, step=step, time=time.time()), indent=1))),
    ]
    try:
        for filename, write in writers:
            write(tmp / filename)
            _fsync(tmp / filename)
            if after_file is not None:
                after_file(filename)
        _fsync(tmp)
    except write_errors() as exc:  # a full disk, a quota
        shutil.rmtree(tmp, ignore_errors=True)
        raise cannot_write(f"checkpoint {final.name} in {root}", exc, "earlier checkpoints are untouched",
                           "continue with --resume auto", f"make {root} writable") from exc
    if final.exists():  # re-saving the same name (best, or a step after a resume): swap, then drop
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(root)
    return final


def checkpoint_step(ckpt: Path) -> int | None:
    """The update a checkpoint holds (its meta.json), or None where there is no readable one."""
    try:
        return int(json.loads((ckpt / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def add_to_meta(ckpt: Path, extra: dict) -> None:
    """Merge `extra` into a checkpoint's meta.json, atomically (a new file renamed over the old).
    A meta.json that cannot be read (damaged outside moelab) is left as it is: `extra` is a note."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError):
        return
    write_atomic(ckpt / "meta.json", json.dumps({**meta, **extra}, indent=1))


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints (0 keeps all); `best` is never
    touched. Leftover temporary directories of killed writers are removed too."""
    root = run_dir / "checkpoints"
    removed = []
    if keep_last > 0:
        for p in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(p)
            removed.append(p)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    return removed


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary directories are never listed."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
             and p.name[len(CKPT_PREFIX):].isdigit()
             and (p / "meta.json").is_file() and (p / "model.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def load_trainer_state(ckpt: Path) -> dict:
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols before refusing a foreign file
            warnings.simplefilter("ignore")
            return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses arbitrary pickles with UnpicklingError
        # torch's first line suggests weights_only=False (running the file's code): never ours to give
        text = str(exc)
        detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
        detail = next((ln.strip() for ln in detail.splitlines() if ln.strip()), type(exc).__name__)
        raise damaged(ckpt, "trainer_state.pt", f"not a trainer state moelab wrote: {detail}; moelab loads "
                      "tensors and plain values only, never other pickled objects", verb="refusing to load")


def damaged(ckpt: Path, file: str, why: str, verb: str = "cannot load") -> UserError:
    """The error for a checkpoint file that cannot be read (cut short by a copy, a disk error, or
    not moelab's), pointing to the run's checkpoint before it when there is one."""
    step = checkpoint_step(ckpt) or 0
    older = [c for c in list_checkpoints(ckpt.parent.parent) if (checkpoint_step(c) or 0) < step]
    hint = f"; the checkpoint before it: {older[-1]}" if older else ""
    return UserError(f"{verb} {ckpt / file}: {why}{hint}")


def read_model_file(ckpt: Path, load):
    """`load(path)` of a checkpoint's model.safetensors, a damaged file reported as one line."""
    from safetensors import SafetensorError

    try:
        return load(str(ckpt / "model.safetensors"))
    except SafetensorError as exc:  # a cut or corrupt file: its header does not match its size
        raise damaged(ckpt, "model.safetensors", f"the file is damaged ({exc})") from None


def resolve_checkpoint(path: str | Path, hf_too: bool = False) -> Path:
    """A checkpoint directory, or a run directory or its checkpoints/ folder (the newest checkpoint).
    `hf_too`: the caller also takes a Hugging Face directory (and has handled one), so the refusal
    names it."""
    p = Path(path).expanduser()
    if (p / "model.safetensors").is_file() and (p / "config.yaml").is_file():
        return p
    ckpts = list_checkpoints(p) or (list_checkpoints(p.parent) if p.name == "checkpoints" else [])
    if not ckpts:
        what = "a run, a checkpoint or a Hugging Face model directory" if hf_too else "a run or a checkpoint directory"
        raise UserError(f"no checkpoint found at {path} (give {what})")
    return ckpts[-1]


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return (p / "config.json").is_file() and not (p / "config.yaml").is_file()


def init_source(path: str | Path):
    """What `train.init_from` names (a run: its newest checkpoint; a checkpoint; a Hugging Face
    directory): (its ModelConfig, the directory of its tokenizer.json or None). Reads configs only."""
    from moelab.config import Config

    p = Path(path).expanduser()
    if is_hf_dir(p):
        from moelab.models.hf import read_hf_model_config

        try:
            return read_hf_model_config(p), (p if (p / "tokenizer.json").is_file() else None)
        except UserError as exc:
            raise UserError(f"train.init_from={path}: {exc}") from None
    if not p.is_dir():
        from moelab.hub import download_hint

        raise UserError(f"train.init_from={path} is not a directory: give a run, a checkpoint or a Hugging Face "
                        f"model directory{download_hint(str(path))}")
    ckpt = resolve_checkpoint(p, hf_too=True)
    tok = ckpt.parent.parent / "tokenizer"
    return Config.from_yaml_file(ckpt / "config.yaml").model, (tok if (tok / "tokenizer.json").is_file() else None)


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict (moelab names, fp32) of a run's newest checkpoint, a checkpoint, or a Hugging
    Face directory; a checkpoint's tensors are read straight onto `device`, one at a time (a GPU
    model is never whole in host memory), and widened to fp32 where stored narrower (a run
    converted with `convert --dtype bf16`)."""
    if is_hf_dir(path):
        from moelab.models.hf import load_hf

        return load_hf(path, device).state_dict()
    return read_model_file(resolve_checkpoint(path, hf_too=True), lambda f: _read_as(f, device, torch.float32))


def stored_weights_dtype(path: str | Path) -> str:
    """"fp32", "bf16" or "fp16": the dtype the weights of a Hugging Face directory (its config.json's),
    a run (its newest checkpoint) or a checkpoint are stored in (the routers' may be wider); for a
    checkpoint as its meta.json records it: fp32 for every trained run, a converted one's
    `convert --dtype`. Read without opening the weights (a model too large is refused before that)."""
    if is_hf_dir(path):
        from moelab.models.hf import stored_dtype

        return stored_dtype(Path(path).expanduser())
    meta = resolve_checkpoint(path, hf_too=True) / "meta.json"
    try:
        return json.loads(meta.read_text()).get("weights_dtype", "fp32")
    except (OSError, ValueError, AttributeError):
        return "fp32"


def save_weights_only(run_dir: Path, model, config_yaml: str, meta: dict) -> Path:
    """A checkpoint with weights and config but no trainer state (converted models)."""
    from safetensors.torch import save_model

    final = run_dir / "checkpoints" / f"{CKPT_PREFIX}{0:07d}"
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "meta.json").write_text(json.dumps(dict(meta, step=0, time=time.time()), indent=1))
    os.replace(tmp, final)
    return final


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None):
    """Load a model, in eval mode, from a run directory (its newest checkpoint), a checkpoint
    directory, or a Hugging Face directory of a supported architecture. `dtype`: what its weights
    are held in, fp32 (the default) or, for inference in half the memory, bf16 or fp16 (a torch
    dtype or "bf16"...), the routers' in fp32 either way (`held_as`); such a model computes in that
    dtype, as transformers' models loaded in it do. "auto": the dtype they are stored in (an HF
    directory's own, a converted run's `convert --dtype`; fp32 for a trained run)."""
    from moelab.config import Config
    from moelab.models import MoETransformer
    from moelab.models.transformer import weights_dtype
    from moelab.train.memory import check_weights_fit

    if dtype == "auto":
        dtype = stored_weights_dtype(path)
    try:
        dtype = weights_dtype(dtype)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if is_hf_dir(path):
        from moelab.models.hf import load_hf

        return load_hf(path, device, dtype)
    ckpt = resolve_checkpoint(path, hf_too=True)
    cfg = Config.from_yaml_file(ckpt / "config.yaml").resolve()
    check_weights_fit(cfg.model, device, str(path), dtype)  # before reading (one tensor at a time): not killed halfway
    return MoETransformer.from_weights(cfg.model, read_model_file(ckpt, lambda f: _read_as(f, device, dtype)), dtype)


def _read_as(file: str, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on `device`, each cast to `held_as(name, dtype)` as it is read:
    on a GPU the whole file is never there in its stored (fp32) dtype."""
    from safetensors import safe_open

    from moelab.models.transformer import held_as

    with safe_open(file, "pt", device=str(torch.device(device))) as f:
        return {name: f.get_tensor(name).to(held_as(name, dtype)) for name in f.keys()}
