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
