"""Frozen-backbone features of one split (no augmentation): extracted in parallel, cached memory-mapped.

Features are extracted once per encoder by the features stage and reused by every protocol, so the
evaluate stage can be re-run (new k, new C grid, new seeds) without touching the encoder again.

Parallel extraction: the wanted images are cut into batches of `batch_size` consecutive images (in shard =
manifest order). DataLoader workers decode and apply the eval view (`pipeline.data.eval_view`), each worker
streaming a contiguous run of batches from the shards it needs; under torchrun (`distributed=True`) each
rank takes a contiguous run of the batches, and after every step the ranks' batch features are gathered so
rank 0 writes each row at its place. A batch holds the same images whatever the number of workers or ranks,
so the features equal a single process's (tested).

The cache it writes (memory-mapped `.npy` files) is `pipeline.eval.feature_cache`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.data.eval_view import DEFAULT_CROP_RATIO, eval_transform
from pipeline.device import full_fp32
from pipeline.data.shards import group_samples, image_of, read_manifest
from pipeline.errors import DataError
from pipeline.eval.feature_cache import MemmapRows, feature_paths, write_labels_keys
from pipeline import dist


# --- which images, which batches -------------------------------------------------------------------------

def wanted_positions(total: int, limit: int = 0, positions=None) -> np.ndarray:
    """Sorted positions (in shard order) to extract: the first `limit` (0: all), or only `positions` among them."""
    n = min(total, limit) if limit else total
    if positions is None:
        return np.arange(n, dtype=np.int64)
    pos = np.unique(np.asarray(positions, dtype=np.int64))
    return pos[(pos >= 0) & (pos < n)]  # positions past the split are not read (callers count what came back)


def share(count: int, parts: int, part: int) -> range:
    """Part `part` of `parts` of range(count): a contiguous run; sizes differ by at most one."""
    return range(part * count // parts, (part + 1) * count // parts)


class SplitBatches(IterableDataset):
    """(rows int64 (b,), images (b, C, H, W)) for the batches `batches` of the wanted positions.

    Each DataLoader worker streams the shards of its own contiguous run of batches and decodes only the
    wanted samples; a sample whose key or label disagrees with the manifest names its shard."""

    def __init__(self, shard_dir: Path, split: str, manifest, wanted: np.ndarray, batches: range,
                 batch_size: int, transform):
        self.shard_dir, self.split, self.wanted, self.batches = Path(shard_dir), split, wanted, batches
        self.batch_size, self.transform = batch_size, transform
        self.keys = manifest["key"].to_numpy()
        self.labels = manifest["label"].to_numpy(np.int64)
        self.shards = manifest["shard"].to_numpy()
        starts = manifest.groupby("shard", sort=False)["position"].min()
        self.shard_start = {str(k): int(v) for k, v in starts.items()}

    def _my_batches(self) -> range:
        info = get_worker_info()
        if info is None:
            return self.batches
        sub = share(len(self.batches), info.num_workers, info.id)
        return self.batches[sub.start:sub.stop]

    def __iter__(self):
        mine = self._my_batches()
        if not len(mine):
            return
        r0, r1 = mine.start * self.batch_size, min(mine.stop * self.batch_size, len(self.wanted))
        i, rows, images = r0, [], []
        for shard in dict.fromkeys(self.shards[self.wanted[r0:r1]]):  # the shards holding them, in order
            path, pos = self.shard_dir / shard, self.shard_start[str(shard)]
            for s in group_samples(path):
                if i < r1 and pos == self.wanted[i]:
                    if s["__key__"] != self.keys[pos] or int(s["cls"]) != self.labels[pos]:
                        raise DataError(f"{path}: sample {s['__key__']} is not {self.keys[pos]} of the manifest; "
                                        "rerun: dvc repro -f shard")
                    rows.append(i)
                    images.append(self.transform(image_of(s)))
                    i += 1
                    if i == r1 or i % self.batch_size == 0:
                        yield torch.as_tensor(rows, dtype=torch.int64), torch.stack(images)
                        rows, images = [], []
                pos += 1
                if i == r1 or self.shards[self.wanted[i]] != shard:
                    break  # the rest of this shard holds nothing wanted
        if i != r1:
            raise DataError(f"{self.shard_dir}/{self.split}: shards end before position {self.wanted[i]} of the "
                            "manifest; rerun: dvc repro -f shard")


def _gather(rows: torch.Tensor, feats: torch.Tensor | None, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All ranks' (rows, features) of this step, in rank order; ranks out of batches send none (padding)."""
    d = feats.shape[1] if feats is not None else 0
    meta = dist.gather_no_grad(torch.tensor([[len(rows), d]], dtype=torch.int64, device=device))
    D = int(meta[:, 1].max())
    if D == 0:
        return torch.empty(0, dtype=torch.int64), None
    f = torch.zeros(batch_size, D, dtype=torch.float32, device=device)
    r = torch.full((batch_size,), -1, dtype=torch.int64, device=device)
    if feats is not None:
        f[:len(rows)], r[:len(rows)] = feats, rows.to(device)
    f, r = dist.gather_no_grad(f), dist.gather_no_grad(r)
    keep = r >= 0
    return r[keep].cpu(), f[keep]


