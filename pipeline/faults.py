"""Faults a long run meets, and the deterministic way the fault-injection suite (`tests/test_faults.py`) causes them.

Pre-emption: a scheduler stops a job with SIGTERM (SLURM at its time limit or on pre-emption, then SIGKILL
after `KillWait`, 30 s by default; Kubernetes and most batch systems alike). `Preemption` turns the signal into
a flag the training loop reads at its next step boundary: it writes a checkpoint at once and raises
`Preempted`, whose exit status (`REQUEUE_EXIT`, 143 = 128 + SIGTERM by default, `SSLPIPE_REQUEUE_EXIT` to
change it) tells the job script to requeue; the rerun resumes from that checkpoint to the byte.

Injection: `SSLPIPE_FAULT` lists `action@point:n` items (comma-separated): the action runs the n-th time this
process reaches the named point. Points: `forward`, `backward`, `optimizer` (the phases of a training step),
`checkpoint` (a checkpoint just submitted, its background write in flight), `checkpoint-write` (a checkpoint's
temp file complete, not yet renamed), `open:<file>` / `write:<file>` (an atomic write of <file> about to
start / its temp file written, not yet renamed). Actions:
`kill` (SIGKILL this process), `term` (SIGTERM it), `kill-worker` (SIGKILL a DataLoader worker and let its
death be noticed right there), `full` (the disk is full from now on: RLIMIT_FSIZE set to 0 with SIGXFSZ
ignored, so every later write of this process fails with EFBIG). The variable is read once, at import;
set it in the environment of one rank only to fault that rank. Unset, `point` returns at its first test.
This module imports nothing of the project but `errors` (the ground floor: `utils` calls it).
"""
from __future__ import annotations

import os
import signal
import time

from pipeline.errors import PipelineError

REQUEUE_EXIT = int(os.environ.get("SSLPIPE_REQUEUE_EXIT", 128 + signal.SIGTERM))
_SPEC = os.environ.get("SSLPIPE_FAULT", "")


def _parse(spec: str) -> dict[tuple[str, int], str]:
    plan = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        action, _, where = item.partition("@")
        name, _, n = where.rpartition(":")
        if not name or action not in _ACTIONS or not n.isdigit():
            raise PipelineError(f"SSLPIPE_FAULT: {item!r} is not action@point:n with action in {', '.join(_ACTIONS)}")
        plan[(name, int(n))] = action
    return plan


_hits: dict[str, int] = {}


def point(name: str) -> None:
    """A place a fault may be injected (see the module's docstring)."""
    if not _PLAN:
        return
    n = _hits[name] = _hits.get(name, 0) + 1
    action = _PLAN.get((name, n))
    if action is not None:
        _ACTIONS[action]()


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)   # SIGKILL is delivered asynchronously: never run on past the point


def _term_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _kill_worker() -> None:
    """SIGKILL the first live DataLoader worker and wait until it can be waited for, without reaping it
    (PyTorch's SIGCHLD handler must find it), so the death surfaces here, in the phase that was asked for.
    Its main thread is a zombie at once, but the process becomes waitable, and SIGCHLD is sent, only when its
    other threads have exited: at the worker's low priority on a loaded machine that can take a while."""
    import multiprocessing

    workers = [p for p in multiprocessing.active_children() if p.pid]
    if not workers:
        raise RuntimeError("SSLPIPE_FAULT: kill-worker, but this process has no loader worker (train.num_workers: 0?)")
    pid = workers[0].pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
        except ChildProcessError:   # reaped already
            break
        time.sleep(0.01)
    for _ in range(100):   # SIGCHLD is sent; its handler runs (and raises) at a bytecode boundary of the main thread
        time.sleep(0.05)


def _disk_full() -> None:
    import resource   # SIGXFSZ is ignored from import on (a handler can only be set from the main thread)

    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


_ACTIONS = {"kill": _kill_self, "term": _term_self, "kill-worker": _kill_worker, "full": _disk_full}
_PLAN = _parse(_SPEC)
if "full" in _PLAN.values():   # a write past the file-size limit then fails with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


# --- pre-emption -------------------------------------------------------------------------------------------

class Preempted(PipelineError):
    """SIGTERM was received: a checkpoint was written; the stage exits with `exit_code` for the scheduler."""

    exit_code = REQUEUE_EXIT


class Preemption:
    """While active, SIGTERM only sets `requested`; the training loop checkpoints at its next step boundary.

    Installed only in the main thread (Python's rule for signal handlers); elsewhere it does nothing and a
    SIGTERM ends the process as before."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _on_term(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, may_sync: bool) -> bool:
        """Whether to checkpoint and stop now. One process: as soon as asked. Under DDP every rank must stop at the
        same step, so the ranks agree (one all-reduce) only where the loop syncs anyway (`may_sync`)."""
        import torch
        import torch.distributed as tdist

        if not (tdist.is_available() and tdist.is_initialized()):
            return self.requested
        if not may_sync:
            return False
        flag = torch.tensor([int(self.requested)])
        if tdist.get_backend() == "nccl":
            flag = flag.cuda()
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())

    def __enter__(self) -> "Preemption":
        try:
            self._old = signal.signal(signal.SIGTERM, self._on_term)
        except ValueError:   # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# --- a rank lost ---------------------------------------------------------------------------------------------

_PEER_LOST = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out", "timeout")


def collective_failure(e: BaseException, run: str) -> PipelineError | None:
    """The one-line error for a collective that failed because another rank died or hung (gloo reports a reset
    connection at once; a hung peer fails the collective after `pipeline.dist.collective_timeout`); None for
    anything else, and outside torchrun."""
    import torch.distributed as tdist

    if not (isinstance(e, RuntimeError) and tdist.is_available() and tdist.is_initialized()):
        return None
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not (isinstance(e, getattr(tdist, "DistError", ())) or any(k in text.lower() for k in _PEER_LOST)):
        return None
    detail = text.split("] ", 1)[-1].split(". ", 1)[0]   # gloo: "[file.cc:545] Read error [addr]: Connection reset by peer. ..."
    return PipelineError(f"{run}: rank {tdist.get_rank()} of {tdist.get_world_size()}: a collective failed: another rank "
                         f"died or stopped answering ({detail}); rerun the stage (all ranks) to resume from the last "
                         f"checkpoint")
