"""A Mixture-of-Experts feed-forward layer: router + dispatch + grouped experts (+ shared experts).

Legend: B batch, S sequence, T = B*S tokens, D model dim.
Shared experts (DeepSeek, GLM4) see every token; they are one MLP of width
n_shared_experts * shared_expert_dim, which equals the sum of that many separate experts.
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

    def forward(self, x_BSD: torch.Tensor, route_cache: dict | None = None,
                stats: bool = True) -> tuple[torch.Tensor, RouterOutput]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = self.router(x_TD, n_seqs=x_BSD.shape[0], route_cache=route_cache, stats=stats)
        y_TD = self.experts(x_TD, r.idx_TK, r.weights_TK, r.counts_E)
        if hasattr(self, "shared"):
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view_as(x_BSD), r
