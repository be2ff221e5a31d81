"""Shuffle-BN for momentum key encoders (MoCo, He et al. 2020, §3.3 "Shuffling BN").

With BatchNorm, the statistics of a batch leak which samples share it: a query and its positive key encoded in
the same BN batch let the model find the positive through the batch statistics ("cheat" the pretext task) rather
than through a good representation. MoCo's fix: the key encoder sees a batch whose BN groups differ from the
query encoder's. Here:

- the key batch is put in a random order, split into `groups` sub-batches, each encoded by its own forward pass
  (its own BN statistics), and the keys put back in the original order. One process with groups = 8 is the
  single-process equivalent of MoCo's 8 GPUs, each normalising its share of a shuffled batch;
- under DDP the batch is first gathered from every rank and shuffled across ranks (MoCo's
  `_batch_shuffle_ddp`): each rank encodes a random slice of the global batch (in its own groups), the keys
  are gathered back and unshuffled, and each rank keeps its own rows. With SyncBN (CUDA DDP) a group's
  statistics span the ranks, so each group is a random subset of the global batch: still a different grouping
  from the queries' (the whole global batch).

The permutation comes from a generator seeded by the caller's step (the same on every rank, so it needs no
broadcast, and a resumed run draws the same permutations); the global RNG is untouched, so switching Shuffle-BN
off gives back the plain key encoder bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.schema import Bool, Int, Validator
from pipeline import dist

SEED = 20_200_313  # base of the permutation seeds (any constant: only its sameness across ranks matters)


def shuffle_bn_params() -> dict[str, Validator]:
    """`shuffle_bn` (on in MoCo and what builds on it), `shuffle_bn_groups`: BN sub-batches per rank's key batch."""
    return {"shuffle_bn": Bool(), "shuffle_bn_groups": Int(1)}


SHUFFLE_BN_DEFAULTS = {"shuffle_bn": True, "shuffle_bn_groups": 8}  # MoCo's 8 GPUs


def permutation(n: int, seed: int, device) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED + seed)).to(device)


def encode_in_groups(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: int) -> torch.Tensor:
    """`encode` on `groups` consecutive sub-batches of x, each with its own BN statistics (at least 2 rows each:
    BN needs two samples), concatenated."""
    groups = max(1, min(groups, x.shape[0] // 2))
    return torch.cat([encode(part) for part in x.tensor_split(groups)])


@torch.no_grad()
def shuffled_encode(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: int,
                    seed: int) -> torch.Tensor:
    """encode(x) with Shuffle-BN: rows in, keys out in the same order; see the module doc."""
    if not dist.is_dist():
        perm = permutation(x.shape[0], seed, x.device)
        keys = encode_in_groups(encode, x[perm], groups)
        return torch.empty_like(keys).index_copy_(0, perm, keys)
    b, r = x.shape[0], dist.rank()
    everyone = dist.gather_no_grad(x)                  # (W * B, ...), rank order: equal batches per rank
    perm = permutation(everyone.shape[0], seed, x.device)
    keys = dist.gather_no_grad(encode_in_groups(encode, everyone[perm[r * b:(r + 1) * b]], groups))
    return torch.empty_like(keys).index_copy_(0, perm, keys)[r * b:(r + 1) * b]
