"""Checkpoint mechanics (snapshot, background writer), the deferred finite check, the monitor's schedule and
the deterministic encoder artifact."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.device import device_model
from pipeline.train import checkpoint as ckpt
from pipeline.train.checkpoint import AsyncWriter, Progress, RunPaths, cpu_snapshot
from pipeline.train.trainer import FiniteGuard, TrainingError, train
from tests.conftest import tiny_params
from tests.test_resume import final_state, project


def params(epochs=2, **over):
    return tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0,
                          "train.checkpoint_every": 2, "train.epochs": epochs, **over})


# --- snapshot and writer -------------------------------------------------------------------------------------

def test_snapshot_is_not_changed_by_later_in_place_updates():
    live = {"w": torch.ones(3), "opt": {"state": {0: {"buf": torch.zeros(2)}}, "lr": [0.1]}, "step": 4}
    snap = cpu_snapshot(live)
    live["w"].add_(1)
    live["opt"]["state"][0]["buf"].fill_(7)
    live["opt"]["lr"][0] = 9.0
    assert snap["w"].tolist() == [1, 1, 1] and snap["opt"]["state"][0]["buf"].tolist() == [0, 0]
    assert snap["opt"]["lr"] == [0.1] and snap["step"] == 4


def test_writer_keeps_one_write_in_flight_and_reports_failures(tmp_path, monkeypatch):
    release, started, order = threading.Event(), [], []

    def slow_save(obj, path):
        started.append(obj)
        if obj == 1:
            release.wait(5)
        order.append(obj)
        torch.save(obj, path)

    monkeypatch.setattr(ckpt, "atomic_torch_save", slow_save)
    w = AsyncWriter()
    w.submit(1, tmp_path / "a.pt")
    threading.Timer(0.2, release.set).start()
    w.submit(2, tmp_path / "a.pt")  # blocks until write 1 has landed: never two writers on one file
    assert order[0] == 1
    w.wait()
    assert order == [1, 2] and torch.load(tmp_path / "a.pt") == 2

    monkeypatch.setattr(ckpt, "atomic_torch_save", lambda obj, path: (_ for _ in ()).throw(OSError("disk full")))
    w.submit(3, tmp_path / "a.pt")
    with pytest.raises(OSError, match="disk full"):
        w.wait()


def test_run_paths_follow_the_project_layout(tmp_path):
    p = RunPaths.for_run(tmp_path, "cifar10", "seppid-mocov2", "semantic")
    assert p.encoder == tmp_path / "data/models/seppid-mocov2/encoder.safetensors"
    assert p.checkpoint == tmp_path / "data/checkpoints/seppid-mocov2/last.pt"
    assert p.pairs == tmp_path / "data/pairs/cifar10/semantic" and p.shards == tmp_path / "data/shards/cifar10"
    assert RunPaths.for_run(tmp_path, "cifar10", "simclr").pairs is None


# --- the finite guard: read every K steps, still exact -----------------------------------------------------

def test_finite_guard_names_the_first_bad_step_of_its_window():
    guard = FiniteGuard("r")
    progress = Progress()
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0]):
        progress.step, progress.step_in_epoch, progress.epoch = step, step % 3, step // 3
        guard.record({"loss": torch.tensor(value), "term": torch.tensor(value), "ok": torch.tensor(0.5)}, progress)
    with pytest.raises(TrainingError, match=r"^r: non-finite loss at epoch 1, step 2 \(step 2 of the epoch\): "
                                            r"loss=nan, term=nan$"):
        guard.check()
    guard.record({"loss": torch.tensor(1.0)}, progress)
    guard.check()  # a clean window passes (and the raised one was consumed)


def test_non_finite_loss_found_at_a_deferred_sync_names_its_step_and_no_checkpoint_holds_it(tmp_path, shard_dir,
                                                                                          monkeypatch):
    from pipeline.methods.simclr import SimCLR

    real = SimCLR.forward

    def poisoned(self, batch):  # steps 4 and 5 of 6 (progress 4/6, 5/6): Inf in one term
        out = real(self, batch)
        if self.progress > 0.6:
            out["nt_xent"] = out["nt_xent"] * float("inf")
            out["loss"] = out["nt_xent"]
        return out

    monkeypatch.setattr(SimCLR, "forward", poisoned)
    root = project(tmp_path, "nan", shard_dir)
    # syncs after steps 3 (epoch end) and 4 (K = 4), then 6 (epoch end): the bad step 4 is read at step 6
    with pytest.raises(TrainingError, match=r"simclr: non-finite loss at epoch 2, step 4 \(step 1 of the epoch\): loss=inf, nt_xent=inf$"):
        train(params(**{"train.sync_every": 4, "train.checkpoint_every": 100}), "simclr", root=root)
    assert final_state(root, "simclr")["progress"]["step"] == 3  # the epoch-end checkpoint, nothing after


# --- kNN monitor every N epochs --------------------------------------------------------------------------------

def test_monitor_runs_every_n_epochs_and_after_the_last(tmp_path, shard_dir):
    every = train(params(3, **{"train.knn_monitor": [20, 9]}), "simclr", root=project(tmp_path, "every", shard_dir))
    root = project(tmp_path, "sparse", shard_dir)
    sparse = train(params(3, **{"train.knn_monitor": [20, 9], "train.knn_monitor_every": 2}), "simclr", root=root)
    k = every["knn_monitor"]
    assert sparse["knn_monitor"] == [k[0], None, k[2], k[3]]  # before, (skipped), epoch 2, the final epoch 3
    curve = pd.read_csv(root / "data/models/simclr/curve.csv")
    assert curve["knn_top1"].isna().tolist() == [True, False, False]


# --- deterministic artifacts -----------------------------------------------------------------------------------

def test_identical_training_gives_a_byte_identical_encoder(tmp_path, shard_dir):
    a, b = project(tmp_path, "a", shard_dir), project(tmp_path, "b", shard_dir)
    p = params(1)
    train(p, "simclr", root=a)
    train(p, "simclr", root=b)  # another directory, another wall time
    enc = "data/models/simclr/encoder.safetensors"
    first = (a / enc).read_bytes()
    assert first == (b / enc).read_bytes()
    cfg = "data/models/simclr/encoder.json"
    assert (a / cfg).read_bytes() == (b / cfg).read_bytes()
    state = json.loads((a / cfg).read_text())
    assert set(state["meta"]) == {"run", "method", "seed", "backbone", "epochs", "steps"} and state["meta"]["steps"] == 3
    timings = json.loads((a / "data/models/simclr/train.json").read_text())   # timings live here, with their machine
    assert "wall_time_s" in timings and timings["timed_on"] == [device_model(torch.device("cpu"))]

    # a rerun of the finished run resumes at its end and rewrites the same bytes; without the checkpoint
    # directory it trains again and still does
    train(p, "simclr", root=a)
    assert (a / enc).read_bytes() == first
    shutil.rmtree(a / "data/checkpoints/simclr")   # last.pt, prev.pt and their records
    train(p, "simclr", root=a)
    assert (a / enc).read_bytes() == first


def test_encoder_meta_refuses_machine_dependent_values(tmp_path):
    from pipeline.models.encoder_io import save_encoder

    with pytest.raises(ValueError, match="wall_time_s"):
        save_encoder(tmp_path / "e.pt", torch.nn.Linear(2, 2), {}, 8, meta={"run": "x", "wall_time_s": 3.0})
    with pytest.raises(ValueError, match="root"):
        save_encoder(tmp_path / "e.pt", torch.nn.Linear(2, 2), {}, 8, meta={"root": "/home/me/project"})


# --- RNG state per rank, for its own device (#23 defect 4) -------------------------------------------------------

class FakeCuda:
    """`n` visible CUDA devices, the process on `current`: each generator state is a tensor. Setting the state
    of a device that is not visible raises IndexError, as torch's `default_generators[idx]` does."""

    def __init__(self, monkeypatch, n: int, current: int, states=None):
        self.gens = list(states) if states is not None else [torch.tensor([100 * n + i]) for i in range(n)]
        self.n, self.current = n, current
        get = lambda device="cuda": self.gens[self._idx(device)].clone()  # noqa: E731

        def set_(state, device="cuda"):
            self.gens[self._idx(device)] = state.clone()

        for mod in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(mod, "get_rng_state", get)
            monkeypatch.setattr(mod, "set_rng_state", set_)
            monkeypatch.setattr(mod, "device_count", lambda: self.n)
            monkeypatch.setattr(mod, "manual_seed", lambda seed: None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)

    def _idx(self, device) -> int:
        idx = device if isinstance(device, int) else torch.device(device).index
        idx = self.current if idx is None else idx
        if idx >= self.n:
            raise IndexError("tuple index out of range")   # torch.cuda.default_generators[idx]
        return idx


