"""User errors: one clear line on stderr, exit code 2, no traceback, nothing overwritten."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def moelab(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=env)


def _assert_user_error(res, *needles):
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moelab: error:"), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_lists_commands():
    res = moelab("--help")
    assert res.returncode == 0 and "train" in res.stdout and "embedded" in res.stdout


def test_missing_config_file(tmp_path):
    _assert_user_error(moelab("train", "--config", str(tmp_path / "nope.yaml")), "config file not found")


def test_unknown_preset():
    _assert_user_error(moelab("train", "--preset", "huge"), "unknown preset 'huge'")


def test_unknown_override_key():
    _assert_user_error(moelab("train", "model.n_expert=8"), "model.n_experts")


def test_a_config_error_and_data_prepare_need_no_torch_and_the_loop_no_compiler(tmp_path):
    """A typo in a preset or key was refused only after importing torch (2 s), and `data prepare`
    (numpy and tokenizers) imported it too; every command importing the training loop imported
    torch._dynamo (1.5 s more) through a decorator on a data-parallel helper."""
    from tests.conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_docs=8, words_per_doc=50)
    code = ("import sys\n"
            "from moelab.cli import main\n"
            "rc = main(['train', '--preset', 'huge'])\n"
            f"rc2 = main(['data', 'prepare', {str(corpus)!r}, '--out', {str(tmp_path / 'prep')!r}, "
            "'--vocab-size', '260'])\n"
            "print(rc, rc2, 'torch' in sys.modules)\n"
            "import moelab.train.loop\n"
            "print('torch' in sys.modules, 'torch._dynamo' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.splitlines()[-2:] == ["2 0 False", "True False"], res.stdout + res.stderr
    assert "unknown preset 'huge'" in res.stderr and (tmp_path / "prep" / "manifest.json").is_file()


def test_corpus_without_usable_text(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("")
    (corpus / "blob.txt").write_bytes(b"\x00\x01\x02binary\xff" * 100)
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    res = moelab("train", "--preset", "test", f"data.source={corpus}", "--out", str(tmp_path / "r"))
    _assert_user_error(res, "no usable text", "skipped 3")
    other = tmp_path / "other"  # files, but none of a kind moelab reads: say which kinds it reads
    other.mkdir()
    (other / "weights.bin").write_bytes(b"\x00" * 64)
    res = moelab("train", "--preset", "test", f"data.source={other}", "--out", str(tmp_path / "r2"))
    _assert_user_error(res, "no usable text", ".txt", ".jsonl", ".pdf")


def test_existing_run_dir_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = moelab("train", "--preset", "test", "--out", str(out))
    _assert_user_error(res, "is not empty and holds no run", "choose another --out")
    assert "--resume" not in res.stderr  # nothing there to continue
    assert (out / "precious.txt").read_text() == "keep me"
    res = moelab("train", "--resume", "auto", "--out", str(out), "train.steps=2")  # it trained among the files
    _assert_user_error(res, "is not a run and not empty", "choose another --out")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_train_device_flag_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without a GPU")
    res = moelab("train", "--preset", "test", "--device", "cuda", "--out", str(tmp_path / "r"))
    _assert_user_error(res, "train.device=cuda", "no CUDA device", "train.device=cpu")
    from tests.conftest import run_cli

    for device, msg in (("tpu", "tpu is not a device"), ("cuda:1", "no CUDA device"), ("xpu", "no xpu device")):
        res = run_cli("eval", tmp_path, "--device", device)  # a torch RuntimeError traceback for tpu and xpu
        assert res.returncode == 2 and msg in res.stderr and "--device" in res.stderr, res.stderr


def test_an_indexed_cpu_device_is_the_cpu(tmp_path):
    """--device cpu:0 trained 4 updates, then the checkpoint reload said the weights were damaged."""
    from moelab.train.loop import resolve_device
    from tests.conftest import run_cli

    assert resolve_device("cpu:0") == resolve_device("cpu:3") == torch.device("cpu")
    res = run_cli("train", "--preset", "test", "--smoke", "--device", "cpu:0", "--out", tmp_path / "r")
    assert res.returncode == 0 and "smoke check passed" in res.stdout, res.stderr


@pytest.mark.slow
def test_cli_train_end_to_end(tmp_path):
    res = moelab("train", "--preset", "test", "--out", str(tmp_path / "run"), "train.steps=6",
                 "train.eval_every=3", "train.save_every=3")
    assert res.returncode == 0, res.stderr
    assert "done: 6 updates" in res.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_0000006" / "model.safetensors").is_file()


@pytest.mark.parametrize("typed, meant", [
    (r"\n\n", "\n\n"), (r"a\tb", "a\tb"), (r"\r\n", "\r\n"), (r"C:\\x", "C:\\x"),
    (r"\d+ \x \u00e9", r"\d+ \x \u00e9"), (r"end\\n", "end\\n"), ("é\n", "é\n"), ("\\", "\\")])
def test_generate_reads_shell_escapes_in_stop_strings(typed, meant):
    """`--stop "\\n\\n"` in a shell passes backslash-n twice: it must stop at a blank line, not at
    a literal backslash the model never writes. Other backslashes are kept as typed."""
    from moelab.cli import build_parser

    args = build_parser().parse_args(["generate", "run", "--prompt", "p", "--stop", typed, "--stop", "x"])
    assert args.stop == [meant, "x"]


@pytest.mark.parametrize("argv, needle", [
    (["eval", "run", "--batch-size", "0"], "argument --batch-size: must be >= 1 (got 0)"),
    (["eval", "run", "--limit", "-1"], "argument --limit: must be >= 0 (got -1)"),
    (["eval", "run", "--windows", "lots"], "argument --windows: expects a whole number, got 'lots'"),
    (["routing", "run", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["generate", "run", "--prompt", "x", "--max-new-tokens", "-2"], "argument --max-new-tokens: must be >= 0"),
    (["data", "check", "run", "--ngram", "1"], "argument --ngram: must be >= 2"),
    (["data", "check", "run", "--threshold", "2"], "argument --threshold: must be between 0 and 1"),
    (["data", "prepare", "stdlib", "--out", "d", "--vocab-size", "100"], "argument --vocab-size: must be >= 260"),
    (["data", "prepare", "stdlib", "--out", "d", "--vocab-size", "9" * 20],
     "argument --vocab-size: must be <= 2147483647"),
    (["eval", "run", "--windows", "9" * 20], "argument --windows: must be <= 4611686018427387904"),
    (["eval"], "required: target"),
    (["generate", "run", "--prompt", "x", "--stop", ""], "argument --stop: an empty stop string ends the text"),
    (["eval", "run", "--harness", " , "], "argument --harness: names no task"),
    (["data", "check", "run", "--harness", ","], "argument --harness: names no task"),
])
def test_bad_options_are_one_line_before_anything_runs(argv, needle, capsys):
    """Each of these crashed with a traceback (range() arg 3 must not be zero, ZeroDivisionError,
    negative dimensions) or wrote a 257-token vocabulary; argparse's own errors printed a usage block."""
    from moelab.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("moelab") and "usage:" not in err


