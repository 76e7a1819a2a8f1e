"""Activation checkpointing: the same expert choices and gradients as without it, and the
recomputation reuses the first forward's choices rather than routing again."""

import pytest
import torch

from moelab.config import Config
from moelab.models import MoETransformer

VARIANTS = {
    "softmax": {},
    "noisy+capacity": dict(noisy_gating=True, capacity_factor=1.0),
    "sigmoid-groups-mla": dict(router="sigmoid", n_group=2, topk_group=1, attention="mla",
                               n_shared_experts=1, first_k_dense=1, seq_aux_loss_coef=0.01),
    "switch": dict(router="switch", top_k=1, capacity_factor=1.25, ffn_glu=False, ffn_act="gelu"),
}


def _model(**kw):
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.expert_dim = 64, 3, 64
    for k, v in kw.items():
        setattr(cfg.model, k, v)
    cfg.resolve(vocab_size=300)
    torch.manual_seed(0)
    return MoETransformer(cfg.model)


def _step(model, x, y, ckpt, between=None):
    model.activation_checkpointing = ckpt
    model.zero_grad()
    torch.manual_seed(1)  # noisy gating draws the same noise in both runs
    out = model(x, targets=y)
    if between is not None:
        between(model)
    out.loss.backward()
    return [r.idx_TK for r in out.router], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpointing_keeps_choices_and_gradients(variant):
    model = _model(**VARIANTS[variant])
    x, y = torch.randint(0, 300, (2, 48)), torch.randint(0, 300, (2, 48))
    idx_a, grads_a = _step(model, x, y, ckpt=False)
    idx_b, grads_b = _step(model, x, y, ckpt=True)
    assert all(torch.equal(a, b) for a, b in zip(idx_a, idx_b))
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6, msg=name)


def test_recomputation_routes_as_the_first_forward_did():
    """Between forward and backward the selection bias moves far enough to change every token's
    choice if it routed again; gradients must still be those of the forward's routing."""
    model = _model(router="sigmoid")

    def flip(m):
        for r in m.routers:
            r.selection_bias.copy_(torch.arange(r.n_experts, dtype=torch.float32) * 10)

    x, y = torch.randint(0, 300, (2, 48)), torch.randint(0, 300, (2, 48))
    for r in model.routers:
        r.selection_bias.zero_()
    _, ref = _step(model, x, y, ckpt=False)
    for r in model.routers:
        r.selection_bias.zero_()
    _, got = _step(model, x, y, ckpt=True, between=flip)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)
