"""Run reports: RUN/report.md and a self-contained RUN/report.html (images inlined as base64 PNG,
no external file, script or stylesheet), written at the end of `moelab train` and by
`moelab report RUN`.

Sections: how to reproduce (command, working directory, git SHA, versions), configuration summary,
parameter table (total and active per token), training curves, final validation metrics beside
xz -9 on the same bytes, routing (table, verdicts, heatmaps), sample generations.
Both files are rendered from one list of blocks, so they always say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shlex
from pathlib import Path
from typing import NamedTuple

from moelab.errors import UserError

# blocks: ("h2", text) ("p", text) ("table", header, rows) ("img", file name, caption) ("pre", text)
# ("details", summary, text)


def versus_xz(bpb: float, xz_bpb: float) -> str:
    """' (23% fewer bits than xz)', ' (73% more bits than xz)', or '' when either is unknown."""
    if not (math.isfinite(bpb) and math.isfinite(xz_bpb) and xz_bpb > 0):
        return ""
    change = bpb / xz_bpb - 1
    if round(change, 2) == 0:
        return " (as many bits as xz)"
    return f" ({abs(change):.0%} {'fewer' if change < 0 else 'more'} bits than xz)"


def _command(run: dict) -> str:
    argv = list(run.get("command") or [])
    if not argv:
        return "(not recorded)"
    cmd = "moelab " + shlex.join(argv[1:])
    return f"cd {shlex.quote(run['cwd'])} && {cmd}" if run.get("cwd") else cmd


def _commands(run: dict) -> str:
    """Every command that made the run, oldest first: the start, then each resume (run.json's
    history), each resume marked with the update it began at."""
    lines = []
    for rec in [*run.get("history", []), run]:
        if "resumed_at" in rec:
            lines.append(f"# resumed at update {rec['resumed_at']}, {rec.get('started', '?')}:")
        lines.append(_command(rec))
    return "\n".join(lines)


def _versions(run: dict) -> list[list[str]]:
    """git SHA and versions of the last process; where an earlier one ran others, those too."""
    rows = []
    for key, label in (("git_sha", "git SHA"), ("moelab", "moelab"), ("torch", "torch"), ("python", "python")):
        now = str(run.get(key))
        earlier = [str(r.get(key)) for r in run.get("history", []) if str(r.get(key)) != now]
        rows.append([label, now + (f" (earlier processes: {', '.join(dict.fromkeys(earlier))})" if earlier else "")])
    return rows


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _metrics_blocks(target, summary: dict) -> list:
    """Final validation metrics with the xz reference (measured now if the run did not finish)."""
    if "val_loss" in summary and "val_xz_bpb" in summary:
        m = {k: summary[f"val_{k}"] for k in ("loss", "ppl", "acc", "bpb", "xz_bpb")}
        where = "final evaluation of the run"
    else:
        from moelab.eval.language import eval_language

        m = eval_language(target, max_windows=64)
        where = f"evaluated for this report on {m['windows']} validation windows (the run has no final evaluation)"
    rows = [["loss (nats/token)", f"{m['loss']:.4f}"], ["perplexity", f"{m['ppl']:.2f}"],
            ["token accuracy", f"{m['acc']:.3f}"], ["bits per byte", f"{m['bpb']:.3f}"],
            ["xz -9 bits per byte, same bytes", f"{m['xz_bpb']:.3f}"]]
    from moelab.data.overlap import recorded_init_overlap

    trained_on = recorded_init_overlap(target.run_dir)
    held_out = (f" Not held out: {trained_on} validation documents are training documents of the model this run "
                "started from (train.init_from), so these figures read low." if trained_on else "")
    return [("h2", "Final metrics"), ("p", f"Validation split{_split_size(target.run_dir)}, {where}. The model needs "
            f"{m['bpb']:.3f} bits per byte where xz -9 needs {m['xz_bpb']:.3f}{versus_xz(m['bpb'], m['xz_bpb'])}."
            + held_out),
            ("table", ["metric", "value"], rows)] + _choice_blocks(summary.get("choice") or [])


def _split_size(run_dir: Path) -> str:
    """' (N documents, T tokens)' of the run's validation split as RUN/data/split.json records it,
    with a word where they are too few for the figures to measure more than those texts."""
    from moelab.data.split import MIN_VAL_DOCUMENTS

    try:
        val = json.loads((Path(run_dir) / "data" / "split.json").read_text())["splits"]["val"]
        docs, tokens = int(val["documents"]), int(val["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    few = "; so few that these figures measure those texts" if docs < MIN_VAL_DOCUMENTS else ""
    return f" ({docs:,} document{'s' if docs != 1 else ''}, {tokens:,} tokens{few})"


def _choice_blocks(results: list[dict]) -> list:
    if not results:
        return []
    checked = any("contaminated_items" in r for r in results)  # recorded since 12/2026

    def found(r):
        n = r.get("contaminated_items")
        return "not checked" if n is None else str(n)

    head = ["task", "items", "acc", "acc_norm", "chance"] + (["items in training data"] if checked else [])
    blocks = [("p", "Multiple choice (log-likelihood, acc and acc_norm as lm-evaluation-harness defines them):"),
              ("table", head,
               [[r["task"], str(r["items"]), f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}",
                 f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}", f"{r['chance']:.3f}"]
                + ([found(r)] if checked else []) for r in results])]
    if unread := next((r["training_data_not_read"] for r in results if r.get("training_data_not_read")), None):
        blocks.append(("p", "The items in training data are counted in this run's training data (and that of the "
                            "moelab runs it started from), not in that of " + ", ".join(unread) + ", whose weights "
                            "it started from: what that model trained on is not known here."))
    if bad := [r for r in results if r.get("contaminated_items")]:
        blocks.append(("p", "Contaminated: " + "; ".join(
            f"{r['contaminated_items']} of the {r['items']} items of {r['task']}" for r in bad)
            + " share a 13-token sequence (context and gold answer) with the training data this model has seen, "
              "so those accuracies measure recall as well as skill (`moelab data check RUN --choice TASK` "
              "names the items)."))
    return blocks


def _routing_blocks(run_dir: Path, windows: int) -> tuple[list, dict]:
    """The Routing section, and the routing analysis it shows."""
    from moelab.analysis.routing import THRESHOLDS, collapse_note
    from moelab.commands import routing

    a, out_dir = routing(str(run_dir), str(run_dir / "routing"), windows)
    # a router with a capacity (Switch) drops the slots over it: their tokens skip the experts
    drops = any("dropped" in s for layers in a["splits"].values() for s in layers)
    rows = []
    for split, layers in a["splits"].items():
        for name, s in zip(a["layers"], layers):
            mm = "inf" if s["max_min"] == float("inf") else f"{s['max_min']:.2f}"
            rows.append([split, name, f"{s['cv']:.3f}", mm, f"{s['max_mean']:.2f}", f"{s['entropy']:.3f}",
                         f"{s['gini']:.3f}", str(len(s["dead"])), str(len(s["starved"]))]
                        + ([f"{s['dropped_share']:.1%}" if "dropped" in s else "0.0%"] if drops else [])
                        + [s["verdict"]])
    dropped = (" Dropped: the share of slots over an expert's capacity (model.capacity_factor), whose tokens pass "
               "through the residual without an expert." if drops else "")
    blocks = [("h2", "Routing"),
              ("p", f"Measured on {windows} training and {windows} validation windows; worst layer: "
                    f"{a['worst']}. CV is the population standard deviation of the slots per expert over their "
                    "mean. Verdicts: " + "; ".join(f"{k}: {v}" for k, v in THRESHOLDS.items()) + "." + dropped),
              ("table", ["split", "layer", "CV", "max/min", "max/mean", "entropy", "Gini", "dead", "starved"]
               + (["dropped"] if drops else []) + ["verdict"], rows)]
    if note := collapse_note(a, "the table above"):
        blocks.append(("p", note[0].upper() + note[1:] + "."))
    if "train_val_js" in a:
        blocks.append(("p", "Train vs validation drift (Jensen-Shannon, bits): " + ", ".join(
            f"layer {n}: {v:.4f}" for n, v in zip(a["layers"], a["train_val_js"]))))
    captions = {"layers": "Load per layer and expert, relative to a uniform share",
                "steps": "Training load over steps (per log interval)",
                "checkpoints": "Validation load at each checkpoint",
                "coactivation": "Share of tokens sent to both experts"}
    for kind, name in a.get("plots", {}).items():
        blocks.append(("img", f"routing/{name}", captions[kind]))
    return blocks, a


def sample_prompt(tok, ids: list[int]) -> str:
    """The text of a window's first tokens as a prompt: without end-of-text, and without the `<s>`
    a tokenizer puts before each document (generation puts it back: shown in the text, it would be
    encoded a second time)."""
    skip = {tok.eos_id, *tok.doc_prefix}
    return tok.decode([t for t in ids if t not in skip] or ids[:1])


def _sample_blocks(target, n: int, max_new_tokens: int) -> list:
    """Continuations of the starts of evenly spaced validation windows (seeds 0, 1, ..., temperature 0.8)."""
    from moelab.eval.generate import Sampler, generate_texts
    from moelab.eval.language import eval_windows_for
    from moelab.eval.metrics import spread_windows

    windows = spread_windows(eval_windows_for(target, "val", None, None, target.cfg.train.seq_len)[0], n)
    tok, blocks = target.tokenizer, [("h2", "Sample generations")]
    blocks.append(("p", f"Prompt: the first 16 tokens of {len(windows)} validation windows; {max_new_tokens} new "
                        "tokens, temperature 0.8, top-k 50, top-p 0.95 (`moelab generate` with these prompts in "
                        "this order reproduces them: prompt i samples at seed i)."))
    prompts = [sample_prompt(tok, w[:16].tolist()) for w in windows]
    for r in generate_texts(target.model, tok, prompts, max_new_tokens, Sampler(0.8, 50, 0.95, 0)):  # together
        blocks.append(("pre", f"prompt: {r['prompt']}\nmodel:  {r['text']}"))
    return blocks


def build_blocks(run_dir: Path, routing_windows: int = 32, samples: int = 3,
                 max_new_tokens: int = 48) -> tuple[list, dict | None]:
    """The report's blocks, and its routing analysis (None for a dense model)."""
    from moelab.eval.target import load_target
    from moelab.models.accounting import parameter_table
    from moelab.train.monitor import plot_curves, throughput_text

    target = load_target(str(run_dir))
    if target.run_dir is None or target.run_dir.resolve() != run_dir.resolve():
        raise UserError(f"{run_dir} is not a run directory (give the run, not one of its checkpoints)")
    run, summary = _read_json(run_dir / "run.json"), _read_json(run_dir / "summary.json")
    cfg = target.cfg
    m = cfg.model
    blocks: list = [("h1", f"moelab run report: {run_dir.name}")]
    first = (run.get("history") or [run])[0]
    blocks += [("h2", "Reproduce"), ("pre", _commands(run)),
               ("table", ["", ""], [*_versions(run), ["started", str(first.get("started"))],
                                    ["checkpoint", target.label]])]
    attn = f"MLA (kv rank {m.kv_lora_rank})" if m.attention == "mla" else f"{m.n_heads} heads / {m.n_kv_heads} kv"
    t, o = cfg.train, cfg.optim
    moe = (f"{m.n_experts} experts top-{m.top_k}, width {m.expert_dim}, {m.router} router"
           + m.shared_text) if m.n_experts else "dense"
    rows = [["model", f"d_model {m.d_model}, {m.n_layers} layers, {attn}, vocab {m.vocab_size}"
                      + (f"; weights from {t.init_from}" if t.init_from else "")], ["MoE", moe],
            ["balancing", f"aux {m.aux_loss_coef:g}, seq aux {m.seq_aux_loss_coef:g}, z {m.z_loss_coef:g}, "
                          f"bias rate {m.bias_update_rate:g}"],
            ["data", str(cfg.data.path or cfg.data.source)],
            ["optimizer", f"{o.mode}, Muon LR {o.muon_lr:g}, AdamW LR {o.adamw_lr:g}, {o.schedule} schedule, "
                          f"warmup {o.warmup}"],
            ["training", f"{summary.get('steps', '?')} of {t.steps} updates, batch {t.batch_size} x {t.grad_accum} "
                         f"x seq {t.seq_len}, {t.precision}, "
                         f"{throughput_text(summary)}"],
            ["skipped updates", ", ".join(f"{k} {v}" for k, v in summary.get("skipped", {}).items()) or "n/a"]]
    best = summary.get("best") or {}
    if best.get("step", -1) >= 0:  # the periodic evaluations' best, which checkpoints/best holds
        kept = " (checkpoints/best)" if (run_dir / "checkpoints" / "best").is_dir() else ""
        rows.append(["best validation", f"update {best['step']}: loss {best['val_loss']:.4f} on the periodic "
                                        f"evaluation's {t.eval_windows or 'all'} windows{kept}"
                     + (f"; stopped early, {t.patience} evaluations without improvement"
                        if summary.get("early_stopped") else "")])
    blocks += [("h2", "Configuration"), ("table", ["", ""], rows),
               ("details", "Full resolved config (config.yaml)", (run_dir / "config.yaml").read_text())]
    params = parameter_table(target.model)
    blocks += [("h2", "Parameters"), ("table", ["component", "total", "active per token"],
               [[k, f"{v['total']:,}", f"{v['active']:,}"] for k, v in params.items() if v["total"] or k == "total"])]
    if not (run_dir / "curves.png").is_file() and (run_dir / "metrics.jsonl").is_file():
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    if (run_dir / "curves.png").is_file():
        blocks += [("h2", "Training curves"), ("img", "curves.png", "Loss, learning rate, gradient norm, tokens/s")]
    blocks += _metrics_blocks(target, summary)
    routing = None
    if m.n_experts:
        more, routing = _routing_blocks(run_dir, routing_windows)
        blocks += more
    if samples:
        blocks += _sample_blocks(target, samples, max_new_tokens)
    return blocks, routing