@pytest.mark.parametrize("saved_on, rank_device, resumed_on", [(8, 5, 2), (2, 1, 1)])
def test_rng_state_saved_with_more_visible_gpus_restores_the_own_device(monkeypatch, saved_on, rank_device, resumed_on):
    # e.g. saved by the rank on GPU 5 of one 8-GPU node, resumed as 2 processes per node (or with
    # CUDA_VISIBLE_DEVICES giving each rank one GPU): the rank's own generator state goes to its current device
    FakeCuda(monkeypatch, saved_on, rank_device)
    state = ckpt.rng_state()
    own = torch.tensor([100 * saved_on + rank_device])
    after = FakeCuda(monkeypatch, resumed_on, resumed_on - 1)
    ckpt.set_rng_state(state)
    assert torch.equal(after.gens[resumed_on - 1], own)


def test_rng_state_of_an_older_checkpoint_restores_the_current_devices_entry(monkeypatch):
    state = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([i]) for i in range(8)],  # get_rng_state_all()
             "numpy": __import__("numpy").random.get_state(), "python": __import__("random").getstate()}
    fake = FakeCuda(monkeypatch, 2, 1)
    ckpt.set_rng_state(state)
    assert fake.gens[1].tolist() == [1]


def _tiny_state():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cuda", enabled=False)


