"""Exact weight and config maps between moelab and Hugging Face transformers architectures.

Architectures (transformers model_type -> class):
  mixtral      MixtralForCausalLM     GQA, softmax top-k router renormalised, SwiGLU experts
  qwen3_moe    Qwen3MoeForCausalLM    GQA + per-head QK-norm, softmax router, leading dense layers
  qwen2_moe    Qwen2MoeForCausalLM    GQA + qkv bias, softmax router, a shared expert scaled by a
                                      sigmoid gate per token (Qwen1.5-MoE, Qwen2-57B-A14B)
  olmoe        OlmoeForCausalLM       GQA + QK-norm over all heads, softmax router
  deepseek_v3  DeepseekV3ForCausalLM  MLA, sigmoid router with selection bias and groups, shared
                                      experts, first_k_dense, (interleaved) RoPE, yarn
  deepseek_v2  DeepseekV2ForCausalLM  MLA (interleaved RoPE), softmax router without renormalisation,
                                      groups scored by their best expert, shared experts (DeepSeek-V2, -Lite)
  glm4_moe     Glm4MoeForCausalLM     GQA + qkv bias, optional QK-norm, partial rotary, DeepSeek MoE
  glm4_moe_lite Glm4MoeLiteForCausalLM MLA + GLM4's MoE: DeepSeek-V3's design under GLM's names
                                      (GLM-4.7-Flash); `--arch glm4_moe_lite`, auto picks deepseek_v3
  dots1        Dots1ForCausalLM       Qwen3's attention (per-head QK-norm, biases on all four projections
                                      or none) + DeepSeek-V3's MoE (dots.llm1)
  minimax_m2   MiniMaxM2ForCausalLM   GQA + QK-norm over all heads, partial rotary, sigmoid router
                                      choosing with a selection bias, no shared experts (MiniMax-M2)
  ernie4_5_moe Ernie4_5_MoeForCausalLM GQA, interleaved RoPE, softmax router whose choice adds a
                                      selection bias (ERNIE 4.5's moe_statics), shared experts
  minicpm5_moe MiniCPM5MoeForCausalLM  GQA with an output gate (sigmoid, element by element), DeepSeek-V3's MoE
                                      (MiniCPM5-MoE)
  granitemoe   GraniteMoeForCausalLM  GQA, softmax over the top-k logits, muP multipliers (embedding,
                                      residual, attention scale, logits divisor) (Granite 3.0 MoE)
  granitemoeshared GraniteMoeSharedForCausalLM  Granite MoE plus one ungated shared expert
  sarvam_moe, param2moe                read only: GLM4-MoE's model under their own configs (Sarvam-30B,
                                      Param2-17B-A2.4B); exported as glm4_moe, the same model
  llama        LlamaForCausalLM       dense baseline
  qwen3        Qwen3ForCausalLM       dense baseline with per-head QK-norm

Conversion goes through transformers' own model classes and weight conversions (an export
writes the per-expert layout that transformers' reverse conversion gives, as `save_pretrained`
would), so whatever transformers writes, it reads back. A moelab config the target cannot express
exactly is refused with every differing field named; never approximated. Training-only settings
(loss coefficients, the bias update rate) do not change the forward pass and are not refused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from moelab.config import ModelConfig
from moelab.errors import UserError, cannot_write, write_errors
from moelab.files import staged_folder
from moelab.models.presets import FAMILIES, recipe_seq_aux
from moelab.models.transformer import WEIGHT_DTYPES, held_as

ARCHS = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe", "deepseek_v3": "DeepseekV3",
         "glm4_moe": "Glm4Moe", "qwen2_moe": "Qwen2Moe", "deepseek_v2": "DeepseekV2", "ernie4_5_moe": "Ernie4_5_Moe",
         "glm4_moe_lite": "Glm4MoeLite", "dots1": "Dots1", "minimax_m2": "MiniMaxM2",
         "granitemoe": "GraniteMoe", "granitemoeshared": "GraniteMoeShared", "minicpm5_moe": "MiniCPM5Moe",
         "llama": "Llama", "qwen3": "Qwen3"}
MOE_ARCHS = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "qwen2_moe", "deepseek_v2", "ernie4_5_moe",
             "glm4_moe_lite", "dots1", "minimax_m2", "granitemoe", "granitemoeshared", "minicpm5_moe")
GRANITE_ARCHS = ("granitemoe", "granitemoeshared")
# Configs of their own that transformers runs as another architecture's model (its AutoModel maps
# them to that class, with its tensor names): read as that architecture; `export` writes it.
READ_AS = {"sarvam_moe": "glm4_moe", "param2moe": "glm4_moe"}  # Sarvam-30B, Param2-17B-A2.4B
PARTIAL_ROTARY_ARCHS = ("glm4_moe", "minimax_m2")
MLA_ARCHS = ("deepseek_v3", "deepseek_v2", "glm4_moe_lite")
# DeepSeek-V3's MoE: sigmoid, selection bias, groups
SIGMOID_ARCHS = ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "minicpm5_moe")
ACTS = {"silu": "silu", "gelu": "gelu_pytorch_tanh"}
# transformers' load-balancing loss (load_balancing_loss_func) of these counts every one of a token's
# top-k picks, so it is top_k under uniform routing where moelab's (the share of picks) is 1: their
# router_aux_loss_coef is moelab's aux_loss_coef / top_k, for the same balancing gradient.
AUX_PER_PICK = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "ernie4_5_moe", "minimax_m2", *GRANITE_ARCHS)


def _aux_coef(coef: float, top_k: int, arch: str, to_hf: bool) -> float:
    if arch not in AUX_PER_PICK:
        return coef
    return float(f"{coef / top_k if to_hf else coef * top_k:.12g}")  # 0.01 * 3 / 3 is 0.01 again


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face interop needs transformers: pip install 'moelab[hf]'") from None
    return transformers


# ---------------------------------------------------------------- moelab -> HF config

def problems(cfg: ModelConfig, arch: str) -> list[str]:
    """Every field of `cfg` that `arch` cannot express exactly, as 'field=value (arch: need)'."""
    need: dict[str, tuple[object, object]] = {"ffn_glu": (cfg.ffn_glu, True)}  # field -> (ours, arch's)
    if cfg.n_experts > 0:  # router settings: a dense model has no router they could change
        need.update(noisy_gating=(cfg.noisy_gating, False), capacity_factor=(cfg.capacity_factor, 0.0))
    moe = arch in MOE_ARCHS
    if moe != (cfg.n_experts > 0):
        return [f"model.n_experts={cfg.n_experts} ({ARCHS[arch]} is {'an MoE' if moe else 'dense'})"]
    if arch not in MLA_ARCHS:
        need["attention"] = (cfg.attention, "gqa")
        need["rope_interleave"] = (cfg.rope_interleave, False)
    if arch not in PARTIAL_ROTARY_ARCHS:
        need["partial_rotary"] = (cfg.partial_rotary, 1.0)
    need["attn_gate"] = (cfg.attn_gate, arch == "minicpm5_moe")  # MiniCPM5's attention is always gated
    if arch not in GRANITE_ARCHS:  # Granite's multipliers; elsewhere each is 1 (the default attention scale)
        need.update(embed_scale=(cfg.embed_scale, 1.0), residual_scale=(cfg.residual_scale, 1.0),
                    logits_divisor=(cfg.logits_divisor, 1.0))
        if cfg.attn_scale and cfg.attn_scale != cfg.head_dim ** -0.5:
            need["attn_scale"] = (cfg.attn_scale, 0.0)
    qk = {"mixtral": "none", "llama": "none", "qwen3_moe": "head", "qwen3": "head", "olmoe": "full", "dots1": "head",
          "minimax_m2": "full", "granitemoe": "none", "granitemoeshared": "none", "minicpm5_moe": "none"}
    if arch in qk:
        need["qk_norm"] = (cfg.qk_norm, qk[arch])
        need["out_bias"] = (cfg.out_bias, cfg.qkv_bias if arch not in ("mixtral", "minimax_m2") else False)
        if arch in ("mixtral", "minimax_m2"):
            need["qkv_bias"] = (cfg.qkv_bias, False)
    if arch == "olmoe":
        need["n_heads*head_dim"] = (cfg.n_heads * cfg.head_dim, cfg.d_model)
    if arch in MLA_ARCHS:
        need["attention"] = (cfg.attention, "mla")
    if arch == "deepseek_v2":  # its RoPE rotates (x0, x1), (x2, x3).. pairs; its config wants whole heads
        need["rope_interleave"] = (cfg.rope_interleave, True)
        need["d_model divisible by n_heads"] = (cfg.d_model % cfg.n_heads == 0, True)
    if arch == "glm4_moe":
        need["qk_norm"] = (cfg.qk_norm if cfg.qk_norm != "head" else "none", "none")
        need["out_bias"] = (cfg.out_bias, False)
    if arch == "qwen2_moe":
        need["qk_norm"] = (cfg.qk_norm, "none")
        need["out_bias"] = (cfg.out_bias, False)
    if arch == "ernie4_5_moe":  # its use_bias would bias the MLPs and the head too, which moelab's have not
        need.update(qk_norm=(cfg.qk_norm, "none"), qkv_bias=(cfg.qkv_bias, False), out_bias=(cfg.out_bias, False),
                    rope_interleave=(cfg.rope_interleave, True))
    if moe:
        need["shared_expert_gate"] = (cfg.shared_expert_gate, arch == "qwen2_moe")
        if arch in SIGMOID_ARCHS:
            need["router"] = (cfg.router, "sigmoid")
            need["shared_expert_dim"] = (cfg.shared_expert_dim, cfg.expert_dim)
            if cfg.n_group > 1:
                need["experts per group"] = (cfg.n_experts // cfg.n_group >= 2, True)
                need["group_score_top"] = (cfg.group_score_top, 2)
        elif arch == "minimax_m2":  # sigmoid; top-k of the scores plus the selection bias, renormalised
            need["router"] = (cfg.router, "sigmoid")
            need.update(norm_topk_prob=(cfg.norm_topk_prob, True), routed_scaling=(cfg.routed_scaling, 1.0),
                        n_group=(cfg.n_group, 1), n_shared_experts=(cfg.n_shared_experts, 0),
                        first_k_dense=(cfg.first_k_dense, 0))
        elif arch == "ernie4_5_moe":  # softmax; top-k of the scores plus the selection bias, renormalised
            plain = cfg.router == "topk_softmax" and cfg.bias_update_rate == 0  # the same without a bias
            need["router"] = (cfg.router if not plain else "softmax", "softmax")
            need["norm_topk_prob"] = (cfg.norm_topk_prob or plain, True)
            need["routed_scaling"] = (cfg.routed_scaling, 1.0)
            need["n_group"] = (cfg.n_group, 1)
            if cfg.n_shared_experts:
                need["shared_expert_dim"] = (cfg.shared_expert_dim, cfg.expert_dim)
        elif arch == "deepseek_v2":  # softmax, top-k, never renormalised, then scaled
            need["router"] = (cfg.router, "softmax")
            need["norm_topk_prob"] = (cfg.norm_topk_prob, False)
            need["shared_expert_dim"] = (cfg.shared_expert_dim, cfg.expert_dim)
            need["bias_update_rate"] = (cfg.bias_update_rate, 0.0)
            if cfg.n_group > 1:
                need["group_score_top"] = (cfg.group_score_top, 1)
        else:
            need["router"] = (cfg.router if cfg.router != "topk_softmax" else "softmax", "softmax")
            need["routed_scaling"] = (cfg.routed_scaling, 1.0)
            need["n_group"] = (cfg.n_group, 1)
            if arch in ("qwen2_moe", "granitemoeshared"):  # one shared expert of n_shared_experts * shared_expert_dim
                need["n_shared_experts > 0"] = (cfg.n_shared_experts > 0, True)
            else:
                need["n_shared_experts"] = (cfg.n_shared_experts, 0)
            need["bias_update_rate"] = (cfg.bias_update_rate, 0.0)  # a selection bias changes routing
            if cfg.router == "topk_softmax":  # equals softmax-then-top-k renormalised
                need["norm_topk_prob"] = (True, True)
            elif arch == "mixtral":
                need["norm_topk_prob"] = (cfg.norm_topk_prob, True)
        if arch in ("mixtral", "olmoe", *GRANITE_ARCHS):
            need["first_k_dense"] = (cfg.first_k_dense, 0)
    out = []
    for name, (have, want) in need.items():
        if have != want:
            out.append(f"model.{name}={have!r} ({ARCHS[arch]} has {want!r})")
    return out


def pick_arch(cfg: ModelConfig) -> str:
    """The one architecture that expresses this config, or an error naming what differs."""
    fits = [a for a in ARCHS if not problems(cfg, a)]
    if fits:
        return fits[0]
    order = MOE_ARCHS if cfg.n_experts else ("llama", "qwen3")
    best = min(order, key=lambda a: len(problems(cfg, a)))
    raise UserError(f"no Hugging Face architecture expresses this model exactly; closest is {best}: "
                    + "; ".join(problems(cfg, best)))


def _rope_parameters(cfg: ModelConfig, arch: str) -> dict:
    rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
            "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "yarn":
        rope.update(original_max_position_embeddings=cfg.rope_original_max_len,
                    beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
        if cfg.yarn_mscale:
            rope["mscale"] = cfg.yarn_mscale
        if cfg.yarn_mscale_all_dim:
            rope["mscale_all_dim"] = cfg.yarn_mscale_all_dim
    if cfg.rope_scaling == "llama3":
        rope.update(original_max_position_embeddings=cfg.rope_original_max_len,
                    low_freq_factor=cfg.llama3_low_freq_factor, high_freq_factor=cfg.llama3_high_freq_factor)
    if cfg.partial_rotary != 1.0 or arch in ("glm4_moe", "glm4_moe_lite", "minimax_m2"):  # GLM4-MoE's: 0.5 if not given
        rope["partial_rotary_factor"] = cfg.partial_rotary
    return rope


def hf_config(cfg: ModelConfig, arch: str = "auto"):
    _require_transformers()
    arch = pick_arch(cfg) if arch == "auto" else arch
    if arch not in ARCHS:
        raise UserError(f"unknown architecture '{arch}' (supported: {', '.join(ARCHS)})")
    bad = problems(cfg, arch)
    if bad:
        raise UserError(f"cannot export to {ARCHS[arch]} exactly: " + "; ".join(bad))
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                  hidden_act=ACTS[cfg.ffn_act], rope_parameters=_rope_parameters(cfg, arch),
                  attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch not in MLA_ARCHS:
        common.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
    if arch in ("qwen3_moe", "olmoe", "glm4_moe", "llama", "qwen3", "dots1", "minicpm5_moe"):
        common["attention_bias"] = cfg.qkv_bias
    if arch == "qwen2_moe":
        common["qkv_bias"] = cfg.qkv_bias
    moe = dict(num_experts_per_tok=cfg.top_k, router_aux_loss_coef=_aux_coef(cfg.aux_loss_coef, cfg.top_k, arch, True))
    if arch == "mixtral":
        kw = dict(intermediate_size=cfg.expert_dim, num_local_experts=cfg.n_experts, sliding_window=None,
                  router_jitter_noise=0.0, **moe)
    elif arch == "qwen3_moe":
        kw = dict(intermediate_size=cfg.dense_dim, moe_intermediate_size=cfg.expert_dim,
                  num_experts=cfg.n_experts, norm_topk_prob=cfg.norm_topk_prob or cfg.router == "topk_softmax",
                  decoder_sparse_step=1, mlp_only_layers=list(range(cfg.first_k_dense)),
                  use_sliding_window=False, **moe)
    elif arch == "qwen2_moe":
        kw = dict(intermediate_size=cfg.dense_dim, moe_intermediate_size=cfg.expert_dim,
                  shared_expert_intermediate_size=cfg.n_shared_experts * cfg.shared_expert_dim,
                  num_experts=cfg.n_experts, norm_topk_prob=cfg.norm_topk_prob or cfg.router == "topk_softmax",
                  decoder_sparse_step=1, mlp_only_layers=list(range(cfg.first_k_dense)),
                  use_sliding_window=False, **moe)
    elif arch == "minimax_m2":
        kw = dict(intermediate_size=cfg.expert_dim, num_local_experts=cfg.n_experts, router_jitter_noise=0.0, **moe)
    elif arch in GRANITE_ARCHS:
        kw = dict(intermediate_size=cfg.expert_dim, num_local_experts=cfg.n_experts, attention_bias=cfg.qkv_bias,
                  embedding_multiplier=cfg.embed_scale, residual_multiplier=cfg.residual_scale,
                  attention_multiplier=cfg.attn_scale or cfg.head_dim ** -0.5, logits_scaling=cfg.logits_divisor,
                  **moe)
        if arch == "granitemoeshared":
            kw["shared_intermediate_size"] = cfg.n_shared_experts * cfg.shared_expert_dim
    elif arch == "ernie4_5_moe":
        kw = dict(intermediate_size=cfg.dense_dim, moe_intermediate_size=cfg.expert_dim, moe_k=cfg.top_k,
                  moe_num_experts=cfg.n_experts, moe_num_shared_experts=cfg.n_shared_experts,
                  moe_layer_start_index=cfg.first_k_dense, moe_layer_end_index=cfg.n_layers - 1,
                  moe_layer_interval=1, use_bias=False, router_aux_loss_coef=moe["router_aux_loss_coef"])
    elif arch == "olmoe":
        kw = dict(intermediate_size=cfg.expert_dim, num_experts=cfg.n_experts, clip_qkv=None,
                  norm_topk_prob=cfg.norm_topk_prob or cfg.router == "topk_softmax", **moe)
    elif arch in ("deepseek_v3", "glm4_moe", "deepseek_v2", "glm4_moe_lite", "dots1", "minicpm5_moe"):
        kw = dict(intermediate_size=cfg.dense_dim, moe_intermediate_size=cfg.expert_dim,
                  n_routed_experts=cfg.n_experts, n_shared_experts=cfg.n_shared_experts,
                  routed_scaling_factor=cfg.routed_scaling, n_group=cfg.n_group, topk_group=cfg.topk_group,
                  first_k_dense_replace=cfg.first_k_dense, norm_topk_prob=cfg.norm_topk_prob,
                  num_experts_per_tok=cfg.top_k)
        if arch in MLA_ARCHS:
            kw.update(num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None,
                      kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
                      qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, attention_bias=False)
        if arch in ("deepseek_v3", "glm4_moe_lite"):
            kw["rope_interleave"] = cfg.rope_interleave
        if arch in ("glm4_moe_lite", "minicpm5_moe"):  # their dense layers are listed, not counted
            kw["mlp_layer_types"] = ["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.n_layers)]
            del kw["first_k_dense_replace"]
        elif arch == "deepseek_v2":
            kw.update(topk_method="group_limited_greedy" if cfg.n_group > 1 else "greedy", mlp_bias=False)
            # DeepSeek's own fields for its balance loss (transformers keeps them; `_deepseek_v2_routing`
            # reads them back): alpha in every MoE layer, per sequence or per batch
            per_seq = cfg.seq_aux_loss_coef > 0 or cfg.aux_loss_coef == 0
            coef = cfg.seq_aux_loss_coef if per_seq else cfg.aux_loss_coef
            kw.update(aux_loss_alpha=float(f"{coef / len(cfg.moe_layers):.12g}"), seq_aux=per_seq)
        elif arch == "dots1":  # every layer's attention full, none sliding
            kw.update(sliding_window=None, layer_types=["full_attention"] * cfg.n_layers)
        elif arch == "minicpm5_moe":  # no QK-norm field: never normed
            pass
        else:
            kw.update(use_qk_norm=cfg.qk_norm == "head")
    else:  # llama, qwen3
        kw = dict(intermediate_size=cfg.dense_dim)
        if arch == "llama":
            kw["mlp_bias"] = False
        else:
            kw["use_sliding_window"] = False
    return _hf_class(arch, "Config")(**common, **kw)


def _hf_class(arch: str, kind: str):
    """transformers' class of `arch` (kind: Config or ForCausalLM), or an error saying to upgrade where
    the installed transformers predates the architecture."""
    transformers = _require_transformers()
    cls = getattr(transformers, ARCHS[arch] + kind, None)
    if cls is None:
        raise UserError(f"the installed transformers {transformers.__version__} has no {ARCHS[arch]}{kind}: "
                        "pip install -U transformers")
    return cls


# ---------------------------------------------------------------- HF -> moelab config

def _refuse(arch: str, field: str, have, want) -> UserError:
    return UserError(f"cannot convert this {ARCHS.get(arch, arch)} exactly: {field}={have!r} "
                     f"(moelab supports {want!r})")


def model_config_from_hf(hf) -> ModelConfig:
    arch = READ_AS.get(hf.model_type, hf.model_type)
    if arch not in ARCHS:
        raise UserError(f"unsupported architecture '{arch}' (supported: {', '.join([*ARCHS, *READ_AS])})")
    g = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    acts = {v: k for k, v in ACTS.items()} | {"gelu_new": "gelu"}
    if g("hidden_act") not in acts:
        raise _refuse(arch, "hidden_act", g("hidden_act"), list(ACTS.values()))
    rope = dict(g("rope_parameters") or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear", "yarn", "llama3"):
        raise _refuse(arch, "rope_type", rope_type, ["default", "linear", "yarn", "llama3"])
    for name, want in (("sliding_window", None), ("router_jitter_noise", 0.0), ("clip_qkv", None),
                       ("mlp_bias", False), ("decoder_sparse_step", 1), ("use_sliding_window", False)):
        have = g(name, want)
        if name == "sliding_window" and arch not in ("mixtral",):
            continue  # Qwen3 keeps a window value but only uses it with use_sliding_window
        if have != want and not (name == "sliding_window" and have >= hf.max_position_embeddings):
            raise _refuse(arch, name, have, want)
    if not (isinstance(hf.vocab_size, int) and hf.vocab_size >= 1):  # 0 is moelab's "the tokenizer's": it crashed
        raise UserError(f"config.json gives vocab_size={hf.vocab_size!r}; a model needs at least 1 token: "
                        "fix it, or use the model's own config.json")
    if not (isinstance(hf.max_position_embeddings, int) and hf.max_position_embeddings >= 2):  # said as train.seq_len
        raise UserError(f"config.json gives max_position_embeddings={hf.max_position_embeddings!r}; a model needs a "
                        "context of at least 2 positions: fix it, or use the model's own config.json")
    n_heads = hf.num_attention_heads
    m = ModelConfig(
        vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=n_heads,
        max_seq_len=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
        tie_embeddings=bool(hf.tie_word_embeddings), ffn_act=acts[hf.hidden_act],
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        partial_rotary=float(rope.get("partial_rotary_factor", 1.0)) if arch in PARTIAL_ROTARY_ARCHS else 1.0,
        rope_scaling="none" if rope_type == "default" else rope_type,
        rope_factor=float(rope.get("factor") or 1.0),
        rope_original_max_len=int(rope.get("original_max_position_embeddings") or 0),
        yarn_beta_fast=float(rope.get("beta_fast") or 32.0), yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
        yarn_mscale=float(rope.get("mscale") or 0.0), yarn_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        llama3_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        llama3_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        dense_dim=g("intermediate_size"), n_experts=0, aux_loss_coef=0.0)
    if rope_type == "yarn" and rope.get("attention_factor") is not None:
        raise _refuse(arch, "rope_parameters.attention_factor", rope["attention_factor"], None)
    if arch in MLA_ARCHS:
        m.attention = "mla"
        m.q_lora_rank = hf.q_lora_rank or 0
        m.kv_lora_rank, m.qk_rope_head_dim = hf.kv_lora_rank, hf.qk_rope_head_dim
        m.qk_nope_head_dim, m.v_head_dim = hf.qk_nope_head_dim, hf.v_head_dim
        m.rope_interleave = arch == "deepseek_v2" or bool(hf.rope_interleave)  # V2's is always interleaved
        if arch == "glm4_moe_lite" and float(rope.get("partial_rotary_factor", 1.0)) != 1.0:  # rotates less than
            raise _refuse(arch, "partial_rotary_factor", rope["partial_rotary_factor"], 1.0)  # qk_rope_head_dim
        m.head_dim, m.n_kv_heads = m.qk_nope_head_dim + m.qk_rope_head_dim, n_heads
        if hf.attention_bias:
            raise _refuse(arch, "attention_bias", True, False)
        if hf.num_key_value_heads != n_heads:
            raise _refuse(arch, "num_key_value_heads", hf.num_key_value_heads, n_heads)
    else:
        m.head_dim = g("head_dim") or hf.hidden_size // n_heads
        m.n_kv_heads = g("num_key_value_heads") or n_heads
        bias = bool(g("qkv_bias", False) if arch == "qwen2_moe" else g("attention_bias", False))
        m.qkv_bias, m.out_bias = bias, bias and arch not in ("glm4_moe", "qwen2_moe")
        m.qk_norm = {"qwen3_moe": "head", "qwen3": "head", "olmoe": "full", "dots1": "head",
                     "minimax_m2": "full"}.get(arch, "none")
        m.attn_gate = arch == "minicpm5_moe"
        types = g("layer_types") or []
        if arch == "dots1" and any(t != "full_attention" for t in types):  # a window moelab does not apply
            raise _refuse(arch, "layer_types", sorted(set(types)), ["full_attention"])
        if arch == "glm4_moe" and hf.use_qk_norm:
            m.qk_norm = "head"
    if arch in MOE_ARCHS:
        m.top_k = hf.num_experts_per_tok
        m.aux_loss_coef = _aux_coef(float(g("router_aux_loss_coef", 0.0) or 0.0), m.top_k, arch, False)
        m.norm_topk_prob = bool(g("norm_topk_prob", True))
        if arch == "mixtral":
            m.n_experts, m.expert_dim = hf.num_local_experts, hf.intermediate_size
        elif arch == "olmoe":
            m.n_experts, m.expert_dim = hf.num_experts, hf.intermediate_size
        elif arch == "ernie4_5_moe":
            _ernie_moe(hf, m)
        elif arch in GRANITE_ARCHS:  # softmax over the top-k logits: softmax, top-k, renormalised
            m.n_experts, m.expert_dim = hf.num_local_experts, hf.intermediate_size
            m.embed_scale, m.residual_scale = float(hf.embedding_multiplier), float(hf.residual_multiplier)
            m.attn_scale, m.logits_divisor = float(hf.attention_multiplier), float(hf.logits_scaling)
            shared = g("shared_intermediate_size", 0) or 0
            m.n_shared_experts, m.shared_expert_dim = (1, shared) if shared else (0, 0)
        elif arch == "minimax_m2":  # aux-loss-free bias updates, as its selection bias was trained, and its aux loss
            m.n_experts, m.expert_dim = hf.num_local_experts, hf.intermediate_size
            m.router, m.norm_topk_prob = "sigmoid", True
            m.bias_update_rate = FAMILIES["deepseek_v3"]["bias_update_rate"]
        elif arch in ("qwen3_moe", "qwen2_moe"):
            m.n_experts, m.expert_dim = hf.num_experts, hf.moe_intermediate_size
            if arch == "qwen2_moe":
                if not hf.shared_expert_intermediate_size:
                    raise _refuse(arch, "shared_expert_intermediate_size", hf.shared_expert_intermediate_size,
                                  "a shared expert of width > 0")
                m.n_shared_experts, m.shared_expert_dim = 1, hf.shared_expert_intermediate_size
                m.shared_expert_gate = True
            k = len(hf.mlp_only_layers)
            if sorted(hf.mlp_only_layers) != list(range(k)):
                raise _refuse(arch, "mlp_only_layers", hf.mlp_only_layers, "the first k layers")
            m.first_k_dense = k
        else:  # deepseek_v3, glm4_moe, deepseek_v2, glm4_moe_lite, dots1, minicpm5_moe
            m.n_experts, m.expert_dim = hf.n_routed_experts, hf.moe_intermediate_size
            m.router, m.routed_scaling = "sigmoid", float(hf.routed_scaling_factor)
            m.n_group, m.topk_group = hf.n_group or 1, hf.topk_group or 1
            m.n_shared_experts, m.shared_expert_dim = hf.n_shared_experts or 0, hf.moe_intermediate_size
            m.first_k_dense = min(g("first_k_dense_replace") or 0, m.n_layers)
            if arch in ("glm4_moe_lite", "minicpm5_moe"):
                types = list(hf.mlp_layer_types)
                m.first_k_dense = types.count("dense")
                if types != ["dense"] * m.first_k_dense + ["sparse"] * (m.n_layers - m.first_k_dense):
                    raise _refuse(arch, "mlp_layer_types", types, "dense layers first, then sparse ones")
            # transformers has no field for how these are balanced in training: their own recipe
            # (aux-loss-free bias updates and a small sequence-wise loss), as the family presets have it
            family = {"glm4_moe_lite": "glm4_moe", "dots1": "deepseek_v3"}.get(arch, arch)
            m.bias_update_rate = FAMILIES[family]["bias_update_rate"]
            if arch == "deepseek_v2":
                m.seq_aux_loss_coef = FAMILIES[family]["seq_aux_loss_coef"]
                _deepseek_v2_routing(hf, m)
            else:
                m.seq_aux_loss_coef = recipe_seq_aux(family, m)
    m.dense_dim = m.dense_dim or 4 * m.d_model
    m.shared_expert_dim = m.shared_expert_dim or m.expert_dim
    return m


def _ernie_moe(hf, m: ModelConfig) -> None:
    """ERNIE 4.5's MoE layers: layers moe_layer_start_index to the last (every one: moelab's are the
    last n_layers - first_k_dense), a softmax router choosing by score + selection bias, renormalised.
    The bias is held where moelab trains it, updated as ERNIE's training updated it (the family's rate)."""
    if hf.use_bias:
        raise _refuse("ernie4_5_moe", "use_bias", True, False)
    start, end, every = hf.moe_layer_start_index, hf.moe_layer_end_index, hf.moe_layer_interval
    if every != 1 or end not in (-1, m.n_layers - 1) or not 0 <= start < m.n_layers:
        raise _refuse("ernie4_5_moe", "MoE layers (moe_layer_start_index, moe_layer_end_index, moe_layer_interval)",
                      (start, end, every), "from a start index to the last layer, every layer")
    m.n_experts, m.top_k, m.expert_dim = hf.moe_num_experts, hf.moe_k, hf.moe_intermediate_size
    m.n_shared_experts, m.shared_expert_dim = hf.moe_num_shared_experts or 0, hf.moe_intermediate_size
    m.first_k_dense, m.norm_topk_prob, m.rope_interleave = start, True, True
    m.bias_update_rate = FAMILIES["ernie4_5_moe"]["bias_update_rate"]


def _deepseek_v2_routing(hf, m: ModelConfig) -> None:
    """DeepSeek-V2's router as transformers runs it: softmax, top-k (within the topk_group groups
    whose best expert scores highest, for topk_method group_limited_greedy), never renormalised
    (it ignores norm_topk_prob), times routed_scaling_factor. Its balancing, where the Hub config
    gives aux_loss_alpha: the expert-level loss on each sequence (moelab's sequence-wise loss; on the
    batch without seq_aux), alpha in every MoE layer; moelab averages the layers' terms, so its
    coefficient is alpha x the MoE layers, for the same gradient."""
    method = getattr(hf, "topk_method", "greedy") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise _refuse("deepseek_v2", "topk_method", method, ["greedy", "group_limited_greedy"])
    m.router, m.norm_topk_prob, m.bias_update_rate = "softmax", False, 0.0
    if method == "greedy":
        m.n_group = m.topk_group = 1
    else:
        m.group_score_top = 1
    alpha = getattr(hf, "aux_loss_alpha", None)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha >= 0:
        coef = float(f"{alpha * len(m.moe_layers):.12g}")
        per_seq = getattr(hf, "seq_aux", True) is not False
        m.seq_aux_loss_coef, m.aux_loss_coef = (coef, 0.0) if per_seq else (0.0, coef)


# ---------------------------------------------------------------- weights

# (moelab suffix within a block, HF suffix within a layer); the first match wins, both ways.
_LAYER_RENAMES = [
    ("attn_norm.", "input_layernorm."), ("mlp_norm.", "post_attention_layernorm."),
    ("attn.kv_a_proj.", "self_attn.kv_a_proj_with_mqa."), ("attn.kv_a_norm.", "self_attn.kv_a_layernorm."),
    ("attn.q_a_norm.", "self_attn.q_a_layernorm."), ("attn.", "self_attn."),
    ("moe.router.weight", "mlp.gate.weight"), ("moe.router.selection_bias", "mlp.gate.e_score_correction_bias"),
    ("moe.shared.", "mlp.shared_experts."), ("moe.shared_gate.", "mlp.shared_expert_gate."),
    ("moe.experts.down_proj", "mlp.experts.down_proj"), ("moe.experts.gate_up_proj", "mlp.experts.gate_up_proj"),
    ("mlp.", "mlp."),
]
# moe.experts.gate_up_proj and moe.shared.gate_up_proj.weight are no moelab tensors: the names of the
# fused gate and up projections, (E, 2F, D) and (2F, D), that transformers holds, gate first
_GRANITE = [("moe.router.weight", "block_sparse_moe.router.weight"),
            ("moe.experts.down_proj", "block_sparse_moe.experts.down_proj"),
            ("moe.experts.gate_up_proj", "block_sparse_moe.experts.gate_up_proj")]
# transformers before its GraniteMoeExperts (5.0 among them) held the same tensors under the checkpoints' names
_GRANITE_LEGACY = [("moe.router.weight", "block_sparse_moe.router.layer.weight"),
                   ("moe.experts.down_proj", "block_sparse_moe.output_linear.weight"),
                   ("moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight")]
# Architectures that name a tensor their own way: tried first, for the target architecture on export;
# every one's on import (their names are distinct)
_ARCH_RENAMES = {
    "qwen2_moe": [("moe.shared.", "mlp.shared_expert.")],  # one shared expert, singular
    "ernie4_5_moe": [("moe.router.selection_bias", "mlp.gate.moe_statics.e_score_correction_bias")],  # (1, E)
    "minimax_m2": [("moe.router.selection_bias", "mlp.e_score_correction_bias")],  # on the block
    "granitemoe": _GRANITE,
    "granitemoeshared": _GRANITE + [("moe.shared.gate_up_proj.weight", "shared_mlp.input_linear.weight"),
                                    ("moe.shared.down_proj.weight", "shared_mlp.output_linear.weight")],
}
_ANY_ARCH_RENAMES = [pair for pairs in _ARCH_RENAMES.values() for pair in pairs] + _GRANITE_LEGACY


@functools.cache
def _granite_legacy() -> bool:
    """Whether the installed transformers holds Granite MoE's experts under the checkpoints' names."""
    from transformers.models.granitemoe import modeling_granitemoe

    return not hasattr(modeling_granitemoe, "GraniteMoeExperts")


def _export_renames(arch: str | None) -> list[tuple[str, str]]:
    pairs = _ARCH_RENAMES.get(arch, [])
    return _GRANITE_LEGACY + pairs if arch in GRANITE_ARCHS and _granite_legacy() else pairs


_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}


def _rename(name: str, to_hf: bool, arch: str | None = None) -> str | None:
    """transformers' name of a moelab tensor (`to_hf`, for `arch`), or moelab's of a transformers one."""
    src_block, dst_block = ((r"blocks\.(\d+)\.", "model.layers.{}.") if to_hf
                            else (r"model\.layers\.(\d+)\.", "blocks.{}."))
    top = _TOP if to_hf else {v: k for k, v in _TOP.items()}
    if name in top:
        return top[name]
    match = re.match(src_block, name)
    if not match:
        return None
    rest = name[match.end():]
    first = _export_renames(arch) if to_hf else _ANY_ARCH_RENAMES
    for ours, theirs in first + _LAYER_RENAMES:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        if rest.startswith(src):
            return dst_block.format(match.group(1)) + dst + rest[len(src):]
    return None


# Architectures whose MoE layers always hold shared experts: a model without any has them zero
# wide (no rows, so they add exactly zero), as transformers builds and saves them.
ALWAYS_SHARED = ("deepseek_v3", "glm4_moe", "deepseek_v2", "glm4_moe_lite", "dots1", "minicpm5_moe")


def _hf_groups(model, meta: bool = False, arch: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The model's weights under transformers' names, one group at a time (the embedding, each
    layer, the final norm, the head), so that a writer holds one layer's fused gate_up_proj (a
    concatenation, so a copy) at a time. `meta`: the same names and shapes, no data. `arch`: the
    target architecture, for the zero-wide shared experts of ALWAYS_SHARED."""
    sd = {k: v.to("meta") for k, v in model.state_dict().items()} if meta else model.state_dict()
    if arch in ALWAYS_SHARED and model.cfg.n_shared_experts == 0:
        for name in [n for n in sd if n.endswith("moe.router.weight")]:
            w, block = sd[name], name[: -len("router.weight")] + "shared."
            d = model.cfg.d_model
            for proj, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                sd[block + proj + ".weight"] = w.new_empty(shape)
    if arch == "ernie4_5_moe":  # its routers always add a selection bias, held (1, E): one of zeros adds nothing
        for name in [n for n in sd if n.endswith("moe.router.weight")]:
            bias = name[: -len("weight")] + "selection_bias"
            sd[bias] = sd[bias].view(1, -1) if bias in sd else sd[name].new_zeros(1, sd[name].shape[0])
    fuse_shared, fuse_q_gate = arch == "granitemoeshared", arch == "minicpm5_moe"
    groups: dict[object, list[str]] = {}
    for name in sd:
        block = re.match(r"blocks\.(\d+)\.", name)
        groups.setdefault(int(block.group(1)) if block else name, []).append(name)
    for names in groups.values():
        out = {}
        for name in names:
            if name.endswith("moe.experts.up_proj") or (fuse_shared and name.endswith("moe.shared.up_proj.weight")) \
                    or (fuse_q_gate and ".attn.gate_proj." in name):
                continue  # fused with its gate below (with q_proj: MiniCPM5's output gate)
            if name.endswith("moe.experts.gate_proj"):  # HF fuses gate and up: chunk(2) gives gate first
                base = name[: -len("gate_proj")]
                out[_rename(base + "gate_up_proj", True, arch)] = torch.cat([sd[name], sd[base + "up_proj"]], dim=1)
                continue
            if fuse_q_gate and ".attn.q_proj." in name:  # each head's D query rows, then its D gate rows
                gate, H = sd[name.replace(".q_proj.", ".gate_proj.")], model.cfg.n_heads
                out[_rename(name.replace(".q_proj.", ".q_gate_proj."), True, arch)] = torch.cat(
                    [sd[name].unflatten(0, (H, -1)), gate.unflatten(0, (H, -1))], dim=1).flatten(0, 1)
                continue
            if fuse_shared and name.endswith("moe.shared.gate_proj.weight"):  # Granite's shared expert: the same
                base = name[: -len("gate_proj.weight")]
                out[_rename(base + "gate_up_proj.weight", True, arch)] = torch.cat(
                    [sd[name], sd[base + "up_proj.weight"]], dim=0)
                continue
            hf_name = _rename(name, True, arch)
            if hf_name is None:
                raise AssertionError(f"no Hugging Face name for {name}")
            out[hf_name] = sd[name]
        yield out


