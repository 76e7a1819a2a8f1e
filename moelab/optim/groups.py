"""Which parameters Muon updates and which AdamW does, and the combined optimizer.

Rule: Muon takes every hidden weight matrix (ndim >= 2): attention projections and each expert's
matrices (3-D, orthogonalised per expert). AdamW takes the rest: token embedding, output head
(these are lookup/readout tables, not linear maps between hidden spaces), the router (small,
needs precise probabilities), norms and biases. Weight decay applies to matrices only.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.config import OptimConfig
from moelab.optim.muon import Muon

ADAMW_MATRIX_SUFFIXES = ("embed.weight", "lm_head.weight", "router.weight", "router.noise_weight")


def split_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    groups = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and not name.endswith(ADAMW_MATRIX_SUFFIXES):
            groups["muon"].append((name, p))
        elif p.ndim >= 2:
            groups["adamw_decay"].append((name, p))
        else:
            groups["adamw_no_decay"].append((name, p))
    return groups


class HybridOptimizer:
    """Muon + AdamW stepped together. `base_lr` in each param group feeds the schedule."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, device: torch.device):
        g = split_params(model)
        self.report = {k: sum(p.numel() for _, p in v) for k, v in g.items()}
        ns_dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.ns_dtype]
        self.optimizers: list[torch.optim.Optimizer] = []
        if g["muon"]:
            self.optimizers.append(Muon(
                [{"params": [p for _, p in g["muon"]], "base_lr": cfg.muon_lr}], lr=cfg.muon_lr,
                momentum=cfg.momentum, weight_decay=cfg.weight_decay, ns_steps=cfg.ns_steps,
                ns_dtype=ns_dtype, scale=cfg.muon_scale))
        adam_groups = [
            {"params": [p for _, p in g["adamw_decay"]], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in g["adamw_no_decay"]], "weight_decay": 0.0},
        ]
        adam_groups = [dict(grp, base_lr=cfg.adamw_lr) for grp in adam_groups if grp["params"]]
        if adam_groups:
            self.optimizers.append(torch.optim.AdamW(
                adam_groups, lr=cfg.adamw_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps))

    def set_lr_factor(self, factor: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        assert len(states) == len(self.optimizers), "optimizer layout changed since the checkpoint"
        for opt, st in zip(self.optimizers, states):
            opt.load_state_dict(st)
