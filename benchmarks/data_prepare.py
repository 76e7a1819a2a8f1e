"""Data preparation throughput: MB of text per second per core, end to end and by stage.

Run: python benchmarks/data_prepare.py [--source stdlib|site-packages|PATH ...] [--vocab 8192]
(`site-packages`: this interpreter's site-packages directory, a few hundred MB of code and text
already on disk: the corpus where the default 64M-character BPE sample is smaller than the data.)
Runs the real `moelab data prepare` (moelab.data.prepare.prepare) twice on the same source:
  1. training a BPE tokenizer on the training split (what a first run does), and
  2. with that tokenizer given (what preparing more data, or a corpus too large to train BPE on
     whole, does: BPE is trained once on a bounded sample, --tokenizer-train-bytes).
Stages come from the manifest: read, split (MinHash near-duplicate groups + the hash split),
tokenizer training, tokenize (every core), write (shards); each run is a child process, whose peak
RSS is printed beside the text's size. Then the tokenizers-vs-fast-encoder
comparison on the same documents (at most 32 MB of them), in one process. MB/s/core = text MB / seconds / usable cores.
Not a test: timings are machine-dependent. Issue 4's target is 2 MB/s per core for plain text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


_CHILD = """
import json, resource, sys, time
from moelab.data.prepare import prepare
a = json.loads(sys.argv[1])
t = time.perf_counter()
prepare(a["sources"], a["out"], vocab_size=a["vocab"], tokenizer=a["tok"])
print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))
"""
_BASE_RSS = 0


def _prepare_in_child(sources, out, vocab, tok) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one `prepare` in a fresh process, so each run's peak is its own."""
    global _BASE_RSS
    if not _BASE_RSS:  # what importing moelab and its libraries costs before any data
        base = "import resource, moelab.data.prepare; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        _BASE_RSS = int(subprocess.run([sys.executable, "-c", base], capture_output=True, text=True,
                                       check=True).stdout) * 1024
    arg = json.dumps({"sources": sources, "out": str(out), "vocab": vocab, "tok": tok})
    done = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "prepare failed")
    wall, peak = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, peak


def main() -> None:
    from moelab.data.sources import iter_corpus
    from moelab.data.parallel import cores as usable_cores
    from moelab.data.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--source", nargs="+", default=["stdlib"])
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    if "site-packages" in args.source:
        import sysconfig

        args.source = [sysconfig.get_paths()["purelib"] if s == "site-packages" else s for s in args.source]
    cores = usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for label, tok in (("training BPE", None), ("given tokenizer", str(Path(tmp) / "a" / "tokenizer"))):
            out = Path(tmp) / ("a" if tok is None else "b")
            wall, peak = _prepare_in_child(args.source, out, args.vocab, tok)
            m = json.loads((out / "manifest.json").read_text())
            mb = sum(s["bytes"] for s in m["splits"].values()) / 1e6
            rows.append((label, mb, wall, peak, m["seconds"], m["encoder"]))
        print(f"{args.source}: {mb:.1f} MB of text, {cores} cores")
        for label, mb, wall, peak, stages, encoder in rows:
            print(f"\nprepare, {label} (encoder: {encoder})")
            for stage, sec in stages.items():  # the manifest keeps milliseconds: a tiny stage may read 0
                rate = f"{mb / sec / cores:8.2f}" if sec > 0 else f"{'-':>8}"
                print(f"  {stage:<20}{sec:7.2f} s  {rate} MB/s/core")
            print(f"  {'end to end':<20}{wall:7.2f} s  {mb / wall / cores:8.2f} MB/s/core")
            print(f"  peak RSS {peak / 1e6:.0f} MB ({peak / 1e6 / mb:.2f}x the text; the process alone "
                  f"takes {_BASE_RSS / 1e6:.0f} MB)")
        texts, size = [], 0
        for s in args.source:
            for _, text, _ in iter_corpus(s):
                if size > 32e6:
                    break
                if text is not None:
                    texts.append(text)
                    size += len(text.encode("utf-8"))
        mb = size / 1e6
        tok = load_tokenizer(Path(tmp) / "a" / "tokenizer")
        t = time.perf_counter()
        slow = tok.encode_batch_slow(texts)
        t_slow = time.perf_counter() - t
        t = time.perf_counter()
        fast = tok.encode_arrays(texts)
        t_fast = time.perf_counter() - t
        same = all(a.tolist() == b for a, b in zip(fast, slow))
        print(f"\ntokenize only ({mb:.1f} MB): tokenizers {mb / t_slow / cores:.2f} MB/s/core, fast encoder "
              f"{mb / t_fast / cores:.2f} MB/s/core ({t_slow / t_fast:.1f}x), identical ids: {same}")


if __name__ == "__main__":
    main()
