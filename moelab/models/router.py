"""Routers: token -> (expert ids, combine weights) plus their own statistics and aux terms.

Legend: B sequences, S positions, T = B*S tokens, D model dim, E experts, K experts per token.

Kinds (`model.router`):
  softmax       softmax over all E, top-k, optional renormalisation (Mixtral, Qwen3-MoE, OLMoE)
  topk_softmax  top-k on the logits, softmax over the chosen k
  sigmoid       sigmoid scores; selection uses score + a per-expert bias (aux-loss-free balancing),
                weights use the raw scores, renormalised and scaled (DeepSeek-V3, GLM4-MoE)
  switch        softmax top-1 with the raw probability as weight and a capacity (Switch Transformer)
Any kind can be group-limited (n_group/topk_group: a group scores the sum of its group_score_top best
experts, two in DeepSeek-V3, the best alone in V2; tokens pick only from their best topk_group groups), capacity-limited (tokens over an expert's
capacity are dropped and counted) and noisy (Shazeer et al. 2017, in training only).

Router math runs in fp32 whatever the autocast dtype, since small logit errors flip top-k choices.
Nothing here mutates state: counts and losses are returned, so recomputation (activation
checkpointing) cannot count twice. The selection bias changes only in `update_selection_bias`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig


@dataclass
class RouterOutput:
    weights_TK: torch.Tensor  # combine weights of the chosen experts (0 for dropped slots)
    idx_TK: torch.Tensor  # chosen expert ids (int64)
    counts_E: torch.Tensor  # slots routed to each expert before capacity (int64); reduce: sum
    dropped_E: torch.Tensor  # slots dropped at each expert for lack of capacity (int64); reduce: sum
    # the balance terms; None from a forward that asked for no statistics (`Router.forward`)
    aux_loss: torch.Tensor | None  # Switch/GShard load-balancing loss (scalar, fp32; 1.0 when uniform)
    seq_aux_loss: torch.Tensor | None  # DeepSeek-V3 sequence-wise balance loss (0 unless its coef is set)
    z_loss: torch.Tensor | None  # router z-loss: mean(logsumexp(logits)^2) (scalar, fp32)
    layer: int = -1  # index of the transformer layer this router belongs to


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Slots per expert; never more than the tokens (a token picks an expert once): a factor of 1e30
    overflowed torch's comparison with a traceback."""
    return min(math.ceil(capacity_factor * n_tokens * top_k / n_experts), n_tokens)


