"""Leakage audit: does the validation text also appear in the training text?

Two checks, both on the tokens the model would see:
1. Exact duplicate documents across splits (sha256 of the text with whitespace runs collapsed).
2. Long n-gram overlap: the share of validation windows (`seq_len` tokens, disjoint, as evaluation
   uses them) containing at least one n-gram (default 32 tokens) that also occurs anywhere in the
   training documents. A random window-level split of overlapping (stride-1) windows scores near
   100%; a document-level split of distinct documents scores near 0%. Code corpora share some
   template code between files: the stdlib split scores a few percent, all of it from files such
   as codec modules built on one template, so the default threshold for "leakage" is 5% and
   "minor overlap" is reported (exit 0) between 1% and 5%.

N-grams are compared by a 64-bit polynomial rolling hash computed with numpy over whole token
arrays (no Python loop over tokens); at these sizes a false match has probability ~N^2 / 2^64.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moelab.data.sources import Document
from moelab.errors import UserError

_P = np.uint64(0x100000001B3)  # FNV prime: odd, so the hash is a bijection per position


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Hash of every length-n window of `ids` (len(ids) - n + 1 values, uint64, wrapping):
    sum over j of (ids[i + j] + 1) * P^(n - 1 - j)."""
    ids = np.asarray(ids, dtype=np.uint64) + np.uint64(1)
    count = ids.shape[0] - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = ids[:count].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):  # n - 1 steps of whole-array arithmetic, in place (5x faster than new arrays)
            np.multiply(h, _P, out=h)
            np.add(h, ids[j:j + count], out=h)
    return h


def _doc_key(text: str) -> str:
    return hashlib.sha256(re.sub(r"\s+", " ", text).strip().encode("utf-8")).hexdigest()


@dataclass
class AuditResult:
    ngram: int
    seq_len: int
    threshold: float
    train_documents: int
    val_documents: int
    val_windows: int
    leaked_windows: int
    leaked_share: float
    duplicate_documents: list[dict] = field(default_factory=list)  # {"val": name, "train": name}
    overlapping_documents: list[dict] = field(default_factory=list)  # worst validation documents
    verdict: str = ""
    # multiple-choice tasks (data check --choice, --harness): {"task", "items", "ngram", "contaminated": [item
    # numbers], "too_short": items with fewer tokens than the n-gram; for lm_eval tasks "doc_ids": the
    # contaminated items' doc_id}
    choice: list[dict] = field(default_factory=list)

    @property
    def leaked(self) -> bool:
        return self.verdict == "leakage" or any(c["contaminated"] for c in self.choice)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        dup = len(self.duplicate_documents)
        lines = [f"{self.verdict.upper()}: {self.leaked_windows}/{self.val_windows} validation windows "
                 f"({self.leaked_share:.1%}) share a {self.ngram}-token sequence with training data "
                 f"(a share above {self.threshold:.1%} is leakage); {dup} validation document(s) duplicate a "
                 f"training document ({self.train_documents} train / {self.val_documents} val "
                 f"documents, windows of {self.seq_len} tokens)"]
        for d in self.overlapping_documents[:5]:
            lines.append(f"  {d['share']:.0%} of {d['val']}'s {self.ngram}-grams occur in training "
                         f"(most in {d['train']})")
        for c in self.choice:
            bad, short = c["contaminated"], c["too_short"]
            named = c.get("doc_ids", bad)  # an lm_eval task's items by its doc_id
            shown = ", ".join(map(str, named[:10])) + (" ..." if len(bad) > 10 else "")
            lines.append(f"{'CONTAMINATED' if bad else 'clean'}: {len(bad)} of {c['items']} items of {c['task']} "
                         f"(context and gold answer) share a {c['ngram']}-token sequence with the training data"
                         + (f" ({'lm_eval doc_id' if 'doc_ids' in c else 'items'} {shown})" if bad else "")
                         + (f"; {short} item(s) shorter than {c['ngram']} tokens were not checked" if short else ""))
        return "\n".join(lines)


