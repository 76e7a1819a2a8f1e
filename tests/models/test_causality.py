"""Changing token t+1 must never change logits at positions <= t."""

import torch

from moelab.config import Config
from moelab.models import MoETransformer


def test_future_tokens_do_not_change_past_logits():
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 4
    cfg.model.n_kv_heads = 2  # exercise GQA too
    cfg.model.expert_dim = 32
    cfg.resolve(vocab_size=97)
    model = MoETransformer(cfg.model).eval()
    S = 24
    ids = torch.randint(0, 97, (2, S))
    with torch.no_grad():
        base = model(ids).logits
        for t in (0, 5, S - 2):
            changed = ids.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 13) % 97
            out = model(changed).logits
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-4  # the future did change
