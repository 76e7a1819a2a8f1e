"""Data-parallel training over the processes `torchrun` starts (gloo on CPU, NCCL on CUDA).

    torchrun --nproc_per_node 2 -m moelab train --preset exp3 ...

N ranks train what one process trains with the same settings, to float rounding:
- `train.batch_size` stays the global micro-batch: each rank takes its 1/N of every batch the
  (shared, resumable) loader draws, so the data order and a checkpoint's loader position do not
  depend on N, and a run may resume on another number of ranks.
- gradients are averaged over ranks once per update (flat buckets), before clipping;
- the load-balancing loss uses the expert shares of the whole micro-batch (counts summed over
  ranks in the forward), not of each rank's part, and the aux-loss-free bias update the counts
  of the whole update; capacity (Switch) is per rank, as in any data-parallel MoE;
- the logged losses, the NaN/spike guard's inputs and a stop request (SIGTERM, Ctrl-C) are
  agreed across ranks, so every rank skips, stops and saves at the same update.
Rank 0 does what writes: the run directory, data preparation, checkpoints, metrics, reports;
the other ranks wait for its set-up, then read what it wrote. Evaluation is split: each rank
scores its 1/N of the batches one process would form, and the sums are added over ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from moelab.errors import UserError

BUCKET_ELEMENTS = 1 << 24  # gradients are averaged in flat buffers of at most 16M elements


def launched() -> bool:
    """Started by torchrun (or another launcher setting WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def processes_sharing(device: torch.device) -> int:
    """How many of the run's processes hold their state in `device`'s memory: on CPU, those torchrun
    started on this machine (LOCAL_WORLD_SIZE); a GPU is each process's own."""
    if device.type != "cpu" or not launched():
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (LOCAL_RANK) where the run is on CUDA."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device: torch.device, timeout_s: float = 6 * 3600.0) -> bool:
    """Join the process group torchrun describes (MASTER_ADDR, RANK, ...); True if this call did.
    CPU tensors go over gloo; CUDA tensors over NCCL. The timeout is long: the other ranks wait in
    a collective while rank 0 prepares a corpus or runs the final evaluation (torchrun stops every
    rank as soon as one fails, so a failure does not wait for it)."""
    if not launched() or active():
        return False
    if not dist.is_available():
        raise UserError("this torch has no torch.distributed: run moelab train as one process (without torchrun)")
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(obj, src: int = 0):
    """`obj` of rank `src`, on every rank (a small Python object: paths, a config, a message)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def local_rows(n: int) -> slice:
    """This rank's part of a global batch of n rows."""
    w, r = world(), rank()
    if n % w:
        raise UserError(f"train.batch_size={n} does not split evenly over {w} processes; "
                        f"use a multiple of {w}")
    return slice(r * n // w, (r + 1) * n // w)


def sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op in one process)."""
    if active():
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def batch_share(counts_E: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Each expert's share of the whole micro-batch's slots: counts summed over ranks (every rank
    routes the same number of slots), as one process routing the whole batch would count them.
    Called outside any compiled graph: `torch.compiler.disable(batch_share)` where it is installed
    (a decorator here would import torch._dynamo, 1.5 s, in every command that imports the loop)."""
    total = counts_E.clone()
    dist.all_reduce(total)
    return total.float() / max(n_slots * dist.get_world_size(), 1)


@torch.no_grad()
def average_gradients(params) -> None:
    """Every parameter's gradient averaged over ranks, in flat buckets of one dtype and device. A
    parameter with a gradient on some rank only (an input no token of this rank reached) gets
    zeros for it on the others; one with none on any rank keeps none, as in one process."""
    if not active():
        return
    w = dist.get_world_size()
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal bucket, size
        if bucket:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat.div_(w)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        bucket, size = [], 0

    for p, any_grad in zip(params, has.tolist()):
        if not any_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if bucket and (size + p.numel() > BUCKET_ELEMENTS or p.grad.dtype != bucket[0].dtype
                       or p.grad.device != bucket[0].device):
            flush()
        bucket.append(p.grad)
        size += p.numel()
    flush()
