"""Named run presets as plain functions returning a full Config (model + training defaults).

`tiny` is the default CPU run: about 3M parameters, a few minutes on 2 cores.
`exp3` is the "DeepSeek attention + GLM4 MoE" experiment's size (256-d, 6 layers, 8 heads,
expert width 512, 4 experts top-2, seq 128, batch 16, Muon LR 3e-3).
"""

from __future__ import annotations

import difflib

from moelab.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from moelab.errors import UserError


def tiny() -> Config:
    return Config(
        preset="tiny",
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, n_experts=4, top_k=2, expert_dim=256),
        data=DataConfig(),
        optim=OptimConfig(muon_lr=1e-2, adamw_lr=3e-3, warmup=50),
        train=TrainConfig(steps=600, seq_len=128, batch_size=16, eval_every=100, save_every=200),
    )


def exp3() -> Config:
    return Config(
        preset="exp3",
        model=ModelConfig(d_model=256, n_layers=6, n_heads=8, n_experts=4, top_k=2, expert_dim=512),
        data=DataConfig(),
        optim=OptimConfig(muon_lr=3e-3, adamw_lr=3e-3, warmup=100),
        train=TrainConfig(steps=10_000, seq_len=128, batch_size=16, eval_every=500,
                          save_every=3000, log_every=50),
    )


def test() -> Config:
    """Smallest useful run, for the test-suite: seconds on a CPU."""
    return Config(
        preset="test",
        model=ModelConfig(d_model=64, n_layers=2, n_heads=4, n_experts=4, top_k=2, expert_dim=64,
                          max_seq_len=64),
        data=DataConfig(vocab_size=512, max_docs=40, tokenizer_train_bytes=400_000),
        optim=OptimConfig(muon_lr=2e-2, adamw_lr=1e-2, warmup=5),
        train=TrainConfig(steps=30, seq_len=64, batch_size=8, eval_every=10, eval_windows=16,
                          log_every=5, save_every=10),
    )


PRESETS = {"tiny": tiny, "exp3": exp3, "test": test}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown preset '{name}'{hint} (available: {', '.join(PRESETS)})")
    return PRESETS[name]()
