"""Shuffle-BN for momentum key encoders (MoCo, He et al. 2020, §3.3 "Shuffling BN").

With BatchNorm, the statistics of a batch leak which samples share it: a query and its positive key encoded in
the same BN batch let the model find the positive through the batch statistics ("cheat" the pretext task) rather
than through a good representation. MoCo's fix: the key encoder sees a batch whose BN groups differ from the
query encoder's. Here:

- the key batch is put in a random order and split into `groups` sub-batches, each normalised with its own BN
  statistics, and the keys are put back in the original order. One process with groups = 8 is the
  single-process equivalent of MoCo's 8 GPUs, each normalising its share of a shuffled batch;
- `groups` counts the BN groups of the GLOBAL key batch (issue 23, defect 7): under DDP each rank normalises
  groups / world size of them (at least 1), so `shuffle_bn_groups: 8` gives MoCo's 8 groups of 32 keys whether
  it runs as one process or as 8 ranks of 32 (per rank it gave 8 x 8 groups of 4). The batch is first gathered
  from every rank and shuffled across ranks (MoCo's `_batch_shuffle_ddp`): each rank encodes a random slice of
  the global batch (in its own groups), the keys are gathered back and unshuffled, and each rank keeps its own
  rows. A group's statistics stay on its rank, as MoCo's per-GPU BN ("we perform BN on the samples
  independently for each GPU", MoCo §3.3): the MoCo family is never SyncBN-converted (`SYNC_BN = False` on
  MoCoV2 and LeOCLR, read by the trainer).

The groups are one forward pass, not `groups` passes: the shuffled rows are laid out interleaved (row i * G + g
belongs to group g), so a (B, C, ...) activation viewed as (B / G, G * C, ...) holds each group's channels as
channels of their own, and one BatchNorm call over that view gives every group its own statistics. The
convolutions and the MLP see the whole batch as the query encoder does (on CPU the eight 1/8-batch passes cost
~13 % of a MoCo-v2 step). The key encoder's running statistics, which nothing evaluates, take the mean of the
groups' update.

The permutation comes from a generator seeded by the caller's step (the same on every rank, so it needs no
broadcast, and a resumed run draws the same permutations); the global RNG is untouched, so switching Shuffle-BN
off gives back the plain key encoder bit for bit. It is drawn on the host (the same bits on any device and rank)
and copied to the device from pinned memory without blocking (issue 23, defect 6).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.transfer import to_device
from pipeline.schema import Bool, Int, Validator
from pipeline import dist

SEED = 20_200_313  # base of the permutation seeds (any constant: only its sameness across ranks matters)


def shuffle_bn_params() -> dict[str, Validator]:
    """`shuffle_bn` (on in MoCo and what builds on it), `shuffle_bn_groups`: BN sub-batches of the global key batch."""
    return {"shuffle_bn": Bool(), "shuffle_bn_groups": Int(1)}


SHUFFLE_BN_DEFAULTS = {"shuffle_bn": True, "shuffle_bn_groups": 8}  # MoCo's 8 GPUs


def permutation(n: int, seed: int, device) -> torch.Tensor:
    return to_device(torch.randperm(n, generator=torch.Generator().manual_seed(SEED + seed)), device)


def groups_per_rank(groups: int, world: int) -> int:
    """The BN groups one rank's key batch is split into when `groups` is the global count."""
    return max(1, groups // world)


def sync_bn_applies(method: nn.Module, train_cfg: dict, device: torch.device) -> bool:
    """Whether the trainer turns `method`'s BatchNorms into SyncBatchNorm: `train.sync_bn` under DDP on CUDA
    (SyncBatchNorm has no CPU kernel: gloo runs keep per-rank BN), unless the method keeps BN per GPU
    (`SYNC_BN = False`: the MoCo family, MoCo §3.3)."""
    return bool(train_cfg["sync_bn"]) and torch.device(device).type == "cuda" and dist.is_dist() and method.SYNC_BN


def bn_groups(n: int, groups: int) -> int:
    """The groups a batch of n rows is split into: the most, up to `groups`, that divide n into equal groups of
    at least 2 rows (BN needs two samples)."""
    return max(g for g in range(1, max(1, min(groups, n // 2)) + 1) if n % g == 0)


def _grouped_forward(bn: nn.modules.batchnorm._BatchNorm, groups: int):
    """bn's forward on an interleaved batch (row i * groups + g in group g): each group its own statistics."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not bn.training:
            return type(bn).forward(bn, x)
        c = x.shape[1]
        momentum, running = bn.momentum, bn.track_running_stats and bn.running_mean is not None
        if running:
            bn.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        mean = bn.running_mean.repeat(groups) if running else None
        var = bn.running_var.repeat(groups) if running else None
        rep = lambda t: None if t is None else t.repeat(groups)  # noqa: E731
        y = F.batch_norm(x.reshape(x.shape[0] // groups, groups * c, *x.shape[2:]), mean, var, rep(bn.weight),
                         rep(bn.bias), True, 0.0 if momentum is None else momentum, bn.eps)
        if running:
            bn.running_mean.copy_(mean.view(groups, c).mean(0))
            bn.running_var.copy_(var.view(groups, c).mean(0))
        return y.reshape(x.shape)
    return forward


@contextlib.contextmanager
def grouped_batchnorm(modules: Iterable[nn.Module], groups: int) -> Iterator[None]:
    """Inside, every BatchNorm of `modules` normalises `groups` interleaved groups separately (module doc)."""
    bns = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if groups > 1:
        for bn in bns:
            bn.forward = _grouped_forward(bn, groups)
    try:
        yield
    finally:
        for bn in bns:
            bn.__dict__.pop("forward", None)


def encode_in_groups(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: int,
                     modules: Iterable[nn.Module]) -> torch.Tensor:
    """encode(x), the BN layers of `modules` normalising `bn_groups(len(x), groups)` consecutive sub-batches of
    x separately, in one pass over the rows laid out interleaved."""
    g = bn_groups(x.shape[0], groups)
    if g == 1:
        return encode(x)
    layout = torch.arange(x.shape[0], device=x.device).view(g, -1).t().reshape(-1)  # group-major -> interleaved
    with grouped_batchnorm(modules, g):
        out = encode(x[layout])
    return torch.empty_like(out).index_copy_(0, layout, out)


@torch.no_grad()
def shuffled_encode(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: int,
                    seed: int, modules: Iterable[nn.Module] = ()) -> torch.Tensor:
    """encode(x) with Shuffle-BN over the BatchNorms of `modules`: rows in, keys out in the same order; see the
    module doc."""
    modules = list(modules)
    if not dist.is_dist():
        perm = permutation(x.shape[0], seed, x.device)
        keys = encode_in_groups(encode, x[perm], groups, modules)
        return torch.empty_like(keys).index_copy_(0, perm, keys)
    b, r = x.shape[0], dist.rank()
    everyone = dist.gather_no_grad(x)                  # (W * B, ...), rank order: equal batches per rank
    perm = permutation(everyone.shape[0], seed, x.device)
    local_groups = groups_per_rank(groups, dist.world_size())
    keys = dist.gather_no_grad(encode_in_groups(encode, everyone[perm[r * b:(r + 1) * b]], local_groups, modules))
    return torch.empty_like(keys).index_copy_(0, perm, keys)[r * b:(r + 1) * b]
