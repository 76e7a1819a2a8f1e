"""The training loop: one readable function from config to checkpoints and metrics.

Steps are optimizer updates; each update consumes `grad_accum` micro-batches. Per update there is
one host sync, the guard's check of the loss and gradient norm (a NaN must never reach the
weights); the metrics are summed on the device and read only at the log cadence.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from moelab.config import Config
from moelab.data.loader import BatchLoader
from moelab.data.pipeline import Dataset, build_dataset, write_split_report
from moelab.data.tokenizer import fewer_tokens_note
from moelab.errors import UserError
from moelab.eval.language import xz_bits_per_byte
from moelab.eval.metrics import evaluate, spread_windows
from moelab.files import write_atomic
from moelab.hardware import fast_fp32_matmuls, fp32_mode_for, measured_fp32_path
from moelab.models import MoETransformer
from moelab.models.accounting import parameter_table
from moelab.models.router import update_selection_bias
from moelab.optim.groups import HybridOptimizer
from moelab.optim.schedules import lr_factor, schedule_state
from moelab.train import checkpoint as ck
from moelab.train import distributed as dp
from moelab.train.faults import FaultPlan, StopSignals, UpdateGuard
from moelab.train.host import compile_unavailable, fit_torch_threads, keep_freed_memory, precision_note
from moelab.train.memory import check_training_fits, check_update_fits
from moelab.train.monitor import Sinks, flops_per_token, is_rank0, peak_memory_gb, peak_tflops, plot_curves
from moelab.train.rundir import RunLock, has_entries, metrics_until, new_run_dir, provenance


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    device: torch.device
    data: Dataset
    model: MoETransformer
    optimizer: HybridOptimizer
    loader: BatchLoader
    guard: UpdateGuard
    scaler: torch.amp.GradScaler | None = None
    step: int = 0  # optimizer updates done (skipped ones included: their data was consumed)
    tokens: int = 0  # training tokens consumed
    expert_counts_LE: torch.Tensor | None = None  # slots routed to each expert, whole run
    best: dict = field(default_factory=lambda: {"val_loss": math.inf, "step": -1, "bad_evals": 0})
    evaluated_at: int = -1  # the update of the last periodic evaluation (-1: none, or a checkpoint from before)
    provenance: dict = field(default_factory=dict)
    resumed_from: Path | None = None
    # fp32 products' path (moelab.hardware.fast_fp32_matmuls): "onednn" (then this much faster than
    # the default BLAS) or "default"; a resume keeps its checkpoint's, so it computes the same numbers
    fp32_path: str = "default"
    fp32_speedup: float | None = None
    saved_fp32_path: str | None = None
    changed_on_resume: list[str] = field(default_factory=list)  # "key old -> new" against the checkpoint
    set_aside: Path | None = None  # where a rewind in place moved the abandoned later checkpoints
    lock: RunLock | None = None  # held from setup to the end of train()
    restarted: bool = False  # --resume auto on a run that had stopped before its first checkpoint
    # a finished run extended (train.steps raised) from a checkpoint from before evaluated_at was saved:
    # it ended with its final evaluation alone, not the periodic one that a run going on past that
    # update holds there, which the extension runs first (newer runs hold it at their last update)
    eval_due: bool = False
    started_new: bool = False  # --resume auto where --out held no run: a new one began there
    sinks: Sinks | None = None  # metrics.jsonl, TensorBoard, W&B: opened last in setup
    rows: slice = field(default_factory=lambda: slice(None))  # its rows of each batch (data parallel: 1/N)
    setup_config: dict = field(default_factory=dict)  # the config as set-up began: the other ranks' start
    # set-up's notes, said once training starts: torch's threads fitted to the usable cores, a tokenizer
    # smaller than asked, a resume that moves the LR schedule
    notes: list[str] = field(default_factory=list)
    # each train.choice_tasks task's items found in the training data the model has seen (None: not
    # checked), recorded with its scores: set-up's check (_contamination_notes)
    choice_contaminated: dict = field(default_factory=dict)
    choice_unread: list = field(default_factory=list)  # models up train.init_from whose data it could not read
    # train.choice_tasks as loaded ((spec, (task, items)) each), a resumed run's own saved ones included
    choice: list = field(default_factory=list)


def config_changes(before: Config, after: Config) -> list[str]:
    """`key old -> new` for every setting that differs, dotted keys in config order."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old, new = flat(before.to_dict()), flat(after.to_dict())
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N` or another torch device type, checked to exist on this machine;
    `key`: the setting's name as the user gave it, for the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}={name} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":  # one device: cpu:0 trained, then safetensors refused it at the checkpoint reload
        return torch.device("cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f"{key}={name} but no CUDA device is available; use {key}=cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"{key}={name} but this machine has {count} CUDA device(s) "
                            f"(cuda:0 to cuda:{count - 1})")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
        if not (backend is not None and getattr(backend, "is_available", lambda: False)()):
            raise UserError(f"{key}={name} but this torch build or machine has no {device.type} device; "
                            f"use {key}=cpu")
    return device


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_for(device: torch.device, precision: str):
    """A factory of the training forward's autocast context for train.precision."""
    dtype = AUTOCAST_DTYPES[precision]
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext


def setup(cfg: Config, out: str | None = None, resume: str | None = None,
          overrides: tuple[str, ...] = (), smoke: bool = False, progress: bool | None = False,
          config_given: bool = False, choice: list | None = None) -> Run:
    """Build everything a run needs; on resume, restore it from the newest (or given) checkpoint.
    A run directory this call starts (new, or a fork) is removed again if setting up fails, so the
    corrected command can use the same --out. `progress`: the stages of preparing raw data are
    said (None: on a terminal only, so a refusal in a log or pipe stays one line). `choice`: the
    multiple-choice tasks of train.choice_tasks as loaded, checked against the tokenizer and context."""
    if not is_rank0():
        return _follow_setup()
    try:
        run = _setup_run(cfg, out, resume, overrides, smoke, progress, config_given, choice)
    except BaseException as exc:
        why = str(exc) if isinstance(exc, UserError) else f"set-up failed on rank 0 ({type(exc).__name__})"
        dp.share({"error": why})
        raise
    dp.share({"run_dir": str(run.run_dir), "ckpt": str(run.resumed_from) if run.resumed_from else None,
              "config": run.setup_config})
    return run


def _follow_setup() -> Run:
    """Ranks after 0: wait for rank 0's set-up (data prepared, run directory written), then build
    the same run from what it wrote, writing nothing."""
    plan = dp.share(None)
    if "error" in plan:  # rank 0 has said it: one message, not one per rank
        raise SystemExit(2)
    run_dir = Path(plan["run_dir"])
    run = _setup(Config.from_dict(plan["config"]), run_dir, Path(plan["ckpt"]) if plan["ckpt"] else None,
                 smoke=False, writer=False)  # train() refuses --smoke under torchrun
    run.lock = RunLock(run_dir)  # rank 0 holds it
    return run


def _setup_run(cfg: Config, out: str | None, resume: str | None, overrides: tuple[str, ...], smoke: bool,
               progress: bool | None, config_given: bool = False, choice: list | None = None) -> Run:
    ckpt = None
    if resume:
        asked = (cfg.train.choice_tasks, cfg.train.choice_limit)
        run_dir, ckpt, cfg = _resume_target(resume, out, cfg, overrides, config_given)
        if (cfg.train.choice_tasks, cfg.train.choice_limit) != asked:  # the run's own saved tasks
            choice = _load_choice_tasks(cfg.train, saved=True)
    # before any data is prepared or folder made: a model too large is said in one line, not killed
    device = resolve_device(cfg.train.device)
    check_training_fits(cfg, device, f"the model of {run_dir}" if resume else (
        f"train.init_from={cfg.train.init_from}" if cfg.train.init_from else f"preset {cfg.preset}"),
        processes=dp.processes_sharing(device))
    if not resume:
        label = f"from-{Path(cfg.train.init_from).expanduser().resolve().name}" if cfg.train.init_from else cfg.preset
        run_dir = new_run_dir(out, label + ("-smoke" if smoke else ""), resumable=not smoke)  # --smoke: new runs only
    fresh = not (run_dir.exists() and has_entries(run_dir))  # new_run_dir: absent or empty
    existed = run_dir.exists()
    restart = bool(resume) and ckpt is None and (run_dir / "config.yaml").is_file()
    lock = RunLock(run_dir)
    if is_rank0():
        lock.acquire()  # before anything is written; a failure here removes nothing
    opened = None  # the run's metrics sinks, once set-up has opened them
    try:
        if restart:  # the earlier attempt's records would precede the new ones at the same steps
            for name in ("metrics.jsonl", "summary.json"):
                (run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            for tmp in (run_dir / "data").glob(".tmp-*"):  # a data preparation it was killed in
                shutil.rmtree(tmp, ignore_errors=True)
        from moelab.data.prepare import stage_printer

        setup_config = cfg.to_dict()  # what the other ranks set up from (before _setup resolves it)
        run = _setup(cfg, run_dir, ckpt, smoke, stage_printer(progress))
        opened = run.sinks
        if choice:  # a choice longer than the context failed at the first multiple-choice evaluation
            from moelab.eval.choice import choice_requests

            for spec, (_, items) in choice:
                choice_requests(run.data.tokenizer, items, spec, run.model.cfg.max_seq_len)
            if is_rank0():
                run.notes += _contamination_notes(run, choice)
        run.restarted, run.setup_config, run.choice = restart, setup_config, choice or []
        run.started_new = bool(resume) and ckpt is None and not restart
    except BaseException:
        if opened is not None:  # before the directory they write into goes
            opened.close(failed=True)
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
            if existed:
                run_dir.mkdir()
        lock.release()
        raise
    run.lock = lock
    return run


def _contamination_notes(run: Run, choice: list) -> list[str]:
    """A note for each train.choice_tasks task with items (context and gold answer) that share a
    13-token sequence with the training data the model has seen (its split, and with
    train.init_from the source model's): its accuracy would measure recall as well as skill.
    Training data over audit.CONTAMINATION_CHECK_TOKENS is not read here; the note says how to check it."""
    from moelab.data.audit import contamination_notes, run_contamination

    tasks = [loaded for _, loaded in choice]
    results, tokens, run.choice_unread = run_contamination(run.run_dir, run.cfg, tasks)
    run.choice_contaminated = {spec: None if results is None else len(r["contaminated"])
                               for (spec, _), r in zip(choice, results or [None] * len(choice))}
    return contamination_notes(results, tokens, [spec for spec, _ in choice], run.run_dir, unread=run.choice_unread)


def _setup(cfg: Config, run_dir: Path, ckpt: Path | None, smoke: bool, say=None, writer: bool = True) -> Run:
    """`writer`: this process writes the run's files (rank 0); the other ranks of a data-parallel
    run call this after rank 0's set-up, and only read."""
    if writer and ckpt is not None and run_dir != ckpt.parent.parent:
        _fork(ckpt, run_dir)
    if smoke:
        apply_smoke(cfg)
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    if writer and ckpt is None:  # marks the folder as a run at once: one killed while preparing data is restartable
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())
    t = cfg.train
    threads_note = fit_torch_threads(t.threads)
    device = dp.local_device(resolve_device(t.device))  # data parallel on CUDA: this rank's GPU
    if t.compile and (why := compile_unavailable(device)):
        raise UserError(f"train.compile=true: {why}; install it or set train.compile=false")
    if device.type == "cpu" and t.keep_freed_memory:
        keep_freed_memory()
    seed_all(t.seed)
    if writer and ckpt is None:
        FaultPlan().data_preparation()
    data = build_dataset(cfg.data, t.seq_len, run_dir, write_report=False, say=say)
    init_note = None
    if t.init_from:  # the vocabulary is the source model's (often padded past its tokenizer's)
        if ckpt is None:  # (a resume has its own weights: the source may be gone by then)
            _check_init_tokenizer(cfg, data.tokenizer)
        init_note = _init_overlap_note(cfg, run_dir, data, resumed_from=ckpt)
        cfg.resolve()
    else:
        cfg.resolve(vocab_size=model_vocab(cfg.model.vocab_size, data.tokenizer.vocab_size))
    origin = provenance()  # git SHA and versions, recorded once per process and in every checkpoint
    if data.train_windows.shape[0] < t.batch_size:
        raise UserError(f"training split has {data.train_windows.shape[0]} windows, fewer than "
                        f"train.batch_size={t.batch_size}; use more text or a smaller batch")
    rows = dp.local_rows(t.batch_size)  # this process's share of each batch (all of it in one process)
    if ckpt is None and t.init_from:
        model = _initial_model(cfg, device)
    else:  # built on its device; a resume's weights come from the checkpoint, so no random init
        model = MoETransformer(cfg.model, device=device, init=ckpt is None)
    model.activation_checkpointing = t.activation_checkpointing
    guard = UpdateGuard(t.nonfinite, t.spike_sigma, t.spike_window, min(20, t.spike_window),
                        t.spike_max_consecutive)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    run = Run(cfg, run_dir, device, data, model, HybridOptimizer(model, cfg.optim, device),
              BatchLoader(data.train_windows, t.batch_size, t.seed), guard, scaler,
              expert_counts_LE=torch.zeros(len(cfg.model.moe_layers), cfg.model.n_experts, dtype=torch.int64,
                                           device=device), provenance=origin,
              notes=[threads_note] if threads_note else [])
    run.rows = rows
    if init_note:
        run.notes.append(init_note)
    learnt, asked = data.tokenizer.vocab_size, cfg.data.vocab_size
    if ckpt is None and not (cfg.data.path or cfg.data.tokenizer or t.init_from) and learnt < asked:
        run.notes.append(fewer_tokens_note(learnt, f"data.vocab_size={asked}"))
    if ckpt is None and (note := _few_val_note(cfg, data)):
        run.notes.append(note)
    if ckpt is None and not cfg.data.path and (note := _skipped_note(data, run_dir)):
        run.notes.append(note)
    if ckpt is not None:
        run.resumed_from = ckpt
        before = Config.from_yaml_file(ckpt / "config.yaml")
        run.changed_on_resume = config_changes(before, cfg)
        _restore(run, ckpt)
        if run.evaluated_at < 0 and 0 < run.step < before.train.steps and run.step % before.train.eval_every == 0:
            run.evaluated_at = run.step  # a checkpoint from before evaluated_at, saved after that evaluation
        run.eval_due = before.train.steps == run.step < t.steps and run.step % t.eval_every == 0 \
            and run.evaluated_at != run.step
        if note := schedule_note(before, cfg, run.step):
            run.notes.append(note)
        if writer and run_dir == ckpt.parent.parent:
            run.set_aside = _set_aside_later(run_dir, run.step)
    # a micro-batch whose activations cannot fit: one line now, not the kernel's kill at update 1
    check_update_fits(model, run.optimizer, replace(t, batch_size=rows.stop - rows.start), device,
                      autocast_for(device, t.precision))
    if dp.active():  # after the check above, whose probe forwards each rank runs alone
        for router in model.routers:  # the balancing loss on the whole micro-batch's expert shares
            router.batch_share = torch.compiler.disable(dp.batch_share)
    # within set-up, so that a failing W&B start removes the new run directory like any other failure
    run.sinks = Sinks(run_dir, run.step, t.tensorboard, t.wandb, cfg.to_dict())
    if not writer:
        return run
    # last: a resume refused above (another model shape, other data) leaves the run's files as they were
    try:
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())
        write_atomic(run_dir / "run.json", json.dumps(_run_record(origin, ckpt, run.step), indent=1))
        write_split_report(run_dir, data.report)
    except BaseException:
        run.sinks.close(failed=True)
        raise
    return run


def _run_record(origin: dict, ckpt: Path | None, step: int) -> dict:
    """RUN/run.json: how this process was started (command, folder, versions) and, for a resume
    or a fork, the same for each process before it, oldest first (`history`), with the update each
    resume began at: the run's report gives every command that made it, not only the last."""
    if ckpt is None:
        return origin
    home = _home_run(ckpt)
    try:
        before = json.loads((home / "run.json").read_text()) if home else {}
    except (OSError, ValueError):
        before = {}
    history = [*before.pop("history", []), before] if isinstance(before, dict) and before else []
    return {**origin, "resumed_at": step, "history": history}


def model_vocab(asked: int, tokenizer: int) -> int:
    """The model's vocabulary for a tokenizer of `tokenizer` tokens: model.vocab_size=0 takes the
    tokenizer's; a larger one pads the embedding and head (say to a multiple of 64, as published
    models do); a smaller one could not embed every token, so it is refused, never replaced."""
    if asked and asked < tokenizer:
        raise UserError(f"model.vocab_size={asked} is smaller than the tokenizer's {tokenizer} tokens; leave it 0 "
                        "(the tokenizer's size), give a multiple of 64 at or above it, or train a smaller "
                        "tokenizer with data.vocab_size")
    return asked or tokenizer


def _check_init_tokenizer(cfg: Config, tokenizer) -> None:
    """The run's data must be tokenised as the `train.init_from` model was trained: with the
    source's own tokenizer where it has one, and within its vocabulary."""
    from moelab.data.tokenizer import load_tokenizer

    src = cfg.train.init_from
    _, own = ck.init_source(src)
    if own is not None and load_tokenizer(own).tk.get_vocab(True) != tokenizer.tk.get_vocab(True):
        where = f"data.path={cfg.data.path}" if cfg.data.path else f"data.tokenizer={cfg.data.tokenizer}"
        raise UserError(f"the data ({where}) is tokenised with another vocabulary than the model of train.init_from="
                        f"{src}; use its tokenizer ({own}): drop data.tokenizer, or prepare the data with "
                        f"--tokenizer {own}")
    if own is None and not (cfg.data.tokenizer or cfg.data.path):
        raise UserError(f"train.init_from={src} has no tokenizer.json, and a new one would number tokens "
                        "differently from its model: give data.tokenizer=PATH (the tokenizer it was trained with)")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model of train.init_from={src} "
                        f"only {cfg.model.vocab_size}; give the tokenizer it was trained with")


def _init_overlap_note(cfg: Config, run_dir: Path, data, resumed_from: Path | None = None) -> str | None:
    """A run started from another run's weights (`train.init_from`) whose validation documents
    that model trained on has no held-out validation loss: a note saying how many (recorded in
    RUN/data/split.json, and said again on each resume from there, since the source may be gone by
    then), or None. Checked only for a moelab run as the source, whose prepared data is still there;
    an HF model's training data is not known."""
    from moelab.data.overlap import INIT_OVERLAP, init_lineage, recorded_init_overlap, run_data_dir, split_copy_ids

    if resumed_from is not None:  # this run's record, or for a fork its home run's
        n = recorded_init_overlap(run_dir) or recorded_init_overlap(resumed_from.parent.parent)
        found = (n, None) if n else None
    else:
        own = run_data_dir(run_dir, cfg)
        if own is None:
            return None
        ids, of = set(), None
        for src_data in init_lineage(cfg.train.init_from):  # the source run, and the runs it started from
            if src_data.resolve() != own.resolve():  # the same split: held out from that model
                if (got := split_copy_ids(src_data, own, "val", data.tokenizer)) is not None:
                    ids, of = ids | got[0], got[1]
        found = (len(ids), of)
    if not found or found[0] < 1:
        return None
    data.report[INIT_OVERLAP] = found[0]
    of = f" of the {found[1]}" if found[1] else ""
    return (f"note: {found[0]}{of} validation documents are training documents of train.init_from="
            f"{cfg.train.init_from} (or of a run it started from), so the validation loss is not held out for "
            "this model (it reads low); keep the source run's split (its data.path, or the same data.source, "
            "data.split_salt and data.val_fraction)")


def _skipped_note(data, run_dir: Path) -> str | None:
    """The inputs a raw source lost when prepared into the run (`moelab data prepare` says it itself)."""
    from moelab.data.pipeline import RUN_PREPARED
    from moelab.data.prepare import MANIFEST, skipped_note

    return skipped_note(data.report["skipped"], run_dir / RUN_PREPARED / MANIFEST)


def _few_val_note(cfg: Config, data) -> str | None:
    """A validation split of a handful of documents, said at a run's start (see few_val_note)."""
    from moelab.data.prepare import read_manifest
    from moelab.data.split import few_val_note

    s = data.report["splits"]
    if cfg.data.path:
        fraction = read_manifest(cfg.data.path).get("val_fraction", 0.05)
        setting = "`moelab data prepare ... --val-fraction {}`"
    else:
        fraction, setting = cfg.data.val_fraction, "data.val_fraction={}"
    return few_val_note(s["val"]["documents"], s["train"]["documents"] + s["val"]["documents"], s["val"]["tokens"],
                        fraction, setting)


def _initial_model(cfg: Config, device: torch.device) -> MoETransformer:
    """The model of a new run started from `train.init_from`'s weights, read onto `device`; the
    model settings may differ from the source's only where the weights' shapes allow."""
    src = cfg.train.init_from
    weights = ck.load_weights(src, device)
    try:
        return MoETransformer.from_weights(cfg.model, weights).train()
    except RuntimeError:  # missing, unexpected or differently shaped tensors
        before = Config(model=ck.init_source(src)[0])
        changed = [c for c in config_changes(before, Config(model=cfg.model)) if c.startswith("model.")]
        raise UserError(f"the weights of train.init_from={src} do not fit the model as configured ("
                        + (", ".join(changed) or "its saved config differs from its weights")
                        + "); drop those model.* overrides") from None


def _set_aside_later(run_dir: Path, step: int) -> Path | None:
    """A rewind in place (`--resume CKPT` with a later step checkpoint in the run) abandons the
    updates after CKPT. Their checkpoints (and `best`, if it came later) move to
    `rewound-from-step_N/` with the metrics log as it was: nothing is deleted, and neither
    `--resume auto` nor `train.keep_last` pruning can mix them into the new updates. The folder,
    or None."""
    later = [p for p in ck.list_checkpoints(run_dir) if int(p.name[len(ck.CKPT_PREFIX):]) > step]
    if not later:  # resuming the newest checkpoint (after a kill): a later `best` is simply redone
        return None
    best = run_dir / "checkpoints" / "best"
    if (ck.checkpoint_step(best) or -1) > step:
        later.append(best)
    base = run_dir / f"rewound-from-{ck.CKPT_PREFIX}{step:07d}"
    aside, n = base, 1
    while aside.exists():
        n += 1
        aside = base.with_name(f"{base.name}-{n}")
    aside.mkdir()
    if (run_dir / "metrics.jsonl").is_file():
        shutil.copy2(run_dir / "metrics.jsonl", aside / "metrics.jsonl")
    for p in later:
        p.rename(aside / p.name)
    return aside


def warmup_note(cfg: Config) -> str | None:
    """A warmup as long as the run: the LR only ramps up and never decays, which is mostly a
    warmup meant in micro-batches or tokens, or copied from a longer run's config."""
    w, steps = cfg.optim.warmup, cfg.train.steps
    if w < steps:
        return None
    return (f"note: optim.warmup={w} is not below train.steps={steps}: the LR only ramps up, to {steps / w:.0%} "
            "of its peak at the last update, and never decays (warmup counts optimizer updates, not micro-batches "
            "or tokens)")


def schedule_note(before: Config, after: Config, step: int) -> str | None:
    """A resume whose settings move the LR schedule (train.steps raised on a cosine or linear
    schedule, another warmup or schedule): where the next update's LR jumps, say so, since a run
    that had decayed to its minimum goes back up to a large LR."""
    def factor(c: Config, update: int) -> float:
        o = c.optim
        return lr_factor(update, c.train.steps, o.warmup, o.schedule, o.min_lr_ratio, o.decay_frac)

    if step == 0 or math.isclose(factor(before, step), factor(after, step), rel_tol=0.01):
        return None
    kind = after.optim.schedule
    if kind == "wsd":
        hint = ("a wsd schedule keeps the LR flat until its final decay: resume a checkpoint from before the decay "
                "(--resume CKPT) to extend it smoothly")
    elif kind == "constant":
        hint = "the schedule settings changed"
    else:
        hint = (f"a {kind} schedule spans all of train.steps; optim.schedule=wsd runs can be extended smoothly "
                "from a checkpoint before their decay")
    return (f"note: these settings move the LR schedule: update {step + 1} runs at {factor(after, step):.3g} x the "
            f"base LR, update {step} ran at {factor(before, step - 1):.3g} x ({hint})")


def apply_smoke(cfg: Config) -> None:
    """--smoke: a few updates, tiny evaluations and two checkpoints, to check a config end to end
    (data, model, forward/backward, optimizer, eval, save and reload) before a long run."""
    t = cfg.train
    t.steps, t.eval_every, t.log_every, t.save_every = min(t.steps, 4), 2, 1, 2
    t.eval_windows = min(t.eval_windows or 8, 8)
    t.final_eval_windows, t.keep_last, t.patience = 8, 0, 0


def _resume_target(resume: str, out: str | None, cfg: Config, overrides, config_given: bool = False):
    """`--resume auto` continues --out (or the newest run of the preset); `--resume PATH` a
    checkpoint or run directory. The run's own resolved config is the base; overrides apply. A run
    that stopped before its first checkpoint (killed or preempted while preparing data or in its
    first updates) has nothing to resume: `--resume auto` starts it again from its saved config,
    so a requeued job that always passes --resume auto goes on. `config_given`: `cfg` comes from
    --preset/--config (with --resume auto only), which start a new run where --out holds none
    and must otherwise agree with the run's saved config, so that one job script serves both."""
    if resume == "auto":
        if not out:
            raise UserError("--resume auto needs --out RUN_DIR (the run to continue)")
        run_dir = Path(out)
        ckpts = ck.list_checkpoints(run_dir)
        if not ckpts:
            if run_dir.exists() and has_entries(run_dir):
                if (run_dir / "config.yaml").is_file():  # stopped before its first save: start it again
                    saved = _with_overrides(run_dir / "config.yaml", overrides)
                    if config_given:
                        _check_same_config(cfg, saved, run_dir)
                    return run_dir, None, saved
                raise UserError(f"{run_dir} is not a run and not empty: there is nothing to resume, and a new run "
                                "would write among its files; choose another --out")
            return run_dir, None, cfg  # nothing to resume: a fresh run in that directory
        ckpt = ckpts[-1]
    else:
        if ck.is_hf_dir(Path(resume).expanduser()):
            raise UserError(f"{resume} is a Hugging Face model directory: weights only (no optimizer or data "
                            f"position), so it cannot be resumed; to train from its weights: train.init_from={resume}")
        ckpt = ck.resolve_checkpoint(resume)
        run_dir = ckpt.parent.parent
        in_run = ckpt.parent.name == "checkpoints" and _home_run(ckpt) is not None
        if out and (not in_run or Path(out).expanduser().resolve() != run_dir.resolve()):
            run_dir = new_run_dir(out, "", resumable=False)  # a fork: new or empty, the source untouched
        elif not in_run:  # its grandparent is no run: resuming "in place" would write a run there
            raise UserError(f"{ckpt} is not in a run's checkpoints/ folder (set aside by a rewind, or kept "
                            f"elsewhere); continue it in a new run: --resume {ckpt} --out NEW_DIR")
    if not (ckpt / "trainer_state.pt").is_file():
        raise UserError(f"{ckpt} holds weights only (no optimizer or data position) and cannot be resumed; "
                        f"to train from its weights start a new run: train.init_from={ckpt}")
    saved = _with_overrides(ckpt / "config.yaml", overrides)
    if config_given:
        _check_same_config(cfg, saved, run_dir)
    step = ck.checkpoint_step(ckpt)
    if step is not None and step > saved.train.steps:
        raise UserError(f"{ckpt} is at update {step}, past train.steps={saved.train.steps}; give train.steps={step} "
                        "or more, or resume an earlier checkpoint")
    return run_dir, ckpt, saved


def _check_same_config(given: Config, saved: Config, run_dir: Path) -> None:
    """--preset/--config with `--resume auto` on an existing run: refused unless they give the
    run's own settings (both resolved alike, so 0 = 'derive' matches the value derived from it)."""
    vocab = saved.model.vocab_size or None
    mine, theirs = (Config.from_dict(c.to_dict()).resolve(vocab_size=vocab) for c in (given, saved))
    differ = config_changes(theirs, mine)
    if differ:
        shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise UserError(f"--preset/--config differ from the saved config of {run_dir} (run -> given: {shown}); "
                        "to continue the run with its own settings drop --preset/--config (key=value overrides "
                        "still apply), or choose another --out for a new run")


def _with_overrides(config_yaml: Path, overrides) -> Config:
    """A run's saved (resolved) config with the command line's overrides applied, validated."""
    from moelab.config import apply_override

    saved = Config.from_yaml_file(config_yaml)
    for item in overrides:
        apply_override(saved, item)
    saved.validate()
    return saved


def _home_run(ckpt: Path) -> Path | None:
    """The run a checkpoint belongs to: RUN for RUN/checkpoints/X and for X set aside by a rewind
    (RUN/rewound-from-step_N/X); None for a checkpoint folder kept anywhere else."""
    if ckpt.parent.name == "checkpoints" or ckpt.parent.name.startswith("rewound-from-"):
        if (ckpt.parent.parent / "config.yaml").is_file():
            return ckpt.parent.parent
    return None


def _fork(ckpt: Path, run_dir: Path) -> None:
    """`--resume CKPT --out NEW`: NEW continues from CKPT and the run CKPT belongs to stays as it was.
    NEW gets that run's tokenizer, its prepared data (token shards hard-linked where the file system
    allows) and its metrics up to CKPT's step (from the rewound log for a checkpoint a rewind set
    aside); checkpoints and the rest are NEW's own. A checkpoint kept outside any run brings only
    itself: the data is prepared again from its config and must match its fingerprint."""
    source = _home_run(ckpt)
    step = ck.checkpoint_step(ckpt)
    run_dir.mkdir(parents=True, exist_ok=True)
    if source is not None:
        for name in ("tokenizer", "data"):
            if (source / name).is_dir():
                shutil.copytree(source / name, run_dir / name, copy_function=_link_or_copy)
        log = (ckpt.parent if ckpt.parent.name != "checkpoints" else source) / "metrics.jsonl"
        if log.is_file():
            write_atomic(run_dir / "metrics.jsonl", metrics_until(log, step))
    best = ckpt.parent / "best"  # RUN/checkpoints/best, or the one a rewind set aside with CKPT
    best_step = ck.checkpoint_step(best)  # the best evaluation up to CKPT is the fork's best too
    if best_step is not None and step is not None and best_step <= step and (best / "model.safetensors").is_file():
        # checkpoint files are never rewritten in place (a save renames a new directory over the
        # old one), so links cannot carry a write from one run into the other
        shutil.copytree(best, run_dir / "checkpoints" / "best", copy_function=_link_or_copy_any)


def _link_or_copy_any(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links here
        shutil.copy2(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    """Token shards (.bin, .npy: written once, never rewritten) are hard-linked where possible; any
    other file (split.json, the manifest: rewritten in place) is copied, so a link cannot carry a
    write from one run into the other."""
    (_link_or_copy_any if src.endswith((".bin", ".npy")) else shutil.copy2)(src, dst)


def _already_complete(resume: str, out: str | None, cfg: Config, overrides, config_given: bool = False) -> dict | None:
    """The saved summary, marked `already_complete`, when the checkpoint to resume is the end of a
    finished run (train.steps reached, or stopped early with its patience still spent under the
    settings given now; final evaluation written): there is nothing to train, and running the final
    evaluation again would only rewrite the run's summary, metrics and report. An early-stopped run
    resumed as if unfinished trained train.eval_every more updates, stopped early again and
    rewrote its results: at every requeue of a job that passes --resume auto."""
    run_dir, ckpt, saved = _resume_target(resume, out, cfg, overrides, config_given)
    if ckpt is None:
        return None
    step = ck.checkpoint_step(ckpt)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if step is None or summary.get("steps") != step or summary.get("stopped"):
        return None
    t, best = saved.train, summary.get("best") or {}
    if step < t.steps and not (summary.get("early_stopped") and 0 < t.patience <= best.get("bad_evals", 0)):
        return None
    # the overrides given take effect only in updates to come: say which were given to no effect
    unused = config_changes(Config.from_yaml_file(ckpt / "config.yaml"), saved)
    return {**summary, "run_dir": str(run_dir), "already_complete": True, "not_applied": unused}


def trainer_state(run: Run) -> dict:
    """Everything besides the weights that an exact resume needs. Plain tensors and containers
    only, so it loads with torch.load(weights_only=True)."""
    o, t = run.cfg.optim, run.cfg.train
    return {"step": run.step, "tokens": run.tokens, "optimizer": run.optimizer.state_dict(),
            "schedule": schedule_state(run.step, t.steps, o.warmup, o.schedule, o.min_lr_ratio, o.decay_frac),
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
            "loader": run.loader.state_dict(), "rng": ck.rng_state(), "guard": run.guard.state_dict(),
            "expert_counts": run.expert_counts_LE.cpu(), "best": dict(run.best), "evaluated_at": run.evaluated_at,
            "fingerprint": run.data.fingerprint, "fp32_matmul": run.fp32_path}


def _restore(run: Run, ckpt: Path) -> None:
    from safetensors.torch import load_model

    state = ck.load_trainer_state(ckpt)
    if state["fingerprint"] != run.data.fingerprint:
        why = [c for c in run.changed_on_resume if c.startswith(("data.", "train.seq_len "))]
        raise UserError(f"data changed since checkpoint {ckpt.name} ("
                        + (", ".join(why) if why else f"fingerprint {state['fingerprint']} -> {run.data.fingerprint}")
                        + "); resuming would silently train on other data")
    try:
        ck.read_model_file(ckpt, lambda f: load_model(run.model, f, device=str(run.device)))
    except RuntimeError:  # missing, unexpected or differently shaped tensors
        changed = [c for c in run.changed_on_resume if c.startswith("model.")]
        raise UserError(f"cannot resume from {ckpt.name}: its weights do not fit the model as configured now ("
                        + (", ".join(changed) or "the saved config differs from the weights")
                        + "); a resume keeps the model's shape: drop those overrides, or start a new run") from None
    run.optimizer.load_state_dict(state["optimizer"])
    try:
        run.loader.load_state_dict(state["loader"])
    except ValueError as exc:  # train.seed: the data order is drawn from it
        raise UserError(f"cannot resume from {ckpt.name}: {exc}; a resume keeps the run's data order: drop that "
                        "override, or start a new run") from None
    ck.set_rng_state(state["rng"])
    run.saved_fp32_path = state.get("fp32_matmul", "default")  # checkpoints from before the choice: default
    run.step, run.tokens = int(state["step"]), int(state.get("tokens", 0))
    if "guard" in state:
        run.guard.load_state_dict(state["guard"])
        run.expert_counts_LE.copy_(state["expert_counts"])
        run.best.update(state["best"])
        run.evaluated_at = int(state.get("evaluated_at", -1))
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])


def save(run: Run, metrics: dict, name: str | None = None, faults: FaultPlan | None = None) -> Path:
    if not is_rank0():  # data parallel: every rank holds the same state, and rank 0 writes it
        return run.run_dir / "checkpoints" / (name or f"{ck.CKPT_PREFIX}{run.step:07d}")
    meta = dict(metrics, tokens=run.tokens, skipped=dict(run.guard.skipped), provenance=run.provenance)
    hook = faults.save_hook(run.step) if faults else None
    path = ck.save_checkpoint(run.run_dir, run.step, run.model, trainer_state(run), run.cfg.to_yaml(),
                              meta, name=name, after_file=hook)
    if name is None:
        ck.prune_checkpoints(run.run_dir, run.cfg.train.keep_last)
    return path


def run_eval(run: Run, full: bool = False) -> dict:
    """Validation metrics in the training precision (the same autocast dtype as training). Data
    parallel: each rank evaluates its 1/N of the batches one process would form and the sums are
    added up, so every rank gets the same figures (early stopping and the best checkpoint are
    decided alike); rank 0 adds the xz baseline, which needs no model."""
    t = run.cfg.train
    windows = spread_windows(run.data.val_windows, t.final_eval_windows if full else t.eval_windows)
    result = evaluate(run.model, windows, run.data.token_bytes, t.batch_size, run.device,
                      AUTOCAST_DTYPES[t.precision], part=(dp.rank(), dp.world()), reduce=dp.sum_)
    if full and is_rank0():
        result.update(xz_bits_per_byte(windows, run.data.tokenizer.token_bytes()))
    return dp.share(result)


def routing_stats(counts_LE: torch.Tensor, dropped_LE: torch.Tensor) -> dict:
    """Per-MoE-layer load balance over the log interval (see moelab.analysis.routing): coefficient
    of variation and max/mean of the expert loads, dead experts, the verdict, the share of slots
    dropped for capacity, and the counts themselves (for the routing heatmap over training steps)."""
    from moelab.analysis.routing import layer_stats

    if counts_LE.numel() == 0:
        return {}
    counts, dropped = counts_LE.tolist(), dropped_LE.tolist()
    layers = [layer_stats(c, d) for c, d in zip(counts, dropped)]
    stats = {"load_cv": [round(s["cv"], 4) for s in layers],
             "load_max_mean": [round(s["max_mean"], 3) for s in layers],
             "dead_experts": [len(s["dead"]) for s in layers], "routing_verdict": [s["verdict"] for s in layers],
             "expert_counts": counts}
    if any(s["dropped"] for s in layers):
        stats["dropped_share"] = [round(s["dropped_share"], 4) for s in layers]
    return stats


def balance_terms(m) -> dict[str, float]:
    """The balancing coefficients in use (non-zero ones), for the start-of-run line and the log."""
    terms = {"aux_loss": m.aux_loss_coef, "seq_aux_loss": m.seq_aux_loss_coef, "z_loss": m.z_loss_coef,
             "bias_update_rate": m.bias_update_rate}
    return {k: v for k, v in terms.items() if v} if m.n_experts else {}


def oom_message(run: Run, step: int) -> str:
    t = run.cfg.train
    tips = []
    if t.batch_size > 1:
        tips.append(f"train.batch_size={t.batch_size // 2} train.grad_accum={t.grad_accum * 2} "
                    "(same tokens per update)")
    if not t.activation_checkpointing:
        tips.append("train.activation_checkpointing=true")
    if t.precision == "fp32":
        tips.append("train.precision=bf16")
    return (f"out of memory at update {step} with micro-batch train.batch_size={t.batch_size} x "
            f"train.seq_len={t.seq_len} on {run.device}; try " + ", or ".join(tips or ["a smaller model"]))


def train(cfg: Config, out: str | None = None, resume: str | None = None,
          overrides: tuple[str, ...] = (), progress: bool | None = None, smoke: bool = False,
          config_given: bool = False) -> dict:
    """`config_given`: `cfg` comes from --preset/--config rather than the defaults (see
    `_resume_target`: with --resume auto they must match an existing run's saved config)."""
    if smoke and resume:  # a smoke run's 4 updates and tiny evaluations would rewrite the run's config and summary
        raise UserError("--smoke checks a config in a new run directory of its own; it does not combine with --resume")
    choice = _load_choice_tasks(cfg.train)  # a bad task file fails before any data is prepared
    joined = dp.init(resolve_device(cfg.train.device))  # under torchrun: data parallel over its processes
    try:
        if dp.active() and smoke:
            raise UserError("--smoke checks a config in one process: run it without torchrun")
        try:
            done = _already_complete(resume, out, cfg, overrides, config_given) if resume else None
        except UserError:  # a refused resume: every rank finds it, rank 0 says it (one message, not N)
            if not is_rank0():
                raise SystemExit(2) from None
            raise
        if done is not None:
            return done
        run = setup(cfg, out, resume, overrides, smoke, progress, config_given, choice)
        finished = False
        try:  # (the model is compiled, if at all, at its first call: inside, so for the path chosen here)
            with fast_fp32_matmuls(_fp32_mode(run)) as (run.fp32_path, run.fp32_speedup):
                if run.saved_fp32_path == "onednn" != run.fp32_path and run.device.type == "cpu":
                    run.notes.append("note: this run's fp32 products went through oneDNN, which "
                                     + ("train.fast_fp32_matmul=false turns off" if not cfg.train.fast_fp32_matmul
                                        else "cannot compute them exactly in fp32 on this machine")
                                     + ": from here on they use the default BLAS, so the later updates are not "
                                       "bit-identical to an uninterrupted run's (they agree to fp32 rounding)")
                summary = _train(run, progress, smoke)
            finished = True
            return summary
        finally:
            run.sinks.close(failed=not finished)  # the one place a run's sinks close: also on a failure
            run.lock.release()
    finally:
        if joined:
            dp.shutdown()


def _fp32_mode(run: Run) -> str:
    """How `fast_fp32_matmuls` picks fp32 products' path for this run: measured for a new CPU run
    whose micro-batches are large enough (`fp32_mode_for`; under torchrun, rank 0 measures for
    all); a resume takes its checkpoint's (the same kernels, so bit-identical updates) unless
    train.fast_fp32_matmul=false; else the default BLAS."""
    t = run.cfg.train
    if run.device.type != "cpu" or not t.fast_fp32_matmul:
        return "default"
    if run.saved_fp32_path is not None:
        return run.saved_fp32_path
    mode = fp32_mode_for(run.device, t.batch_size // dp.world() * t.seq_len, run.cfg.model.d_model)
    if mode == "auto" and dp.active():
        # rank 0's measurement for every rank: each timing its own (on a shared, busy machine) could
        # split them, and a resume, which takes the checkpoint's (rank 0's) path everywhere, would
        # then not repeat the other ranks' products
        mode = dp.share(measured_fp32_path() if dp.rank() == 0 else None)
    return mode


def _train(run: Run, progress: bool | None, smoke: bool) -> dict:
    cfg, t = run.cfg, run.cfg.train
    choice = run.choice
    sinks = run.sinks
    say = _printer(progress)
    faults = FaultPlan()
    n_params = run.model.num_parameters()
    say(f"run {run.run_dir} | {n_params['total'] / 1e6:.2f}M params ({n_params['active'] / 1e6:.2f}M "
        f"active) | {run.optimizer.describe()} | "
        f"{run.data.train_windows.shape[0]} train / {run.data.val_windows.shape[0]} val windows | "
        f"{run.device} {t.precision}"
        + (f" (fp32 products through oneDNN: {run.fp32_speedup:.1f}x the default BLAS here)"
           if run.fp32_path == "onednn" else "")
        + (f" | resumed at step {run.step}" if run.step else "")
        + (f" | weights from {t.init_from}" if t.init_from and not run.step else ""))
    if run.resumed_from is not None:
        say(f"resumed from {run.resumed_from}; settings changed since: "
            + (", ".join(run.changed_on_resume) or "none"))
    if run.started_new:  # right for a requeued job's first start; a mistyped --out shows here
        say(f"--resume auto: {run.run_dir} held no run, so a new one starts there (if you meant to continue "
            "a run, check --out)")
    if run.restarted:
        say(f"{run.run_dir} stopped before its first checkpoint: starting it again from update 0 with its saved "
            "config (and prepared data)")
    if run.set_aside is not None:
        say(f"rewound: the checkpoints after update {run.step} and the metrics log as it was are in {run.set_aside}")
    for note in run.notes:
        say(note)
    note = precision_note(run.device, t.precision, AUTOCAST_DTYPES[t.precision], faster="train.precision")
    if note:
        say(note)
    if (note := warmup_note(cfg)) and not smoke:  # --smoke's 4 updates are always inside the warmup
        say(note)
    if balance_terms(cfg.model):
        say("balancing: " + ", ".join(f"{k} {v:g}" for k, v in balance_terms(cfg.model).items()))
    elif cfg.model.n_experts:
        say("balancing: none; routers trained without a balancing term can collapse onto a few experts "
            "(set model.aux_loss_coef, model.seq_aux_loss_coef or model.bias_update_rate)")
    if run.step == 0:
        first = run_eval(run)
        sinks.write({"step": 0, "split": "val", **first})
        say(f"step 0 val loss {first['loss']:.4f} bpb {first['bpb']:.3f}")
    if run.eval_due:
        early_stopped = _periodic_eval(run, say)
    else:  # resumed where an evaluation was held: its patience, under the settings given now
        early_stopped = run.resumed_from is not None and run.evaluated_at == run.step < t.steps \
            and _patience_spent(run, say)
    forward = torch.compile(run.model) if t.compile else run.model
    autocast = autocast_for(run.device, t.precision)
    bar = _progress_bar(progress, run.step, t.steps)
    run.model.train()
    window = _Window(run)
    started_at = run.step
    last_saved, stopped = run.step, None
    with StopSignals() as signals:
        while run.step < t.steps and not early_stopped:
            step_no = run.step + 1
            try:
                verdict = _update(run, forward, autocast, window, faults, step_no)
            except torch.OutOfMemoryError:
                raise UserError(oom_message(run, step_no)) from None
            except RuntimeError as exc:  # the CPU allocator's out-of-memory is a plain RuntimeError
                if "can't allocate memory" not in str(exc):
                    raise
                raise UserError(oom_message(run, step_no)) from None
            window.end_first_update()
            if verdict != "ok":
                so_far = ", ".join(f"{kind} {n}" for kind, n in run.guard.skipped.items() if n)  # not a dict's repr
                _write(bar, say, f"update {step_no}: {verdict} loss/gradient, update skipped "
                                 f"(skipped so far: {so_far})")
            bar.update(1)
            if run.step % t.log_every == 0 or run.step == t.steps:
                rec = window.flush(run.step, run.optimizer)
                sinks.write(rec)
                if rec["loss"] is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if bar.disable:
                    say(_train_line(rec, t.steps))
                if note := window.collapse_note(rec):
                    _write(bar, say, note)
            if run.step % t.eval_every == 0 or run.step == t.steps:
                # the last update's too: `best` and the validation curve take in the final weights,
                # measured on the same windows as every periodic evaluation (the final evaluation
                # after the loop reads the whole split, which no earlier result can be ranked against)
                early_stopped = _periodic_eval(run, lambda m: _write(bar, say, m), last=run.step == t.steps)
                window.reset_clock()
            if choice and t.choice_every and run.step % t.choice_every == 0 and run.step < t.steps and is_rank0():
                _run_choice(run, choice, sinks, lambda m: _write(bar, say, m))
                window.reset_clock()
            requested = signals.requested
            if dp.active() and dp.any_rank(requested is not None, run.device):  # all stop at one update
                requested = requested or "stop requested on another rank"
            if requested or early_stopped or (run.step % t.save_every == 0 and run.step < t.steps):
                save(run, {"train_loss": window.last_loss}, faults=faults)
                last_saved = run.step
                window.reset_clock()
            if requested:
                stopped = requested
                break
            if early_stopped:
                break
    bar.close()
    if stopped:
        _write(bar, say, f"{stopped}: stopped after update {run.step}, checkpoint saved; continue with "
                         f"`moelab train --resume auto --out {run.run_dir}`")
        final = None
    else:
        # the last updates are saved before the final evaluation (minutes on a large validation
        # split), so a kill during it loses none; a SIGTERM or Ctrl-C meanwhile waits for it to end
        # (a second Ctrl-C stops at once)
        saved = (save(run, {"train_loss": window.last_loss}, faults=faults)
                 if last_saved != run.step or not ck.list_checkpoints(run.run_dir) else None)
        with StopSignals():
            if faults:
                faults.final_eval(run.step)
            final = _recorded_final(run) if run.step == started_at and not choice else None
            if final is None:
                final = run_eval(run, full=True)
                sinks.write({"step": run.step, "split": "val", "final": True, **final})
            if choice and is_rank0():
                final["choice"] = _run_choice(run, choice, sinks, say)
        last = saved or run.run_dir / "checkpoints" / f"{ck.CKPT_PREFIX}{run.step:07d}"
        if is_rank0() and (last / "meta.json").is_file():  # the final metrics, with the weights they measured
            ck.add_to_meta(last, {"val": final})
    if t.plot and is_rank0():
        plot_curves(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")
    summary = _summary(run, final, window, stopped, early_stopped)
    if is_rank0():
        write_atomic(run.run_dir / "summary.json", json.dumps(summary, indent=1))
    if smoke:
        summary["smoke"] = smoke_check(run, summary)
    elif t.report and not stopped and is_rank0():
        _write_report(run.run_dir, say)
    return summary


# settings a resume may change that leave the final evaluation of the same weights as it was
_FINAL_EVAL_UNCHANGED_BY = {"train.steps", "train.patience", "train.min_delta", "train.eval_every",
                            "train.eval_windows", "train.save_every", "train.log_every", "train.keep_last",
                            "train.plot", "train.report"}


def _recorded_final(run: Run) -> dict | None:
    """The final evaluation already recorded (meta.json "val") with the checkpoint of this update,
    where a resume that ran no update (an extension stopped at once by spent patience) would only
    repeat it: the same weights, data and evaluation settings. None where it must run: nothing
    recorded, or a setting that changes it (precision, final_eval_windows, batch size...) changed."""
    if any(c.split(" ", 1)[0] not in _FINAL_EVAL_UNCHANGED_BY for c in run.changed_on_resume):
        return None
    meta = run.run_dir / "checkpoints" / f"{ck.CKPT_PREFIX}{run.step:07d}" / "meta.json"
    try:
        val = json.loads(meta.read_text())["val"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(val) if isinstance(val, dict) and "loss" in val else None


def _write_report(run_dir: Path, say) -> None:
    """The run is complete and saved by now: a failing report must not fail the run."""
    from moelab.analysis.report import write_report

    try:
        written = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - reported, and `moelab report RUN` retries
        say(f"report not written ({type(exc).__name__}: {exc}); retry with `moelab report {run_dir}`")
        return
    say(f"report: {written.page}")
    if written.note:
        say(written.note)


def _update(run: Run, forward, autocast, window: "_Window", faults: FaultPlan, step_no: int) -> str:
    """One optimizer update: grad_accum micro-batches, unscale, clip, guard, step. Returns the
    guard's verdict; on anything but 'ok' the weights, optimizer state and balancing biases are
    left exactly as they were. One host sync (the guard's loss and gradient-norm check)."""
    cfg, t = run.cfg, run.cfg.train
    o = cfg.optim
    run.optimizer.set_lr_factor(lr_factor(run.step, t.steps, o.warmup, o.schedule, o.min_lr_ratio,
                                          o.decay_frac))
    sums = torch.zeros(5, dtype=torch.float64, device=run.device)  # lm, aux, seq_aux, z, total
    L, E = run.expert_counts_LE.shape
    counts_LE = torch.zeros(L, E, dtype=torch.int64, device=run.device)
    dropped_LE = torch.zeros_like(counts_LE)
    for _ in range(t.grad_accum):
        x, y = (b[run.rows].to(run.device, non_blocking=True) for b in run.loader.next_batch())
        with autocast():
            out = forward(x, targets=y)
        loss = faults.loss(step_no, out.loss) if faults else out.loss
        scaled = loss / t.grad_accum
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        sums += torch.stack([out.lm_loss.detach(), out.aux_loss.detach(), out.seq_aux_loss.detach(),
                             out.z_loss.detach(), loss.detach()]).double()
        if out.router:
            counts_LE += torch.stack([r.counts_E for r in out.router])
            dropped_LE += torch.stack([r.dropped_E for r in out.router])
    if faults:
        faults.during_update(step_no)
    if dp.active():  # as one process would have them for the whole batch
        dp.average_gradients(run.model.parameters())
        dp.sum_(sums).div_(dp.world())
        dp.sum_(counts_LE)
        dp.sum_(dropped_LE)
    if run.scaler is not None:
        for opt in run.optimizer.optimizers:
            run.scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip or math.inf)
    loss_value, norm_value = torch.stack([sums[4] / t.grad_accum, grad_norm.double()]).tolist()
    verdict = run.guard.check(step_no, loss_value, norm_value, run.scaler is not None)
    if verdict == "ok":
        run.optimizer.step(run.scaler)
        if cfg.model.bias_update_rate:  # after the update, on the whole update's counts
            update_selection_bias(run.model.routers, counts_LE, cfg.model.bias_update_rate)
        window.add_update(sums[:4] / t.grad_accum, grad_norm, counts_LE, dropped_LE)
        run.expert_counts_LE += counts_LE
    if run.scaler is not None:
        run.scaler.update()
    run.optimizer.zero_grad()
    run.step += 1
    tokens = t.batch_size * t.grad_accum * t.seq_len
    run.tokens += tokens
    window.tokens += tokens
    return verdict


def _load_choice_tasks(t, saved: bool = False) -> list:
    """(spec, (task, items)) of each train.choice_tasks task. `saved`: the settings are a resumed
    run's own, so a task file gone since is said with how to resume without it."""
    from moelab.eval.choice import load_task

    try:
        return [(spec, load_task(spec, t.choice_limit)) for spec in t.choice_tasks.split(",") if spec.strip()]
    except UserError as exc:
        if not saved:
            raise
        raise UserError(f"{exc}; this run's train.choice_tasks={t.choice_tasks} names it: put it back, or resume "
                        "with train.choice_tasks= (no tasks) or other tasks") from None


def _run_choice(run: Run, tasks: list, sinks, say) -> list[dict]:
    """Multiple-choice scores of the live model, logged as split "choice" records."""
    from moelab.eval.choice import eval_choice
    from moelab.eval.target import Target

    target = Target(run.model, run.data.tokenizer, f"step {run.step}")
    results = []
    for spec, loaded in tasks:
        r = eval_choice(target, spec, batch_size=run.cfg.train.batch_size, loaded=loaded)
        if spec in run.choice_contaminated:  # as `moelab eval --choice` records it
            r["contaminated_items"] = run.choice_contaminated[spec]
            if run.choice_unread:
                r["training_data_not_read"] = run.choice_unread
        sinks.write({"step": run.step, "split": "choice", **{k: v for k, v in r.items() if k != "model"}})
        say(f"step {run.step} {r['task']}: acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} ({r['items']} items)")
        results.append(r)
    return results


def _periodic_eval(run: Run, say, last: bool = False) -> bool:
    """The evaluation every train.eval_every updates and at the last one: logged, said, and counted
    for the best checkpoint and early stopping. True when patience ran out with updates left to
    skip (not at the `last` update: the run is complete, not stopped early)."""
    ev = run_eval(run)
    run.evaluated_at = run.step
    run.sinks.write({"step": run.step, "split": "val", **ev})
    say(f"step {run.step} val loss {ev['loss']:.4f} bpb {ev['bpb']:.3f}")
    _track_best(run, ev)
    return not last and _patience_spent(run, say)


def _track_best(run: Run, ev: dict) -> None:
    """Record a validation result; save `best` on improvement, else count a bad evaluation."""
    t, best = run.cfg.train, run.best
    if ev["loss"] < best["val_loss"] - t.min_delta:
        best.update(val_loss=ev["loss"], step=run.step, bad_evals=0)
        if t.keep_best:
            save(run, {"val": ev}, name="best")
    else:
        best["bad_evals"] += 1


def _patience_spent(run: Run, say) -> bool:
    """Whether the evaluations since the best one have used up train.patience (0: never); said."""
    t, best = run.cfg.train, run.best
    if not (t.patience > 0 and best["bad_evals"] >= t.patience):
        return False
    say(f"early stop: no validation improvement in {t.patience} evaluations "
        f"(best {best['val_loss']:.4f} at step {best['step']})")
    return True


def smoke_check(run: Run, summary: dict) -> dict:
    """After a smoke run: the newest checkpoint must reload to the same logits as the live model,
    and the model must not have diverged."""
    from moelab.train.checkpoint import load_model as load_ckpt

    ckpt = ck.list_checkpoints(run.run_dir)[-1]
    loaded = load_ckpt(ckpt, run.device)
    ids = run.data.val_windows[:2, :-1].to(run.device)
    run.model.eval()
    with torch.no_grad():
        a, b = loaded(ids).logits, run.model(ids).logits
        same = bool(((a == b) | (a.isnan() & b.isnan())).all())  # NaN is NaN again, not a reload fault
    if not same:
        raise UserError(f"smoke check failed: {ckpt} does not reload to the trained weights")
    loss = summary.get("val_loss")
    if loss is not None and not math.isfinite(loss):
        skipped = summary["skipped"].get("nonfinite", 0)
        if skipped >= run.step:  # not one finite update: the model, not the optimizer
            raise UserError(f"smoke check failed: the validation loss is {loss} and all {run.step} updates had a "
                            "non-finite loss or gradient: this model computes no finite loss; check its settings "
                            "(model.init_std, model.rope_*/yarn_* scales, model.routed_scaling)")
        raise UserError(f"smoke check failed: the validation loss is {loss} after {run.step} updates ({skipped} "
                        "skipped as non-finite): training diverged; lower the learning rates (optim.muon_lr, "
                        "optim.adamw_lr) or check the data")
    return {"checkpoint_reloads": True, "checkpoint": str(ckpt)}


def _train_line(rec: dict, total: int) -> str:
    if rec["loss"] is None:
        return f"step {rec['step']}/{total} every update of this interval was skipped"
    line = (f"step {rec['step']}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
            f"gnorm {rec['grad_norm']:.2f} {rec['tokens_per_s']:.0f} tok/s")
    if "mfu" in rec:
        line += f" mfu {rec['mfu']:.1%}"
    return line


class _Window:
    """Accumulates on-device sums of accepted updates between log points."""

    def __init__(self, run: Run):
        self.run = run
        L, E = run.expert_counts_LE.shape
        self.counts_LE = torch.zeros(L, E, dtype=torch.int64, device=run.device)
        self.dropped_LE = torch.zeros_like(self.counts_LE)
        self.sums = torch.zeros(5, dtype=torch.float64, device=run.device)  # lm, aux, seq_aux, z, gnorm
        self.steps = self.tokens = 0
        self.tokens_total, self.train_time, self.last_loss = 0, 0.0, float("nan")
        # this process's first update carries torch.compile, kernel and allocator warm-up (at exp3
        # bf16 on 2 CPU cores: ~40 s against 0.5 s updates): timed apart so it does not drag the rate
        self.first_update_s, self.first_tokens = None, 0
        self.flops_per_token = flops_per_token(run.cfg.model, run.cfg.train.seq_len,
                                               parameter_table(run.model))
        self.collapsed: set[int] = set()  # MoE layers whose collapse was said (collapse_note)
        self.peak = peak_tflops(run.device, run.cfg.train.precision, run.cfg.train.peak_tflops)
        if self.peak:  # tokens/s counts every rank's tokens: so does the peak
            self.peak *= dp.world()
        self.clock = time.perf_counter()

    def add_update(self, losses_4: torch.Tensor, grad_norm: torch.Tensor, counts_LE, dropped_LE) -> None:
        self.sums[:4] += losses_4
        self.sums[4] += grad_norm.detach().double()
        self.counts_LE += counts_LE
        self.dropped_LE += dropped_LE
        self.steps += 1

    def end_first_update(self) -> None:
        """Call after every update; times the first (the update already synced with the host)."""
        if self.first_update_s is None:
            self.first_update_s = time.perf_counter() - self.clock
            self.first_tokens = self.tokens

    def steady_tokens_per_s(self) -> float | None:
        """Training tokens/s of the logged updates after the first (of all of them if none follows)."""
        tokens, seconds = self.tokens_total, self.train_time
        if not tokens:
            return None  # no update ran in this process (a resumed run's final evaluation only)
        if self.first_update_s is not None and tokens > self.first_tokens and seconds > self.first_update_s:
            tokens, seconds = tokens - self.first_tokens, seconds - self.first_update_s
        return tokens / max(seconds, 1e-9)

    def collapse_note(self, rec: dict) -> str | None:
        """A line for the MoE layers whose routing collapsed over the interval `rec` logged (see
        moelab.analysis.routing), each said once: a run can go on for hours with most experts idle
        while its loss still falls."""
        from moelab.analysis.routing import collapsed_layers_sentence

        names = self.run.cfg.model.moe_layers
        new = [n for n, v in zip(names, rec.get("routing_verdict") or [])
               if n not in self.collapsed and v == "collapse"]
        if not new:
            return None
        self.collapsed.update(new)
        return "note: " + collapsed_layers_sentence(new, f"`moelab routing {self.run.run_dir}` (expert_counts in "
                                                         "metrics.jsonl)", f" by update {rec['step']}")

    def reset_clock(self) -> None:  # exclude eval and checkpoint time from tokens/s
        self.clock = time.perf_counter()

    def flush(self, step: int, optimizer: HybridOptimizer) -> dict:
        s = self.sums.tolist()  # the one host sync of the interval
        elapsed = max(time.perf_counter() - self.clock, 1e-9)
        self.train_time += elapsed
        self.tokens_total += self.tokens
        lrs = [g["lr"] for opt in optimizer.optimizers for g in opt.param_groups]
        m, n = self.run.cfg.model, max(self.steps, 1)
        rec = {"step": step, "split": "train", "loss": s[0] / n if self.steps else None}
        for i, name in enumerate(("aux_loss", "seq_aux_loss", "z_loss"), start=1):
            if self.steps and (name == "aux_loss" and m.n_experts or name in balance_terms(m)):
                rec[name] = s[i] / n
        tok_s = self.tokens / elapsed
        rec.update({"grad_norm": s[4] / n if self.steps else None, "lr": lrs[0], "tokens_per_s": tok_s,
                    "tokens": self.run.tokens, "tflops": tok_s * self.flops_per_token / 1e12})
        if self.peak:
            rec["mfu"] = rec["tflops"] / self.peak
        rec["peak_mem_gb"] = round(peak_memory_gb(self.run.device), 3)
        skipped = self.run.guard.skipped
        rec.update({f"skipped_{k}": v for k, v in skipped.items() if v})
        rec["skipped_total"] = skipped["nonfinite"] + skipped["spike"]
        if self.run.scaler is not None:
            rec["loss_scale"] = self.run.scaler.get_scale()
        rec.update(routing_stats(self.counts_LE, self.dropped_LE))
        if rec["loss"] is not None:
            self.last_loss = rec["loss"]
        self.sums.zero_()
        self.counts_LE.zero_()
        self.dropped_LE.zero_()
        self.steps = self.tokens = 0
        self.reset_clock()
        return rec


def _summary(run: Run, final: dict | None, window: _Window, stopped: str | None, early: bool) -> dict:
    s = {"run_dir": str(run.run_dir), "steps": run.step, "tokens": run.tokens,
         "train_tokens_per_s": window.steady_tokens_per_s(), "first_update_s": window.first_update_s,
         "skipped": dict(run.guard.skipped), "stopped": stopped, "early_stopped": early,
         "best": dict(run.best), "expert_counts": run.expert_counts_LE.tolist(),
         "params": run.model.num_parameters()}
    if final is not None:
        s.update(val_loss=final["loss"], val_ppl=final["ppl"], val_acc=final["acc"], val_bpb=final["bpb"],
                 val_xz_bpb=final["xz_bpb"], choice=final.get("choice", []))
    return s


def _printer(progress: bool | None):
    quiet = progress is False or not is_rank0()
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def _write(bar, say, msg: str) -> None:
    if bar.disable:
        say(msg)
    else:
        bar.write(msg, file=sys.stderr)


def _progress_bar(progress: bool | None, start: int, total: int):
    from tqdm import tqdm

    # progress=None: a bar on a terminal, plain log lines otherwise (CI, pipes).
    disable = ((not sys.stderr.isatty()) if progress is None else not progress) or not is_rank0()
    return tqdm(total=total, initial=start, disable=disable, unit="step", dynamic_ncols=True,
                file=sys.stderr)
