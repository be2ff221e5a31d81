"""Mined pairs on disk: one parquet file (anchor, positive, similarity [, anchor_key, positive_key]).

Written atomically (temp file beside the target, then rename), so an interrupted mine stage never leaves
a file that looks complete; read back with a one-line DataError naming the file when it is missing or
corrupt. Optional JSON metadata (bounds, K, encoder, ...) rides in the parquet schema.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.utils import atomic_write_bytes

COLUMNS = ("anchor", "positive", "similarity")
META_KEY = b"sslpipe.pairs"


def write_pairs(path: str | Path, anchor, positive, similarity, keys=None, meta: dict | None = None) -> Path:
    """Write pairs (indices into the K mined images) to parquet atomically.

    keys: optional sequence of K dataset keys (e.g. the shard manifest's `key` of each mined image);
    adds columns anchor_key and positive_key so the pairs stay valid whatever order the images are read in.
    meta: optional JSON-serialisable dict stored in the file (read it with read_pairs_meta).
    """
    a, p = np.asarray(anchor, np.int64), np.asarray(positive, np.int64)
    s = np.asarray(similarity, np.float32)
    if not (a.ndim == p.ndim == s.ndim == 1 and len(a) == len(p) == len(s)):
        raise ValueError(f"write_pairs: anchor, positive, similarity must be 1-D of one length, "
                         f"got {a.shape}, {p.shape}, {s.shape}")
    cols = {"anchor": a, "positive": p, "similarity": s}
    if keys is not None:
        k = np.asarray(keys)
        hi = int(max(a.max(), p.max())) if len(a) else -1
        if k.ndim != 1 or len(k) <= hi:
            raise ValueError(f"write_pairs: {len(k)} keys but pair indices go up to {hi}")
        cols["anchor_key"], cols["positive_key"] = k[a], k[p]
    table = pa.table(cols)
    if meta is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(sink.getvalue().to_pybytes(), path)
    return Path(path)


def _one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _table(path: Path) -> pa.Table:
    if not path.exists():
        raise DataError(f"{path}: missing (run the mine stage first: dvc repro mine)")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: corrupt pairs file ({_one_line(e)}); rerun: dvc repro -f mine") from None


def read_pairs(path: str | Path) -> pd.DataFrame:
    """The pairs as a DataFrame (anchor int64, positive int64, similarity float32 [, keys]); DataError if bad."""
    path = Path(path)
    df = _table(path).to_pandas()
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a pairs file (missing columns {missing}); rerun: dvc repro -f mine")
    for c in ("anchor", "positive"):
        if not pd.api.types.is_integer_dtype(df[c]) or (len(df) and df[c].min() < 0):
            raise DataError(f"{path}: column {c!r} must hold non-negative integer indices; rerun: dvc repro -f mine")
    if not pd.api.types.is_float_dtype(df["similarity"]):
        raise DataError(f"{path}: column 'similarity' must be float; rerun: dvc repro -f mine")
    return df


def read_pairs_meta(path: str | Path) -> dict:
    """The metadata dict stored by write_pairs ({} if none)."""
    path = Path(path)
    raw = (_table(path).schema.metadata or {}).get(META_KEY)
    try:
        return json.loads(raw) if raw else {}
    except ValueError as e:
        raise DataError(f"{path}: unreadable pairs metadata ({_one_line(e)}); rerun: dvc repro -f mine") from None
