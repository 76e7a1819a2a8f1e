"""The memory check before training: its count of the training state equals what a real training
step allocates, and a model that cannot fit is refused in one line before anything is prepared."""

import pytest
import torch

from moelab.config import build_config
from moelab.models import MoETransformer
from moelab.optim.groups import HybridOptimizer
from moelab.train.memory import available_bytes, training_state_bytes


@pytest.mark.parametrize("mode", ["hybrid", "muon", "adamw"])
def test_training_state_bytes_equal_a_real_step(mode):
    cfg = build_config("test", None, [f"optim.mode={mode}"]).resolve(vocab_size=300)
    model = MoETransformer(cfg.model)
    opt = HybridOptimizer(model, cfg.optim, torch.device("cpu"))
    ids = torch.randint(0, 300, (2, 17))
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    opt.step()
    params = list(model.parameters())
    state = sum(t.nbytes for o in opt.optimizers for p, st in o.state.items() for t in st.values()
                if torch.is_tensor(t) and t.shape == p.shape)  # moments and momentum, not step counters
    got = training_state_bytes(MoETransformer(cfg.model, device="meta"), mode)
    assert got["parameters"] == sum(p.numel() for p in params)
    assert got["weights"] == sum(p.nbytes for p in params)
    assert got["gradients"] == sum(p.grad.nbytes for p in params)
    assert got["optimizer"] == state > 0


def test_available_memory_is_within_the_machines():
    avail = available_bytes(torch.device("cpu"))
    if avail is None:
        pytest.skip("no /proc/meminfo or cgroup files here")
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    swap = int(next(ln for ln in open("/proc/meminfo") if ln.startswith("SwapTotal")).split()[1]) * 1024
    assert 0 < avail <= ram + swap


def test_a_model_that_cannot_fit_is_refused_before_anything_is_prepared(tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "run"  # DeepSeek-V3: 671B parameters, 8 TB of training state
    r = run_cli("train", "--preset", "deepseek-v3", "--out", out, "train.device=cpu")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "preset deepseek-v3 cannot fit: training its 671.03B parameters needs at least" in r.stderr
    assert "this machine has" in r.stderr and "GB available" in r.stderr
    assert not out.exists()
