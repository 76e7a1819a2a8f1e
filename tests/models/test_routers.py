"""Every router kind: grouped dispatch equals the per-expert loop (outputs and gradients), choices
equal a brute-force per-token reference, capacity drops are counted exactly, the balance losses
equal their formulas, and the aux-loss-free bias update moves a skewed load towards balance."""

import math

import pytest
import torch

from moelab.config import ModelConfig
from moelab.models.moe import MoE
from moelab.models.router import Router, capacity_keep, update_selection_bias

ROUTERS = {
    "softmax": dict(router="softmax"),
    "softmax-unnormalised": dict(router="softmax", norm_topk_prob=False),
    "topk_softmax": dict(router="topk_softmax"),
    "sigmoid-groups-shared": dict(router="sigmoid", n_group=4, topk_group=2, routed_scaling=2.5,
                                  n_shared_experts=2),
    "softmax-groups-best-expert": dict(router="softmax", n_group=4, topk_group=2, group_score_top=1,
                                       norm_topk_prob=False, routed_scaling=1.5),  # DeepSeek-V2
    "softmax-gated-shared": dict(router="softmax", norm_topk_prob=False, n_shared_experts=1, shared_expert_dim=40,
                                 shared_expert_gate=True),  # Qwen1.5/Qwen2-MoE
    "switch-capacity": dict(router="switch", top_k=1, capacity_factor=1.0),
    "softmax-capacity-top2": dict(router="softmax", capacity_factor=0.75),
    "noisy": dict(router="softmax", noisy_gating=True),
    "plain-gelu-experts": dict(router="softmax", ffn_glu=False, ffn_act="gelu"),
}


def _cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, n_experts=8, top_k=2, expert_dim=24)
    cfg = ModelConfig(**{**base, **kw})
    cfg.shared_expert_dim = cfg.shared_expert_dim or cfg.expert_dim
    return cfg


def _layer(cfg: ModelConfig, seed: int = 1) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg)
    moe.experts.reset_parameters(0.1, 0.1)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    if hasattr(moe.router, "noise_weight"):
        torch.nn.init.normal_(moe.router.noise_weight, std=0.1)
    if hasattr(moe.router, "selection_bias"):
        moe.router.selection_bias.normal_(std=0.2)
    if hasattr(moe, "shared"):
        for p in moe.shared.parameters():
            torch.nn.init.normal_(p, std=0.1)
    if hasattr(moe, "shared_gate"):
        torch.nn.init.normal_(moe.shared_gate.weight, std=0.5)
    return moe


