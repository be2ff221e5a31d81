"""Checkpoint / resume: an interrupted run ends exactly where an uninterrupted one does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from pipeline.train.trainer import train
from tests.conftest import ROOT, tiny_params


def params(epochs=2):
    return tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0,
                          "train.checkpoint_every": 2, "train.epochs": epochs})


def project(tmp_path, name, shard_dir):
    root = tmp_path / name
    (root / "data/shards").mkdir(parents=True)
    (root / "data/shards/tiny").symlink_to(shard_dir)
    return root


def final_state(root, run="mocov2"):
    return torch.load(root / f"data/checkpoints/{run}/last.pt", weights_only=False)


def assert_same_state(a, b):
    assert a["progress"]["step"] == b["progress"]["step"]
    for k, v in a["method"].items():
        assert torch.equal(v, b["method"][k]), k


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, shard_dir):
    p = params()
    full, cut = project(tmp_path, "full", shard_dir), project(tmp_path, "cut", shard_dir)
    train(p, "mocov2", root=full)
    assert train(p, "mocov2", root=cut, max_steps=4) == {"stopped_at_step": 4}  # 3 steps/epoch: mid-epoch 2
    assert final_state(cut)["progress"]["step_in_epoch"] == 1
    summary = train(p, "mocov2", root=cut)
    assert summary["steps"] == 6
    a, b = final_state(full), final_state(cut)
    assert_same_state(a, b)
    assert torch.equal(a["method"]["queue.keys"], b["method"]["queue.keys"])
    assert len(b["progress"]["history"]) == 2


def test_checkpoint_from_other_settings_is_not_resumed(tmp_path, shard_dir, capsys):
    root = project(tmp_path, "r", shard_dir)
    train(params(), "mocov2", root=root, max_steps=2)
    train(tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0, "train.epochs": 1,
                         "train.lr": 0.01}), "mocov2", root=root)
    assert "starting from scratch" in capsys.readouterr().out


def test_changed_run_override_is_not_resumed(tmp_path, shard_dir, capsys):
    # the run's overrides are part of the method's settings: a checkpoint trained with others must not resume
    root = project(tmp_path, "r", shard_dir)
    train(params(), "mocov2", root=root, max_steps=2)
    capsys.readouterr()
    train(params(), "mocov2", root=root, max_steps=3)
    assert "resuming" in capsys.readouterr().out
    p = params()
    p["runs"]["mocov2"]["overrides"] = {"temperature": 0.5}
    train(p, "mocov2", root=root, max_steps=3)
    assert "starting from scratch" in capsys.readouterr().out


def saved_step(last):
    """Step of the newest checkpoint on disk, -1 if none yet. A save rotates last.pt to prev.pt before renaming the
    new file in, so for a moment (or for good, when killed there) only prev.pt exists; either may be rotated away
    between finding it and opening it, which is retried."""
    for _ in range(50):
        for path in (last, last.with_name("prev.pt")):
            try:
                return torch.load(path, weights_only=False)["progress"]["step"]
            except FileNotFoundError:
                continue
        if not last.parent.exists():
            return -1
        time.sleep(0.01)
    return -1


SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.test_resume import params
from pipeline.train.trainer import train
train(params(epochs={epochs}), "mocov2", root=Path({proj!r}))
"""


def test_killed_process_resumes_from_its_checkpoint(tmp_path, shard_dir):
    # 36 steps: killed once the step-10 checkpoint is on disk (polled every 0.2 s), 26 steps before the end. The
    # resumed run and the reference each train the whole run in this process, so every extra epoch costs twice.
    epochs = 12
    proj = project(tmp_path, "killed", shard_dir)
    code = SCRIPT.format(root=str(ROOT), epochs=epochs, proj=str(proj))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = proj / "data/checkpoints/mocov2/last.pt"
    # ~25 s on an idle 2-core machine; a loaded CI box beside another xdist worker took over 120 s, so the wait is
    # bounded only against a hang, and timing out is reported as such rather than as a missing checkpoint.
    deadline = time.time() + 900
    reached = False
    while time.time() < deadline and proc.poll() is None:
        if saved_step(ck) >= 10:
            reached = True
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    if not reached:
        proc.kill()
        proc.wait()
        raise AssertionError("the training subprocess wrote no step-10 checkpoint within 900 s")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = saved_step(ck)
    assert 10 <= killed_at < 3 * epochs
    assert not (proj / "data/models/mocov2/encoder.safetensors").exists()  # no artifact that looks complete
    summary = train(params(epochs), "mocov2", root=proj)
    assert summary["steps"] == 3 * epochs
    ref = project(tmp_path, "ref", shard_dir)
    train(params(epochs), "mocov2", root=ref)
    assert_same_state(final_state(ref), final_state(proj))
    assert json.loads((proj / "data/models/mocov2/train.json").read_text())["steps"] == 3 * epochs


def test_non_finite_loss_stops_naming_step_and_term(tmp_path, shard_dir, monkeypatch):
    from pipeline.methods.simclr import SimCLR
    from pipeline.train.trainer import TrainingError

    real = SimCLR.forward

    def poisoned(self, batch):
        out = real(self, batch)
        if self.progress > 0.3:  # finite at first, then Inf in one term
            out["nt_xent"] = out["nt_xent"] * float("inf")
            out["loss"] = out["nt_xent"]
        return out

    monkeypatch.setattr(SimCLR, "forward", poisoned)
    root = project(tmp_path, "nan", shard_dir)
    with __import__("pytest").raises(TrainingError, match=r"simclr: non-finite loss at epoch 1, step 1 .*nt_xent=inf"):
        train(params(epochs=1), "simclr", root=root)
