import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on 2 cores: one thread per worker and per child process it starts, not two each
    # contending for the same cores (the suite takes 8-9 min that way against 12-13 in one process)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


def moelab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ, MOELAB_FAULTS=""))


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


HAS_TRANSFORMERS = has_module("transformers")
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers (the dev extras)")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A 30-update `test` preset run on the marker corpus, with checkpoints and, where transformers is
    installed (the dev extras; the suite also runs without them), its HF export in hf/."""
    root = tmp_path_factory.mktemp("evalrun")
    corpus = write_corpus(root / "corpus")
    import json

    words = "expert router token layer gradient batch".split()
    items = [{"context": f"marker{i:03d}x {words[i % 6]}", "choices": [words[(i + j) % 6] + " model" for j in range(3)],
              "gold": i % 3} for i in range(8)]
    (root / "mc.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    # a child process: the report records the command line that started the run
    res = moelab("train", "--preset", "test", "--out", root / "run", f"data.source={corpus}",
                 "data.vocab_size=300", "train.save_every=10", "train.keep_last=0", "train.plot=true",
                 "train.report=true", f"train.choice_tasks={root / 'mc.jsonl'}", "train.choice_every=10")
    assert res.returncode == 0, res.stderr
    if HAS_TRANSFORMERS:
        res = run_cli("export", root / "run", "--out", root / "hf")  # in this process: transformers loads once
        assert res.returncode == 0, res.stderr
    return root


def run_cli(*args):
    """The real CLI entry point in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    import contextlib
    import io
    from types import SimpleNamespace

    from moelab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