def to_hf_state_dict(model, arch: str | None = None) -> dict[str, torch.Tensor]:
    return {k: v for group in _hf_groups(model, arch=arch) for k, v in group.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], consume: bool = False,
                       dtype: torch.dtype | None = None, n_heads: int = 0) -> dict[str, torch.Tensor]:
    """moelab names and layout for a transformers state dict, optionally cast to `dtype` (the
    routers' tensors to fp32 whatever it is: `held_as`). The fused gate_up_proj is split into two
    contiguous tensors (and MiniCPM5's q_gate_proj into q_proj and gate_proj, by `n_heads` heads);
    `consume` pops each tensor from `sd` as it is mapped, so a caller that holds no other reference
    frees it at once (peak memory: the result, plus the source tensors not yet mapped)."""
    out = {}
    for name in list(sd):
        t = sd.pop(name) if consume else sd[name]
        ours = _rename(name, False)
        if ours is None:
            raise UserError(f"unexpected tensor '{name}' in the Hugging Face checkpoint")
        if ".attn.q_gate_proj." in ours:  # MiniCPM5's: per head (n_heads), D query rows then D gate rows
            q, gate = t.unflatten(0, (n_heads, 2, -1)).unbind(1)
            for key, part in ((".q_proj.", q), (".gate_proj.", gate)):
                part = part.flatten(0, 1)
                out[ours.replace(".q_gate_proj.", key)] = part.contiguous() if dtype is None else part.to(dtype)
            continue
        fused = re.search(r"(moe\.experts\.|moe\.shared\.)gate_up_proj(\.weight)?$", ours)
        if fused:  # split into two contiguous tensors: (E, 2F, D) on dim 1, a shared (2F, D) on dim 0
            base, suffix = ours[: fused.start(0)] + fused.group(1), fused.group(2) or ""
            t = t if dtype is None else t.to(dtype)
            gate, up = t.chunk(2, dim=t.dim() - 2)
            out[base + "gate_proj" + suffix], out[base + "up_proj" + suffix] = gate.contiguous(), up.contiguous()
            del t, gate, up
            continue
        if ".moe.shared." in ours and t.numel() == 0:
            continue  # zero-wide shared experts (n_shared_experts 0 in an ALWAYS_SHARED architecture): none
        if ours.endswith("router.selection_bias"):
            t = t.reshape(-1)  # ERNIE 4.5 holds it (1, E)
        out[ours] = t if dtype is None else t.to(held_as(ours, dtype))
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def _without_init(cls, config):
    """cls(config) without its random init (the weights are assigned next): transformers spends
    longer initialising a model than moelab takes to fill it. Buffers are made as usual."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # a transformers without it: initialise, then overwrite
        return cls(config)
    with no_init_weights():
        return cls(config)


def to_hf(model, arch: str = "auto", share: bool = False):
    """A transformers model of the chosen (or only fitting) architecture holding exactly this
    model's weights: a copy, or with `share` the same tensors (no memory of its own but the
    fused gate_up_proj experts)."""
    _require_transformers()
    config = hf_config(model.cfg, arch)
    cls = _hf_class(config.model_type, "ForCausalLM")
    hf = _without_init(cls, config).to(next(model.parameters()).dtype)
    # a fused tensor (gate_up_proj, MiniCPM5's q_gate_proj) is a new one already, a concatenation:
    # only those on the model's own storage need a copy
    own = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    sd = {k: v.detach() if share or v.untyped_storage().data_ptr() not in own else v.detach().clone()
          for k, v in to_hf_state_dict(model, config.model_type).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AssertionError(f"weight map incomplete: missing {missing}, unexpected {unexpected}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()  # assign replaced the embedding the head was tied to
        assert hf.lm_head.weight is hf.get_input_embeddings().weight
    return hf.eval()


def _moelab_config(hf_config):
    from moelab.config import Config

    cfg = Config(model=model_config_from_hf(hf_config))
    cfg.train.seq_len = min(cfg.train.seq_len, cfg.model.max_seq_len)
    return cfg.resolve().model


def read_hf_model_config(path: str | Path) -> ModelConfig:
    """The moelab model config of a Hugging Face directory, from its config.json alone."""
    transformers = _require_transformers()
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # no model_type, a field of the wrong type, not JSON: transformers' tracebacks
        reason = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise UserError(f"cannot read {Path(path) / 'config.json'} as a transformers config ({reason}); "
                        "fix it, or use the model's own config.json") from None
    return _moelab_config(hf_config)


def from_hf(hf_model):
    """A moelab model (fp32) with a copy of this transformers model's weights (the two share nothing)."""
    from moelab.models import MoETransformer

    sd = {k: v.detach().to(torch.float32, copy=True) for k, v in hf_model.state_dict().items()}
    cfg = _moelab_config(hf_model.config)
    return MoETransformer.from_weights(cfg, from_hf_state_dict(sd, consume=True, n_heads=cfg.n_heads))


