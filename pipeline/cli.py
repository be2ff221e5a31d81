"""Entry-point plumbing shared by the stage scripts: one-line errors, exit codes."""
from __future__ import annotations

import sys
from typing import Callable

from pipeline.params import PipelineError


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
