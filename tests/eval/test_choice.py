"""Multiple choice: moelab's acc and acc_norm equal lm-evaluation-harness's own tasks (hellaswag,
arc_easy, piqa definitions, pointed at local files) run on the Hugging Face export of the same model,
and the lm_eval adapter agrees item for item."""

import json
from pathlib import Path

import pytest
import torch

from moelab.errors import UserError
from moelab.eval.choice import encode_pair, eval_choice, load_task, score_continuations
from moelab.eval.target import load_target

HARNESS_TASKS = {"hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
                 "arc": ("arc/arc_easy.yaml", "test"),
                 "piqa": ("piqa/piqa.yaml", "validation")}
DROP = ("task:", "dataset_path:", "dataset_name:", "training_split:", "validation_split:",
        "test_split:", "fewshot_split:")


def _local_harness_task(lm_tasks_dir: Path, fmt: str, data: Path, out: Path) -> str:
    """The harness's own task YAML for `fmt`, reading `data` instead of the hub dataset."""
    rel, split = HARNESS_TASKS[fmt]
    lines, in_tags = [], False
    for ln in (lm_tasks_dir / rel).read_text().splitlines():
        in_tags = ln.startswith("tag:") or (in_tags and ln.startswith("  - "))
        if not in_tags and not ln.startswith(DROP):
            lines.append(ln)
    name = f"local_{fmt}"
    lines += [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
              f"    {split}: {data}", f"{split}_split: {split}"]
    (out / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    if "utils.process_docs" in "\n".join(lines):
        (out / "utils.py").write_text(f"from lm_eval.tasks.{fmt}.utils import *  # noqa\n")
    return name


@pytest.mark.slow
def test_acc_and_acc_norm_equal_lm_eval_harness(trained, choice_tasks, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from moelab.eval.harness import run_harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    names = {fmt: _local_harness_task(lm_tasks, fmt, path, tmp_path) for fmt, path in choice_tasks.items()}
    hf = HFLM(pretrained=str(trained / "hf"), device="cpu", batch_size=4, dtype="float32")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)  # not 15,000 tasks to index (10 s)
    res = lm_eval.simple_evaluate(model=hf, tasks=list(names.values()), task_manager=manager,
                                  log_samples=False)["results"]
    ours_hf = load_target(str(trained / "hf"))
    ours_run = load_target(str(trained / "run"))
    adapter = run_harness(ours_run, ",".join(names.values()), checked=(list(names.values()), manager))
    distinct = set()
    for fmt, name in names.items():
        want = res[name]
        for target in (ours_hf, ours_run):
            got = eval_choice(target, str(choice_tasks[fmt]))
            assert got["items"] == 16
            assert got["acc"] == pytest.approx(want["acc,none"], abs=1e-12), (fmt, got, want)
            assert got["acc_norm"] == pytest.approx(want["acc_norm,none"], abs=1e-12), (fmt, got, want)
            assert got["acc_stderr"] == pytest.approx(want["acc_stderr,none"], rel=1e-9)
        assert adapter[name]["acc"] == want["acc,none"] and adapter[name]["acc_norm"] == want["acc_norm,none"]
        distinct.add((want["acc,none"], want["acc_norm,none"]))
    assert len(distinct) > 1  # the fixtures give different results: the comparison is not vacuous

    # item level: the same log-likelihoods as transformers' model through the harness
    _, items = load_task(str(choice_tasks["arc"]))
    pairs = [(it.context, " " + c) for it in items[:4] for c in it.choices]
    theirs = hf.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    mine = score_continuations(ours_run.model, [encode_pair(ours_run.tokenizer, *p) for p in pairs])
    for (a, ga), (b, gb) in zip(mine, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_unknown_harness_task_fails_before_the_model_is_loaded(tmp_path):
    pytest.importorskip("lm_eval")
    from tests.conftest import run_cli

    missing = tmp_path / "no_such_run"  # loading it would fail with another message
    r = run_cli("eval", missing, "--harness", "hellaswag,hellaswg")
    assert r.returncode == 2 and "unknown lm_eval task 'hellaswg' (did you mean hellaswag" in r.stderr
    assert "'hellaswag'" not in r.stderr and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    r = run_cli("eval", missing, "--harness", "hellaswag", "--include-path", tmp_path / "nope")
    assert r.returncode == 2 and "--include-path" in r.stderr and "not a folder" in r.stderr
    r = run_cli("eval", missing, "--include-path", tmp_path)  # a task folder without --harness did nothing
    assert r.returncode == 2 and "add --harness TASKS" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_a_harness_task_whose_data_cannot_be_fetched_fails_before_the_other_evaluations(trained, tmp_path):
    """The language evaluation ran first, over the whole validation split (minutes for a large model),
    and only then did lm_eval find the hub out of reach."""
    import os
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))  # nothing listens on 9
    res = subprocess.run([sys.executable, "-m", "moelab", "eval", str(trained / "run"), "--harness", "hellaswag",
                          "--limit", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and "lm_eval could not run hellaswag" in res.stderr, res.stderr
    assert "bits/byte" not in res.stdout, res.stdout  # no language evaluation before it


def test_the_text_a_harness_sample_is_checked_by():
    """lm_eval's logged samples, as its versions write them: multiple choice (arguments as tuples, or
    as dicts), generation (a reference answer), rolling log-likelihood (the whole text)."""
    from moelab.eval.harness import sample_text

    mc = [("Question: 2+2?\nAnswer:", " 3"), ("Question: 2+2?\nAnswer:", " 4")]
    assert sample_text({"target": 1, "arguments": mc}) == "Question: 2+2?\nAnswer: 4"
    as_dicts = {f"gen_args_{i}": {"arg_0": c, "arg_1": x} for i, (c, x) in enumerate(mc)}
    assert sample_text({"target": 0, "arguments": as_dicts}) == "Question: 2+2?\nAnswer: 3"
    assert sample_text({"target": "42", "arguments": [("Q: 6*7?\nA:", {"until": ["\n"]})]}) == "Q: 6*7?\nA: 42"
    assert sample_text({"target": "", "arguments": [("a whole page of text",)]}) == "a whole page of text"
    assert sample_text({"target": 0, "arguments": []}) == ""


def test_hub_task_without_the_hub_is_one_line_at_once(tmp_path):
    import os
    import subprocess
    import sys

    pytest.importorskip("datasets")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))  # nothing listens on 9
    res = subprocess.run([sys.executable, "-m", "moelab", "eval", str(tmp_path / "run"), "--choice", "piqa"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "cannot load baber/piqa for task piqa" in res.stderr and "cannot be reached" in res.stderr


def test_harness_results_print_each_metric_with_its_error_and_the_item_count():
    from moelab.eval.harness import format_metrics

    line = format_metrics("t", {"sample_len": 3, "acc": 0.5, "acc_stderr": 0.25, "word_perplexity": 12.0})
    assert line == "lm_eval t: acc 0.5000 +- 0.2500 | word_perplexity 12.0000 | 3 items"


def test_formats_are_parsed_as_the_harness_builds_prompts(choice_tasks):
    name, items = load_task(str(choice_tasks["hellaswag"]))
    assert name == "hellaswag_local (hellaswag)" and len(items) == 16
    first = items[0]
    assert "[title]" not in first.context and ". " in first.context and first.context.split(":")[0].istitle()
    _, arc = load_task(str(choice_tasks["arc"]), limit=3)
    assert len(arc) == 3 and arc[0].context.startswith("Question: ") and arc[0].context.endswith("\nAnswer:")
    assert [it.gold for it in arc] == [0, 3, 2]  # answerKey through the labels ("1".."4" or "A".."D")
    _, piqa = load_task(str(choice_tasks["piqa"]))
    assert all(len(it.choices) == 2 for it in piqa) and piqa[1].gold == 1


def test_encode_pair_moves_trailing_space_to_the_continuation(trained):
    tok = load_target(str(trained / "run")).tokenizer
    ctx, cont = encode_pair(tok, "the expert router ", "token")
    assert ctx == tok.encode("the expert router") and ctx + cont == tok.encode("the expert router token")


def test_bad_task_files_are_one_line_errors(tmp_path, trained):
    target = load_target(str(trained / "run"))
    bad = tmp_path / "bad.jsonl"
    for text, msg in (('{"foo": 1}\n', "unrecognised"), ("not json\n", "line 1 is not JSON"),
                      ('{"context": "a", "choices": ["x", "y"], "gold": 3}\n', r"gold 3 is not one of its 2 choices"),
                      ("", "no items"),
                      # these crashed: ZeroDivisionError in acc_norm, TypeError building the message
                      ('{"context": "a", "choices": ["x", ""], "gold": 0}\n', "item 1: choice 1 is empty"),
                      ('[1, 2]\n', "line 1 is a JSON list, not an object"),
                      ('{"context": "a", "choices": ["x"], "gold": 0}\n', "has 1 choice.* at least 2"),
                      ('{"context": "", "choices": ["x", "y"], "gold": 0}\n', "context is empty"),
                      # these were read as something else: "xy" as the choices x and y, 1.7 and true as gold 1
                      ('{"context": "a", "choices": "xy", "gold": 0}\n', "the choices are a str, not a list"),
                      ('{"context": "a", "choices": ["x", "y"], "gold": 1.7}\n', "label 1.7 is not a whole number"),
                      ('{"context": "a", "choices": ["x", "y"], "gold": true}\n', "label True is not a whole"),
                      # a traceback: the continuation's positions ran off the front of the window
                      ('{"context": "a", "choices": ["%s", "y"], "gold": 0}\n' % ("x " * 3000),
                       "item 1: a choice of .* tokens is longer than the model's context")):
        bad.write_text(text)
        with pytest.raises(UserError, match=msg):
            eval_choice(target, str(bad))
    with pytest.raises(UserError, match="no such task"):
        eval_choice(target, str(tmp_path / "missing.jsonl"))
    bad.write_bytes(b'{"context": "caf\xe9", "choices": ["x", "y"], "gold": 0}\n')  # Latin-1, not UTF-8
    with pytest.raises(UserError, match="save it as UTF-8"):
        eval_choice(target, str(bad))


def test_a_context_of_spaces_is_scored_after_end_of_text_as_lm_eval_scores_an_empty_one(tmp_path, trained):
    """The spaces move to the continuation, leaving no context token: a shape-mismatch traceback."""
    target = load_target(str(trained / "run"))
    tok = target.tokenizer
    assert not tok.doc_prefix  # (a tokenizer with <s> puts it first: there is always a context)
    ctx, cont = encode_pair(tok, "  ", "the expert")
    assert ctx == [tok.eos_id] and cont == tok.encode("  the expert")
    (f := tmp_path / "t.jsonl").write_text('{"context": " ", "choices": ["the expert", "zq"], "gold": 0}\n')
    got = eval_choice(target, str(f))
    assert got["items"] == 1 and got["acc"] in (0.0, 1.0)
    with torch.no_grad():  # the same log-likelihood as scoring the whole text after end-of-text by hand
        ids = torch.tensor([[tok.eos_id] + cont])
        logp = target.model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum()
    (ll, _), = score_continuations(target.model, [(ctx, cont)])
    assert ll == pytest.approx(float(logp), abs=1e-4)
    with pytest.raises(UserError, match="request 2 cannot be scored"):
        score_continuations(target.model, [(ctx, cont), ([], cont)])


def test_task_file_with_byte_order_mark_and_line_separators_in_strings(tmp_path):
    rows = [{"context": f"first\u2028second {i}", "choices": ["a\x85b", "c"], "gold": i % 2} for i in range(3)]
    f = tmp_path / "t.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    _, items = load_task(str(f))
    assert [(it.context, it.choices, it.gold) for it in items] == [tuple(r.values()) for r in rows]


def test_in_training_multiple_choice_at_a_cadence(trained):
    import json

    records = [json.loads(ln) for ln in (trained / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("split") == "choice"]
    assert steps == [10, 20, 30]
    summary = json.loads((trained / "run" / "summary.json").read_text())
    final = eval_choice(load_target(str(trained / "run")), str(trained / "mc.jsonl"))
    assert summary["choice"][0]["acc"] == final["acc"] and summary["choice"][0]["acc_norm"] == final["acc_norm"]
    assert "Multiple choice" in (trained / "run" / "report.md").read_text()


def test_bad_choice_task_fails_before_training(tmp_path):
    from tests.conftest import run_cli

    res = run_cli("train", "--preset", "test", "--out", tmp_path / "r", "train.choice_tasks=missing.jsonl")
    assert res.returncode == 2 and "no such task file" in res.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
    # a choice longer than the context is known once the tokenizer is: before the first update, not at
    # the first multiple-choice evaluation, and the run directory goes again, so the same --out works
    (task := tmp_path / "long.jsonl").write_text(json.dumps({"context": "a", "choices": ["b " * 200, "c"], "gold": 0}))
    res = run_cli("train", "--preset", "test", "--out", tmp_path / "r", f"train.choice_tasks={task}",
                  "train.choice_every=1", "train.steps=2")
    assert res.returncode == 2 and "long.jsonl item 1: a choice of" in res.stderr and "step 1" not in res.stdout
    assert not (tmp_path / "r").exists()


def test_continuations_are_projected_a_chunk_at_a_time(trained):
    """A continuation as long as the context (a rolling window of the harness) is scored through
    chunks of at most `chunk_logits` logits, with the same log-likelihoods and argmax flags."""
    target = load_target(str(trained / "run"))
    model, vocab = target.model, target.model.cfg.vocab_size
    text = (trained / "corpus" / sorted(p.name for p in (trained / "corpus").iterdir())[0]).read_text()
    ids = target.tokenizer.encode(text)[:200]
    pairs = [(ids[:1], ids[1:64]), (ids[:30], ids[30:33]), (ids[:5], ids[5:60])]
    whole = score_continuations(model, pairs, batch_size=2, chunk_logits=64 * vocab)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        chunked = score_continuations(model, pairs, batch_size=2, chunk_logits=5 * vocab)
    finally:
        hook.remove()
    assert max(rows) == 5 and sum(rows) == 63 + 3 + 55
    for (a, ga), (b, gb) in zip(whole, chunked):
        assert a == pytest.approx(b, rel=1e-6) and ga == gb
    # the reference: log-softmax of the full logits, gathered
    with torch.no_grad():
        lp = model(torch.tensor([ids[:63]])).logits[0].log_softmax(-1)
    assert whole[0][0] == pytest.approx(lp.gather(1, torch.tensor(ids[1:64])[:, None]).sum().item(), rel=1e-5)


@pytest.mark.slow
def test_rolling_loglikelihood_equals_transformers_through_the_harness(trained):
    """lm_eval's perplexity tasks (wikitext) score whole documents in rolling windows: moelab's
    adapter gives what the harness's transformers model gives on the export of the same model."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from moelab.eval.harness import MoelabLM

    docs = sorted((trained / "corpus").iterdir())[:2]
    texts = [docs[0].read_text()[:1500], docs[1].read_text()[:200]]  # several windows of 64 tokens; one
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours = MoelabLM(target=load_target(str(trained / "run")))
    assert len(ours.tok_encode(texts[0])) > 3 * ours.max_length
    hf = HFLM(pretrained=str(trained / "hf"), device="cpu", batch_size=4, dtype="float32")
    theirs = hf.loglikelihood_rolling(requests)
    mine = ours.loglikelihood_rolling(requests)
    for a, b in zip(mine, theirs):
        assert a == pytest.approx(b, rel=1e-5)


def test_rolling_windows_of_several_documents_share_batches(trained):
    """A perplexity task's documents are a window or two each: their windows are scored together
    (one forward for four short documents, not one or more each), each document's sum as when scored alone."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from moelab.eval.harness import MoelabLM

    ours = MoelabLM(target=load_target(str(trained / "run")), batch_size=8)
    texts = [doc.read_text()[:150] for doc in sorted((trained / "corpus").iterdir())[:4]]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    alone = [ours.loglikelihood_rolling([r])[0] for r in requests]
    fed = []
    hook = ours.model.embed.register_forward_hook(lambda mod, args, out: fed.append(args[0].shape[0]))
    try:
        together = ours.loglikelihood_rolling(requests)
    finally:
        hook.remove()
    assert len(fed) == 1 and fed[0] >= 4 and together == pytest.approx(alone, rel=1e-5) and len(set(together)) == 4


def test_harness_generation_ignores_an_empty_until_string(trained):
    """generate_until with until=["", ...] (a task's stop list) stopped every answer after one token."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from moelab.eval.harness import MoelabLM

    ours = MoelabLM(target=load_target(str(trained / "run")))
    args = ("marker001x", {"until": ["zzzz"], "max_gen_toks": 6})
    plain = ours.generate_until([Instance("generate_until", {}, args, 0)])
    args[1]["until"] = ["", "zzzz"]
    assert ours.generate_until([Instance("generate_until", {}, args, 0)]) == plain and len(plain[0]) > 0


def test_a_tokenizer_that_puts_bos_first_scores_as_lm_eval_transformers_backend_does(tmp_path):
    """lm_eval's transformers backend encodes contexts with the tokenizer's special tokens (<s> first
    for a Llama- or Mixtral-style tokenizer) and starts a rolling window after <s>: moelab's adapter
    and its multiple-choice scorer give the same encodings and log-likelihoods."""
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from moelab.eval.choice import encode_pair
    from moelab.eval.harness import MoelabLM
    from moelab.models import MoETransformer
    from moelab.models.hf import export_hf
    from moelab.models.presets import get_preset

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["the router sends each token to two experts"] * 5,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    cfg = get_preset("mixtral-tiny")
    cfg.model.n_layers, cfg.model.d_model, cfg.model.max_seq_len, cfg.train.seq_len = 2, 64, 16, 16
    cfg.resolve(vocab_size=tk.get_vocab_size())
    torch.manual_seed(0)
    hf_dir = export_hf(MoETransformer(cfg.model), tmp_path / "hf", token_ids={"bos_token_id": 0, "eos_token_id": 1})
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(hf_dir)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=2, dtype="float32")
    ours = MoelabLM(pretrained=str(hf_dir))
    pairs = [("the router", " sends each"), ("two experts ", "to the token"), ("each", " token")]
    for ctx, cont in pairs:
        assert encode_pair(ours.tokenizer, ctx, cont) == theirs._encode_pair(ctx, cont)
        assert ours._encode_pair(ctx, cont) == theirs._encode_pair(ctx, cont)
    assert ours.prefix_token_id == theirs.prefix_token_id == 0
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    for (a, ga), (b, gb) in zip(ours.loglikelihood(requests), theirs.loglikelihood(requests)):
        assert a == pytest.approx(b, rel=1e-5) and ga == gb
    text = "the router sends each token to two experts " * 3  # several windows of 16
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(theirs.loglikelihood_rolling(rolling)[0], rel=1e-5)