def test_overrides_on_both_sides_of_an_option_all_apply(capsys):
    """`train a=1 --out R b=2` was refused ("unrecognized arguments: b=2"): argparse ends a positional
    list at the first option."""
    import yaml

    from moelab.cli import main

    assert main(["train", "--preset", "test", "train.steps=7", "--out", "r", "train.seq_len=32", "--print-config",
                 "model.top_k=1"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["train"]["steps"], cfg["train"]["seq_len"], cfg["model"]["top_k"]) == (7, 32, 1)
    with pytest.raises(SystemExit) as exc:  # what is not key=value is still refused
        main(["train", "train.steps=7", "--out", "r", "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    for cmd in (["routing", "run"], ["data", "check", "d"]):  # the line names that command's help, not moelab's
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--compare", "x"])
        prog = " ".join(["moelab", *cmd[:-1]])
        assert capsys.readouterr().err == (f"{prog}: error: unrecognized arguments: --compare x "
                                           f"(`{prog} --help` lists the options)\n") and exc.value.code == 2
    with pytest.raises(SystemExit):  # and commands without overrides take none
        main(["eval", "run", "--limit", "1", "train.steps=7"])


def test_json_output_path_is_checked_before_the_work_and_its_folder_made(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "a.txt").write_text("the router sends each token to two experts " * 20)
    (tmp_path / "b.txt").write_text("a validation document about load balancing losses " * 20)
    check = ("data", "check", "--train", tmp_path / "a.txt", "--val", tmp_path / "b.txt", "--seq-len", "16",
             "--ngram", "4")
    for bad, msg in ((tmp_path, "is a directory"), (tmp_path / "a.txt" / "r.json", "is a file")):
        res = moelab(*map(str, check), "--json", str(bad))
        assert res.returncode == 2 and msg in res.stderr and res.stdout == ""  # refused before the audit ran
    if Path("/proc/self").is_dir():  # the temporary file beside it failed after the audit, naming that file
        res = moelab(*map(str, check), "--json", "/proc/r.json")
        assert res.returncode == 2 and "cannot write in /proc (" in res.stderr and res.stdout == "", res.stderr
    res = run_cli(*check, "--json", tmp_path / "new" / "r.json")
    assert res.returncode in (0, 1) and "val_windows" in (tmp_path / "new" / "r.json").read_text()
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["r.json"]  # the write probe left nothing
    # an earlier result is replaced; any other file is left as it is (--json RUN/metrics.jsonl replaced the log)
    import json

    audit = json.loads((tmp_path / "new" / "r.json").read_text())
    before_choice = json.dumps({k: v for k, v in audit.items() if k != "choice"})  # an audit of earlier versions
    for earlier in ('{"model": "x", "language": {}}', "", before_choice):  # an eval result; mktemp's empty file
        (tmp_path / "new" / "r.json").write_text(earlier)
        assert run_cli(*check, "--json", tmp_path / "new" / "r.json").returncode in (0, 1)
        assert "val_windows" in (tmp_path / "new" / "r.json").read_text()
    for name, text in (("metrics.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'),
                       ("summary.json", '{"steps": 2, "val_loss": 1.5}'), ("notes.txt", "mine")):
        (tmp_path / name).write_text(text)
        res = moelab(*map(str, check), "--json", str(tmp_path / name))
        assert res.returncode == 2 and "is not a result file an earlier --json wrote" in res.stderr, res.stderr
        assert (tmp_path / name).read_text() == text and res.stdout == ""


@pytest.mark.parametrize("command", [["train", "--preset", "test"], ["convert", "hf"], ["export", "run"],
                                     ["routing", "c.csv"], ["data", "prepare", "stdlib"]])
def test_out_that_is_a_file_is_refused_at_once(tmp_path, command):
    """Each was a FileExistsError/NotADirectoryError traceback, some after the work was done."""
    (tmp_path / "notes.txt").write_text("mine")
    for out, msg in (("notes.txt", "notes.txt is a file; give a folder"),
                     ("notes.txt/sub", "notes.txt is a file, so")):
        res = moelab(*command, "--out", str(tmp_path / out), cwd=tmp_path)
        assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    if Path("/proc/self").is_dir():  # a folder that takes no new file, even for root: refused at once too
        res = moelab(*command, "--out", "/proc/moelab-out/sub", cwd=tmp_path)
        assert res.returncode == 2 and "cannot write in /proc (" in res.stderr and res.stdout == "", res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the probe left nothing


def test_fork_from_a_checkpoint_says_what_changed(trained, tmp_path):
    from tests.conftest import run_cli

    src = trained / "run"
    before = (src / "metrics.jsonl").read_bytes()
    res = run_cli("train", "--resume", src / "checkpoints" / "step_0000010", "--out", tmp_path / "fork",
                  "train.steps=12", "optim.muon_lr=0.005", "train.report=false")
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("resumed from "))
    assert "step_0000010" in line and "optim.muon_lr 0.02 -> 0.005" in line and "train.steps 30 -> 12" in line
    assert "train.report True -> False" in line and line.count(" -> ") == 3
    assert f"run {tmp_path / 'fork'}" in res.stdout and (src / "metrics.jsonl").read_bytes() == before


def test_one_job_script_with_a_preset_and_resume_auto_starts_and_continues_its_run(trained, tmp_path):
    """`moelab train --preset P --out RUN --resume auto` (a requeued job's one command) was refused
    ('drop --preset'), so a job that needs a preset could not requeue with the command that started
    it. Where RUN holds no run it starts one, saying so (a mistyped --out shows); on an existing run
    the preset must give the run's own settings."""
    from moelab.train.checkpoint import list_checkpoints
    from tests.conftest import run_cli

    data = f"data.path={trained / 'run' / 'data' / 'prepared'}"
    res = run_cli("train", "--resume", "auto", "--out", tmp_path / "new", "--preset", "test", "train.steps=1",
                  data, "train.report=false", "train.eval_windows=2", "train.final_eval_windows=2")
    assert res.returncode == 0, res.stderr
    assert f"--resume auto: {tmp_path / 'new'} held no run, so a new one starts there" in res.stderr
    assert list_checkpoints(tmp_path / "new")[-1].name == "step_0000001"
    res = run_cli("train", "--resume", "auto", "--out", tmp_path / "new", "--preset", "test", "train.steps=2",
                  data, "train.report=false", "train.eval_windows=2", "train.final_eval_windows=2")
    assert res.returncode == 0 and "resumed at step 1" in res.stdout + res.stderr, res.stderr
    assert "held no run" not in res.stderr and list_checkpoints(tmp_path / "new")[-1].name == "step_0000002"
    # the trained run again, with the command that started it: matched, and already complete
    run = trained / "run"
    before = (run / "metrics.jsonl").read_bytes()
    started = ["--preset", "test", f"data.source={trained / 'corpus'}", "data.vocab_size=300", "train.save_every=10",
               "train.keep_last=0", "train.plot=true", "train.report=true",
               f"train.choice_tasks={trained / 'mc.jsonl'}", "train.choice_every=10"]
    res = run_cli("train", "--out", run, "--resume", "auto", *started)
    assert res.returncode == 0 and "is already complete (30 updates" in res.stdout, res.stderr
    for other, differ in ((["--preset", "tiny"], "preset 'test' -> 'tiny'"),
                          # an override: applies, not compared, though to no update of a finished run
                          ([*started, "train.plot=false"], "train.plot True -> False"),
                          ([*started[:-1], "train.choice_every=5"], "train.choice_every 10 -> 5")):
        res = run_cli("train", "--out", run, "--resume", "auto", *other)
        if "preset" in differ:
            assert res.returncode == 2 and differ in res.stderr and "drop --preset/--config" in res.stderr, res.stderr
        else:
            assert res.returncode == 0 and "already complete" in res.stdout, res.stderr
            assert f"nothing changed, and the settings given were not applied ({differ})" in res.stdout, res.stdout
    assert (run / "metrics.jsonl").read_bytes() == before


def test_resume_with_another_model_shape_is_one_line(trained, tmp_path):
    """model.d_model or model.n_experts on a resume was a state_dict size-mismatch traceback; a new
    train.seq_len was reported as a changed data fingerprint only."""
    from tests.conftest import run_cli as moelab  # refusals in set-up: no need for 5 s process starts

    src = trained / "run" / "checkpoints" / "step_0000010"
    for override, changed in (("model.d_model=48", "model.d_model 64 -> 48"),
                              ("model.n_experts=8", "model.n_experts 4 -> 8")):
        res = moelab("train", "--resume", src, "--out", tmp_path / "fork", override)
        _assert_user_error(res, f"its weights do not fit the model as configured now ({changed})")
        assert not (tmp_path / "fork").exists()
    res = moelab("train", "--resume", str(src), "--out", str(tmp_path / "fork"), "train.seq_len=24")
    _assert_user_error(res, "data changed since checkpoint step_0000010 (train.seq_len 64 -> 24)")
    run = tmp_path / "run"  # in place: the refused resume rewrote the run's config.yaml and run.json
    shutil.copytree(trained / "run", run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".moelab.lock"}
    for override in ("model.d_model=48", "train.seq_len=24"):
        res = moelab("train", "--resume", str(run / "checkpoints" / "step_0000010"), override)
        assert res.returncode == 2, res.stderr
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".moelab.lock"} == before


def test_compile_without_a_cpp_compiler_is_one_line_before_any_work(tmp_path):
    """torch.compile on CPU builds C++ kernels; with no compiler the run prepared its data and then
    died in the first update with an inductor traceback."""
    import os

    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"))  # inductor's compiler setting
    res = moelab("train", "--preset", "test", "--out", str(tmp_path / "run"), "train.compile=true",
                 "train.device=cpu", env=env)
    _assert_user_error(res, "train.compile=true: torch.compile on CPU needs a working C++ compiler",
                       "train.compile=false")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nothing can be created")
def test_a_path_the_system_refuses_is_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("the router sends each token to two experts " * 20)
    (tmp_path / "b.txt").write_text("a validation document about load balancing losses " * 20)
    res = moelab("data", "check", "--train", str(tmp_path / "a.txt"), "--val", str(tmp_path / "b.txt"),
                 "--seq-len", "16", "--ngram", "4", "--json", "/proc/moelab-nowhere/r.json")
    assert res.returncode == 2 and "cannot write in /proc (No such file or directory)" in res.stderr  # at once
    long = "x" * 300  # a name the system refuses although its folder takes files: was a traceback from argparse
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out, why in ((tmp_path / long, "File name too long"), (tmp_path / "loop" / "r", "Too many levels of")):
        res = moelab("data", "check", "--train", str(tmp_path / "a.txt"), "--val", str(tmp_path / "b.txt"),
                     "--seq-len", "16", "--ngram", "4", "--json", f"{out}.json")
        assert res.returncode == 2 and f"--json: {out}.json: {why}" in res.stderr and res.stdout == "", res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        res = moelab("train", "--preset", "test", "--out", str(out))
        assert res.returncode == 2 and f"--out: {out}: {why}" in res.stderr and res.stdout == "", res.stderr


def test_data_check_takes_a_run_or_two_sources_not_both(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "a.txt").write_text("x " * 50)
    res = run_cli("data", "check", tmp_path, "--train", tmp_path / "a.txt", "--val", tmp_path / "a.txt")
    assert res.returncode == 2 and "not both" in res.stderr  # --train/--val were silently ignored


def test_a_runs_checkpoints_folder_stands_for_its_newest_checkpoint(trained):
    """`--resume RUN/checkpoints` (or generate/eval on it) said 'no checkpoint found' at a folder of them."""
    from moelab.train.checkpoint import list_checkpoints, resolve_checkpoint
    from tests.conftest import run_cli

    run = trained / "run"
    assert resolve_checkpoint(run / "checkpoints") == resolve_checkpoint(run) == list_checkpoints(run)[-1]
    res = run_cli("generate", run / "checkpoints", "--prompt", "marker", "--max-new-tokens", "2", "--temperature", "0")
    assert res.returncode == 0 and res.stdout.startswith("marker"), res.stderr


def test_text_field_of_source_records_for_eval_routing_and_data_check(trained, tmp_path):
    """eval/routing --source and data check --train/--val read JSONL through the field 'text' only,
    and the error said to set data.text_field, which none of them reads."""
    import json

    from tests.conftest import run_cli

    docs = [(trained / "corpus" / f"doc{i:03d}.txt").read_text() for i in range(6)]
    for name, part in (("a", docs[:3]), ("b", docs[3:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in part))
    run, src = trained / "run", tmp_path / "a.jsonl"
    res = run_cli("eval", run, "--source", src)
    assert res.returncode == 2 and "no field 'text' (has body)" in res.stderr and "--text-field NAME" in res.stderr
    res = run_cli("eval", run, "--source", src, "--text-field", "body", "--no-xz")
    assert res.returncode == 0 and "(3 documents, all of them" in res.stdout, res.stderr
    with src.open("a") as f:  # records without the field are named, not silently left out
        f.write(json.dumps({"text": "x"}) + "\n")
    res = run_cli("eval", run, "--source", src, "--text-field", "body", "--no-xz")
    assert "(3 documents, all of them" in res.stdout  # (and how many of them the run trained on)
    assert "; 1 skipped, such as a.jsonl#4: no field 'body' (has text))" in res.stdout
    res = run_cli("eval", run, "--text-field", "body")  # would be ignored: refused instead
    assert res.returncode == 2 and "give --source too" in res.stderr
    res = run_cli("routing", run, "--source", src, "--text-field", "body", "--no-plots", "--out", tmp_path / "r")
    assert res.returncode == 0 and json.loads((tmp_path / "r" / "routing.json").read_text())["splits"]["source"]
    res = run_cli("data", "check", "--train", src, "--val", tmp_path / "b.jsonl", "--text-field", "body",
                  "--tokenizer", run / "tokenizer", "--seq-len", "64")
    assert res.returncode == 0 and "3 val documents" in res.stdout, res.stdout + res.stderr
