"""Presets, YAML files and dotted overrides; unknown keys fail naming the closest valid key."""

import dataclasses
import itertools
import re

import pytest
import torch

from moelab.config import Config, build_config, load_yaml
from moelab.errors import UserError
from moelab.models import MoETransformer


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
    ("train.lr=1e-3", "optim.muon_lr' or 'optim.adamw_lr"),  # a name from another toolkit
    ("model.num_experts_per_tok=2", "model.top_k"),
    ("model.seed=3", "train.seed"),  # the right name in the wrong section
    ("train.vocab_size=300", "model.vocab_size' or 'data.vocab_size"),
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
    with pytest.raises(UserError, match="if the shell expanded a glob, quote it"):  # data.source=*.txt unquoted
        build_config("tiny", None, ["data.source=pyproject.toml", __file__])
    assert build_config("tiny", None, ["train.steps=1e4"]).train.steps == 10_000  # YAML reads 1e4 as text
    with pytest.raises(UserError, match="expects int, got 2.5"):
        build_config("tiny", None, ["train.steps=2.5e0"])
    # a text setting keeps what was typed where YAML would read a mapping or a list ("expects str, got {'hf': None}")
    for typed in ("hf:", "notes: a", "[a, b]"):
        assert build_config("tiny", None, [f"data.source={typed}"]).data.source == typed
    with pytest.raises(UserError, match=r"expects int, got \[1\]"):
        build_config("tiny", None, ["model.n_experts=[1]"])


@pytest.mark.parametrize("item, expect", [
    ("train.grad_clip=-1", "train.grad_clip must be >= 0"),  # would flip every gradient's sign
    ("model.n_kv_heads=-1", "model.n_kv_heads must be >= 0"),
    ("model.head_dim=-2", "model.head_dim must be >= 0"),
    ("model.expert_dim=0", "model.expert_dim must be >= 1"),
    ("model.shared_expert_dim=-3", "model.shared_expert_dim must be >= 0"),
    ("model.init_std=-1", "model.init_std must be >= 0"),
    ("optim.warmup=-5", "optim.warmup must be >= 0"),
    ("optim.beta1=1.5", "optim.beta1 must be in [0, 1)"),
    ("optim.momentum=1", "optim.momentum must be in [0, 1)"),
    ("train.threads=-1", "train.threads must be >= 0"),
    ("data.tokenizer_train_bytes=-1", "data.tokenizer_train_bytes must be >= 0"),
    ("model.routed_scaling=0", "model.routed_scaling"),
    ("data.pdf_min_words=500", "pdf_min_words must not exceed"),
    ("optim.muon_lr=inf", "optim.muon_lr' expects a finite number"),  # trained straight into nan
    ("train.grad_clip=nan", "train.grad_clip' expects a finite number"),  # nan passes every comparison
    ("optim.adamw_lr=.nan", "optim.adamw_lr' expects a finite number"),
    (("model.n_shared_experts=2", "model.n_experts=0"), "n_shared_experts needs routed experts"),  # ignored
    ("model.shared_expert_gate=true", "shared_expert_gate gates the shared experts, and this model has none"),
    ("model.first_k_dense=4", "leaves no MoE layer"),  # 4 experts configured, none used; routing crashed
    ("data.source=", "data.source is empty"),  # Path('') is the current folder: it trained on that
    ("data.source=  ", "data.source is empty"),
    ("model.n_heads=0", "model.n_heads must be >= 1 (got 0)"),  # ZeroDivisionError traceback
    ("model.vocab_size=-1", "model.vocab_size must be >= 0 (got -1)"),  # AssertionError traceback
    ("model.d_model=1e30", "model.d_model must be <= 2,147,483,647 (got 1e+30)"),  # torch's size overflow
    ("train.seq_len=3e9", "train.seq_len must be <= 2,147,483,647 (got 3,000,000,000)"),
    ("model.n_layers=1e6", "model.n_layers must be <= 16,384 (got 1,000,000)"),  # built one by one: never ended
    ("optim.ns_steps=1e30", "optim.ns_steps must be <= 100 (got 1e+30)"),  # the first update never ended
    ("train.seed=1e30", "train.seed must be <= 4,611,686,018,427,387,904 (got 1e+30)"),  # torch's overflow
    ("train.spike_window=1e30", "train.spike_window must be <= 4,611,686,018,427,387,904"),  # deque's overflow
    ("train.grad_accum=1e30", "train.grad_accum must be <= 2,147,483,647"),
    ("model.n_group=0", "model.n_group must be >= 1 (got 0)"),  # ZeroDivisionError traceback
    ("model.group_score_top=0", "model.group_score_top must be >= 1 (got 0)"),  # every group scored 0
    ("model.n_group=4", "model.top_k (2) exceeds the experts reachable in model.topk_group groups (1 x 1 experts"),
    ("train.batch_size=0", "train.batch_size must be >= 1 (got 0)"),  # named with its neighbours, not alone
    ("optim.adamw_lr=0", "optim.adamw_lr must be > 0 (got 0.0)"),
    ("model.yarn_beta_fast=0", "model.yarn_beta_fast must be > 0 (got 0.0)"),  # ZeroDivisionError under yarn
    ("model.rope_scaling=llama3", "rope_scaling=llama3 needs model.rope_original_max_len"),
    (("model.rope_scaling=llama3", "model.rope_original_max_len=8192", "model.llama3_low_freq_factor=4"),
     "model.llama3_high_freq_factor must exceed model.llama3_low_freq_factor (got 4.0 and 4.0)"),  # 0/0 blend
])
def test_out_of_range_numbers_are_refused_by_key(item, expect):
    """Each crashed deep in torch with a traceback, or trained something else without a word."""
    with pytest.raises(UserError, match=re.escape(expect)):
        build_config("tiny", None, [item] if isinstance(item, str) else list(item))


