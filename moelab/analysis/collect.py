"""Expert token counts for the routing analysis: read from a counts file written by any system, or
measured by running a moelab model on its training and validation windows.

Counts files:
  JSON  a list of layers, each a list of per-expert counts; or an object whose keys are split names
        ("train", "val", ...) mapping to such lists, with optional "steps" ({step: layers x experts},
        training counts over time), "dropped" ({split: layers x experts}), "top_k" and "layers" (names).
  CSV   a header, then one row per (step, split, layer): optional columns `step`, `split`, `layer`,
        then one column per expert. Rows of one split and layer are summed over steps; the steps
        (of the train split, or the only split) form the over-time series.
Ragged input (a layer or row with another number of experts) is refused, naming the row.

Legend: L layers, E experts, T tokens, K experts per token.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moelab.errors import UserError

META = ("step", "split", "layer")


@dataclass
class RoutingData:
    source: str
    layers: list[str]
    n_experts: int
    top_k: int = 0  # 0: unknown
    splits: dict[str, np.ndarray] = field(default_factory=dict)  # split -> (L, E) slots per expert
    dropped: dict[str, np.ndarray] = field(default_factory=dict)  # split -> (L, E) dropped slots
    steps: dict[int, np.ndarray] = field(default_factory=dict)  # training step -> (L, E)
    checkpoints: dict[int, np.ndarray] = field(default_factory=dict)  # checkpoint step -> (L, E) on val
    coactivation: dict[str, list[np.ndarray]] = field(default_factory=dict)  # split -> L x (E, E)
    tokens: dict[str, int] = field(default_factory=dict)
    run_dir: Path | None = None  # the run measured (None for a counts file)


def _matrix(rows, what: str) -> np.ndarray:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise UserError(f"{what}: expected a list of layers, each a list of per-expert counts")
    width = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise UserError(f"{what}: layer {i} has {len(r)} expert counts, layer 0 has {width}; "
                            "every layer needs one count per expert")
    try:
        m = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{what}: counts must be numbers") from None
    if width < 2 or (m < 0).any() or not np.isfinite(m).all():
        raise UserError(f"{what}: need at least 2 experts and finite counts >= 0")
    return m


def _from_json(path: Path) -> RoutingData:
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if isinstance(obj, list):
        obj = {"data": obj}
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a list of layers or an object of splits")
    splits = {k: _matrix(v, f"{path} [{k}]") for k, v in obj.items()
              if k not in ("steps", "dropped", "top_k", "layers")}
    if not splits:
        raise UserError(f"{path} holds no split counts (keys such as 'train' and 'val')")
    shape = next(iter(splits.values())).shape
    steps = {int(k): _matrix(v, f"{path} [steps][{k}]") for k, v in (obj.get("steps") or {}).items()}
    dropped = {k: _matrix(v, f"{path} [dropped][{k}]") for k, v in (obj.get("dropped") or {}).items()}
    for name, m in [*splits.items(), *((f"step {k}", v) for k, v in steps.items()), *dropped.items()]:
        if m.shape != shape:
            raise UserError(f"{path}: '{name}' has {m.shape[0]} layers x {m.shape[1]} experts, "
                            f"expected {shape[0]} x {shape[1]}")
    layers = [str(x) for x in obj.get("layers") or range(shape[0])]
    if len(layers) != shape[0]:
        raise UserError(f"{path}: {len(layers)} layer names for {shape[0]} layers")
    return RoutingData(str(path), layers, shape[1], int(obj.get("top_k") or 0), splits, dropped, steps)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _from_csv(path: Path) -> RoutingData:
    # utf-8-sig: a spreadsheet's byte-order mark would otherwise turn the first header into an expert column
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise UserError(f"{path}: need a header row and at least one row of counts")
    header = [h.strip().lower() for h in rows[0]]
    if all(_is_number(h) for h in header):  # read as names, its counts would drop out of the analysis
        raise UserError(f"{path}: the first row holds numbers, not column names; add a header row naming the "
                        f"expert columns (and any of {', '.join(META)})")
    meta = {h: i for i, h in enumerate(header) if h in META}
    experts = [i for i, h in enumerate(header) if h not in META]
    if len(experts) < 2:
        raise UserError(f"{path}: need at least 2 expert columns besides {', '.join(META)}")
    acc: dict[tuple[str, str], np.ndarray] = {}
    by_step: dict[tuple[int, str, str], np.ndarray] = {}
    for n, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise UserError(f"{path} row {n} has {len(r)} fields, the header has {len(header)}; every row "
                            "needs one count per expert column")
        try:
            counts = np.array([float(r[i]) for i in experts])
            step = int(float(r[meta["step"]])) if "step" in meta else None
        except ValueError:
            raise UserError(f"{path} row {n}: counts (and step) must be numbers") from None
        if (counts < 0).any() or not np.isfinite(counts).all():
            raise UserError(f"{path} row {n}: counts must be finite and >= 0")
        split = r[meta["split"]].strip() if "split" in meta else "data"
        layer = r[meta["layer"]].strip() if "layer" in meta else "0"
        acc[(split, layer)] = acc.get((split, layer), 0) + counts
        if step is not None:
            by_step[(step, split, layer)] = by_step.get((step, split, layer), 0) + counts
    layers = list(dict.fromkeys(layer for _, layer in acc))
    splits = {}
    for split in dict.fromkeys(s for s, _ in acc):
        missing = [la for la in layers if (split, la) not in acc]
        if missing:
            raise UserError(f"{path}: split '{split}' has no rows for layer(s) {', '.join(missing)}")
        splits[split] = np.stack([acc[(split, la)] for la in layers])
    series_split = "train" if "train" in splits else next(iter(splits))
    steps = {}
    for step in sorted({s for s, sp, _ in by_step if sp == series_split}):
        if all((step, series_split, la) in by_step for la in layers):
            steps[step] = np.stack([by_step[(step, series_split, la)] for la in layers])
    return RoutingData(str(path), layers, len(experts), 0, splits, {}, steps)


def read_counts(path: str) -> RoutingData:
    p = Path(path).expanduser()
    if p.suffix.lower() == ".json":
        return _from_json(p)
    if p.suffix.lower() in (".csv", ".tsv"):
        return _from_csv(p)
    raise UserError(f"{path}: a counts file must be .json, .csv or .tsv")


@torch.no_grad()
def measure(model, windows, batch_size: int = 8) -> dict:
    """Run `model` (eval mode, its capacity as configured) over windows' inputs; per MoE layer:
    slots per expert, dropped slots, and the (E, E) co-activation counts (tokens routed to both
    i and j; the diagonal is tokens routed to i)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts = dropped = pairs = None
    tokens = 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size][:, :-1].to(device)
        routers = model(x, logits=False).router  # no (B, S, V) logits: only the routing is used
        E = model.cfg.n_experts
        c = torch.stack([r.counts_E for r in routers])
        d = torch.stack([r.dropped_E for r in routers])
        hot_LTE = torch.stack([torch.zeros(r.idx_TK.shape[0], E, device=device).scatter_(1, r.idx_TK, 1.0)
                               for r in routers])
        p = hot_LTE.transpose(1, 2) @ hot_LTE
        counts, dropped, pairs = (c, d, p) if counts is None else (counts + c, dropped + d, pairs + p)
        tokens += x.numel()
    model.train(was_training)
    return {"counts": counts.cpu().numpy().astype(np.float64), "dropped": dropped.cpu().numpy().astype(np.float64),
            "pairs": pairs.cpu().numpy(), "tokens": tokens}


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def from_run(target, n_windows: int = 64, batch_size: int = 8, max_checkpoints: int = 8,
             data: str | None = None, source: str | None = None, text_field: str | None = None) -> RoutingData:
    """Measure a run's model on evenly spaced train and validation windows (of the run's data, or of
    prepared `data`), or on the windows of raw text `source` (one split, "source"); a run's
    checkpoints on the same windows; and the training counts logged in its metrics.jsonl (over steps).
    A Hugging Face model has no data, checkpoints or metrics of its own: it needs `data` or `source`."""
    from moelab.eval.language import eval_windows_for, no_hf_data
    from moelab.eval.metrics import spread_windows
    from moelab.train.checkpoint import list_checkpoints, load_model

    model = target.model
    if not model.cfg.moe_layers:  # n_experts=0, or every layer dense (first_k_dense)
        raise UserError(f"{target.label} is a dense model: there is no routing to analyse")
    seq_len = target.cfg.train.seq_len if target.cfg else min(model.cfg.max_seq_len, 512)
    layers = [str(i) for i in model.cfg.moe_layers]
    out = RoutingData(target.label, layers, model.cfg.n_experts, model.cfg.top_k, run_dir=target.run_dir)
    if target.run_dir is None and not (data or source):
        no_hf_data()
    val = None
    for split in ("source",) if source is not None else ("train", "val"):
        windows = spread_windows(eval_windows_for(target, split if split != "source" else "val", data, source,
                                                  seq_len, text_field)[0], n_windows)
        m = measure(model, windows, batch_size)
        out.splits[split], out.tokens[split] = m["counts"], m["tokens"]
        if m["dropped"].any():
            out.dropped[split] = m["dropped"]
        if model.cfg.top_k > 1:
            out.coactivation[split] = list(m["pairs"])
        val = windows
    if target.run_dir is not None:
        device = next(model.parameters()).device
        for ckpt in _spread(list_checkpoints(target.run_dir), max_checkpoints):
            step = int(ckpt.name.split("_")[-1])
            out.checkpoints[step] = measure(load_model(ckpt, device, model.embed.weight.dtype), val,
                                            batch_size)["counts"]  # held in the target's dtype
        out.steps = logged_counts(target.run_dir / "metrics.jsonl", len(layers), out.n_experts)
    return out