@pytest.mark.parametrize("backend", ["grouped", "padded"])
@pytest.mark.parametrize("kind", list(ROUTERS))
def test_dispatch_equals_per_expert_loop_for_every_router(kind, backend):
    cfg = _cfg(**ROUTERS[kind], expert_backend=backend)
    fast = _layer(cfg)
    slow = MoE(ModelConfig(**{**cfg.__dict__, "expert_backend": "loop"}))
    slow.load_state_dict(fast.state_dict())
    fast.train(), slow.train()  # noisy gating is active in training: same seed, same noise
    x = torch.randn(3, 10, 32)
    torch.manual_seed(7)
    y_fast, r_fast = fast(x)
    torch.manual_seed(7)
    y_slow, r_slow = slow(x)
    assert torch.equal(r_fast.idx_TK, r_slow.idx_TK)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_fast)
    (y_fast * g).sum().backward()
    (y_slow * g).sum().backward()
    for (n, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert all(p.grad is not None for n, p in fast.named_parameters()), "a parameter got no gradient"


def _reference_choice(cfg: ModelConfig, router: Router, x_TD: torch.Tensor):
    """Brute force in float64, one token at a time, straight from the papers' definitions."""
    W = router.weight.double()
    bias = router.selection_bias.double() if hasattr(router, "selection_bias") else torch.zeros(cfg.n_experts)
    E, K, G = cfg.n_experts, cfg.top_k, cfg.n_group
    idx, weights = [], []
    for x in x_TD.double():
        logits = W @ x
        scores = logits.sigmoid() if cfg.router == "sigmoid" else logits.softmax(-1)
        choice = (logits if cfg.router == "topk_softmax" else scores) + bias
        allowed = list(range(E))
        if G > 1:
            size = E // G
            top = cfg.group_score_top
            group_score = [sorted(choice[g * size:(g + 1) * size].tolist())[-top:] for g in range(G)]
            best = sorted(range(G), key=lambda g: -sum(group_score[g]))[: cfg.topk_group]
            allowed = [e for e in range(E) if e // size in best]
        chosen = sorted(allowed, key=lambda e: -choice[e].item())[:K]
        if cfg.router == "topk_softmax":
            w = logits[chosen].softmax(-1)
        else:
            w = scores[chosen]
            if cfg.norm_topk_prob:
                w = w / w.sum()
        idx.append(chosen)
        weights.append(w * cfg.routed_scaling)
    return torch.tensor(idx), torch.stack(weights)


@pytest.mark.parametrize("kind", ["softmax", "softmax-unnormalised", "topk_softmax", "sigmoid-groups-shared",
                                  "softmax-groups-best-expert"])
def test_router_choices_equal_brute_force_reference(kind):
    cfg = _cfg(**ROUTERS[kind])
    router = _layer(cfg).router.eval()
    x = torch.randn(50, 32)
    out = router(x)
    idx_ref, w_ref = _reference_choice(cfg, router, x)
    order = out.idx_TK.argsort(dim=1)
    order_ref = idx_ref.argsort(dim=1)
    assert torch.equal(out.idx_TK.gather(1, order), idx_ref.gather(1, order_ref))
    torch.testing.assert_close(out.weights_TK.gather(1, order).double(), w_ref.gather(1, order_ref),
                               rtol=1e-5, atol=1e-6)
    if cfg.n_group > 1:  # every token's experts lie in at most topk_group groups
        groups = out.idx_TK // (cfg.n_experts // cfg.n_group)
        assert max(len(set(row)) for row in groups.tolist()) <= cfg.topk_group


def test_capacity_drops_are_counted_on_a_hand_built_case():
    """6 tokens, 2 experts, top-1, capacity factor 1 -> ceil(1 * 6 * 1 / 2) = 3 slots each.
    Expert 0 is chosen by tokens 0,1,2,3,5: tokens 3 and 5 arrive after its 3 slots are full."""
    cfg = _cfg(router="switch", top_k=1, capacity_factor=1.0, n_experts=2, d_model=2, expert_dim=4)
    moe = _layer(cfg)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 5.0]]))
    x = torch.tensor([[1.0, 0], [1, 0], [1, 0], [1, 0], [0, 1], [1, 0]]).view(1, 6, 2)
    y, r = moe(x)
    assert r.idx_TK.flatten().tolist() == [0, 0, 0, 0, 1, 0]
    assert r.counts_E.tolist() == [5, 1]
    assert r.dropped_E.tolist() == [2, 0]
    kept = r.weights_TK.flatten() > 0
    assert kept.tolist() == [True, True, True, False, True, False]
    assert r.weights_TK[0, 0].item() == pytest.approx(torch.tensor([5.0, 0]).softmax(0)[0].item())
    assert torch.equal(y[0, 3], torch.zeros(2)) and torch.equal(y[0, 5], torch.zeros(2))
    assert y[0, [0, 1, 2, 4]].abs().sum(dim=1).min() > 0  # kept tokens got expert output


def test_a_capacity_factor_past_every_token_drops_nothing_and_does_not_overflow():
    """capacity_factor=1e30 made a capacity torch could not compare with (an OverflowError)."""
    x = torch.randn(2, 9, 32)
    y0, r0 = _layer(_cfg(router="softmax", capacity_factor=0.0))(x)
    for cf in (1e30, 100.0):
        y, r = _layer(_cfg(router="softmax", capacity_factor=cf))(x)
        assert int(r.dropped_E.sum()) == 0 and torch.equal(r.idx_TK, r0.idx_TK)
        torch.testing.assert_close(y, y0, rtol=0, atol=0)


def test_capacity_priority_takes_first_choices_of_all_tokens_before_second_choices():
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])  # expert 0: first choice of t0, t2; second of t1
    keep = capacity_keep(idx, torch.bincount(idx.flatten(), minlength=2), capacity=2)
    assert keep.tolist() == [[True, True], [True, False], [True, False]]


def test_balance_losses_equal_their_formulas():
    cfg = _cfg(router="sigmoid", n_experts=4, top_k=2, seq_aux_loss_coef=1e-3)
    router = _layer(cfg).router.eval()
    B, S = 3, 5
    x = torch.randn(B * S, 32)
    with torch.no_grad():
        out = router(x, n_seqs=B)
    logits = x.double() @ router.weight.detach().double().T
    s = logits.sigmoid()
    p = s / s.sum(-1, keepdim=True)
    idx = out.idx_TK
    E, K = 4, 2
    counts = torch.zeros(E, dtype=torch.float64)
    for e in idx.flatten().tolist():
        counts[e] += 1
    aux = E * sum(counts[e] / (B * S * K) * p[:, e].mean() for e in range(E))
    seq = 0.0
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        c = torch.zeros(E, dtype=torch.float64)
        for e in idx[rows].flatten().tolist():
            c[e] += 1
        seq += sum(E / (K * S) * c[e] * p[rows, e].mean() for e in range(E))
    z = torch.logsumexp(logits, -1).pow(2).mean()
    assert out.aux_loss.item() == pytest.approx(float(aux), rel=1e-5)
    assert out.seq_aux_loss.item() == pytest.approx(float(seq) / B, rel=1e-5)
    assert out.z_loss.item() == pytest.approx(float(z), rel=1e-5)


