"""Decoding speed: moelab's KV-cached generation against re-running the whole sequence each step
(what generation without a cache costs) and against transformers' `generate` (greedy, KV cache)
on the same weights converted to its architecture (Mixtral for exp3, DeepseekV3 for
deepseek_v3-tiny), same prompt, in one process; each says whether it produced the same tokens.

    python benchmarks/generate.py [--presets exp3 deepseek_v3-tiny] [--prompt 64] [--new 128] [--threads 2]
                                  [--no-hf] [--dtype bf16]

--dtype bf16: both models hold their weights in bf16 (moelab's as `moelab generate --dtype bf16`
loads them: routers in fp32; transformers' whole model cast, as `.to(torch.bfloat16)` does), where
"same tokens" may then differ by rounding.
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
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the weights' dtype, both sides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for preset in args.presets:
        cfg = get_preset(preset)
        cfg.model.max_seq_len = max(cfg.model.max_seq_len, args.prompt + args.new)
        cfg.resolve(vocab_size=8192)
        torch.manual_seed(0)
        model = MoETransformer(cfg.model, device=device).eval()
        if args.dtype == "bf16":  # held as load_model(dtype="bf16") holds them
            model = MoETransformer.from_weights(cfg.model, model.state_dict(), torch.bfloat16)
        prompt = torch.randint(0, 8192, (args.prompt,)).tolist()
        ours = generate_ids(model, prompt, args.new, use_cache=True)[0]
        same = ours == generate_ids(model, prompt, args.new, use_cache=False)[0]
        fns = {"cache": lambda: generate_ids(model, prompt, args.new, use_cache=True),
               "full": lambda: generate_ids(model, prompt, args.new, use_cache=False)}
        hf = None if args.no_hf else _transformers_twin(model, device)
        if hf is not None:
            ids = torch.tensor([prompt], device=device)

            @torch.no_grad()
            def hf_generate():
                return hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)[0]
            fns["transformers"] = hf_generate
            hf_same = hf_generate()[len(prompt):].tolist() == ours
        t = compare(fns, iters=3, rounds=args.rounds, warmup=1)
        lo, hi = t.ratio_range("cache", "full")
        print(f"{preset} ({cfg.model.attention}, {args.dtype} weights) on {device}: prompt {args.prompt}, {args.new} new tokens | "
              f"KV cache {args.new / t['cache']:.0f} tok/s | no cache {args.new / t['full']:.0f} tok/s | "
              f"speed-up {t['full'] / t['cache']:.2f}x (single rounds: {lo:.2f}-{hi:.2f}x) | same tokens: {same}")
        if hf is not None:
            lo, hi = t.ratio_range("cache", "transformers")
            print(f"  transformers {type(hf).__name__}.generate {args.new / t['transformers']:.0f} tok/s | "
                  f"moelab / transformers {t['transformers'] / t['cache']:.2f}x (single rounds: {lo:.2f}-{hi:.2f}x) | "
                  f"same tokens: {hf_same}")


def _transformers_twin(model, device):
    """transformers' model of the same architecture with the same weights, or None where
    transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    from moelab.models.hf import hf_config, to_hf_state_dict

    hf = transformers.AutoModelForCausalLM.from_config(hf_config(model.cfg))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    return hf.to(device, model.embed.weight.dtype).eval()


if __name__ == "__main__":
    main()