# bases with the features that only some keys act on turned on (yarn's betas and mscales divided
# by zero or took a log of a negative number there, and the default tiny base never reached them)
SWEEP_BASES = {
    "tiny": ("tiny", []),
    "mla-yarn": ("deepseek_v3-tiny", ["model.rope_scaling=yarn", "model.rope_factor=4", "model.rope_original_max_len=8",
                                      "model.yarn_mscale=1", "model.yarn_mscale_all_dim=0.8",
                                      "model.z_loss_coef=0.001", "model.noisy_gating=true"]),
    "switch-linear-rope": ("switch-tiny", ["model.rope_scaling=linear", "model.rope_factor=2"]),
    "dense-llama3-rope": ("qwen3-tiny", ["model.rope_scaling=llama3", "model.rope_factor=8",
                                         "model.rope_original_max_len=8"]),
}


@pytest.mark.parametrize("base", list(SWEEP_BASES))
def test_every_number_out_of_range_is_one_line_and_every_accepted_one_builds_and_trains(base):
    """Each numeric key set to 0, -1 or 3: refused with a UserError naming it, or accepted, and
    then the model builds, its loss is finite and backward runs. No other exception."""
    preset, overrides = SWEEP_BASES[base]
    defaults = Config()
    numeric = [(section, f.name) for section in ("model", "data", "optim", "train")
               for f in dataclasses.fields(getattr(defaults, section))
               if type(getattr(getattr(defaults, section), f.name)) in (int, float)]
    assert len(numeric) > 60
    x = torch.randint(0, 300, (2, 16))
    built = 0
    for (section, key), value in itertools.product(numeric, (0, -1, 3)):
        item = f"{section}.{key}={value}"
        try:
            cfg = build_config(preset, None, [*overrides, item, "train.seq_len=16"]).resolve(vocab_size=300)
            cfg.check_new_run()
        except UserError as err:
            assert "\n" not in str(err), item
            if value < 0 and f"{section}.{key}" in str(err):  # and says what it got
                assert "(got " in str(err) and str(value) in str(err).split("(got ")[1], (item, str(err))
            continue
        if section != "model":
            continue
        torch.manual_seed(0)
        out = MoETransformer(cfg.model)(x, targets=x)
        assert torch.isfinite(out.loss), item
        out.loss.backward()
        built += 1
    assert built > 30


def test_zero_means_auto_or_off_where_documented():
    cfg = build_config("tiny", None, ["model.n_experts=0", "model.expert_dim=0", "train.grad_clip=0",
                                      "optim.warmup=0", "model.max_seq_len=0", "train.threads=0"])
    assert cfg.resolve(vocab_size=300).model.max_seq_len == cfg.train.seq_len


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


def test_preset_flag_and_a_config_files_preset_must_agree(tmp_path):
    """--preset tiny with a file saying preset: exp3 built tiny without a word."""
    f = tmp_path / "c.yaml"
    f.write_text("preset: exp3\nmodel:\n  n_layers: 2\n")
    with pytest.raises(UserError, match=r"--preset tiny and .*c.yaml's preset: exp3 differ"):
        build_config("tiny", str(f))
    assert build_config("exp3", str(f)).model.d_model == build_config(None, str(f)).model.d_model == 256
    assert build_config(None, str(f)).model.n_layers == 2


def test_unknown_preset():
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        build_config("tinny")