def render_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "table":
            out.append("| " + " | ".join(b[1]) + " |\n|" + "---|" * len(b[1]) + "\n"
                       + "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in b[2]))
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
        elif kind in ("pre", "details"):
            text = b[1] if kind == "pre" else b[2]
            # a fence longer than any backtick run inside: generated text may hold ``` itself
            fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
            out.append((f"<details><summary>{b[1]}</summary>\n\n" if kind == "details" else "")
                       + f"{fence}\n{text.rstrip()}\n{fence}" + ("\n\n</details>" if kind == "details" else ""))
    return "\n\n".join(out) + "\n"


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
         "th{background:#f3f3f3}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre-wrap}"
         "img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}")


def render_html(blocks: list, run_dir: Path) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(blocks[0][1])}</title>"
           f"<style>{STYLE}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1]) if any(b[1]) else ""
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2])
            out.append(f"<table>{'<tr>' + head + '</tr>' if head else ''}{body}</table>")
        elif kind == "img":
            data = base64.b64encode((run_dir / b[1]).read_bytes()).decode()
            out.append(f"<figure><img alt='{e(b[2])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{e(b[2])}</figcaption></figure>")
        elif kind == "pre":
            out.append(f"<pre>{e(b[1])}</pre>")
        elif kind == "details":
            out.append(f"<details><summary>{e(b[1])}</summary><pre>{e(b[2])}</pre></details>")
    return "".join(out) + "</body></html>\n"


class WrittenReport(NamedTuple):
    md: Path
    page: Path
    note: str | None  # a line to say: the layers whose routing collapsed, or None


def write_report(run_dir: str | Path, routing_windows: int = 32, samples: int = 3,
                 max_new_tokens: int = 48) -> WrittenReport:
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    from moelab.config import load_yaml
    from moelab.files import write_atomic

    converted = load_yaml(run_dir / "config.yaml").get("preset") == "converted"
    if converted and not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir} is a converted model: there is no training to report; measure it with "
                        f"`moelab eval {run_dir} --source TEXT` and `moelab routing {run_dir} --source TEXT`")
    from moelab.analysis.routing import collapse_note

    blocks, routing = build_blocks(run_dir, routing_windows, samples, max_new_tokens)
    md, page = run_dir / "report.md", run_dir / "report.html"
    write_atomic(md, render_markdown(blocks))
    write_atomic(page, render_html(blocks, run_dir))
    note = routing and collapse_note(routing, f"the Routing section of {page}")
    return WrittenReport(md, page, f"note: {note}" if note else None)
