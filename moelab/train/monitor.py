"""What a run reports: the metrics sinks (metrics.jsonl always; TensorBoard and Weights & Biases
when asked), FLOPs and MFU, peak memory, and the training-curves PNG.

Only rank 0 writes (RANK from torchrun; a single process is rank 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from moelab.errors import UserError
from moelab.train.rundir import MetricsLog, read_metrics

# Dense bf16 peak TFLOP/s of common accelerators (vendor datasheets, without sparsity).
PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0,
                    "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0, "MI300X": 1307.0}


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def flops_per_token(cfg, seq_len: int, rows: dict) -> float:
    """Training FLOPs per token: 6 x active matmul parameters (forward 2, backward 4; the embedding
    lookup and the norms are not matmuls, the output head is) + causal attention scores and values,
    6 x n_layers x n_heads x (qk_dim + v_dim) x seq_len / 2. `rows`: accounting.parameter_table."""
    m = cfg
    if m.attention == "mla":
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    else:
        qk = v = m.head_dim
    head_params = 0 if not m.tie_embeddings else m.vocab_size * m.d_model  # tied: counted as embedding
    matmul = rows["total"]["active"] - rows["embedding"]["active"] - rows["norms"]["active"] + head_params
    return 6.0 * matmul + 6.0 * m.n_layers * m.n_heads * (qk + v) * seq_len / 2


def throughput_text(summary: dict) -> str:
    """'N train tok/s', plus the first update's time where it stands out (compile, warm-up), as
    the rate leaves it out."""
    rate, first = summary.get("train_tokens_per_s", float("nan")), summary.get("first_update_s")
    if rate is None:
        return "no training updates in this process"
    text = f"{rate:.0f} train tok/s"
    steps = summary.get("steps") or 0
    if first and steps > 1 and rate > 0:
        update_s = summary["tokens"] / steps / rate
        if first > max(3 * update_s, 0.5):  # under half a second is no wait worth naming
            text += f" after a {first:.1f} s first update (warm-up, not in the rate)"
    return text


def peak_tflops(device: torch.device, precision: str, override: float = 0.0) -> float | None:
    """Peak TFLOP/s for MFU: train.peak_tflops if set, else the datasheet figure of a known GPU
    (fp32 without tensor cores is not tabulated). None when unknown (CPU)."""
    if override > 0:
        return override
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS_BF16.items():
        if key in name:
            return value
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 2**20 if sys.platform != "darwin" else kb / 2**30
    except ImportError:  # Windows
        return 0.0


class Sinks:
    """metrics.jsonl plus the optional TensorBoard / W&B writers. On resume, records after the
    resumed update are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, keep_until_step: int, tensorboard: bool, wandb_project: str,
                 config: dict):
        self.rank0 = is_rank0()
        self.jsonl = self.tb = self.wandb = None
        if not self.rank0:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard=true needs the tensorboard package: "
                                "pip install 'moelab[tensorboard]'") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=keep_until_step + 1)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError("train.wandb=PROJECT needs the wandb package: pip install 'moelab[wandb]'") from None
            try:
                self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config,
                                        name=run_dir.name, resume="allow", id=_wandb_id(run_dir))
            except Exception as exc:  # noqa: BLE001 - no API key, no network, a bad project name, ...
                if self.tb is not None:
                    self.tb.close()
                detail = str(exc).splitlines()[0][:160] if str(exc) else ""
                raise UserError(f"train.wandb={wandb_project}: W&B could not start ({type(exc).__name__}: "
                                f"{detail}); run `wandb login`, set WANDB_MODE=offline to log locally, "
                                "or leave train.wandb empty") from None
        # last: on resume this drops the records after the resumed update, once nothing else can fail
        try:
            self.jsonl = MetricsLog(run_dir / "metrics.jsonl", keep_until_step)
        except BaseException:
            self.close(failed=True)
            raise

    def write(self, record: dict) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(record)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        lists = {k: v for k, v in record.items()  # per-layer scalars (not the per-expert counts)
                 if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)}
        # the final evaluation (whole split) apart from the periodic curve (train.eval_windows)
        prefix = record.get("split", "train") + ("_final" if record.get("final") else "")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])
            for k, values in lists.items():
                for i, v in enumerate(values):
                    self.tb.add_scalar(f"routing/{k}/moe{i}", v, record["step"])
            self.tb.flush()  # on disk at each record, as metrics.jsonl: a kill loses none of them
        if self.wandb is not None:
            flat = {f"{prefix}/{k}": v for k, v in scalars.items()}
            flat.update({f"routing/{k}/moe{i}": v for k, values in lists.items() for i, v in enumerate(values)})
            self.wandb.log(flat, step=record["step"])

    def close(self, failed: bool = False) -> None:
        """Flush and close each sink; a second call does nothing. Also when the run fails (set-up
        after the sinks opened, an update that raises): TensorBoard's writer buffers its events (up
        to 2 minutes) in a thread that dies with the process, so unclosed it lost the updates before
        the failure, the ones a diverging run is read for. `failed`: W&B marks the run failed
        (exit code 1) instead of finished."""
        jsonl, tb, run = self.jsonl, self.tb, self.wandb
        self.jsonl = self.tb = self.wandb = None
        if jsonl is not None:
            jsonl.close()
        if tb is not None:
            tb.close()
        if run is not None:
            run.finish(exit_code=1 if failed else 0)


def _wandb_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_id.txt"
    if not path.is_file():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Training curves from metrics.jsonl: train and validation loss, LR, gradient norm, tokens/s
    and skipped updates, written as one PNG. Returns None when there is nothing to plot."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    periodic = [r for r in val if not r.get("final")]  # all on the same windows (train.eval_windows)
    if periodic:
        ax.plot([r["step"] for r in periodic], [r["loss"] for r in periodic], "o-", label="validation", ms=3)
    final = [r for r in val if r.get("final")]  # the whole split: not points of the same curve
    if final:
        ax.plot([r["step"] for r in final], [r["loss"] for r in final], "k*", ms=9, ls="none",
                label="final evaluation (whole validation split)")
    ax.set(title="loss (nats/token)", xlabel="update")
    ax.legend()
    for ax, key, title in ((axes[0][1], "lr", "learning rate (first group)"),
                           (axes[1][0], "grad_norm", "gradient norm (before clipping)"),
                           (axes[1][1], "tokens_per_s", "training tokens/s")):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        ax.set(title=title, xlabel="update")
    skips = [(r["step"], r.get("skipped_total", 0)) for r in train]
    if any(s for _, s in skips):
        axes[1][0].twinx().step(*zip(*skips), color="red", where="post", lw=0.8, label="skipped updates")
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
