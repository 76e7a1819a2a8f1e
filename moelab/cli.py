"""Command-line interface. Each subcommand parses its arguments, then calls one library function.

User errors (bad config, missing files, unusable data) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path

from moelab.errors import UserError


def _cmd_train(args) -> int:
    from moelab.config import build_config

    config_given = bool(args.preset or args.config)
    if args.resume and args.resume != "auto" and config_given:
        raise UserError("--resume CKPT continues a run with its own saved config; drop --preset/--config "
                        "(key=value overrides such as train.steps=2000 still apply)")
    if args.device:
        args.overrides.append(f"train.device={args.device}")
    cfg = build_config(args.preset, args.config, args.overrides)
    if args.print_config:
        if args.resume:
            raise UserError("--print-config shows a new run's settings; a run's own are in RUN/config.yaml")
        print("# moelab train --config FILE reads this back. 0 is 'derive' where a key allows it (model.head_dim,\n"
              "# n_kv_heads, dense_dim, max_seq_len ...); model.vocab_size 0 takes the tokenizer's size.\n"
              + cfg.to_yaml(comments=True), end="")
        return 0
    from moelab.train.loop import train  # after the config: a typo is refused before torch loads (2 s)
    from moelab.train.monitor import is_rank0, throughput_text

    s = train(cfg, out=args.out, resume=args.resume, overrides=tuple(args.overrides), smoke=args.smoke,
              config_given=config_given)
    if not is_rank0():  # data parallel (torchrun): rank 0 reports
        return 0
    if s.get("already_complete"):
        unused = s.get("not_applied")
        early = s.get("early_stopped")
        further = (f"raise train.patience above {s['best']['bad_evals']} (or 0: no early stopping)" if early
                   else f"raise train.steps (e.g. train.steps={2 * s['steps']})")
        print(f"{s['run_dir']} is already complete ({s['steps']} updates{', early stop' if early else ''}, "
              f"val loss {s['val_loss']:.4f}); nothing changed"
              + (f", and the settings given were not applied ({', '.join(unused)})" if unused else "")
              + f". To train further, {further}")
        return 0
    if s["stopped"]:  # SIGTERM/SIGINT: the step finished and was saved; not an error
        print(f"stopped by {s['stopped']} after {s['steps']} updates; checkpoint saved | run {s['run_dir']}")
        return 0
    skipped = sum(s["skipped"][k] for k in ("nonfinite", "spike"))
    print(f"done: {s['steps']} updates{' (early stop)' if s['early_stopped'] else ''} | val loss "
          f"{s['val_loss']:.4f} | ppl {s['val_ppl']:.2f} | acc {s['val_acc']:.3f} | bits/byte "
          f"{s['val_bpb']:.3f} | {throughput_text(s)}"
          + (f" | {skipped} updates skipped" if skipped else "") + f" | run {s['run_dir']}")
    if args.smoke:
        print(f"smoke check passed: data, model, {s['steps']} updates, evaluation, checkpoint save and "
              f"reload all work ({s['smoke']['checkpoint']})")
    return 0


def _cmd_info(args) -> int:
    from moelab.commands import info

    print(info(args.target, args.overrides))
    return 0


def _cmd_convert(args) -> int:
    from moelab.commands import convert

    run_dir = convert(args.hf_dir, args.out, args.dtype)
    print(f"converted {args.hf_dir} -> {run_dir}")
    if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        print(f"note: {args.hf_dir} has no tokenizer.json, so {run_dir} has none: eval, generate and routing "
              f"need one in {run_dir / 'tokenizer'}", file=sys.stderr)
    elif note := _tokenizer_past_vocab_note(run_dir):
        print(note, file=sys.stderr)
    return 0


def _tokenizer_past_vocab_note(run_dir) -> str | None:
    """A converted model whose tokenizer has more tokens than its vocabulary: said at conversion,
    since eval and generate refuse the pair (moelab.eval.target)."""
    from moelab.config import Config
    from moelab.data.tokenizer import read_tokenizer_file

    have = read_tokenizer_file(run_dir / "tokenizer" / "tokenizer.json").get_vocab_size(with_added_tokens=True)
    rows = Config.from_yaml_file(run_dir / "config.yaml").model.vocab_size
    if have <= rows:
        return None
    return (f"note: its tokenizer has {have} tokens but the model's vocabulary only {rows}; eval and generate "
            f"refuse that pair: put the tokenizer the model was trained with in {run_dir / 'tokenizer'}")


def _cmd_export(args) -> int:
    from moelab.commands import export

    out, dtype = export(args.run, args.to, args.out, args.arch, args.dtype)
    weights = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    print(f"exported {args.run} -> {out} ({dtype}, {len(weights)} weight file{'s' if len(weights) > 1 else ''}, "
          f"{size / 1e6:,.1f} MB)")
    return 0


def _harness_folder(args) -> None:
    """--include-path names task YAMLs for --harness: alone it would be ignored without a word."""
    if args.include_path and not args.harness:
        raise UserError(f"--include-path {args.include_path} gives lm_eval task YAMLs to --harness: add --harness "
                        "TASKS (the names of the tasks in it), or drop --include-path")


def _cmd_data_check(args) -> int:
    from moelab.commands import data_check

    _harness_folder(args)
    if args.limit and not (args.choice or args.harness):
        raise UserError(f"--limit {args.limit} picks the items of --choice or --harness tasks to check: add the "
                        "tasks, or drop --limit")
    result = data_check(args.run, args.train, args.val, args.ngram, args.seq_len, args.threshold,
                        args.tokenizer, args.text_field, args.choice, args.choice_ngram, args.harness,
                        args.include_path, args.limit)
    print(result.summary())
    for d in result.duplicate_documents[:10]:
        print(f"  duplicate: val {d['val']} == train {d['train']}")
    if args.run is not None:
        from moelab.data.overlap import recorded_init_overlap

        if n := recorded_init_overlap(Path(args.run)):  # outside this audit of the run's own split
            print(f"note: besides, {n} validation documents are training documents of the model the run started "
                  "from (train.init_from): its validation loss is not held out either way")
    if args.json:
        write_json(args.json, result.to_dict())
    return 1 if result.leaked else 0


def _cmd_data_prepare(args) -> int:
    from moelab.data.pdf import PdfFilters
    from moelab.data.prepare import prepare, read_manifest, stage_printer

    filters = PdfFilters(args.pdf_min_chars, args.pdf_max_chars, args.pdf_min_words, args.pdf_max_words,
                         args.pdf_ascii_only)
    out = prepare(args.sources, args.out, args.val_fraction, args.salt, args.text_field, args.tokenizer,
                  args.vocab_size, not args.no_near_dup_split, args.dedup, args.overwrite, args.max_docs,
                  args.weights, filters, args.tokenizer_train_bytes, shard_tokens=args.shard_tokens,
                  doc_chars=args.doc_chars, say=stage_printer())
    m = read_manifest(out)
    s = m["splits"]
    mb = sum(v["bytes"] for v in s.values()) / 1e6
    took = sum(m["seconds"].values())
    print(f"prepared {out}: train {s['train']['documents']} docs / {s['train']['tokens']:,} tokens "
          f"in {len(s['train']['shards'])} shard(s), val {s['val']['documents']} docs / "
          f"{s['val']['tokens']:,} tokens, vocab {m['vocab_size']}, {len(m['skipped'])} skipped, "
          f"{len(m['near_duplicates_dropped'])} near-duplicates dropped, fingerprint {m['fingerprint']}")
    print(f"{mb:.1f} MB in {took:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in m["seconds"].items()) + ")")
    if not args.tokenizer and m["vocab_size"] < args.vocab_size:
        from moelab.data.tokenizer import fewer_tokens_note

        print(fewer_tokens_note(m["vocab_size"], f"--vocab-size {args.vocab_size}"), file=sys.stderr)
    from moelab.data.prepare import MANIFEST, skipped_note
    from moelab.data.split import few_val_note

    if note := skipped_note(m["skipped"], Path(out) / MANIFEST):
        print(note, file=sys.stderr)
    if note := few_val_note(s["val"]["documents"], s["train"]["documents"] + s["val"]["documents"],
                            s["val"]["tokens"], args.val_fraction, "`--val-fraction {}`"):
        print(note, file=sys.stderr)
    return 0


def _cmd_eval(args) -> int:
    from moelab.eval.language import check_own_data
    from moelab.eval.target import load_target

    _harness_folder(args)
    if args.dtype in ("bf16", "fp16") and args.precision not in (None, args.dtype):  # before the weights are read
        raise UserError(f"--dtype {args.dtype} weights compute in {args.dtype}, not --precision {args.precision}: drop "
                        "--precision, or keep the weights in fp32 (--dtype fp32)")
    limit = f" --limit {args.limit}" if args.limit else ""  # data check of the items evaluated, no more
    tasks = []
    if args.choice:  # read (and check) every task file before any evaluation runs
        from moelab.eval.choice import load_task

        tasks = [load_task(task, args.limit) for task in args.choice]
    if args.harness:  # the same for lm_eval task names
        from moelab.eval.harness import harness_tasks

        harness = harness_tasks(args.harness, args.include_path)
    if not (args.choice or args.harness or args.data or args.source):
        check_own_data(args.target)  # before loading what may be gigabytes of weights
    target = load_target(args.target, args.device, args.dtype)
    results = {"model": target.label}
    if args.harness:  # first: a task whose data cannot be fetched fails before the other evaluations run
        from moelab.eval.harness import format_metrics, run_harness, task_texts

        results["harness"] = run_harness(target, args.harness, limit=args.limit or None,
                                         batch_size=args.batch_size, checked=harness)
        for task, metrics in results["harness"].items():
            print(format_metrics(task, metrics))
        texts = task_texts(args.harness, limit=args.limit or None, checked=harness) if target.run_dir else {}
        names = [t for t in texts if t in results["harness"]]
        check = f"--harness {args.harness}" + (f" --include-path {args.include_path}" if args.include_path else "")
        check += limit
        _contamination(target, names, [(t, [text for _, text in texts[t]]) for t in names],
                       [results["harness"][t] for t in names], [[i for i, _ in texts[t]] for t in names], check)
    if not (args.choice or args.harness) or args.data or args.source or target.run_dir:
        from moelab.eval.language import eval_language, format_language

        results["language"] = eval_language(target, args.split, args.data, args.source, args.seq_len,
                                            args.windows, args.batch_size, args.precision, not args.no_xz,
                                            args.text_field)
        print(format_language(results["language"]))
    if args.choice:
        from moelab.eval.choice import eval_choice

        results["choice"] = []
        for task, loaded in zip(args.choice, tasks):
            r = eval_choice(target, task, args.limit, args.batch_size, loaded=loaded)
            results["choice"].append(r)
            print(f"{r['task']}: acc {r['acc']:.4f} +- {r['acc_stderr']:.4f} | acc_norm {r['acc_norm']:.4f} "
                  f"+- {r['acc_norm_stderr']:.4f} | {r['items']} items (chance {r['chance']:.3f})")
        _contamination(target, args.choice, tasks, results["choice"],
                       check="--choice " + " ".join(args.choice) + limit)
    if args.json:
        write_json(args.json, results)
    return 0


def _contamination(target, specs: list[str], tasks: list, results: list[dict], doc_ids: list | None = None,
                   check: str | None = None) -> None:
    """For a run: the items of each task (multiple-choice, or lm_eval's with their `doc_ids`) found
    in the training data its model has seen (its own split, and with train.init_from the source's),
    counted into `results` (`contaminated_items`, None where not checked) and said on stderr, since
    their scores measure recall as well. `check`: `moelab data check`'s arguments for these tasks."""
    if target.run_dir is None or target.cfg is None or not tasks:
        return
    from moelab.data.audit import contamination_notes, run_contamination

    found, tokens, unread = run_contamination(target.run_dir, target.cfg, tasks)
    for i, r in enumerate(results):
        r["contaminated_items"] = None if found is None else len(found[i]["contaminated"])
        if unread:  # the count leaves out what these models trained on
            r["training_data_not_read"] = unread
    for note in contamination_notes(found, tokens, specs, target.run_dir, doc_ids, unread, check):
        print(note, file=sys.stderr)


def _cmd_generate(args) -> int:
    from moelab.eval.generate import Sampler, check_prompt, generate_texts, prompt_ids, read_prompts
    from moelab.eval.target import load_target

    if args.system is not None and not args.chat:
        raise UserError("--system is a chat message: give it with --chat (without --chat, put the text in the "
                        "--prompt)")
    if not args.prompt and not args.prompt_file:
        raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    prompts = (args.prompt or []) + (read_prompts(args.prompt_file) if args.prompt_file else [])
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    target = load_target(args.target, args.device, args.dtype)
    ids = [prompt_ids(target.tokenizer, prompt, args.system, args.chat) for prompt in prompts]
    for each in ids:  # all refused before any text is printed
        check_prompt(target.model, each)
    n = args.batch_size
    tokens, started, results = 0, time.perf_counter(), []

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    for b in range(0, len(ids), n):  # in the given order, each batch printed when it is done
        seeds = [args.seed + i for i in range(b, b + len(ids[b:b + n]))]
        alone = len(seeds) == 1  # its text is written as it is decoded
        if alone and not args.chat:  # a chat prints the reply alone
            write(prompts[b])
        for r, seed in zip(generate_texts(target.model, target.tokenizer, prompts[b:b + n], args.max_new_tokens,
                                          sampler, tuple(args.stop or ()), not args.no_cache, ids[b:b + n], n, seeds,
                                          write if alone else None), seeds):
            print("" if alone else r["text"] if args.chat else r["prompt"] + r["text"])
            results.append({**r, "seed": seed})
            tokens += r["new_tokens"]
            print(f"-- {r['new_tokens']} tokens, stopped: {r['stop_reason']} ({r['prompt_tokens']}-token prompt and "
                  f"decoding in {r['seconds']:.3f} s{_rate(r['new_tokens'], r['seconds'])})", file=sys.stderr)
    if len(ids) > 1:
        seconds = time.perf_counter() - started
        print(f"-- {len(ids)} prompts, {tokens} tokens in {seconds:.3f} s{_rate(tokens, seconds)}, up to {n} "
              "decoded together (--batch-size)", file=sys.stderr)
    if args.json:
        settings = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop",
                                                  "chat", "system", "batch_size", "dtype")}
        write_json(args.json, {"model": str(args.target), "settings": settings, "generations": results})
    return 0


