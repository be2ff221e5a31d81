"""Frozen-backbone features of one split (no augmentation), and their `.npz` cache.

Features are extracted once per encoder by the features stage and reused by every protocol, so the
evaluate stage can be re-run (new k, new C grid, new seeds) without touching the encoder again.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.data.shards import iter_split, read_manifest
from pipeline.data.views import eval_transform
from pipeline.params import DataError
from pipeline.utils import atomic_write_with


@torch.no_grad()
def extract_features(backbone: nn.Module, shard_dir: str | Path, split: str, image_size: int, mean, std,
                     batch_size: int, device, limit: int = 0, positions=None,
                     bf16: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(feats float32 (N, D), labels int64 (N,), keys) for `split`, in shard (= manifest) order.

    `limit` > 0 keeps the first `limit` samples: the train shards are written in a seeded random order,
    so a prefix is a uniform random subset. `positions` keeps only the samples at these positions in shard
    order (the images SePP-ID mines), without decoding the others. `bf16=False` keeps float32 on CUDA too
    (mining compares cosines to 0.01: bf16's 8-bit mantissa would blur the window).
    """
    device = torch.device(device)
    transform = eval_transform(image_size, mean, std)
    backbone = backbone.to(device).eval()
    total = len(read_manifest(shard_dir, split))
    if limit:
        total = min(total, limit)
    if positions is not None:
        total = len(positions)
    # bf16 autocast only on CUDA: CPU bf16 matmuls are slow on most CPUs and change the numbers
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and bf16
                else contextlib.nullcontext())
    feats: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []
    images: list[torch.Tensor] = []

    def flush() -> None:
        x = torch.stack(images).to(device, non_blocking=True)
        with autocast:
            out = backbone(x)
        feats.append(out.float().cpu().numpy())
        images.clear()

    with tqdm(total=total, desc=f"features {split}", unit="img", dynamic_ncols=True) as bar:
        for key, label, img in iter_split(shard_dir, split, limit=limit, positions=positions):
            images.append(transform(img))
            labels.append(label)
            keys.append(key)
            if len(images) == batch_size:
                flush()
                bar.update(batch_size)
        if images:
            n = len(images)
            flush()
            bar.update(n)
    if not keys:
        raise DataError(f"{shard_dir}/{split}: no samples to extract features from")
    return np.concatenate(feats).astype(np.float32, copy=False), np.asarray(labels, dtype=np.int64), keys


def save_features(path: str | Path, feats: np.ndarray, labels: np.ndarray, keys: list[str]) -> None:
    """Write an `.npz` atomically (temp file beside it, fsync, rename): a crash never leaves a partial cache."""
    feats = np.asarray(feats, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    keys_arr = np.asarray(list(keys), dtype=str)
    if not (len(feats) == len(labels) == len(keys_arr)) or feats.ndim != 2:
        raise ValueError(f"save_features: shapes disagree (feats {feats.shape}, labels {labels.shape}, keys {keys_arr.shape})")
    # a file object (not a name), so numpy does not append another ".npz" to the temp name
    atomic_write_with(path, lambda f: np.savez(f, feats=feats, labels=labels, keys=keys_arr))


def load_features(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a cache written by `save_features`; a missing or damaged file names itself and the fix."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: features missing (run the features stage first: dvc repro)")
    try:
        # allow_pickle=False: keys are stored as a fixed-width unicode array, nothing needs unpickling
        with np.load(path, allow_pickle=False) as z:
            feats, labels, keys = z["feats"], z["labels"], z["keys"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: unreadable features cache ({type(e).__name__}: {e}); rerun: dvc repro -f features") from None
    if feats.ndim != 2 or not (len(feats) == len(labels) == len(keys)):
        raise DataError(f"{path}: inconsistent features cache (feats {feats.shape}, labels {labels.shape}, keys {keys.shape})")
    return feats.astype(np.float32, copy=False), labels.astype(np.int64, copy=False), keys.tolist()