DTYPES = WEIGHT_DTYPES


def stored_dtype(path: str | Path) -> str:
    """The dtype a Hugging Face directory's config.json declares for its weights (fp32 when it
    declares none, or one moelab does not export)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "fp32"
    declared = config.get("dtype") or config.get("torch_dtype")
    return {str(t).removeprefix("torch."): name for name, t in DTYPES.items()}.get(str(declared), "fp32")


def _size_bytes(size: str | int) -> int:
    """'5GB', '200KB' (powers of 1000, as transformers reads them; 'GiB' for powers of 1024) or bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise UserError(f"bad shard size '{size}' (examples: 5GB, 500MB)")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " KMGT".index(unit or " "))


def _export_stream(model, hf_meta, dtype: torch.dtype, meta: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in the layout transformers' save_pretrained writes (its own reverse of the
    conversion it applies on load: per-expert tensors, legacy names), a layer at a time, cast to
    `dtype`. A tied head is left out, as save_pretrained leaves it out."""
    from transformers.core_model_loading import revert_weight_conversion

    keep = _kept_in_fp32(hf_meta, dtype)
    for group in _hf_groups(model, meta, hf_meta.config.model_type):
        if model.cfg.tie_embeddings:
            group.pop("lm_head.weight", None)
        reverted = revert_weight_conversion(hf_meta, {
            k: _cast(k, v, torch.float32 if keep and keep.search(k) else dtype) for k, v in group.items()})
        del group  # the layer's gate_up_proj concatenation: its reverted copies are what is written
        while reverted:  # handed on, not held here: a written shard's tensors are freed with it
            name = next(iter(reverted))
            yield name, reverted.pop(name)


def _kept_in_fp32(hf_meta, dtype: torch.dtype) -> re.Pattern | None:
    """The tensors the architecture keeps in fp32 in a bf16/fp16 model (DeepSeek-V3, GLM4-MoE: the
    router's weight and selection bias), matched as transformers matches them when it loads one:
    its own bf16 model saves them in fp32, and a bf16 checkpoint holding them in fp32 converts and
    exports back to itself bit for bit."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    globs = [*(getattr(hf_meta, "_keep_in_fp32_modules_strict", None) or ()),
             *((getattr(hf_meta, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else ())]
    return re.compile("|".join(f"(?:{g.replace('*', '.*')})" for g in globs)) if globs else None


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float16 and t.device.type != "meta" and t.is_floating_point():
        lo, hi = torch.aminmax(t.detach()) if t.numel() else (torch.tensor(0.0), torch.tensor(0.0))
        big = max(-lo.item(), hi.item())  # no |t| copy of a layer's experts
        if big > torch.finfo(torch.float16).max:
            raise UserError(f"cannot export in fp16: {name} holds values up to {big:.4g}, beyond fp16's "
                            f"{torch.finfo(torch.float16).max:.0f}; use --dtype bf16 (or fp32)")
    return t.detach().to(dtype)


def _write_weights(model, hf_meta, folder: Path, dtype: torch.dtype, max_shard: int) -> None:
    """The safetensors shards (and index) of the model, in two passes over `_export_stream`: names
    and sizes on the meta device plan the shards (in order, a new one when the next tensor would
    pass `max_shard`, as transformers shards), then each shard is built and written in turn.
    Memory beyond the model: one shard's cast or split tensors and one layer's gate_up_proj, not
    the ~1.1x the model that save_pretrained adds (it reverts the whole state dict at once, after
    the fused copy)."""
    from safetensors.torch import save_file

    plan: list[list[str]] = [[]]
    filled = total = 0
    for name, t in _export_stream(model, hf_meta, dtype, meta=True):
        size = t.numel() * t.element_size()
        if plan[-1] and filled + size > max_shard:
            plan.append([])
            filled = 0
        plan[-1].append(name)
        filled, total = filled + size, total + size
    n = len(plan)
    files = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    stream = _export_stream(model, hf_meta, dtype, meta=False)
    for names, file in zip(plan, files):
        shard = dict(next(stream) for _ in names)
        assert list(shard) == names, "the export's two passes disagree"
        save_file(shard, folder / file, metadata={"format": "pt"})
        del shard
    if n > 1:
        index = {"metadata": {"total_parameters": hf_meta.num_parameters(), "total_size": total},
                 "weight_map": {name: file for names, file in zip(plan, files) for name in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_export_target(out_dir: str | Path, dtype: str) -> Path:
    """The export's folder, refused when it holds anything (or is a file) or `dtype` is unknown:
    said before a model is loaded, which for a large one takes minutes."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {'directory' if out.is_dir() else 'path'} {out} is not empty; choose another --out")
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype '{dtype}' (supported: {', '.join(DTYPES)})")
    return out


def export_hf(model, out_dir: str | Path, arch: str = "auto", max_shard_size: str | int = "5GB",
              extra_files: tuple[Path, ...] = (), dtype: str = "fp32", token_ids: dict | None = None) -> Path:
    """A directory that transformers' `from_pretrained` loads, as its own `save_pretrained` would
    write it (same files, names, layout; the tests compare the two tensor by tensor), with the
    weights in `dtype` (fp32 | bf16 | fp16) and `extra_files` (the tokenizer) copied in. `token_ids`
    (bos/eos/pad_token_id) go to config.json and the generation config derived from it, so that
    transformers' `generate` stops where the model ends a document; a generation_config.json among
    `extra_files` replaces the derived one. Shards of
    at most 5 GB, the Hub's usual size. Written a layer at a time (see `_write_weights`), into a
    temporary folder beside `out_dir` renamed into place when complete: a failure (a full disk, an
    fp16 overflow) leaves nothing, not a directory that loads half a model."""
    out = check_export_target(out_dir, dtype)
    max_shard = _size_bytes(max_shard_size)
    _require_transformers()
    config = hf_config(model.cfg, arch)  # an architecture that cannot hold the model is refused first
    for key, value in (token_ids or {}).items():
        setattr(config, key, value)
    cls = _hf_class(config.model_type, "ForCausalLM")
    with torch.device("meta"):
        hf_meta = _without_init(cls, config)  # names, the weight conversions and generation config; no memory
        if config.tie_word_embeddings:
            hf_meta.tie_weights()  # so that it counts its parameters as save_pretrained's index does
    config.dtype = str(DTYPES[dtype]).removeprefix("torch.")
    config.architectures = [cls.__name__]
    try:
        with staged_folder(out) as tmp:
            config.save_pretrained(tmp)
            if hf_meta.can_generate():
                hf_meta.generation_config.save_pretrained(tmp)
            _write_weights(model, hf_meta, tmp, DTYPES[dtype], max_shard)
            for f in extra_files:
                shutil.copy2(f, tmp / Path(f).name)
    except write_errors() as exc:
        raise cannot_write(f"the export to {out}", exc, "nothing was left there", "export again",
                           "choose another --out") from exc
    return out


def _shown(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_loaded(path, info: dict) -> None:
    """transformers fills a tensor missing from the weights files, or one of another shape, with a
    random initialisation and goes on (with a report in its log): a model that is partly random,
    whatever it is then converted to or evaluated as. Refused; tensors the architecture does not
    use are left out, as transformers does."""
    missing = info.get("missing_keys") or ()
    mismatched = info.get("mismatched_keys") or ()
    if missing:
        raise UserError(f"cannot load {path}: its weights files lack {len(missing)} tensor(s) its config.json needs "
                        f"({_shown(missing)}), which would start random; a partial download or copy, or a config.json "
                        "of another model: complete the files or fix config.json")
    if mismatched:
        detail = _shown(f"{name} {tuple(have)} where config.json gives {tuple(want)}"
                        for name, have, want in mismatched)
        raise UserError(f"cannot load {path}: {len(mismatched)} tensor(s) have another shape than its config.json "
                        f"gives ({detail}); a config.json of another model size: fix it or use the model's own")


@contextlib.contextmanager
def _no_load_report():
    """transformers logs a multi-line table (in terminal colours, piped or not) of the tensors a
    checkpoint lacks, has spare or holds in another shape. `load_hf` says each of those itself in
    one line (`_check_loaded` refuses the first and last), so the table is kept out of its output."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(max(level, hf_logging.ERROR))
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def _loading_bar():
    """transformers' "Loading weights" bar only on a terminal, as moelab's own bars: piped or logged
    (CI, a job's log file, `convert ... | tee`) each of its redraws lands in the text as a line."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    quiet = hf_logging.is_progress_bar_enabled() and not sys.stderr.isatty()
    hub_off = hub_utils.are_progress_bars_disabled()
    if quiet:
        hf_logging.disable_progress_bar()  # transformers' and the hub's
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
            if hub_off:  # the hub's as they were
                hub_utils.disable_progress_bars()


def load_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A moelab model (on `device`, its weights in `dtype`, the routers' in fp32) of a Hugging Face
    directory, checked to fit first."""
    _require_transformers()
    from transformers import AutoModelForCausalLM

    from moelab.models import MoETransformer
    from moelab.train.memory import check_weights_fit

    model_cfg = read_hf_model_config(path)
    stored = DTYPES[stored_dtype(path)]
    check_weights_fit(model_cfg, "cpu", str(path), dtype, read_as=stored)  # read into host memory,
    if torch.device(device).type != "cpu":  # then moved
        check_weights_fit(model_cfg, device, str(path), dtype)

    # Loaded in the checkpoint's own dtype and cast to `dtype` one tensor at a time (exact from
    # bf16/fp16 to fp32), each freed as it is converted: transformers widening the whole model at
    # load time peaks at about 2.5x the fp32 size.
    from safetensors import SafetensorError

    try:  # mismatched shapes reported below, not raised as transformers' traceback
        with warnings.catch_warnings(), _loading_bar(), _no_load_report():  # torch on ALWAYS_SHARED's zero-wide
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)  # shared experts
            hf, info = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", output_loading_info=True,
                                                            ignore_mismatched_sizes=True)
    except SafetensorError as exc:  # a weights file cut short by a download or a copy
        raise UserError(f"cannot load {path}: a weights file is damaged ({exc}); copy or download it again") from None
    _check_loaded(path, info)
    if unused := info.get("unexpected_keys"):
        print(f"note: {path} holds {len(unused)} tensor(s) that {type(hf).__name__} does not use ({_shown(unused)}), "
              "left out as transformers does", file=sys.stderr)
    cfg, sd = _moelab_config(hf.config), {k: v.detach() for k, v in hf.state_dict().items()}
    del hf  # the moelab model takes over the loaded tensors instead of copying them
    return MoETransformer.from_weights(cfg, from_hf_state_dict(sd, consume=True, dtype=dtype,
                                                               n_heads=cfg.n_heads)).to(device)
