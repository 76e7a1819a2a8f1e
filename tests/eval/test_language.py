"""`moelab eval`: metrics a reviewer would recompute (a float64 per-window loop), the xz reference
equal to the xz program on the same bytes, and the same numbers as the run's own final evaluation."""

import json
import lzma
import math
import shutil
import subprocess

import pytest
import torch

from moelab.eval.language import eval_language, eval_windows_for, xz_bits_per_byte
from moelab.eval.target import load_target
from tests.conftest import HAS_TRANSFORMERS, moelab, needs_transformers, run_cli


def test_metrics_equal_a_float64_recomputation(trained):
    target = load_target(str(trained / "run"))
    r = eval_language(target, max_windows=6, batch_size=4)
    windows, _ = eval_windows_for(target, "val", None, None, 64)
    from moelab.eval.metrics import spread_windows

    w = spread_windows(windows, 6)
    table = target.tokenizer.token_bytes()
    nll = correct = n = n_bytes = 0
    model = target.model.double()
    try:
        for row in w:  # one window at a time, float64
            with torch.no_grad():
                logits = model(row[None, :-1]).logits[0]
            logp = logits.log_softmax(-1)
            y = row[1:]
            nll -= logp.gather(1, y[:, None]).sum().item()
            correct += (logits.argmax(-1) == y).sum().item()
            n += y.numel()
            n_bytes += sum(len(table[t]) for t in y.tolist())
    finally:
        model.float()
    assert r["tokens"] == n and r["windows"] == len(w)
    assert r["loss"] == pytest.approx(nll / n, rel=1e-5) and r["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert r["acc"] == pytest.approx(correct / n, abs=1.5 / n)
    assert r["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert r["bytes"] == n_bytes


def _head_rows(model):
    """Positions each call of the output head projects: a list, and the hook's handle."""
    seen = []
    return seen, model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))


def test_argmax_hits_counts_what_argmax_counts_with_ties_and_nans():
    """Accuracy's hit count equals `(argmax == target).sum()`: rows whose target ties the maximum
    after an earlier index (argmax takes the first: a miss), at it or before it (a hit), all-equal
    rows (an untrained head), NaN rows, and ordinary ones."""
    from moelab.eval.metrics import argmax_hits

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 97, generator=g)
    y = torch.randint(0, 97, (400,), generator=g)
    top = x.amax(-1, keepdim=True) + 1  # above every other logit of its row
    y[:100] = x[:100].argmax(-1)  # hits
    x[100:150, 5] = top[100:150, 0]  # target ties the maximum at index 5, the first: a hit
    x[100:150, 70] = top[100:150, 0]
    y[100:150] = 5
    x[150:200, 3] = top[150:200, 0]  # ... after an earlier one at 3: a miss
    x[150:200, 60] = top[150:200, 0]
    y[150:200] = 60
    x[200:220] = 1.5  # all equal: argmax is 0
    y[200:210] = 0
    x[220:230, 7] = float("nan")  # argmax is the NaN's index
    y[220:225] = 7
    expected = (x.argmax(-1) == y).sum().item()
    assert argmax_hits(x, y).item() == expected
    assert 100 + 50 + 10 + 5 <= expected < 200  # every kind of row above is there


def test_evaluation_projects_chunks_of_positions_not_whole_batches(trained):
    """The head never sees more than `chunk_logits` / V positions at once (a whole batch's (B, S, V)
    logits were 10 GB for a 152K vocabulary), and chunking changes no metric."""
    from moelab.eval.metrics import evaluate, spread_windows

    target = load_target(str(trained / "run"))
    windows, _ = eval_windows_for(target, "val", None, None, 64)
    w = spread_windows(windows, 6)
    token_bytes = torch.tensor([len(b) for b in target.tokenizer.token_bytes()], dtype=torch.float64)
    V = target.model.cfg.vocab_size
    seen, hook = _head_rows(target.model)
    try:
        whole = evaluate(target.model, w, token_bytes, 6, torch.device("cpu"), chunk_logits=V * 10**6)
        assert seen == [6 * 64]
        seen.clear()
        chunked = evaluate(target.model, w, token_bytes, 4, torch.device("cpu"), chunk_logits=V * 50)
    finally:
        hook.remove()
    assert seen == [50] * 5 + [6] + [50, 50, 28]  # batches of 4 and 2 windows of 64 positions
    assert chunked["tokens"] == whole["tokens"] and chunked["acc"] == whole["acc"]
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert chunked["bpb"] == pytest.approx(whole["bpb"], rel=1e-6)


