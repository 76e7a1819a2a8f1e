"""Routing statistics and verdicts from per-layer expert token counts.

Every statistic is over the slots routed to each expert (a token routed to k experts fills k slots):
  share        slots of the expert / all slots of the layer
  cv           coefficient of variation: population standard deviation of the counts / their mean
  max_min      largest count / smallest (inf when an expert got nothing)
  max_mean     largest count / mean (the overload of the busiest expert; E / K at the worst)
  entropy      Shannon entropy of the shares / ln E (1 = uniform, 0 = one expert takes all)
  gini         Gini coefficient of the counts (0 = equal, (E-1)/E = one expert takes all)
  dead         experts with no slot; starved: fewer than STARVED x the mean but not dead
  dropped      slots dropped for lack of capacity, and their share
  noise_cv     the CV a perfectly balanced router shows from sampling alone with this many slots,
               sqrt((E-1)/N): a CV near it says nothing about imbalance
Drift between two count vectors (train vs validation, one checkpoint vs the next) is the
Jensen-Shannon divergence of their shares in bits (0 = same distribution, 1 = disjoint).

Legend: L layers, E experts.
"""

from __future__ import annotations

import math

import numpy as np

STARVED = 0.1
# (verdict, rule), most severe first (the worst layer is the first in this order); the rules are
# printed with every analysis. A layer that routed nothing is judged "no tokens" before the rest.
THRESHOLDS = {
    "collapse": "normalised entropy < 0.5, or at least half the experts dead or starved",
    "high imbalance": "any dead expert, or CV > 0.30, or max/min > 3",
    "moderate": "CV > 0.10 or max/min > 1.5",
    "balanced": "otherwise (CV <= 0.10 and max/min <= 1.5, no dead expert)",
    "no tokens": "the layer routed nothing (all counts 0): nothing to judge",
}


def verdict(s: dict) -> str:
    n = len(s["counts"])
    if not s["slots"]:  # not "collapse": every expert is dead only because nothing was counted
        return "no tokens"
    if s["entropy"] < 0.5 or len(s["dead"]) + len(s["starved"]) >= n / 2:
        return "collapse"
    if s["dead"] or s["cv"] > 0.30 or s["max_min"] > 3:
        return "high imbalance"
    if s["cv"] > 0.10 or s["max_min"] > 1.5:
        return "moderate"
    return "balanced"


def gini(counts: np.ndarray) -> float:
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.size, x.sum()
    if total == 0:
        return 0.0
    return float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * total))


