"""The causal decoder LM: pre-norm blocks of attention + feed-forward, returning loss, logits, routing.

Each block's feed-forward is an MoE (`block.moe`) or, for the first `first_k_dense` layers and in
dense models (n_experts=0), a dense MLP (`block.mlp`).

Shapes: B batch, S sequence, D model dim, V vocabulary.
`targets[b, t]` is the token to predict at position t (already shifted by the caller; -100 ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moelab.config import ModelConfig
from moelab.models.attention import build_attention, rotary_dim
from moelab.models.experts import residual_std
from moelab.models.kvcache import KVCache, LayerCache
from moelab.models.layers import MLP, RMSNorm, init_normal_, rope_cache
from moelab.models.loss import IGNORE_INDEX, linear_cross_entropy
from moelab.models.moe import MoE
from moelab.models.router import Router, RouterOutput


@dataclass
class ModelOutput:
    """`logits` (B, S, V) are computed from `hidden` (the final norm's output, divided by
    model.logits_divisor where it is not 1: the head's input) on first access
    when the forward did not compute them: the loss was fused with the projection (see
    `moelab.models.loss`), or the caller asked for `logits=False` to take only the positions or
    row chunks it needs through `project` (a (B, S, V) tensor is 2.4 MB per position at a
    152K vocabulary in fp32)."""

    hidden: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + each balance term times its coefficient
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # mean over MoE layers
    seq_aux_loss: torch.Tensor | None = None  # mean over MoE layers
    z_loss: torch.Tensor | None = None  # mean over MoE layers
    router: list[RouterOutput] = field(default_factory=list)  # one per MoE layer, in layer order
    _head: nn.Module | None = field(default=None, repr=False)
    _logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.project(self.hidden)
        return self._logits

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """The output head applied to hidden states `h` (..., D): some rows of `hidden`."""
        return self._head(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.residual_scale = cfg.residual_scale
        if cfg.is_moe_layer(layer):
            self.moe = MoE(cfg, layer)
        else:
            self.mlp = MLP(cfg.d_model, cfg.dense_dim, cfg.ffn_act, cfg.ffn_glu)

    def forward(self, x_BSD, cos_SR, sin_SR, route_cache: dict | None = None, kv: LayerCache | None = None,
                stats: bool = True):
        r = self.residual_scale
        a_BSD = self.attn(self.attn_norm(x_BSD), cos_SR, sin_SR, kv)
        x_BSD = x_BSD + a_BSD if r == 1.0 else x_BSD + a_BSD * r
        h_BSD = self.mlp_norm(x_BSD)
        routing = None
        if hasattr(self, "moe"):
            y_BSD, routing = self.moe(h_BSD, route_cache, stats)
        else:
            y_BSD = self.mlp(h_BSD)
        return (x_BSD + y_BSD if r == 1.0 else x_BSD + y_BSD * r), routing


# torch's CPU allocator starts every tensor on a 64-byte boundary (a cache line, an AVX-512 load).
ALIGNMENT = 64
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weights_dtype(value: torch.dtype | str | None) -> torch.dtype:
    """The dtype to hold a loaded model's weights in: a torch dtype or its name ("fp32", "bf16",
    "fp16", "bfloat16", ...); None is fp32."""
    if value is None:
        return torch.float32
    named = {**WEIGHT_DTYPES, **{str(d).removeprefix("torch."): d for d in WEIGHT_DTYPES.values()}}
    dtype = named.get(value) if isinstance(value, str) else value
    if dtype not in WEIGHT_DTYPES.values():
        raise ValueError(f"weights dtype {value!r}: give fp32, bf16 or fp16")
    return dtype


def held_as(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the tensor `name` (moelab's name) is held in when a model's weights are loaded
    in `dtype`: the routers' (weights, noise weights, selection bias) stay fp32, since router math
    is fp32 and a rounded weight or bias flips top-k choices (transformers' DeepSeek-V3 and
    GLM4-MoE keep theirs in fp32 too); a few thousand numbers per layer."""
    return torch.float32 if ".router." in name else dtype


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy of it where its data does not start on an ALIGNMENT boundary.
    Weights read from a safetensors file on the CPU are views of the mapped file at 8-byte offsets,
    and `torch._grouped_mm` in torch 2.10 refuses a weight that is not 16-byte aligned ("expected
    data_ptr to be aligned to 16 bytes"), so evaluating a saved run failed there for half the files.
    Only CPU tensors are checked: a tensor read onto a GPU is a fresh allocation."""
    if t.device.type != "cpu" or t.data_ptr() % ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _allocate(module: nn.Module, device: torch.device) -> None:
    """Uninitialised storage on `device` for every parameter and buffer of a model built on the
    meta device, keeping shared parameters shared (`Module.to_empty` unties them, and its meta
    `empty_like` imports sympy: a second on the first call)."""
    new: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if id(p) not in new:
                new[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad)
            setattr(m, name, new[id(p)])
        for name, b in list(m.named_buffers(recurse=False)):
            m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None, init: bool = True):
        """The model on `device` (default: torch's current default device) with moelab's random
        init, drawn from the CPU generator whatever the device (`reset_parameters`). The modules
        are laid out on the meta device first, so no time goes on torch's own per-layer init that
        ours replaces (two thirds of the build time), and a GPU model is never whole in host memory.
        `init=False` leaves the weights uninitialised, for a caller that loads them next."""
        super().__init__()
        assert cfg.vocab_size > 0 and cfg.head_dim > 0, "resolve the config before building"
        self.cfg = cfg
        target = torch.device(device) if device is not None else torch.get_default_device()
        with torch.device("meta"):
            # given its weight, Embedding skips its own init (normal_ on meta costs a 1 s import)
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
            self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        _allocate(self, target)
        cos, sin = self._rope_tables(target)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Activation checkpointing per block: activations are recomputed in backward instead of
        # stored. Expert choices of the first forward are reused by the recomputation.
        self.activation_checkpointing = False
        if init and target.type != "meta":  # (a meta tensor has no values; its normal_ imports sympy)
            self.reset_parameters()

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Computed on the CPU (the same values on every device), then moved to `device`; on the
        meta device only their shape (its trigonometry imports sympy: a second)."""
        if device.type == "meta":
            shape = (self.cfg.max_seq_len, rotary_dim(self.cfg))
            return torch.empty(shape, device=device), torch.empty(shape, device=device)
        with torch.device("cpu"):
            tables = rope_cache(self.cfg, self.cfg.max_seq_len, rotary_dim(self.cfg))
        return tuple(t.to(device) for t in tables)

    @classmethod
    def from_weights(cls, cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> "MoETransformer":
        """The model holding these tensors (assigned, not copied), in eval mode. Built on the meta
        device, so no memory is allocated and no time spent on a random init that the weights would
        replace: loading needs the weights' memory once, not twice. With tied embeddings either
        of the two names may be given (safetensors keeps one of a shared pair). A tensor that does
        not start on a 64-byte boundary (a safetensors file mapped from disk puts each at an
        8-byte offset) is copied to one that does (`aligned`). `dtype`: each tensor cast to
        `held_as(name, dtype)` (bf16 or fp16 for inference in half the memory); the RoPE tables
        are fp32 either way."""
        sd = {name: aligned(t if dtype is None else t.to(held_as(name, dtype))) for name, t in state_dict.items()}
        if cfg.tie_embeddings:
            for a, b in (("embed.weight", "lm_head.weight"), ("lm_head.weight", "embed.weight")):
                if a not in sd and b in sd:
                    sd[a] = sd[b]
        model = cls(cfg, device="meta", init=False)
        model.load_state_dict(sd, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        model.rope_cos, model.rope_sin = model._rope_tables(model.embed.weight.device)
        return model.eval()

    @property
    def routers(self) -> list[Router]:
        return [blk.moe.router for blk in self.blocks if hasattr(blk, "moe")]

    def reset_parameters(self) -> None:
        """Normal(init_std) for every matrix, residual-scaled std for the projections that write
        into the residual stream, zeros for biases and the selection bias, ones for norms: every
        parameter and buffer (the model is built with uninitialised storage)."""
        c = self.cfg
        out_std = residual_std(c.init_std, c.n_layers)
        init_normal_(self.embed.weight, std=c.init_std)
        if not c.tie_embeddings:
            init_normal_(self.lm_head.weight, std=c.init_std)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for blk in self.blocks:
            out_proj = {id(m) for m in blk.attn.output_projections()}
            ffns = [blk.mlp] if hasattr(blk, "mlp") else ([blk.moe.shared] if hasattr(blk.moe, "shared") else [])
            out_proj |= {id(f.down_proj) for f in ffns}
            for mod in (blk.attn, *ffns):
                for m in mod.modules():
                    if isinstance(m, nn.Linear):
                        init_normal_(m.weight, std=out_std if id(m) in out_proj else c.init_std)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
            if hasattr(blk, "moe"):
                router = blk.moe.router
                init_normal_(router.weight, std=c.router_init_std)
                if hasattr(router, "noise_weight"):
                    nn.init.zeros_(router.noise_weight)
                if hasattr(router, "selection_bias"):
                    nn.init.zeros_(router.selection_bias)
                if hasattr(blk.moe, "shared_gate"):
                    init_normal_(blk.moe.shared_gate.weight, std=c.init_std)
                blk.moe.experts.reset_parameters(c.init_std, out_std)

    def new_cache(self, max_len: int | None = None, pad: torch.Tensor | None = None) -> KVCache:
        """An empty KV cache for incremental decoding (up to model.max_seq_len positions). `pad`:
        each batch row's left padding, for prompts of different lengths decoded together."""
        return KVCache(len(self.blocks), min(max_len or self.rope_cos.shape[0], self.rope_cos.shape[0]), pad)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, logits: bool = True) -> ModelOutput:
        """`cache`: continue from the positions it holds (input_ids are the next tokens) and append
        their keys/values to it. `logits=False`: leave the (B, S, V) logits uncomputed (see
        ModelOutput.project)."""
        S = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        if start + S > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {start + S} exceeds model.max_seq_len {self.rope_cos.shape[0]}")
        pos_BS = cache.next_positions(S) if cache is not None else None  # left-padded rows only
        if pos_BS is None:
            cos_SR, sin_SR = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        else:  # (B, 1, S, R): each row from its own first token
            cos_SR, sin_SR = self.rope_cos[pos_BS].unsqueeze(1), self.rope_sin[pos_BS].unsqueeze(1)
        x_BSD = self.embed(input_ids)
        if self.cfg.embed_scale != 1.0:
            x_BSD = x_BSD * self.cfg.embed_scale
        routing = []
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        # the routers' balance terms where a loss or a gradient may use them (not decoding, say)
        stats = targets is not None or torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            if ckpt:
                x_BSD, r = checkpoint(blk, x_BSD, cos_SR, sin_SR, {}, use_reentrant=False)
            else:
                x_BSD, r = blk(x_BSD, cos_SR, sin_SR, kv=cache.layers[i] if cache is not None else None,
                               stats=stats)
            if r is not None:
                routing.append(r)
        h_BSD = self.norm(x_BSD)
        if self.cfg.logits_divisor != 1.0:  # (h / d) W^T: every path to the logits, the fused loss's too
            h_BSD = h_BSD / self.cfg.logits_divisor
        out = ModelOutput(hidden=h_BSD, router=routing, _head=self.lm_head)
        if targets is not None and self.fuses_loss:
            # projection and loss fused in row chunks: no (B, S, V) logits (moelab.models.loss),
            # under torch.compile too (a custom op: inductor would materialise the logits)
            out.lm_loss = linear_cross_entropy(h_BSD.flatten(0, 1), self.lm_head.weight, targets.flatten())
        elif targets is not None or logits:
            out._logits = self.lm_head(h_BSD)
            if targets is not None:
                out.lm_loss = F.cross_entropy(out._logits.float().flatten(0, 1), targets.flatten(),
                                              ignore_index=IGNORE_INDEX)
        if targets is not None:
            zero = out.lm_loss.new_zeros(())
            terms = {"aux_loss": self.cfg.aux_loss_coef, "seq_aux_loss": self.cfg.seq_aux_loss_coef,
                     "z_loss": self.cfg.z_loss_coef}
            out.loss = out.lm_loss
            for name, coef in terms.items():
                value = torch.stack([getattr(r, name) for r in routing]).mean() if routing else zero
                setattr(out, name, value)
                if coef:
                    out.loss = out.loss + coef * value
        return out

    @property
    def fuses_loss(self) -> bool:
        """Whether a forward with targets fuses projection and loss (moelab.models.loss). The fused
        loss reads lm_head.weight directly, so only for a plain Linear head: not one wrapped by an
        adapter (LoRA) or sharded by FSDP2 (fully_shard swaps the class, and its unshard runs on
        the module's own forward)."""
        return type(self.lm_head) is nn.Linear and self.lm_head.bias is None

    def num_parameters(self) -> dict[str, int]:
        """Total and active-per-token parameter counts (tied weights counted once)."""
        from moelab.models.accounting import parameter_table

        return parameter_table(self)["total"]
