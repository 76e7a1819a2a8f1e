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
