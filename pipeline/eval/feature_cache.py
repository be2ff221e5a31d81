"""The features cache of one run (`data/features/<run>/`), never held whole in RAM: `<split>.npy` float32 (N, D),
filled through `np.lib.format.open_memmap` in a temp file renamed when complete; `<split>-labels.npy` int64 (N,);
`<split>-keys.npy` unicode (N,), the shard sample keys. `load_features` maps the features back read-only.

Apart from the extraction (`pipeline.eval.features`), so the evaluate stage, which only reads the cache, does not
depend on the eval view, the shard reader or the extraction loop.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.utils import atomic_write_with


def feature_paths(feat_dir: str | Path, split: str) -> dict[str, Path]:
    feat_dir = Path(feat_dir)
    return {"feats": feat_dir / f"{split}.npy", "labels": feat_dir / f"{split}-labels.npy",
            "keys": feat_dir / f"{split}-keys.npy"}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    # a file object (not a name), so numpy does not append another ".npy" to the temp name
    atomic_write_with(path, lambda f: np.save(f, arr, allow_pickle=False))


def write_labels_keys(paths: dict[str, Path], labels, keys) -> None:
    _save_npy(paths["labels"], np.asarray(labels, dtype=np.int64))
    _save_npy(paths["keys"], np.asarray(list(keys), dtype=str))


class MemmapRows:
    """`allocate(n, D)` for `_extract`: an (n, D) float32 `.npy` memmap in a temp file beside `path`;
    `commit()` flushes, fsyncs and renames it into place, `discard()` removes it."""

    def __init__(self, path: Path):
        self.path, self.tmp, self.array = Path(path), None, None

    def __call__(self, n: int, d: int) -> np.memmap:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(n, d))
        return self.array

    def commit(self) -> None:
        self.array.flush()
        del self.array  # unmap before the rename
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            Path(self.tmp).unlink(missing_ok=True)


def save_features(feat_dir: str | Path, split: str, feats: np.ndarray, labels: np.ndarray, keys: list[str]) -> None:
    """Write in-memory features as the cache of `split` in `feat_dir`, each file atomically."""
    feats = np.asarray(feats, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if not (len(feats) == len(labels) == len(keys)) or feats.ndim != 2:
        raise ValueError(f"save_features: shapes disagree (feats {feats.shape}, labels {labels.shape}, keys {len(keys)})")
    paths = feature_paths(feat_dir, split)
    write_labels_keys(paths, labels, keys)
    _save_npy(paths["feats"], feats)


def _load(path: Path, mmap: bool) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: features missing (run the features stage first: dvc repro)")
    try:
        # allow_pickle=False: keys are a fixed-width unicode array, nothing needs unpickling
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataError(f"{path}: unreadable features cache ({why}); rerun: dvc repro -f features") from None


def load_features(feat_dir: str | Path, split: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(feats float32 (N, D), labels int64 (N,), keys) of `split` from `feat_dir`; `mmap=True` maps the
    features read-only instead of reading them (an np.memmap: copy before changing it in place). A missing
    or damaged file is a one-line DataError naming it and the fix."""
    paths = feature_paths(feat_dir, split)
    feats = _load(paths["feats"], mmap)
    labels, keys = _load(paths["labels"], False), _load(paths["keys"], False)
    if (feats.ndim != 2 or feats.dtype != np.float32 or labels.ndim != 1 or labels.dtype.kind not in "iu"
            or keys.ndim != 1 or keys.dtype.kind != "U" or not (len(feats) == len(labels) == len(keys))):
        raise DataError(f"{paths['feats']}: inconsistent features cache (feats {feats.shape} {feats.dtype}, labels "
                        f"{labels.shape} {labels.dtype}, keys {keys.shape} {keys.dtype}); rerun: dvc repro -f features")
    return feats, labels.astype(np.int64, copy=False), keys.tolist()
