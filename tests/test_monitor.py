"""The per-epoch kNN monitor (train.knn_monitor): what it measures, that training ignores it, and the report."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.data.shards import iter_split, read_manifest
from pipeline.data.eval_view import eval_transform
from pipeline.models.encoder_io import load_encoder
from pipeline.params import ParamError
from pipeline.report import build as rb
from pipeline.train.monitor import KnnMonitor, spread
from pipeline.train.trainer import train
from tests.conftest import tiny_params
from tests.test_report import RUNS, write_metrics
from tests.test_resume import assert_same_state, final_state, project

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def params(monitor=(0, 0), epochs=2):
    return tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0,
                          "train.checkpoint_every": 2, "train.epochs": epochs, "train.knn_monitor": list(monitor)})


def hand_knn200(encoder: nn.Module, shard_dir, n_bank: int, n_test: int, mean=MEAN, std=STD) -> float:
    """Weighted kNN written out per query: weight exp(cos / 0.1) for each of the (up to 200) nearest bank images
    (the bank: the first `n_bank` train images; the queries: `n_test` test images evenly spaced)."""
    tf = eval_transform(32, mean, std)

    def encode(split, n):
        total = len(read_manifest(shard_dir, split))
        if split == "train":  # the bank: the first n of the (seeded random order) train shards
            keep = list(range(min(n, total)))
        else:  # the queries: evenly spaced, ends included
            keep = [round(i * (total - 1) / (n - 1)) for i in range(n)]
        rows = [r for i, r in enumerate(iter_split(shard_dir, split)) if i in keep]
        with torch.no_grad():
            f = encoder(torch.stack([tf(img) for _, _, img in rows])).double()
        return nn.functional.normalize(f, dim=1).numpy(), np.array([label for _, label, _ in rows])

    bank, bank_y = encode("train", n_bank)
    query, query_y = encode("test", n_test)
    right = 0
    for q, y in zip(query, query_y):
        sims = bank @ q
        nearest = np.argsort(-sims, kind="stable")[:200]
        votes = {}
        for i in nearest:
            votes[bank_y[i]] = votes.get(bank_y[i], 0.0) + np.exp(sims[i] / 0.1)
        right += max(votes, key=votes.get) == y
    return 100.0 * right / len(query)


def test_monitor_matches_a_hand_computed_knn_and_restores_modes(shard_dir):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoder.train()
    encoder[1].eval()  # a frozen BN inside a training encoder must stay frozen
    before = [m.training for m in encoder.modules()]
    monitor = KnnMonitor(shard_dir, 15, 7, 32, MEAN, STD, "cpu")
    top1 = monitor(encoder)
    assert [m.training for m in encoder.modules()] == before
    encoder.eval()
    assert top1 == pytest.approx(hand_knn200(encoder, shard_dir, 15, 7))


def test_cached_views_give_the_streamed_features_to_the_bit_for_every_encoder(shard_dir):
    """The monitor decodes its images once and reuses them each epoch: same features as `extract_features`
    (batch 512, shards read again) for an encoder whose weights change between calls, in any batch size."""
    from pipeline.eval.features import extract_features
    from pipeline.train.monitor import CPU_BATCH

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    cached = KnnMonitor(shard_dir, 15, 7, 32, MEAN, STD, "cpu", batch_size=4)
    streamed = KnnMonitor(shard_dir, 15, 7, 32, MEAN, STD, "cpu", cache_bytes=0)
    assert streamed.batch_size == CPU_BATCH
    for epoch in range(2):
        with torch.no_grad():
            encoder[0].weight.add_(0.1 * epoch)
        got, got_labels = cached._features(encoder, "test", 7)
        want, want_labels, _ = extract_features(encoder, shard_dir, "test", 32, MEAN, STD, 512, "cpu",
                                                positions=spread(len(read_manifest(shard_dir, "test")), 7))
        assert got.dtype == np.float32 and np.array_equal(got, want) and np.array_equal(got_labels, want_labels)
        assert cached(encoder) == streamed(encoder)
    assert set(cached._views) == {"train", "test"} and not streamed._views   # over the cap: read each time


def test_monitor_spreads_its_images_over_a_class_sorted_split(shard_dir):
    labels = [label for _, label, _ in iter_split(shard_dir, "test")]
    assert labels == sorted(labels)  # the test split keeps the source's class order: a prefix is one class
    assert spread(24, 6).tolist() == [0, 5, 9, 14, 18, 23] and spread(5, 9).tolist() == [0, 1, 2, 3, 4]
    monitor = KnnMonitor(shard_dir, 9, 6, 32, MEAN, STD, "cpu")
    _, test_labels = monitor._features(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), "test", 6)
    assert np.bincount(test_labels).tolist() == [2, 2, 2]


def test_monitor_leaves_training_bit_identical_and_records_every_epoch(tmp_path, shard_dir):
    off, on = project(tmp_path, "off", shard_dir), project(tmp_path, "on", shard_dir)
    train(params(), "simclr", root=off)
    p = params(monitor=(20, 9))
    summary = train(p, "simclr", root=on)
    assert_same_state(final_state(off, "simclr"), final_state(on, "simclr"))
    assert "knn_monitor" not in json.loads((off / "data/models/simclr/train.json").read_text())

    knn = summary["knn_monitor"]
    assert len(knn) == 3 and summary["knn_monitor_images"] == [20, 9]  # before training + 2 epochs
    curve = pd.read_csv(on / "data/models/simclr/curve.csv")
    assert curve["knn_top1"].tolist() == knn[1:]
    encoder, _ = load_encoder(on / "data/models/simclr/encoder.safetensors")  # the last value measures the exported encoder
    assert knn[-1] == pytest.approx(hand_knn200(encoder, shard_dir, 20, 9, p["dataset"]["mean"], p["dataset"]["std"]))


def test_monitor_survives_resume(tmp_path, shard_dir):
    full, cut = project(tmp_path, "full", shard_dir), project(tmp_path, "cut", shard_dir)
    p = params(monitor=(20, 9))
    want = train(p, "simclr", root=full)["knn_monitor"]
    train(p, "simclr", root=cut, max_steps=4)  # mid-epoch 2: epoch 0 and 1 are in the checkpoint
    assert train(p, "simclr", root=cut)["knn_monitor"] == want


def test_knn_monitor_param_is_checked():
    with pytest.raises(ParamError, match=r"train\.knn_monitor"):
        params(monitor=(10,))


def test_report_has_convergence_table_for_monitored_runs(tmp_path):
    write_metrics(tmp_path)
    path = tmp_path / "reports/metrics/pretrain/simclr.json"   # the report reads the published copy
    pre = json.loads(path.read_text())
    path.write_text(json.dumps({**pre, "knn_monitor": [22.5, 30.0, 35.25, 41.0], "knn_monitor_images": [100, 50]}))
    report = rb.build_report(tmp_path, RUNS, "cifar10", "t")
    table = next(t for t in report.tables if t.title.startswith("Convergence"))
    assert table.columns[-4:] == ["epoch 0", "epoch 1", "epoch 2", "epoch 3"]
    assert table.rows == [["simclr", "simclr", "100 / 50", "22.50", "30.00", "35.25", "41.00"]]
    assert "convergence.png" in report.figures
    write_metrics(tmp_path)  # no run monitored: no table, no figure
    report = rb.build_report(tmp_path, RUNS, "cifar10", "t")
    assert not any(t.title.startswith("Convergence") for t in report.tables) and "convergence.png" not in report.figures


def test_monitor_reads_only_its_own_train_images(tmp_path, shard_dir):
    # the bank is a prefix of the train shards: with the later train shards gone it measures the same
    import shutil

    from pipeline.data.shards import shard_paths

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    want = KnnMonitor(shard_dir, 5, 6, 32, MEAN, STD, "cpu")(encoder)  # 5 samples per shard: the first shard
    pruned = tmp_path / "pruned"
    shutil.copytree(shard_dir, pruned)
    later = shard_paths(pruned, "train")[1:]
    assert later
    for path in later:
        path.write_bytes(b"")  # unreadable: any read of them would fail
    assert KnnMonitor(pruned, 5, 6, 32, MEAN, STD, "cpu")(encoder) == want
