"""Image sources for the shard stage: torchvision datasets (CIFAR-10/100, STL-10) and ImageFolder trees.

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
    if dataset["source"] == "imagefolder":
        return imagefolder(dataset["root"])
    return torchvision_source(dataset["source"], dataset["root"])


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
