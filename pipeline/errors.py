"""The project's error types: the ground floor every module may import (it imports nothing of the project).

A `PipelineError` is one the user can fix; stages print its one-line message and exit non-zero.
"""
from __future__ import annotations


class PipelineError(Exception):
    """An error the user can fix; stages print its one-line message and exit non-zero."""


class ParamError(PipelineError, ValueError):
    """A bad parameter; the message names the file and the key."""


class DataError(PipelineError):
    """Bad input data; the message names the file or shard."""
