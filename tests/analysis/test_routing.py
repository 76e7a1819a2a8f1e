"""Routing statistics against values computed by hand on fixed counts (a balanced layer, a collapsed
layer, a layer with a dead expert), counts files from other systems, and a measured run."""

import json
import math
import shutil

import numpy as np
import pytest

from moelab.analysis.collect import measure, read_counts
from moelab.analysis.routing import analyze, js_divergence, layer_stats
from moelab.errors import UserError
from tests.conftest import moelab, needs_transformers, run_cli


def test_balanced_layer():
    s = layer_stats([25, 25, 25, 25])
    assert s["cv"] == 0 and s["max_min"] == 1 and s["max_mean"] == 1 and s["gini"] == 0
    assert s["entropy"] == pytest.approx(1.0) and s["dead"] == [] and s["starved"] == []
    assert s["noise_cv"] == pytest.approx(math.sqrt(3 / 100))
    assert s["verdict"] == "balanced"


def test_collapsed_layer():
    s = layer_stats([40, 0, 0, 0])
    # mean 10; deviations 30, -10, -10, -10 -> variance (900 + 3 * 100) / 4 = 300
    assert s["cv"] == pytest.approx(math.sqrt(300) / 10)
    assert s["max_mean"] == 4 and s["max_min"] == math.inf
    # Gini of sorted (0, 0, 0, 40): sum (2i - n - 1) x_i / (n * total) = (3 * 40) / (4 * 40)
    assert s["gini"] == pytest.approx(0.75)
    assert s["entropy"] == 0 and s["dead"] == [1, 2, 3]
    assert s["verdict"] == "collapse"


def test_layer_with_a_dead_expert():
    s = layer_stats([12, 8, 10, 0], dropped_E=[2, 0, 1, 0])
    # mean 7.5; squared deviations 20.25 + 0.25 + 6.25 + 56.25 = 83 -> variance 20.75
    assert s["cv"] == pytest.approx(math.sqrt(20.75) / 7.5)
    assert s["max_mean"] == pytest.approx(12 / 7.5) and s["max_min"] == math.inf
    p = np.array([12, 8, 10]) / 30
    assert s["entropy"] == pytest.approx(float(-(p * np.log(p)).sum() / math.log(4)))
    # sorted (0, 8, 10, 12): (-3*0 - 1*8 + 1*10 + 3*12) / (4 * 30) = 38 / 120
    assert s["gini"] == pytest.approx(38 / 120)
    assert s["dead"] == [3] and s["starved"] == [] and s["dropped"] == 3 and s["dropped_share"] == pytest.approx(0.1)
    assert s["verdict"] == "high imbalance"


def test_fractional_counts_are_kept_not_truncated():
    """A counts file of shares (0.45, 0.3, ...) was shown and saved as 0s."""
    s = layer_stats([0.45, 0.3, 0.25])
    assert s["counts"] == [0.45, 0.3, 0.25] and s["slots"] == pytest.approx(1.0) and s["dead"] == []
    assert layer_stats([3.0, 1.0])["counts"] == [3, 1]


def test_a_layer_that_routed_nothing_is_not_called_a_collapse(tmp_path):
    s = layer_stats([0, 0, 0, 0])
    assert s["slots"] == 0 and s["verdict"] == "no tokens"
    (tmp_path / "c.json").write_text("[[0, 0, 0, 0], [40, 0, 0, 0]]")
    a = analyze(read_counts(str(tmp_path / "c.json")))
    assert [s["verdict"] for s in a["splits"]["data"]] == ["no tokens", "collapse"] and a["worst"] == "collapse"


def test_moderate_and_starved():
    s = layer_stats([110, 100, 90, 100])  # CV = sqrt(200/4)/100 = 0.0707, max/min 1.22
    assert s["cv"] == pytest.approx(math.sqrt(50) / 100) and s["verdict"] == "balanced"
    assert layer_stats([130, 100, 70, 100])["verdict"] == "moderate"  # max/min 1.86
    starved = layer_stats([100, 100, 100, 5, 95])
    assert starved["starved"] == [3] and starved["verdict"] == "high imbalance"  # max/min 20


def test_jensen_shannon():
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: 1 bit
    assert js_divergence([3, 3], [5, 5]) == pytest.approx(0.0)
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4)
    kl_pm = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_qm = math.log2(1 / 0.75)
    assert js_divergence([1, 1], [1, 0]) == pytest.approx((kl_pm + kl_qm) / 2)


