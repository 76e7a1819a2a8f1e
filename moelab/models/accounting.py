"""Parameter accounting: total and active-per-token parameters by component.

Active = every parameter a token's forward pass uses: all non-expert parameters (dense MLP layers and
shared experts included) plus top_k of the n_experts routed experts per MoE layer. The embedding table
counts in full (the usual convention, as in the Mixtral and DeepSeek reports). Tied embedding/head
weights count once, as embedding.
"""

from __future__ import annotations

import torch

COMPONENTS = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms",
              "head")


def component_of(name: str) -> str:
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head."):
        return "head"
    if ".attn." in name:
        return "attention"
    if ".moe.experts." in name:
        return "routed_experts"
    if ".moe.shared." in name or ".moe.shared_gate." in name:
        return "shared_experts"
    if ".mlp." in name:
        return "dense_mlp"
    if ".router." in name:
        return "router"
    if "norm" in name:
        return "norms"
    raise AssertionError(f"parameter {name} has no accounting component")


def parameter_table(model) -> dict[str, dict[str, int]]:
    """{component: {"total": n, "active": n}} plus a "total" row."""
    cfg = model.cfg
    rows = {c: {"total": 0, "active": 0} for c in COMPONENTS}
    for name, p in model.named_parameters():  # shared tensors are yielded once
        comp = component_of(name)
        rows[comp]["total"] += p.numel()
        share = cfg.top_k / cfg.n_experts if comp == "routed_experts" else 1.0
        rows[comp]["active"] += round(p.numel() * share)
    rows["total"] = {k: sum(r[k] for r in rows.values()) for k in ("total", "active")}
    return rows


def build_meta_model(cfg):
    """The model without allocating memory: for accounting of any size on any machine."""
    from moelab.models import MoETransformer

    with torch.device("meta"):
        return MoETransformer(cfg)


def format_table(rows: dict[str, dict[str, int]]) -> str:
    lines = [f"{'component':<16}{'total':>16}{'active/token':>16}"]
    for comp, r in rows.items():
        if comp != "total" and r["total"] == 0:
            continue
        if comp == "total":
            lines.append("-" * 48)
        lines.append(f"{comp:<16}{r['total']:>16,}{r['active']:>16,}")
    return "\n".join(lines)
