"""Small validators for params sections: each returns the (possibly normalised) value or raises ParamError.

On the ground floor (imports only `pipeline.errors`), so method files declare their `PARAMS` schema with
them without importing `pipeline.params` (which imports the method registry).
"""
from __future__ import annotations

from typing import Any, Callable

from pipeline.errors import ParamError

Validator = Callable[[Any, str], Any]


def _fail(key: str, want: str, got: Any) -> None:
    raise ParamError(f"{key}: expected {want}, got {got!r}")


def Int(min: int | None = None, max: int | None = None) -> Validator:
    def check(v, key):
        if isinstance(v, bool) or not isinstance(v, int) or (min is not None and v < min) or (max is not None and v > max):
            _fail(key, f"an integer{f' >= {min}' if min is not None else ''}{f' <= {max}' if max is not None else ''}", v)
        return v
    return check


def Float(min: float | None = None, max: float | None = None, open_min: bool = False) -> Validator:
    def check(v, key):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            _fail(key, "a number", v)
        given, v = v, float(v)
        bad_min = min is not None and (v <= min if open_min else v < min)
        if bad_min or (max is not None and v > max):
            lo = f"{'>' if open_min else '>='} {min}" if min is not None else ""
            hi = f"<= {max}" if max is not None else ""
            _fail(key, f"a number {lo}{' and ' if lo and hi else ''}{hi}", given)
        return v
    return check


def Str(choices: tuple[str, ...] | None = None) -> Validator:
    def check(v, key):
        if not isinstance(v, str) or (choices is not None and v not in choices):
            _fail(key, f"one of {list(choices)}" if choices else "a string", v)
        return v
    return check


def Bool() -> Validator:
    def check(v, key):
        if not isinstance(v, bool):
            _fail(key, "true or false", v)
        return v
    return check


def List(item: Validator, length: int | None = None, min_len: int = 0) -> Validator:
    def check(v, key):
        if not isinstance(v, list) or (length is not None and len(v) != length) or len(v) < min_len:
            _fail(key, f"a list{f' of {length} items' if length else ''}{f' of at least {min_len} items' if min_len else ''}", v)
        return [item(x, f"{key}[{i}]") for i, x in enumerate(v)]
    return check


def Range01() -> Validator:
    """A [lo, hi] pair with 0 < lo <= hi <= 1 (crop scales)."""
    inner = List(Float(0.0, 1.0, open_min=True), length=2)

    def check(v, key):
        v = inner(v, key)
        if v[0] > v[1]:
            _fail(key, "[lo, hi] with lo <= hi", v)
        return v
    return check


def Section(schema: dict[str, Validator], optional: tuple[str, ...] = ()) -> Validator:
    """A mapping with exactly these keys (those in `optional` may be absent)."""
    def check(v, key):
        if v is None:
            v = {}
        if not isinstance(v, dict):
            _fail(key, "a mapping", v)
        for k in v:
            if k not in schema:
                raise ParamError(f"{_join(key, k)}: unknown key (known: {', '.join(sorted(schema))})")
        out = {}
        for k, val in schema.items():
            if k not in v:
                if k in optional:
                    continue
                raise ParamError(f"{_join(key, k)}: missing")
            out[k] = val(v[k], _join(key, k))
        return out
    return check


def MapOf(value: Validator, allow_empty: bool = False) -> Validator:
    def check(v, key):
        if allow_empty and v is None:
            v = {}
        if not isinstance(v, dict) or not (v or allow_empty):
            _fail(key, "a mapping" if allow_empty else "a non-empty mapping", v)
        return {k: value(x, _join(key, str(k))) for k, x in v.items()}
    return check


def _join(key: str, k: str) -> str:
    return f"{key}.{k}" if key else k
