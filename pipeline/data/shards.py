"""Webdataset shards: the writer (deterministic bytes, optionally a process pool), the parquet manifest,
a sequential reader, and random access by a tar-header index (`TarIndex`, the training stream's).

Layout: `<out>/{train,test}/shard-NNNNNN.tar`, `<out>/manifest.parquet` (key, index, label, split,
shard, position), `<out>/meta.json` (classes, counts). Each tar member has a fixed mtime, owner and
mode, and the train split is written in a seeded random order, so the same params give byte-identical
shards (stable DVC hashes) and any prefix of the train shards is a uniform random subset.

Pair shards (SePP-ID, written by the mine stage): `<dir>/shard-NNNNNN.tar` + `<dir>/meta.json`; each
sample holds two images, `anchor.<ext>` and `positive.<ext>` (the original bytes, copied from the train
shards), and `pair.json` (their dataset indices and labels), so training streams pairs like images.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import webdataset as wds
from tqdm import tqdm

from pipeline.data.sources import Record, Source, check_record, decode_rgb
from pipeline.errors import DataError

SPLITS = ("train", "test")
PRETRAIN = "pretrain"                  # optional: what pretraining reads when not `train` (pipeline.data.sources)
SHUFFLED = ("train", PRETRAIN)         # written in seeded random order: any prefix is a uniform random subset
IMAGE_EXTS = ("jpg", "png", "jpeg", "webp", "bmp", "ppm")
PAIR_JSON = "pair.json"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def written_splits(source: Source) -> tuple[str, ...]:
    """train and test, and the pretraining split when the source has one."""
    return SPLITS + ((PRETRAIN,) if PRETRAIN in source.splits else ())


def pretrain_split(meta: dict) -> str:
    """The split a pretrain stage reads: `pretrain` when the shards hold one (dataset.pretrain), else `train`."""
    return PRETRAIN if PRETRAIN in meta.get("counts", {}) else "train"


def write_shards(source: Source, out: str | Path, samples_per_shard: int, seed: int, skip_corrupt: bool,
                 max_images: int = 0, workers: int = 1) -> dict:
    """Write all splits of `source` into `out` atomically (a sibling temp dir renamed at the end).

    `max_images` > 0 keeps a seeded random subset of that many images per split (quick profiles).
    `workers` > 1 (0: every core) checks the images and writes the shards in a process pool: first every
    image is decoded once (which are corrupt decides every later position), then each shard is written
    by one process from its list of images; the bytes are those of the single-process writer."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workers = workers or os.cpu_count() or 1
    rows, skipped = [], []
    for split in written_splits(source):
        recs = source.splits[split]
        order = np.random.default_rng(seed).permutation(len(recs)) if split in SHUFFLED else np.arange(len(recs))
        if max_images and max_images < len(recs):  # test keeps source order, on a random subset
            order = order[:max_images] if split in SHUFFLED else np.sort(np.random.default_rng(seed + 1).permutation(len(recs))[:max_images])
        (tmp / split).mkdir()
        todo = [recs[i] for i in order]
        kept = []
        for rec, msg in zip(todo, _checked(todo, skip_corrupt, workers, split)):
            if msg is None:
                kept.append(rec)
            else:
                skipped.append(msg)
        if not kept:
            raise DataError(f"{split}: no readable images in the source")
        shards = [kept[i:i + samples_per_shard] for i in range(0, len(kept), samples_per_shard)]
        jobs = [(str(tmp / split / f"shard-{j:06d}.tar"), split, chunk) for j, chunk in enumerate(shards)]
        for _ in _pool_map(_write_shard, jobs, workers, f"shard {split} (write)", "shard"):
            pass
        for position, rec in enumerate(kept):
            rows.append((sample_key(split, rec.index), rec.index, rec.label, split,
                         f"{split}/shard-{position // samples_per_shard:06d}.tar", position))
    manifest = pd.DataFrame(rows, columns=["key", "index", "label", "split", "shard", "position"])
    manifest.to_parquet(tmp / "manifest.parquet", index=False)
    counts = {s: int((manifest.split == s).sum()) for s in written_splits(source)}
    meta = {"classes": source.classes, "counts": counts, "samples_per_shard": samples_per_shard, "seed": seed,
            "max_images": max_images}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"images": counts, "skipped_corrupt": len(skipped), "skipped": skipped[:100],
            "shards": {s: len(list((out / s).glob("*.tar"))) for s in written_splits(source)}}


