"""Distributed helpers (torchrun + DDP). Every cross-sample operation in a method goes through here.

All functions are no-ops / identities in a single process, so methods are written once for both.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); NCCL on CUDA, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_dist():
        return is_dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=collective_timeout())
    return True


def collective_timeout():
    """How long a collective waits for a rank that stopped answering before it fails (instead of hanging a
    job for torch's default 10-30 min, or for ever where a peer hangs rather than dies): a runtime setting,
    `SSLPIPE_DIST_TIMEOUT_S` (default 1800 s, above the longest pause of rank 0 alone: the kNN monitor)."""
    from datetime import timedelta

    return timedelta(seconds=float(os.environ.get("SSLPIPE_DIST_TIMEOUT_S", 1800)))


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0; gradients flow back to each rank's own slice
    (the backward is a reduce-scatter, so each rank receives the sum over all ranks' losses)."""
    if not is_dist():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0, in rank order (for queues and support sets)."""
    if not is_dist():
        return x
    x = x.contiguous()   # sent and received alike: an empty_like of a channels_last batch would not be
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Autograd-aware sum over ranks (the backward sums gradients too, so no 1/world_size error)."""
    if not is_dist():
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)


@torch.no_grad()
def all_reduce_mean_(x: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks of a statistic that carries no gradient (e.g. the DINO centre)."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


def barrier() -> None:
    if is_dist():
        dist.barrier()
