"""Checkpointing: where a run's artifacts live, what a checkpoint must match, and saving / restoring it.

A checkpoint holds the full training state (method incl. momentum encoders and queues, optimizer, AMP
scaler, position in the epoch, metric history, and every rank's RNG state). It is written by rank 0 only,
without stalling training: the state is first copied to CPU (a snapshot, so training may go on changing
the live tensors), then written atomically by a background thread; at most one write is in flight, and
the trainer awaits the last before it returns. On resume rank 0 alone reads the file and broadcasts what
it found to the other ranks, so ranks without a shared filesystem resume identically.

Verified, and the last two kept: each write goes to a temp file (fsync, rename); its size and SHA-256 are
recorded beside it (`last.pt.sha256`), and the checkpoint it replaces becomes `prev.pt`. On resume a
checkpoint whose bytes disagree with its record, or that does not load (a crash on a network filesystem,
a full disk), is passed over for `prev.pt`, saying so in one line; with none readable the run stops naming
the files and the remedy instead of failing on every rerun with a zip-reader traceback.

Each rank keeps the RNG state of its own accelerator only (never `get_rng_state_all`, which holds one state
per *visible* device and cannot be restored where fewer are visible: 2 nodes x 4 GPUs after 8, or
CUDA_VISIBLE_DEVICES set), and a checkpoint records the numerics it was trained under (device type, AMP
dtype): resuming under others is refused (see `Checkpointer._numerics_agree`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import paths as layout
from pipeline import dist, faults
from pipeline.errors import PipelineError
from pipeline.utils import DISK_FULL, atomic_torch_save, atomic_write_text, file_sha256, mix_seed


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
    timed_on: list = field(default_factory=list)      # the hardware (device_model) each stretch of steps ran on

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
    """This process's RNG state: CPU generators and the generator of its *current* CUDA device only."""
    cuda = torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    """Restore `rng_state()`'s output into this process (its current CUDA device for the CUDA part).

    A checkpoint written before per-device states held a list (one per visible device): the entry of the
    current device is used when there is one."""
    torch.set_rng_state(s["torch"])
    cuda = s.get("cuda")
    if isinstance(cuda, (list, tuple)):   # older layout: get_rng_state_all() of the saving process
        idx = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = cuda[idx] if idx < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def seed_missing_rank(fp: str, rank: int, step: int, run: str) -> None:
    """A rank the checkpoint holds no RNG state for: seeded from (fingerprint, rank, step), so reruns agree."""
    seed = mix_seed(int(fp, 16), rank, step)
    seed_everything(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    print(f"{run}: rank {rank}: the checkpoint holds no RNG state for this rank; seeded it deterministically "
          f"(seed {seed})", flush=True)


def numerics(device: torch.device, amp_dtype) -> dict:
    """What a checkpoint's numbers were computed under: resuming under other numerics is refused."""
    return {"device": torch.device(device).type, "amp": None if amp_dtype is None else str(amp_dtype).replace("torch.", "")}


# --- verified files: <name> plus <name>.sha256 ("<hex> <size>"), the last two kept ----------------------------

PREVIOUS = "prev.pt"


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_verified(obj, path: str | Path) -> None:
    """Write `obj` atomically at `path`, keep the checkpoint it replaces as prev.pt, record size and SHA-256.

    Order: the new file is complete on disk (temp, fsync) before the old one is rotated out of `last.pt`, and
    its record is written after it is renamed in, so a crash at any point leaves a whole checkpoint: last.pt
    with its record, or prev.pt with its record (no last.pt yet), or a last.pt without a record (whole, being
    renamed only after its fsync; judged by loading it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.new")
    try:
        atomic_torch_save(obj, tmp)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None   # name the checkpoint, not its temp file
    faults.point("checkpoint-write")
    digest, size = file_sha256(tmp)
    if path.exists():
        os.replace(path, path.with_name(PREVIOUS))
        if record_path(path).exists():
            os.replace(record_path(path), record_path(path.with_name(PREVIOUS)))
        else:   # an unrecorded (older) file: no stale record may vouch for it
            record_path(path.with_name(PREVIOUS)).unlink(missing_ok=True)
    os.replace(tmp, path)
    atomic_write_text(f"{digest} {size}\n", record_path(path))


def verify(path: Path) -> str | None:
    """None when `path` matches its record (or has none: an older checkpoint, judged by loading it), else why not."""
    rec = record_path(path)
    if not rec.exists():
        return None
    try:
        want_digest, want_size = rec.read_text().split()
        want_size = int(want_size)
    except ValueError:
        return f"unverifiable (its record {rec.name} is unreadable)"
    size = path.stat().st_size
    if size != want_size:
        return f"{size} bytes, {want_size} were written: truncated" if size < want_size else f"{size} bytes, {want_size} were written"
    if file_sha256(path)[0] != want_digest:
        return "corrupt (its bytes do not match the SHA-256 recorded when it was written)"
    return None


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
                save_verified(obj, path)
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

    def __init__(self, path: Path, fp: str, run: str, numerics: dict | None = None):
        self.path, self.fp, self.run = Path(path), fp, run
        self.numerics = numerics or {"device": "cpu", "amp": None}
        self.writer = AsyncWriter()

    def save(self, method, opt, scaler, progress: Progress) -> None:
        """Snapshot on rank 0 (every rank contributes its RNG state), then write in the background."""
        rng = [None] * dist.world_size()
        if dist.is_dist():
            torch.distributed.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if dist.is_main():
            state = cpu_snapshot({"fingerprint": self.fp, "numerics": self.numerics, "method": method.state_dict(),
                                  "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                  "progress": progress.to_dict(), "rng": rng})
            self.writer.submit(state, self.path)

    def wait(self) -> None:
        self.writer.wait()

    def _load_good(self) -> tuple[Path, dict] | None:
        """(file, state) of the newest checkpoint that verifies and loads: last.pt, else prev.pt (saying so);
        None when there is none; PipelineError naming the files when every one there is unreadable."""
        bad = []
        for path in (self.path, self.path.with_name(PREVIOUS)):
            if not path.exists():
                continue
            why = verify(path)
            if why is None:
                try:
                    ck = torch.load(path, map_location="cpu", weights_only=False)
                    if not isinstance(ck, dict) or "progress" not in ck:
                        raise ValueError("not a training checkpoint")
                except Exception as e:  # noqa: BLE001 - any unreadable file is the same fault to the user
                    why = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            if why is None:
                if bad:
                    print(f"{self.run}: {bad[0][0]} is {bad[0][1]}; resuming from the previous checkpoint "
                          f"{path.name} instead", flush=True)
                return path, ck
            bad.append((path, why))
        if bad:
            said = "; ".join(f"{p} is {why}" for p, why in bad)
            raise PipelineError(f"{self.run}: no readable checkpoint ({said}); delete {self.path.parent} to train "
                                f"from scratch")
        return None

    def _numerics_agree(self, ck: dict, path: Path) -> None:
        """Refuse to resume under other numerics (CPU -> GPU, another AMP dtype): the run would continue with other
        arithmetic than it started with, silently (bf16), or fail on a GradScaler state that was never saved
        (fp16 after a run without it). Checkpoints from before this record are taken as CPU without AMP."""
        was = ck.get("numerics", {"device": "cpu", "amp": None})
        if was != self.numerics:
            def say(n):
                return f"{n['device']} with AMP {n['amp']}" if n["amp"] else f"{n['device']} without AMP"
            raise PipelineError(f"{self.run}: {path} was trained on {say(was)}, this run is on {say(self.numerics)}: "
                                f"resume it where it started (same device type and train.amp), or delete "
                                f"{self.path.parent} to train from scratch here")

    def _read_on_main(self) -> dict | None:
        """Rank 0: the checkpoint's state if a good one exists and matches the fingerprint, else None (saying why)."""
        found = self._load_good()
        if found is None:
            return None
        path, ck = found
        if ck.get("fingerprint") != self.fp:
            print(f"{self.run}: {path} is from other settings; starting from scratch", flush=True)
            return None
        self._numerics_agree(ck, path)
        print(f"{self.run}: resuming from {path} at epoch {ck['progress']['epoch'] + 1}, "
              f"step {ck['progress']['step']}", flush=True)
        return ck

    def restore(self, method, opt, scaler) -> Progress:
        """Load the checkpoint into method/optimizer/scaler/RNG on every rank; the Progress to continue from.

        Only rank 0 reads the file; the others receive its contents (broadcast), so a rank whose filesystem
        lacks the checkpoint resumes exactly like rank 0 instead of starting from step 0 and hanging DDP."""
        ck, err = None, None
        if dist.is_main():
            try:
                ck = self._read_on_main()
            except PipelineError as e:
                err = str(e)
        if dist.is_dist():
            box = [(ck, err)]   # an error too: the other ranks must not wait for a state that never comes
            torch.distributed.broadcast_object_list(box, src=0)
            ck, err = box[0]
        if err is not None:
            raise PipelineError(err)
        if ck is None:
            return Progress()
        method.load_state_dict(ck["method"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        rank = dist.rank()
        if rank < len(ck["rng"]) and ck["rng"][rank] is not None:
            set_rng_state(ck["rng"][rank])
        else:
            seed_missing_rank(self.fp, rank, ck["progress"]["step"], self.run)
        return Progress(**ck["progress"])