def audit(train: list[Document], val: list[Document], tokenizer, ngram: int = 32, seq_len: int = 128,
          threshold: float = 0.05, train_ids: list[list[int]] | None = None) -> AuditResult:
    """Audit two lists of text documents (tokenised with `tokenizer`; `train_ids`: the training
    documents' tokens where the caller has them already)."""
    train_ids = train_ids if train_ids is not None else tokenizer.encode_batch([d.text for d in train])
    return audit_ids([d.name for d in train], train_ids,
                     [d.name for d in val], tokenizer.encode_batch([d.text for d in val]),
                     tokenizer.eos_id, ngram, seq_len, threshold,
                     [_doc_key(d.text) for d in train], [_doc_key(d.text) for d in val])


CHUNK_TOKENS = 1 << 22  # training tokens hashed at a time by `contaminated_items`


def contaminated_items(train_streams, items_ids: list[list[int]], ngram: int) -> tuple[list[int], int]:
    """(0-based indices of the items sharing an `ngram`-token sequence with the training token
    streams, items shorter than `ngram` tokens). The items' n-grams (few) are the set looked up;
    the training tokens (many) stream past it a chunk at a time, so memory does not grow with them."""
    item_hashes = [ngram_hashes(np.asarray(ids), ngram) for ids in items_ids]
    wanted = np.unique(np.concatenate(item_hashes or [np.zeros(0, np.uint64)]))
    # a first look through a table of the hashes' low 22 bits (4 MB) leaves ~1% of the training
    # n-grams to look up exactly: 4x faster than np.isin's sort of every chunk
    low = np.uint64((1 << 22) - 1)
    table = np.zeros(1 << 22, dtype=bool)
    table[(wanted & low).astype(np.intp)] = True
    seen = []
    for stream in train_streams:
        for at in range(0, max(stream.shape[0] - ngram + 1, 0), CHUNK_TOKENS):  # chunks overlap by ngram - 1
            h = ngram_hashes(np.asarray(stream[at:at + CHUNK_TOKENS + ngram - 1]), ngram)
            h = h[table[(h & low).astype(np.intp)]]
            seen.append(np.unique(h[np.isin(h, wanted)]))
    seen = np.unique(np.concatenate(seen or [np.zeros(0, np.uint64)]))
    hit = [i for i, h in enumerate(item_hashes) if h.shape[0] and np.isin(h, seen).any()]
    return hit, sum(1 for h in item_hashes if not h.shape[0])


def choice_contamination(tasks: list, sources: list, ngram: int) -> list[dict]:
    """For each multiple-choice task ((name, items) as moelab.eval.choice.load_task gives them, or
    (name, texts) of items already joined into one text each): which items (context and gold answer,
    as one text) share an `ngram`-token sequence with the training data. `sources`: (tokenizer,
    training token streams) pairs, one for each training data the model has seen (a model started
    from another's weights saw that one's too); an item counts when any holds it, and is too short
    when under `ngram` tokens in every tokenizer. The items of all tasks are looked up in one pass
    over each source."""
    texts = [it if isinstance(it, str) else f"{it.context} {it.choices[it.gold]}"
             for _, items in tasks for it in items]
    hit, short = set(), set(range(len(texts)))
    for tokenizer, streams in sources:
        ids = tokenizer.encode_batch(texts)
        hit.update(contaminated_items(streams, ids, ngram)[0])
        short &= {i for i, x in enumerate(ids) if len(x) < ngram}
    out, first = [], 0
    for name, items in tasks:
        mine = range(first, first + len(items))
        out.append({"task": name, "items": len(items), "ngram": ngram,
                    "contaminated": [i - first + 1 for i in mine if i in hit],
                    "too_short": sum(1 for i in mine if i in short)})
        first += len(items)
    return out