@pytest.mark.parametrize("bom", ["", "\ufeff"])
def test_json_counts_file_with_splits_steps_and_drift(tmp_path, bom):
    f = tmp_path / "counts.json"
    counts = {"train": [[25, 25, 25, 25], [40, 0, 0, 0]], "val": [[25, 25, 25, 25], [0, 40, 0, 0]],
              "steps": {"10": [[1, 1, 1, 1], [4, 0, 0, 0]], "20": [[1, 1, 1, 1], [0, 4, 0, 0]]}, "top_k": 1}
    f.write_text(bom + json.dumps(counts), encoding="utf-8")  # also as a spreadsheet or editor saves it
    a = analyze(read_counts(str(f)))
    assert [s["verdict"] for s in a["splits"]["train"]] == ["balanced", "collapse"]
    assert a["train_val_js"] == [pytest.approx(0.0), pytest.approx(1.0)]
    assert a["steps_js"]["20"] == [pytest.approx(0.0), pytest.approx(1.0)]
    assert a["worst"] == "collapse"


@pytest.mark.parametrize("suffix,sep,bom", [(".csv", ",", ""), (".tsv", "\t", ""), (".csv", ",", "\ufeff")])
def test_csv_counts_file_per_step_as_the_background_system_logged_them(tmp_path, suffix, sep, bom):
    # 6 experts, 2 layers, train and validation, two steps (the routing-balance study's layout); also
    # tab-separated, and with the byte-order mark a spreadsheet puts before the header
    rows = ["step,split,layer,e0,e1,e2,e3,e4,e5"]
    for step in (100, 200):
        for split in ("train", "val"):
            rows.append(f"{step},{split},0,10,10,10,10,10,10")
            rows.append(f"{step},{split},1,30,10,5,5,5,5")
    f = tmp_path / f"counts{suffix}"
    f.write_text(bom + "\n".join(r.replace(",", sep) for r in rows) + "\n", encoding="utf-8")
    data = read_counts(str(f))
    assert data.n_experts == 6 and data.layers == ["0", "1"] and sorted(data.steps) == [100, 200]
    np.testing.assert_array_equal(data.splits["val"][1], [60, 20, 10, 10, 10, 10])
    a = analyze(data)
    layer1 = a["splits"]["train"][1]
    mean = 60 / 6
    sd = math.sqrt(((30 - mean) ** 2 + (10 - mean) ** 2 + 4 * (5 - mean) ** 2) / 6)
    assert layer1["cv"] == pytest.approx(sd / mean) and layer1["max_min"] == 6
    assert layer1["verdict"] == "high imbalance" and a["splits"]["train"][0]["verdict"] == "balanced"


@pytest.mark.parametrize("text,suffix,msg", [
    ("step,layer,e0,e1,e2\n1,0,5,5,5\n1,1,5,5\n", ".csv", "row 3 has 4 fields, the header has 5"),
    ('[[1, 2, 3], [1, 2]]', ".json", "layer 1 has 2 expert counts, layer 0 has 3"),
    ('{"train": [[1, 2]], "val": [[1, 2, 3]]}', ".json", "expected 1 x 2"),
    ("layer,e0,e1\n0,5,x\n", ".csv", "must be numbers"),
    ("{not json", ".json", "not valid JSON"),
    # a headerless file: its first layer was read as expert names and dropped from the analysis
    ("10\t20\n30\t40\n", ".tsv", "the first row holds numbers, not column names"),
])
def test_bad_counts_files_are_one_line_errors(tmp_path, text, suffix, msg):
    f = tmp_path / f"c{suffix}"
    f.write_text(text)
    with pytest.raises(UserError, match=msg):
        read_counts(str(f))