def _rate(tokens: int, seconds: float) -> str:
    return f", {tokens / seconds:,.0f} tokens/s" if tokens and seconds > 0 else ""


def _cmd_routing(args) -> int:
    from moelab.analysis.routing import format_analysis
    from moelab.commands import routing

    analysis, out_dir = routing(args.target, args.out, args.windows, args.batch_size, args.device,
                                not args.no_plots, args.data, args.source, args.text_field, args.dtype)
    print(format_analysis(analysis))
    print(f"wrote {out_dir / 'routing.json'}" + "".join(f", {out_dir / f}" for f in analysis.get("plots", {}).values()))
    return 0


def _cmd_report(args) -> int:
    from moelab.analysis.report import write_report

    written = write_report(args.run, args.windows, args.samples, args.max_new_tokens)
    print(f"wrote {written.md} and {written.page}")
    if written.note:
        print(written.note, file=sys.stderr)
    return 0


def _pdf_defaults():
    from moelab.data.pdf import PdfFilters

    return PdfFilters()


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
TEXT_FIELD_HELP = "text field of --source's JSONL/Parquet records (default: the run's data.text_field, else text)"


def shell_escapes(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` as typed in a shell ("\\n\\n" reaches Python as backslash, n,
    backslash, n) read as newline, tab, return and backslash; any other backslash stays as typed."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _stop_string(text: str) -> str:
    if not text:  # found at once: generation ended before its first token
        raise argparse.ArgumentTypeError("an empty stop string ends the text before it starts; give some text")
    return shell_escapes(text)


def _task_list(text: str) -> str:
    if not text.replace(",", "").strip():  # "" was falsy, so the language evaluation ran alone
        raise argparse.ArgumentTypeError("names no task; give e.g. --harness hellaswag,arc_easy")
    return text


def _output_path(text: str) -> Path:
    """`text` as a Path, refused when the system refuses the name itself (too long, a symlink loop,
    no permission to look): pathlib's is_dir and exists raise those (a 300-character name was a traceback)."""
    import errno

    p = Path(text).expanduser()
    try:
        os.stat(p)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise argparse.ArgumentTypeError(f"{text}: {e.strerror or e}; choose another name") from None
    return p


def _writable_parent(p: Path, text: str) -> None:
    """Refuse, before any work, a path the command could not write once the work is done: one below a
    file, or in a folder that takes no new file (read-only, no permission, /proc). Tried by making and
    removing a file there, since os.access says yes to root and knows nothing of special file systems."""
    import tempfile

    parent = p if p.is_dir() else next((q for q in p.parents if q.exists()), Path("."))
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{parent} is a file, so {text} cannot be written")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moelab-probe-", dir=parent)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write in {parent} ({e.strerror or e}), so {text} "
                                         "cannot be written; choose another place") from None
    os.close(fd)
    os.unlink(probe)


def _output_dir(text: str) -> str:
    """An argparse type for a folder the command writes into: an existing file (or a path below one)
    is refused at once, not as a traceback once the work is done."""
    p = _output_path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    _writable_parent(p, text)
    return text


EVAL_RESULT_KEYS = frozenset({"model", "language", "choice", "harness"})  # what `eval --json` writes
GENERATE_RESULT_KEYS = frozenset({"model", "settings", "generations"})  # what `generate --json` writes


def _is_result_file(p: Path) -> bool:
    """Whether an earlier `eval --json`, `generate --json` or `data check --json` (an AuditResult) wrote
    `p`, or it is empty."""
    import dataclasses
    import json

    from moelab.data.audit import AuditResult

    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if not text.strip():  # an empty file (mktemp's) holds nothing to lose
        return True
    try:
        old = json.loads(text)
    except ValueError:
        return False
    audit = {f.name for f in dataclasses.fields(AuditResult)}
    return isinstance(old, dict) and (audit - {"choice"} <= set(old) <= audit  # ("choice": since 12/2026)
                                      or "model" in old and set(old) <= EVAL_RESULT_KEYS
                                      or set(old) == GENERATE_RESULT_KEYS)


def _output_file(text: str) -> str:
    """An argparse type for a file the command writes at its end: refused at once if it cannot be one,
    rather than as a traceback after the work is done. An existing file is replaced only if an earlier
    --json wrote it (--json RUN/metrics.jsonl replaced the run's training log)."""
    p = _output_path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    if p.exists() and not _is_result_file(p):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a result file an earlier --json wrote; "
                                         "give a new file name (it was left as it is)")
    _writable_parent(p, text)
    return str(p)


def write_json(path: str, obj) -> None:
    import json

    from moelab.files import write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=1))


def _at_least(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high], else one line naming the option and the bound.
    `high` defaults to the config's bound on integers (a 20-digit --vocab-size overflowed in tokenizers)."""
    from moelab.config import MAX_INT

    high = MAX_INT if high is None else high

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} (got {value})")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high} (got {value})")
        return value
    return parse


def _share(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {value})")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line (not argparse's usage block), exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def _dtype_argument(p) -> None:
    """--dtype of the commands that load a model to run it (eval, generate, routing)."""
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                   help="hold the weights in this dtype (default fp32): bf16 or fp16 take half the memory, for a "
                        "model too large otherwise, and compute in it (routers in fp32); auto: the stored one (an "
                        "HF directory's own, a converted run's)")


def build_parser() -> argparse.ArgumentParser:
    from moelab.config import MAX_DIM, SHARD_TOKENS, TOKENIZER_SAMPLE

    parser = _Parser(
        prog="moelab", description="Train, evaluate and diagnose Mixture-of-Experts language models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train an MoE language model (default: tiny preset on the "
                                     "embedded Python-stdlib corpus)",
                       description="Train an MoE LM. Settings: preset, then --config YAML, then "
                                   "key=value overrides such as train.steps=40 model.n_experts=8.")
    p.add_argument("--preset", help="named preset: tiny (default), exp3, test, <family>-tiny, or a "
                                    "published size such as deepseek-v3 (see README)")
    p.add_argument("--config", help="YAML config file (sections model, data, optim, train)")
    p.add_argument("--out", type=_output_dir, help="run directory (default: runs/<preset>[-N])")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in --out; none yet: a new run there, so one "
                                    "job command starts and requeues it, --preset/--config included) or a "
                                    "checkpoint/run path")
    p.add_argument("--smoke", action="store_true",
                   help="check the config end to end first: 4 updates, tiny evaluations, save and "
                        "reload a checkpoint (run directory runs/<preset>-smoke by default)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (the same as train.device=...; "
                                    "default: the config's, auto)")
    p.add_argument("--print-config", action="store_true",
                   help="print every setting of the run these arguments describe (YAML), then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("info", help="parameter table (total and active per token) of a preset, config "
                                    "file, run or Hugging Face directory")
    p.add_argument("target", help="preset name or config file (.yaml), run/checkpoint directory, or HF model "
                                  "directory")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="with a preset or config file: overrides as `moelab train` takes them "
                        "(moelab info exp3 model.n_experts=16)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert a Hugging Face model directory (Mixtral, Qwen3-MoE, "
                       "OLMoE, DeepSeek-V3, DeepSeek-V2, GLM4-MoE, GLM4-MoE-Lite, Qwen2-MoE, ERNIE 4.5 MoE, dots.llm1, "
                       "MiniMax-M2, Llama, Qwen3) to a moelab run")
    p.add_argument("hf_dir")
    p.add_argument("--out", type=_output_dir, required=True, help="new run directory")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
                   help="the weights' dtype in the run (default fp32, exact from any source); auto: the "
                        "directory's own (a bf16 model in half the memory and disk, unrounded); routers in fp32")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="export a run to a Hugging Face directory (save_pretrained layout)")
    p.add_argument("run", help="run, checkpoint or Hugging Face directory")
    p.add_argument("--to", default="hf", help="target format (hf)")
    p.add_argument("--out", type=_output_dir, required=True, help="new output directory")
    p.add_argument("--arch", default="auto",
                   help="mixtral|qwen3_moe|olmoe|deepseek_v3|glm4_moe|qwen2_moe|deepseek_v2|ernie4_5_moe|glm4_moe_lite|"
                        "dots1|minimax_m2|minicpm5_moe|granitemoe|granitemoeshared|llama|qwen3; auto: the one that "
                        "expresses the model exactly")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="weights' dtype; auto: the stored one, exactly (fp32 for a trained run; a run converted in "
                        "bf16, or an HF directory: its own)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="loss, perplexity, accuracy and bits per byte (with xz -9 as reference), "
                                    "multiple-choice benchmarks, lm-evaluation-harness tasks")
    p.add_argument("target", help="run directory (newest checkpoint), checkpoint or Hugging Face directory")
    p.add_argument("--split", default="val", help="train or val split of the run's / --data's prepared data")
    p.add_argument("--data", help="a prepared data directory (moelab data prepare)")
    p.add_argument("--source", help="raw text: a text/JSONL/PDF file or folder, or 'stdlib' (all documents)")
    p.add_argument("--text-field", help=TEXT_FIELD_HELP)
    p.add_argument("--seq-len", type=_at_least(1), help="window length (default: the run's train.seq_len)")
    p.add_argument("--windows", type=_at_least(0), default=0,
                   help="evaluate this many evenly spaced windows (0: all)")
    p.add_argument("--batch-size", type=_at_least(1), default=8)
    p.add_argument("--precision", help="fp32, bf16 or fp16 autocast, the weights in fp32 (default: the run's "
                                       "training precision; with --dtype bf16/fp16: that)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    _dtype_argument(p)
    p.add_argument("--no-xz", action="store_true", help="skip the xz -9 reference")
    p.add_argument("--choice", nargs="+", metavar="TASK",
                   help="multiple-choice tasks: JSONL files in HellaSwag/ARC/PIQA format, or a hub name "
                        "(hellaswag, arc_easy, arc_challenge, piqa) when the hub is reachable")
    p.add_argument("--limit", type=_at_least(0), default=0, help="first N items of each task (0: all)")
    p.add_argument("--harness", metavar="TASKS", type=_task_list,
                   help="comma-separated lm-evaluation-harness tasks (moelab[eval])")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--json", type=_output_file, help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="sample text from a run, checkpoint or Hugging Face directory")
    p.add_argument("target", help="run directory (newest checkpoint), checkpoint or Hugging Face directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="prompts from a file, after any --prompt: one per line (blank lines skipped), or a .jsonl "
                        "file of {\"prompt\": ...} objects (prompts with line breaks)")
    p.add_argument("--max-new-tokens", type=_at_least(0), default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=_at_least(0), default=50, help="0: off")
    p.add_argument("--top-p", type=float, default=0.95, help="1: off")
    p.add_argument("--seed", type=int, default=0,
                   help="prompt i (from 0) samples from a generator of its own at this seed + i: its text "
                        "does not depend on the batching, and a prompt given twice gets two samples")
    p.add_argument("--batch-size", type=_at_least(1), default=8,
                   help="prompts decoded together (default 8), each to the tokens it gets alone; on a CPU a "
                        "batch's decoding step takes little longer than one prompt's. A prompt decoded alone is "
                        "written as it comes")
    p.add_argument("--stop", action="append", type=_stop_string,
                   help=r"stop string (repeatable); the text ends before it; \n, \t, \r, \\ read as "
                        r"newline, tab, return, backslash (--stop '\n\n': a blank line)")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user message, laid out by the model's chat template (an instruction-"
                        "tuned HF model's, kept by convert); prints the reply (needs moelab[hf])")
    p.add_argument("--system", help="with --chat: a system message before each prompt")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step (for checks)")
    p.add_argument("--json", type=_output_file,
                   help="also write each prompt's text, token counts, stop reason, seconds and seed, and the "
                        "settings, to this JSON file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    _dtype_argument(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("routing", help="routing analytics: load per expert, CV, entropy, Gini, dead/starved "
                                       "experts, drops, train/val and checkpoint drift, co-activation, "
                                       "verdicts and heatmaps")
    p.add_argument("target", help="run directory (measured on its train and val windows), Hugging Face MoE "
                                  "directory (with --source or --data), or a counts file (.json, .csv or .tsv; "
                                  "layers x experts) from any system")
    p.add_argument("--source", help="measure on raw text instead: a text/JSONL/PDF file or folder, or 'stdlib'")
    p.add_argument("--text-field", help=TEXT_FIELD_HELP)
    p.add_argument("--data", help="measure on the train and val splits of this prepared directory instead")
    p.add_argument("--out", type=_output_dir,
                   help="output folder (default: RUN/routing, or routing-<name> beside the target)")
    p.add_argument("--windows", type=_at_least(0), default=64,
                   help="windows of each split to route (default 64; 0: all)")
    p.add_argument("--batch-size", type=_at_least(1), default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    _dtype_argument(p)
    p.add_argument("--no-plots", action="store_true", help="JSON and the table only")
    p.set_defaults(func=_cmd_routing)

    p = sub.add_parser("report", help="write RUN/report.md and a self-contained RUN/report.html (also done "
                                      "at the end of training)")
    p.add_argument("run", help="run directory")
    p.add_argument("--windows", type=_at_least(1), default=32, help="windows per split for the routing section")
    p.add_argument("--samples", type=_at_least(0), default=3, help="sample generations (0: none)")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=48)
    p.set_defaults(func=_cmd_report)

    data = sub.add_parser("data", help="data tools: prepare a dataset, leakage audit").add_subparsers(
        dest="data_command", metavar="DATA_COMMAND", required=True)
    p = data.add_parser("prepare", help="split by document, train/load a tokenizer, write memory-mapped "
                                        "token streams and a manifest; train on it with data.path=DIR")
    p.add_argument("sources", nargs="+", help="'stdlib', text/JSONL/Parquet files or directories")
    p.add_argument("--out", type=_output_dir, required=True, help="new output directory")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out")
    p.add_argument("--salt", default="moelab", help="changes which documents land in validation")
    p.add_argument("--text-field", default="text", help="text field of JSONL/Parquet records")
    p.add_argument("--tokenizer", help="tokenizer.json or directory (default: train BPE on the train split)")
    p.add_argument("--vocab-size", type=_at_least(260, MAX_DIM), default=8192,
                   help="for BPE training (>= 260: bytes + specials)")
    p.add_argument("--max-docs", type=_at_least(0), default=0, help="0: all documents")
    p.add_argument("--doc-chars", type=_at_least(0), default=0,
                   help="cut texts longer than this at line breaks into documents of at most about this "
                        "many characters (one long file: a book, a log), so they can be split (0: off)")
    p.add_argument("--dedup", action="store_true",
                   help="drop near-duplicate documents (MinHash) within the training split")
    p.add_argument("--no-near-dup-split", action="store_true",
                   help="split near-copies independently (default: they share a side); exact copies always do")
    p.add_argument("--weights", type=float, nargs="+",
                   help="one weight per source: its share of the training tokens (documents are "
                        "repeated or subsampled); validation keeps the natural mixture")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier prepared data at --out (a folder holding anything else is refused)")
    p.add_argument("--tokenizer-train-bytes", type=_at_least(0), default=TOKENIZER_SAMPLE,
                   help="train BPE on a hash-ordered sample of this many characters of the training "
                        f"split (default {TOKENIZER_SAMPLE:,}; 0: all of it)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS,
                   help=f"tokens per shard file, cut at document boundaries (default {SHARD_TOKENS:,})")
    pdf = _pdf_defaults()
    p.add_argument("--pdf-min-chars", type=_at_least(0), default=pdf.min_chars,
                   help="PDF paragraphs shorter are dropped")
    p.add_argument("--pdf-max-chars", type=_at_least(0), default=pdf.max_chars,
                   help="PDF paragraphs longer are dropped")
    p.add_argument("--pdf-min-words", type=_at_least(0), default=pdf.min_words)
    p.add_argument("--pdf-max-words", type=_at_least(0), default=pdf.max_words)
    p.add_argument("--pdf-ascii-only", action="store_true", help="drop PDF paragraphs with non-ASCII text")
    p.set_defaults(func=_cmd_data_prepare)
    p = data.add_parser("check", help="leakage audit: duplicate documents across splits and validation "
                                      "windows sharing a long n-gram with training data; exit 1 above "
                                      "the threshold")
    p.add_argument("run", nargs="?", help="run directory (audits the split its config produces) or a "
                                          "directory made by `moelab data prepare`")
    p.add_argument("--train", help="training text: a file or folder (each file one document)")
    p.add_argument("--val", help="validation text: a file or folder")
    p.add_argument("--ngram", type=_at_least(2), default=32, help="n-gram length in tokens (default 32)")
    p.add_argument("--seq-len", type=_at_least(2), default=None, help="validation window length (default: the "
                                                              "run's train.seq_len, else 128)")
    p.add_argument("--threshold", type=_share, default=0.05,
                   help="largest acceptable share of leaked validation windows (default 0.05)")
    p.add_argument("--tokenizer", help="tokenizer.json or directory (default: the run's, or a BPE "
                                       "trained on --train)")
    p.add_argument("--text-field", default="text", help="text field of --train/--val JSONL/Parquet records")
    p.add_argument("--choice", nargs="+", metavar="TASK",
                   help="also check multiple-choice tasks (JSONL files as eval --choice reads them, or hub "
                        "names) for contamination: items whose context and gold answer share a "
                        "--choice-ngram-token sequence with the training data (exit 1 if any)")
    p.add_argument("--harness", metavar="TASKS", type=_task_list,
                   help="also check comma-separated lm-evaluation-harness tasks (moelab[eval]) the same way, "
                        "their items named by lm_eval doc_id")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs (with --harness)")
    p.add_argument("--choice-ngram", type=_at_least(2), default=13,
                   help="n-gram length in tokens of the contamination check (default 13)")
    p.add_argument("--limit", type=_at_least(0), default=0,
                   help="check the first N items of each --choice/--harness task, those `eval --limit N` "
                        "scores (0: all)")
    p.add_argument("--json", type=_output_file, help="also write the full result to this JSON file")
    p.set_defaults(func=_cmd_data_check)
    return parser


def _version() -> str:
    from moelab import __version__

    return f"moelab {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse ends a positional list at the first option: `train a=1 --out R b=2` leaves b=2 over
        if isinstance(getattr(args, "overrides", None), list) and all(
                "=" in x and not x.startswith("-") for x in extra):
            args.overrides += extra
        else:  # said by the command's parser, so the line points to that command's --help
            prog = " ".join(["moelab", *filter(None, (getattr(args, "command", None),
                                                      getattr(args, "data_command", None)))])
            _Parser(prog=prog).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        if args.func in (_cmd_eval, _cmd_generate, _cmd_routing, _cmd_report):  # torch work, no run set-up
            from moelab.train.host import fit_torch_threads

            note = fit_torch_threads()
            if note:
                print(note, file=sys.stderr)
        return args.func(args)
    except UserError as exc:
        print(f"moelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output's reader went away (`moelab generate ... | head`): stop quietly
        with contextlib.suppress(AttributeError, OSError, ValueError):  # (the exit's flush would raise again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE reports it
    except OSError as exc:  # the machine said no: permissions, a full disk, a path that cannot exist
        if os.environ.get("MOELAB_DEBUG"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"moelab: error: {exc.strerror or exc}{where} (MOELAB_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
