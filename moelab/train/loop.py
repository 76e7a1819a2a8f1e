"""The training loop: one readable function from config to checkpoints and metrics.

Steps are optimizer updates; each update consumes `grad_accum` micro-batches. Host syncs
(`.item()`) happen only at the log, eval and save cadence, never every step.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moelab.config import Config
from moelab.data.loader import BatchLoader
from moelab.data.pipeline import Dataset, build_dataset
from moelab.errors import UserError
from moelab.eval.metrics import evaluate
from moelab.models import MoETransformer
from moelab.models.router import update_selection_bias
from moelab.optim.groups import HybridOptimizer
from moelab.optim.schedules import lr_factor
from moelab.train import checkpoint as ck
from moelab.train.rundir import MetricsLog, new_run_dir, provenance


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    device: torch.device
    data: Dataset
    model: MoETransformer
    optimizer: HybridOptimizer
    loader: BatchLoader
    step: int = 0  # optimizer updates done


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg: Config, out: str | None = None, resume: str | None = None,
          overrides: tuple[str, ...] = ()) -> Run:
    """Build everything a run needs; on resume, restore it from the newest (or given) checkpoint."""
    ckpt = None
    if resume:
        run_dir, ckpt, cfg = _resume_target(resume, out, cfg, overrides)
    else:
        run_dir = new_run_dir(out, cfg.preset)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    seed_all(cfg.train.seed)
    data = build_dataset(cfg.data, cfg.train.seq_len, run_dir)
    cfg.resolve(vocab_size=data.tokenizer.vocab_size)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "run.json").write_text(json.dumps(provenance(), indent=1))
    if data.train_windows.shape[0] < cfg.train.batch_size:
        raise UserError(f"training split has {data.train_windows.shape[0]} windows, fewer than "
                        f"train.batch_size={cfg.train.batch_size}; use more text or a smaller batch")
    model = MoETransformer(cfg.model).to(device)
    run = Run(cfg, run_dir, device, data, model, HybridOptimizer(model, cfg.optim, device),
              BatchLoader(data.train_windows, cfg.train.batch_size, cfg.train.seed))
    if ckpt is not None:
        _restore(run, ckpt)
    return run


def _resume_target(resume: str, out: str | None, cfg: Config, overrides):
    """`--resume auto` continues --out (or the newest run of the preset); `--resume PATH` a
    checkpoint or run directory. The run's own resolved config is the base; overrides apply."""
    import yaml

    if resume == "auto":
        if not out:
            raise UserError("--resume auto needs --out RUN_DIR (the run to continue)")
        run_dir = Path(out)
        ckpts = ck.list_checkpoints(run_dir)
        if not ckpts:
            if run_dir.exists() and any(run_dir.iterdir()) and (run_dir / "config.yaml").is_file():
                raise UserError(f"{run_dir} has no complete checkpoint to resume from")
            return run_dir, None, cfg  # nothing to resume: a fresh run in that directory
        ckpt = ckpts[-1]
    else:
        ckpt = ck.resolve_checkpoint(resume)
        run_dir = ckpt.parent.parent
    saved = Config.from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    from moelab.config import apply_override

    for item in overrides:
        apply_override(saved, item)
    saved.validate()
    return run_dir, ckpt, saved


def _restore(run: Run, ckpt: Path) -> None:
    from safetensors.torch import load_model

    state = ck.load_trainer_state(ckpt)
    if state["fingerprint"] != run.data.fingerprint:
        raise UserError(f"data changed since checkpoint {ckpt.name} (fingerprint {state['fingerprint']}"
                        f" -> {run.data.fingerprint}); resuming would silently train on other data")
    load_model(run.model, str(ckpt / "model.safetensors"), device=str(run.device))
    run.optimizer.load_state_dict(state["optimizer"])
    run.loader.load_state_dict(state["loader"])
    ck.set_rng_state(state["rng"])
    run.step = int(state["step"])


def save(run: Run, metrics: dict) -> Path:
    state = {"step": run.step, "optimizer": run.optimizer.state_dict(),
             "loader": run.loader.state_dict(), "rng": ck.rng_state(),
             "fingerprint": run.data.fingerprint}
    return ck.save_checkpoint(run.run_dir, run.step, run.model, state, run.cfg.to_yaml(), metrics)


def _eval_subset(windows: torch.Tensor, n: int) -> torch.Tensor:
    if n <= 0 or windows.shape[0] <= n:
        return windows
    return windows[torch.linspace(0, windows.shape[0] - 1, n).long().unique()]


