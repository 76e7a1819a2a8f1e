"""Near-duplicate groups of documents by MinHash over word shingles (Broder 1997), with LSH banding.

Used by the split so that near-copies (generated files from one template, deprecated shims that
repeat a module, copied boilerplate-heavy files) land on the same side: otherwise a validation
document would be "unseen" only by name. Documents whose estimated Jaccard similarity of word
5-gram sets reaches `threshold` are joined (transitively, union-find) into one group.

Vectorised with numpy over each document's UTF-8 bytes (no Python loop over words):
- words are runs of [0-9A-Za-z_] or non-ASCII bytes; every other non-space byte is a word of its own;
- a word's hash is a 64-bit polynomial of its bytes (prefix sums, wrapping arithmetic), mixed;
- shingles of 5 words get the same rolling hash as the leakage audit, mixed again (splitmix64);
- the signature is one-permutation MinHash (Li, Owen, Zhang 2012): the hash space is cut into 128
  bins by the top 7 bits and each bin keeps its smallest shingle, which one sort gives for free;
  empty bins borrow from the next non-empty bin with an offset (rotation densification,
  Shrivastava and Li 2014). The chance two documents agree in a bin estimates their Jaccard
  similarity, as for 128 independent permutations, at the cost of one.
Everything is deterministic and independent of the rest of the corpus.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from moelab.data.audit import ngram_hashes

NUM_PERM, BANDS = 128, 32  # 32 bands of 4 bins: a pair with Jaccard 0.5 shares a band with p=0.87
_BIN_SHIFT = np.uint64(57)  # top 7 bits pick one of the 128 bins
_LOW = np.uint64((1 << 57) - 1)
_EMPTY = np.iinfo(np.uint64).max
_P = 0x100000001B3
_WORD = np.zeros(256, dtype=bool)
_WORD[[*b"0123456789_", *range(ord("A"), ord("Z") + 1), *range(ord("a"), ord("z") + 1), *range(128, 256)]] = True
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[*b" \t\n\r\x0b\x0c"]] = True
_tables = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))  # P^j and P^-j mod 2^64
_grow = threading.Lock()


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^j and P^-j (mod 2^64) for j < n; the tables grow on demand, swapped in as one tuple so a
    thread never sees one table grown and the other not."""
    global _tables
    pw, inv = _tables
    if pw.shape[0] < n:
        with _grow:
            pw, inv = _tables
            if pw.shape[0] < n:
                size = max(n, 2 * pw.shape[0])
                with np.errstate(over="ignore"):
                    pw = np.concatenate([[np.uint64(1)], np.cumprod(np.full(size - 1, _P, dtype=np.uint64))])
                    inv = np.concatenate([[np.uint64(1)],
                                          np.cumprod(np.full(size - 1, pow(_P, -1, 2**64), dtype=np.uint64))])
                _tables = (pw, inv)
    return pw[:n], inv[:n]


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole word (wrapping)."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def word_hashes(text: str) -> np.ndarray:
    """One uint64 per word (see the module docstring), in text order."""
    b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    keep = np.flatnonzero(~_SPACE[b])  # positions of non-space bytes
    if keep.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    word = _WORD[b]
    # a word starts at a kept byte unless it continues a run of word bytes
    cont = np.zeros(b.shape[0], dtype=bool)
    cont[1:] = word[1:] & word[:-1]
    first = np.flatnonzero(~cont[keep])  # indices into `keep` where words start
    pw, inv = _powers(b.shape[0])
    with np.errstate(over="ignore"):
        terms = (b[keep].astype(np.uint64) + np.uint64(1)) * pw[keep]
        sums = np.add.reduceat(terms, first)
        return _mix(sums * inv[keep[first]])  # shift each word's polynomial to start at P^0


def minhash(text: str, shingle: int = 5) -> np.ndarray:
    ids = word_hashes(text)
    sh = np.sort(_mix(ngram_hashes(ids, min(shingle, max(len(ids), 1)))))  # repeats leave each bin's min as is
    sig = np.full(NUM_PERM, _EMPTY, dtype=np.uint64)
    if sh.shape[0] == 0:
        return sig
    bins = np.arange(NUM_PERM, dtype=np.uint64)
    pos = np.searchsorted(sh, bins << _BIN_SHIFT)
    cand = sh[np.minimum(pos, sh.shape[0] - 1)]
    filled = (pos < sh.shape[0]) & ((cand >> _BIN_SHIFT) == bins)
    full = np.flatnonzero(filled)
    # rotation: an empty bin takes the next filled bin to its right (cyclically), plus its distance
    nxt = full[np.searchsorted(full, np.arange(NUM_PERM)) % full.shape[0]]
    dist = (nxt - np.arange(NUM_PERM)) % NUM_PERM
    sig = (cand[nxt] & _LOW) | (dist.astype(np.uint64) << _BIN_SHIFT)
    return sig


def signatures(texts: list[str], threads: int = 0) -> np.ndarray:
    """(len(texts), NUM_PERM) MinHash signatures, computed on `threads` threads (0: every core)."""
    if not texts:
        return np.zeros((0, NUM_PERM), np.uint64)
    from moelab.data.tokenizer import _cores

    threads = threads or _cores()
    if threads == 1:
        return np.stack([minhash(t) for t in texts])
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL in the array work
        return np.stack(list(pool.map(minhash, texts, chunksize=8)))


def near_duplicate_groups(texts: list[str], threshold: float = 0.5) -> list[int]:
    """Group id (index of the group's first member) for each text."""
    sigs = signatures(texts)
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows = NUM_PERM // BANDS
    for b in range(BANDS):
        # documents with the same band key are candidates; each is checked against the band's first
        band = np.ascontiguousarray(sigs[:, b * rows:(b + 1) * rows]).view(f"V{8 * rows}").ravel()
        _, first, inverse = np.unique(band, return_index=True, return_inverse=True)
        first_N = first[inverse.ravel()]
        cand = np.flatnonzero(first_N != np.arange(len(texts)))
        close = (sigs[first_N[cand]] == sigs[cand]).mean(axis=1) >= threshold
        for i, j in zip(cand[close].tolist(), first_N[cand[close]].tolist()):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(len(texts))]
