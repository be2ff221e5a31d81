"""Per-epoch kNN monitor: how fast a method learns, read off the encoder it would export at each epoch.

Convergence claims (GSSSL: "fast convergence") need accuracy per epoch, not only at the end. After every
`train.knn_monitor_every` epochs (always after the last, and once before training) the exported encoder is
frozen, `train_images` un-augmented training images form the kNN bank and `test_images` test images are
classified by weighted kNN (k = 200, τ = 0.1: the evaluate stage's defaults).

The monitor reads only its own images. The bank is the first `train_images` of the train shards, which
are written in a seeded random order (a prefix is a uniform random subset), so only the first shards are
read, not the whole train split. The test images are evenly spaced over their split in shard order: the
test split keeps the source's order, often sorted by class, where a prefix would hold only the first
classes; the others are not decoded. No random numbers are drawn, so a run trains bit-identically with the
monitor on or off; the main rank computes it while the others wait.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from pipeline.data.shards import read_manifest
from pipeline.eval.features import extract_features
from pipeline.eval.knn import knn_accuracy

K = 200
TEMPERATURE = 0.1


def spread(total: int, n: int) -> np.ndarray:
    """`n` positions evenly spaced over `total` (all of them when n >= total)."""
    return np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))


class KnnMonitor:
    def __init__(self, shard_dir: Path, train_images: int, test_images: int, image_size: int, mean, std,
                 device, batch_size: int = 512):
        self.shard_dir, self.train_images, self.test_images = shard_dir, train_images, test_images
        self.image_size, self.mean, self.std, self.device, self.batch_size = image_size, mean, std, device, batch_size

    @property
    def enabled(self) -> bool:
        return self.train_images > 0 and self.test_images > 0

    def _features(self, encoder: nn.Module, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The bank: a prefix of the (randomly ordered) train shards; the queries: spread over the test split."""
        if split == "train":
            where = {"limit": n}
        else:
            where = {"positions": spread(len(read_manifest(self.shard_dir, split)), n)}
        feats, labels, _ = extract_features(encoder, self.shard_dir, split, self.image_size, self.mean, self.std,
                                            self.batch_size, self.device, **where)
        return feats, labels

    def __call__(self, encoder: nn.Module) -> float:
        """kNN-200 top-1 (%) of `encoder`; leaves every module in the train/eval mode it found it in."""
        modes = [(m, m.training) for m in encoder.modules()]
        try:
            bank, bank_labels = self._features(encoder, "train", self.train_images)
            query, query_labels = self._features(encoder, "test", self.test_images)
        finally:
            for m, training in modes:
                m.training = training
        return knn_accuracy(bank, bank_labels, query, query_labels, [K], TEMPERATURE)[K]


def monitor_from_config(train_cfg: dict, shard_dir: Path, image_size: int, mean, std, device) -> KnnMonitor | None:
    n_train, n_test = train_cfg.get("knn_monitor", [0, 0])
    monitor = KnnMonitor(shard_dir, n_train, n_test, image_size, mean, std, device)
    return monitor if monitor.enabled else None