def prepared_sources(dirs) -> list:
    """choice_contamination's sources for prepared data directories: each one's tokenizer and the
    token streams of its training split (memory-mapped, read as the check goes). A directory that
    cannot be read (damaged since it was prepared) is left out: the check goes on without it."""
    from moelab.data.prepare import split_streams
    from moelab.data.tokenizer import load_tokenizer

    out = []
    for d in dirs:
        try:
            out.append((load_tokenizer(Path(d) / "tokenizer"), [s for s, _ in split_streams(d, "train")]))
        except UserError:
            continue
    return out


CONTAMINATION_CHECK_TOKENS = 1 << 30  # train and eval check up to this many training tokens (~15 s on 2 CPU cores)


def run_contamination(run_dir: Path, cfg, tasks: list, ngram: int = 13,
                      max_tokens: int | None = None) -> tuple[list[dict] | None, int, list[str]]:
    """(choice_contamination of `tasks` against every training split the run's weights have seen, as
    moelab.data.overlap.seen_data finds them; the training tokens those hold; the models up its
    train.init_from chain whose training data could not be read). The
    results are None (and no model is named) where no prepared data is left to read, or it holds
    over `max_tokens` (default CONTAMINATION_CHECK_TOKENS) tokens: minutes of reading, for
    `moelab data check RUN --choice`."""
    from moelab.data.overlap import seen_data

    dirs, unread = seen_data(run_dir, cfg)
    sources = prepared_sources(dirs)
    tokens = sum(int(s.shape[0]) for _, streams in sources for s in streams)
    if not sources or tokens > (CONTAMINATION_CHECK_TOKENS if max_tokens is None else max_tokens):
        return None, tokens, []
    return choice_contamination(tasks, sources, ngram), tokens, unread


def contamination_notes(results: list[dict] | None, tokens: int, specs: list[str], run_dir,
                        doc_ids: list[list] | None = None, unread: list[str] = (),
                        check: str | None = None) -> list[str]:
    """What train and eval say of run_contamination's answer for the tasks named `specs`: a note for
    each task with items found in the training data, or, where that was too large to read, how to
    check (`moelab data check RUN` with `check`, default `--choice SPECS`). `doc_ids`: lm_eval tasks'
    document ids, item by item, to name the items by. `unread`: models the weights come from whose
    training data could not be checked (overlap.seen_data)."""
    if results is None:
        how = f"`moelab data check {run_dir} {check or '--choice ' + ' '.join(specs)}` does"
        return [f"note: the multiple-choice tasks were not checked for contamination against {tokens:,} training "
                f"tokens (minutes); {how}"] if tokens else []
    notes = []
    for n, (spec, r) in enumerate(zip(specs, results)):
        if not (bad := r["contaminated"]):
            continue
        if doc_ids is None:
            where = f"`moelab data check {run_dir} --choice {spec}` names them"
        else:
            ids = [str(doc_ids[n][i - 1]) for i in bad]
            where = "lm_eval doc_id " + ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
        notes.append(f"note: {len(bad)} of the {r['items']} items of {r['task']} share a {r['ngram']}-token sequence "
                     "with the training data this model has seen, so its score measures recall as well as "
                     f"skill; {where}")
    if unread:
        notes.append(f"note: the contamination check read this run's training data (and that of the moelab runs it "
                     f"started from), not that of {', '.join(unread)}, whose weights it started from: what that "
                     "model trained on is not known here")
    return notes


def check_lengths(ngram: int, seq_len: int) -> None:
    """An n-gram longer than a window fits in none: the audit would pass without comparing anything."""
    if ngram < 2 or seq_len < ngram:
        raise UserError(f"need 2 <= --ngram ({ngram}) <= --seq-len ({seq_len}): a longer n-gram fits in no "
                        "validation window, so nothing would be compared")


