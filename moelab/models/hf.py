"""Weight-name and shape maps between moelab and Hugging Face transformers architectures.

Supported so far: MixtralForCausalLM (softmax top-k router with renormalisation, SwiGLU experts,
GQA, RoPE, RMSNorm): moelab's default MoE design. Conversion goes through transformers' own model
classes, so whatever layout `save_pretrained` writes, transformers reads it back. A config that
the target architecture cannot express exactly is refused, naming the field; never approximated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelab.config import ModelConfig
from moelab.errors import UserError


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("Hugging Face interop needs transformers: pip install 'moelab[hf]'") from None


def mixtral_config(cfg: ModelConfig):
    _require_transformers()
    from transformers import MixtralConfig

    refusals = {
        "model.norm_topk_prob": (cfg.norm_topk_prob, True),
        "model.z_loss_coef": (cfg.z_loss_coef, 0.0),
    }
    for name, (have, need) in refusals.items():
        if have != need:
            raise UserError(f"cannot export to Mixtral exactly: {name}={have} (Mixtral has {need})")
    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.expert_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.aux_loss_coef,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="silu", sliding_window=None, attention_dropout=0.0, router_jitter_noise=0.0,
    )


def model_config_from_mixtral(hf) -> ModelConfig:
    rope = getattr(hf, "rope_parameters", None) or {}
    checks = {"hidden_act": (hf.hidden_act, "silu"), "rope_type": (rope.get("rope_type", "default"), "default"),
              "router_jitter_noise": (hf.router_jitter_noise, 0.0)}
    for name, (have, need) in checks.items():
        if have != need:
            raise UserError(f"cannot convert this Mixtral exactly: {name}={have!r} (moelab supports {need!r})")
    if hf.sliding_window is not None and hf.sliding_window < hf.max_position_embeddings:
        raise UserError(f"cannot convert this Mixtral exactly: sliding_window={hf.sliding_window} "
                        "(moelab attends to the full context)")
    head_dim = hf.head_dim or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads, head_dim=head_dim,
        max_seq_len=hf.max_position_embeddings, rope_theta=float(rope.get("rope_theta", 1e6)),
        norm_eps=hf.rms_norm_eps, tie_embeddings=bool(hf.tie_word_embeddings),
        n_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, expert_dim=hf.intermediate_size,
        norm_topk_prob=True, aux_loss_coef=hf.router_aux_loss_coef)


def _layer_map(i: int) -> dict[str, str]:
    """moelab name -> HF name for the 1:1 tensors of layer i."""
    ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
    m = {f"{ours}attn_norm.weight": f"{theirs}input_layernorm.weight",
         f"{ours}mlp_norm.weight": f"{theirs}post_attention_layernorm.weight",
         f"{ours}moe.router.weight": f"{theirs}mlp.gate.weight",
         f"{ours}moe.experts.down_proj": f"{theirs}mlp.experts.down_proj"}
    for p in ("q", "k", "v", "o"):
        m[f"{ours}attn.{p}_proj.weight"] = f"{theirs}self_attn.{p}_proj.weight"
    return m


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    sd, cfg = model.state_dict(), model.cfg
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        out.update({hf: sd[ours] for ours, hf in _layer_map(i).items()})
        e = f"blocks.{i}.moe.experts."
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat(
            [sd[e + "gate_proj"], sd[e + "up_proj"]], dim=1)  # HF chunks gate first, then up
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(cfg.n_layers):
        out.update({ours: sd[hf] for ours, hf in _layer_map(i).items()})
        gate, up = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"].chunk(2, dim=1)
        out[f"blocks.{i}.moe.experts.gate_proj"] = gate
        out[f"blocks.{i}.moe.experts.up_proj"] = up
    return out


def to_hf(model):
    """A transformers MixtralForCausalLM holding exactly this model's weights."""
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM(mixtral_config(model.cfg)).to(next(model.parameters()).dtype)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    return hf.eval()


def from_hf(hf_model):
    from moelab.models import MoETransformer

    if hf_model.config.model_type != "mixtral":
        raise UserError(f"unsupported architecture '{hf_model.config.model_type}' (supported: mixtral)")
    cfg = model_config_from_mixtral(hf_model.config)
    model = MoETransformer(cfg)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), cfg))
    return model.eval()


def export_hf(model, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose another --out")
    to_hf(model).save_pretrained(out)
    return out


def load_hf(path: str | Path):
    _require_transformers()
    from transformers import AutoModelForCausalLM

    return from_hf(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32))
