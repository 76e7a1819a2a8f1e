"""Decoding speed: moelab's KV-cached generation against re-running the whole sequence each step
(what generation without a cache costs), same model, same tokens, in one process.

    python benchmarks/generate.py [--presets exp3 deepseek_v3-tiny] [--prompt 64] [--new 128] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from common import compare
from moelab.eval.generate import generate_ids
from moelab.models import MoETransformer
from moelab.models.presets import get_preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["exp3", "deepseek_v3-tiny"])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for preset in args.presets:
        cfg = get_preset(preset)
        cfg.model.max_seq_len = max(cfg.model.max_seq_len, args.prompt + args.new)
        cfg.resolve(vocab_size=8192)
        torch.manual_seed(0)
        model = MoETransformer(cfg.model, device=device).eval()
        prompt = torch.randint(0, 8192, (args.prompt,)).tolist()
        same = generate_ids(model, prompt, args.new, use_cache=True)[0] == \
            generate_ids(model, prompt, args.new, use_cache=False)[0]
        t = compare({"cache": lambda: generate_ids(model, prompt, args.new, use_cache=True),
                     "full": lambda: generate_ids(model, prompt, args.new, use_cache=False)},
                    iters=3, rounds=args.rounds, warmup=1)
        lo, hi = t.ratio_range("cache", "full")
        print(f"{preset} ({cfg.model.attention}) on {device}: prompt {args.prompt}, {args.new} new tokens | "
              f"KV cache {args.new / t['cache']:.0f} tok/s | no cache {args.new / t['full']:.0f} tok/s | "
              f"speed-up {t['full'] / t['cache']:.2f}x (single rounds: {lo:.2f}-{hi:.2f}x) | same tokens: {same}")


if __name__ == "__main__":
    main()
