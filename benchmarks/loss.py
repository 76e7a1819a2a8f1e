"""Output projection + cross-entropy, forward + backward: moelab's fused chunked loss vs the
unfused `F.cross_entropy(lm_head(h).float(), targets)` (what transformers' causal LMs compute),
same inputs, in one process.

Run: python benchmarks/loss.py [--tokens 2048] [--d-model 256] [--vocab 8192] [--dtype fp32|bf16]
                               [--iters 5] [--rounds 3] [--compile]
Prints the time of each (best of interleaved rounds), their ratio, and the bytes each keeps for
its backward (saved tensors, counted by autograd's hooks), and checks loss and gradients agree.
--compile also times both under torch.compile, as `train.compile` runs them (the fused loss then
computes each chunk's softmax and gradient in a compiled kernel of its own).
Not a test: timings are machine-dependent.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from common import compare


def main() -> None:
    from moelab.models.loss import linear_cross_entropy

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time both under torch.compile")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "bf16" \
        else contextlib.nullcontext
    torch.manual_seed(0)
    h0 = torch.randn(args.tokens, args.d_model, device=device)
    head = torch.nn.Linear(args.d_model, args.vocab, bias=False, device=device)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)

    def unfused(h):
        return F.cross_entropy(head(h).float(), targets)

    def fused(h):
        return linear_cross_entropy(h, head.weight, targets)

    def run(loss_fn, saved=None):
        h = h0.clone().requires_grad_()
        hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t) \
            if saved is not None else contextlib.nullcontext()
        with autocast(), hooks:
            loss = loss_fn(h)
        loss.backward()
        grads = (h.grad, head.weight.grad)
        head.weight.grad = None
        return loss.detach(), grads

    contenders = {"unfused": unfused, "moelab fused": fused}
    if args.compile:
        contenders.update({"unfused compiled": torch.compile(unfused), "moelab fused compiled": torch.compile(fused)})
    kept = {}
    results = {}
    for name, fn in contenders.items():
        kept[name] = []
        results[name] = run(fn, kept[name])
    l0, g0 = results["unfused"]
    for name, (l1, g1) in list(results.items())[1:]:
        print(f"{name} vs unfused: |loss diff| {abs(l0 - l1).item():.2e}, max |dh diff| "
              f"{(g0[0] - g1[0]).abs().max().item():.2e}, max |dW diff| {(g0[1] - g1[1]).abs().max().item():.2e}")
    seconds = compare({name: (lambda fn=fn: run(fn)) for name, fn in contenders.items()}, args.iters, args.rounds)
    print(f"\nProjection + cross-entropy fwd+bwd, {args.tokens} tokens, D={args.d_model}, V={args.vocab}, "
          f"{device}, {args.dtype}, best of {args.rounds} interleaved rounds")
    for name, sec in seconds.items():
        print(f"  {name:<22}{sec * 1e3:9.1f} ms   keeps {sum(kept[name]) / 2**20:8.1f} MiB for backward")
    for suffix in ("", " compiled") if args.compile else ("",):
        ours, ref = "moelab fused" + suffix, "unfused" + suffix
        lo, hi = seconds.ratio_range(ours, ref)
        print(f"  speed ratio {ours} / {ref}: {seconds[ref] / seconds[ours]:.2f}x (single rounds: {lo:.2f}-{hi:.2f}x)")


if __name__ == "__main__":
    main()
