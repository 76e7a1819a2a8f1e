"""A Mixture-of-Experts feed-forward layer: router + dispatch + grouped experts.

Legend: B batch, S sequence, T = B*S tokens, D model dim.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.config import ModelConfig
from moelab.models.experts import Experts
from moelab.models.router import RouterOutput, SoftmaxTopKRouter


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = SoftmaxTopKRouter(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.norm_topk_prob)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.expert_dim, cfg.expert_backend)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = self.router(x_TD)
        y_TD = self.experts(x_TD, r.idx_TK, r.weights_TK, r.counts_E)
        return y_TD.view_as(x_BSD), r
