"""Which documents of one text a model trained on: exact copies, by their tokens, of documents of
a prepared training split. Used where a loss would otherwise read as held out when it is not:
`moelab eval` on `--source` text or another prepared `--data`, and a run started with
`train.init_from` whose validation documents the source model trained on.

A document is compared as prepare stores it (the tokenizer's document prefix, its tokens, end of
text), by length and a 128-bit BLAKE2b hash. Lengths come from the shards' document offsets, so only
documents of a length the other side also has are read back and hashed: the check costs little even
beside a large training split.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from moelab.errors import UserError

INIT_OVERLAP = "val_documents_trained_on_by_init_from"  # RUN/data/split.json: see train's _init_overlap_note


def _recorded_path(text: str, run_dir: Path) -> Path:
    """A path a run's config holds: as it stands, or where a relative one is not found from here,
    from the folder the run was first started in (RUN/run.json)."""
    import json

    p = Path(text).expanduser()
    if p.is_absolute() or p.exists():
        return p
    try:
        run = json.loads((Path(run_dir) / "run.json").read_text())
        cwd = (run.get("history") or [run])[0].get("cwd")
    except (OSError, ValueError, AttributeError, IndexError):
        return p
    return Path(cwd) / p if isinstance(cwd, str) else p


def run_data_path(run_dir: Path, cfg) -> Path:
    """Where the prepared data a run trained on is: its `data.path` (a relative one found as
    _recorded_path finds it), else the run's own copy of its raw source."""
    from moelab.data.pipeline import RUN_PREPARED

    return _recorded_path(cfg.data.path, run_dir) if cfg.data.path else Path(run_dir) / RUN_PREPARED


def run_data_dir(run_dir: Path, cfg) -> Path | None:
    """run_data_path, None when no prepared data is there."""
    from moelab.data.prepare import is_prepared

    data = run_data_path(run_dir, cfg)
    return data if is_prepared(data) else None


def _lineage(init_from: str, depth: int = 8):
    """(model, its prepared data or None) for the model `init_from` names and each one it was itself
    started from (its `train.init_from`, and so on). None: training data moelab cannot read (a
    Hugging Face model, a converted one, a run whose data is gone); a source no longer there ends
    the walk with it, as does a cycle."""
    from moelab.config import Config
    from moelab.train.checkpoint import is_hf_dir, resolve_checkpoint

    seen, src = set(), Path(init_from).expanduser()
    for _ in range(depth):
        if is_hf_dir(src) or not src.is_dir():
            yield src, None
            return
        try:
            ckpt = resolve_checkpoint(src, hf_too=True)
            cfg = Config.from_yaml_file(ckpt / "config.yaml")
        except UserError:
            yield src, None
            return
        run = ckpt.parent.parent
        if run.resolve() in seen:
            return
        seen.add(run.resolve())
        yield run, run_data_dir(run, cfg)
        if not cfg.train.init_from:
            return
        src = _recorded_path(cfg.train.init_from, run)


def init_lineage(init_from: str, depth: int = 8) -> list[Path]:
    """The prepared data of the run `init_from` names and of each run it was itself started from
    (its `train.init_from`, and so on), oldest last: every model whose training documents the
    weights have seen. Stops at a Hugging Face model (its training data is not known), a source no
    longer there, or a cycle."""
    return [data for _, data in _lineage(init_from, depth) if data is not None]


def seen_data(run_dir: Path, cfg) -> tuple[list[Path], list[str]]:
    """(the prepared data of every training split a run's weights have seen, each once: its own
    (run_data_dir) and, for a run started with `train.init_from`, the source run's and those of the
    runs that one started from; the models up that chain whose training data moelab cannot read,
    see _lineage), from one walk of the chain."""
    own = run_data_dir(run_dir, cfg)
    dirs, unread = [own] if own is not None else [], []
    if cfg.train.init_from:
        for src, data in _lineage(str(_recorded_path(cfg.train.init_from, run_dir))):
            if data is None:
                unread.append(str(src))
            else:
                dirs.append(data)
    out, seen = [], set()
    for d in dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out, unread


def trained_data(run_dir: Path, cfg) -> list[Path]:
    """The first half of seen_data: the prepared data whose training splits the run's weights saw."""
    return seen_data(run_dir, cfg)[0]


def recorded_init_overlap(run_dir: Path) -> int | None:
    """The validation documents of a run that the model it started from trained on, as its
    RUN/data/split.json records them (None: none recorded)."""
    import json

    try:
        n = json.loads((Path(run_dir) / "data" / "split.json").read_text()).get(INIT_OVERLAP)
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def doc_key(tokens) -> tuple[int, bytes]:
    """(length, hash) of a document's tokens, the same for any integer dtype they are stored in."""
    a = np.ascontiguousarray(tokens, dtype="<u4")
    return a.shape[0], hashlib.blake2b(a.tobytes(), digest_size=16).digest()


def _spans(data: Path, split: str, manifest: dict | None = None):
    """(stream, starts, lengths) of each shard of a prepared split: a document's tokens (prefix and
    end of text included) are stream[start:start + length]."""
    from moelab.data.prepare import split_streams

    return [(s, starts, np.diff(starts, append=s.shape[0])) for s, starts in split_streams(data, split, manifest)]


def training_split(data: Path, tokenizer):
    """(document spans of `data`'s training split, its manifest), or None where it cannot be read
    (damaged since) or was tokenized otherwise than with `tokenizer`."""
    from moelab.data.prepare import read_manifest
    from moelab.data.tokenizer import load_tokenizer

    try:
        manifest = read_manifest(data)
        spans = _spans(data, "train", manifest)
        same = load_tokenizer(data / "tokenizer").tk.to_str() == tokenizer.tk.to_str()
    except UserError:  # the caller's work does not need it, so it goes on without the check
        return None
    return (spans, manifest) if same else None


def copies(spans, wanted: dict) -> set:
    """The values of `wanted` ({doc_key: [ids]}) whose key some document of `spans` has."""
    lengths = np.fromiter({n for n, _ in wanted}, dtype=np.int64)
    found = set()
    for stream, starts, lens in spans:
        for k in np.flatnonzero(np.isin(lens, lengths)).tolist():
            found.update(wanted.get(doc_key(stream[starts[k]:starts[k] + lens[k]]), ()))
    return found


def split_copies(train_data: Path, other: Path, split: str, tokenizer) -> tuple[int, int] | None:
    """(documents of prepared `other`'s `split` that are copies of documents of `train_data`'s
    training split, documents of that split); None where unknown (see training_split)."""
    found = split_copy_ids(train_data, other, split, tokenizer)
    return None if found is None else (len(found[0]), found[1])


def split_copy_ids(train_data: Path, other: Path, split: str, tokenizer) -> tuple[set, int] | None:
    """split_copies with the copies' indices in the split, in place of their number."""
    train = training_split(train_data, tokenizer)
    if train is None:
        return None
    spans = train[0]
    train_lengths = np.unique(np.concatenate([lens for _, _, lens in spans] or [np.zeros(0, np.int64)]))
    wanted: dict = {}
    n = 0
    for stream, starts, lens in _spans(other, split):
        for k in np.flatnonzero(np.isin(lens, train_lengths)).tolist():  # no other length can be a copy
            wanted.setdefault(doc_key(stream[starts[k]:starts[k] + lens[k]]), []).append(n + k)
        n += starts.shape[0]
    return copies(spans, wanted), n