def audit_ids(train_names, train_ids, val_names, val_ids, eos_id: int, ngram: int = 32, seq_len: int = 128,
              threshold: float = 0.05, train_keys=None, val_keys=None) -> AuditResult:
    """Audit token sequences (one per document). Duplicates are keyed by normalised text when the
    keys are given, else by the exact token sequence (prepared data stores tokens only)."""
    check_lengths(ngram, seq_len)
    def key(ids):
        return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()

    train_keys = train_keys or [key(i) for i in train_ids]
    val_keys = val_keys or [key(i) for i in val_ids]
    first_train = {}
    for k, n in zip(train_keys, train_names):
        first_train.setdefault(k, n)
    dups = [{"val": n, "train": first_train[k]} for n, k in zip(val_names, val_keys) if k in first_train]

    per_doc = [ngram_hashes(np.asarray(i), ngram) for i in train_ids]
    owner = np.repeat(np.arange(len(per_doc)), [h.shape[0] for h in per_doc])
    seen, first = np.unique(np.concatenate(per_doc or [np.zeros(0, np.uint64)]), return_index=True)
    owner = owner[first]  # the training document each distinct n-gram first occurs in
    # Validation windows exactly as evaluation sees them: documents packed with end-of-text,
    # cut into disjoint windows of seq_len tokens.
    stream = np.concatenate([np.append(np.asarray(i, dtype=np.int64), eos_id) for i in val_ids]
                            or [np.zeros(0, np.int64)])
    windows = stream.shape[0] // seq_len
    if not windows:  # (it said CLEAN: 0/0 windows leaked)
        raise UserError(f"the validation split has {stream.shape[0]} tokens, fewer than one window of {seq_len}: "
                        "there is no window to audit; lower --seq-len")
    leaked = 0
    if seq_len >= ngram:
        hit = np.isin(ngram_hashes(stream[: windows * seq_len], ngram), seen)
        hit = np.concatenate([hit, np.zeros(ngram - 1, dtype=bool)]).reshape(windows, seq_len)
        leaked = int(hit[:, : seq_len - ngram + 1].any(axis=1).sum())
    share = leaked / windows
    # Which validation documents overlap, and with which training document: makes it actionable.
    overlapping = []
    for name, ids in zip(val_names, val_ids):
        h = ngram_hashes(np.asarray(ids), ngram)
        pos = np.searchsorted(seen, h).clip(max=max(seen.shape[0] - 1, 0))
        hit = seen[pos] == h if seen.shape[0] else np.zeros(h.shape[0], dtype=bool)
        if hit.any():
            top = np.bincount(owner[pos[hit]]).argmax()
            overlapping.append({"val": name, "share": float(hit.mean()), "train": train_names[top]})
    overlapping.sort(key=lambda r: -r["share"])
    if share > threshold or dups:
        verdict = "leakage"
    else:
        verdict = "clean" if share <= threshold / 5 else "minor overlap"
    return AuditResult(ngram, seq_len, threshold, len(train_ids), len(val_ids), windows, leaked, share, dups,
                       overlapping, verdict)


def audit_prepared(path, ngram: int = 32, seq_len: int = 128, threshold: float = 0.05) -> AuditResult:
    """Audit a directory made by `moelab data prepare`, from its token streams."""
    from pathlib import Path

    from moelab.data.prepare import read_manifest, split_streams

    root = Path(path)
    m = read_manifest(root)
    docs = {}
    for split in ("train", "val"):
        docs[split] = []
        for stream, starts in split_streams(root, split, m):
            ends = np.append(starts[1:], stream.shape[0]) - 1  # drop each document's end-of-text
            docs[split] += [np.asarray(stream[a:b], dtype=np.int64) for a, b in zip(starts, ends)]
    return audit_ids(m["splits"]["train"]["document_names"], docs["train"],
                     m["splits"]["val"]["document_names"], docs["val"], m["eos_id"], ngram, seq_len, threshold)
