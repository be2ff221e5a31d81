"""Method registry: names in params.yaml -> method classes.

A method file registers its class with `@register("<name>")`. The registry finds which file declares a
name by reading the files' syntax trees (no import), then imports that one file only: a pretrain stage
loads its own method and what it imports, nothing else, which is also exactly what the DAG generator
(`pipeline.dag`) lists as the stage's code dependencies.
"""
from __future__ import annotations

import ast
import importlib
from functools import lru_cache
from pathlib import Path

from pipeline.errors import ParamError

_METHODS: dict[str, type] = {}
HERE = Path(__file__).resolve().parent


def register(name: str):
    def deco(cls):
        cls.NAME = name
        _METHODS[name] = cls
        return cls
    return deco


def _registered_names(path: Path) -> list[str]:
    """The names a file registers: the string argument of every `@register("...")` decorator in it."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ClassDef):
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and getattr(dec.func, "id", getattr(dec.func, "attr", None)) == "register"
                        and dec.args and isinstance(dec.args[0], ast.Constant)):
                    names.append(dec.args[0].value)
    return names


@lru_cache(maxsize=1)
def modules() -> dict[str, str]:
    """{method name: module name} of every method file in this package."""
    found: dict[str, str] = {}
    for path in sorted(HERE.glob("*.py")):
        for name in _registered_names(path):
            if name in found:
                raise ParamError(f"method {name!r} is registered twice: pipeline/methods/{found[name]}.py and {path.name}")
            found[name] = path.stem
    return found


def module_of(name: str, key: str = "method") -> str:
    """The dotted module that defines method `name`."""
    if name not in modules():
        raise ParamError(f"{key}: unknown method {name!r} (known: {', '.join(names())})")
    return f"pipeline.methods.{modules()[name]}"


def get(name: str, key: str = "method"):
    if name not in _METHODS:
        importlib.import_module(module_of(name, key))
    return _METHODS[name]


def names() -> list[str]:
    return sorted(modules())
