import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def write_corpus(root, n_docs: int = 60, words_per_doc: int = 400):
    """A small corpus of real-looking documents, each tagged with a unique marker word."""
    import random

    rng = random.Random(0)
    words = ("expert router token layer gradient batch window split value train model loss "
             "attention norm rotary vocabulary merge corpus document python code function").split()
    root.mkdir(parents=True)
    for i in range(n_docs):
        body = " ".join(rng.choice(words) for _ in range(words_per_doc))
        (root / f"doc{i:03d}.txt").write_text(f"marker{i:03d}x {body}\n", encoding="utf-8")
    return root


@pytest.fixture
def text_corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")
