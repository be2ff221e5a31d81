"""Checkpointing: where a run's artifacts live, what a checkpoint must match, and saving / restoring it.

A checkpoint holds the full training state (method incl. momentum encoders and queues, optimizer, AMP
scaler, position in the epoch, metric history, and every rank's RNG state). It is written by rank 0 only,
without stalling training: the state is first copied to CPU (a snapshot, so training may go on changing
the live tensors), then written atomically by a background thread; at most one write is in flight, and
the trainer awaits the last before it returns. On resume rank 0 alone reads the file and broadcasts what
it found to the other ranks, so ranks without a shared filesystem resume identically.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import paths as layout
from pipeline import dist
from pipeline.utils import atomic_torch_save


@dataclass
class RunPaths:
    """Every file a pretrain run reads or writes; the stage script chooses them, the library only uses them."""
    shards: Path             # the dataset's shard directory (read)
    pairs: Path | None       # SePP-ID: the mine stage's pair shards (read), None for plain runs
    encoder: Path            # final artifact: backbone (+ heads) for evaluation and mining
    checkpoint: Path         # full training state, for resume (outside the stage's DVC outputs)
    metrics: Path            # summary JSON (beside the encoder; the evaluate stage publishes it for dvc metrics)
    curve: Path              # per-epoch CSV (beside the encoder; published for dvc plots)

    @classmethod
    def for_run(cls, root: Path, dataset: str, run: str, pairs: str | None = None) -> "RunPaths":
        """The project's artifact layout (`pipeline.paths`, the one module that spells it) under `root`."""
        root = Path(root)
        return cls(shards=root / layout.shards(dataset),
                   pairs=root / layout.pairs(dataset) / pairs if pairs else None,
                   encoder=root / layout.encoder(run),
                   checkpoint=root / layout.checkpoints(run) / "last.pt",
                   metrics=root / layout.train_summary(run),
                   curve=root / layout.train_curve(run))


@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    views: int = 0
    history: list = field(default_factory=list)       # one dict per finished epoch
    sums: dict = field(default_factory=dict)          # running sums of loss terms in this epoch (device tensors)
    epoch_views: int = 0
    epoch_time_s: float = 0.0
    knn_init: float | None = None                     # the kNN monitor before the first step

    def to_dict(self) -> dict:
        """Plain Python values (the loss sums read off the device: a checkpoint is a sync point anyway)."""
        d = copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "sums"})
        d["sums"] = {k: float(v) for k, v in self.sums.items()}
        return d


def fingerprint(*parts) -> str:
    """What a checkpoint must match to be resumed: the run's semantic settings."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def cpu_snapshot(obj):
    """A copy of `obj` with every tensor copied to CPU: later in-place updates of the live state do not reach it.

    `.cpu()` alone would alias CPU tensors, so a CPU tensor is cloned; a CUDA tensor is copied to host."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class AsyncWriter:
    """Writes snapshots atomically in a background thread; at most one write in flight.

    A failed write is re-raised in the training thread at the next `submit` or `wait`."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, obj, path: Path) -> None:
        self.wait()  # the previous write must land first: files are written in order, one at a time

        def write():
            try:
                atomic_torch_save(obj, path)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e

        self._thread = threading.Thread(target=write, name=f"checkpoint {path.name}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


class Checkpointer:
    """Save and restore one run's training state at `path`, guarded by `fp` (the run's fingerprint)."""

    def __init__(self, path: Path, fp: str, run: str):
        self.path, self.fp, self.run = Path(path), fp, run
        self.writer = AsyncWriter()

    def save(self, method, opt, scaler, progress: Progress) -> None:
        """Snapshot on rank 0 (every rank contributes its RNG state), then write in the background."""
        rng = [None] * dist.world_size()
        if dist.is_dist():
            torch.distributed.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if dist.is_main():
            state = cpu_snapshot({"fingerprint": self.fp, "method": method.state_dict(), "optimizer": opt.state_dict(),
                                  "scaler": scaler.state_dict(), "progress": progress.to_dict(), "rng": rng})
            self.writer.submit(state, self.path)

    def wait(self) -> None:
        self.writer.wait()

    def _read_on_main(self) -> dict | None:
        """Rank 0: the checkpoint's state if it exists and matches the fingerprint, else None (saying why)."""
        if not self.path.exists():
            return None
        ck = torch.load(self.path, map_location="cpu", weights_only=False)
        if ck.get("fingerprint") != self.fp:
            print(f"{self.run}: {self.path} is from other settings; starting from scratch", flush=True)
            return None
        print(f"{self.run}: resuming from {self.path} at epoch {ck['progress']['epoch'] + 1}, "
              f"step {ck['progress']['step']}", flush=True)
        return ck

    def restore(self, method, opt, scaler) -> Progress:
        """Load the checkpoint into method/optimizer/scaler/RNG on every rank; the Progress to continue from.

        Only rank 0 reads the file; the others receive its contents (broadcast), so a rank whose filesystem
        lacks the checkpoint resumes exactly like rank 0 instead of starting from step 0 and hanging DDP."""
        ck = self._read_on_main() if dist.is_main() else None
        if dist.is_dist():
            box = [ck]
            torch.distributed.broadcast_object_list(box, src=0)
            ck = box[0]
        if ck is None:
            return Progress()
        method.load_state_dict(ck["method"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        rank = dist.rank()
        set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        return Progress(**ck["progress"])
