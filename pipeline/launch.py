"""The launcher is a runtime setting: a stage re-executes itself under it, so `dvc.yaml` never names it.

Every stage's command in `dvc.yaml` is fixed (`python -m stages.<name> ...`); changing how a stage is launched
(one process, `torchrun --nproc_per_node=8`, `srun ...`) changes how fast it runs, not what it produces, so
it must rerun nothing. The pretrain, features and mine stages call `relaunch()` first: it reads the launcher
from, in order,
    1. the environment variable SSLPIPE_LAUNCHER (per shell, per machine, per queue worker),
    2. the `launcher` key of params.yaml (no stage depends on it),
and, unless it is plain `python` or the process already runs under a launcher (torchrun sets LOCAL_RANK;
the re-exec sets SSLPIPE_LAUNCHED), replaces the process by `<launcher> -m stages.<name> <args>`.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import yaml

ENV = "SSLPIPE_LAUNCHER"
MARK = "SSLPIPE_LAUNCHED"
PLAIN = "python"


def configured_launcher(params_file: str | Path = "params.yaml") -> str:
    """The launcher this machine should use: $SSLPIPE_LAUNCHER, else params.yaml's `launcher`, else python."""
    env = os.environ.get(ENV, "").strip()
    if env:
        return env
    path = Path(params_file)
    if path.exists():
        raw = yaml.safe_load(path.read_text()) or {}
        if isinstance(raw, dict) and str(raw.get("launcher") or "").strip():
            return str(raw["launcher"]).strip()
    return PLAIN


def is_plain(launcher: str) -> bool:
    """One process in this interpreter: `python`, `python3`, or this very interpreter's path."""
    words = shlex.split(launcher)
    return len(words) == 1 and (Path(words[0]).name in ("python", "python3") or words[0] == sys.executable)


def launched() -> bool:
    """Already running under a launcher (torchrun's environment, or our own re-exec)."""
    return MARK in os.environ or "LOCAL_RANK" in os.environ


def launch_command(launcher: str, module: str, argv: list[str]) -> list[str]:
    return [*shlex.split(launcher), "-m", module, *argv]


def relaunch(module: str, argv: list[str], params_file: str | Path = "params.yaml") -> None:
    """Replace this process by the stage under the configured launcher, or return when it needs none."""
    launcher = configured_launcher(params_file)
    if is_plain(launcher) or launched():
        return
    cmd = launch_command(launcher, module, list(argv))
    print(f"{module}: launching under {launcher!r}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, {**os.environ, MARK: "1"})