def run_eval(run: Run, full: bool = False) -> dict:
    windows = run.data.val_windows if full else _eval_subset(run.data.val_windows,
                                                             run.cfg.train.eval_windows)
    dtype = torch.bfloat16 if run.cfg.train.precision == "bf16" else None
    return evaluate(run.model, windows, run.data.token_bytes, run.cfg.train.batch_size, run.device, dtype)


def routing_stats(counts_LE: torch.Tensor, dropped_LE: torch.Tensor) -> dict:
    """Per-MoE-layer max/mean load, dead experts and dropped-slot share over the log interval."""
    if counts_LE.numel() == 0:
        return {}
    load = counts_LE.double()
    mean = load.mean(dim=1).clamp_min(1e-9)
    stats = {"load_max_mean": [round(v, 3) for v in (load.max(dim=1).values / mean).tolist()],
             "dead_experts": (counts_LE == 0).sum(dim=1).tolist()}
    if bool(dropped_LE.any()):
        total = load.sum(dim=1).clamp_min(1.0)
        stats["dropped_share"] = [round(v, 4) for v in (dropped_LE.double().sum(dim=1) / total).tolist()]
    return stats


def balance_terms(m) -> dict[str, float]:
    """The balancing coefficients in use (non-zero ones), for the start-of-run line and the log."""
    terms = {"aux_loss": m.aux_loss_coef, "seq_aux_loss": m.seq_aux_loss_coef, "z_loss": m.z_loss_coef,
             "bias_update_rate": m.bias_update_rate}
    return {k: v for k, v in terms.items() if v} if m.n_experts else {}