def test_a_rank_without_saved_rng_state_is_seeded_deterministically_and_says_so(tmp_path, monkeypatch, capsys):
    from pipeline import dist

    path = tmp_path / "ck/last.pt"
    saver = ckpt.Checkpointer(path, "ab" * 8, "r")
    saver.save(*_tiny_state(), Progress(step=4))   # one rank's RNG state
    saver.wait()
    draws = []
    for _ in range(2):
        monkeypatch.setattr(dist, "rank", lambda: 1)   # rank 1 of a run whose checkpoint holds one rank's state
        monkeypatch.setattr(dist, "is_main", lambda: True)   # (what rank 0 read and broadcast)
        ckpt.Checkpointer(path, "ab" * 8, "r").restore(*_tiny_state())
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])
    out = capsys.readouterr().out
    assert "r: rank 1: the checkpoint holds no RNG state for this rank; seeded it deterministically" in out
    torch.manual_seed(0)
    ckpt.set_rng_state(torch.load(path, weights_only=False)["rng"][0])
    assert not torch.equal(torch.rand(3), draws[0])   # not rank 0's stream: the ranks must not draw alike


# --- the numerics a checkpoint was trained under (#23 defect 5) -------------------------------------------------

@pytest.mark.parametrize("device, amp", [("cuda", torch.float16), ("cuda", torch.bfloat16), ("cuda", None)])
def test_a_cpu_checkpoint_is_not_resumed_under_other_numerics(tmp_path, device, amp):
    from pipeline.errors import PipelineError

    path = tmp_path / "ck/last.pt"
    saver = ckpt.Checkpointer(path, "ab" * 8, "r", ckpt.numerics(torch.device("cpu"), None))
    saver.save(*_tiny_state(), Progress(step=4))
    saver.wait()
    said = f"cuda with AMP {str(amp).replace('torch.', '')}" if amp else "cuda without AMP"
    with pytest.raises(PipelineError, match=rf"^r: .*last.pt was trained on cpu without AMP, this run is on {said}: "
                                            r"resume it where it started .* or delete .*ck to train from scratch here$"):
        ckpt.Checkpointer(path, "ab" * 8, "r", ckpt.numerics(torch.device(device), amp)).restore(*_tiny_state())
    same = ckpt.Checkpointer(path, "ab" * 8, "r", ckpt.numerics(torch.device("cpu"), None))
    assert same.restore(*_tiny_state()).step == 4


