"""Training stream over webdataset shards, split across DDP ranks and DataLoader workers.

Every (rank, worker) slot reads its own share of the shards (re-dealt each epoch from a seeded
permutation; a slot with no shard of its own resamples one), cycles through them as often as needed,
and produces exactly its share of a fixed number of batches per epoch: every rank sees the same number
of steps (DDP never hangs) whatever the shard sizes. Batches are formed inside the workers and the
augmentation RNG is seeded per (seed, epoch, rank, batch), so a run resumed mid-epoch skips the
batches it already trained on (without decoding them) and continues with identical data.

SePP-ID (§3.2, Fig. 6, eq. 2 with lambda = 1): a run with pairs also reads the pair shards of the mine
stage. They are dealt, cycled and shuffled exactly like the train shards, and an epoch is as many samples
as there are originals plus pairs: every original image (two views of one image) and every pair (view 0
of the anchor, view 1 of its semantic positive, any further views of the anchor) once per epoch; exactly
once with one reader and no shuffle buffer, while the buffer and uneven shard dealing move a few samples
across epoch boundaries, as they do for the originals. The base method's loss then treats each pair like
any positive pair. Without pairs the stream is the plain one, unchanged.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.shards import group_samples, image_of, index_of_key, pair_info, pair_shard_paths, read_meta, shard_paths
from pipeline.data.views import View, ViewSpec
from pipeline.utils import mix_seed as _mix


@dataclass
class Batch:
    views: list[torch.Tensor]       # one (B, C, H, W) tensor per view spec
    geometry: list[torch.Tensor]    # one (B, 5) tensor per view: top, left, height, width, flipped
    label: torch.Tensor             # for diagnostics only; methods must not read it
    index: torch.Tensor             # dataset index of each image (of the anchor, for a pair)
    positive: torch.Tensor | None = None  # image behind view 1 (== index unless a SePP-ID pair); diagnostics only

    def to(self, device, channels_last: bool = False) -> "Batch":
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return Batch([v.to(device, non_blocking=True, memory_format=fmt) for v in self.views],
                     [g.to(device) for g in self.geometry], self.label.to(device), self.index.to(device),
                     None if self.positive is None else self.positive.to(device))


def batches_per_epoch(n_samples: int, batch_size: int) -> int:
    n = n_samples // batch_size
    if n == 0:
        from pipeline.params import ParamError

        raise ParamError(f"train.batch_size: {batch_size} is larger than the {n_samples} training images")
    return n


class ShardStream(IterableDataset):
    """Yields whole `Batch`es of `local_batch` images; use with DataLoader(batch_size=None)."""

    def __init__(self, shard_dir: str | Path, views: list[ViewSpec], mean, std, local_batch: int, n_samples: int,
                 global_batch: int, seed: int, rank: int = 0, world_size: int = 1, subset: int = 0,
                 shuffle_buffer: int = 2000, split: str = "train", pairs_dir: str | Path | None = None):
        self.paths = [str(p) for p in shard_paths(shard_dir, split)]
        self.views = [View(v, mean, std) for v in views]
        self.local_batch, self.seed, self.rank, self.world = local_batch, seed, rank, world_size
        self.subset, self.shuffle_buffer = subset, shuffle_buffer
        self.epoch, self.skip = 0, 0
        self.per_shard = read_meta(shard_dir)["samples_per_shard"]
        if subset:
            # the train shards are in seeded random order, so their first `subset` samples are a random subset
            self.paths = self.paths[: -(-subset // self.per_shard)]
            n_samples = min(n_samples, subset)
        self.shard_index = {p: k for k, p in enumerate(self.paths)}
        self.n_samples = n_samples
        self.n_pairs = 0
        if pairs_dir is not None:
            # pair shards join the train shards' list: same dealing, cycling and shuffling; no subset applies
            pair_paths, self.n_pairs = pair_shard_paths(pairs_dir)
            self.paths += [str(p) for p in pair_paths]
        self.steps = batches_per_epoch(n_samples + self.n_pairs, global_batch)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        return self.steps - self.skip

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _my_shards(self, worker: int, n_workers: int) -> list[str]:
        rng = random.Random(_mix(self.seed, self.epoch, 7))
        order = self.paths[:]
        rng.shuffle(order)
        slots = self.world * n_workers
        slot = self.rank * n_workers + worker
        mine = order[slot::slots]
        return mine or [order[_mix(self.seed, self.epoch, slot) % len(order)]]

    def _read(self, path: str):
        k = self.shard_index.get(path)  # None for a pair shard
        for j, s in enumerate(group_samples(Path(path))):
            if self.subset and k is not None and k * self.per_shard + j >= self.subset:
                return
            yield s

    def _samples(self, shards: list[str], worker: int):
        """Endless stream of raw samples from `shards`: each pass reshuffled, through a shuffle buffer."""
        rng = random.Random(_mix(self.seed, self.epoch, self.rank, worker, 11))
        buf: list[dict] = []
        while True:
            order = shards[:]
            rng.shuffle(order)
            for path in order:
                for s in self._read(path):
                    if len(buf) < self.shuffle_buffer:
                        buf.append(s)
                        continue
                    i = rng.randrange(len(buf))
                    yield buf[i]
                    buf[i] = s

    def __iter__(self):
        worker, n_workers = self._slot()
        mine = [b for b in range(self.steps) if b % n_workers == worker]
        stream = self._samples(self._my_shards(worker, n_workers), worker)
        for b in mine:
            raw = [next(stream) for _ in range(self.local_batch)]
            if b < self.skip:
                continue
            # per-batch seed: a resumed run reproduces batch b without replaying the ones before it;
            # fork_rng keeps the main process's RNG untouched when there are no workers
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, self.epoch, self.rank, b))
                batch = self._make_batch(raw)
            yield batch

    def _make_batch(self, raw: list[dict]) -> Batch:
        outs = [[] for _ in self.views]
        geos = [[] for _ in self.views]
        labels, index, positive = [], [], []
        for s in raw:
            pair = pair_info(s)
            if pair is None:
                img = second = image_of(s)
                labels.append(int(s["cls"]))
                index.append(index_of_key(s["__key__"]))
                positive.append(index[-1])
            else:  # SePP-ID: view 1 from the semantic positive, every other view from the anchor
                img, second = image_of(s, "anchor."), image_of(s, "positive.")
                labels.append(pair["anchor_label"])
                index.append(pair["anchor"])
                positive.append(pair["positive"])
            for k, view in enumerate(self.views):
                x, g = view(second if k == 1 else img)
                outs[k].append(x)
                geos[k].append(g)
        return Batch([view.batch(torch.stack(o)) for view, o in zip(self.views, outs)], [torch.stack(g) for g in geos],
                     torch.tensor(labels), torch.tensor(index), torch.tensor(positive))


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """One batch per worker fetch. Workers are respawned per epoch (cheap: they hold no state)."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None, persistent_workers=False)
