"""Entry-point plumbing shared by the stage scripts: one-line errors, exit codes."""
from __future__ import annotations

import sys
from typing import Callable

from pipeline import params
from pipeline.params import ParamError, PipelineError


def params_and_run(argv: list[str], stage: str) -> tuple[dict, str]:
    """Validated params and the one run a per-run stage was given; both checked before any compute."""
    if len(argv) != 1:
        raise ParamError(f"usage: python stages/{stage}.py <run>  (a name under runs: or pair_runs: in params.yaml)")
    p = params.load()
    params.method_config(p, argv[0])
    return p, argv[0]


def main(fn: Callable[[list[str]], None]) -> None:
    """Run a stage; a PipelineError (bad param, file or shard) prints one line and exits 1."""
    try:
        fn(sys.argv[1:])
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: the stage can be rerun and resumes from its last checkpoint", file=sys.stderr)
        sys.exit(130)