def capacity_keep(idx_TK: torch.Tensor, counts_E: torch.Tensor, capacity: int) -> torch.Tensor:
    """Which slots fit: each expert takes slots in priority order, first choices of all tokens
    (in token order) before second choices (GShard). Vectorised: a stable sort by expert gives
    each slot its rank at its expert."""
    T, K = idx_TK.shape
    expert_N = idx_TK.t().flatten()  # priority order: (k, t)
    order_N = expert_N.argsort(stable=True)
    starts_E = counts_E.cumsum(0) - counts_E
    rank_sorted = torch.arange(T * K, device=idx_TK.device) - starts_E[expert_N[order_N]]
    rank_N = torch.empty_like(rank_sorted)
    rank_N[order_N] = rank_sorted
    return (rank_N < capacity).view(K, T).t()


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = -1):
        super().__init__()
        self.kind, self.layer = cfg.router, layer
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.norm_topk_prob = cfg.norm_topk_prob and cfg.router in ("softmax", "sigmoid")
        self.scaling, self.n_group, self.topk_group = cfg.routed_scaling, cfg.n_group, cfg.topk_group
        self.group_score_top = cfg.group_score_top
        self.capacity_factor, self.seq_aux = cfg.capacity_factor, cfg.seq_aux_loss_coef > 0
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        if cfg.noisy_gating:
            self.noise_weight = nn.Parameter(torch.zeros(cfg.n_experts, cfg.d_model))
        if cfg.router == "sigmoid" or cfg.bias_update_rate > 0:
            self.register_buffer("selection_bias", torch.zeros(cfg.n_experts))
        # data-parallel training sets this: (counts_E, slots) -> each expert's share of the slots of
        # the whole micro-batch, all ranks' (moelab.train.distributed.batch_share)
        self.batch_share = None

    def _group_mask(self, choice_TE: torch.Tensor) -> torch.Tensor:
        T, E, G = choice_TE.shape[0], self.n_experts, self.n_group
        per_group = choice_TE.view(T, G, E // G)
        group_score_TG = per_group.topk(min(self.group_score_top, E // G), dim=-1).values.sum(dim=-1)
        best_TG = group_score_TG.topk(self.topk_group, dim=-1).indices
        allowed_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_TG, True)
        return allowed_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)

    def forward(self, x_TD: torch.Tensor, n_seqs: int = 1, route_cache: dict | None = None,
                stats: bool = True) -> RouterOutput:
        """`route_cache`: under activation checkpointing, the first forward stores its expert choices
        there and the recomputation reuses them, so backward always sees the routing the forward
        used (even if a recomputed logit would tip a top-k tie the other way). `stats=False`: no
        balance terms (None), for a forward that has no use for them: a decoded token spent 7-8% of
        its time on them (exp3, CPU)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self._route(x_TD.float(), n_seqs, route_cache, stats)

    def _route(self, x_TD: torch.Tensor, n_seqs: int, route_cache: dict | None = None,
               stats: bool = True) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.n_experts, self.top_k
        logits_TE = F.linear(x_TD, self.weight.float())
        if self.training and hasattr(self, "noise_weight"):
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        if self.kind == "sigmoid":
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)  # for the balance losses
        else:
            scores_TE = probs_TE = logits_TE.softmax(dim=-1)
        choice_TE = logits_TE if self.kind == "topk_softmax" else scores_TE
        if hasattr(self, "selection_bias"):
            choice_TE = choice_TE + self.selection_bias.float()
        if self.n_group > 1:
            choice_TE = choice_TE.masked_fill(~self._group_mask(choice_TE), float("-inf"))
        if route_cache is not None and "idx_TK" in route_cache:
            idx_TK = route_cache["idx_TK"]  # recomputation: route as the first forward did
        else:
            with torch.no_grad():  # a choice has no gradient; recomputation then saves the same tensors
                idx_TK = choice_TE.topk(K, dim=-1).indices
            if route_cache is not None:
                route_cache["idx_TK"] = idx_TK
        if self.kind == "topk_softmax":
            weights_TK = logits_TE.gather(1, idx_TK).softmax(dim=-1)
        else:
            weights_TK = scores_TE.gather(1, idx_TK)
            if self.norm_topk_prob:
                eps = 1e-20 if self.kind == "sigmoid" else 0.0
                weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + eps)
        if self.scaling != 1.0:
            weights_TK = weights_TK * self.scaling
        # Not bincount: on CUDA it reads the largest index back to the host (a sync per layer).
        flat_N = idx_TK.flatten()
        counts_E = flat_N.new_zeros(E).scatter_add_(0, flat_N, torch.ones_like(flat_N))
        if self.capacity_factor > 0:
            cap = expert_capacity(self.capacity_factor, T, K, E)
            weights_TK = torch.where(capacity_keep(idx_TK, counts_E, cap), weights_TK, 0.0)
            dropped_E = counts_E - counts_E.clamp(max=cap)
        else:
            dropped_E = torch.zeros_like(counts_E)
        if not stats:
            return RouterOutput(weights_TK, idx_TK, counts_E, dropped_E, None, None, None, self.layer)
        # aux = E * sum_e f_e * P_e, f_e = share of the T*K assignments (no gradient),
        # P_e = mean router probability (carries the gradient). Equals 1 when uniform.
        if self.training and self.batch_share is not None:  # recomputation reuses the forward's shares
            f_E = route_cache.get("f_E") if route_cache is not None else None
            if f_E is None:
                f_E = self.batch_share(counts_E, T * K)
                if route_cache is not None:
                    route_cache["f_E"] = f_E
        else:
            f_E = counts_E.float() / max(T * K, 1)
        aux_loss = E * (f_E * probs_TE.mean(dim=0)).sum()
        # Sequence-wise (DeepSeek-V3 eq. 17-20): the same quantity within each sequence, averaged.
        # Computed only when its coefficient is non-zero (it costs a scatter per layer).
        seq_aux_loss = aux_loss.new_zeros(())
        if self.seq_aux:
            B = n_seqs if n_seqs > 0 and T % n_seqs == 0 else 1
            S = T // B
            counts_BE = torch.zeros(B, E, device=x_TD.device).scatter_add_(
                1, idx_TK.view(B, S * K), torch.ones(B, S * K, device=x_TD.device))
            seq_aux_loss = (E / (S * K) * counts_BE * probs_TE.view(B, S, E).mean(dim=1)).sum(dim=1).mean()
        z_loss = torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        return RouterOutput(weights_TK, idx_TK, counts_E, dropped_E, aux_loss, seq_aux_loss, z_loss,
                            self.layer)


@torch.no_grad()
def update_selection_bias(routers: list[Router], counts_LE: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): after an optimizer update, raise the selection bias of
    under-loaded experts and lower it for over-loaded ones by `rate`. `counts_LE` must hold the
    tokens each expert received over the whole update (all accumulation micro-batches, all ranks)."""
    for router, counts_E in zip(routers, counts_LE):
        load = counts_E.float()
        router.selection_bias.add_(rate * torch.sign(load.mean() - load))


