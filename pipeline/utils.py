"""Small shared mechanics: atomic writes, JSON, device choice, seed mixing."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from pipeline import faults

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)   # what a full disk, a file-size limit or a quota raise


def mix_seed(*xs: int) -> int:
    """A stable 63-bit seed from integers (Python's hash of ints is stable, but keep it explicit)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0x7FFFFFFFFFFFFFFF
    return h


def remove_stale_temps(directory: str | Path) -> None:
    """Delete the temp files a killed writer left in `directory` (`.<name>.*.tmp`, this module's and the feature
    cache's): a stage whose DVC output is the directory would otherwise cache them with the outputs."""
    for f in Path(directory).glob(".*.tmp"):
        f.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_disk_full(path: str | Path):
    """A full disk while writing under `path` raises OSError naming `path` (numpy's and tar's writers name none)."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL and not e.filename:
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from None
        raise


def _tmp_beside(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary readable files
    return tmp


def atomic_write_with(path: str | Path, write) -> None:
    """Call `write(fileobj)` on a temp file beside `path`, fsync, then rename: a reader never sees a partial file.

    A full disk (ENOSPC, EFBIG past a file-size limit, EDQUOT) raises OSError naming `path`, the temp file gone."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        faults.point(f"open:{path.name}")   # the fault-injection suite's disk full / kill (unset: returns at once)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            faults.point(f"write:{path.name}")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in DISK_FULL and e.filename is None:
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> tuple[str, int]:
    """(hex SHA-256, size in bytes) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | Path) -> None:
    atomic_write_bytes(text.encode(), path)


def atomic_write_json(obj, path: str | Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def atomic_torch_save(obj, path: str | Path) -> None:
    atomic_write_with(path, lambda f: torch.save(obj, f))