def test_evaluation_split_over_processes_covers_each_batch_once(trained):
    """Data parallel: process i of n scores its run of the whole batches one process forms, and
    the processes' sums add up to one process's figures (here 3 parts of 7 batches, one of 2
    windows, summed as torch.distributed would sum them)."""
    from moelab.eval.metrics import evaluate, spread_windows

    target = load_target(str(trained / "run"))
    windows, _ = eval_windows_for(target, "val", None, None, 64)
    w = spread_windows(windows, 20)
    token_bytes = torch.tensor([len(b) for b in target.tokenizer.token_bytes()], dtype=torch.float64)
    whole = evaluate(target.model, w, token_bytes, 3, torch.device("cpu"))
    seen, hook = _head_rows(target.model)
    parts = []
    try:
        for i in range(3):
            evaluate(target.model, w, token_bytes, 3, torch.device("cpu"), part=(i, 3), reduce=parts.append)
    finally:
        hook.remove()
    assert seen == [3 * 64] * 6 + [2 * 64]  # every batch once, as one process forms them
    total = torch.stack(parts).sum(0)
    assert [p[3].item() for p in parts] == [2 * 3 * 64, 2 * 3 * 64, (3 + 3 + 2) * 64]  # batches 0-1, 2-3, 4-6
    assert total[3].item() == whole["tokens"] and total[1].item() / total[3].item() == whole["acc"]
    assert total[0].item() / total[3].item() == pytest.approx(whole["loss"], rel=1e-12)


