"""Data preparation throughput: MB of text per second per core, by stage, on the embedded corpus.

Run: python benchmarks/data_prepare.py [--source stdlib|PATH] [--vocab 8192]
Stages: read (corpus files), split (near-duplicate MinHash + hashing), BPE training on the train
split, tokenization of both splits (tokenizers' batch encoder, which uses every core), packing.
Not a test: timings are machine-dependent. Issue 4's target is 2 MB/s per core end to end.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    from moelab.data.loader import make_windows, pack
    from moelab.data.sources import load_corpus
    from moelab.data.split import split_documents
    from moelab.data.tokenizer import train_bpe

    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="stdlib")
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    times = {}

    t = time.perf_counter()
    corpus = load_corpus(args.source)
    times["read"] = time.perf_counter() - t
    mb = sum(len(d.text.encode("utf-8")) for d in corpus.documents) / 1e6
    t = time.perf_counter()
    train, val = split_documents(corpus.documents, 0.05, "moelab", near_duplicates=True)
    times["split (MinHash)"] = time.perf_counter() - t
    t = time.perf_counter()
    tok = train_bpe((d.text for d in train), args.vocab)
    times["BPE training"] = time.perf_counter() - t
    t = time.perf_counter()
    ids = tok.encode_batch([d.text for d in train + val])
    times["tokenize"] = time.perf_counter() - t
    t = time.perf_counter()
    make_windows(pack(ids[: len(train)], tok.eos_id), 128)
    make_windows(pack(ids[len(train):], tok.eos_id), 128)
    times["pack"] = time.perf_counter() - t
    total = sum(times.values())
    print(f"{len(corpus.documents)} documents, {mb:.1f} MB, {cores} cores")
    for stage, sec in times.items():
        print(f"  {stage:<18}{sec:7.2f} s  {mb / sec / cores:8.2f} MB/s/core")
    print(f"  {'end to end':<18}{total:7.2f} s  {mb / total / cores:8.2f} MB/s/core")


if __name__ == "__main__":
    main()
