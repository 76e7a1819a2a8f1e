import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def text_corpus(tmp_path):
    """A small corpus of real-looking documents, each tagged with a unique marker word."""
    import random

    rng = random.Random(0)
    words = ("expert router token layer gradient batch window split value train model loss "
             "attention norm rotary vocabulary merge corpus document python code function").split()
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(60):
        body = " ".join(rng.choice(words) for _ in range(400))
        (root / f"doc{i:03d}.txt").write_text(f"marker{i:03d}x {body}\n", encoding="utf-8")
    return root
