"""Multiple-choice benchmarks by log-likelihood, defined exactly as lm-evaluation-harness defines them.

Each item is a context and N choices. A choice is scored by the summed log-probability of its
tokens after the context, where the continuation is " " + choice and the pair is tokenized the
harness's way (trailing spaces of the context move to the continuation; the context+continuation
string is encoded whole and the continuation is what follows the context's tokens). Then
  acc      = 1 if argmax_i ll_i is the gold choice
  acc_norm = 1 if argmax_i ll_i / len(choice_i) (characters of the choice) is the gold choice
averaged over items, with the standard error of the mean.

Formats (JSONL, one item per line, detected from the first record's keys):
  hellaswag  ctx_a, ctx_b, activity_label, endings, label (prompts built as the harness's
             `hellaswag` task: "<activity>: <ctx_a> <Ctx_b>", bracket artifacts removed)
  arc        question, choices {text, label}, answerKey ("Question: ...\\nAnswer:")
  piqa       goal, sol1, sol2, label ("Question: ...\\nAnswer:")
  generic    context (or query), choices, gold
A task name (hellaswag, arc_easy, arc_challenge, piqa) loads the dataset through `datasets` when
the hub (or its local cache) is reachable.

Legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.errors import UserError, first_line
from moelab.eval.metrics import CHUNK_LOGITS, score_tokens


@dataclass
class Item:
    context: str
    choices: list[str]
    gold: int


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _index(value) -> int:
    """A gold label: a whole number, or its digits as text (HellaSwag's labels are strings). Not a
    bool or 1.7, which int() turned into 1."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"the label {value!r} is not a whole number")
    return int(value)


def _texts(value) -> list:
    """The choices: a list (a string was split into its characters)."""
    if not isinstance(value, list):
        raise TypeError(f"the choices are a {type(value).__name__}, not a list of texts")
    return list(value)


def _item(rec: dict, fmt: str) -> Item:
    if fmt == "hellaswag":
        ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
        return Item(_hellaswag_clean(rec["activity_label"] + ": " + ctx),
                    [_hellaswag_clean(e) for e in _texts(rec["endings"])], _index(rec["label"]))
    if fmt == "arc":
        return Item(f"Question: {rec['question']}\nAnswer:", _texts(rec["choices"]["text"]),
                    _texts(rec["choices"]["label"]).index(rec["answerKey"]))
    if fmt == "piqa":
        return Item(f"Question: {rec['goal']}\nAnswer:", [rec["sol1"], rec["sol2"]], _index(rec["label"]))
    return Item(rec.get("context", rec.get("query")), _texts(rec["choices"]), _index(rec["gold"]))


def detect_format(rec: dict) -> str:
    keys = set(rec)
    for fmt, need in (("hellaswag", {"ctx_a", "ctx_b", "activity_label", "endings", "label"}),
                      ("arc", {"question", "choices", "answerKey"}),
                      ("piqa", {"goal", "sol1", "sol2", "label"}),
                      ("generic", {"choices", "gold"})):
        if need <= keys and (fmt != "generic" or keys & {"context", "query"}):
            return fmt
    raise UserError(f"unrecognised multiple-choice record (keys: {', '.join(sorted(keys))}); expected the "
                    "HellaSwag, ARC or PIQA format, or context/choices/gold")


HUB_TASKS = {"hellaswag": ("Rowan/hellaswag", None, "validation"),
             "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
             "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
             "piqa": ("baber/piqa", None, "validation")}


def _hub_records(name: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"'{name}' is a hub task and needs `datasets` (pip install 'moelab[hf]'); "
                        "or pass a local JSONL file") from None
    from moelab.hub import hub_access, offline_hint

    path, config, split = HUB_TASKS[name]
    with hub_access() as offline:
        try:
            return list(datasets.load_dataset(path, config, split=split))
        except Exception as exc:  # offline, missing from the cache, ...
            raise UserError(f"cannot load {path} for task {name} ({first_line(exc, 120)}): "
                            f"{offline_hint(offline)}; or pass a local JSONL file") from None


def load_task(spec: str, limit: int = 0) -> tuple[str, list[Item]]:
    """A JSONL file (any of the formats) or a hub task name -> (task name, items)."""
    path = Path(spec).expanduser()
    if path.is_file():
        from moelab.data.sources import jsonl_lines

        try:
            lines = jsonl_lines(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {spec} as UTF-8 JSONL ({exc}); save it as UTF-8") from None
        records = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{spec} line {n} is not JSON ({exc.msg})") from None
                if not isinstance(records[-1], dict):
                    raise UserError(f"{spec} line {n} is a JSON {type(records[-1]).__name__}, not an object: "
                                    "give one item per line, e.g. {\"context\": ..., \"choices\": [...], \"gold\": 0}")
        name = path.stem
    elif spec in HUB_TASKS:
        records, name = _hub_records(spec), spec
    else:
        raise UserError(f"no such task file '{spec}' (and not a hub task: {', '.join(HUB_TASKS)})")
    if not records:
        raise UserError(f"{spec} holds no items")
    fmt = detect_format(records[0])
    items = []
    for n, rec in enumerate(records[:limit or None], 1):
        try:
            it = _item(rec, fmt)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"{spec} item {n} is not a valid {fmt} record ({type(exc).__name__}: {exc})") from None
        if problem := _item_problem(it):
            raise UserError(f"{spec} item {n}: {problem}")
        items.append(it)
    return f"{name} ({fmt})", items


def _item_problem(it: Item) -> str | None:
    """What makes an item unscorable, or None: acc needs two or more choices to pick from, and
    acc_norm divides by each choice's length."""
    if not isinstance(it.context, str) or not it.context:
        return "its context is empty or not text"
    if len(it.choices) < 2:
        return f"it has {len(it.choices)} choice(s); an item needs at least 2 to choose from"
    if bad := [i for i, c in enumerate(it.choices) if not isinstance(c, str) or not c]:
        return f"choice {bad[0]} is empty or not text"
    if not 0 <= it.gold < len(it.choices):
        return f"gold {it.gold} is not one of its {len(it.choices)} choices (0 to {len(it.choices) - 1})"
    return None


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's tokenization of a (context, continuation) pair for a causal LM."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode_prompt(context + continuation)  # with the <s> a tokenizer puts first, as
    context_enc = tokenizer.encode_prompt(context)  # lm_eval's transformers backend encodes them
    if not context_enc:  # an all-space context, and no <s>: end-of-text precedes, as lm_eval does for ""
        return [tokenizer.eos_id], whole
    return context_enc, whole[len(context_enc):]


@torch.no_grad()
def score_continuations(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                        max_len: int | None = None, chunk_logits: int = CHUNK_LOGITS) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation tokens, whether each was the argmax) for each
    (context ids, continuation ids). Inputs longer than the model's context keep their last
    max_len + 1 tokens, as the harness does. Batches are right-padded (causal attention and
    per-token experts make padding invisible to the real positions; capacity is off, see
    moelab.eval.generate.inference_routing). Only the continuations' positions are projected,
    `chunk_logits` logits at a time: a rolling window of the harness is a continuation of up to
    max_len tokens (2.4 MB of logits per token at a 152K vocabulary)."""
    from moelab.eval.generate import inference_routing

    max_len = max_len or model.cfg.max_seq_len
    device = next(model.parameters()).device
    bad = next((i for i, (ctx, cont) in enumerate(requests) if not ctx or len(cont) > max_len), None)
    if bad is not None:
        ctx, cont = requests[bad]  # (a shape-mismatch traceback in the loss)
        raise UserError(f"request {bad + 1} cannot be scored: a continuation of {len(cont)} tokens after "
                        f"{len(ctx)} of context; it needs at least one token of context and at most "
                        f"{max_len} (the model's context) of continuation")
    seqs = [((ctx + cont)[-(max_len + 1):][:-1], cont) for ctx, cont in requests]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # similar lengths share a batch
    results: list[tuple[float, bool] | None] = [None] * len(seqs)
    with inference_routing(model):
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = len(seqs[idx[0]][0])
            x_BS = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                x_BS[row, :len(seqs[i][0])] = torch.tensor(seqs[i][0])
            out = model(x_BS.to(device), logits=False)
            for row, i in enumerate(idx):
                inp, cont = seqs[i]
                nll, hits = score_tokens(out, out.hidden[row, len(inp) - len(cont):len(inp)],
                                         torch.tensor(cont, device=device), model.cfg.vocab_size, chunk_logits)
                results[i] = (-nll.item(), hits.item() == len(cont))
    return results


def choice_requests(tokenizer, items: list[Item], task: str, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of every choice of every item, each checked to be scorable by a
    model whose context is `max_len` (training checks its tasks with this before its first update)."""
    requests = []
    for n, it in enumerate(items):
        for choice in it.choices:
            ctx, cont = encode_pair(tokenizer, it.context, " " + choice)
            if not cont:
                raise UserError(f"{task} item {n + 1}: a choice tokenizes to nothing")
            if len(cont) > max_len:  # the harness cannot score it either
                raise UserError(f"{task} item {n + 1}: a choice of {len(cont)} tokens is longer than the "
                                f"model's context ({max_len}); shorten or drop the item")
            requests.append((ctx, cont))
    return requests


