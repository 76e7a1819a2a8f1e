"""Changing token t+1 must never change logits at positions <= t, for every attention variant."""

import pytest
import torch

from tests.models.variants import VARIANTS, tiny_model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_future_tokens_do_not_change_past_logits(variant):
    model = tiny_model(variant)
    S = 24
    ids = torch.randint(0, 97, (1, S))
    with torch.no_grad():
        base = model(ids).logits
        for t in (0, 5, S - 2):
            changed = ids.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 13) % 97
            out = model(changed).logits
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-4  # the future did change
