"""Parameter counts against hand-computed formulas; `moelab info` prints them."""

import subprocess
import sys

from moelab.config import build_config
from moelab.models.accounting import build_meta_model, parameter_table


def test_counts_match_formula_tied_and_untied():
    for tie in (True, False):
        cfg = build_config("exp3", None, [f"model.tie_embeddings={tie}", "model.n_kv_heads=2"])
        m = cfg.resolve(vocab_size=1000).model
        V, D, L, E, F, Dh = 1000, m.d_model, m.n_layers, m.n_experts, m.expert_dim, m.head_dim
        rows = parameter_table(build_meta_model(m))
        attn = L * (D * 8 * Dh + 2 * D * 2 * Dh + 8 * Dh * D)  # q, k+v (2 kv heads), o
        experts = L * E * 3 * D * F
        assert rows["embedding"]["total"] == V * D
        assert rows["head"]["total"] == (0 if tie else V * D)
        assert rows["attention"]["total"] == attn
        assert rows["routed_experts"]["total"] == experts
        assert rows["routed_experts"]["active"] == experts * 2 // 4
        assert rows["router"]["total"] == L * E * D
        assert rows["norms"]["total"] == (2 * L + 1) * D
        total = V * D * (1 if tie else 2) + attn + experts + L * E * D + (2 * L + 1) * D
        assert rows["total"]["total"] == total
        assert rows["total"]["active"] == total - experts // 2


def test_info_cli():
    res = subprocess.run([sys.executable, "-m", "moelab", "info", "exp3"], capture_output=True, text=True)
    assert res.returncode == 0
    assert "13,116,672" in res.stdout and "8,398,080" in res.stdout  # total / active at vocab 8192


def test_info_on_a_config_file_and_with_overrides(tmp_path):
    from tests.conftest import run_cli

    cfg = build_config("exp3", None, ["model.n_experts=16", "model.n_layers=3"]).resolve(vocab_size=8192)
    rows = parameter_table(build_meta_model(cfg.model))
    total, active = f"{rows['total']['total']:,}", f"{rows['total']['active']:,}"
    res = run_cli("info", "exp3", "model.n_experts=16", "model.n_layers=3")
    assert res.returncode == 0 and total in res.stdout and active in res.stdout and "16 experts" in res.stdout
    plan = tmp_path / "plan.yaml"
    plan.write_text("preset: exp3\nmodel:\n  n_experts: 16\n")
    res = run_cli("info", plan, "model.n_layers=3")  # the file, then overrides: as moelab train reads them
    assert res.returncode == 0 and total in res.stdout and "3 layers" in res.stdout
    res = run_cli("info", "exp3", "model.n_expert=16")
    assert res.returncode == 2 and "did you mean 'model.n_experts'" in res.stderr
    run = tmp_path / "run"  # a run before its first checkpoint ('no checkpoint found' before): its config.yaml
    run.mkdir()
    (run / "config.yaml").write_text(plan.read_text())
    res = run_cli("info", run, "model.n_layers=3")
    assert res.returncode == 0 and total in res.stdout and "3 layers" in res.stdout, res.stderr


def test_info_lists_the_memory_of_the_weights_in_fp32_and_bf16_and_of_training():
    """fp32: 4 bytes a parameter; bf16: 2, the routers' 4 (what load_model(dtype="bf16") holds);
    training: fp32 weights and gradients, Muon's one buffer and AdamW's two (what the memory check
    before training counts); each with the RoPE tables."""
    import torch

    from moelab.models import MoETransformer
    from moelab.optim.groups import HybridOptimizer
    from tests.conftest import run_cli

    res = run_cli("info", "deepseek_v3-tiny")
    assert res.returncode == 0, res.stderr
    cfg = build_config("deepseek_v3-tiny").resolve(vocab_size=8192)
    model = MoETransformer(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    router = sum(p.numel() for name, p in model.named_parameters() if ".router." in name)
    rope = model.rope_cos.nbytes + model.rope_sin.nbytes + sum(
        r.selection_bias.nbytes for r in model.routers)
    half = MoETransformer.from_weights(cfg.model, model.state_dict(), torch.bfloat16)
    assert sum(p.nbytes for p in half.parameters()) == 2 * n + 2 * router > 0
    expect = {"weights, fp32": 4 * n + rope, "weights, bf16": 2 * n + 2 * router + rope}
    for mode in ("hybrid", "adamw"):
        cfg.optim.mode = mode
        opt = HybridOptimizer(model, cfg.optim, torch.device("cpu"))
        ids = torch.randint(0, 8192, (1, 9))
        model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
        opt.step()
        state = sum(t.nbytes for o in opt.optimizers for p, st in o.state.items() for t in st.values()
                    if torch.is_tensor(t) and t.shape == p.shape)
        expect[f"training, optim.mode={mode}"] = 8 * n + state + rope
        model.zero_grad(set_to_none=True)
    for what, size in expect.items():
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(what))
        assert f"{size / 1e6:,.1f} MB" in line, (line, size)


def test_info_names_the_multipliers_a_design_sets_and_only_those():
    """Granite's scales change what the model computes, not its parameter counts: the summary says them."""
    from moelab.commands import info

    head = info("granite-3.1-1b-a400m").splitlines()[0]
    assert head.endswith("multipliers: embed_scale 12, residual_scale 0.22, attn_scale 0.015625, logits_divisor 6")
    assert "multipliers" not in info("mixtral-tiny").splitlines()[0]
    assert info("mixtral-tiny", ["model.residual_scale=0.5"]).splitlines()[0].endswith("multipliers: residual_scale 0.5")
