"""The training device: which GPU a process takes, what precision its fp32 work runs at, and what
`train.deterministic` sets on CUDA.

* `claim_device()`: under torchrun the local rank's GPU (torchrun's own mapping); otherwise the first GPU no
  other sslpipe process holds, claimed by an exclusive lock file per device (`flock`, released by the OS when
  the process exits, also on SIGKILL). So `dvc exp run --queue ...` + `dvc queue start -j N` puts each job on
  its own GPU instead of every job on `cuda:0`. Locks are named by the physical id from
  `CUDA_VISIBLE_DEVICES` (a job that sees only GPUs 2,3 and one that sees all four agree on GPU 2), in
  `$SSLPIPE_GPU_LOCK_DIR` (default: a per-user directory under the system temp dir). When every visible GPU
  is held the job waits for one to free up (a queue of N jobs on fewer GPUs runs them in turn, never two on
  one device). `SSLPIPE_GPU_LOCK=0` turns claiming off (every process takes `cuda:0` of what it sees).
* `full_fp32()`: fp32 matmuls and cuDNN convolutions at full IEEE precision (no TF32) inside the block, for the
  work documented as fp32 on any device (mining, kNN, features' fp32 path). torch >= 2.9 has per-backend
  `fp32_precision` settings and refuses a mix of those and the legacy `allow_tf32` flags, so the newer API is
  used where it exists and the legacy flags otherwise.
* `set_deterministic()`: what `train.deterministic` promises on CUDA (see README, Scale-out).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

# cuBLAS picks reduction strategies per call unless its workspace is fixed (NVIDIA's cuBLAS docs,
# "Results reproducibility"); torch's deterministic mode requires one of these two values
CUBLAS_WORKSPACE = ":4096:8"
WAIT_POLL_S = 2.0

_claimed: torch.device | None = None
_lock = None   # the open lock file of the claimed GPU: held for the life of the process


# --- fp32 without TF32 ----------------------------------------------------------------------------------

def _precision_settings() -> list[tuple[object, str, object]]:
    """(namespace, attribute, full-precision value) of every TF32 switch this torch has for matmul and conv."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        return [(b.cuda.matmul, "fp32_precision", "ieee"), (b.cudnn.conv, "fp32_precision", "ieee")]
    return [(b.cuda.matmul, "allow_tf32", False), (b.cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def full_fp32():
    """fp32 matmuls and convolutions at full precision inside the block (settable, and restored, without a GPU)."""
    settings = _precision_settings()
    before = [getattr(ns, attr) for ns, attr, _ in settings]
    try:
        for ns, attr, value in settings:
            setattr(ns, attr, value)
        yield
    finally:
        for (ns, attr, _), value in zip(settings, before):
            setattr(ns, attr, value)


# --- determinism -------------------------------------------------------------------------------------------

def set_deterministic(on: bool, device: torch.device) -> None:
    """`train.deterministic` on CUDA. On: cuDNN picks deterministic algorithms and does not benchmark, the
    cuBLAS workspace is fixed, and torch's deterministic mode is on with warn_only (an op with no deterministic
    CUDA kernel warns once, naming itself, instead of stopping a run). Off: cuDNN benchmarks (fastest kernels,
    run-to-run differences). The CPU is deterministic already and is left alone."""
    if torch.device(device).type != "cuda":
        return
    if on:
        # read by cuBLAS when its handle is created: set before the first matmul of the process
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    torch.use_deterministic_algorithms(on, warn_only=True)


# --- which GPU ---------------------------------------------------------------------------------------------

def visible_ids() -> list[str]:
    """Physical ids of the GPUs this process sees, in torch's index order (CUDA_VISIBLE_DEVICES when set)."""
    n = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in env.split(",") if s.strip()] if env else []
    return ids[:n] if len(ids) >= n else [str(i) for i in range(n)]


def lock_dir() -> Path:
    d = Path(os.environ.get("SSLPIPE_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"sslpipe-gpu-locks-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _try_lock(path: Path):
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def claim_free_gpu(wait: bool = True) -> int:
    """Index (torch's numbering) of the first visible GPU no other process has locked; locks it for this
    process's lifetime. Waits while all are held (`wait=False`: raises RuntimeError instead)."""
    global _lock
    ids = visible_ids()
    said = False
    while True:
        for index, phys in enumerate(ids):
            f = _try_lock(lock_dir() / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', phys)}.lock")
            if f is not None:
                _lock = f
                return index
        if not wait:
            raise RuntimeError(f"all {len(ids)} visible GPUs are held by other sslpipe processes (locks in {lock_dir()})")
        if not said:
            print(f"waiting for a free GPU: all {len(ids)} visible are held by other sslpipe jobs (locks in {lock_dir()})",
                  file=sys.stderr, flush=True)
            said = True
        time.sleep(WAIT_POLL_S)


def claim_device() -> torch.device:
    """This process's device, chosen once: CPU without CUDA; the local rank's GPU under torchrun; else a
    free GPU (see the module docstring). The current CUDA device is set to it."""
    global _claimed
    if _claimed is not None:
        return _claimed
    if not torch.cuda.is_available():
        _claimed = torch.device("cpu")
        return _claimed
    if "LOCAL_RANK" in os.environ:
        index = int(os.environ["LOCAL_RANK"])
    elif os.environ.get("SSLPIPE_GPU_LOCK", "1") == "0":
        index = 0
    else:
        index = claim_free_gpu()
    torch.cuda.set_device(index)
    _claimed = torch.device("cuda", index)
    return _claimed


def device_slug(device: torch.device) -> str:
    """A file-name-safe name of the device: `cpu`, or the GPU's model (`nvidia-h100-80gb-hbm3`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def device_model(device: torch.device) -> str:
    """The hardware a wall time was taken on: the GPU's name, or the CPU's model and the threads torch uses
    (a wall time or views/s is comparable only with one taken on the same hardware)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def amp_dtype_of(train_cfg: dict, device: torch.device):
    """The autocast dtype the trainer uses: `train.amp` on CUDA, none on the CPU."""
    if torch.device(device).type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_cfg.get("amp", "off"))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timer around GPU work must, or it times the launches only)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