def eval_choice(target, task: str, limit: int = 0, batch_size: int = 16, loaded=None) -> dict:
    """acc and acc_norm (with standard errors) of a loaded model on a multiple-choice task
    (`loaded`: the task's (name, items) when already read)."""
    name, items = loaded or load_task(task, limit)
    requests = choice_requests(target.tokenizer, items, task, target.model.cfg.max_seq_len)
    lls = [ll for ll, _ in score_continuations(target.model, requests, batch_size)]
    acc, acc_norm, pos = [], [], 0
    for it in items:
        ll = lls[pos:pos + len(it.choices)]
        pos += len(it.choices)
        acc.append(float(max(range(len(ll)), key=lambda i: (ll[i], -i)) == it.gold))
        norm = [v / len(c) for v, c in zip(ll, it.choices)]
        acc_norm.append(float(max(range(len(norm)), key=lambda i: (norm[i], -i)) == it.gold))
    n = len(items)

    def stderr(v):  # standard error of the mean, as the harness reports it
        return statistics.stdev(v) / math.sqrt(n) if n > 1 else float("nan")

    return {"task": name, "items": n, "acc": sum(acc) / n, "acc_stderr": stderr(acc),
            "acc_norm": sum(acc_norm) / n, "acc_norm_stderr": stderr(acc_norm),
            "chance": sum(1 / len(it.choices) for it in items) / n, "model": target.label}
