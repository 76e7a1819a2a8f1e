"""Muon's update must be near-orthogonal; the parameter rule and schedule must hold."""

import math

import pytest
import torch

from moelab.optim.muon import NS_COEFFS, Muon, newton_schulz, update_scale
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


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (3, 40, 24)])
def test_newton_schulz_equals_the_textbook_iteration_in_float64(shape):
    """The fused GEMM form (scaled sums in baddbmm's beta/alpha) is the same polynomial as the
    plain quintic step X <- aX + bAX + cA^2X, A = XX^T, on the wide orientation."""
    torch.manual_seed(0)
    G = torch.randn(shape, dtype=torch.float64)
    a, b, c = NS_COEFFS
    X = G.mT if shape[-2] > shape[-1] else G
    X = X / X.norm(dim=(-2, -1), keepdim=True)
    for _ in range(5):
        A = X @ X.mT
        X = a * X + b * (A @ X) + c * (A @ A @ X)
    ref = X.mT if shape[-2] > shape[-1] else X
    torch.testing.assert_close(newton_schulz(G, 5, torch.float64, eps=0.0), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(newton_schulz(G.float(), 5, torch.float32), ref.float(), rtol=1e-4, atol=1e-5)
    bf16_err = (newton_schulz(G.float(), 5, torch.bfloat16) - ref.float()).abs().max()
    assert bf16_err < 0.02, bf16_err


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


def test_auto_iteration_dtype_is_bf16_only_where_bf16_products_are_faster():
    """The default (ns_dtype None, config "auto") iterates in bf16 on CUDA and on CPUs whose bf16
    products beat fp32, else in fp32: the update is the one newton_schulz gives in that dtype."""
    from moelab.config import OptimConfig
    from moelab.hardware import cpu_matmul_slowdown
    from moelab.optim.muon import auto_ns_dtype

    assert OptimConfig().ns_dtype == "auto"
    cpu = torch.device("cpu")
    assert auto_ns_dtype(cpu) == (torch.bfloat16 if cpu_matmul_slowdown(torch.bfloat16) < 1 else torch.float32)
    assert auto_ns_dtype(torch.device("cuda")) == torch.bfloat16
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16))
    p0, g = p.detach().clone(), torch.randn(32, 16)
    p.grad = g.clone()
    Muon([p], lr=0.1, momentum=0.0, nesterov=False).step()
    expected = p0 - 0.1 * update_scale(p.shape, "match_adamw") * newton_schulz(g, 5, auto_ns_dtype(cpu))
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    other = torch.float32 if auto_ns_dtype(cpu) == torch.bfloat16 else torch.bfloat16
    alt = p0 - 0.1 * update_scale(p.shape, "match_adamw") * newton_schulz(g, 5, other)
    assert (p.detach() - alt).abs().max() > 1e-4  # the other dtype gives a visibly different update


