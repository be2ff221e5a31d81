"""Checkpoint mechanics (snapshot, background writer), the deferred finite check, the monitor's schedule and
the deterministic encoder artifact."""
from __future__ import annotations

import json
import threading

import pandas as pd
import pytest
import torch

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
    assert "wall_time_s" in json.loads((a / "data/models/simclr/train.json").read_text())  # timings live here

    # a rerun of the finished run resumes at its end and rewrites the same bytes; without the checkpoint
    # directory it trains again and still does
    train(p, "simclr", root=a)
    assert (a / enc).read_bytes() == first
    (a / "data/checkpoints/simclr/last.pt").unlink()
    (a / "data/checkpoints/simclr").rmdir()
    train(p, "simclr", root=a)
    assert (a / enc).read_bytes() == first


def test_encoder_meta_refuses_machine_dependent_values(tmp_path):
    from pipeline.models.encoder_io import save_encoder

    with pytest.raises(ValueError, match="wall_time_s"):
        save_encoder(tmp_path / "e.pt", torch.nn.Linear(2, 2), {}, 8, meta={"run": "x", "wall_time_s": 3.0})
    with pytest.raises(ValueError, match="root"):
        save_encoder(tmp_path / "e.pt", torch.nn.Linear(2, 2), {}, 8, meta={"root": "/home/me/project"})
