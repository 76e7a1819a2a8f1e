"""lm-evaluation-harness adapter (optional extra `moelab[eval]`): any moelab run, checkpoint or
Hugging Face directory as an `lm_eval` model.

    moelab eval RUN --harness hellaswag,arc_easy [--include-path MY_TASKS/]
    # or, in Python:
    import lm_eval
    from moelab.eval.harness import MoelabLM
    lm_eval.simple_evaluate(model=MoelabLM("runs/tiny"), tasks=["piqa"])

Importing this module registers the model name "moelab" with the harness
(`--model moelab --model_args pretrained=RUN`). Scoring uses the same function as `moelab eval
--choice`, so the two agree item for item.
"""

from __future__ import annotations

import contextlib
import difflib
import subprocess
from pathlib import Path

from moelab.errors import UserError, first_line

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # the class below is only usable with the extra installed
    TemplateLM, register_model = object, None


def _require_lm_eval():
    if register_model is None:
        raise UserError("the lm-evaluation-harness adapter needs lm_eval: pip install 'moelab[eval]'")


class MoelabLM(TemplateLM):
    """`pretrained`: a run, checkpoint or Hugging Face directory, loaded here with its weights in
    `dtype` (fp32 by default; "bf16"/"bfloat16", "fp16"/"float16": half the memory); or `target`:
    one already loaded by `moelab.eval.target.load_target` (not loaded twice)."""

    def __init__(self, pretrained: str | None = None, device: str = "cpu", batch_size: int | str = 16,
                 max_gen_toks: int = 256, target=None, dtype: str | None = None, **_ignored):
        _require_lm_eval()
        super().__init__()
        if target is None:
            from moelab.eval.target import load_target

            target = load_target(str(pretrained), device, dtype)
        self.target = target
        self.model, self.tokenizer = self.target.model, self.target.tokenizer
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def prefix_token_id(self) -> int:
        """What precedes a text scored from its first token: the `<s>` its tokenizer puts before a
        text, else end-of-text (as lm_eval's transformers backend chooses)."""
        return (self.tokenizer.doc_prefix or [self.tokenizer.eos_id])[0]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As lm_eval's transformers backend encodes: with the tokenizer's special tokens unless told
        not to, or unless the text already begins with its `<s>`."""
        prefix = self.tokenizer.doc_prefix
        if add_special_tokens is False or (prefix and string.startswith(self.tokenizer.decode(prefix))):
            return self.tokenizer.encode(string)
        return self.tokenizer.encode_prompt(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        from moelab.eval.choice import score_continuations

        pairs = [(ctx, cont) for _, ctx, cont in requests]
        return score_continuations(self.model, pairs, override_bs or self._batch_size, self.max_length)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every document's rolling windows scored in shared batches (a perplexity task's documents
        are mostly a window or two each), then summed per document in its windows' order."""
        from lm_eval import utils

        windows, owner = [], []
        for n, (string,) in enumerate(r.args for r in requests):
            for w in utils.get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id, self.max_length,
                                                     context_len=1):
                windows.append((None, *utils.make_disjoint_window(w)))
                owner.append(n)
        out = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            out[n] += ll
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings (a task's) are decoded `batch_size` at a time
        (moelab.eval.generate.generate_texts): each gets the text it gets alone."""
        from moelab.eval.generate import Sampler, generate_texts

        groups: dict[tuple, list[int]] = {}
        contexts = []
        for n, (context, kwargs) in enumerate(r.args for r in requests):
            until = kwargs.get("until") or []
            until = [u for u in ([until] if isinstance(until, str) else until) if u]  # "" would stop at once
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            key = (tuple(until), int(kwargs.get("max_gen_toks", self.max_gen_toks)), temperature)
            groups.setdefault(key, []).append(n)
            contexts.append(context)
        out: list = [None] * len(contexts)
        for (until, max_gen, temperature), members in groups.items():
            texts = generate_texts(self.model, self.tokenizer, [contexts[n] for n in members], max_gen,
                                   Sampler(temperature=temperature), until, batch_size=self._batch_size,
                                   seeds=[0] * len(members))  # each request at seed 0, as alone
            for n, r in zip(members, texts):
                out[n] = r["text"]
        return out


if register_model is not None:
    register_model("moelab")(MoelabLM)


def harness_tasks(tasks: str, include_path: str | None = None):
    """(task names, lm_eval TaskManager) for a comma-separated task list, every name checked, so
    that a typo fails in one line before a model is loaded or evaluated."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--harness needs task names, e.g. --harness hellaswag,arc_easy")
    if include_path and not Path(include_path).expanduser().is_dir():
        raise UserError(f"--include-path {include_path} is not a folder (give a folder of lm_eval task YAMLs)")
    manager = TaskManager(include_path=str(Path(include_path).expanduser())) if include_path else TaskManager()
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known and not Path(n).is_file()]
    if unknown:
        hints = {n: difflib.get_close_matches(n, known, n=3) for n in unknown}
        said = ", ".join(f"'{n}'" + (f" (did you mean {' or '.join(h)}?)" if h else "") for n, h in hints.items())
        raise UserError(f"unknown lm_eval task {said}: give task, group or tag names from lm_eval's task list, "
                        "a task YAML file, or --include-path FOLDER for your own tasks")
    return names, manager


