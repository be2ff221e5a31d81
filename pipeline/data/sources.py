"""Image sources for the shard stage: torchvision datasets (CIFAR-10/100, STL-10), ImageFolder trees, webdataset
shards (local or remote, `pipeline.data.remote`), and the unlabelled images pretraining may read instead.

Splits: `train` and `test` are labelled (evaluation reads them); an optional `pretrain` split holds what the
pretrain stages read when `dataset.pretrain` is set (STL-10's train + unlabeled, an image folder, shards), with
label -1: no label reaches training. Without `dataset.pretrain`, pretraining reads `train` as before.

A source yields `Record`s in its own canonical order (index = position in that order). Encoded bytes
are what goes into the shards: ImageFolder files are stored as they are (no re-encoding, so shards are
byte-identical for the same files), torchvision arrays are encoded losslessly as PNG.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from pipeline.data import remote  # module level: every stage that reads sources imports it (DAG deps stay exact)
from pipeline.errors import DataError, ParamError

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".bmp": "bmp", ".webp": "webp", ".ppm": "ppm"}


@dataclass
class Record:
    index: int
    label: int
    ext: str                      # webdataset extension of the image bytes
    load: Callable[[], bytes]     # returns encoded image bytes
    origin: str                   # file path or "<dataset>[split][i]" for error messages


@dataclass
class Source:
    classes: list[str]
    splits: dict[str, list[Record]]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def imagefolder(root: str | Path) -> Source:
    """`root/train/<class>/*` and `root/test/<class>/*` (classes sorted by name, files sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise ParamError(f"dataset.root: {root} is not a directory")
    split_dirs = {s: root / s for s in ("train", "test")}
    missing = [s for s, d in split_dirs.items() if not d.is_dir()]
    if missing:
        raise ParamError(f"dataset.root: {root} has no {'/'.join(missing)}/ folder (an ImageFolder root needs train/ and test/)")
    classes = sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir())
    if not classes:
        raise ParamError(f"dataset.root: {split_dirs['train']} has no class folders")
    splits: dict[str, list[Record]] = {}
    for split, d in split_dirs.items():
        recs: list[Record] = []
        for label, cls in enumerate(classes):
            cdir = d / cls
            if not cdir.is_dir():
                continue
            for f in sorted(cdir.iterdir()):
                ext = IMAGE_EXTS.get(f.suffix.lower())
                if ext is None or not f.is_file():
                    continue
                recs.append(Record(len(recs), label, ext, f.read_bytes, str(f)))
        if not recs:
            raise ParamError(f"dataset.root: {d} holds no images ({', '.join(sorted(set(IMAGE_EXTS.values())))}) "
                             f"in its class folders")
        extra = sorted({p.name for p in d.iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise ParamError(f"dataset.root: {d} has class folders not in train/: {', '.join(extra)}")
        splits[split] = recs
    return Source(classes, splits)


def torchvision_source(name: str, root: str | Path) -> Source:
    """CIFAR-10 / CIFAR-100 / STL-10 through torchvision, downloaded into `root` when absent."""
    import torchvision.datasets as tvd

    root = Path(root)
    makers = {
        "cifar10": lambda split: tvd.CIFAR10(root, train=split == "train", download=True),
        "cifar100": lambda split: tvd.CIFAR100(root, train=split == "train", download=True),
        "stl10": lambda split: tvd.STL10(root, split=split, download=True),
    }
    splits: dict[str, list[Record]] = {}
    classes: list[str] = []
    for split in ("train", "test"):
        try:
            ds = makers[name](split)
        except Exception as e:  # offline, a proxy, a truncated archive: say how to point at a local copy
            raise ParamError(
                f"dataset.source={name}: could not load or download into {root} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                f"put the torchvision files there (set dataset.root) or use source: imagefolder with a local folder"
            ) from None
        classes = list(getattr(ds, "classes", [])) or [str(i) for i in range(10)]
        labels = ds.targets if hasattr(ds, "targets") else ds.labels
        recs = []
        for i in range(len(ds)):
            recs.append(Record(i, int(labels[i]), "png", (lambda ds=ds, i=i: _png(ds[i][0])), f"{name}[{split}][{i}]"))
        splits[split] = recs
    return Source(classes, splits)


def open_source(dataset: dict) -> Source:
    if dataset["source"] != "webdataset" and not dataset.get("root"):
        raise ParamError(f"dataset.root: required for source {dataset['source']} (a folder or torchvision download dir)")
    if dataset["source"] == "imagefolder":
        src = imagefolder(dataset["root"])
    elif dataset["source"] == "webdataset":
        src = webdataset_source(dataset)
    elif dataset["source"] == "stl10" and stl10_binary_present(dataset["root"]):
        src = stl10_local(dataset["root"], ("train", "test"))
    else:
        src = torchvision_source(dataset["source"], dataset["root"])
    if dataset.get("pretrain"):
        src.splits[PRETRAIN] = pretrain_records(dataset, src)
    return src


# --- unlabelled pretraining data ----------------------------------------------------------------------

PRETRAIN = "pretrain"     # the shard split pretraining reads when dataset.pretrain is set
UNLABELLED = -1           # the label of every pretraining record: labels are for evaluation only
UNLABELED_SPLIT = "unlabeled"   # STL-10's (torchvision's spelling); an ImageFolder root's `unlabeled/` folder


def _unlabelled(recs: list[Record], start: int = 0) -> list[Record]:
    return [Record(start + i, UNLABELLED, r.ext, r.load, r.origin) for i, r in enumerate(recs)]


def image_files(root: str | Path, key: str = "dataset.pretrain.root") -> list[Record]:
    """Every image under `root` (a flat folder or an ImageFolder-style tree), sorted by relative path, unlabelled."""
    root = Path(root)
    if not root.is_dir():
        raise ParamError(f"{key}: {root} is not a directory")
    files = sorted((f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS),
                   key=lambda f: f.relative_to(root).as_posix())
    if not files:
        raise ParamError(f"{key}: {root} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    return [Record(i, UNLABELLED, IMAGE_EXTS[f.suffix.lower()], f.read_bytes, str(f)) for i, f in enumerate(files)]


def pretrain_records(dataset: dict, src: Source) -> list[Record]:
    """The pretraining images of `dataset.pretrain`: {splits: [train, unlabeled]} of the source itself,
    {root: folder}, or {urls: shards}; concatenated in that order, relabelled -1."""
    pre = dataset["pretrain"]
    recs: list[Record] = []
    for split in pre.get("splits", []):
        if split in src.splits:
            recs += src.splits[split]
        elif split == UNLABELED_SPLIT:
            recs += unlabeled_split(dataset)
        else:
            raise ParamError(f"dataset.pretrain.splits: {split!r} is not a split of {dataset['source']}")
    if pre.get("root"):
        from pipeline.paths import local_path

        recs += image_files(local_path(pre["root"]))
    if pre.get("urls"):
        recs += shard_records(pre["urls"], dataset, "dataset.pretrain.urls")
    if not recs:
        raise ParamError("dataset.pretrain: no images (set splits, root or urls)")
    return _unlabelled(recs)


def unlabeled_split(dataset: dict) -> list[Record]:
    """The source's own unlabelled images: STL-10's 100k `unlabeled` split, or an ImageFolder root's `unlabeled/`."""
    if dataset["source"] == "stl10":
        if not stl10_binary_present(dataset["root"], (UNLABELED_SPLIT,)):
            torchvision_download_stl10(dataset["root"])
        return stl10_local(dataset["root"], (UNLABELED_SPLIT,)).splits[UNLABELED_SPLIT]
    if dataset["source"] == "imagefolder":
        return image_files(Path(dataset["root"]) / UNLABELED_SPLIT, key="dataset.root")
    raise ParamError(f"dataset.pretrain.splits: {dataset['source']} has no unlabeled split "
                     "(stl10 does; an imagefolder root may hold unlabeled/; or set dataset.pretrain.root)")


# --- STL-10 from its binary files ---------------------------------------------------------------------

STL10_DIR, STL10_SIZE = "stl10_binary", 96


def stl10_binary_present(root: str | Path, splits=("train", "test")) -> bool:
    return all((Path(root) / STL10_DIR / f"{s}_X.bin").is_file() for s in splits)


def torchvision_download_stl10(root: str | Path) -> None:
    import torchvision.datasets as tvd

    try:
        tvd.STL10(root, split=UNLABELED_SPLIT, download=True)
    except Exception as e:
        raise ParamError(f"dataset.source=stl10: could not load or download into {root} ({type(e).__name__}); "
                         f"put the stl10_binary/ files there (set dataset.root)") from None


def stl10_local(root: str | Path, which) -> Source:
    """STL-10 read from `<root>/stl10_binary/<split>_X.bin` (uint8, N x 3 x 96 x 96 column-major) and
    `<split>_y.bin` (1..10), as torchvision reads them (same pixels, same PNG bytes), without its checksum pass,
    so a local copy (or a small file of the same layout) needs no download."""
    import numpy as np

    d = Path(root) / STL10_DIR
    names = d / "class_names.txt"
    classes = names.read_text().split() if names.is_file() else [str(i) for i in range(10)]
    splits: dict[str, list[Record]] = {}
    for split in which:
        x_path = d / f"{split}_X.bin"
        data = np.fromfile(x_path, dtype=np.uint8)
        if data.size % (3 * STL10_SIZE * STL10_SIZE):
            raise DataError(f"{x_path}: {data.size} bytes is not a whole number of 3x96x96 images")
        images = np.transpose(data.reshape(-1, 3, STL10_SIZE, STL10_SIZE), (0, 1, 3, 2))
        y_path = d / f"{split}_y.bin"
        labels = (np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1) if y_path.is_file() else np.full(len(images), UNLABELLED)
        if len(labels) != len(images):
            raise DataError(f"{y_path}: {len(labels)} labels for {len(images)} images in {x_path}")
        splits[split] = [Record(i, int(labels[i]), "png",
                                (lambda i=i, images=images: _png(Image.fromarray(np.transpose(images[i], (1, 2, 0))))),
                                f"stl10[{split}][{i}]") for i in range(len(images))]
    return Source(classes, splits)


# --- webdataset shards (local or remote) -------------------------------------------------------------

def shard_records(urls, dataset: dict, key: str) -> list[Record]:
    """The samples of webdataset shards, in shard order then tar order: each sample's image member, its label
    from a `cls` member (-1 without). Remote shards are fetched once into a local cache (pipeline.data.remote)."""
    from pipeline.data.shards import IMAGE_EXTS as SHARD_IMAGE_EXTS, TarIndex

    local = remote.fetch_all(remote.expand_urls(urls, key), dataset.get("cache"))
    index = TarIndex(local)
    recs: list[Record] = []
    for i in range(len(index)):
        lo = int(index.first[i])
        names = {index.names[int(index.name[m])] for m in range(lo, lo + int(index.count[i]))}
        where = f"{index.paths[int(index.shard[lo])]}: sample {index.keys[i]}"
        ext = next((e for e in SHARD_IMAGE_EXTS if e in names), None)
        if ext is None:
            raise DataError(f"{where} has no image member ({', '.join(sorted(names))})")
        label = _label(index.read(i)["cls"], where) if "cls" in names else UNLABELLED
        recs.append(Record(i, label, "jpg" if ext == "jpeg" else ext, (lambda i=i, ext=ext: index.read(i)[ext]), where))
    return recs


def _label(data: bytes, where: str) -> int:
    try:
        return int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{where}: cls member {data[:20]!r} is not an integer class index") from None


def webdataset_source(dataset: dict) -> Source:
    """`dataset.source: webdataset`: `dataset.urls: {train: [...], test: [...]}` (labelled by `cls` members)."""
    urls = dataset.get("urls") or {}
    missing = [s for s in ("train", "test") if not urls.get(s)]
    if missing:
        raise ParamError(f"dataset.urls: source webdataset needs shard urls for {' and '.join(missing)} "
                         "(dataset.urls.train / dataset.urls.test); unlabelled shards go to dataset.pretrain.urls")
    splits = {s: shard_records(urls[s], dataset, f"dataset.urls.{s}") for s in ("train", "test")}
    unlabelled = [r.origin for s in splits.values() for r in s if r.label == UNLABELLED][:1]
    if unlabelled:
        raise DataError(f"{unlabelled[0]}: no cls member; evaluation needs labelled train/test shards")
    labels = sorted({r.label for r in splits["train"]})
    return Source([str(c) for c in range(max(labels) + 1)], splits)


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode (catches truncated files that PIL's lazy open would not)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


# a side this short is no photograph (a tracking pixel, a broken thumbnail): crops of it are one colour
MIN_SIDE = 8
# high bit depth: PIL's convert("RGB") clips these to 8 bits (a 16-bit PNG becomes white), silently
CLIPPED_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


class UnusableImage(Exception):
    """An image that decodes but would train on garbage."""


def check_usable(img: Image.Image) -> None:
    if img.mode in CLIPPED_MODES:
        raise UnusableImage(f"mode {img.mode} (high bit depth) would be clipped to 8-bit RGB: convert it to 8-bit")
    if min(img.size) < MIN_SIDE:
        raise UnusableImage(f"{img.size[0]}x{img.size[1]} pixels, a side under {MIN_SIDE}")


def check_record(r: Record, skip_corrupt: bool) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a decodable, usable image; (None, message) for a corrupt or unusable one when skipping,
    else DataError naming the file (before any shard is written)."""
    try:
        data = r.load()
        img = Image.open(io.BytesIO(data))
        img.load()   # fully decode: catches truncated files that PIL's lazy open would not
        check_usable(img)
        img.convert("RGB")
    except UnusableImage as e:
        msg = f"{r.origin}: unusable image ({e})"
        if not skip_corrupt:
            raise DataError(f"{msg}; or remove it, or set shard.skip_corrupt: true to skip and count it") from None
        return None, msg
    except Exception as e:
        msg = f"{r.origin}: unreadable image ({type(e).__name__}: {e})"
        if not skip_corrupt:
            raise DataError(f"{msg}; fix or remove it, or set shard.skip_corrupt: true to skip and count it") from None
        return None, msg
    return data, None


def iter_checked(records: list[Record], skip_corrupt: bool, on_skip: Callable[[Record, str], None]) -> Iterator[tuple[Record, bytes]]:
    """Yield (record, bytes) for every decodable image; a corrupt one raises naming the file, or is skipped."""
    for r in records:
        data, msg = check_record(r, skip_corrupt)
        if msg is not None:
            on_skip(r, msg)
            continue
        yield r, data
