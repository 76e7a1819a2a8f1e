"""Run reports: written at the end of training, self-contained HTML whose images decode (and render
in a headless browser when one is installed), numbers equal to the run's own, bad input refused."""

import base64
import io
import json
import re
import shutil

import pytest
import torch

from tests.conftest import HAS_TRANSFORMERS, moelab, run_cli


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_report_written_at_the_end_of_training(trained):
    run = trained / "run"
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    summary = json.loads((run / "summary.json").read_text())
    for section in ("Reproduce", "Configuration", "Parameters", "Training curves", "Final metrics", "Routing",
                    "Sample generations"):
        assert f"## {section}" in md and f"<h2>{section}</h2>" in page
    provenance = json.loads((run / "run.json").read_text())
    assert provenance["git_sha"] is None or provenance["git_sha"] in md
    assert "moelab train --preset test --out" in md and "train.report=true" in md  # the exact command
    assert f"{summary['val_loss']:.4f}" in md and f"{summary['val_xz_bpb']:.3f}" in md
    best = summary["best"]
    assert f"| best validation | update {best['step']}: loss {best['val_loss']:.4f} on the periodic" in md
    assert f"{summary['params']['total']:,}" in md and f"{summary['params']['active']:,}" in md
    for verdict_word in ("balanced", "moderate", "high imbalance", "collapse"):
        assert verdict_word in md  # the thresholds are printed
    # self-contained: every image inline, nothing fetched from elsewhere
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    import matplotlib.image

    images = _images(page)
    assert len(images) >= 4  # curves, layers, checkpoints or steps, co-activation
    for png in images:
        arr = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert arr.shape[0] > 100 and arr.shape[1] > 100 and arr.std() > 0.01  # a real picture, not blank
    for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (run / ref).is_file()


def test_report_images_render_in_a_headless_browser(trained):
    """Needs `pip install playwright` and Chromium (`apt-get install chromium`); skipped otherwise."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        pytest.skip("no Chromium installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((trained / "run" / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
        browser.close()
    assert len(sizes) >= 4 and all(ok and w > 100 and h > 100 for ok, w, h in sizes)
    assert "Routing" in headings and "Sample generations" in headings


def test_report_command_and_bad_inputs(trained, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained / "run", run)
    (run / "report.html").unlink()
    res = moelab("report", run, "--samples", "1", "--windows", "4")
    assert res.returncode == 0, res.stderr
    assert (run / "report.html").is_file() and "Sample generations" in (run / "report.md").read_text()
    shutil.rmtree(run / "checkpoints")
    res = run_cli("report", run)
    assert res.returncode == 2 and "no checkpoint yet" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0
    res = run_cli("report", tmp_path / "missing")
    assert res.returncode == 2 and "not a run directory" in res.stderr
    if not HAS_TRANSFORMERS:  # (an HF directory to convert)
        return
    res = run_cli("convert", trained / "hf", "--out", tmp_path / "converted")
    assert res.returncode == 0, res.stderr
    res = run_cli("report", tmp_path / "converted")  # said "give --data or --source", which report has not
    assert res.returncode == 2 and "converted model: there is no training to report" in res.stderr


def test_report_samples_are_what_moelab_generate_gives_their_prompts(trained):
    """The report says `moelab generate` reproduces its samples (decoded as one batch there): the
    command's defaults (temperature 0.8, top-k 50, top-p 0.95, seed 0) on the same prompts, given
    together, print the same texts."""
    from moelab.analysis.report import _sample_blocks
    from moelab.eval.target import load_target

    blocks = [b for kind, b in _sample_blocks(load_target(str(trained / "run")), 3, 12) if kind == "pre"]
    pairs = [re.fullmatch(r"prompt: (.*?)\nmodel:  (.*)", b, re.S).groups() for b in blocks]
    assert len(pairs) == 3
    res = run_cli("generate", trained / "run", *[f"--prompt={p}" for p, _ in pairs], "--max-new-tokens", "12")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "".join(f"{p}{t}\n" for p, t in pairs)


def test_model_versus_xz_wording_has_the_right_direction():
    from moelab.analysis.report import versus_xz

    assert versus_xz(3.036, 1.750) == " (73% more bits than xz)"  # said '-73% fewer bits' before
    assert versus_xz(1.0, 2.0) == " (50% fewer bits than xz)"
    assert versus_xz(1.75, 1.751) == " (as many bits as xz)"
    assert versus_xz(1.0, float("nan")) == ""


def test_markdown_code_blocks_hold_generated_backtick_fences():
    from moelab.analysis.report import render_markdown

    text = 'model: """doc\n```python\nx = 1\n```\nend'
    md = render_markdown([("h2", "Sample generations"), ("pre", text), ("h2", "After")])
    fence = "````"
    assert f"{fence}\n{text}\n{fence}" in md  # the sample's own ``` cannot close the block early
    assert md.rstrip().endswith("## After")
    assert "```\nplain\n```" in render_markdown([("pre", "plain")])


