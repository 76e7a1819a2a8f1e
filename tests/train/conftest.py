"""Shared by the training tests: one small prepared dataset, tokenised once per session."""

import os
import subprocess
import sys

import pytest

from tests.conftest import write_corpus


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """One prepared dataset for every run here (tokenised once)."""
    root = tmp_path_factory.mktemp("rel")
    corpus = write_corpus(root / "corpus")
    res = subprocess.run([sys.executable, "-m", "moelab", "data", "prepare", str(corpus), "--out",
                          str(root / "prep"), "--vocab-size", "300", "--val-fraction", "0.1"],
                         capture_output=True, text=True, env=dict(os.environ, MOELAB_FAULTS=""))
    assert res.returncode == 0, res.stderr
    return root / "prep"