def sample_text(sample: dict) -> str:
    """The text of one evaluated document of an lm_eval task (a `log_samples` record), as a
    contamination check reads it: the context and its gold continuation for a multiple-choice task,
    the context and its reference answer for a generation task, the whole text for a rolling
    log-likelihood (perplexity) task."""
    args = sample.get("arguments") or []
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...} in some versions
        args = [tuple(a.values()) if isinstance(a, dict) else tuple(a) for a in args.values()]
    args = [a if isinstance(a, (tuple, list)) else (a,) for a in args]
    if not args:
        return ""
    gold, context = sample.get("target"), str(args[0][0])
    if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(args) and len(args[gold]) > 1 \
            and isinstance(args[gold][1], str):
        return str(args[gold][0]) + args[gold][1]
    if isinstance(gold, str) and gold:
        return f"{context} {gold}"
    return context


@contextlib.contextmanager
def _quiet_git():
    """lm_eval records the commit of the working folder with `git describe`, whose "fatal: not a
    git repository" outside one lands among moelab's output and reads as its error: the same lookup,
    with git's complaint dropped, while the harness runs."""
    try:
        from lm_eval.loggers import utils as lm_utils
    except ImportError:
        lm_utils = None
    original = getattr(lm_utils, "get_git_commit_hash", None)
    if original is None:
        yield
        return

    def commit() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, OSError):
            return None
    lm_utils.get_git_commit_hash = commit
    try:
        yield
    finally:
        lm_utils.get_git_commit_hash = original


@contextlib.contextmanager
def _harness_errors(tasks: str):
    """While lm_eval loads `tasks` (their datasets come from the hub or its cache): hub access as
    moelab allows it, no git complaint, and a dataset that cannot be had said in one line."""
    from moelab.hub import hub_access, offline_hint

    with hub_access() as offline, _quiet_git():
        try:
            yield
        except (KeyError, ValueError, ConnectionError, OSError) as exc:
            hint = f" ({offline_hint(offline)}?)" if offline else ""
            raise UserError(f"lm_eval could not run {tasks}: {first_line(exc, 200)}{hint}") from None


def run_harness(target, tasks: str, include_path: str | None = None, limit: int | None = None,
                batch_size: int = 16, device: str = "cpu", checked=None) -> dict:
    """Run lm_eval tasks on a moelab model (a path, or a target from `load_target`); returns
    {task: {metric: value}}. `checked`: what `harness_tasks` returned for these tasks."""
    import lm_eval

    names, manager = checked or harness_tasks(tasks, include_path)
    lm = MoelabLM(target, device, batch_size) if isinstance(target, str) else MoelabLM(
        target=target, batch_size=batch_size)
    with _harness_errors(tasks):
        res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in res["results"].items()}


def format_metrics(task: str, metrics: dict) -> str:
    """One line of a task's run_harness results, as `eval --choice` prints its own: each metric with
    its standard error, then the number of documents (lm_eval's `sample_len`, not a metric)."""
    shown = [f"{k} {v:.4f}" + (f" +- {metrics[k + '_stderr']:.4f}" if k + "_stderr" in metrics else "")
             for k, v in metrics.items() if not k.endswith("_stderr") and k != "sample_len"]
    if "sample_len" in metrics:
        shown.append(f"{int(metrics['sample_len'])} items")
    return f"lm_eval {task}: " + " | ".join(shown)


def _leaf_tasks(tree):
    """(name, Task) for every task in what lm_eval's TaskManager.load or get_task_dict returns: tasks
    by name, within groups or a "tasks" dict (the nesting differs between lm_eval versions)."""
    from lm_eval.api.task import Task

    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        elif isinstance(value, Task):
            yield getattr(value, "task_name", None) or str(key), value


def task_texts(tasks: str, include_path: str | None = None, limit: int | None = None, checked=None) -> dict:
    """Each lm_eval task's documents as `run_harness` evaluates them, without a model, for checking
    against training data: {task: [(doc_id, sample_text), ...]}. Each item's own text: its prompt as
    the harness builds it with no few-shot examples and no task description, which are other text
    (often other items) that every prompt of the task shares, so finding them in the training data
    says nothing of this item. A group gives each of its tasks."""
    names, manager = checked or harness_tasks(tasks, include_path)
    out = {}
    with _harness_errors(tasks):
        if hasattr(manager, "load"):  # newer lm_eval: {"tasks": {name: Task}, "groups": ...}
            loaded = manager.load(names)
        else:
            from lm_eval.tasks import get_task_dict

            loaded = get_task_dict(names, manager)
        for name, task in _leaf_tasks(loaded):
            for key, none in (("num_fewshot", 0), ("description", "")):
                if getattr(task.config, key, None):
                    task.set_config(key=key, value=none)
            task.build_all_requests(limit=limit, rank=0, world_size=1)  # the requests simple_evaluate builds
            docs: dict = {}
            for inst in task.instances:
                docs.setdefault(inst.doc_id, (inst.doc, []))[1].append(inst)
            out[name] = sorted(
                (doc_id, sample_text({"target": task.doc_to_target(doc),
                                      "arguments": [r.args for r in sorted(reqs, key=lambda r: r.idx)]}))
                for doc_id, (doc, reqs) in docs.items())
    return out