def logged_counts(metrics: Path, L: int, E: int) -> dict[int, np.ndarray]:
    """Training expert counts per log interval, from metrics.jsonl (`expert_counts`)."""
    from moelab.train.rundir import read_metrics

    out = {}
    if metrics.is_file():
        for rec in read_metrics(metrics):
            c = rec.get("expert_counts")
            if rec.get("split") == "train" and c and len(c) == L and all(len(r) == E for r in c):
                out[int(rec["step"])] = np.array(c, dtype=np.float64)
    return out


def load_routing(target_path: str, n_windows: int = 64, batch_size: int = 8, device: str = "cpu",
                 data: str | None = None, source: str | None = None, text_field: str | None = None,
                 dtype=None) -> RoutingData:
    """Routing counts of a counts file, or measured on a run or Hugging Face model (`from_run`),
    its weights held in `dtype` (load_model: fp32 by default)."""
    p = Path(target_path).expanduser()
    if p.is_file():
        if data or source is not None:
            raise UserError("--data/--source measure a model; a counts file is read as it is")
        return read_counts(str(p))
    from moelab.eval.language import check_own_data
    from moelab.eval.target import load_target

    if not (data or source):  # said before loading what may be gigabytes of weights
        check_own_data(p)
    return from_run(load_target(target_path, device, dtype), n_windows, batch_size, data=data, source=source,
                    text_field=text_field)

