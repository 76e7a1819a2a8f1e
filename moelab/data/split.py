"""Document-level train/validation split by a stable hash of each document's name.

A document's side depends only on (salt, name), so adding documents never moves existing ones,
and no validation window can share a document with training. Applied before any windowing.
With `near_duplicates` (the default for training), documents that are near-copies of each other
(MinHash, see neardup.py) are split as one unit, keyed by the group's smallest name; a new
document can then only move the documents it is a near-copy of.
"""

from __future__ import annotations

import hashlib

from moelab.data.sources import Document


def hash_unit(name: str, salt: str) -> float:
    """Deterministic value in [0, 1) for a document name."""
    digest = hashlib.sha256(f"{salt}\x00{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: list[Document], val_fraction: float, salt: str = "moelab",
                    near_duplicates: bool = False, groups: list[int] | None = None
                    ) -> tuple[list[Document], list[Document]]:
    """`groups`: near-duplicate group ids already computed for `docs` (implies near_duplicates)."""
    keys = [d.name for d in docs]
    if near_duplicates and groups is None:
        from moelab.data.neardup import near_duplicate_groups

        groups = near_duplicate_groups([d.text for d in docs])
    if groups is not None:
        first_name: dict[int, str] = {}
        for g, name in zip(groups, keys):
            first_name[g] = min(first_name.get(g, name), name)
        keys = [first_name[g] for g in groups]
    units = [hash_unit(k, salt) for k in keys]
    train = [d for d, u in zip(docs, units) if u >= val_fraction]
    val = [d for d, u in zip(docs, units) if u < val_fraction]
    if not val and len(docs) > 1:  # tiny corpora: hold out the lowest-hash document
        i = min(range(len(docs)), key=units.__getitem__)
        val, train = [docs[i]], docs[:i] + docs[i + 1:]
    return train, val
