"""Token-weighted validation metrics.

loss = mean next-token NLL (nats) over all target tokens; perplexity = exp(loss);
accuracy = share of targets that are the argmax; bits per byte = total NLL / ln 2 / total UTF-8
bytes of the target tokens (EOS counts 0 bytes but its NLL is kept: a conservative figure).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

# Logits per chunk of positions (fp32: 16 MiB; its log-softmax as much again). All of a batch's
# at once were 2 x 4 x B x S x V bytes: 10 GB for `moelab eval` of a 152K-vocabulary model
# (Qwen3) at its default 8 x 1024 tokens, 13 GB for the tiny preset's 1597 windows in one batch.
CHUNK_LOGITS = 1 << 22


def score_tokens(out, h_ND: torch.Tensor, y_N: torch.Tensor, vocab_size: int,
                 chunk_logits: int = CHUNK_LOGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood of targets `y_N` (fp64), how many of them are the argmax)
    at hidden states `h_ND` of the model output `out`, projecting `chunk_logits` logits at a time
    (whole positions)."""
    nll = torch.zeros((), dtype=torch.float64, device=h_ND.device)
    hits = torch.zeros((), dtype=torch.int64, device=h_ND.device)
    rows = max(1, chunk_logits // vocab_size)
    for h_cD, y_c in zip(h_ND.split(rows), y_N.split(rows)):
        logits = out.project(h_cD).float()
        nll += F.cross_entropy(logits, y_c, reduction="sum").double()
        hits += argmax_hits(logits, y_c)
    return nll, hits


def argmax_hits(logits_NV: torch.Tensor, y_N: torch.Tensor) -> torch.Tensor:
    """How many rows' argmax (the first maximum, as `argmax` picks; NaN counts as the maximum) is
    the target: `(logits.argmax(-1) == y).sum()`. On CPU, argmax runs only on the rows whose target
    logit is the maximum (or that hold a NaN), the only rows that can count: argmax over a 512 x
    8192 chunk took 2.2 ms against amax's 0.1 (2 cores), a tenth of `moelab eval`'s time."""
    if logits_NV.device.type != "cpu":  # fast there; selecting rows would sync the device
        return (logits_NV.argmax(-1) == y_N).sum()
    top_N = logits_NV.amax(-1)
    rows = ((logits_NV.gather(1, y_N[:, None])[:, 0] == top_N) | top_N.isnan()).nonzero()[:, 0]
    return (logits_NV[rows].argmax(-1) == y_N[rows]).sum()


def spread_windows(windows, n: int):
    """n evenly spaced windows (all when n <= 0 or there are fewer): a fixed, representative subset."""
    if n <= 0 or len(windows) <= n:
        return windows
    return windows[torch.linspace(0, len(windows) - 1, n).long().unique()]


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int,
             device: torch.device, autocast_dtype: torch.dtype | None = None,
             chunk_logits: int = CHUNK_LOGITS, part: tuple[int, int] = (0, 1), reduce=None) -> dict:
    """Metrics over `windows` (N, S + 1) in batches of `batch_size` windows; the logits are
    formed `chunk_logits` at a time (whole positions), never for the whole batch.

    Split over processes (data parallel): `part` = (i, n) evaluates the i-th of n contiguous runs
    of whole batches, the batches one process would form, and `reduce` sums a tensor over the
    processes in place: every one returns the metrics of all the windows."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nll, correct, bytes, tokens
    n_tokens = 0
    token_bytes = token_bytes.to(device)
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    n_batches = -(-windows.shape[0] // batch_size)
    i, n = part
    for b in range(i * n_batches // n, (i + 1) * n_batches // n):
        w = windows[b * batch_size:(b + 1) * batch_size].to(device)
        x, y = w[:, :-1], w[:, 1:]
        with ctx:
            out = model(x, logits=False)
            batch_nll, batch_hits = score_tokens(out, out.hidden.flatten(0, 1), y.flatten(), model.cfg.vocab_size,
                                                 chunk_logits)
        sums[:3] += torch.stack([batch_nll, batch_hits.double(), token_bytes[y].sum().double()])
        n_tokens += y.numel()
    sums[3] = n_tokens  # one write, not a host-to-device copy per batch
    model.train(was_training)
    if reduce is not None:
        reduce(sums)
    nll, correct, n_bytes, n_tokens = sums.tolist()
    loss = nll / max(n_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": correct / max(n_tokens, 1),
            "bpb": nll / math.log(2) / max(n_bytes, 1.0), "tokens": int(n_tokens)}
