"""Method registry: names in params.yaml -> method classes. Methods register themselves on import."""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

_METHODS: dict[str, type] = {}
_NOT_METHODS = {"base", "registry", "memory", "patch_groups"}


def register(name: str):
    def deco(cls):
        cls.NAME = name
        _METHODS[name] = cls
        return cls
    return deco


def _load_all() -> None:
    """Import every module of this package: each method file registers itself, nothing to list here."""
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name not in _NOT_METHODS and not mod.name.startswith("_"):
            importlib.import_module(f"pipeline.methods.{mod.name}")


def get(name: str, key: str = "method"):
    _load_all()
    if name not in _METHODS:
        from pipeline.params import ParamError

        raise ParamError(f"{key}: unknown method {name!r} (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def names() -> list[str]:
    _load_all()
    return sorted(_METHODS)