def test_auto_dtype_is_decided_once_and_kept_by_a_resume(tmp_path):
    """"auto" is timed, so a resumed process could measure the other way. The saved state names the
    dtype the run iterated in; an auto Muon loading it (same device type) continues in that dtype,
    bit-identically. An explicit ns_dtype, or a state saved on another device type, keeps its own."""
    from moelab.optim.muon import auto_ns_dtype

    here = auto_ns_dtype(torch.device("cpu"))
    other = torch.float32 if here == torch.bfloat16 else torch.bfloat16  # what another process chose
    torch.manual_seed(0)
    grads = [torch.randn(24, 16) for _ in range(3)]
    p = torch.nn.Parameter(torch.randn(24, 16))
    run = Muon([p], lr=0.1, momentum=0.9, ns_dtype=other)
    p.grad = grads[0].clone()
    run.step()
    torch.save(run.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert saved["ns_dtype"] == str(other).removeprefix("torch.")

    def resumed(ns_dtype=None, state=saved):
        q = torch.nn.Parameter(p.detach().clone())
        opt = Muon([q], lr=0.1, momentum=0.9, ns_dtype=ns_dtype)
        assert opt.ns_dtype == (ns_dtype or here)  # decided at construction
        opt.load_state_dict(state)
        return q, opt

    q, auto = resumed()
    assert auto.ns_dtype == other
    _, explicit = resumed(here)
    _, moved = resumed(state=dict(saved, device_type="cuda"))
    assert explicit.ns_dtype == here and moved.ns_dtype == here
    for g in grads[1:]:
        p.grad, q.grad = g.clone(), g.clone()
        run.step()
        auto.step()
    assert torch.equal(p.detach(), q.detach())


def test_same_shape_matrices_batched_equal_each_stepped_alone(monkeypatch):
    """One batched Newton-Schulz over same-shape matrices gives each the update it gets alone,
    including batches split at BATCH_NUMEL, a 3-D expert stack and matrices of another shape."""
    import moelab.optim.muon as muon

    torch.manual_seed(0)
    shapes = [(24, 16)] * 5 + [(16, 24), (3, 24, 16), (24, 16)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    monkeypatch.setattr(muon, "BATCH_NUMEL", 3 * 24 * 16)  # the six (24, 16): batches of 3
    batches = muon._same_shape_batches(params)
    assert [len(b) for b in batches] == [3, 3, 1, 1]
    assert batches[1][-1] is params[-1]
    together = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float32)
    singles = [Muon([p], lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float32) for p in alone]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(params, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        together.step()
        for opt in singles:
            opt.step()
    for p, q, p0 in zip(params, alone, start):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        assert (p.detach() - p0).abs().max() > 0.01  # the updates were real


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
    cfg.model.n_shared_experts, cfg.model.shared_expert_gate = 1, True
    cfg.resolve(vocab_size=300)
    groups = split_params(MoETransformer(cfg.model))
    muon = {n for n, _ in groups["muon"]}
    adamw = {n for n, _ in groups["adamw_decay"] + groups["adamw_no_decay"]}
    assert "embed.weight" in adamw and "lm_head.weight" in adamw
    assert "blocks.0.moe.router.weight" in adamw and "blocks.0.attn_norm.weight" in adamw
    assert "blocks.0.moe.shared_gate.weight" in adamw  # a (1, D) readout to one number per token
    assert "blocks.0.attn.q_proj.weight" in muon and "blocks.0.moe.experts.gate_proj" in muon
    assert "blocks.0.moe.shared.up_proj.weight" in muon
    n_all = sum(1 for _ in MoETransformer(cfg.model).parameters())
    assert len(muon) + len(adamw) == n_all


def _model(tie=False):
    from moelab.config import Config
    from moelab.models import MoETransformer

    cfg = Config()
    cfg.model.tie_embeddings = tie
    cfg.model.d_model, cfg.model.n_layers = 32, 2
    cfg.resolve(vocab_size=300)
    return cfg, MoETransformer(cfg.model)


def test_modes_assign_every_parameter_once():
    from moelab.optim.groups import split_params

    cfg, model = _model()
    names = {n for n, _ in model.named_parameters()}
    for mode in ("hybrid", "muon", "adamw"):
        g = split_params(model, mode)
        listed = [n for v in g.values() for n, _ in v]
        assert sorted(listed) == sorted(names), mode
        assert all(p.ndim == 1 for _, p in g["adamw_no_decay"])  # norms and biases: no decay
    muon = {n for n, _ in split_params(model, "muon")["muon"]}
    assert {"embed.weight", "lm_head.weight", "blocks.0.moe.router.weight"} <= muon
    assert not split_params(model, "adamw")["muon"]


def test_adamw_mode_equals_torch_adamw():
    """mode=adamw with a schedule: the same trajectory as torch.optim.AdamW driven by hand with
    the scheduled LR and decoupled decay on matrices only."""
    import copy

    from moelab.optim.groups import HybridOptimizer

    cfg, model = _model()
    cfg.optim.mode, cfg.optim.adamw_lr, cfg.optim.weight_decay = "adamw", 1e-2, 0.1
    ref_model = copy.deepcopy(model)
    ours = HybridOptimizer(model, cfg.optim, torch.device("cpu"))
    decay = [p for p in ref_model.parameters() if p.ndim >= 2]
    no_decay = [p for p in ref_model.parameters() if p.ndim < 2]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, fused=True)
    x = torch.randint(0, 300, (2, 16))
    for step in range(4):
        f = lr_factor(step, 4, 1, "linear", 0.1)
        ours.set_lr_factor(f)
        for g in ref.param_groups:
            g["lr"] = 1e-2 * f
        for m, opt in ((model, ours), (ref_model, ref)):
            torch.manual_seed(step)
            m(x, targets=x).loss.backward()
            opt.step()
            opt.zero_grad()
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert all(g["fused"] for o in ours.optimizers for g in o.param_groups)
    n_decay, n_rest = sum(p.numel() for p in decay), sum(p.numel() for p in no_decay)
    assert ours.describe() == f"optimizer adamw: AdamW {n_decay:,} (decay) + {n_rest:,} (no decay)"  # no "Muon 0"


def test_resumed_optimizer_keeps_its_state_and_takes_the_configured_hyperparameters():
    """torch's load_state_dict restores saved LRs and decay too: `--resume ... optim.muon_lr=...`
    changed nothing. The checkpoint gives the state; the config gives the settings."""
    import copy

    from moelab.optim.groups import HybridOptimizer

    cfg, model = _model()
    saved = HybridOptimizer(model, cfg.optim, torch.device("cpu"))
    x = torch.randint(0, 300, (2, 16))
    model(x, targets=x).loss.backward()
    saved.set_lr_factor(0.5)
    saved.step()
    state = copy.deepcopy(saved.state_dict())
    same = HybridOptimizer(model, cfg.optim, torch.device("cpu"))
    same.load_state_dict(copy.deepcopy(state))
    assert [o.param_groups for o in same.optimizers] == [o.param_groups for o in saved.optimizers]
    changed = copy.deepcopy(cfg.optim)
    changed.muon_lr, changed.adamw_lr, changed.weight_decay, changed.beta2 = 1e-3, 2e-3, 0.2, 0.99
    resumed = HybridOptimizer(model, changed, torch.device("cpu"))
    resumed.load_state_dict(copy.deepcopy(state))
    muon, adamw = resumed.optimizers
    assert muon.param_groups[0]["base_lr"] == 1e-3 and muon.param_groups[0]["weight_decay"] == 0.2
    assert all(g["base_lr"] == 2e-3 and g["betas"][1] == 0.99 for g in adamw.param_groups)
    assert adamw.param_groups[0]["weight_decay"] == 0.2 and adamw.param_groups[1]["weight_decay"] == 0.0
    for opt, ref in zip(resumed.optimizers, saved.optimizers):  # the moments and buffers are the checkpoint's
        for p in ref.state:
            for k, v in ref.state[p].items():
                assert torch.equal(opt.state[p][k], v), k


def test_bf16_newton_schulz_matches_fp32():
    G = torch.stack([_ill_conditioned(64, 32), _ill_conditioned(64, 32)])
    a = newton_schulz(G, dtype=torch.float32)
    b = newton_schulz(G, dtype=torch.bfloat16)
    assert b.dtype == torch.float32  # returned in the parameter's dtype
    cos = (a * b).sum() / (a.norm() * b.norm())
    assert cos > 0.995


def test_muon_weight_decay_is_decoupled():
    p = torch.nn.Parameter(torch.randn(16, 16))
    p0 = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.5, ns_dtype=torch.float32)
    g = torch.randn(16, 16)
    p.grad = g.clone()
    opt.step()
    expected = p0 * (1 - 0.1 * 0.5) - 0.1 * update_scale(p.shape, "match_adamw") * newton_schulz(g, 5, torch.float32)
    torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("kind", ["linear", "wsd", "constant"])
def test_schedules(kind):
    total, warmup = 100, 10
    f = [lr_factor(i, total, warmup, kind, 0.1, decay_frac=0.2) for i in range(total)]
    assert f[:warmup] == pytest.approx([(i + 1) / warmup for i in range(warmup)])
    if kind == "constant":
        assert f[warmup:] == [1.0] * (total - warmup)
        return
    assert f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))
    if kind == "wsd":  # stable at 1 until the last 20 updates, then a straight line
        assert f[warmup:80] == [1.0] * (80 - warmup) and f[80] < 1.0
        diffs = [a - b for a, b in zip(f[80:], f[81:])]
        assert max(diffs) - min(diffs) < 1e-9
    else:
        diffs = [a - b for a, b in zip(f[warmup:], f[warmup + 1:])]
        assert max(diffs) - min(diffs) < 1e-9