def test_noisy_gating_is_random_in_training_only_and_learns_its_noise():
    moe = _layer(_cfg(**ROUTERS["noisy"]))
    x = torch.randn(64, 32)
    moe.router.eval()
    a, b = moe.router(x), moe.router(x)
    assert torch.equal(a.idx_TK, b.idx_TK) and torch.equal(a.weights_TK, b.weights_TK)
    moe.router.train()
    c, d = moe.router(x), moe.router(x)
    assert not torch.equal(c.weights_TK, d.weights_TK)
    c.weights_TK.sum().backward()
    assert moe.router.noise_weight.grad.abs().sum() > 0


def test_bias_update_moves_a_skewed_load_towards_balance():
    cfg = _cfg(router="sigmoid", n_experts=8, top_k=2, bias_update_rate=0.01)
    router = _layer(cfg).router.eval()
    router.selection_bias.zero_()
    with torch.no_grad():
        router.weight[0] += 1.0  # expert 0 scores high for most tokens
    x = torch.randn(512, 32).abs()  # positive inputs: expert 0's larger weights win often

    def imbalance():
        load = router(x).counts_E.double()
        return (load.max() / load.mean()).item(), load.std().item()

    start = imbalance()
    assert start[0] > 2.0  # really skewed
    for _ in range(100):
        update_selection_bias([router], router(x).counts_E[None], cfg.bias_update_rate)
    end = imbalance()
    assert end[0] < 0.5 * start[0] and end[1] < 0.5 * start[1]
    assert router.selection_bias[0] < 0  # the overloaded expert was pushed down
    # The bias steers selection only: weights still come from the unbiased scores.
    out = router(x)
    s = (x @ router.weight.T).sigmoid().gather(1, out.idx_TK)
    torch.testing.assert_close(out.weights_TK, s / s.sum(-1, keepdim=True))


def test_bias_update_uses_the_whole_update_under_gradient_accumulation(tmp_path):
    """Two micro-batches whose loads point in opposite directions: the step follows their sum."""
    cfg = _cfg(router="sigmoid", n_experts=2, top_k=1, bias_update_rate=0.1)
    router = Router(cfg)
    micro1, micro2 = torch.tensor([[6, 2]]), torch.tensor([[0, 6]])
    update_selection_bias([router], micro1 + micro2, 0.1)  # totals 6 vs 8: expert 1 overloaded
    assert router.selection_bias.tolist() == pytest.approx([0.1, -0.1])
    assert math.isclose(float(router.selection_bias.sum()), 0.0, abs_tol=1e-7)


def test_balance_terms_only_where_a_loss_or_a_gradient_can_use_them():
    """Decoding (no targets, no gradients) skips the routers' aux, sequence and z terms (5% of a
    decoded token); the routing is the same, and with targets or gradients the terms are there, as
    the router computes them alone, and in the loss."""
    from moelab.config import Config
    from moelab.models import MoETransformer

    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.expert_dim = 64, 2, 64
    cfg.model.seq_aux_loss_coef, cfg.model.z_loss_coef = 0.01, 0.001
    cfg.resolve(vocab_size=300)
    torch.manual_seed(0)
    model = MoETransformer(cfg.model).eval()
    x = torch.randint(0, 300, (2, 16))
    y = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        plain = model(x, logits=False)
        scored = model(x, targets=y)
    graded = model(x)
    assert all(r.aux_loss is None and r.seq_aux_loss is None and r.z_loss is None for r in plain.router)
    for a, b, c in zip(plain.router, scored.router, graded.router):
        assert torch.equal(a.idx_TK, b.idx_TK) and torch.equal(a.counts_E, c.counts_E)
        assert torch.equal(a.weights_TK, b.weights_TK)
        for name in ("aux_loss", "seq_aux_loss", "z_loss"):
            assert getattr(b, name) is not None and torch.equal(getattr(b, name), getattr(c, name).detach())
    with torch.no_grad():  # the layer's router alone, on the layer's input, gives the same terms
        inputs = []
        hook = model.blocks[0].moe.router.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
        model(x, targets=y)
        hook.remove()
        alone = model.blocks[0].moe.router(inputs[0], n_seqs=2)
    assert torch.equal(alone.z_loss, scored.router[0].z_loss) and torch.equal(alone.aux_loss, scored.router[0].aux_loss)
    terms = scored.lm_loss + 0.01 * scored.aux_loss + 0.01 * scored.seq_aux_loss + 0.001 * scored.z_loss
    assert scored.aux_loss is not None and torch.allclose(scored.loss, terms, rtol=0, atol=1e-6)
