"""Hub loads on a machine that cannot reach the Hub: offline mode for the call only, then restored."""

import logging
import os

import pytest

from moelab.hub import hub_access, offline_hint


def test_unreachable_hub_runs_offline_for_the_call_only(monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    config = pytest.importorskip("datasets.config")
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", *(p for p in os.environ if p.lower().endswith("_proxy"))):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    with hub_access() as why:
        assert "http://127.0.0.1:9" in why and "cannot be reached" in why
        assert constants.HF_HUB_OFFLINE is True and config.HF_HUB_OFFLINE is True
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_logger.level == logging.ERROR
    assert constants.HF_HUB_OFFLINE is False and config.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ and hub_logger.level == level
    assert "not in the local cache" in offline_hint(why)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # asked for by the user: said as such
    with hub_access() as why:
        assert why.startswith("offline mode is set")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_hub_model_id_gets_a_download_hint(tmp_path, monkeypatch):
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    hint = "download it first (hf download Qwen/Qwen3-30B-A3B --local-dir DIR)"
    for args in (("convert", "Qwen/Qwen3-30B-A3B", "--out", "cv"), ("eval", "Qwen/Qwen3-30B-A3B"),
                 ("info", "Qwen/Qwen3-30B-A3B"), ("generate", "Qwen/Qwen3-30B-A3B", "--prompt", "hi"),
                 ("train", "train.init_from=Qwen/Qwen3-30B-A3B", "--print-config")):
        r = run_cli(*args)
        assert r.returncode == 2 and hint in r.stderr and len(r.stderr.splitlines()) == 1, (args, r.stderr)
    for path in ("runs/tiny", "./nope", "nope"):  # local paths: no hint
        r = run_cli("eval", path)
        assert r.returncode == 2 and "no such run" in r.stderr and "hf download" not in r.stderr
    assert not (tmp_path / "cv").exists()
