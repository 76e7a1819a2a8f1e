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
  similarity, as for 128 independent permutations, at the cost of one;
- each bin is kept as 16 bits of a hash of its (minimum, offset): 256 bytes a document instead of
  1 KB (a corpus of 10M documents: 2.6 GB, not 10 GB). Two different bins then agree by chance
  with p = 2^-16, a bias of the estimate far below its sampling error (b-bit minwise hashing,
  Li and König 2010), and a band of 4 bins is one exact 64-bit key.
Everything is deterministic and independent of the rest of the corpus.
"""

from __future__ import annotations

import threading

import numpy as np

from moelab.data.audit import _P as _P64, ngram_hashes
from moelab.data.parallel import batches, thread_map

NUM_PERM, BANDS = 128, 32  # 32 bands of 4 bins: a pair with Jaccard 0.5 shares a band with p=0.87
SIG_DTYPE = np.uint16  # one bin as stored; BANDS bands of NUM_PERM // BANDS bins are 64-bit keys
assert NUM_PERM // BANDS * np.dtype(SIG_DTYPE).itemsize == 8  # a band viewed as one uint64
_BIN_SHIFT = np.uint64(57)  # top 7 bits pick one of the 128 bins
_LOW = np.uint64((1 << 57) - 1)
_EMPTY = np.iinfo(np.uint64).max
_P = int(_P64)  # the audit's rolling-hash multiplier
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


def _word_hashes(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hash, first byte position) of every word of the UTF-8 bytes `b`, in text order."""
    keep = np.flatnonzero(~_SPACE[b])  # positions of non-space bytes
    if keep.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    word = _WORD[b]
    # a word starts at a kept byte unless it continues a run of word bytes
    cont = np.zeros(b.shape[0], dtype=bool)
    cont[1:] = word[1:] & word[:-1]
    first = np.flatnonzero(~cont[keep])  # indices into `keep` where words start
    pw, inv = _powers(b.shape[0])
    with np.errstate(over="ignore"):
        terms = (b[keep].astype(np.uint64) + np.uint64(1)) * pw[keep]
        sums = np.add.reduceat(terms, first)
        return _mix(sums * inv[keep[first]]), keep[first]  # each word's polynomial shifted to P^0


def word_hashes(text: str) -> np.ndarray:
    """One uint64 per word (see the module docstring), in text order."""
    return _word_hashes(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))[0]


SEGMENT = 1 << 21  # a document longer than this (bytes) is hashed a segment at a time


