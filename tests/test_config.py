"""Presets, YAML files and dotted overrides; unknown keys fail naming the closest valid key."""

import pytest

from moelab.config import build_config
from moelab.errors import UserError


def test_presets_and_overrides_apply():
    cfg = build_config("exp3", None, ["train.steps=40", "model.n_experts=8", "optim.muon_lr=1e-3",
                                      "model.tie_embeddings=false", "data.source=/tmp/x:y"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (256, 6, 8)
    assert (cfg.model.expert_dim, cfg.model.top_k, cfg.train.seq_len, cfg.train.batch_size) == (512, 2, 128, 16)
    assert cfg.train.steps == 40 and cfg.model.n_experts == 8
    assert cfg.optim.muon_lr == 1e-3 and cfg.model.tie_embeddings is False
    assert cfg.data.source == "/tmp/x:y"


def test_default_preset_is_tiny():
    assert build_config().preset == "tiny"


@pytest.mark.parametrize("item,expect", [
    ("model.n_expert=8", "model.n_experts"),
    ("trian.steps=3", "train.steps"),
    ("train.stepz=3", "train.steps"),
])
def test_unknown_keys_name_the_closest(item, expect):
    with pytest.raises(UserError) as err:
        build_config("tiny", None, [item])
    msg = str(err.value)
    assert item.split("=")[0] in msg and f"'{expect}" in msg


def test_bad_values_and_invalid_configs():
    with pytest.raises(UserError, match="expects int"):
        build_config("tiny", None, ["train.steps=abc"])
    with pytest.raises(UserError, match="top_k"):
        build_config("tiny", None, ["model.top_k=9"])
    with pytest.raises(UserError, match="key=value"):
        build_config("tiny", None, ["train.steps"])


def test_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: exp3\nmodel:\n  n_layers: 3\ntrain:\n  steps: 7\n")
    cfg = build_config(None, str(f), ["train.steps=9"])
    assert cfg.preset == "exp3" and cfg.model.n_layers == 3 and cfg.train.steps == 9
    f.write_text("model:\n  d_modle: 3\n")
    with pytest.raises(UserError, match="model.d_model"):
        build_config(None, str(f))
    with pytest.raises(UserError, match="not found"):
        build_config(None, str(tmp_path / "missing.yaml"))


def test_unknown_preset():
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        build_config("tinny")
