"""A Mixture-of-Experts feed-forward layer: router + dispatch + grouped experts (+ shared experts).

Legend: B batch, S sequence, T = B*S tokens, D model dim.
Shared experts (DeepSeek, GLM4) see every token; they are one MLP of width
n_shared_experts * shared_expert_dim, which equals the sum of that many separate experts.
With `shared_expert_gate` (Qwen1.5/Qwen2-MoE) their output is scaled per token by
sigmoid(shared_gate(x)), a learned (1, D) row: how much of the always-on path each token takes.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.config import ModelConfig
from moelab.models.experts import Experts
from moelab.models.layers import MLP
from moelab.models.router import Router, RouterOutput


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = -1):
        super().__init__()
        self.router = Router(cfg, layer)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.expert_dim, cfg.expert_backend,
                               cfg.ffn_act, cfg.ffn_glu)
        if cfg.n_shared_experts:
            self.shared = MLP(cfg.d_model, cfg.n_shared_experts * cfg.shared_expert_dim,
                              cfg.ffn_act, cfg.ffn_glu)
            if cfg.shared_expert_gate:
                self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)

    def forward(self, x_BSD: torch.Tensor, route_cache: dict | None = None,
                stats: bool = True) -> tuple[torch.Tensor, RouterOutput]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = self.router(x_TD, n_seqs=x_BSD.shape[0], route_cache=route_cache, stats=stats)
        y_TD = self.experts(x_TD, r.idx_TK, r.weights_TK, r.counts_E)
        if hasattr(self, "shared"):
            s_TD = self.shared(x_TD)
            if hasattr(self, "shared_gate"):
                s_TD = torch.sigmoid(self.shared_gate(x_TD)) * s_TD
            y_TD = y_TD + s_TD
        return y_TD.view_as(x_BSD), r