def test_config_file_errors_say_where_and_a_byte_order_mark_is_fine(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layers: 3\n  d_model: [1\n")
    with pytest.raises(UserError, match=r"c.yaml is not valid YAML: line 4, column 1: expected ',' or '\]'"):
        load_yaml(f)
    f.write_text("model:\n\tn_layers: 1\n")
    with pytest.raises(UserError, match=r"line 2, column 1: found character '\\t'"):
        load_yaml(f)
    f.write_bytes(b"\xef\xbb\xbfmodel:\n  n_layers: 1\n")
    assert load_yaml(f) == {"model": {"n_layers": 1}}


def test_a_key_given_twice_in_a_config_file_is_refused_not_last_one_wins(tmp_path):
    """PyYAML keeps the last of two equal keys: a setting added at the end of a long config
    silently overrode the one above it (a whole second `model:` section replaced the first)."""
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  d_model: 64\n  n_layers: 2\n  d_model: 32\n")
    with pytest.raises(UserError, match=r"line 4, column 3: key 'd_model' is given twice \(first on line 2\)"):
        build_config(None, str(f))
    f.write_text("model:\n  d_model: 64\ntrain:\n  steps: 3\nmodel:\n  n_layers: 2\n")
    with pytest.raises(UserError, match=r"line 5, column 1: key 'model' is given twice \(first on line 1\)"):
        build_config(None, str(f))
    f.write_text("model:\n  vocab_size: 640\ndata:\n  vocab_size: 512\n")  # one name in two sections: fine
    cfg = build_config(None, str(f))
    assert (cfg.model.vocab_size, cfg.data.vocab_size) == (640, 512)
    with pytest.raises(UserError, match="is a directory"):
        load_yaml(tmp_path)


def test_print_config_reads_back_and_trains_nothing(tmp_path, monkeypatch):
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    res = run_cli("train", "--preset", "exp3", "train.steps=7", "model.n_experts=8", "--print-config")
    assert res.returncode == 0, res.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no data prepared
    (tmp_path / "plan.yaml").write_text(res.stdout)
    back = build_config(None, str(tmp_path / "plan.yaml"))
    assert back.to_dict() == build_config("exp3", None, ["train.steps=7", "model.n_experts=8"]).to_dict()
    assert back.train.steps == 7 and back.model.n_experts == 8 and back.model.d_model == 256
    res = run_cli("train", "--out", tmp_path / "r", "--resume", "auto", "--print-config")
    assert res.returncode == 2 and "RUN/config.yaml" in res.stderr


def test_print_config_documents_every_setting(monkeypatch):
    """--print-config shows each setting with its note from moelab/config.py: the comment on its
    line, or the note above it (a run of settings shares the note above its first one). A setting
    added without a note fails here; so does a note that --print-config leaves out."""
    import dataclasses

    from moelab.config import field_notes
    from tests.conftest import run_cli

    res = run_cli("train", "--preset", "exp3", "--print-config")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "  vocab_size: 0  # 0: take the tokenizer's vocabulary size" in lines
    assert "  # ---- attention ----" in lines and "  d_model: 256  # width of the residual stream" in lines
    cfg = build_config("exp3")
    for name in ("model", "data", "optim", "train"):
        section, notes = getattr(cfg, name), field_notes(type(getattr(cfg, name)))
        at = lines.index(f"{name}:")
        grouped = False
        for f in dataclasses.fields(section):
            above, after = notes[f.name]
            own = [a for a in above if not a.startswith("----")]  # a section heading documents nothing
            grouped = bool(own) or (grouped and not after)
            assert own or after or grouped, f"{name}.{f.name} has no note in moelab/config.py"
            key = next(i for i in range(at, len(lines)) if lines[i].startswith(f"  {f.name}:"))
            assert lines[key - len(above):key] == [f"  # {a}".rstrip() for a in above], f.name
            assert lines[key].endswith(f"  # {after}") if after else "#" not in lines[key], lines[key]


def test_a_damaged_saved_config_is_one_line_naming_the_file(tmp_path):
    """A run's or checkpoint's config.yaml cut or edited into invalid YAML: eval, resume and report
    read it with Config.from_yaml_file, which ended in a yaml traceback."""
    good = tmp_path / "config.yaml"
    good.write_text(Config().to_yaml())
    assert Config.from_yaml_file(good).to_yaml() == Config().to_yaml()
    bad = tmp_path / "cut.yaml"
    bad.write_text(Config().to_yaml()[:40] + "\n  [")
    with pytest.raises(UserError, match=rf"config file {re.escape(str(bad))} is not valid YAML: line \d+"):
        Config.from_yaml_file(bad)


def test_a_config_file_with_no_settings_is_refused(tmp_path):
    """An empty file (the wrong one given, or every line commented out) trained the preset's
    defaults without a word, as if --config had not been given."""
    f = tmp_path / "c.yaml"
    for text in ("", "# model:\n#   d_model: 512\n"):
        f.write_text(text)
        with pytest.raises(UserError, match=r"c.yaml holds no settings \(empty, or only comments\)"):
            build_config(None, str(f))
    f.write_text("preset: test\n")  # a preset alone is a setting
    assert build_config(None, str(f)).preset == "test"
