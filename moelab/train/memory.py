"""Whether a model can fit in the memory of the device at all: its training state, checked before a
run prepares data or allocates anything; its fp32 weights, checked before a model is loaded.

Without it, a preset too large for the machine (`moelab train --preset mixtral-8x7b` on a laptop)
prepared its data for a minute and a half, then the kernel killed the process while it built the
model: no message, exit 137. The check uses a lower bound of what training holds whatever the batch
(fp32 weights, their gradients, the optimizer's state), so it never refuses a run that would fit;
activations, temporaries and checkpoint copies come on top, and a run near the limit can still run
out later.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from moelab.errors import UserError

MIN_VOCAB = 260  # the smallest vocabulary a run can have (256 bytes + specials): a lower bound
GB = 1e9


def training_state_bytes(model, mode: str) -> dict[str, int]:
    """Bytes of the fp32 weights, their gradients and the optimizer state of `model` (meta is fine)
    under optim.mode `mode`: Muon keeps one momentum buffer per parameter, AdamW two moments."""
    from moelab.optim.groups import split_params

    n = {k: sum(p.numel() for _, p in v) for k, v in split_params(model, mode).items()}
    total = sum(n.values())
    return {"parameters": total, "weights": 4 * total, "gradients": 4 * total,
            "optimizer": 4 * n["muon"] + 8 * (n["adamw_decay"] + n["adamw_no_decay"])}


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def available_bytes(device: torch.device) -> int | None:
    """Memory this process can still take on `device`: free GPU memory; on CPU, the host's available
    memory and swap (Linux /proc/meminfo), within the cgroup's limit (containers). None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    known = []
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        known.append(1024 * (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])))
    except (OSError, KeyError, ValueError):
        pass
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:  # v1 says "no limit" with a huge number
            known.append(max(cap - used, 0))
    return min(known) if known else None


def check_training_fits(cfg, device: torch.device, what: str) -> None:
    """UserError when the training state of `cfg`'s model alone exceeds what `device` has available
    (`what`: the run, as the message names it)."""
    from moelab.models.accounting import build_meta_model

    available = available_bytes(device)
    if available is None:
        return
    probe = copy.deepcopy(cfg)
    probe.resolve(vocab_size=cfg.model.vocab_size or MIN_VOCAB)
    need = training_state_bytes(build_meta_model(probe.model), cfg.optim.mode)
    total = need["weights"] + need["gradients"] + need["optimizer"]
    if total <= available:
        return
    where = "this machine" if device.type == "cpu" else str(device)
    raise UserError(
        f"{what} cannot fit: training its {need['parameters'] / 1e9:.2f}B parameters needs at least "
        f"{total / GB:.1f} GB (fp32 weights {need['weights'] / GB:.1f} GB, gradients {need['gradients'] / GB:.1f} GB, "
        f"optimizer state {need['optimizer'] / GB:.1f} GB; activations come on top) and {where} has "
        f"{available / GB:.1f} GB available; choose a smaller model (a -tiny preset, or fewer model.n_layers, "
        f"model.n_experts, model.d_model) or a device with more memory")


def check_weights_fit(model_cfg, device: torch.device | str, what: str) -> None:
    """UserError when `model_cfg`'s fp32 weights alone exceed what `device` has available (a loaded
    model is fp32 whatever its file's dtype; `what`: the model, as the message names it)."""
    from moelab.models.accounting import build_meta_model

    device = torch.device(device)
    available = available_bytes(device)
    if available is None:
        return
    n = sum(p.numel() for p in build_meta_model(model_cfg).parameters())
    if 4 * n <= available:
        return
    where = "this machine" if device.type == "cpu" else str(device)
    raise UserError(f"{what} cannot fit: its {n / 1e9:.2f}B parameters take {4 * n / GB:.1f} GB in fp32 and "
                    f"{where} has {available / GB:.1f} GB available; use a machine or device with more memory")