def train(cfg: Config, out: str | None = None, resume: str | None = None,
          overrides: tuple[str, ...] = (), progress: bool | None = None) -> dict:
    run = setup(cfg, out, resume, overrides)
    cfg, t = run.cfg, run.cfg.train
    log = MetricsLog(run.run_dir / "metrics.jsonl", keep_until_step=run.step)
    say = _printer(progress)
    n_params = run.model.num_parameters()
    say(f"run {run.run_dir} | {n_params['total'] / 1e6:.2f}M params ({n_params['active'] / 1e6:.2f}M "
        f"active) | Muon {run.optimizer.report['muon']:,} / AdamW "
        f"{run.optimizer.report['adamw_decay'] + run.optimizer.report['adamw_no_decay']:,} params | "
        f"{run.data.train_windows.shape[0]} train / {run.data.val_windows.shape[0]} val windows | "
        f"{run.device}" + (f" | resumed at step {run.step}" if run.step else ""))
    if balance_terms(cfg.model):
        say("balancing: " + ", ".join(f"{k} {v:g}" for k, v in balance_terms(cfg.model).items()))
    if run.step == 0:
        first = run_eval(run)
        log.write({"step": 0, "split": "val", **first})
        say(f"step 0 val loss {first['loss']:.4f} bpb {first['bpb']:.3f}")
    autocast = (torch.autocast(run.device.type, dtype=torch.bfloat16) if t.precision == "bf16"
                else contextlib.nullcontext())
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len
    bar = _progress_bar(progress, run.step, t.steps)
    run.model.train()
    window = _Window(run)
    last_saved = run.step
    while run.step < t.steps:
        run.optimizer.set_lr_factor(lr_factor(run.step, t.steps, cfg.optim.warmup,
                                              cfg.optim.schedule, cfg.optim.min_lr_ratio))
        for _ in range(t.grad_accum):
            x, y = (b.to(run.device, non_blocking=True) for b in run.loader.next_batch())
            with autocast:
                out_ = run.model(x, targets=y)
            (out_.loss / t.grad_accum).backward()
            window.add_micro(out_)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip or math.inf)
        run.optimizer.step()
        run.optimizer.zero_grad()
        if cfg.model.bias_update_rate:  # after the update, on the whole update's counts
            update_selection_bias(run.model.routers, window.update_counts_LE, cfg.model.bias_update_rate)
        window.update_counts_LE.zero_()
        run.step += 1
        window.add_step(grad_norm, tokens_per_step)
        bar.update(1)
        if run.step % t.log_every == 0 or run.step == t.steps:
            rec = window.flush(run.step, run.optimizer)
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if bar.disable:
                say(f"step {run.step}/{t.steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                    f"gnorm {rec['grad_norm']:.2f} {rec['tokens_per_s']:.0f} tok/s")
        if run.step % t.eval_every == 0 and run.step < t.steps:
            ev = run_eval(run)
            log.write({"step": run.step, "split": "val", **ev})
            _write(bar, say, f"step {run.step} val loss {ev['loss']:.4f} bpb {ev['bpb']:.3f}")
            window.reset_clock()
        if run.step % t.save_every == 0 and run.step < t.steps:
            save(run, {"train_loss": window.last_loss})
            last_saved = run.step
            window.reset_clock()
    bar.close()
    final = run_eval(run, full=True)
    log.write({"step": run.step, "split": "val", "final": True, **final})
    if last_saved != run.step or not ck.list_checkpoints(run.run_dir):
        save(run, {"val": final})
    log.close()
    summary = _summary(run, final, window)
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


class _Window:
    """Accumulates on-device sums between log points, so the loop never syncs per step."""

    def __init__(self, run: Run):
        self.run = run
        L, E = len(run.cfg.model.moe_layers), run.cfg.model.n_experts
        self.counts_LE = torch.zeros(L, E, dtype=torch.int64, device=run.device)
        self.dropped_LE = torch.zeros_like(self.counts_LE)
        self.update_counts_LE = torch.zeros_like(self.counts_LE)  # this optimizer update only
        # lm, aux, seq_aux, z, gnorm
        self.sums = torch.zeros(5, dtype=torch.float64, device=run.device)
        self.micro = self.steps = self.tokens = 0
        self.tokens_total, self.train_time, self.last_loss = 0, 0.0, float("nan")
        self.clock = time.perf_counter()

    def add_micro(self, out) -> None:
        self.sums[:4] += torch.stack([out.lm_loss.detach(), out.aux_loss.detach(),
                                      out.seq_aux_loss.detach(), out.z_loss.detach()]).double()
        if out.router:
            counts = torch.stack([r.counts_E for r in out.router])
            self.counts_LE += counts
            self.update_counts_LE += counts
            self.dropped_LE += torch.stack([r.dropped_E for r in out.router])
        self.micro += 1

    def add_step(self, grad_norm: torch.Tensor, tokens: int) -> None:
        self.sums[4] += grad_norm.detach().double()
        self.steps += 1
        self.tokens += tokens

    def reset_clock(self) -> None:  # exclude eval and checkpoint time from tokens/s
        self.clock = time.perf_counter()

    def flush(self, step: int, optimizer: HybridOptimizer) -> dict:
        s = self.sums.tolist()  # the one host sync of the interval
        elapsed = max(time.perf_counter() - self.clock, 1e-9)
        self.train_time += elapsed
        self.tokens_total += self.tokens
        lrs = [g["lr"] for opt in optimizer.optimizers for g in opt.param_groups]
        m = self.run.cfg.model
        rec = {"step": step, "split": "train", "loss": s[0] / self.micro}
        for i, name in enumerate(("aux_loss", "seq_aux_loss", "z_loss"), start=1):
            if name == "aux_loss" and m.n_experts or name in balance_terms(m):
                rec[name] = s[i] / self.micro
        rec.update({"grad_norm": s[4] / self.steps, "lr": lrs[0], "tokens_per_s": self.tokens / elapsed,
                    "tokens": self.tokens_total, **routing_stats(self.counts_LE, self.dropped_LE)})
        self.last_loss = rec["loss"]
        self.sums.zero_()
        self.counts_LE.zero_()
        self.dropped_LE.zero_()
        self.micro = self.steps = self.tokens = 0
        self.reset_clock()
        return rec


def _summary(run: Run, final: dict, window: _Window) -> dict:
    return {"run_dir": str(run.run_dir), "steps": run.step,
            "val_loss": final["loss"], "val_ppl": final["ppl"], "val_acc": final["acc"],
            "val_bpb": final["bpb"], "train_tokens_per_s": window.tokens_total / max(window.train_time, 1e-9),
            "params": run.model.num_parameters()}


def _printer(progress: bool | None):
    quiet = progress is False
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def _write(bar, say, msg: str) -> None:
    if bar.disable:
        say(msg)
    else:
        bar.write(msg, file=sys.stderr)


def _progress_bar(progress: bool | None, start: int, total: int):
    from tqdm import tqdm

    # progress=None: a bar on a terminal, plain log lines otherwise (CI, pipes).
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, initial=start, disable=disable, unit="step", dynamic_ncols=True,
                file=sys.stderr)
