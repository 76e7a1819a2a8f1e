"""Near-duplicate groups of documents by MinHash over word shingles (Broder 1997), with LSH banding.

Used by the split so that near-copies (generated files from one template, deprecated shims that
repeat a module, copied boilerplate-heavy files) land on the same side: otherwise a validation
document would be "unseen" only by name. Documents whose estimated Jaccard similarity of word
5-gram sets reaches `threshold` are joined (transitively, union-find) into one group.

Everything is deterministic and independent of the rest of the corpus: words are hashed with CRC32,
shingles with the same rolling hash as the leakage audit, permutations come from a fixed seed.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from moelab.data.audit import ngram_hashes

WORD = re.compile(r"\w+|[^\w\s]")
NUM_PERM, BANDS = 64, 16  # 16 bands of 4 rows: pairs with Jaccard ~0.5 collide in some band
_rng = np.random.default_rng(20260)
_A = _rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) | np.uint64(1)
_B = _rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)


def minhash(text: str, shingle: int = 5) -> np.ndarray:
    ids = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in WORD.findall(text)), dtype=np.uint64)
    sh = np.unique(ngram_hashes(ids, min(shingle, max(len(ids), 1))))
    sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, sh.shape[0], 65536):  # bounded memory for long documents
            block = sh[start:start + 65536, None] * _A + _B
            sig = np.minimum(sig, block.min(axis=0))
    return sig


def near_duplicate_groups(texts: list[str], threshold: float = 0.5) -> list[int]:
    """Group id (index of the group's first member) for each text."""
    sigs = np.stack([minhash(t) for t in texts]) if texts else np.zeros((0, NUM_PERM), np.uint64)
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows = NUM_PERM // BANDS
    for b in range(BANDS):
        buckets: dict[bytes, int] = {}
        for i, key in enumerate(sigs[:, b * rows:(b + 1) * rows]):
            first = buckets.setdefault(key.tobytes(), i)
            if first != i and find(first) != find(i) and (sigs[first] == sigs[i]).mean() >= threshold:
                parent[find(i)] = find(first)
    return [find(i) for i in range(len(texts))]
