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

The images are decoded once per run and kept (`DecodedViews`) while they fit in `cache_bytes`; each epoch
then costs the encoder's forward alone. On a CPU the batches are small (`CPU_BATCH`): at 32 px ResNet-18 w16
encodes batches of 64 about 2x faster than 512, ViT-Tiny as fast (`bare_over_bare_b64` in
benchmarks/results/features-cpu.json); the features do not depend on the batch size (tested), so the
monitor's numbers are the streamed path's.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data.eval_view import eval_transform
from pipeline.data.shards import read_manifest
from pipeline.eval.features import SplitBatches, extract_features, wanted_positions
from pipeline.eval.knn import knn_accuracy

K = 200
TEMPERATURE = 0.1
CACHE_BYTES = 2 << 30   # decoded float32 views kept across epochs up to this size; beyond it, re-read each time
CPU_BATCH, DEVICE_BATCH = 64, 512


def spread(total: int, n: int) -> np.ndarray:
    """`n` positions evenly spaced over `total` (all of them when n >= total)."""
    return np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))


class DecodedViews:
    """The eval views of the monitor's images of one split, decoded once and kept in memory: `encode` gives
    `extract_features`' features to the bit (the same batches through the same forward, tested) without
    reading or decoding the shards again."""

    def __init__(self, shard_dir: Path, split: str, image_size: int, mean, std, batch_size: int, limit: int = 0,
                 positions=None):
        manifest = read_manifest(shard_dir, split).sort_values("position", kind="stable").reset_index(drop=True)
        wanted = wanted_positions(len(manifest), limit, positions)
        data = SplitBatches(Path(shard_dir), split, manifest, wanted, range(-(-len(wanted) // batch_size)),
                            batch_size, eval_transform(image_size, mean, std))
        self.batches = [x for _, x in data]   # rows 0..n-1 in order, batch by batch
        self.labels = manifest["label"].to_numpy(np.int64)[wanted]

    @torch.no_grad()
    def encode(self, backbone: nn.Module, device) -> np.ndarray:
        """(N, D) float32 features, in shard order; as `extract_features` (bf16 autocast on CUDA only)."""
        device = torch.device(device)
        backbone = backbone.to(device).eval()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            return torch.cat([backbone(x.to(device)).float().cpu() for x in self.batches]).numpy()


class KnnMonitor:
    def __init__(self, shard_dir: Path, train_images: int, test_images: int, image_size: int, mean, std,
                 device, batch_size: int | None = None, cache_bytes: int = CACHE_BYTES):
        self.shard_dir, self.train_images, self.test_images = shard_dir, train_images, test_images
        self.image_size, self.mean, self.std, self.device = image_size, mean, std, device
        self.batch_size = batch_size or (CPU_BATCH if str(device) == "cpu" else DEVICE_BATCH)
        self.cache_bytes = cache_bytes
        self._views: dict[str, DecodedViews] = {}

    @property
    def enabled(self) -> bool:
        return self.train_images > 0 and self.test_images > 0

    def _where(self, split: str, n: int) -> dict:
        """The bank: a prefix of the (randomly ordered) train shards; the queries: spread over the test split."""
        if split == "train":
            return {"limit": n}
        return {"positions": spread(len(read_manifest(self.shard_dir, split)), n)}

    def _features(self, encoder: nn.Module, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        view_args = (self.shard_dir, split, self.image_size, self.mean, self.std, self.batch_size)
        if split not in self._views and n * 3 * self.image_size ** 2 * 4 <= self.cache_bytes:
            self._views[split] = DecodedViews(*view_args, **self._where(split, n))
        if split in self._views:
            views = self._views[split]
            return views.encode(encoder, self.device), views.labels
        feats, labels, _ = extract_features(encoder, *view_args, self.device, **self._where(split, n))
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

