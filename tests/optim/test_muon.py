"""Muon's update must be near-orthogonal; the parameter rule and schedule must hold."""

import math

import pytest
import torch

from moelab.optim.muon import Muon, newton_schulz, update_scale
from moelab.optim.schedules import lr_factor


def _ill_conditioned(m, n, cond=100.0):
    u, _ = torch.linalg.qr(torch.randn(m, m))
    v, _ = torch.linalg.qr(torch.randn(n, n))
    k = min(m, n)
    s = torch.logspace(0, -math.log10(cond), k)
    return u[:, :k] @ torch.diag(s) @ v[:, :k].T


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96)])
def test_newton_schulz_is_near_orthogonal(shape):
    G = _ill_conditioned(*shape)
    X = newton_schulz(G, steps=5, dtype=torch.float32)
    sv = torch.linalg.svdvals(X)
    # quintic NS trades exactness for speed: singular values land in roughly [0.7, 1.2]
    assert sv.min() > 0.5 and sv.max() < 1.3, sv
    g_sv = torch.linalg.svdvals(G)
    assert g_sv.max() / g_sv.min() > 50  # the input really was far from orthogonal
    # same singular vectors as the exact polar factor U V^T
    u, _, vh = torch.linalg.svd(G, full_matrices=False)
    polar = u @ vh
    cos = (X * polar).sum() / (X.norm() * polar.norm())
    assert cos > 0.97


def test_batched_experts_are_orthogonalised_each():
    G = torch.stack([_ill_conditioned(48, 16), 100 * _ill_conditioned(48, 16)])
    X = newton_schulz(G, dtype=torch.float32)
    for e in range(2):
        single = newton_schulz(G[e], dtype=torch.float32)
        torch.testing.assert_close(X[e], single, rtol=1e-4, atol=1e-5)
        sv = torch.linalg.svdvals(X[e])
        assert sv.min() > 0.5 and sv.max() < 1.3


def test_muon_step_is_scaled_orthogonalised_nesterov_momentum():
    p = torch.nn.Parameter(torch.randn(32, 16))
    p0 = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9, weight_decay=0.0, ns_dtype=torch.float32, scale="match_adamw")
    g = torch.randn(32, 16)
    p.grad = g.clone()
    opt.step()
    buf = 0.1 * g  # lerp from zero buffer
    nesterov = g.lerp(buf, 0.9)
    expected = p0 - 0.1 * update_scale(p.shape, "match_adamw") * newton_schulz(nesterov, 5, torch.float32)
    torch.testing.assert_close(p.detach(), expected)
    rms = ((p.detach() - p0) / 0.1).pow(2).mean().sqrt()
    assert 0.12 < rms < 0.28  # Moonlight scaling: update RMS ~ 0.2, like AdamW's


def test_schedule_counts_optimizer_updates():
    total, warmup = 100, 10
    f = [lr_factor(i, total, warmup, "cosine", 0.1) for i in range(total)]
    assert f[0] == pytest.approx(0.1) and f[warmup - 1] == pytest.approx(1.0)
    assert f[warmup] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1)  # decays fully by the last update
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))


def test_param_groups_rule():
    from moelab.config import Config
    from moelab.models import MoETransformer
    from moelab.optim.groups import split_params

    cfg = Config()
    cfg.model.tie_embeddings = False
    cfg.resolve(vocab_size=300)
    groups = split_params(MoETransformer(cfg.model))
    muon = {n for n, _ in groups["muon"]}
    adamw = {n for n, _ in groups["adamw_decay"] + groups["adamw_no_decay"]}
    assert "embed.weight" in adamw and "lm_head.weight" in adamw
    assert "blocks.0.moe.router.weight" in adamw and "blocks.0.attn_norm.weight" in adamw
    assert "blocks.0.attn.q_proj.weight" in muon and "blocks.0.moe.experts.gate_proj" in muon
    n_all = sum(1 for _ in MoETransformer(cfg.model).parameters())
    assert len(muon) + len(adamw) == n_all
