"""Training throughput: moelab vs transformers' DeepseekV3ForCausalLM at the same size, same
weights, same batches, same precision and the same optimizer (fused AdamW), in one process.

Run: python benchmarks/train_throughput.py [--preset exp3] [--dtype fp32|bf16] [--iters 10] [--rounds 3]
                                           [--seq-len S] [--batch-size B]
                                           [--muon] [--compile] [--hf-compile] [--profile]
                                           [--keep-freed-memory] [--fast-fp32-matmul] [--same-input]
                                           [--set model.d_model=1024 train.seq_len=1024 ...]
A training step is forward + loss + backward + gradient clipping + optimizer update. Each side
gets a new batch of random tokens at every step (the same sequence of batches on each side), so
routing, and the experts' row counts, change from step to step as in a real run. transformers
is timed with every attention (eager, sdpa) and experts implementation (eager, batched_mm,
grouped_mm; see --hf-experts) that runs here, and the best is the reference. moelab uses its DeepSeek-V3 design
(MLA, sigmoid group-free router with selection bias, one shared expert) at the preset's size.
Contenders are timed in interleaved rounds and each keeps its best, so a slow spell on a shared
machine does not land on one side only. Prints tokens/s of each, the ratio moelab / best
transformers with its range over single rounds (how much the host's noise moves it) and, on a
GPU, MFU; --profile adds each side's matmul/other time split (CPU).
Not a test: timings are machine-dependent.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools

import torch

from common import SAME_INPUT_HELP, add_host_settings, apply_host_settings, compare, print_matmul_split


def main() -> None:
    import transformers

    from moelab.config import apply_override, build_config
    from moelab.models import MoETransformer
    from moelab.models.accounting import parameter_table
    from moelab.models.hf import hf_config, to_hf_state_dict
    from moelab.models.presets import apply_family
    from moelab.optim.groups import HybridOptimizer
    from moelab.train.monitor import flops_per_token, peak_tflops

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="exp3")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seq-len", type=int, help="sequence length (default: the preset's)")
    ap.add_argument("--batch-size", type=int, help="sequences per step (default: the preset's)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best counts")
    ap.add_argument("--warmup", type=int, default=10,
                    help="untimed steps of each contender first: the steady state of a long run (on CPU, "
                         "bf16 kernels compiled for recurring shapes are reused from then on)")
    ap.add_argument("--profile", action="store_true",
                    help="also split a step into matmul and other time (CPU), and print the "
                         "ratio's ceilings: at equal matmul speed and at this machine's peak GEMM rate")
    ap.add_argument("--muon", action="store_true", help="also time moelab with its default Muon hybrid")
    ap.add_argument("--compile", action="store_true", help="also time moelab with train.compile")
    ap.add_argument("--hf-compile", action="store_true",
                    help="also time each transformers contender under torch.compile (the fair "
                         "reference for moelab compiled; minutes of compiling on CPU)")
    add_host_settings(ap)
    ap.add_argument("--same-input", action="store_true", help=SAME_INPUT_HELP)
    ap.add_argument("--hf-experts", nargs="+", default=["eager", "grouped_mm"],
                    help="transformers experts implementations to time (batched_mm copies each "
                         "token's expert weights: T*K*3*D*F floats per layer, which exhausts host "
                         "memory at exp3 size)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides after the DeepSeek-V3 design is applied, e.g. to fill a GPU: "
                         "model.d_model=1024 model.n_experts=16 train.seq_len=1024 data.vocab_size=32000")
    ap.add_argument("--hf-attn", nargs="+", default=["eager", "sdpa"],
                    help="transformers attention implementations to time")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    apply_host_settings(args)
    cfg = build_config(args.preset)
    apply_family(cfg.model, "deepseek_v3", n_group=1, topk_group=1)
    for item in args.set:
        apply_override(cfg, item)
    cfg.validate()
    cfg.train.seq_len = args.seq_len or cfg.train.seq_len
    cfg.train.batch_size = args.batch_size or cfg.train.batch_size
    m = cfg.resolve(vocab_size=cfg.data.vocab_size).model
    B, S = cfg.train.batch_size, cfg.train.seq_len
    torch.manual_seed(0)
    model = MoETransformer(m, device=device)
    x = torch.randint(0, m.vocab_size, (B, S + 1), device=device)
    inputs = x[:, :-1]  # for the logits check before timing

    def batches():
        """(inputs, targets) for each step: a new batch each time (the same sequence for each
        contender), or with --same-input the one above every time."""
        gen = torch.Generator().manual_seed(1)
        while True:
            xb = x if args.same_input else torch.randint(0, m.vocab_size, (B, S + 1), generator=gen).to(device)
            yield xb[:, :-1], xb[:, 1:]
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "bf16" \
        else contextlib.nullcontext

    def adamw(mod):
        # fused, as each side really trains: moelab's AdamW groups and transformers' Trainer
        # default (adamw_torch_fused from torch 2.8) both use torch's fused kernel
        return torch.optim.AdamW(mod.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01,
                                 fused=True)

    def moelab_step(mod, opt, fwd):
        data = batches()

        def step():
            inputs, targets = next(data)
            with autocast():
                loss = fwd(inputs, targets=targets).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mod.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        return step

    def hf_step(mod, opt, fwd=None):
        fwd = mod if fwd is None else fwd
        data = batches()

        def step():
            inputs, targets = next(data)
            with autocast():
                logits = fwd(input_ids=inputs).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mod.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    tokens = B * S
    with torch.no_grad():
        ref_logits = model.eval()(inputs).logits
    state = {k: v.clone() for k, v in to_hf_state_dict(model).items()}  # before moelab's updates
    model.train()
    steps = {"moelab (AdamW)": moelab_step(model, adamw(model), model)}
    if args.muon:
        steps["moelab (Muon hybrid)"] = moelab_step(model, HybridOptimizer(model, cfg.optim, device), model)
    if args.compile:
        steps["moelab compiled (AdamW)"] = moelab_step(model, adamw(model), torch.compile(model))
    for attn, impl in itertools.product(args.hf_attn, args.hf_experts):
        hf_cfg = hf_config(m, "deepseek_v3")
        hf_cfg._experts_implementation = impl
        hf_cfg._attn_implementation = attn
        # no KV cache in training, as a fine-tuning script sets it: with one (the config's default) each
        # step builds a DynamicCache it never reads, and under torch.compile its per-layer guards recompile
        # the decoder layer past dynamo's limit of 8, leaving the later layers uncompiled
        hf_cfg.use_cache = False
        hf = transformers.DeepseekV3ForCausalLM(hf_cfg)
        hf.load_state_dict(state, strict=False)
        hf.to(device)
        name = f"transformers attn={attn} experts={impl}"
        try:
            with torch.no_grad():  # same weights: the same logits, checked before timing
                diff = (hf.eval()(input_ids=inputs).logits - ref_logits).abs().max().item()
            hf.train()
            steps[name] = hf_step(hf, adamw(hf))
            steps[name]()
            if args.hf_compile:
                steps[name + " compiled"] = hf_step(hf, adamw(hf), torch.compile(hf))
                steps[name + " compiled"]()
        except Exception as exc:  # an implementation unavailable on this device
            print(f"{name}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
            steps.pop(name, None)
            steps.pop(name + " compiled", None)
            continue
        print(f"{name}: max |logits - moelab| = {diff:.2e}")
    seconds = compare(steps, args.iters, args.rounds, warmup=args.warmup)
    results = {name: tokens / sec for name, sec in seconds.items()}
    rows = parameter_table(model)
    fpt = flops_per_token(m, S, rows)
    peak = peak_tflops(device, "bf16" if args.dtype == "bf16" else "fp32")
    print(f"\nTraining step (fwd+bwd+clip+AdamW, best of {args.rounds} interleaved rounds), "
          f"DeepSeek-V3 design at preset {args.preset}{' + ' + ' '.join(args.set) if args.set else ''} size "
          f"({rows['total']['total'] / 1e6:.1f}M params, {rows['total']['active'] / 1e6:.1f}M active, "
          f"D={m.d_model}, L={m.n_layers}, E={m.n_experts} top-{m.top_k}, {B}x{S} tokens), {device}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, "
          f"{'one batch' if args.same_input else 'a new batch each step'}")
    width = max(44, *(len(n) + 2 for n in results))
    for name, tps in results.items():
        mfu = f"  MFU {tps * fpt / 1e12 / peak:.1%}" if peak else ""
        print(f"  {name:<{width}}{tps:>10,.0f} tokens/s  {tps * fpt / 1e12:6.3f} TFLOP/s{mfu}")
    best = max((v, k) for k, v in results.items() if k.startswith("transformers"))
    for ours in ("moelab (AdamW)", "moelab compiled (AdamW)"):
        if ours in results:
            lo, hi = seconds.ratio_range(ours, best[1])
            print(f"  ratio {ours} / best transformers ({best[1]}): {results[ours] / best[0]:.2f}x "
                  f"(single rounds: {lo:.2f}-{hi:.2f}x)")
    if args.profile and device.type == "cpu":
        print_matmul_split(steps, seconds, "moelab (AdamW)", best[1], iters=3,
                           dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)


if __name__ == "__main__":
    main()
