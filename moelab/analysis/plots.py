"""Routing heatmaps (PNG, matplotlib Agg): load share per layer x expert for each split, load share
over training steps (or checkpoints) per layer, and expert co-activation.

Colour is the expert's share of its layer's slots divided by the uniform share 1/E, on a log scale
centred at 1, so balanced is white, overloaded red and starved blue whatever E is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _relative_load(m: np.ndarray) -> np.ndarray:
    total = m.sum(axis=1, keepdims=True)
    rel = np.divide(m * m.shape[1], total, out=np.zeros_like(m, dtype=np.float64), where=total > 0)
    return np.clip(rel, 1 / 16, 16)


def _norm():
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=1 / 16, vmax=16)


def plot_layers(data, analysis: dict, out: Path) -> Path:
    """One panel per split: layers (rows, labelled with their verdict) x experts."""
    plt = _plt()
    splits = list(data.splits)
    L, E = len(data.layers), data.n_experts
    fig, axes = plt.subplots(1, len(splits), figsize=(min(3 + 0.5 * E, 16) * len(splits), 1.6 + 0.45 * L),
                             squeeze=False, constrained_layout=True)
    im = None
    for ax, split in zip(axes[0], splits):
        rel = _relative_load(data.splits[split])
        im = ax.imshow(rel, cmap="RdBu_r", norm=_norm(), aspect="auto")
        if L * E <= 256:
            for i in range(L):
                for j in range(E):
                    ax.text(j, i, f"{rel[i, j]:.2f}", ha="center", va="center", fontsize=7)
        verdicts = [s["verdict"] for s in analysis["splits"][split]]
        ax.set_yticks(range(L), [f"layer {n}\n{v}" for n, v in zip(data.layers, verdicts)], fontsize=8)
        ax.set_xticks(range(E) if E <= 32 else range(0, E, max(E // 16, 1)))
        ax.set(title=f"{split}: load / uniform share", xlabel="expert")
    fig.colorbar(im, ax=axes[0].tolist(), label="share x E (1 = balanced)")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_series(series: dict[int, np.ndarray], layers: list[str], out: Path, what: str) -> Path | None:
    """One panel per layer: steps (rows) x experts, relative load. `what`: 'training step' or
    'checkpoint'."""
    if len(series) < 2:
        return None
    plt = _plt()
    steps = sorted(series)
    stack = np.stack([series[s] for s in steps])  # (steps, L, E)
    L = stack.shape[1]
    cols = min(L, 4)
    rows = (L + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 0.6 + 2.8 * rows), squeeze=False,
                             constrained_layout=True)
    im = None
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= L:
            ax.axis("off")
            continue
        im = ax.imshow(_relative_load(stack[:, k, :]), cmap="RdBu_r", norm=_norm(), aspect="auto",
                       interpolation="nearest")
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int)
        ax.set_yticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
        ax.set(title=f"layer {layers[k]}", xlabel="expert", ylabel=what)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share x E (1 = balanced)")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_coactivation(analysis: dict, split: str, out: Path) -> Path | None:
    co = analysis.get("coactivation", {}).get(split)
    if not co:
        return None
    plt = _plt()
    L = len(co)
    cols = min(L, 4)
    rows = (L + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 0.4 + 3.2 * rows), squeeze=False,
                             constrained_layout=True)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= L:
            ax.axis("off")
            continue
        m = np.array(co[k]["matrix"])
        np.fill_diagonal(m, np.nan)
        im = ax.imshow(m, cmap="viridis")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set(title=f"layer {analysis['layers'][k]}: tokens on both", xlabel="expert", ylabel="expert")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_all(data, analysis: dict, out_dir: Path) -> dict[str, str]:
    """Every applicable heatmap into out_dir; returns {kind: file name}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {"layers": plot_layers(data, analysis, out_dir / "routing_layers.png")}
    made["steps"] = plot_series(data.steps, data.layers, out_dir / "routing_steps.png", "training step")
    made["checkpoints"] = plot_series(data.checkpoints, data.layers, out_dir / "routing_checkpoints.png",
                                      "checkpoint")
    split = "val" if "val" in analysis.get("coactivation", {}) else next(iter(analysis.get("coactivation", {})), None)
    made["coactivation"] = plot_coactivation(analysis, split, out_dir / "routing_coactivation.png") if split else None
    return {k: v.name for k, v in made.items() if v is not None}