@torch.no_grad()
def _extract(backbone: nn.Module, shard_dir, split: str, image_size: int, mean, std, batch_size: int, device,
             limit: int, positions, bf16: bool, num_workers: int, crop_ratio: float, distributed: bool, allocate):
    """Run the encoder over the wanted images; `allocate(n, D)` returns the (n, D) array rows are written into
    (None: this rank keeps nothing). Returns (that array, wanted positions, the split's manifest, D)."""
    device = torch.device(device)
    manifest = read_manifest(shard_dir, split)
    manifest = manifest.sort_values("position", kind="stable").reset_index(drop=True)
    if not np.array_equal(manifest["position"].to_numpy(), np.arange(len(manifest))):
        raise DataError(f"{shard_dir}/manifest.parquet: {split} positions are not 0..{len(manifest) - 1}; "
                        "rerun: dvc repro -f shard")
    wanted = wanted_positions(len(manifest), limit, positions)
    n = len(wanted)
    if n == 0:
        raise DataError(f"{shard_dir}/{split}: no samples to extract features from")
    world, rank = (dist.world_size(), dist.rank()) if distributed else (1, 0)
    n_batches = -(-n // batch_size)
    batches = share(n_batches, world, rank)
    steps = -(-n_batches // world)  # the most batches any rank has: every rank gathers this often
    data = SplitBatches(Path(shard_dir), split, manifest, wanted, batches, batch_size,
                        eval_transform(image_size, mean, std, crop_ratio))
    loader = DataLoader(data, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=2 if num_workers else None)
    backbone = backbone.to(device).eval()
    # bf16 autocast only on CUDA: CPU bf16 matmuls are slow on most CPUs and change the numbers
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and bf16
                else contextlib.nullcontext())
    # bf16=False means fp32 on any device (mining): cuDNN's convolutions default to TF32 on CUDA, so turn it off
    # (issue 23, defect 9); under bf16 autocast it keeps the ops autocast leaves in fp32 exact as well
    precision = full_fp32() if device.type == "cuda" else contextlib.nullcontext()
    out, written, D = None, 0, 0
    batches_in = iter(loader)
    with precision, tqdm(total=n, desc=f"features {split}", unit="img", dynamic_ncols=True, disable=rank != 0) as bar:
        for _ in range(steps):
            batch = next(batches_in, None)
            rows, feats = torch.empty(0, dtype=torch.int64), None
            if batch is not None:
                rows, x = batch
                with autocast:
                    feats = backbone(x.to(device, non_blocking=True)).float()
            if world > 1:
                rows, feats = _gather(rows, feats, batch_size, device)
            if feats is None:
                continue
            feats = feats.cpu().numpy()
            if written == 0:
                D = feats.shape[1]
                out = allocate(n, D)
            if out is not None:
                out[rows.numpy()] = feats
            written += len(rows)
            bar.update(len(rows))
    del batches_in  # shuts the workers down
    if written != n:  # every row exactly once: a hole would be silent garbage in a memmap
        raise DataError(f"{shard_dir}/{split}: {written} of {n} features extracted; rerun: dvc repro -f shard")
    return out, wanted, manifest, D


def extract_features(backbone: nn.Module, shard_dir: str | Path, split: str, image_size: int, mean, std,
                     batch_size: int, device, limit: int = 0, positions=None, bf16: bool = True,
                     num_workers: int = 0, crop_ratio: float = DEFAULT_CROP_RATIO,
                     distributed: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(feats float32 (N, D), labels int64 (N,), keys) for `split`, in shard (= manifest) order, in memory.

    `limit` > 0 keeps the first `limit` samples: the train shards are written in a seeded random order,
    so a prefix is a uniform random subset. `positions` keeps only the samples at these positions in shard
    order (the images SePP-ID mines), without decoding the others. `bf16=False` keeps float32 on CUDA too
    (mining compares cosines to 0.01: bf16's 8-bit mantissa would blur the window). `num_workers`: DataLoader
    processes that decode and transform (0: in this process; the features do not depend on it).
    `distributed=True` splits the work over the torchrun ranks (every rank must call it, every rank gets all
    the features); False (the default) is safe to call from one rank alone, as the kNN monitor does.
    """
    feats, wanted, manifest, _ = _extract(backbone, shard_dir, split, image_size, mean, std, batch_size, device, limit,
                                          positions, bf16, num_workers, crop_ratio, distributed,
                                          lambda n, d: np.empty((n, d), np.float32))
    return feats, manifest["label"].to_numpy(np.int64)[wanted], manifest["key"].to_numpy()[wanted].tolist()


def extract_features_to(feat_dir: str | Path, split: str, backbone: nn.Module, shard_dir: str | Path,
                        image_size: int, mean, std, batch_size: int, device, limit: int = 0, bf16: bool = True,
                        num_workers: int = 0, crop_ratio: float = DEFAULT_CROP_RATIO,
                        distributed: bool = True) -> tuple[int, int]:
    """Extract `split` straight into the cache of `feat_dir` (rank 0 writes; every rank must call it under
    torchrun). The features go row by row into a memmap, so they are never whole in RAM. Returns (N, D)."""
    paths = feature_paths(feat_dir, split)
    sink = MemmapRows(paths["feats"])
    keep = not distributed or dist.is_main()
    try:
        feats, wanted, manifest, D = _extract(backbone, shard_dir, split, image_size, mean, std, batch_size, device,
                                              limit, None, bf16, num_workers, crop_ratio, distributed,
                                              sink if keep else (lambda n, d: None))
        if keep:
            # labels and keys first: the features file appears last, once everything it needs is in place
            write_labels_keys(paths, manifest["label"].to_numpy(np.int64)[wanted], manifest["key"].to_numpy()[wanted])
            del feats
            sink.commit()
    finally:
        sink.discard()
    return len(wanted), D
