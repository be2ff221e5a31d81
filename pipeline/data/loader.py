"""Training stream: true epochs over the shards, split across DDP ranks, independent of the worker count.

Epoch e is a seeded permutation of every training sample (the first `train_subset` train images, plus
the SePP-ID pairs when a run has them). Global batch b is positions [b*G, (b+1)*G) of it and rank r
takes its slice [b*G + r*L, b*G + (r+1)*L) (G = global batch, L = G / ranks), so an epoch visits every
sample once and every rank makes the same N // G steps (DDP never hangs; the N mod G leftover samples
differ from epoch to epoch).

Loader workers read the samples they need by random access (`TarIndex`: each member's byte offset and
size, from the tar headers), decode them and cut the crops (crop box and flip kept in `Batch.geometry`
for PW-Self), and hand over uint8 views. The photometric part of the augmentation (colour jitter,
grayscale, blur, solarisation, normalisation, PW-Self's patch augmentation) runs batched on the
training device in `Batch.to` (`pipeline.data.device_augment`). Worker w of W builds the batches t with
t % W == w of the run's sequence of batches, and every random draw of batch b comes from seeds of
(seed, epoch, rank, b): the data of a batch is the same for any `num_workers`, and a run resumed at any
step (`start_at`) continues with identical data without replaying the batches before it.

SePP-ID (§3.2, Fig. 6, eq. 2 with lambda = 1): a pair sample gives view 0 from the anchor, view 1 from
its semantic positive and any further view from the anchor; an original gives every view from itself.
Each original and each pair is visited once per epoch; the base method's loss treats each pair like any
positive pair.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.device_augment import ViewAugment
from pipeline.data.shards import (TarIndex, image_of, index_of_key, pair_info, pair_shard_paths, read_meta,
                                  read_pair_meta, shard_paths)
from pipeline.data.views import View, ViewSpec
from pipeline.errors import DataError
from pipeline.utils import mix_seed as _mix

WORKER_EXIT_WAIT_S = 30.0   # how long a ConnectionError from the loader waits for a dying worker to be seen dead


@dataclass
class Batch:
    views: list[torch.Tensor]       # one (B, C, H, W) tensor per view spec: uint8 until `to` augments them
    geometry: list[torch.Tensor]    # one (B, 5) tensor per view: top, left, height, width, flipped (host)
    label: torch.Tensor             # for diagnostics only; methods must not read it
    index: torch.Tensor             # dataset index of each image (of the anchor, for a pair)
    positive: torch.Tensor | None = None  # image behind view 1 (== index unless a SePP-ID pair); diagnostics only
    epoch: int = 0
    step_in_epoch: int = 0
    seed: int = 0                   # seeds the device-side augmentation of this batch
    augment: list[ViewAugment] | None = None   # per view, still to apply (None: the views are final)

    def pin_memory(self) -> "Batch":
        """DataLoader(pin_memory=True) calls this: page-locked tensors copy to the GPU asynchronously."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return replace(self, views=[v.pin_memory() for v in self.views], label=pin(self.label), index=pin(self.index),
                       positive=pin(self.positive))

    def to(self, device, channels_last: bool = False) -> "Batch":
        """The batch on `device`, ready for the method: the pending photometric augmentation applied there
        (batched, seeded from the batch's own seed), normalised, in the requested memory format."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        views = []
        for k, v in enumerate(self.views):
            v = v.to(device, non_blocking=True)
            if self.augment is not None:
                v = self.augment[k](v, _mix(self.seed, k))
            views.append(v.contiguous(memory_format=fmt))
        from pipeline.data.transfer import to_device

        # every copy non-blocking (a blocking host -> GPU copy waits for the GPU: issue 23, defect 6); geometry
        # stays on the host, where PW-Self computes its patch matching from it (pipeline/methods/pwself.py)
        move = lambda t: None if t is None else to_device(t, device)  # noqa: E731
        return replace(self, views=views, label=move(self.label), index=move(self.index), positive=move(self.positive),
                       augment=None)


def batches_per_epoch(n_samples: int, batch_size: int) -> int:
    n = n_samples // batch_size
    if n == 0:
        from pipeline.errors import ParamError

        raise ParamError(f"train.batch_size: {batch_size} is larger than the {n_samples} training images")
    return n


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded permutation of all n training samples that epoch `epoch` visits."""
    return np.random.default_rng(_mix(seed, epoch, 13)).permutation(n)


