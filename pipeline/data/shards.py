"""Webdataset shards: the writer (deterministic bytes), the parquet manifest, and a sequential reader.

Layout: `<out>/{train,test}/shard-NNNNNN.tar`, `<out>/manifest.parquet` (key, index, label, split,
shard, position), `<out>/meta.json` (classes, counts). Each tar member has a fixed mtime, owner and
mode, and the train split is written in a seeded random order, so the same params give byte-identical
shards (stable DVC hashes) and any prefix of the train shards is a uniform random subset.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import webdataset as wds
from tqdm import tqdm

from pipeline.data.sources import Source, decode_rgb, iter_checked
from pipeline.params import DataError

SPLITS = ("train", "test")


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def write_shards(source: Source, out: str | Path, samples_per_shard: int, seed: int, skip_corrupt: bool,
                 max_images: int = 0) -> dict:
    """Write all splits of `source` into `out` atomically (a sibling temp dir renamed at the end).

    `max_images` > 0 keeps a seeded random subset of that many images per split (quick profiles)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows, skipped = [], []
    for split in SPLITS:
        recs = source.splits[split]
        order = np.random.default_rng(seed).permutation(len(recs)) if split == "train" else np.arange(len(recs))
        if max_images and max_images < len(recs):  # test keeps source order, on a random subset
            order = order[:max_images] if split == "train" else np.sort(np.random.default_rng(seed + 1).permutation(len(recs))[:max_images])
        (tmp / split).mkdir()
        writer, shard_name, position = None, None, 0
        checked = iter_checked([recs[i] for i in order], skip_corrupt, lambda r, msg: skipped.append(msg))
        for rec, data in tqdm(checked, total=len(recs), desc=f"shard {split}", unit="img", dynamic_ncols=True):
            if position % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                shard_name = f"shard-{position // samples_per_shard:06d}.tar"
                writer = wds.TarWriter(str(tmp / split / shard_name), mtime=0.0, user="ssl", group="ssl", mode=0o444)
            key = sample_key(split, rec.index)
            writer.write({"__key__": key, rec.ext: data, "cls": str(rec.label).encode()})
            rows.append((key, rec.index, rec.label, split, f"{split}/{shard_name}", position))
            position += 1
        if writer is not None:
            writer.close()
        if position == 0:
            raise DataError(f"{split}: no readable images in the source")
    manifest = pd.DataFrame(rows, columns=["key", "index", "label", "split", "shard", "position"])
    manifest.to_parquet(tmp / "manifest.parquet", index=False)
    counts = {s: int((manifest.split == s).sum()) for s in SPLITS}
    meta = {"classes": source.classes, "counts": counts, "samples_per_shard": samples_per_shard, "seed": seed,
            "max_images": max_images}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"images": counts, "skipped_corrupt": len(skipped), "skipped": skipped[:100],
            "shards": {s: len(list((out / s).glob("*.tar"))) for s in SPLITS}}


def read_manifest(shard_dir: str | Path, split: str | None = None) -> pd.DataFrame:
    path = Path(shard_dir) / "manifest.parquet"
    if not path.exists():
        raise DataError(f"{path}: missing (run the shard stage first: dvc repro shard)")
    m = pd.read_parquet(path)
    return m[m.split == split].reset_index(drop=True) if split else m


def read_meta(shard_dir: str | Path) -> dict:
    return json.loads((Path(shard_dir) / "meta.json").read_text())


def shard_paths(shard_dir: str | Path, split: str) -> list[Path]:
    paths = sorted((Path(shard_dir) / split).glob("shard-*.tar"))
    if not paths:
        raise DataError(f"{Path(shard_dir) / split}: no shards (run the shard stage first: dvc repro shard)")
    return paths


def iter_raw(path: Path) -> Iterator[dict]:
    """Raw samples of one shard: {'__key__', '<ext>': bytes, 'cls': bytes}; a broken tar names the shard."""
    try:
        for sample in wds.tariterators.tar_file_expander([{"url": str(path), "stream": open(path, "rb")}]):
            yield sample
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: corrupt shard ({type(e).__name__}: {e}); rerun: dvc repro -f shard") from None


def group_samples(path: Path) -> Iterator[dict]:
    """Group tar members by key into samples (webdataset's own grouping)."""
    for s in wds.tariterators.group_by_keys(iter_raw(path)):
        yield s


def image_of(sample: dict):
    for ext in ("jpg", "png", "jpeg", "webp", "bmp", "ppm"):
        if ext in sample:
            return decode_rgb(sample[ext])
    raise DataError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__')} has no image member")


def iter_split(shard_dir: str | Path, split: str, limit: int = 0) -> Iterator[tuple[str, int, "object"]]:
    """Every sample of a split in shard order, exactly once: (key, label, PIL image)."""
    n = 0
    for path in shard_paths(shard_dir, split):
        for s in group_samples(path):
            yield s["__key__"], int(s["cls"]), image_of(s)
            n += 1
            if limit and n >= limit:
                return