def js_divergence(a: np.ndarray, b: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits) between the distributions proportional to a and b."""
    p, q = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x, y):
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / y[nz])).sum())

    return max(0.0, (kl(p, m) + kl(q, m)) / 2)


def layer_stats(counts_E, dropped_E=None) -> dict:
    c = np.asarray(counts_E, dtype=np.float64)
    E, total = c.size, c.sum()
    mean = total / E
    share = c / total if total else np.zeros(E)
    nz = share[share > 0]
    whole = bool(np.all(c == np.round(c)))  # a counts file may hold shares or averages: kept as they are
    s = {"counts": [int(v) for v in c] if whole else [round(float(v), 6) for v in c],
         "slots": int(total) if whole else round(float(total), 6), "share": [round(float(v), 6) for v in share],
         "cv": float(c.std() / mean) if mean else float("nan"),
         "max_min": float(c.max() / c.min()) if c.min() > 0 else float("inf"),
         "max_mean": float(c.max() / mean) if mean else float("nan"),
         "entropy": float(-(nz * np.log(nz)).sum() / math.log(E)) if E > 1 and total else float("nan"),
         "gini": gini(c),
         "dead": [int(i) for i in np.flatnonzero(c == 0)],
         "starved": [int(i) for i in np.flatnonzero((c > 0) & (c < STARVED * mean))],
         "noise_cv": math.sqrt((E - 1) / total) if total else float("nan")}
    if dropped_E is not None:
        d = float(np.asarray(dropped_E, dtype=np.float64).sum())
        s["dropped"], s["dropped_share"] = int(d), d / total if total else 0.0
    s["verdict"] = verdict(s)
    return s


def coactivation(pairs_EE: np.ndarray, tokens: int) -> dict:
    """How often two experts serve the same token (top-k > 1): the share of tokens routed to both,
    and the lift over independent choices (share / (share_i * share_j)), with the top pairs."""
    C = np.asarray(pairs_EE, dtype=np.float64)
    E = C.shape[0]
    per_expert = np.diag(C) / max(tokens, 1)  # share of tokens routed to each expert
    share = C / max(tokens, 1)
    iu = np.triu_indices(E, 1)
    expected = np.outer(per_expert, per_expert)
    lift = np.divide(share, expected, out=np.zeros_like(share), where=expected > 0)
    order = np.argsort(-share[iu])[:5]
    return {"matrix": [[round(float(v), 6) for v in row] for row in share],
            "top_pairs": [{"experts": [int(iu[0][i]), int(iu[1][i])], "share": round(float(share[iu][i]), 6),
                           "lift": round(float(lift[iu][i]), 3)} for i in order]}


def analyze(data) -> dict:
    """Statistics and verdicts per split and layer, train/validation drift, drift over steps and
    checkpoints, co-activation. `data` is a RoutingData."""
    out = {"thresholds": THRESHOLDS, "starved_below_mean_x": STARVED, "layers": data.layers,
           "n_experts": data.n_experts, "top_k": data.top_k, "source": data.source, "splits": {}}
    for split, counts_LE in data.splits.items():
        dropped = data.dropped.get(split)
        out["splits"][split] = [layer_stats(counts_LE[i], None if dropped is None else dropped[i])
                                for i in range(len(data.layers))]
    names = list(data.splits)
    if "train" in data.splits and "val" in data.splits:
        out["train_val_js"] = [js_divergence(a, b) for a, b in zip(data.splits["train"], data.splits["val"])]
    for kind, series in (("steps", data.steps), ("checkpoints", data.checkpoints)):
        if len(series) > 1:
            keys = sorted(series)
            out[f"{kind}_js"] = {str(b): [js_divergence(x, y) for x, y in zip(series[a], series[b])]
                                 for a, b in zip(keys, keys[1:])}
            out[f"{kind}_verdicts"] = {str(k): [verdict(layer_stats(c)) for c in series[k]] for k in keys}
    if data.coactivation:
        out["coactivation"] = {split: [coactivation(m, data.tokens[split]) for m in mats]
                               for split, mats in data.coactivation.items()}
    out["worst"] = _worst(out, names)
    return out


def collapse_note(a: dict, where: str) -> str | None:
    """A sentence naming the layers whose routing collapsed in any measured split of analysis `a`,
    pointing to `where`; None where none did."""
    layers = [n for i, n in enumerate(a["layers"]) if any(s[i]["verdict"] == "collapse" for s in a["splits"].values())]
    return collapsed_layers_sentence(layers, where) if layers else None


def collapsed_layers_sentence(layers: list, where: str, when: str = "") -> str:
    """The routing of these MoE layers collapsed (`when`: e.g. " by update 40"): the failure a
    balancing term exists to prevent, and easy to miss in a loss curve, which goes on falling."""
    return (f"the routing of MoE layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))} collapsed{when} "
            f"({THRESHOLDS['collapse']}): most tokens go to few experts; see {where}")


def _worst(out: dict, names: list[str]) -> str:
    order = list(THRESHOLDS)  # most severe first
    verdicts = [s["verdict"] for n in names for s in out["splits"][n]]
    return min(verdicts, key=order.index) if verdicts else "n/a"


def _fmt(v: float, digits: int = 3) -> str:
    return "inf" if v == float("inf") else ("n/a" if v != v else f"{v:.{digits}f}")


def format_analysis(a: dict) -> str:
    lines = [f"routing: {a['source']} | {a['n_experts']} experts"
             + (f", top-{a['top_k']}" if a.get("top_k") else "") + f" | worst layer: {a['worst']}"]
    head = f"{'split':<6} {'layer':>5} {'slots':>9} {'CV':>7} {'max/min':>8} {'max/mean':>8} {'entropy':>7} " \
           f"{'gini':>6} {'dead':>5} {'starved':>7} {'dropped':>8}  verdict"
    lines.append(head)
    for split, layers in a["splits"].items():
        for name, s in zip(a["layers"], layers):
            dropped = f"{s['dropped_share']:.1%}" if "dropped" in s else "-"
            noisy = " (CV within sampling noise)" if s["cv"] <= 2 * s["noise_cv"] and s["verdict"] != "balanced" else ""
            lines.append(f"{split:<6} {name:>5} {s['slots']:>9,} {_fmt(s['cv']):>7} {_fmt(s['max_min'], 2):>8} "
                         f"{_fmt(s['max_mean'], 2):>8} {_fmt(s['entropy']):>7} {_fmt(s['gini']):>6} "
                         f"{len(s['dead']):>5} {len(s['starved']):>7} {dropped:>8}  {s['verdict']}{noisy}")
    if "train_val_js" in a:
        lines.append("train vs val drift (Jensen-Shannon, bits): "
                     + ", ".join(f"layer {n} {_fmt(v, 4)}" for n, v in zip(a["layers"], a["train_val_js"])))
    if "checkpoints_js" in a:
        steps = list(a["checkpoints_verdicts"])  # every checkpoint's step; the JS keys are the later ones
        lines.append("drift between checkpoints (JS bits, per layer): " + "; ".join(
            f"step {before}->{k}: " + " ".join(_fmt(v, 4) for v in vals)
            for before, (k, vals) in zip(steps, a["checkpoints_js"].items())))
    for split, layers in a.get("coactivation", {}).items():
        for name, c in zip(a["layers"], layers):
            pairs = ", ".join(f"{p['experts'][0]}+{p['experts'][1]} {p['share']:.1%} (lift {p['lift']:.2f})"
                              for p in c["top_pairs"][:3])
            lines.append(f"co-activation {split} layer {name}: {pairs}")
    lines.append("CV = population standard deviation / mean of the slots per expert. Verdicts: "
                 + "; ".join(f"{k}: {v}" for k, v in THRESHOLDS.items()))
    return "\n".join(lines)