def test_cli_ragged_counts_file_exits_2_with_one_line(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("layer,e0,e1,e2\n0,1,2,3\n1,1,2\n")
    res = moelab("routing", f)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "row 3" in res.stderr


def test_cli_counts_file_writes_json_and_heatmaps(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": [[5, 5, 5, 5], [9, 0, 1, 10]], "steps": {
        "1": [[1, 1, 1, 1], [2, 0, 0, 2]], "2": [[1, 1, 1, 1], [3, 0, 1, 0]]}}))
    res = run_cli("routing", f, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "high imbalance" in res.stdout and "population standard deviation" in res.stdout
    saved = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert saved["splits"]["train"][1]["max_min"] == "inf"  # strict JSON
    for png in ("routing_layers.png", "routing_steps.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measured_counts_equal_a_per_token_recount(trained):
    """The run measurement's counts and co-activation equal a recount from each token's choices."""
    import torch

    from moelab.eval.target import load_target

    target = load_target(str(trained / "run"))
    windows = torch.randint(0, 300, (3, 65))
    m = measure(target.model, windows, batch_size=2)
    with torch.no_grad():
        routers = target.model(windows[:, :-1]).router
    E = target.model.cfg.n_experts
    for layer, r in enumerate(routers):
        counts = np.zeros(E)
        pairs = np.zeros((E, E))
        for choice in r.idx_TK.tolist():  # a per-token reference loop
            for i in choice:
                counts[i] += 1
                for j in choice:
                    pairs[i, j] += 1
        np.testing.assert_array_equal(m["counts"][layer], counts)
        np.testing.assert_array_equal(m["pairs"][layer], pairs)
    assert m["tokens"] == 3 * 64


def test_run_analysis_has_both_splits_checkpoints_and_steps(trained, tmp_path):
    res = run_cli("routing", trained / "run", "--out", tmp_path / "r", "--windows", "8")
    assert res.returncode == 0, res.stderr
    a = json.loads((tmp_path / "r" / "routing.json").read_text())
    assert set(a["splits"]) == {"train", "val"} and len(a["train_val_js"]) == 2
    assert sorted(int(k) for k in a["checkpoints_js"]) == [20, 30]  # checkpoints at 10, 20, 30
    assert "drift between checkpoints (JS bits, per layer): step 10->20: " in res.stdout  # not "->20"
    assert "; step 20->30: " in res.stdout
    assert len(a["steps_js"]) >= 4  # training counts logged every 5 updates
    assert set(a["plots"]) == {"layers", "steps", "checkpoints", "coactivation"}
    # an earlier checkpoint, or other text, goes beside its run's routing/, which the run's report shows
    # (the newest checkpoint on the run's own data); without --out, nothing goes inside a checkpoint
    run = trained / "run"
    shown = json.loads((run / "routing" / "routing.json").read_text())["source"]
    assert shown == "run/step_0000030"  # written by the report at the end of training
    ckpt = run / "checkpoints" / "step_0000020"
    made = {ckpt: run / "routing-step_0000020", run: run / "routing-corpus"}
    try:
        for target, extra in ((ckpt, ()), (run, ("--source", trained / "corpus"))):
            res = run_cli("routing", target, *extra, "--windows", "2", "--no-plots")
            assert res.returncode == 0 and f"wrote {made[target] / 'routing.json'}" in res.stdout, res.stderr
        assert json.loads((made[ckpt] / "routing.json").read_text())["source"] == "run/step_0000020"
        assert list(json.loads((made[run] / "routing.json").read_text())["splits"]) == ["source"]
        assert json.loads((run / "routing" / "routing.json").read_text())["source"] == shown
        assert not (ckpt / "routing").exists()
    finally:
        for folder in made.values():
            shutil.rmtree(folder, ignore_errors=True)
    res = run_cli("routing", tmp_path / "no-such-run")
    assert res.returncode == 2 and "no such run" in res.stderr


@needs_transformers
def test_cli_hf_directory_without_data_is_refused_before_its_weights_load(trained):
    res = run_cli("routing", trained / "hf")
    assert res.returncode == 2 and "has no data of its own: give --data PREPARED_DIR or --source" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # no weight-loading progress bar before it


@needs_transformers
def test_hf_model_routed_on_raw_text_as_its_run_is(trained, tmp_path):
    """`moelab routing HF_DIR --source TEXT`: a pretrained model's routing on one's own text, with no
    conversion; the counts equal those of the run it was exported from on the same text (but for
    the odd near-tie flipped by the export's rounding)."""
    corpus = trained / "corpus"
    res = run_cli("routing", trained / "hf", "--source", corpus, "--windows", "16", "--out", tmp_path / "hf",
                  "--no-plots")
    assert res.returncode == 0, res.stderr
    hf = json.loads((tmp_path / "hf" / "routing.json").read_text())
    res = run_cli("routing", trained / "run", "--source", corpus, "--windows", "16", "--out", tmp_path / "run",
                  "--no-plots")
    assert res.returncode == 0, res.stderr
    run = json.loads((tmp_path / "run" / "routing.json").read_text())
    assert list(hf["splits"]) == list(run["splits"]) == ["source"]
    for a, b in zip(hf["splits"]["source"], run["splits"]["source"]):
        ca, cb = np.array(a["counts"]), np.array(b["counts"])
        assert ca.sum() == cb.sum() == 16 * 64 * 2 and np.abs(ca - cb).sum() <= 0.02 * ca.sum()


def test_a_model_whose_layers_are_all_dense_has_no_routing_to_analyse():
    """first_k_dense == n_layers with experts configured (a saved run may hold it): a one-line error,
    not 'stack expects a non-empty TensorList'."""
    from moelab.analysis.collect import from_run
    from moelab.eval.target import Target
    from tests.models.variants import tiny_model

    model = tiny_model("mha", first_k_dense=2)
    assert model.cfg.n_experts and not model.cfg.moe_layers
    with pytest.raises(UserError, match="dense model"):
        from_run(Target(model, None, "all-dense"))
