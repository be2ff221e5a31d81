"""Entry-point plumbing shared by the stage scripts: one-line errors, exit codes.

Stages run as `python -m stages.<name>` from the project root, so they import the workspace's own
`pipeline` package (also in a `dvc exp run --temp` copy), never another pip-installed checkout.
"""
from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Callable

from pipeline import params
from pipeline.errors import ParamError, PipelineError
from pipeline.utils import DISK_FULL

# set by the DAG test to a directory: each stage process writes there the project files it imported
# (`<stage>.<run>.txt`), to compare with the code dependencies dvc.yaml declares for it
IMPORT_LOG = "SSLPIPE_IMPORT_LOG"


def params_and_run(argv: list[str], stage: str) -> tuple[dict, str]:
    """Validated params and the one run instance a per-run stage was given (`params.training_seed` gives its seed).

    Only the pretrain stage validates (and so imports) its method's file: features and evaluate read no
    method code, and neither stage loads any other method's.
    """
    if len(argv) != 1:
        raise ParamError(f"usage: python -m stages.{stage} <run>  (a name under runs: or pair_runs: in params.yaml)")
    name = argv[0]
    p = params.load(methods=())
    spec = params.run_spec(p, name)
    if stage == "pretrain":
        p = params.load(methods=(spec["method"],))
    params.training_seed(p, name)   # an unknown name fails here, before any compute
    return p, name


def _log_imports(log_dir: str) -> None:
    root = Path.cwd().resolve()
    path = Path(log_dir) / ".".join([Path(sys.argv[0]).stem, *sys.argv[1:2], "txt"])
    files = set()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        # some extension modules report a bare file name (torch._classes): only real paths count
        if f and os.path.isabs(f) and Path(f).resolve().is_relative_to(root):
            files.add(Path(f).resolve().relative_to(root).as_posix())
    path.write_text("\n".join(sorted(files)) + "\n")


def main(fn: Callable[[list[str]], None]) -> None:
    """Run a stage; a PipelineError (bad param, file or shard) prints one line and exits 1."""
    if os.environ.get(IMPORT_LOG):
        atexit.register(_log_imports, os.environ[IMPORT_LOG])
    try:
        fn(sys.argv[1:])
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_code", 1))   # pipeline.faults.Preempted: the scheduler's requeue status
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        print(f"error: {e.filename or 'a write'}: {e.strerror} (disk full or over a file-size limit): free space and "
              f"rerun; finished files are intact and no partial one is left", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: the stage can be rerun and resumes from its last checkpoint", file=sys.stderr)
        sys.exit(130)
