"""Method registry: names in params.yaml -> method classes. Methods register themselves on import."""
from __future__ import annotations

import importlib

_METHODS: dict[str, type] = {}
# every module under pipeline/methods that defines a method; imported lazily on first lookup
_MODULES = ("simclr", "mocov2", "random_init")


def register(name: str):
    def deco(cls):
        cls.NAME = name
        _METHODS[name] = cls
        return cls
    return deco


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"pipeline.methods.{mod}")


def get(name: str, key: str = "method"):
    _load_all()
    if name not in _METHODS:
        from pipeline.params import ParamError

        raise ParamError(f"{key}: unknown method {name!r} (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def names() -> list[str]:
    _load_all()
    return sorted(_METHODS)
