"""One MoE layer, forward + backward: moelab vs transformers' MoE block of the same architecture,
same size and weights.

Run: python benchmarks/moe_layer.py [--preset exp3] [--arch mixtral|qwen3_moe|olmoe|deepseek_v3|glm4_moe]
                                    [--iters 20] [--rounds 3] [--dtype fp32|bf16] [--profile]
                                    [--keep-freed-memory] [--fast-fp32-matmul] [--same-input]
                                    [--set model.d_model=1024 model.n_experts=64 train.seq_len=1024 ...]
The preset gives the size (exp3: D=256, E=4 top-2, F=512, 16x128 tokens); --arch the design (router,
shared experts) taken from that family's tiny preset.
Prints tokens/s for moelab and for every transformers experts implementation that runs on this
device (best of interleaved rounds), and the ratio of moelab to the best of them. Each call gets
a new input, as each training step brings one, so the experts' row counts change from call to call.
Not a test: timings are machine-dependent.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from common import SAME_INPUT_HELP, add_host_settings, apply_host_settings, compare, print_matmul_split


def main() -> None:
    import transformers

    from moelab.config import build_config
    from moelab.models import MoETransformer
    from moelab.models.hf import ARCHS, hf_config, to_hf_state_dict
    from moelab.models.presets import apply_family

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="exp3")
    ap.add_argument("--arch", default="mixtral", choices=[a for a in ARCHS if a not in ("llama", "qwen3")])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best counts")
    ap.add_argument("--profile", action="store_true",
                    help="also split each step into matmul and other time (CPU), and print the "
                         "ratio's ceilings: at equal matmul speed and at this machine's peak GEMM rate")
    add_host_settings(ap)
    ap.add_argument("--same-input", action="store_true", help=SAME_INPUT_HELP)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="size overrides of the preset, e.g. model.expert_dim=1024 train.batch_size=8")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    apply_host_settings(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = build_config(args.preset, overrides=args.set)
    size = {k: getattr(cfg.model, k) for k in ("d_model", "n_heads", "n_experts", "top_k", "expert_dim")}
    apply_family(cfg.model, args.arch, **size, n_layers=1, first_k_dense=0, n_group=1, topk_group=1)
    m = cfg.resolve(vocab_size=cfg.data.vocab_size).model
    B, S = cfg.train.batch_size, cfg.train.seq_len
    torch.manual_seed(0)
    model = MoETransformer(m)
    ours = model.blocks[0].moe.to(device, dtype)
    pool = torch.randn(8, B, S, m.d_model, device=device, dtype=dtype)
    x, g = pool[0], torch.randn_like(pool[0])

    def inputs():
        """A new input at every call, the same sequence for each contender: one of 8 random ones
        with its features rotated by the call count (0.05 ms a call; 2048 calls before one recurs)."""
        for i in itertools.count():
            yield x if args.same_input else pool[i % 8].roll(i // 8 % m.d_model, -1)

    def step(layer, is_ours, xs):
        xi = next(xs).detach().requires_grad_()
        y = layer(xi)[0] if is_ours else layer(xi)
        (y * g).sum().backward()

    tokens = B * S
    steps = {"moelab": lambda xs=inputs(): step(ours, True, xs)}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        hf_cfg = hf_config(m, args.arch)
        hf_cfg._experts_implementation = impl
        hf = getattr(transformers, ARCHS[args.arch] + "ForCausalLM")(hf_cfg)
        hf.load_state_dict(to_hf_state_dict(model), strict=False)
        block = hf.model.layers[0].mlp.to(device, dtype)
        try:
            with torch.no_grad():  # same weights, so same outputs: a sanity check before timing
                diff = (block(x) - ours(x)[0]).abs().max().item()
            step(block, False, iter([x]))
        except Exception as exc:  # an implementation unavailable on this device
            print(f"transformers/{impl}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        print(f"transformers/{impl}: max |out - moelab| = {diff:.2e}")
        steps[f"transformers/{impl}"] = lambda block=block, xs=inputs(): step(block, False, xs)
    seconds = compare(steps, args.iters, args.rounds)
    print(f"\nMoE layer fwd+bwd, {args.arch} design at preset {args.preset} size (D={m.d_model}, "
          f"E={m.n_experts}, top-{m.top_k}, F={m.expert_dim}, {tokens} tokens), {device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {'one input' if args.same_input else 'a new input each call'}, "
          f"best of {args.rounds} interleaved rounds")
    for name, sec in seconds.items():
        print(f"  {name:<26}{tokens / sec:>12,.0f} tokens/s")
    best = min((v, k) for k, v in seconds.items() if k != "moelab")
    lo, hi = seconds.ratio_range("moelab", best[1])
    print(f"  ratio moelab / best transformers ({best[1]}): {best[0] / seconds['moelab']:.2f}x "
          f"(single rounds: {lo:.2f}-{hi:.2f}x)")
    if args.profile and device.type == "cpu":
        print_matmul_split(steps, seconds, "moelab", best[1], iters=5, dtype=dtype)


if __name__ == "__main__":
    main()