def test_report_and_routing_read_a_run_while_it_writes_its_metrics(trained, tmp_path):
    """During training the last line of metrics.jsonl may be half written (or cut by a kill):
    report and routing read the complete records and leave that line out."""
    run = tmp_path / "copy"
    shutil.copytree(trained / "run", run)
    (run / "curves.png").unlink()
    whole = (run / "metrics.jsonl").read_text()
    last = whole.splitlines()[-1]
    (run / "metrics.jsonl").write_text(whole + last[: len(last) // 2])
    res = run_cli("report", run, "--samples", "0", "--windows", "2")
    assert res.returncode == 0, res.stderr
    assert (run / "curves.png").is_file()
    res = run_cli("routing", run, "--windows", "2")
    assert res.returncode == 0, res.stderr
    verdicts = json.loads((run / "routing" / "routing.json").read_text())["steps_verdicts"]
    logged = [json.loads(ln)["step"] for ln in whole.splitlines() if '"expert_counts"' in ln]
    assert [int(s) for s in verdicts] == logged  # every complete record, the cut one left out



def test_sample_prompts_leave_out_the_document_start_token_generation_puts_back():
    """A report sample whose window starts a document after <s>: shown with "<s>" in its text, the
    prompt was encoded with two (the text's, and the one generation puts first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from moelab.analysis.report import sample_prompt
    from moelab.data.tokenizer import TextTokenizer

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the router sends each token to two experts"] * 5,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = TextTokenizer(tk, "</s>")
    body = tok.encode("the router sends")
    prompt = sample_prompt(tok, [1, 0, *body])  # the end of one document, the start of the next
    assert prompt == "the router sends" and tok.encode_prompt(prompt) == [0, *body]


def test_the_report_shows_capacity_drops_and_says_when_a_layer_collapsed(tmp_path):
    """A Switch router with a capacity drops the slots over it (their tokens skip the experts): the
    report's routing table shows each layer's share, as `moelab routing` measures it. A layer whose
    routing collapsed is said while training, at its end and by `moelab report`, and in the report."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    common = ("train", "--preset", "test", "train.steps=2", "train.eval_every=2", "train.report=true", "--out")
    res = run_cli(*common, tmp_path / "sw", "model.router=switch", "model.top_k=1", "model.capacity_factor=0.5")
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "sw" / "report.md").read_text()
    a = json.loads((tmp_path / "sw" / "routing" / "routing.json").read_text())
    shares = [s["dropped_share"] for split in ("train", "val") for s in a["splits"][split]]
    assert len(shares) == 4 and min(shares) >= 0.5  # capacity for half the tokens: at least half dropped
    rows = [ln.split(" | ") for ln in md.splitlines() if ln.startswith(("| train |", "| val |"))]
    assert "| dropped | verdict |" in md and [r[-2] for r in rows] == [f"{v:.1%}" for v in shares]
    # a sigmoid router whose selection bias sends every token to experts 0 and 1 of 4: two dead
    res = run_cli(*common, tmp_path / "sg", "model.router=sigmoid")
    assert res.returncode == 0 and "collapsed" not in res.stderr, res.stderr
    assert "| dropped |" not in (tmp_path / "sg" / "report.md").read_text()  # no capacity, nothing dropped
    weights = tmp_path / "sg" / "checkpoints" / "step_0000002" / "model.safetensors"
    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    w = load_file(weights)
    biased = [k for k in w if k.endswith("router.selection_bias")]
    assert len(biased) == 2
    for k in biased:
        w[k] = torch.tensor([100.0, 100.0, 0.0, 0.0])
    save_file(w, weights, metadata=meta)
    said = ("note: the routing of MoE layers 0, 1 collapsed (normalised entropy < 0.5, or at least half the experts "
            "dead or starved): most tokens go to few experts; see the Routing section of ")
    res = run_cli("report", tmp_path / "sg")
    assert res.returncode == 0 and said in res.stderr, res.stderr
    assert "The routing of MoE layers 0, 1 collapsed" in (tmp_path / "sg" / "report.md").read_text()
    res = run_cli("train", "--resume", "auto", "--out", tmp_path / "sg", "train.steps=3")
    assert res.returncode == 0 and said + str(tmp_path / "sg" / "report.html") in res.stderr, res.stderr
    # and while it trains, as soon as a log interval's counts show it, once
    assert res.stderr.count("note: the routing of MoE layers 0, 1 collapsed by update 3 (normalised entropy") == 1