def _bins(raws: list[bytes], shingle: int) -> np.ndarray:
    """(len(raws), NUM_PERM) smallest shingle hash in each bin (_EMPTY where none), of several
    documents in one pass of array work (no per-document numpy calls, which dominate for many small
    documents). A document with fewer words than `shingle` has a single shingle of all its words."""
    starts = np.cumsum([0] + [len(r) + 1 for r in raws])[:-1]  # one space between documents
    words, pos = _word_hashes(np.frombuffer(b" ".join(raws), dtype=np.uint8))
    D = len(raws)
    doc = np.searchsorted(starts, pos, side="right") - 1
    n_words = np.bincount(doc, minlength=D)
    first_word = np.cumsum(n_words) - n_words
    sh = ngram_hashes(words, shingle)
    inside = doc[:sh.shape[0]] == doc[shingle - 1:]  # shingles that do not cross a document end
    sh, sh_doc = sh[inside], doc[:sh.shape[0]][inside]
    short = np.flatnonzero((n_words > 0) & (n_words < shingle))
    if short.shape[0]:  # the audit's hash of all their words: n_words steps, masked per document
        h = np.zeros(short.shape[0], dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(shingle - 1):
                m = j < n_words[short]
                h[m] = h[m] * _P64 + words[first_word[short[m]] + j] + np.uint64(1)
        sh, sh_doc = np.concatenate([sh, h]), np.concatenate([sh_doc, short])
    sh = _mix(sh)
    sig = np.full(D * NUM_PERM, _EMPTY, dtype=np.uint64)
    np.minimum.at(sig, sh_doc * NUM_PERM + (sh >> _BIN_SHIFT).astype(np.int64), sh & _LOW)
    return sig.reshape(D, NUM_PERM)


def _cut(b: np.ndarray, at: int) -> int:
    """The first position from `at` on where `b` may be cut without cutting a word (the byte there
    or the one before is no word byte; a UTF-8 character's bytes are all word bytes), or len(b)."""
    step = 1 << 16
    while at < b.shape[0]:
        w = _WORD[b[at - 1:at + step]]
        ok = np.flatnonzero(~(w[1:] & w[:-1]))
        if ok.shape[0]:
            return at + int(ok[0])
        at += step
    return b.shape[0]


def _long_bins(raw: bytes, shingle: int) -> np.ndarray:
    """_bins of one long document, SEGMENT bytes at a time, so that memory is bounded by the segment,
    not the document: segments are cut between words and each carries the last shingle - 1 words of
    the one before, so the shingles are exactly the whole document's."""
    b = np.frombuffer(raw, dtype=np.uint8)
    bins = np.full(NUM_PERM, _EMPTY, dtype=np.uint64)
    tail, start, n_words = np.zeros(0, dtype=np.uint64), 0, 0
    while start < b.shape[0]:
        end = _cut(b, start + SEGMENT)
        words = np.concatenate([tail, _word_hashes(b[start:end])[0]])
        n_words += words.shape[0] - tail.shape[0]
        sh = _mix(ngram_hashes(words, shingle))
        np.minimum.at(bins, (sh >> _BIN_SHIFT).astype(np.int64), sh & _LOW)
        tail, start = words[words.shape[0] - (shingle - 1):] if shingle > 1 else words[:0], end
    return bins if n_words >= shingle else _bins([raw], shingle)[0]  # a few huge words: whole


def _batch_signatures(texts: list[str | bytes], shingle: int = 5) -> np.ndarray:
    """Signatures of several documents (str, or their UTF-8 bytes). A document with fewer words
    than `shingle` has a single shingle of all its words; one with none gets an all-empty signature."""
    raws = [t if isinstance(t, bytes) else t.encode("utf-8") for t in texts]
    long = [i for i, r in enumerate(raws) if len(r) > SEGMENT]
    if long:
        sig = np.full((len(raws), NUM_PERM), _EMPTY, dtype=np.uint64)
        rest = [i for i, r in enumerate(raws) if len(r) <= SEGMENT]
        if rest:
            sig[rest] = _bins([raws[i] for i in rest], shingle)
        for i in long:
            sig[i] = _long_bins(raws[i], shingle)
    else:
        sig = _bins(raws, shingle)
    # rotation: an empty bin takes the next filled bin to its right (cyclically), plus its distance
    cols = np.arange(NUM_PERM)
    at = np.where(sig != _EMPTY, cols, 4 * NUM_PERM)
    nxt = np.minimum.accumulate(np.concatenate([at, at + NUM_PERM], axis=1)[:, ::-1], axis=1)[:, ::-1][:, :NUM_PERM]
    found = nxt < 2 * NUM_PERM
    src = np.where(found, nxt % NUM_PERM, 0)
    out = np.take_along_axis(sig, src, axis=1) | ((nxt - cols) % NUM_PERM).astype(np.uint64) << _BIN_SHIFT
    return (_mix(np.where(found, out, _EMPTY)) >> np.uint64(48)).astype(SIG_DTYPE)  # 16 bits of each


def minhash(text: str, shingle: int = 5) -> np.ndarray:
    return _batch_signatures([text], shingle)[0]


def signatures(texts: list[str | bytes], threads: int = 0, batch_chars: int = 1 << 21) -> np.ndarray:
    """(len(texts), NUM_PERM) MinHash signatures of texts (str, or their UTF-8 bytes), SIG_DTYPE, in
    batches of about `batch_chars` characters (bytes) on `threads` threads (0: every core)."""
    if not texts:
        return np.zeros((0, NUM_PERM), SIG_DTYPE)
    return np.concatenate(thread_map(_batch_signatures, list(batches(texts, batch_chars)), threads))


def near_duplicate_groups(texts: list[str], threshold: float = 0.5) -> list[int]:
    """Group id (index of the group's first member) for each text."""
    return signature_groups(signatures(texts), threshold)


def _first_alike(key: np.ndarray) -> np.ndarray:
    """For each element of `key`, the index of its first occurrence (one sort, no Python loop)."""
    order = np.argsort(key, kind="stable")  # stable: each run of equal keys starts at its first row
    ks = key[order]
    starts = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))
    first_N = np.empty_like(order)
    first_N[order] = np.repeat(order[starts], np.diff(np.append(starts, order.shape[0])))
    return first_N


def signature_groups(sigs: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Group id (index of the group's first member) for each row of `sigs` (MinHash signatures, as
    `signatures` gives them)."""
    if sigs.dtype != SIG_DTYPE or sigs.shape[1:] != (NUM_PERM,):
        raise ValueError(f"signatures must be (N, {NUM_PERM}) {np.dtype(SIG_DTYPE).name}, "
                         f"not {sigs.shape} {sigs.dtype}")
    parent = list(range(sigs.shape[0]))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows = NUM_PERM // BANDS
    for b in range(BANDS):
        # documents with the same band are candidates; each is checked against the band's first
        key = np.ascontiguousarray(sigs[:, b * rows:(b + 1) * rows]).view(np.uint64).ravel()  # the band itself
        first_N = _first_alike(key)
        cand = np.flatnonzero(first_N != np.arange(sigs.shape[0]))
        close = (sigs[first_N[cand]] == sigs[cand]).mean(axis=1) >= threshold
        for i, j in zip(cand[close].tolist(), first_N[cand[close]].tolist()):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(sigs.shape[0])]