def rank_slice(order: np.ndarray, b: int, global_batch: int, rank: int, local_batch: int) -> np.ndarray:
    """The samples of global batch b that rank `rank` trains on."""
    start = b * global_batch + rank * local_batch
    return order[start:start + local_batch]


def run_positions(start_epoch: int, start_step: int, epochs: int, steps: int):
    """(epoch, step_in_epoch) of every batch from (start_epoch, start_step) to the end of the last epoch."""
    for e in range(start_epoch, epochs):
        for b in range(start_step if e == start_epoch else 0, steps):
            yield e, b


def worker_positions(start_epoch: int, start_step: int, epochs: int, steps: int, worker: int, n_workers: int):
    """The batches worker `worker` of `n_workers` builds: every n_workers-th of the run's sequence, which is
    the order DataLoader collects them in (round robin over the workers)."""
    for t, pos in enumerate(run_positions(start_epoch, start_step, epochs, steps)):
        if t % n_workers == worker:
            yield pos


@dataclass
class WorkerFailure:
    """What a worker sends instead of a batch when the data is bad: the main process raises it in one line."""
    message: str


class ShardStream(IterableDataset):
    """Yields whole `Batch`es of `local_batch` images; use with `make_loader` (DataLoader(batch_size=None))."""

    def __init__(self, shard_dir: str | Path, views: list[ViewSpec], mean, std, local_batch: int, n_samples: int,
                 global_batch: int, seed: int, rank: int = 0, world_size: int = 1, subset: int = 0,
                 split: str = "train", pairs_dir: str | Path | None = None):
        paths = shard_paths(shard_dir, split)
        self.views = [View(v, mean, std) for v in views]
        self.augment = [ViewAugment(v, mean, std) for v in views]
        self.local_batch, self.global_batch = local_batch, global_batch
        self.seed, self.rank, self.world = seed, rank, world_size
        per_shard = read_meta(shard_dir)["samples_per_shard"]
        if subset:
            # the train shards are in seeded random order, so their first `subset` samples are a random subset
            n_samples = min(n_samples, subset)
        paths = paths[:-(-n_samples // per_shard)]
        counts = _split_count(n_samples, per_shard, len(paths))
        self.n_pairs = 0
        if pairs_dir is not None:
            pair_paths, self.n_pairs = pair_shard_paths(pairs_dir)
            paths += pair_paths
            counts += _split_count(self.n_pairs, read_pair_meta(pairs_dir)["samples_per_shard"], len(pair_paths))
        self.index = TarIndex(paths, counts)
        self.n_samples = n_samples
        self.steps = batches_per_epoch(n_samples + self.n_pairs, global_batch)
        self.start_at(0, 0, 1)

    def start_at(self, epoch: int, step_in_epoch: int, epochs: int) -> None:
        """Iterating then yields every batch from (epoch, step_in_epoch) to the end of epoch `epochs` - 1."""
        self.start_epoch, self.start_step, self.epochs = epoch, step_in_epoch, epochs

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """One epoch only, from batch `skip_batches` (tools and tests that look at a single epoch)."""
        self.start_at(epoch, skip_batches, epoch + 1)

    def __len__(self) -> int:
        return max(0, (self.epochs - self.start_epoch) * self.steps - self.start_step)

    def samples_of(self, epoch: int, b: int) -> np.ndarray:
        """Which samples (rows of the index) this rank's batch b of `epoch` holds."""
        return rank_slice(epoch_order(self.seed, epoch, len(self.index)), b, self.global_batch, self.rank, self.local_batch)

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        order_epoch, order = None, None
        for e, b in worker_positions(self.start_epoch, self.start_step, self.epochs, self.steps, worker, n_workers):
            if e != order_epoch:
                order_epoch, order = e, epoch_order(self.seed, e, len(self.index))
            items = rank_slice(order, b, self.global_batch, self.rank, self.local_batch)
            try:
                yield self._make_batch(items, e, b)
            except DataError as err:
                if info is None:
                    raise
                yield WorkerFailure(str(err))   # a worker's traceback would bury the one line that matters
                return

    def _make_batch(self, items: np.ndarray, epoch: int, b: int) -> Batch:
        # one generator per batch: its crops depend on (seed, epoch, rank, b) only, whichever worker builds it
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch, self.rank, b))
        firsts, seconds = [], []
        labels, index, positive = [], [], []
        for i in items:
            s = self.index.read(i)
            pair = pair_info(s)
            if pair is None:
                img = second = _decode(s)
                labels.append(int(s["cls"]))
                index.append(index_of_key(s["__key__"]))
                positive.append(index[-1])
            else:  # SePP-ID: view 1 from the semantic positive, every other view from the anchor
                img, second = _decode(s, "anchor."), _decode(s, "positive.")
                labels.append(pair["anchor_label"])
                index.append(pair["anchor"])
                positive.append(pair["positive"])
            firsts.append(img)
            seconds.append(second)
        outs, geos = zip(*(view.render(seconds if k == 1 else firsts, gen) for k, view in enumerate(self.views)))
        return Batch(list(outs), list(geos), torch.tensor(labels),
                     torch.tensor(index), torch.tensor(positive), epoch=epoch, step_in_epoch=b,
                     seed=_mix(self.seed, epoch, self.rank, b, 1), augment=self.augment)


