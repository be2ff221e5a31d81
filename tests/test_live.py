"""Live training logs in DVCLive's layout: written while a run trains, exact across a resume."""
from __future__ import annotations

import json

from pipeline.train.live import LiveLog
from tests.conftest import tiny_params
from tests.test_resume import project


def _rows(tsv):
    return [line.split("\t")[1:] for line in tsv.read_text().splitlines()[1:]]


def test_resume_drops_rows_past_the_checkpoint(tmp_path):
    d = tmp_path / "live"
    log = LiveLog(d)
    for step, loss in ((10, 3.0), (20, 2.0), (30, 1.0)):
        log.log(step, "train", {"loss": loss, "bad": float("nan"), "name": "x"})
    assert _rows(d / "plots/metrics/train/loss.tsv") == [["10", "3"], ["20", "2"], ["30", "1"]]
    assert not (d / "plots/metrics/train/bad.tsv").exists()           # non-finite and non-numbers skipped
    LiveLog(d, resume_step=20).log(30, "train", {"loss": 1.5})          # the checkpoint was at step 20
    assert _rows(d / "plots/metrics/train/loss.tsv") == [["10", "3"], ["20", "2"], ["30", "1.5"]]
    assert json.loads((d / "metrics.json").read_text()) == {"step": 30, "train": {"loss": 1.5}}
    LiveLog(d)                                                           # a fresh start clears the old run's log
    assert not any((d / "plots/metrics").rglob("*.tsv"))


def test_a_run_logs_while_it_trains(tmp_path, shard_dir):
    """Stopped before its end (max_steps), a run has no encoder yet but its live log already has the steps."""
    from pipeline.train.trainer import train

    root = project(tmp_path, "live", shard_dir)
    p = tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0, "train.checkpoint_every": 2,
                       "train.sync_every": 1, "train.epochs": 2})
    train(p, "simclr", root=root, max_steps=4)
    live = root / "data/live/simclr"
    assert not (root / "data/models/simclr/encoder.safetensors").exists()
    assert [r[0] for r in _rows(live / "plots/metrics/train/loss.tsv")] == ["1", "2", "3", "4"]
    assert [r[0] for r in _rows(live / "plots/metrics/epoch/loss.tsv")] == ["3"]   # 24 images / 8: epoch 1 ends at step 3
    m = json.loads((live / "metrics.json").read_text())
    assert m["step"] == 4 and set(m) >= {"train", "epoch"}
    train(p, "simclr", root=root)                                        # resumes at step 4, finishes epoch 2
    assert [r[0] for r in _rows(live / "plots/metrics/train/loss.tsv")] == ["1", "2", "3", "4", "5", "6"]
    assert [r[0] for r in _rows(live / "plots/metrics/epoch/loss.tsv")] == ["3", "6"]
