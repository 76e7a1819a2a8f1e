"""Building a model: every tensor set by moelab's own init (`reset_parameters`), nothing drawn before
it, and `init=False` drawing nothing at all."""

import copy

import pytest
import torch

from moelab.config import Config
from moelab.models import MoETransformer

from .variants import VARIANTS

CASES = {
    **{name: dict(v) for name, v in VARIANTS.items()},
    "untied-plain-ffn-noisy": dict(tie_embeddings=False, ffn_glu=False, ffn_act="gelu", noisy_gating=True),
    "dense": dict(n_experts=0, n_kv_heads=2),
    "sigmoid-shared-bias": dict(router="sigmoid", n_shared_experts=1, first_k_dense=1, qkv_bias=True),
}


def _config(case: str):
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.expert_dim = 32, 3, 4, 32
    for k, v in CASES[case].items():
        setattr(cfg.model, k, v)
    cfg.resolve(vocab_size=61)
    return cfg.model


@pytest.mark.parametrize("case", list(CASES))
def test_reset_parameters_sets_every_parameter_and_buffer(case):
    model = MoETransformer(_config(case))
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    model.reset_parameters()
    model.rope_cos, model.rope_sin = model._rope_tables(torch.device("cpu"))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(t).all(), f"{name} is not set by reset_parameters"
    assert (model.norm.weight == 1).all()
    expected_std = model.cfg.init_std
    assert abs(float(model.embed.weight.detach().std()) - expected_std) < 0.1 * expected_std


@pytest.mark.parametrize("case", ["mha", "untied-plain-ffn-noisy", "mla-yarn-dense-first"])
def test_building_draws_only_moelabs_init(case):
    """The weights a seed gives are exactly those of `reset_parameters` run first on that seed:
    no default per-layer init of torch's is drawn (and thrown away) before it, and the random
    stream after building is where that init left it."""
    cfg = _config(case)
    torch.manual_seed(5)
    built = MoETransformer(cfg)
    after_build = torch.rand(4)
    redone = copy.deepcopy(built)
    torch.manual_seed(5)
    redone.reset_parameters()
    assert torch.equal(torch.rand(4), after_build)
    for (name, a), b in zip(built.state_dict().items(), redone.state_dict().values()):
        assert torch.equal(a, b), name
    assert built.lm_head.weight is built.embed.weight or not cfg.tie_embeddings


def test_init_false_draws_nothing_and_loads_into_an_equal_model():
    cfg = _config("gqa")
    torch.manual_seed(1)
    source = MoETransformer(cfg)
    state = torch.get_rng_state()
    empty = MoETransformer(cfg, init=False)
    assert torch.equal(torch.get_rng_state(), state)
    empty.load_state_dict(source.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.equal(empty(ids).logits, source(ids).logits)
    assert empty.lm_head.weight is empty.embed.weight


def test_a_meta_model_draws_nothing_and_imports_no_compiler():
    """`moelab info` and every checkpoint load build on the meta device: drawing an init there runs
    torch's Python reference ops, which import torch._dynamo and sympy (1-2 s on each command)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from moelab.models import MoETransformer\n"
        "from moelab.models.presets import get_preset\n"
        "cfg = get_preset('deepseek-v3'); cfg.resolve()\n"
        "before = 'torch._dynamo' in sys.modules\n"
        "state = torch.get_rng_state()\n"
        "m = MoETransformer(cfg.model, device='meta')\n"
        "assert m.rope_cos.shape == (cfg.model.max_seq_len, cfg.model.qk_rope_head_dim), m.rope_cos.shape\n"
        "assert torch.equal(torch.get_rng_state(), state)\n"
        "print(before or 'torch._dynamo' not in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr + res.stdout
