"""Routers: token -> (expert ids, combine weights) plus their own statistics and aux terms.

Legend: T tokens, D model dim, E experts, K experts per token.
Router math runs in fp32 whatever the autocast dtype, since small logit errors flip top-k choices.
Nothing here mutates state: counts and losses are returned, so recomputation (activation
checkpointing) cannot count twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    weights_TK: torch.Tensor  # combine weights of the chosen experts
    idx_TK: torch.Tensor  # chosen expert ids (int64)
    counts_E: torch.Tensor  # tokens routed to each expert (int64); reduce across ranks: sum
    aux_loss: torch.Tensor  # Switch/GShard load-balancing loss (scalar, fp32)
    z_loss: torch.Tensor  # router z-loss: mean(logsumexp(logits)^2) (scalar, fp32)


class SoftmaxTopKRouter(nn.Module):
    """Softmax over all experts, then top-k, optionally renormalised (Mixtral / Qwen3-MoE / OLMoE)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, norm_topk_prob: bool = True):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk_prob = n_experts, top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            probs_TE = logits_TE.softmax(dim=-1)
            weights_TK, idx_TK = probs_TE.topk(self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
            counts_E = torch.bincount(idx_TK.flatten(), minlength=self.n_experts)
            # aux = E * sum_e f_e * P_e, f_e = share of the T*K assignments (no gradient),
            # P_e = mean router probability (carries the gradient). Equals 1 when uniform.
            T = x_TD.shape[0]
            f_E = counts_E.float() / max(T * self.top_k, 1)
            aux_loss = self.n_experts * (f_E * probs_TE.mean(dim=0)).sum()
            z_loss = torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        return RouterOutput(weights_TK.to(x_TD.dtype), idx_TK, counts_E, aux_loss, z_loss)
