"""Every benchmark script runs as the README shows it (`python benchmarks/X.py`, from any folder) at
its smallest size, checks what it checks, and prints its comparison. No timing is asserted: these
only keep the scripts from rotting (generate.py could not import its helpers and nobody saw)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_transformers, write_corpus

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
RATIO = r"(\d+\.\d+)x"


def _run(script, *args, cwd):
    res = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script,args,expect", [
    pytest.param("moe_layer.py", ["--preset", "test", "--iters", "1", "--rounds", "1", "--profile"],
                 [r"max \|out - moelab\| = ", r"a new input each call",
                  r"ratio moelab / best transformers .*: " + RATIO, r"ceiling at that rate: " + RATIO],
                 marks=needs_transformers),
    pytest.param("train_throughput.py", ["--preset", "test", "--iters", "1", "--rounds", "1", "--warmup", "1",
                                         "--fast-fp32-matmul"],
                 [r"a new batch each step", r"ratio moelab .* / best transformers .*: " + RATIO],
                 marks=needs_transformers),
    ("loss.py", ["--tokens", "256", "--d-model", "32", "--vocab", "512", "--iters", "1", "--rounds", "1",
                 "--compile"],
     [r"speed ratio moelab fused / unfused: " + RATIO,
      r"speed ratio moelab fused compiled / unfused compiled: " + RATIO,
      r"moelab fused compiled vs unfused: \|loss diff\| \d"]),
    ("generate.py", ["--presets", "test", "deepseek_v3-tiny", "--prompt", "4", "--new", "4", "--rounds", "1"],
     [r"test \(gqa, fp32 weights\).*speed-up " + RATIO + r".*same tokens: True", r"\(mla.*same tokens: True"]),
    ("generate.py", ["--presets", "deepseek_v3-tiny", "--prompt", "4", "--new", "4", "--rounds", "1", "--dtype", "bf16"],
     [r"\(mla, bf16 weights\).*speed-up " + RATIO]),
    ("generate.py", ["--presets", "test", "deepseek_v3-tiny", "--prompt", "6", "--new", "4", "--rounds", "1",
                     "--batch", "3"],
     [r"test \(gqa, fp32 weights\).*3 prompts of 3-6 tokens.*speed-up " + RATIO + r".*same tokens as alone: True",
      r"\(mla.*same tokens as alone: True"]),
    ("generate.py", ["--presets", "test", "--prefill", "--batch", "3", "--prompt", "48", "--prefill-tokens", "24"],
     [r"test \(gqa, fp32 weights\).*prefill of 3 prompts of 12-48 tokens \| one forward .* \| chunks of 24 .*"
      r"memory ratio one forward / chunks: " + RATIO + r", time ratio " + RATIO + r" \| same tokens: True"]),
    pytest.param("export.py", ["--arch", "deepseek_v3", "--layers", "2", "--shard", "5MB", "--experts", "8",
                               "--expert-dim", "256", "--d-model", "256"],
                 [r"memory ratio save_pretrained / moelab: " + RATIO + r"; same tensors: True"],
                 marks=needs_transformers),
])
def test_benchmark_runs_and_prints_its_comparison(tmp_path, script, args, expect):
    out = _run(script, *args, cwd=tmp_path)
    for pattern in expect:
        assert re.search(pattern, out), f"{pattern!r} not in:\n{out[-3000:]}"
    for ratio in re.findall(RATIO, out):
        assert float(ratio) > 0


@pytest.mark.slow
def test_data_and_optimizer_benchmarks_run(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=20, words_per_doc=200)
    out = _run("data_prepare.py", "--source", corpus, "--vocab", "300", cwd=tmp_path)
    assert re.search(r"end to end\s+\d+\.\d+ s\s+\d+\.\d+ MB/s/core", out), out
    assert "identical ids: True" in out  # the fast encoder gives tokenizers' ids
    assert len(re.findall(r"peak RSS [1-9]\d* MB \(\d+\.\d+x the text", out)) == 2, out  # each run's own peak
    out = _run("optimizers.py", "--preset", "test", "--steps", "2", "--lrs", "1e-2", "--out", tmp_path / "opt",
               cwd=tmp_path)
    assert "hybrid-lr0.01" in out and "adamw-lr0.01" in out, out
