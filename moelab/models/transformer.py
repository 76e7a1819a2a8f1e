"""The causal decoder LM: pre-norm blocks of attention + MoE, returning loss, logits and routing.

Shapes: B batch, S sequence, D model dim, V vocabulary.
`targets[b, t]` is the token to predict at position t (already shifted by the caller; -100 ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import ModelConfig
from moelab.models.attention import Attention
from moelab.models.experts import residual_std
from moelab.models.layers import RMSNorm, rope_cache
from moelab.models.moe import MoE
from moelab.models.router import RouterOutput


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # mean over MoE layers
    z_loss: torch.Tensor | None = None  # mean over MoE layers
    router: list[RouterOutput] = field(default_factory=list)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoE(cfg)

    def forward(self, x_BSD, cos_SD, sin_SD):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SD, sin_SD)
        y_BSD, routing = self.moe(self.mlp_norm(x_BSD))
        return x_BSD + y_BSD, routing


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0 and cfg.head_dim > 0, "resolve the config before building"
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.cfg
        out_std = residual_std(c.init_std, c.n_layers)
        nn.init.normal_(self.embed.weight, std=c.init_std)
        if not c.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=c.init_std)
        for blk in self.blocks:
            for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj):
                nn.init.normal_(lin.weight, std=c.init_std)
            nn.init.normal_(blk.attn.o_proj.weight, std=out_std)
            nn.init.normal_(blk.moe.router.weight, std=c.router_init_std)
            blk.moe.experts.reset_parameters(c.init_std, out_std)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        S = input_ids.shape[1]
        if S > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len {self.rope_cos.shape[0]}")
        cos_SD, sin_SD = self.rope_cos[:S], self.rope_sin[:S]
        x_BSD = self.embed(input_ids)
        routing = []
        for blk in self.blocks:
            x_BSD, r = blk(x_BSD, cos_SD, sin_SD)
            routing.append(r)
        logits_BSV = self.lm_head(self.norm(x_BSD))
        out = ModelOutput(logits=logits_BSV, router=routing)
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets.flatten(),
                                          ignore_index=-100)
            out.aux_loss = torch.stack([r.aux_loss for r in routing]).mean()
            out.z_loss = torch.stack([r.z_loss for r in routing]).mean()
            out.loss = out.lm_loss
            if self.cfg.aux_loss_coef:
                out.loss = out.loss + self.cfg.aux_loss_coef * out.aux_loss
            if self.cfg.z_loss_coef:
                out.loss = out.loss + self.cfg.z_loss_coef * out.z_loss
        return out

    def num_parameters(self) -> dict[str, int]:
        """Total and active-per-token parameter counts (tied weights counted once)."""
        from moelab.models.accounting import parameter_table

        return parameter_table(self)["total"]
