"""Shared by the training tests: one small prepared dataset, tokenised once per session."""

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """One prepared dataset for every run here (tokenised once)."""
    import random

    root = tmp_path_factory.mktemp("rel")
    rng = random.Random(0)
    words = ("expert router token layer gradient batch window split value train model loss attention "
             "norm rotary vocabulary merge corpus document python code function").split()
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"d{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))
    res = subprocess.run([sys.executable, "-m", "moelab", "data", "prepare", str(corpus), "--out",
                          str(root / "prep"), "--vocab-size", "300", "--val-fraction", "0.1"],
                         capture_output=True, text=True, env=dict(os.environ, MOELAB_FAULTS=""))
    assert res.returncode == 0, res.stderr
    return root / "prep"