def _split_count(n: int, per_shard: int, n_shards: int) -> list[int]:
    """How many of n samples, written per_shard to a shard, each of the first n_shards shards holds."""
    return [min(per_shard, n - j * per_shard) for j in range(n_shards)]


def _decode(sample: dict, prefix: str = ""):
    try:
        return image_of(sample, prefix)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__')}: unreadable {prefix}image "
                        f"({type(e).__name__}: {e}); rerun: dvc repro -f shard") from None


class RunLoader:
    """The DataLoader of one training run, iterated once: bad data in a worker, or a worker that dies, ends
    the run with one line naming the shard (or the worker and its signal) instead of a worker traceback."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self._it = None

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def death(self, e: BaseException) -> DataError | None:
        """The one-line error for a worker death PyTorch reported as `e`, wherever in the step it surfaced (its
        SIGCHLD handler raises it in the main thread: in the forward, the backward, the optimizer step...; or a
        batch whose shared-memory handles the dead worker can no longer hand over raises ConnectionError);
        None when `e` is something else. The loader is shut down, so no later SIGCHLD raises it again."""
        reported = isinstance(e, RuntimeError) and "DataLoader worker" in str(e)
        if not (reported or isinstance(e, (ConnectionError, EOFError)) and self._a_worker_exits()):
            return None
        error = DataError(_worker_death(self._it))
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        return error

    def _a_worker_exits(self) -> bool:
        """Whether a worker has exited, or does within WORKER_EXIT_WAIT_S. A killed worker's batch can raise
        ConnectionError before the worker can be waited for: its main thread is a zombie at once, but the
        process becomes waitable (and SIGCHLD is sent) only when its other threads (the queue feeder, the fd
        sharer) have exited too, which at the workers' low priority on a loaded machine takes a while."""
        deadline = time.monotonic() + WORKER_EXIT_WAIT_S
        while True:
            try:
                if any(not p.is_alive() for p in getattr(self._it, "_workers", [])):
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            except RuntimeError as r:   # PyTorch's SIGCHLD handler saw it first (and forgets it once raised)
                if "DataLoader worker" in str(r):
                    return True
                raise

    def __iter__(self):
        it = self._it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except (RuntimeError, ConnectionError, EOFError) as e:
                death = self.death(e)
                if death is None:
                    raise
                raise death from None
            if isinstance(batch, WorkerFailure):
                raise DataError(batch.message)
            yield batch


def _worker_death(it) -> str:
    """One line naming the worker that died and how (its exit code: minus the signal number)."""
    for w, proc in enumerate(getattr(it, "_workers", [])):
        proc.join(timeout=1)
        code = proc.exitcode
        if code:
            how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            return f"loader worker {w} (pid {proc.pid}) {how} (out of memory? lower train.num_workers); rerun the stage to resume"
    return "a loader worker exited unexpectedly (out of memory? lower train.num_workers); rerun the stage to resume"


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool) -> RunLoader:
    """One DataLoader for the whole run (call `stream.start_at` first): workers are started once and live
    until the last epoch ends; one batch per worker fetch, delivered in the run's batch order."""
    return RunLoader(DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                prefetch_factor=4 if num_workers else None, persistent_workers=num_workers > 0,
                                worker_init_fn=_yield_to_training))


def _yield_to_training(worker_id: int) -> None:
    """Loader workers run at a lower priority and single-threaded: on a machine whose cores also run the
    training step's threads, a worker preempting one of them stalls the step at its next barrier (measured:
    2 workers at normal priority slowed a 2-core CPU step ~30 %), while the workers need only a few % of the
    CPU and their prefetch queue hides the delay."""
    os.nice(10)
    torch.set_num_threads(1)