_CHECK_CHUNK = 256


def _checked(records: list[Record], skip_corrupt: bool, workers: int, split: str) -> list[str | None]:
    """Per record: None when it decodes, else the skip message (or DataError naming the first bad file)."""
    jobs = [(records[i:i + _CHECK_CHUNK], skip_corrupt) for i in range(0, len(records), _CHECK_CHUNK)]
    msgs: list[str | None] = []
    for part in _pool_map(_check_chunk, jobs, workers, f"shard {split} (check)", "img", sizes=[len(j[0]) for j in jobs]):
        msgs += part
    return msgs


def _check_chunk(job) -> list[str | None]:
    records, skip_corrupt = job
    return [check_record(r, skip_corrupt)[1] for r in records]


def _write_shard(job) -> None:
    path, split, records = job
    writer = wds.TarWriter(path, mtime=0.0, user="ssl", group="ssl", mode=0o444)
    try:
        for rec in records:
            writer.write({"__key__": sample_key(split, rec.index), rec.ext: rec.load(), "cls": str(rec.label).encode()})
    finally:
        writer.close()


_JOBS: list = []   # the pool's work list, inherited by the forked workers (records hold unpicklable loaders)


def _run_job(i: int):
    fn, job = _JOBS[i]
    return fn(job)


def _pool_map(fn, jobs: list, workers: int, desc: str, unit: str, sizes=None):
    """fn over jobs, results in order; a fork-started pool when workers > 1 (the jobs are not pickled: the
    workers inherit them), in this process otherwise. A DataError in a worker reaches the caller as is."""
    global _JOBS
    bar = tqdm(total=sum(sizes) if sizes else len(jobs), desc=desc, unit=unit, dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for k, job in enumerate(jobs):
                yield fn(job)
                bar.update(sizes[k] if sizes else 1)
            return
        _JOBS = [(fn, job) for job in jobs]
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            for k, result in enumerate(pool.imap(_run_job, range(len(jobs)))):
                yield result
                bar.update(sizes[k] if sizes else 1)
    finally:
        _JOBS = []
        bar.close()


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


def image_of(sample: dict, prefix: str = ""):
    """The decoded image of a sample; `prefix` picks one image of a pair sample ("anchor." / "positive.")."""
    for ext in IMAGE_EXTS:
        if prefix + ext in sample:
            return decode_rgb(sample[prefix + ext])
    raise DataError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__')} has no {prefix or ''}image member")


def iter_split(shard_dir: str | Path, split: str, limit: int = 0,
               positions=None) -> Iterator[tuple[str, int, "object"]]:
    """Every sample of a split in shard order, exactly once: (key, label, PIL image).

    `positions`: only the samples at these positions in shard order (e.g. the K images SePP-ID mines);
    the others are skipped without being decoded."""
    n = 0
    keep = None if positions is None else set(int(i) for i in positions)
    for path in shard_paths(shard_dir, split):
        for s in group_samples(path):
            if keep is None or n in keep:
                yield s["__key__"], int(s["cls"]), image_of(s)
            n += 1
            if limit and n >= limit:
                return


def index_of_key(key: str) -> int:
    """The dataset index in a sample key (`train-00001234` -> 1234)."""
    return int(key.rsplit("-", 1)[1])


# --- random access (the training stream) -----------------------------------------------------------

def _corrupt(path, why: str) -> DataError:
    # a pair shard (SePP-ID) sits beside its set's meta.json and is the mine stage's; a train shard is the shard stage's
    stage = "mine" if (Path(path).parent / "meta.json").exists() else "shard"
    return DataError(f"{path}: corrupt shard ({' '.join(why.split())}); rerun: dvc repro -f {stage}")   # one line


class TarIndex:
    """Random access to the samples of a list of (uncompressed) tar shards: where each member lies.

    Built once from the tar headers (nothing is decoded): sample i of the concatenated shards has members
    `first[i] .. first[i] + count[i] - 1` in flat numpy arrays (shard, byte offset, size, name), so an index
    of ImageNet's 1.28 M samples takes a few tens of MB and pickles cheaply into loader workers. Each worker
    process opens its own file handles (`read`), so any worker can read any sample: which images form a
    batch never depends on how the shards are dealt."""

    def __init__(self, paths, counts=None):
        """`counts[j]`: take the first counts[j] samples of shard j (a training subset, or all of them); a
        shard that holds fewer (a truncated tar ends early at a header) raises DataError naming it."""
        self.paths = [str(p) for p in paths]
        names: dict[str, int] = {}
        shard, offset, size, name, first, count, keys = [], [], [], [], [], [], []
        for j, path in enumerate(self.paths):
            want = counts[j] if counts is not None else 0
            n_before = len(first)
            for key, members in _scan_tar(path):
                if want and len(first) - n_before >= want:
                    break
                first.append(len(shard))
                count.append(len(members))
                keys.append(key)
                for suffix, off, sz in members:
                    shard.append(j)
                    offset.append(off)
                    size.append(sz)
                    name.append(names.setdefault(suffix, len(names)))
            if len(first) - n_before < want:
                raise _corrupt(path, f"{len(first) - n_before} samples, expected {want}: truncated?")
        self.names = list(names)
        self.shard, self.offset = np.asarray(shard, np.int32), np.asarray(offset, np.int64)
        self.size, self.name = np.asarray(size, np.int64), np.asarray(name, np.int16)
        self.first, self.count = np.asarray(first, np.int64), np.asarray(count, np.int16)
        self.keys = keys
        self._files: dict[int, object] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.first)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}, "_pid": None}   # file handles never cross a process boundary

    def read(self, i: int) -> dict:
        """Sample i as webdataset would group it: {'__key__', '__url__', '<suffix>': bytes, ...}."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        i = int(i)
        lo = int(self.first[i])
        path = self.paths[int(self.shard[lo])]
        sample = {"__key__": self.keys[i], "__url__": path}
        for m in range(lo, lo + int(self.count[i])):
            j = int(self.shard[m])
            f = self._files.get(j)
            if f is None:
                f = self._files[j] = open(self.paths[j], "rb")
            f.seek(int(self.offset[m]))
            data = f.read(int(self.size[m]))
            if len(data) != int(self.size[m]):
                raise _corrupt(path, f"sample {self.keys[i]} is cut short")
            sample[self.names[int(self.name[m])]] = data
        return sample


def _scan_tar(path) -> Iterator[tuple[str, list[tuple[str, int, int]]]]:
    """(key, [(suffix, data offset, size)]) per sample of one tar, from its headers; a truncated or
    corrupt tar raises DataError naming it."""
    end = os.path.getsize(path)
    key, members = None, []
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > end:
                    raise _corrupt(path, f"member {info.name} runs past the end of the file")
                k, _, suffix = info.name.partition(".")
                if k != key and members:
                    yield key, members
                    members = []
                key = k
                members.append((suffix, info.offset_data, info.size))
    except (OSError, tarfile.TarError, EOFError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None
    if members:
        yield key, members


# --- pair shards (SePP-ID) ---------------------------------------------------------------------------

class MemberReader:
    """Random access to the image bytes of chosen train samples, by seeking in the (uncompressed) tars.

    Only tar headers are scanned, and only of the shards that hold a wanted key; nothing is decoded or
    held in memory but (offset, size) per wanted image, so pair shards can be written for any dataset size."""

    def __init__(self, shard_dir: str | Path, split: str, indices):
        shard_dir = Path(shard_dir)
        m = read_manifest(shard_dir, split)
        want = m[m["index"].isin(set(int(i) for i in indices))]
        self.where: dict[int, tuple[Path, int, int, str]] = {}
        for shard, rows in want.groupby("shard", sort=True):
            path = shard_dir / shard
            wanted = set(rows["key"])
            try:
                with tarfile.open(path) as tar:
                    for info in tar:
                        key, _, ext = info.name.partition(".")
                        if key in wanted and ext in IMAGE_EXTS:
                            self.where[index_of_key(key)] = (path, info.offset_data, info.size, ext)
            except (OSError, tarfile.TarError) as e:
                raise DataError(f"{path}: corrupt shard ({type(e).__name__}: {e}); rerun: dvc repro -f shard") from None
        missing = set(int(i) for i in indices) - set(self.where)
        if missing:
            raise DataError(f"{shard_dir}/{split}: no image for dataset index {min(missing)} (shards and pairs disagree; "
                            "rerun: dvc repro mine)")
        self._files: dict[Path, object] = {}

    def read(self, index: int) -> tuple[bytes, str]:
        path, offset, size, ext = self.where[int(index)]
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
        f.seek(offset)
        return f.read(size), ext

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def write_pair_shards(shard_dir: str | Path, out: str | Path, anchor, positive, labels: dict[int, int],
                      samples_per_shard: int, seed: int, desc: str = "pair shards") -> dict:
    """One sample per pair (anchor image, positive image, pair.json) into `out/shard-*.tar` + `out/meta.json`.

    anchor, positive: dataset indices of train images. Pairs are written in a seeded random order (any prefix
    is a random subset; the loader's shuffle buffer mixes them with the originals). Bytes are deterministic
    (fixed mtime/owner/mode, as the train shards). `out` must not exist yet: the caller renames a whole
    temporary directory into place."""
    a, p = np.asarray(anchor, np.int64), np.asarray(positive, np.int64)
    out = Path(out)
    out.mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(len(a))
    reader = MemberReader(shard_dir, "train", np.union1d(a, p)) if len(a) else None
    writer = None
    try:
        for n, r in enumerate(tqdm(order, total=len(a), desc=desc, unit="pair", dynamic_ncols=True)):
            if n % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                writer = wds.TarWriter(str(out / f"shard-{n // samples_per_shard:06d}.tar"), mtime=0.0, user="ssl",
                                       group="ssl", mode=0o444)
            ai, pi = int(a[r]), int(p[r])
            (a_bytes, a_ext), (p_bytes, p_ext) = reader.read(ai), reader.read(pi)
            info = {"anchor": ai, "positive": pi, "anchor_label": int(labels[ai]), "positive_label": int(labels[pi]),
                    "row": int(r)}
            writer.write({"__key__": f"pair-{n:08d}", f"anchor.{a_ext}": a_bytes, f"positive.{p_ext}": p_bytes,
                          PAIR_JSON: json.dumps(info, sort_keys=True).encode()})
    finally:
        if writer is not None:
            writer.close()
        if reader is not None:
            reader.close()
    # the digest names the pair set: a checkpoint trained on other pairs is not resumed
    digest = hashlib.sha256(np.stack([a[order], p[order]]).tobytes()).hexdigest()[:16]
    meta = {"pairs": int(len(a)), "samples_per_shard": samples_per_shard, "shards": -(-len(a) // samples_per_shard),
            "digest": digest}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def read_pair_meta(pair_dir: str | Path) -> dict:
    """meta.json of one pair set (pairs, shards, digest); DataError naming the directory when it is missing."""
    path = Path(pair_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"{pair_dir}: no pair shards (run the mine stage first: dvc repro mine)")
    return json.loads(path.read_text())


def pair_shard_paths(pair_dir: str | Path) -> tuple[list[Path], int]:
    """(shard paths, number of pairs) of one pair set."""
    meta = read_pair_meta(pair_dir)
    paths = sorted(Path(pair_dir).glob("shard-*.tar"))
    if len(paths) != meta["shards"]:
        raise DataError(f"{pair_dir}: {len(paths)} shards, meta.json says {meta['shards']}; rerun: dvc repro -f mine")
    return paths, int(meta["pairs"])


def pair_info(sample: dict) -> dict | None:
    """The pair.json of a pair sample, None for an ordinary image sample."""
    raw = sample.get(PAIR_JSON)
    return None if raw is None else json.loads(raw)

