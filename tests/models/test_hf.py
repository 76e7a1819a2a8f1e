"""moelab's model is exactly Mixtral: logits match transformers both ways; round trips are exact."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab.config import Config  # noqa: E402
from moelab.models import MoETransformer  # noqa: E402
from moelab.models.hf import export_hf, from_hf, load_hf, mixtral_config, to_hf  # noqa: E402


def _model(tie=False, kv=2):
    cfg = Config()
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.expert_dim = 64, 2, 4, kv, 96
    m.n_experts, m.top_k, m.tie_embeddings, m.norm_eps, m.rope_theta = 8, 2, tie, 1e-5, 5e5
    cfg.resolve(vocab_size=211)
    torch.manual_seed(0)
    model = MoETransformer(m)
    with torch.no_grad():  # larger router weights so routing is decisive, and non-trivial norms
        for blk in model.blocks:
            blk.moe.router.weight.normal_(std=0.5)
            blk.attn_norm.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("tie,kv", [(False, 2), (True, 4)])
def test_logits_match_transformers_mixtral_both_ways(tmp_path, tie, kv):
    ours = _model(tie, kv)
    ids = torch.randint(0, 211, (2, 33))
    hf = to_hf(ours)
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    export_hf(ours, tmp_path / "hf")
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(reloaded_hf).__name__ == "MixtralForCausalLM"
    back = load_hf(tmp_path / "hf")  # HF -> moelab
    with torch.no_grad():
        assert (reloaded_hf(ids).logits - back(ids).logits).abs().max().item() <= 1e-4
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name  # moelab -> HF -> moelab is bit-exact


def test_hf_to_moelab_to_hf_is_bit_exact():
    cfg = mixtral_config(_model().cfg)
    torch.manual_seed(3)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    again = to_hf(from_hf(hf))
    sd_a, sd_b = hf.state_dict(), again.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_inexpressible_config_is_refused():
    from moelab.errors import UserError

    model = _model()
    model.cfg.norm_topk_prob = False
    with pytest.raises(UserError, match="norm_topk_prob"):
        to_hf(model)


def test_trained_run_exports_and_converts_via_cli(tmp_path):
    import subprocess
    import sys

    from moelab import load_model
    from moelab.config import build_config
    from moelab.train.loop import train

    run = tmp_path / "run"
    train(build_config("test", None, ["train.steps=3", "train.eval_every=3"]), out=str(run), progress=False)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True)

    res = cli("export", str(run), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ours = load_model(run)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4
    res = cli("convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert res.returncode == 0, res.stderr
    back = load_model(tmp_path / "back")
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    res = cli("export", str(run), "--out", str(tmp_path / "hf"))  # never overwrite
    assert res.returncode == 2 and "not empty" in res.stderr
