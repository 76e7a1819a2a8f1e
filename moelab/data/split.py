"""Document-level train/validation split by a stable hash of each document's name.

A document's side depends only on (salt, name), so adding documents never moves existing ones,
and no validation window can share a document with training. Applied before any windowing.
With `near_duplicates` (the default for training), documents that are near-copies of each other
(MinHash, see neardup.py) are split as one unit, keyed by the group's smallest name; a new
document can then only move the documents it is a near-copy of. Without it, exact copies (the same
bytes) are still split as one unit: one on each side would only ever be a leak.
"""

from __future__ import annotations

import hashlib

from moelab.data.sources import Document
from moelab.errors import UserError


def hash_unit(name: str, salt: str) -> float:
    """Deterministic value in [0, 1) for a document name."""
    digest = hashlib.sha256(f"{salt}\x00{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def exact_copy_groups(docs) -> list[int]:
    """A group id per document, shared by documents of the same bytes (read one at a time)."""
    first: dict[bytes, int] = {}
    return [first.setdefault(hashlib.blake2b(_data(d), digest_size=16).digest(), i) for i, d in enumerate(docs)]


def _data(doc) -> bytes:
    data = getattr(doc, "data", None)  # prepare's documents keep their UTF-8 bytes on disk
    return data if isinstance(data, bytes) else doc.text.encode("utf-8")


def split_documents(docs: list[Document], val_fraction: float, salt: str = "moelab",
                    near_duplicates: bool = False, groups: list[int] | None = None
                    ) -> tuple[list[Document], list[Document]]:
    """`groups`: near-duplicate group ids already computed for `docs` (implies near_duplicates);
    without either, exact copies are grouped."""
    keys = [d.name for d in docs]
    if near_duplicates and groups is None:
        from moelab.data.neardup import near_duplicate_groups

        groups = near_duplicate_groups([d.text for d in docs])
    exact = groups is None
    if exact:
        groups = exact_copy_groups(docs)
    first_name: dict[int, str] = {}
    for g, name in zip(groups, keys):
        first_name[g] = min(first_name.get(g, name), name)
    keys = [first_name[g] for g in groups]
    unit = {k: hash_unit(k, salt) for k in keys}
    if len(docs) > 1 and len(unit) == 1:
        if exact:
            raise UserError(f"all {len(docs)} documents are copies of one text, so any validation split would "
                            "repeat training text; add distinct documents")
        raise UserError(f"all {len(docs)} documents are near-copies of each other, so any validation split "
                        "would repeat training text; add distinct documents (or split them anyway: "
                        "data.near_dup_split=false, data prepare --no-near-dup-split)")
    val_keys = {k for k, u in unit.items() if u < val_fraction}
    if len(unit) > 1 and not val_keys:  # tiny corpora: hold out the lowest-hash unit, near-copies and all
        val_keys = {min(unit, key=unit.__getitem__)}
    elif len(unit) > 1 and len(val_keys) == len(unit):  # ... and keep the highest-hash one for training
        val_keys.discard(max(unit, key=unit.__getitem__))
    train = [d for d, k in zip(docs, keys) if k not in val_keys]
    val = [d for d, k in zip(docs, keys) if k in val_keys]
    return train, val


MIN_VAL_DOCUMENTS = 5  # fewer, and the validation loss measures those few texts


def few_val_note(val_docs: int, total_docs: int, val_tokens: int, val_fraction: float, setting: str) -> str | None:
    """A note for a validation split of fewer than MIN_VAL_DOCUMENTS documents where a larger
    `val_fraction` (at most 0.3) would hold out more: its loss, and so early stopping and the `best`
    checkpoint, follow those few texts. `setting`: how to ask for a fraction, with {} for it."""
    if val_docs >= MIN_VAL_DOCUMENTS:
        return None
    f = next((f for f in (0.1, 0.15, 0.2, 0.25, 0.3) if f > val_fraction and total_docs * f >= MIN_VAL_DOCUMENTS),
             None)
    if f is None:
        return None
    these = "that text" if val_docs == 1 else f"those {val_docs} texts"
    return (f"note: the validation split is {val_docs} of {total_docs} documents ({val_tokens:,} tokens), so its loss "
            f"measures {these}, and early stopping and the best checkpoint follow it; {setting.format(f)} would "
            f"hold out about {round(total_docs * f)}")
