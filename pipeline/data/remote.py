"""Webdataset shards from anywhere, as local seekable files: the shard stage's `TarIndex` seeks in them.

A shard URL is a local path, `file://...`, `http(s)://...`, any fsspec URL (`s3://...` with s3fs installed,
`gs://`, ...), or `pipe:<command>` (webdataset's convention: the command writes the tar to stdout). A list,
or a brace pattern (`shards-{000000..000009}.tar`), names several. Local files are read in place; anything
else is fetched once into the cache folder (`dataset.cache`, default `pipeline.paths.remote_cache()`), under a
name keyed by the URL and what the server says identifies its bytes (ETag, size, modification time), so a
changed remote shard is fetched again and an unchanged one never is. Downloads are atomic (temp file, rename)
and their size is checked against the server's.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

from pipeline.errors import DataError, ParamError

TIMEOUT_S = 60


def expand_urls(urls, key: str) -> list[str]:
    """A URL, a brace pattern or a list of them -> the list of shard URLs, in order."""
    from braceexpand import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls or [])
    if not items or not all(isinstance(u, str) and u for u in items):
        raise ParamError(f"{key}: expected a shard URL, a brace pattern or a list of them, got {urls!r}")
    return [u for item in items for u in (braceexpand(item) if not item.startswith("pipe:") else [item])]


def is_local(url: str) -> bool:
    return url.startswith("file://") or "://" not in url and not url.startswith("pipe:")


def fetch_all(urls: list[str], cache: str | os.PathLike | None = None) -> list[Path]:
    from pipeline.paths import local_path, remote_cache

    cache_dir = local_path(cache) if cache else local_path(remote_cache())
    return [fetch(u, cache_dir) for u in urls]


def fetch(url: str, cache_dir: Path) -> Path:
    """A local, seekable copy of the shard at `url` (the file itself when it is local)."""
    if is_local(url):
        path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
        if not path.is_file():
            raise DataError(f"{url}: no such shard file")
        return path
    if url.startswith("pipe:"):
        return _cached(cache_dir, url, "", lambda tmp: _run_pipe(url[len("pipe:"):], tmp))
    if url.startswith(("http://", "https://")):
        ident, size = _http_identity(url)
        return _cached(cache_dir, url, ident, lambda tmp: _http_get(url, tmp, size))
    return _fsspec_fetch(url, cache_dir)


def cache_name(url: str, identity: str) -> str:
    """`<sha256(url, identity)[:20]>-<basename>`: a changed remote file gets a new name (and a new download)."""
    digest = hashlib.sha256(f"{url}\n{identity}".encode()).hexdigest()[:20]
    base = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0] if not url.startswith("pipe:") else "pipe.tar"
    return f"{digest}-{''.join(c if c.isalnum() or c in '._-' else '_' for c in base)[:80]}"


def _cached(cache_dir: Path, url: str, identity: str, download) -> Path:
    target = Path(cache_dir) / cache_name(url, identity)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".{os.getpid()}.part")
    try:
        download(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _http_identity(url: str) -> tuple[str, int | None]:
    """(identity, size) from a HEAD request: ETag, Content-Length and Last-Modified, whichever the server sends."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT_S) as r:
            h = r.headers
    except OSError as e:
        raise DataError(f"{url}: cannot reach the shard ({type(e).__name__}: {e})") from None
    size = h.get("Content-Length")
    return f"etag={h.get('ETag')};size={size};mtime={h.get('Last-Modified')}", int(size) if size else None


def _http_get(url: str, tmp: Path, size: int | None) -> None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:
        raise DataError(f"{url}: download failed ({type(e).__name__}: {e})") from None
    if size is not None and tmp.stat().st_size != size:
        raise DataError(f"{url}: downloaded {tmp.stat().st_size} bytes, the server announced {size}")


def _run_pipe(cmd: str, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        r = subprocess.run(cmd, shell=True, stdout=f, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise DataError(f"pipe:{cmd}: exited with {r.returncode} ({r.stderr.decode(errors='replace').strip()[-200:]})")


def _fsspec_fetch(url: str, cache_dir: Path) -> Path:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except ImportError as e:
        raise DataError(f"{url}: fsspec has no driver for it ({e}); install it (e.g. pip install s3fs)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{url}: cannot reach the shard ({type(e).__name__}: {e})") from None
    etag = info.get("ETag") or info.get("etag") or info.get("md5") or ""
    ident = f"etag={etag};size={info.get('size')};mtime={info.get('LastModified') or info.get('mtime')}"
    return _cached(cache_dir, url, ident, lambda tmp: fs.get_file(path, str(tmp)))
