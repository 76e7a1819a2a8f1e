"""Whether a model can fit in the memory of the device at all: its training state, checked before a
run prepares data or allocates anything; its fp32 weights, checked before a model is loaded.

Without it, a preset too large for the machine (`moelab train --preset mixtral-8x7b` on a laptop)
prepared its data for a minute and a half, then the kernel killed the process while it built the
model: no message, exit 137. The check uses a lower bound of what training holds whatever the batch
(fp32 weights, their gradients, the optimizer's state), so it never refuses a run that would fit;
activations, temporaries and checkpoint copies come on top.

Activations depend on the batch, and a micro-batch too large for a CPU got the same silent kill at
its first update (`--preset exp3 train.seq_len=2048 train.batch_size=64`, 25 GB of activations on a
24 GB machine). So once the model is built, `check_update_fits` measures what a forward keeps for
the backward on two short sequences, extrapolates it to the micro-batch (a lower bound again) and
refuses one that cannot fit, naming the split of the batch that would. On a GPU running out is an
error the training loop reports at once, so the check is for CPU only.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from pathlib import Path

import torch

from moelab.cgroups import memory_headroom
from moelab.errors import UserError

MIN_VOCAB = 260  # the smallest vocabulary a run can have (256 bytes + specials): a lower bound
GB = 1e9
MARGIN = 0.95  # activation_bytes' line, lowered for what the routing of its random tokens moves


def training_state_bytes(model, mode: str) -> dict[str, int]:
    """Bytes of the fp32 weights, their gradients and the optimizer state of `model` (meta is fine)
    under optim.mode `mode`: Muon keeps one momentum buffer per parameter, AdamW two moments."""
    from moelab.optim.groups import split_params

    n = {k: sum(p.numel() for _, p in v) for k, v in split_params(model, mode).items()}
    total = sum(n.values())
    return {"parameters": total, "weights": 4 * total, "gradients": 4 * total,
            "optimizer": 4 * n["muon"] + 8 * (n["adamw_decay"] + n["adamw_no_decay"]),
            "buffers": buffer_bytes(model)}


def buffer_bytes(model) -> int:
    """The model's buffers: RoPE tables (model.max_seq_len rows: a long context's are not small),
    selection biases."""
    return sum(b.numel() * b.element_size() for b in model.buffers())


def fused_loss_bytes(model, n_rows: int, autocast=contextlib.nullcontext) -> int | None:
    """What the fused projection + loss (moelab.models.loss) keeps for the backward over n_rows
    positions: dh (n_rows x D, in the dtype the head runs in) and dw (the head's shape, fp32 or
    wider). None for a head the model does not fuse (an adapter's, a sharded one)."""
    if not model.fuses_loss:
        return None
    w = model.lm_head.weight
    with autocast():
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
    acc = torch.promote_types(dtype, torch.float32)
    return n_rows * w.shape[1] * dtype.itemsize + w.numel() * torch.promote_types(acc, w.dtype).itemsize


def saved_activation_bytes(model, batch_size: int, n_tokens: int, autocast=contextlib.nullcontext,
                           generator: torch.Generator | None = None, count_head: bool = False) -> int:
    """Bytes of the tensors one training forward and loss on a (batch_size, n_tokens) batch of
    random ids keep for the backward: the storages the autograd graph holds, each counted once,
    without the parameters and buffers (allocated already). `count_head`: the fused projection
    and loss are not run but counted (`fused_loss_bytes`): at a 152K vocabulary they are most of
    the forward's time (most of all in bf16 on a CPU without bf16 matmul instructions: 95 s of the
    Qwen3-0.6B measure on an AVX2 EPYC), and what they keep is known exactly."""
    counted = fused_loss_bytes(model, batch_size * n_tokens, autocast) if count_head else None
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: list[weakref.ref] = []

    def pack(t):
        saved.append(weakref.ref(t))  # alive while the graph holds it
        return t

    device = next(model.parameters()).device
    ids = torch.randint(0, model.cfg.vocab_size, (2, batch_size, n_tokens), generator=generator).to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        out = model(ids[0], targets=ids[1]) if counted is None else model(ids[0], logits=False)
    # counted once the forward is done, over what is still held: counted as saved, a storage the
    # graph had freed (a branch no output needs) and another allocated at its address later were
    # taken for one, so the sum moved by some KB with the allocator's state
    held: dict[int, int] = {}
    t = None
    for ref in saved:
        if (t := ref()) is not None and (s := t.untyped_storage()).data_ptr() not in own:
            held[s.data_ptr()] = max(held.get(s.data_ptr(), 0), s.nbytes())
    del out, t  # the graph and what it holds
    return sum(held.values()) + (counted or 0)


def activation_bytes(model, batch_size: int, seq_len: int, autocast=contextlib.nullcontext) -> dict[str, int]:
    """A lower bound of what one training micro-batch of batch_size x seq_len tokens keeps for the
    backward, measured on one sequence of T1 tokens and one of T2 (T1 + T2 <= seq_len where seq_len
    allows; the shorter is the longer's first half, so causal layers route its tokens alike).

    What a forward keeps grows with the tokens linearly (or, for attention without a fused kernel,
    quadratically) above a constant part (copies made once per step, as the fused expert weights),
    so its secant through T1 and T2 stays below it from T1 + T2 on. Which experts the random tokens
    reach moves a few sizes by some KB either way, so the line is lowered by `MARGIN`:
    `constant` + batch_size * seq_len * `per_token` <= the true amount. The global RNG state is
    left as it was (a resumed run's must match the uninterrupted one's), and the weights too."""
    t2 = max(2, min(128, seq_len // 2))
    t1 = t2 // 2
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            small, large = (saved_activation_bytes(model, 1, t, autocast, torch.Generator().manual_seed(0),
                                                   count_head=True) for t in (t1, t2))
    finally:
        model.train(was_training)
    per_token = int(MARGIN * max(large - small, 0) / (t2 - t1))
    constant = int(MARGIN * max(small - (large - small) / (t2 - t1) * t1, 0))
    return {"per_token": per_token, "constant": constant, "total": constant + batch_size * seq_len * per_token}


def _fmt_gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def check_update_fits(model, optimizer, t, device: torch.device, autocast=contextlib.nullcontext) -> None:
    """UserError when one update of `model` with training settings `t` (batch_size, seq_len,
    grad_accum) cannot fit in what the CPU has available now that the model is built: the
    gradients and optimizer state not yet allocated plus a lower bound of one micro-batch's
    activations. The message names the largest split of the batch (same tokens per update) whose
    activations would fit by the same bound. GPUs are not checked (out of memory there is an
    error, reported at once with advice)."""
    if device.type != "cpu":
        return
    available = available_bytes(device)
    if available is None:
        return
    params = list(model.parameters())
    grads = sum(4 * p.numel() for p in params if p.grad is None)
    state = sum(t_.nbytes for o in optimizer.optimizers for st in o.state.values() for t_ in st.values()
                if torch.is_tensor(t_))
    opt = max(training_state_bytes(model, optimizer.mode)["optimizer"] - state, 0)
    act = activation_bytes(model, t.batch_size, t.seq_len, autocast)
    if grads + opt + act["total"] <= available:
        return
    room = available - grads - opt - act["constant"]  # for batch_size * seq_len * per_token
    most = min(room // max(t.seq_len * act["per_token"], 1), t.batch_size - 1) if room > 0 else 0
    smaller = next((b for b in range(most, 0, -1) if t.batch_size % b == 0), None)
    tips = []
    if smaller:
        tips.append(f"train.batch_size={smaller} train.grad_accum={t.grad_accum * t.batch_size // smaller} "
                    "(same tokens per update)")
    elif t.seq_len > 2:
        tips.append("a shorter train.seq_len")
    if not t.activation_checkpointing:
        tips.append("train.activation_checkpointing=true")
    if t.precision == "fp32":
        tips.append("train.precision=bf16")
    raise UserError(
        f"train.batch_size={t.batch_size} x train.seq_len={t.seq_len} cannot fit on this machine: one "
        f"micro-batch's forward keeps at least {_fmt_gb(act['total'])} for the backward "
        f"({act['per_token'] / 1e3:.0f} KB per token, measured), gradients and optimizer state take "
        f"{_fmt_gb(grads + opt)} more, and {_fmt_gb(available)} is available; try " + ", or ".join(tips))


def available_bytes(device: torch.device) -> int | None:
    """Memory this process can still take on `device`: free GPU memory; on CPU, the host's available
    memory and swap (Linux /proc/meminfo), within its cgroups' limits (moelab.cgroups). None if unknown."""
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
    room = memory_headroom()  # a container's or a scheduler job's limit, on any level of its cgroup
    if room is not None:
        known.append(room)
    return min(known) if known else None


def check_training_fits(cfg, device: torch.device, what: str, processes: int = 1) -> None:
    """UserError when the training state of `cfg`'s model alone exceeds what `device` has available
    (`what`: the run, as the message names it). `processes`: how many processes each hold that
    state in this memory (data parallel: the ranks torchrun starts on one CPU machine)."""
    from moelab.models.accounting import build_meta_model

    available = available_bytes(device)
    if available is None:
        return
    probe = copy.deepcopy(cfg)
    probe.resolve(vocab_size=cfg.model.vocab_size or MIN_VOCAB)
    need = training_state_bytes(build_meta_model(probe.model), cfg.optim.mode)
    total = need["weights"] + need["gradients"] + need["optimizer"] + need["buffers"]
    if total * processes <= available:
        return
    where = "this machine" if device.type == "cpu" else str(device)
    each = (f" in each of the {processes} processes on this machine ({total * processes / GB:.1f} GB in all)"
            if processes > 1 else "")
    fewer = ", fewer processes per machine" if processes > 1 else ""
    raise UserError(
        f"{what} cannot fit: training its {need['parameters'] / 1e9:.2f}B parameters needs at least "
        f"{total / GB:.1f} GB (fp32 weights {need['weights'] / GB:.1f} GB, gradients {need['gradients'] / GB:.1f} GB, "
        f"optimizer state {need['optimizer'] / GB:.1f} GB{_rope(need['buffers'])}; activations come on top){each} "
        f"and {where} has {available / GB:.1f} GB available; choose a smaller model (a -tiny preset, or fewer "
        f"model.n_layers, model.n_experts, model.d_model{_shorter(need)}){fewer} or a device with more memory")


def _rope(nbytes: int) -> str:
    """The buffers' part of a memory message, where it is worth naming."""
    return f", RoPE tables {nbytes / GB:.1f} GB" if nbytes >= 0.05 * GB else ""


def _shorter(need: dict) -> str:
    return ", a shorter model.max_seq_len" if need["buffers"] > need["weights"] else ""


class WeightsWontFit(UserError):
    """check_weights_fit's refusal; `fits_in_half`: whether the weights would fit held in bf16/fp16."""

    def __init__(self, message: str, fits_in_half: bool):
        super().__init__(message)
        self.fits_in_half = fits_in_half


def check_weights_fit(model_cfg, device: torch.device | str, what: str, dtype: torch.dtype = torch.float32,
                      read_as: torch.dtype | None = None) -> None:
    """WeightsWontFit (a UserError) when `model_cfg`'s weights alone, held in `dtype` (the routers'
    in fp32 whatever it is: moelab.models.transformer.held_as), exceed what `device` has
    available. `read_as`: the dtype they are read in before they are cast one tensor at a time,
    where wider (a Hugging Face checkpoint: its own dtype); `what`: the model, as the message
    names it."""
    from moelab.models.accounting import build_meta_model
    from moelab.models.transformer import WEIGHT_DTYPES

    device = torch.device(device)
    available = available_bytes(device)
    if available is None:
        return
    meta = build_meta_model(model_cfg)
    read = read_as.itemsize if read_as is not None else 0
    n = sum(p.numel() for p in meta.parameters())
    buffers = buffer_bytes(meta)
    need = held_weight_bytes(meta, dtype, read)  # peak: each tensor read, then cast
    if need + buffers <= available:
        return
    where = "this machine" if device.type == "cpu" else str(device)
    name = {v: k for k, v in WEIGHT_DTYPES.items()}
    wider = f" (read in {name[read_as]}, then cast)" if read > dtype.itemsize else ""
    raise WeightsWontFit(f"{what} cannot fit: its {n / 1e9:.2f}B parameters take {need / GB:.1f} GB in "
                         f"{name[dtype]}{wider}{_rope(buffers)}, and {where} has {available / GB:.1f} GB available; "
                         "use a machine or device with more memory",
                         fits_in_half=dtype.itemsize > 2 and held_weight_bytes(meta, torch.bfloat16, read) + buffers
                         <= available)


def held_weight_bytes(model, dtype: torch.dtype, read: int = 0) -> int:
    """Bytes of `model`'s parameters (meta is fine) held in `dtype`, the routers' in fp32
    (moelab.models.transformer.held_as); `read`: bytes per number they are read in first, where
    more (a checkpoint read whole, then cast one tensor at a time)."""
    from moelab.models.transformer import held_as

    return sum(p.numel() * max(read, held_as(name, dtype).itemsize) for name, p in model.named_parameters())


def memory_rows(model) -> list[tuple[str, int, str]]:
    """(what, bytes, note) for `moelab info`: `model`'s weights held in fp32 and in bf16, and its
    training state (fp32 weights, gradients and optimizer state) under the two optim.modes that
    differ, each with the buffers (RoPE tables). Activations come on top."""
    buffers = buffer_bytes(model)
    rows = [("weights, fp32", held_weight_bytes(model, torch.float32) + buffers,
             "train; eval, generate and routing by default"),
            ("weights, bf16", held_weight_bytes(model, torch.bfloat16) + buffers,
             "eval, generate and routing with --dtype bf16 (routers fp32)")]
    for mode, how in (("hybrid", "Muon momentum and AdamW moments"), ("adamw", "AdamW moments")):
        need = training_state_bytes(model, mode)
        rows.append((f"training, optim.mode={mode}", need["weights"] + need["gradients"] + need["optimizer"] + buffers,
                     f"fp32 weights, gradients, {how}; activations on top"))
    return rows
