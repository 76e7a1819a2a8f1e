"""One MoE layer, forward + backward: moelab vs transformers' Mixtral block, same size and weights.

Run: python benchmarks/moe_layer.py [--preset exp3] [--iters 20] [--dtype fp32|bf16]
Prints tokens/s for moelab and for every transformers experts implementation that runs on this
device, and the ratio of moelab to the best of them. Not a test: timings are machine-dependent.
"""

from __future__ import annotations

import argparse
import time

import torch


def bench(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from moelab.config import build_config
    from moelab.models.hf import mixtral_config
    from moelab.models.moe import MoE

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="exp3")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = build_config(args.preset)
    m = cfg.resolve(vocab_size=cfg.data.vocab_size).model
    B, S = cfg.train.batch_size, cfg.train.seq_len
    torch.manual_seed(0)
    ours = MoE(m)
    ours.experts.reset_parameters(0.02, 0.02)
    torch.nn.init.normal_(ours.router.weight, std=0.02)
    ours = ours.to(device, dtype)
    x = torch.randn(B, S, m.d_model, device=device, dtype=dtype)
    g = torch.randn_like(x)

    def step(layer, is_ours):
        xi = x.detach().requires_grad_()
        y = layer(xi)[0] if is_ours else layer(xi)
        (y * g).sum().backward()

    tokens = B * S
    results = {"moelab": tokens / bench(lambda: step(ours, True), args.iters)}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        hf_cfg = mixtral_config(m)
        hf_cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(hf_cfg)
        block.gate.weight.data.copy_(ours.router.weight.data.float())
        block.experts.gate_up_proj.data.copy_(torch.cat([ours.experts.gate_proj.data,
                                                          ours.experts.up_proj.data], 1).float())
        block.experts.down_proj.data.copy_(ours.experts.down_proj.data.float())
        block = block.to(device, dtype)
        with torch.no_grad():  # same weights, so same outputs: a sanity check before timing
            diff = (block(x) - ours(x)[0]).abs().max().item()
        try:
            results[f"transformers/{impl}"] = tokens / bench(lambda: step(block, False), args.iters)
        except Exception as exc:  # an implementation unavailable on this device
            print(f"transformers/{impl}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        print(f"transformers/{impl}: max |out - moelab| = {diff:.2e}")
    print(f"\nMoE layer fwd+bwd, preset {args.preset} (D={m.d_model}, E={m.n_experts}, top-{m.top_k}, "
          f"F={m.expert_dim}, {tokens} tokens), {device}, {args.dtype}, {torch.get_num_threads()} threads")
    for name, tps in results.items():
        print(f"  {name:<26}{tps:>12,.0f} tokens/s")
    best = max((v, k) for k, v in results.items() if k != "moelab")
    print(f"  ratio moelab / best transformers ({best[1]}): {results['moelab'] / best[0]:.2f}x")


if __name__ == "__main__":
    main()
