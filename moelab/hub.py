"""Loading from the Hugging Face Hub (datasets, task data) on machines that may have no network.

Without a network, `datasets` and `huggingface_hub` retry every request with back-off and log a
warning for each try: a cache miss took about 25 seconds and a dozen lines before its error. Inside
`hub_access()` their warnings are silenced (the caller reports a failure in one line) and, when
the Hub's endpoint cannot be reached, the libraries run in their offline mode for the call: the
local cache answers at once, or the load fails at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
from urllib.parse import urlparse

_TRUE = {"1", "ON", "YES", "TRUE"}
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_reachable: dict[tuple[str, int], bool] = {}


def _endpoint() -> str:
    hub = sys.modules.get("huggingface_hub.constants")  # what the library will use, once imported
    return getattr(hub, "ENDPOINT", None) or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def offline_set() -> bool:
    """Whether the user asked for offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's endpoint opens (asked once per process). Behind a
    proxy (the *_PROXY variables) a direct connection says nothing, so the Hub counts as reachable."""
    if any(os.environ.get(k) for k in _PROXIES):
        return True
    url = urlparse(_endpoint())
    key = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    if key not in _reachable:
        try:
            socket.create_connection(key, timeout=timeout).close()
            _reachable[key] = True
        except OSError:
            _reachable[key] = False
    return _reachable[key]


@contextlib.contextmanager
def hub_access():
    """Around a load that may reach the Hub. Yields why it runs offline (the cache only), "" when
    it does not, for `offline_hint` to say when the load fails."""
    if offline_set():
        offline = "offline mode is set (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    elif not hub_reachable():
        offline = f"the Hub ({_endpoint()}) cannot be reached from this machine"
    else:
        offline = ""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets", "fsspec")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    switched = []
    if offline:  # read by the libraries at import time, so set on the loaded modules as well
        saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        for module in ("huggingface_hub.constants", "datasets.config"):
            with contextlib.suppress(ImportError):
                __import__(module)
                mod = sys.modules[module]
                for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
                    if hasattr(mod, attr):
                        switched.append((mod, attr, getattr(mod, attr)))
                        setattr(mod, attr, True)
    try:
        yield offline
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for mod, attr, value in reversed(switched):
            setattr(mod, attr, value)
        if offline:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def offline_hint(offline: str) -> str:
    """The end of a failed hub load's message, given what `hub_access` yielded."""
    if offline:
        return f"{offline} and it is not in the local cache"
    return "check the name, or set HF_HUB_OFFLINE=1 to use the local cache only"


def download_hint(path: str) -> str:
    """For a model path that does not exist but reads as a Hub id (OWNER/NAME, OWNER not a local
    folder): how to get it, as moelab reads models from local directories only; '' otherwise."""
    owner = path.partition("/")[0]
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", path) or os.path.exists(owner):
        return ""  # not an id, or a path under a local folder (runs/NAME)
    return f"; to use the Hub model {path}, download it first (hf download {path} --local-dir DIR) and give DIR"
