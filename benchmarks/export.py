"""Memory of a Hugging Face export: moelab's writer (`export_hf`, a layer at a time) vs
transformers' `save_pretrained` of the same model holding the same tensors (what `moelab export`
did before), on one model, in one process.

Run: python benchmarks/export.py [--arch mixtral] [--d-model 1024] [--layers 4] [--experts 8]
                                 [--expert-dim 2048] [--dtype fp32|bf16] [--shard 200MB]
The default model (1.1 GB) is written in 200 MB shards: the regime of a model many times the
Hub's usual 5 GB shard, at a size this runs in seconds. Prints, for each, the peak resident
memory above what the model itself holds (sampled every millisecond from /proc/self/statm, Linux)
as a multiple of the model's size, their ratio, the seconds each took, and whether both wrote the
same tensors.
Not a test: peaks depend on the allocator and the sampling.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path

import torch

from common import peak_above_now


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    from moelab.models import MoETransformer
    from moelab.models.hf import DTYPES, export_hf, to_hf
    from moelab.models.presets import get_preset

    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mixtral", help="a family with a <family>-tiny preset: mixtral, deepseek_v3, ...")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--expert-dim", type=int, default=2048)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--shard", default="200MB", help="largest weights file")
    args = ap.parse_args()
    if not Path("/proc/self/statm").is_file():
        raise SystemExit("this benchmark reads /proc/self/statm (Linux)")
    cfg = get_preset(f"{args.arch}-tiny")
    m = cfg.model
    m.d_model, m.n_layers, m.n_experts, m.expert_dim = args.d_model, args.layers, args.experts, args.expert_dim
    m.shared_expert_dim = m.dense_dim = args.expert_dim
    cfg = cfg.resolve(vocab_size=32000)
    with torch.device("meta"):
        meta = MoETransformer(cfg.model, init=False)
    to_hf(meta, share=True)  # imports transformers' modules for the architecture: not what either side costs
    for module in ("safetensors.torch", "transformers.core_model_loading"):
        importlib.import_module(module)

    with torch.no_grad():
        model = MoETransformer(cfg.model).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())

    def reference(out):
        hf = to_hf(model, share=True)  # the model's own tensors, but the fused gate_up_proj
        if args.dtype != "fp32":
            hf = hf.to(DTYPES[args.dtype])
        hf.save_pretrained(out, max_shard_size=args.shard)

    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, ref_dir = Path(tmp) / "moelab", Path(tmp) / "save_pretrained"
        ours = peak_above_now(lambda: export_hf(model, ours_dir, dtype=args.dtype, max_shard_size=args.shard))
        ref = peak_above_now(lambda: reference(ref_dir))
        a, b = tensors(ours_dir), tensors(ref_dir)
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"\nExport of a {args.arch} model, {size / 1e9:.2f} GB in fp32 ({cfg.model.n_layers} layers, "
          f"{args.experts} experts of {args.expert_dim}, d_model {args.d_model}) as {args.dtype}, "
          f"shards <= {args.shard}")
    for name, (peak, sec) in (("moelab export_hf", ours), ("save_pretrained", ref)):
        print(f"  {name:<18} peak {peak / 1e6:8,.0f} MB above the model ({peak / size:.2f}x its size), {sec:5.1f} s")
    print(f"  memory ratio save_pretrained / moelab: {ref[0] / max(ours[0], 1):.2f}x; same tensors: {same}")


if __name__ == "__main__":
    main()