def test_the_trainer_records_device_and_amp_in_its_checkpoint(tmp_path, shard_dir):
    root = project(tmp_path, "n", shard_dir)
    train(params(**{"train.amp": "fp16"}), "simclr", root=root, max_steps=1)   # amp is CUDA only: off on CPU
    assert final_state(root, "simclr")["numerics"] == {"device": "cpu", "amp": None}


# --- verified checkpoints, the last two kept ---------------------------------------------------------------------

def _two_checkpoints(tmp_path) -> Path:
    path = tmp_path / "ck/last.pt"
    saver = ckpt.Checkpointer(path, "ab" * 8, "r")
    for step in (2, 4):
        saver.save(*_tiny_state(), Progress(step=step))
        saver.wait()
    return path


def _restore(path):
    return ckpt.Checkpointer(path, "ab" * 8, "r").restore(*_tiny_state())


def test_each_checkpoint_is_recorded_and_the_previous_one_kept(tmp_path):
    path = _two_checkpoints(tmp_path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "last.pt.sha256", "prev.pt", "prev.pt.sha256"]
    digest, size = (path.parent / "last.pt.sha256").read_text().split()
    assert int(size) == path.stat().st_size and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.load(path.parent / "prev.pt", weights_only=False)["progress"]["step"] == 2
    assert _restore(path).step == 4


@pytest.mark.parametrize("damage, why", [
    (lambda b: b[: len(b) // 2], r"\d+ bytes, \d+ were written: truncated"),
    (lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], r"corrupt \(its bytes do not match the SHA-256 recorded"),
])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage, why):
    path = _two_checkpoints(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    assert _restore(path).step == 2
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"r: .*last.pt is {why}.*; resuming from the previous checkpoint prev.pt instead", lines[0])
    assert lines[1].startswith("r: resuming from ") and lines[1].endswith("prev.pt at epoch 1, step 2")


def test_an_unrecorded_checkpoint_is_judged_by_loading_it(tmp_path, capsys):
    # written before records existed (or killed between the rename and the record): a truncated one fails to load
    path = _two_checkpoints(tmp_path)
    (path.parent / "last.pt.sha256").unlink()
    path.write_bytes(path.read_bytes()[:-200])
    assert _restore(path).step == 2
    assert re.match(r"r: .*last.pt is unreadable \(\w+Error: .*; resuming from the previous checkpoint prev.pt instead\n", capsys.readouterr().out)


def test_no_readable_checkpoint_stops_naming_the_files_and_the_remedy(tmp_path):
    from pipeline.errors import PipelineError

    path = _two_checkpoints(tmp_path)
    for p in (path, path.parent / "prev.pt"):
        p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(PipelineError, match=r"^r: no readable checkpoint \(.*last.pt is .*truncated; .*prev.pt is "
                                            r".*truncated\); delete .*ck to train from scratch$"):
        _restore(path)