def test_scoring_generation_and_routing_project_only_the_positions_they_use(trained):
    from moelab.analysis.collect import measure
    from moelab.eval.choice import score_continuations
    from moelab.eval.generate import generate_ids

    model = load_target(str(trained / "run")).model
    seen, hook = _head_rows(model)
    try:
        scores = score_continuations(model, [([5, 6, 7, 8], [9, 10]), ([5, 6], [11, 12, 13])])
        assert sorted(seen) == [2, 3]  # each continuation's positions, not the padded batch
        seen.clear()
        generate_ids(model, [5, 6, 7, 8, 9], 4)
        generate_ids(model, [5, 6, 7, 8, 9], 4, use_cache=False)
        assert seen == [1] * 8  # 4 tokens each: the last position only, after the prompt or a re-run
        seen.clear()
        measure(model, torch.randint(0, 300, (3, 65)), batch_size=2)
        assert seen == []
    finally:
        hook.remove()
    with torch.no_grad():  # the scores are those of the full logits
        for (ctx, cont), (ll, _) in zip([([5, 6, 7, 8], [9, 10]), ([5, 6], [11, 12, 13])], scores):
            x = torch.tensor([ctx + cont[:-1]])
            lp = model(x).logits[0, -len(cont):].log_softmax(-1)
            assert ll == pytest.approx(lp.gather(1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-5)


def test_token_bytes_are_the_text_bytes(trained):
    tok = load_target(str(trained / "run")).tokenizer
    text = "marker001x über router → 漢字\n\tdef f(): return 'é'"
    table = tok.token_bytes()
    assert b"".join(table[t] for t in tok.encode(text)) == text.encode("utf-8")


def _sentencepiece_style_tokenizer(texts):
    """A tokenizer.json shaped as Llama's and Mistral's are: BPE with byte fallback (<0x00>..<0xFF>
    in the model's vocabulary), a Metaspace pre-tokenizer, and the Replace/ByteFallback/Fuse/Strip
    decoder. Built with `tokenizers`: trained, then rebuilt with the byte pieces added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def shaped(model):
        tk = Tokenizer(model)
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        return tk

    trained = shaped(models.BPE(unk_token="<unk>"))
    trained.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return shaped(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))


def test_token_bytes_of_a_sentencepiece_style_vocabulary_are_the_text_bytes():
    """Mixtral's and Llama's tokenizers: decoding a piece alone dropped the space its "\u2581" stands
    for and turned each <0xNN> byte of a character outside the vocabulary into U+FFFD, so bits per
    byte counted 25% too few bytes of Python source. Now the bytes are the text's, plus the one
    space SentencePiece writes before the first word."""
    from moelab.data.tokenizer import TextTokenizer

    texts = ["def route(tokens, k):\n    return topk(tokens, k)  # the router\n" * 3,
             "load balancing loss for the experts of each layer\n" * 3]
    tok = TextTokenizer(_sentencepiece_style_tokenizer(texts), "</s>")
    table = tok.token_bytes()
    for text in ("def f(x):\n    return x   # caf\u00e9 na\u00efve \u2713 \u6f22\u5b57 \U0001f600\n\tend",
                 "experts  of\n\n the router"):
        ids = tok.encode(text)
        assert any(tok.tk.id_to_token(i).startswith("<0x") for i in ids) or "experts" in text  # bytes used
        assert b"".join(table[i] for i in ids) == (" " + text).encode("utf-8"), [tok.tk.id_to_token(i) for i in ids]


def test_xz_reference_equals_the_xz_program(trained, tmp_path):
    target = load_target(str(trained / "run"))
    windows, _ = eval_windows_for(target, "val", None, None, 64)
    table = target.tokenizer.token_bytes()
    data = b"".join(table[t] for t in windows[:][:, 1:].flatten().tolist())
    r = xz_bits_per_byte(windows, table)
    assert r["bytes"] == len(data)
    assert r["xz_bpb"] == pytest.approx(8 * len(lzma.compress(data, preset=9)) / len(data))
    if shutil.which("xz"):
        (tmp_path / "val.bin").write_bytes(data)
        size = len(subprocess.run(["xz", "-9", "-c", str(tmp_path / "val.bin")], capture_output=True).stdout)
        assert r["xz_bpb"] == pytest.approx(8 * size / len(data), abs=8 * 16 / len(data))  # same up to a few bytes


def test_fp32_evaluation_takes_onednn_products_where_training_would_and_keeps_fp32_numbers(trained):
    """Batches of at least FAST_FP32_MIN_WORK tokens x width evaluate with fp32 products through
    oneDNN where `fast_fp32_matmuls` finds that exact and faster here (as training does), smaller
    ones and a run that turned it off on the default BLAS; the metrics agree to fp32 rounding."""
    import moelab.hardware as hw

    target = load_target(str(trained / "run"))
    seen = []
    hook = target.model.register_forward_pre_hook(lambda m, a: seen.append(hw.onednn_fp32_active()))
    fast = hw.onednn_fp32_speedup() >= hw.FAST_FP32_FACTOR  # AMD Zen 5, 2 cores: 1.9-2.3x
    width = 64 * target.model.cfg.d_model  # 64-token windows
    assert width * 32 >= hw.FAST_FP32_MIN_WORK > width * 4
    try:
        results = {}
        for name, batch, switch in [("big", 32, True), ("small", 4, True), ("off", 32, False)]:
            target.cfg.train.fast_fp32_matmul = switch
            seen.clear()
            results[name] = r = eval_language(target, split="train", max_windows=32, batch_size=batch, reference=False)
            on = fast and name == "big"
            assert seen and set(seen) == {on} and r.get("fp32_matmul") == ("onednn" if on else None), name
        assert not hw.onednn_fp32_active()
    finally:
        hook.remove()
        target.cfg.train.fast_fp32_matmul = True
    assert results["big"]["tokens"] == results["off"]["tokens"] == 32 * 64
    for key in ("loss", "bpb"):
        assert results["big"][key] == pytest.approx(results["off"][key], rel=1e-6)
        assert results["small"][key] == pytest.approx(results["off"][key], rel=1e-6)


def test_cli_eval_matches_the_runs_final_evaluation(trained, tmp_path):
    summary = json.loads((trained / "run" / "summary.json").read_text())
    res = moelab("eval", trained / "run", "--json", tmp_path / "e.json", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    r = json.loads((tmp_path / "e.json").read_text())["language"]
    assert r["loss"] == pytest.approx(summary["val_loss"], abs=1e-6)
    assert r["bpb"] == pytest.approx(summary["val_bpb"], abs=1e-6)
    assert r["xz_bpb"] == pytest.approx(summary["val_xz_bpb"], abs=1e-12)
    assert "xz -9" in res.stdout
    if not HAS_TRANSFORMERS:
        return
    # an HF export needs data given explicitly, and then agrees with the run on the same windows
    res = run_cli("eval", trained / "hf", "--data", trained / "run" / "data" / "prepared",
                  "--json", tmp_path / "h.json")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "h.json").read_text())["language"]["loss"] == pytest.approx(r["loss"], abs=1e-4)


def test_eval_on_a_source_says_how_many_of_its_documents_the_run_trained_on(trained, tmp_path):
    """`eval RUN --source CORPUS` on the corpus the run trained on printed a loss below the
    validation loss as if held out: the leak moelab exists to prevent, made at evaluation time."""
    m = json.loads((trained / "run" / "data" / "prepared" / "manifest.json").read_text())
    train_names, val_names = (m["splits"][s]["document_names"] for s in ("train", "val"))
    res = run_cli("eval", trained / "run", "--source", trained / "corpus", "--json", tmp_path / "all.json")
    assert res.returncode == 0, res.stderr
    n, total = len(train_names), len(list((trained / "corpus").iterdir()))  # the run read the first 40 of 60
    assert f"note: {n} of the {total} documents evaluated are in run/" in res.stderr
    r = json.loads((tmp_path / "all.json").read_text())["language"]
    assert (r["documents_in_training"], r["documents"]) == (n, total) and n < total
    assert f"{n} of them in the run's training split" in r["data"]
    # by content, not by name: the validation documents alone are none of it, a renamed training copy is
    held = tmp_path / "held"
    held.mkdir()
    for name in val_names:
        shutil.copy(trained / "corpus" / name, held / name)
    res = run_cli("eval", trained / "run", "--source", held, "--json", tmp_path / "val.json")
    assert res.returncode == 0 and "note:" not in res.stderr, res.stderr
    assert "documents_in_training" not in json.loads((tmp_path / "val.json").read_text())["language"]
    shutil.copy(trained / "corpus" / train_names[3], held / "renamed.txt")
    res = run_cli("eval", trained / "run", "--source", held)
    assert res.returncode == 0 and f"note: 1 of the {len(val_names) + 1} documents" in res.stderr, res.stderr
    # prepared data with another split of the same corpus: its validation split holds training documents
    from moelab.data.prepare import prepare

    other = prepare([str(trained / "corpus")], str(tmp_path / "other"), val_fraction=0.5, salt="another",
                    tokenizer=str(trained / "run" / "tokenizer"))
    other_val = json.loads((other / "manifest.json").read_text())["splits"]["val"]["document_names"]
    both = set(other_val) & set(train_names)
    res = run_cli("eval", trained / "run", "--data", other, "--json", tmp_path / "d.json")
    assert res.returncode == 0 and f"note: {len(both)} of the {len(other_val)} documents evaluated" in res.stderr
    r = json.loads((tmp_path / "d.json").read_text())["language"]
    assert (r["documents_in_training"], r["documents"]) == (len(both), len(other_val)) and 0 < len(both)
    for args in (["--data", trained / "run" / "data" / "prepared"], ["--split", "train"]):  # the run's own
        res = run_cli("eval", trained / "run", *args)
        assert res.returncode == 0 and "note:" not in res.stderr, res.stderr
    if HAS_TRANSFORMERS:  # an HF export has no training data of its own to compare with: nothing said
        res = run_cli("eval", trained / "hf", "--source", trained / "corpus")
        assert res.returncode == 0 and "note:" not in res.stderr, res.stderr


def test_training_copies_finds_the_pieces_of_documents_cut_by_doc_chars(tmp_path):
    """With data.doc_chars the run trained on pieces of each text, never on a whole one."""
    from moelab.config import Config
    from moelab.data.prepare import prepare
    from moelab.data.sources import load_corpus
    from moelab.data.tokenizer import load_tokenizer
    from moelab.eval.language import training_copies
    from moelab.eval.target import Target
    from tests.conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_docs=24, words_per_doc=300)
    data = prepare([str(corpus)], str(tmp_path / "p"), val_fraction=0.25, vocab_size=300, doc_chars=500)
    m = json.loads((data / "manifest.json").read_text())
    train = m["splits"]["train"]["document_names"]
    assert m["doc_chars"] == 500 and all("#" in name for name in train)
    whole = {name.split("#")[0] for name in train}  # the texts with a piece in training
    cfg = Config()
    cfg.data.path = str(data)
    tok = load_tokenizer(data / "tokenizer")
    target = Target(None, tok, "x", tmp_path, None, cfg)
    docs = load_corpus(str(corpus)).documents
    texts = [d.text for d in docs] + ["marker999x an unseen text " * 40]
    assert training_copies(target, texts, tok.encode_batch(texts)) == len(whole) > 0
    # without the cut, a whole text matches no piece
    m["doc_chars"] = 0
    (data / "manifest.json").write_text(json.dumps(m))
    assert training_copies(target, texts, tok.encode_batch(texts)) == 0


@pytest.mark.parametrize("args,msg", [
    pytest.param(["hf"], "has no data of its own", marks=needs_transformers),
    (["run", "--split", "test"], "--split must be train or val"),
    (["run", "--seq-len", "4096"], "exceeds the model's context"),
    (["nowhere"], "no such run"),
    (["run", "--source", ""], "data source is empty"),  # not silently the run's own data
    (["run", "--source", "stdlib", "--data", "run"], "not both"),  # --data was silently ignored
    (["run", "--dtype", "bf16", "--precision", "fp32"], "--dtype bf16 weights compute in bf16, not --precision"),
    (["run", "--choice", "mc.jsonl", "missing.jsonl"], "no such task file"),
])
def test_bad_eval_input_is_one_line(trained, args, msg):
    args = [str(trained / a) if a.endswith(".jsonl") else a for a in args]
    res = run_cli("eval", trained / args[0], *args[1:])
    assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""  # found before any evaluation ran, none of it printed
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # nor any model loaded (no progress bar)


def test_a_run_held_in_bf16_evaluates_generates_and_routes_in_bf16(trained, tmp_path):
    """--dtype bf16 (load_model's dtype): the weights rounded once from the checkpoint's fp32, routers
    and RoPE tables fp32; eval computes in bf16, within bf16 error of the fp32 loss, and says so;
    generate and routing run on the bf16 model."""
    import moelab
    from moelab.eval.generate import Sampler, generate_ids

    run = trained / "run"
    half, wide = moelab.load_model(str(run), dtype="bf16"), moelab.load_model(str(run))
    for name, t in half.state_dict().items():
        held = torch.float32 if ".router." in name else torch.bfloat16
        assert t.dtype == held and torch.equal(t, wide.state_dict()[name].to(held)), name
    assert half.rope_cos.dtype == torch.float32 and half.lm_head.weight.dtype == torch.bfloat16
    assert moelab.load_model(str(run), dtype="auto").embed.weight.dtype == torch.float32  # as trained
    res = run_cli("eval", run, "--dtype", "auto", "--precision", "bf16", "--windows", "2", "--no-xz")
    assert res.returncode == 0 and res.stdout.rstrip().endswith("| bf16 autocast"), res.stderr
    args = ("--windows", "16", "--no-xz", "--device", "cpu")
    assert run_cli("eval", run, *args, "--json", tmp_path / "w.json").returncode == 0
    res = run_cli("eval", run, *args, "--dtype", "bf16", "--json", tmp_path / "h.json")
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith("| bf16 weights")
    r, w = (json.loads((tmp_path / f).read_text())["language"] for f in ("h.json", "w.json"))
    assert (r["weights"], r["precision"], w["weights"], w["precision"]) == ("bf16", "bf16", "fp32", "fp32")
    assert r["loss"] != w["loss"] and r["loss"] == pytest.approx(w["loss"], abs=0.02)
    # generation: the CLI's text is what the bf16 model decodes (greedy), through its bf16 KV cache
    prompt = "marker002x router"
    res = run_cli("generate", run, "--dtype", "bf16", "--prompt", prompt, "--temperature", "0",
                  "--max-new-tokens", "12", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    tok = moelab.load(str(run)).tokenizer
    new, _ = generate_ids(half, tok.encode(prompt), 12, Sampler(0.0))
    assert res.stdout == prompt + tok.decode(new) + "\n"
    res = run_cli("routing", run, "--dtype", "bf16", "--windows", "8", "--no-plots", "--out", tmp_path / "r")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "r" / "routing.json").read_text())


@needs_transformers
def test_converted_run_without_data_is_refused_before_its_weights_load(trained, tmp_path):
    res = run_cli("convert", trained / "hf", "--out", tmp_path / "cv")
    assert res.returncode == 0, res.stderr
    (weights,) = (tmp_path / "cv").glob("checkpoints/*/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])  # loading it would fail with another message
    for cmd, target in (("eval", "cv"), ("routing", "cv"), ("eval", weights.parent.relative_to(tmp_path))):
        res = run_cli(cmd, tmp_path / target)
        assert res.returncode == 2 and "is a converted model and has no data of its own: give --data" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_an_empty_stop_string_is_refused_not_matched_at_once(trained):
    """It ended every generation after one token (the CLI refuses --stop '' too)."""
    import moelab
    from moelab.errors import UserError
    from moelab.eval.generate import generate_text

    run = moelab.load(str(trained / "run"))
    with pytest.raises(UserError, match="empty stop string"):
        generate_text(run.model, run.tokenizer, "marker001x", 4, stop_strings=("\n", ""))
    assert generate_text(run.model, run.tokenizer, "marker001x", 4, stop_strings=("zzzz",))["stop_reason"] != "stop"


def test_cli_generate_is_reproducible_and_stops(trained):
    run = trained / "run"
    a = run_cli("generate", run, "--prompt", "marker001x expert", "--max-new-tokens", "12", "--seed", "5")
    b = run_cli("generate", run, "--prompt", "marker001x expert", "--max-new-tokens", "12", "--seed", "5",
               "--no-cache")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("marker001x expert")
    import re

    import moelab

    said = re.fullmatch(r"-- 12 tokens, stopped: length \((\d+)-token prompt and decoding in ([\d.]+) s, "
                        r"([\d,]+) tokens/s\)", a.stderr.strip().splitlines()[-1])
    assert said, a.stderr
    assert int(said[1]) == len(moelab.load(str(run)).tokenizer.encode_prompt("marker001x expert"))
    assert float(said[3].replace(",", "")) == pytest.approx(12 / float(said[2]), rel=0.3)  # (3 decimals shown)
    greedy = run_cli("generate", run, "--prompt", "marker001x", "--temperature", "0", "--max-new-tokens", "20")
    text = greedy.stdout[len("marker001x"):]
    word = text.split()[1] if len(text.split()) > 1 else text.split()[0]
    stopped = run_cli("generate", run, "--prompt", "marker001x", "--temperature", "0", "--max-new-tokens", "20",
                     "--stop", word)
    assert word not in stopped.stdout[len("marker001x"):] and "stopped: stop" in stopped.stderr
    # a bad second prompt is refused before the first one's text is printed
    bad = run_cli("generate", run, "--prompt", "marker001x", "--prompt", "", "--max-new-tokens", "2")
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.startswith("moelab: error: empty prompt"), bad


def test_cli_generate_decodes_prompts_together_as_each_alone(trained):
    """--batch-size: prompts of different lengths decoded together print, in the given order, what
    each prints alone, sampled too (prompt i samples at the seed + i, whatever the batching); a
    prompt given twice gets two samples; a closing line counts the prompts."""
    import re

    run = trained / "run"
    prompts = ["marker001x expert router token layer", "marker002x", "marker003x layer"]
    args = ("--max-new-tokens", "10", "--seed", "5", *[a for p in prompts for a in ("--prompt", p)])
    together = run_cli("generate", run, *args, "--batch-size", "3")
    assert together.returncode == 0, together.stderr
    alone = [run_cli("generate", run, "--prompt", p, "--max-new-tokens", "10", "--seed", str(5 + i))
             for i, p in enumerate(prompts)]  # each written as it is decoded (TextStream)
    assert together.stdout == "".join(a.stdout for a in alone) and together.stdout.count("marker") >= 3
    assert run_cli("generate", run, *args, "--batch-size", "2").stdout == together.stdout
    lines = together.stderr.strip().splitlines()
    assert [line.split(" (")[0] for line in lines[:-1]] == [a.stderr.strip().split(" (")[0] for a in alone]
    assert re.fullmatch(r"-- 3 prompts, \d+ tokens in [\d.]+ s, [\d,]+ tokens/s, up to 3 decoded together "
                        r"\(--batch-size\)", lines[-1]), lines[-1]
    twice = run_cli("generate", run, "--prompt", "marker001x", "--prompt", "marker001x", "--max-new-tokens", "10")
    seeds = [run_cli("generate", run, "--prompt", "marker001x", "--max-new-tokens", "10", "--seed", s).stdout
             for s in ("0", "1")]
    assert twice.stdout == "".join(seeds) and seeds[0] != seeds[1]
    # stop strings: each streamed text is cut where the batch's is
    cut = ("--max-new-tokens", "24", "--stop", "er", "--stop", "ou")
    batch = run_cli("generate", run, *[a for p in prompts for a in ("--prompt", p)], *cut)
    streamed = [run_cli("generate", run, "--prompt", p, "--seed", str(i), *cut) for i, p in enumerate(prompts)]
    assert batch.stdout == "".join(r.stdout for r in streamed) and batch.stderr.count("stopped: stop") >= 2


def test_a_prompt_decoded_alone_is_written_as_it_comes_in_final_pieces(trained):
    """TextStream (generate's output for a prompt decoded alone): each piece is final. A character
    whose bytes are split across tokens waits for all of them, text that could start a stop string
    waits, and the pieces add up to the text generation returns, cut before the stop string."""
    from moelab.eval.generate import TextStream

    tok = load_target(str(trained / "run")).tokenizer
    ids = tok.encode("marker001x é€ 世界 expert router model")
    assert any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))  # split characters
    text = tok.decode(ids)
    cut = text[:text.find("router")]
    assert cut == "marker001x é€ 世界 expert "
    pieces = []
    live = TextStream(tok, ("router", "xyz"), pieces.append)
    for n in range(1, len(ids) + 1):
        live.update(ids[:n])
        assert cut.startswith("".join(pieces))  # nothing past the cut, no half character
    live.finish(cut)
    assert "".join(pieces) == cut and len(pieces) > 5 and not any("\ufffd" in p for p in pieces)


def test_generate_into_a_closed_pipe_stops_quietly(trained):
    """`moelab generate ... | head`: once the reader has gone, the command stops without an error
    line, with the status of a process SIGPIPE ended (it said "moelab: error: Broken pipe")."""
    import os
    import sys

    prompts = [a for i in range(40) for a in ("--prompt", f"marker{i:03d}x")]
    p = subprocess.Popen([sys.executable, "-m", "moelab", "generate", str(trained / "run"), *prompts,
                          "--batch-size", "1", "--max-new-tokens", "20"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, MOELAB_FAULTS=""))
    assert p.stdout.read(3) == "mar"
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=120)
    assert p.returncode == 141 and "error" not in err and "Traceback" not in err, err


def test_cli_generate_reads_a_prompt_file_and_writes_json(trained, tmp_path):
    """--prompt-file (lines, or .jsonl for prompts with line breaks) continues the --prompt list;
    --json records each prompt's text, counts, stop reason and seed. Bad files are refused in one
    line, and --json does not overwrite a file it did not write."""
    run = trained / "run"
    (tmp_path / "p.txt").write_text("marker001x expert\n\nmarker002x\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "marker003x\\nlayer"}\n')
    args = ("--max-new-tokens", "6", "--seed", "3")
    res = run_cli("generate", run, "--prompt", "marker004x", "--prompt-file", tmp_path / "p.txt", *args,
                  "--json", tmp_path / "g.json")
    assert res.returncode == 0, res.stderr
    same = run_cli("generate", run, *[a for p in ("marker004x", "marker001x expert", "marker002x")
                                      for a in ("--prompt", p)], *args)
    assert res.stdout == same.stdout
    got = json.loads((tmp_path / "g.json").read_text())
    assert [(g["prompt"], g["seed"]) for g in got["generations"]] == [("marker004x", 3), ("marker001x expert", 4),
                                                                      ("marker002x", 5)]
    assert "".join(g["prompt"] + g["text"] + "\n" for g in got["generations"]) == res.stdout
    assert got["settings"]["max_new_tokens"] == 6 and all(g["new_tokens"] <= 6 for g in got["generations"])
    assert run_cli("generate", run, "--prompt", "x", "--json", tmp_path / "g.json").returncode == 0  # its own
    lines = run_cli("generate", run, "--prompt-file", tmp_path / "p.jsonl", *args)
    assert lines.returncode == 0 and lines.stdout.startswith("marker003x\nlayer")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n[1]\n')
    (tmp_path / "empty.txt").write_text("\n \n")
    for extra, said in ((("--prompt-file", tmp_path / "bad.jsonl"), "bad.jsonl line 2: not a JSON object"),
                        (("--prompt-file", tmp_path / "empty.txt"), "holds no prompts"),
                        (("--prompt-file", tmp_path / "missing.txt"), "cannot read prompt file"),
                        ((), "no prompt: give --prompt TEXT")):
        r = run_cli("generate", run, *extra)
        assert r.returncode == 2 and said in r.stderr and r.stderr.count("\n") == 1 and r.stdout == "", (said, r)
    r = moelab("generate", run, "--prompt", "x", "--json", tmp_path / "p.txt")  # (argparse's refusal: a process)
    assert r.returncode == 2 and "is not a result file" in r.stderr and r.stdout == ""
    assert (tmp_path / "p.txt").read_text() == "marker001x expert\n\nmarker002x\n"


def test_harness_generate_until_decodes_requests_together_as_each_alone(trained):
    """MoelabLM.generate_until batches requests with the same generation settings: each text is
    what generate_text gives the request alone, in the requests' order."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from moelab.eval.generate import Sampler, generate_text
    from moelab.eval.harness import MoelabLM

    target = load_target(str(trained / "run"))
    lm = MoelabLM(target=target, batch_size=2, max_gen_toks=9)
    asks = [("marker001x expert", {"until": ["router"], "max_gen_toks": 12}), ("marker004x", {"until": "\n\n"}),
            ("marker002x gradient batch", {"until": ["router"], "max_gen_toks": 12}),
            ("marker003x", {"until": [], "do_sample": True, "temperature": 0.7}), ("marker005x token", {})]
    got = lm.generate_until([Instance("generate_until", {}, (c, kw), i) for i, (c, kw) in enumerate(asks)])
    want = []
    for context, kw in asks:
        until = kw.get("until") or []
        until = tuple([until] if isinstance(until, str) else until)
        sampler = Sampler(temperature=kw.get("temperature", 0.0) if kw.get("do_sample") else 0.0)
        want.append(generate_text(target.model, target.tokenizer, context, kw.get("max_gen_toks", 9), sampler,
                                  until)["text"])
    assert got == want and len(set(got)) > 2


def test_python_load_gives_model_and_tokenizer_of_a_run_and_an_hf_export(trained):
    """The README's Python snippet: moelab.load(run).model/.tokenizer, the same model as load_model."""
    import moelab

    run = moelab.load(str(trained / "run"))
    text = "marker003x expert router"
    ids = run.tokenizer.encode(text)
    assert run.tokenizer.decode(ids) == text and not run.model.training
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = run.model(x).logits
        assert torch.equal(logits, moelab.load_model(str(trained / "run")).eval()(x).logits)
        if not HAS_TRANSFORMERS:
            return
        hf = moelab.load(str(trained / "hf"))
        torch.testing.assert_close(hf.model(x).logits, logits, atol=1e-4, rtol=1e-4)
    assert hf.tokenizer.encode(text) == ids and hf.run_dir is None and run.run_dir == trained / "run"


@needs_transformers
def test_converting_a_model_without_a_tokenizer_says_what_is_missing(trained, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(trained / "hf", hf)
    for f in hf.glob("tokenizer*"):
        f.unlink()
    res = run_cli("convert", hf, "--out", tmp_path / "run")
    assert res.returncode == 0 and "has no tokenizer.json" in res.stderr, res.stderr
    res = run_cli("eval", tmp_path / "run", "--source", "stdlib")  # said "was it moved without it?"
    assert res.returncode == 2 and "put the model's tokenizer.json there" in res.stderr


@needs_transformers
def test_a_tokenizer_larger_than_the_model_is_refused(trained, tmp_path):
    """A tokenizer with tokens past the model's vocabulary (a wrong tokenizer.json put beside the
    weights, added tokens never given embeddings): generating from a prompt with one of them was an
    IndexError traceback from the embedding (on a GPU, a device-side assert). Refused at load, in a
    run as in a Hugging Face directory, as training refuses it."""
    from tokenizers import Tokenizer

    run, hf = tmp_path / "run", tmp_path / "hf"
    shutil.copytree(trained / "run", run)
    shutil.copytree(trained / "hf", hf)
    for file in (run / "tokenizer" / "tokenizer.json", hf / "tokenizer.json"):
        tok = Tokenizer.from_file(str(file))
        assert tok.get_vocab_size() == 300
        tok.add_tokens(["<extra_a>", "<extra_b>"])
        tok.save(str(file))
    res = run_cli("generate", run, "--prompt", "expert <extra_b>", "--max-new-tokens", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{run}: the tokenizer has 302 tokens but the model's vocabulary only 300" in res.stderr, res.stderr
    res = run_cli("eval", hf, "--source", str(trained / "corpus"))
    assert res.returncode == 2 and "use the tokenizer the model was trained with" in res.stderr, res.stderr
    res = run_cli("convert", hf, "--out", tmp_path / "converted")  # the weights convert; the pair is pointed out
    assert res.returncode == 0 and "its tokenizer has 302 tokens but the model's vocabulary only 300" in res.stderr
