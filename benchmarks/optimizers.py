"""Muon (hybrid: Muon on hidden matrices, AdamW on the rest) vs AdamW alone, on the default corpus
at an equal number of updates, each at its best LR from a small sweep.

Run: python benchmarks/optimizers.py [--preset tiny] [--steps 200] [--lrs 1e-3 3e-3 1e-2]
                                     [--out runs/bench-optimizers]
The data is prepared once (the embedded stdlib corpus, as `moelab train` uses it) and shared by all
runs; every run has the same model, seed, batches, schedule and warmup. With the default
match_adamw scaling, Muon's update RMS equals AdamW's, so one LR grid serves both.
Prints the final validation loss of each run and the best of each optimizer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from moelab.config import build_config
    from moelab.data.prepare import prepare
    from moelab.train.loop import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--out", default="runs/bench-optimizers")
    args = ap.parse_args()
    out = Path(args.out)
    base = build_config(args.preset)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        d = base.data
        prepare([d.source], str(data), val_fraction=d.val_fraction, salt=d.split_salt,
                text_field=d.text_field, tokenizer=d.tokenizer or None, vocab_size=d.vocab_size,
                near_dup_split=d.near_dup_split, max_docs=d.max_docs,
                tokenizer_train_bytes=d.tokenizer_train_bytes)
    results = []
    for mode in ("hybrid", "adamw"):
        for lr in args.lrs:
            name = f"{mode}-lr{lr:g}"
            run = out / name
            if (run / "summary.json").is_file():
                summary = json.loads((run / "summary.json").read_text())
            else:
                cfg = build_config(args.preset, None, [
                    f"data.path={data}", f"train.steps={args.steps}", f"optim.mode={mode}",
                    f"optim.muon_lr={lr}", f"optim.adamw_lr={lr}", f"train.eval_every={args.steps}",
                    f"train.save_every={args.steps}", "train.plot=false",
                    f"optim.warmup={max(1, args.steps // 10)}"])
                t = time.perf_counter()
                summary = train(cfg, out=str(run), progress=False)
                summary["wall_s"] = time.perf_counter() - t
                (run / "summary.json").write_text(json.dumps(summary, indent=1))
            results.append((mode, lr, summary["val_loss"], summary["train_tokens_per_s"]))
            print(f"{name:<22} val loss {summary['val_loss']:.4f}  {summary['train_tokens_per_s']:,.0f} tok/s",
                  flush=True)
    print(f"\n{args.preset}, {args.steps} updates each, LR grid {args.lrs}")
    best = {}
    for mode in ("hybrid", "adamw"):
        b = min((r for r in results if r[0] == mode), key=lambda r: r[2])
        best[mode] = b
        print(f"  best {'Muon hybrid' if mode == 'hybrid' else 'AdamW':<12} lr {b[1]:g}: val loss {b[2]:.4f}")
    print(f"  Muon - AdamW: {best['hybrid'][2] - best['adamw'][2]:+.4f} nats")


if __name__ == "__main__":
    main()
