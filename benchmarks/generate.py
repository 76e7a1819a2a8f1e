"""Decoding speed: moelab's KV-cached generation against re-running the whole sequence each step
(what generation without a cache costs) and against transformers' `generate` (greedy, KV cache)
on the same weights converted to its architecture (Mixtral for exp3, DeepseekV3 for
deepseek_v3-tiny), same prompt, in one process; each says whether it produced the same tokens.

    python benchmarks/generate.py [--presets exp3 deepseek_v3-tiny] [--prompt 64] [--new 128] [--threads 2]
                                  [--no-hf] [--dtype bf16] [--batch 8]
    python benchmarks/generate.py --prefill --presets exp3 --batch 4 --prompt 8192 [--prefill-tokens 8192]

--dtype bf16: both models hold their weights in bf16 (moelab's as `moelab generate --dtype bf16`
loads them: routers in fp32; transformers' whole model cast, as `.to(torch.bfloat16)` does), where
"same tokens" may then differ by rounding.
--batch N: N prompts of lengths spread from half of --prompt to --prompt, decoded together
(`generate_batch`, left-padded) against one at a time, and against transformers' batched `generate`
(left padding, its attention mask); tokens/s count every prompt's new tokens, and "same tokens" is
each prompt's against moelab's decoding of it alone.
--prefill: the batch's prefill (--batch prompts of lengths spread from a quarter of --prompt to
--prompt, one new token) read in chunks of --prefill-tokens tokens (moelab's default) against in one
forward (as before): seconds and peak resident memory above the start (sampled each millisecond),
their ratio, and whether both drew the same tokens.
"""

from __future__ import annotations

import argparse

import torch

from common import compare, peak_above_now
from moelab.eval.generate import PREFILL_TOKENS, generate_batch, generate_ids
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
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (see above)")
    ap.add_argument("--prefill", action="store_true", help="the prefill in chunks vs in one forward (see above)")
    ap.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS, help="tokens per prefill chunk")
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
        if args.prefill:
            _prefill(model, preset, args, device)
            continue
        if args.batch > 1:
            _batched(model, preset, args, device)
            continue
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
            _versus_transformers(t, "cache", hf, args.new, hf_same)


def _batched(model, preset: str, args, device) -> None:
    n, new = args.batch, args.new
    lengths = [round(args.prompt / 2 + args.prompt / 2 * i / max(n - 1, 1)) for i in range(n)]
    prompts = [torch.randint(1, 8192, (k,)).tolist() for k in lengths]
    alone = [generate_ids(model, p, new)[0] for p in prompts]
    same = [r[0] for r in generate_batch(model, prompts, new)] == alone
    fns = {"batch": lambda: generate_batch(model, prompts, new),
           "one by one": lambda: [generate_ids(model, p, new) for p in prompts]}
    hf = None if args.no_hf else _transformers_twin(model, device)
    if hf is not None:
        width = max(lengths)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

        @torch.no_grad()
        def hf_generate():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0)[:, width:]
        fns["transformers"] = hf_generate
        hf_same = hf_generate().tolist() == alone
    t = compare(fns, iters=3, rounds=args.rounds, warmup=1)
    lo, hi = t.ratio_range("batch", "one by one")
    rate = n * new
    print(f"{preset} ({model.cfg.attention}, {args.dtype} weights) on {device}: {n} prompts of "
          f"{lengths[0]}-{lengths[-1]} tokens, {new} new tokens each | together {rate / t['batch']:.0f} tok/s | one by one "
          f"{rate / t['one by one']:.0f} tok/s | speed-up {t['one by one'] / t['batch']:.2f}x (single rounds: "
          f"{lo:.2f}-{hi:.2f}x) | same tokens as alone: {same}")
    if hf is not None:
        _versus_transformers(t, "batch", hf, rate, hf_same, ", batched")


def _prefill(model, preset: str, args, device) -> None:
    n = max(args.batch, 1)
    lengths = [round(args.prompt / 4 + 3 * args.prompt / 4 * i / max(n - 1, 1)) for i in range(n)]
    prompts = [torch.randint(1, 8192, (k,)).tolist() for k in lengths]
    runs = {}
    for name, tokens in (("one forward", 1 << 62), (f"chunks of {args.prefill_tokens}", args.prefill_tokens)):
        got = {}
        peak, seconds = peak_above_now(lambda: got.update(out=generate_batch(model, prompts, 1, prefill_tokens=tokens)))
        runs[name] = (peak, seconds, [new for new, *_ in got["out"]])
    (one, chunked) = runs.values()
    print(f"{preset} ({model.cfg.attention}, {args.dtype} weights) on {device}: prefill of {n} prompts of "
          f"{lengths[0]}-{lengths[-1]} tokens | " + " | ".join(
              f"{name} {seconds:.2f} s, peak +{peak / 2**20:.0f} MiB" for name, (peak, seconds, _) in runs.items())
          + f" | memory ratio one forward / chunks: {one[0] / max(chunked[0], 1):.2f}x, time ratio "
          f"{one[1] / chunked[1]:.2f}x | same tokens: {one[2] == chunked[2]}")


def _versus_transformers(t, ours: str, hf, tokens: int, same: bool, how: str = "") -> None:
    lo, hi = t.ratio_range(ours, "transformers")
    print(f"  transformers {type(hf).__name__}.generate{how} {tokens / t['transformers']:.0f} tok/s | "
          f"moelab / transformers {t['transformers'] / t[ours]:.2f}x (single rounds: {lo:.2f}-{hi:.2f}x) | "
          f"same tokens: {same}")


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
