"""The training device (issue 23): fp32 without TF32 on any allowed torch (defects 8, 9), the gather's memory
format (defect 8), what `train.deterministic` sets on CUDA (defect 10), and one GPU per queued job (deliver 3).
The flags are process state that CUDA reads; they are settable and readable without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import device as D
from pipeline.eval import knn
from tests.test_ddp import WORLD, _init, free_port

ROOT = Path(__file__).resolve().parent.parent


# --- defects 8, 9: fp32 at full precision, restored after ----------------------------------------------------

def _precision_now():
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def test_full_fp32_turns_tf32_off_for_matmul_and_conv_and_restores_it():
    before = _precision_now()
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        with D.full_fp32():
            assert _precision_now() == ("ieee", "ieee")
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        with pytest.raises(KeyError):   # restored on the way out of an exception too
            with D.full_fp32():
                raise KeyError
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cudnn.conv.fp32_precision = before[1]


def test_full_fp32_falls_back_to_allow_tf32_on_a_torch_without_fp32_precision(monkeypatch):
    """torch < 2.9 has only the legacy flags: the kNN's exact-matmul context must work there too (it read
    `matmul.fp32_precision` unconditionally: AttributeError on the torch >= 2.3 the project allowed)."""
    old = SimpleNamespace(cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=True)),
                          cudnn=SimpleNamespace(allow_tf32=True, conv=SimpleNamespace()))
    monkeypatch.setattr(torch, "backends", old)
    with knn.exact_fp32_matmul(torch.device("cuda", 0)):
        assert old.cuda.matmul.allow_tf32 is False and old.cudnn.allow_tf32 is False
    assert old.cuda.matmul.allow_tf32 is True and old.cudnn.allow_tf32 is True


def test_knn_and_mining_run_under_full_fp32_on_cuda(monkeypatch):
    """The kNN search's device context is the one that also turns cuDNN's TF32 off (mining's features: defect 9)."""
    seen = []
    monkeypatch.setattr(knn, "full_fp32", lambda: seen.append(_precision_now()) or D.full_fp32())
    with knn.exact_fp32_matmul(torch.device("cuda", 0)):
        assert _precision_now() == ("ieee", "ieee")
    assert seen
    with knn.exact_fp32_matmul(torch.device("cpu")):   # the CPU has no TF32: nothing to switch
        pass
    assert len(seen) == 1


def test_pyproject_floor_is_a_torch_the_code_runs_on():
    """Defect 8: the floor is what install.sh installs and tests (2.9.1 on aarch64, 2.14.1 on x86_64)."""
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.9' in text and '"torch>=2.3' not in text


# --- defect 8: gathered batches are contiguous whatever the sender's memory format ----------------------------

def _gather_worker(rank, port, out):
    from pipeline import dist as pdist

    _init(rank, port)
    x = (torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5) + 1000 * rank)
    got = pdist.gather_no_grad(x.to(memory_format=torch.channels_last))
    torch.save({"got": got, "contiguous": got.is_contiguous(), "parts_strides": got.stride()}, Path(out) / f"g{rank}.pt")
    dist.destroy_process_group()


def test_gather_of_a_channels_last_batch_equals_the_concatenation(tmp_path):
    mp.spawn(_gather_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    want = torch.cat([torch.arange(120, dtype=torch.float32).reshape(2, 3, 4, 5) + 1000 * r for r in range(WORLD)])
    for r in range(WORLD):
        res = torch.load(tmp_path / f"g{r}.pt")
        assert torch.equal(res["got"], want)
        assert res["contiguous"]


def test_gather_buffers_are_allocated_contiguous_for_a_channels_last_input(monkeypatch):
    """What NCCL < 2.9.1's fix needs: receive buffers laid out like the contiguous tensor that is sent."""
    from pipeline import dist as pdist

    recv = []
    monkeypatch.setattr(pdist, "is_dist", lambda: True)
    monkeypatch.setattr(pdist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather", lambda parts, x: recv.extend([(p.stride(), x.stride()) for p in parts])
                        or [p.copy_(x) for p in parts])
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    pdist.gather_no_grad(x)
    assert recv and all(p == s == torch.empty(2, 3, 4, 5).stride() for p, s in recv)


# --- defect 10: what train.deterministic sets on CUDA ---------------------------------------------------------

@pytest.fixture
def restore_determinism(monkeypatch):
    state = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[0], state[1]
    torch.use_deterministic_algorithms(state[2], warn_only=state[3])


def test_deterministic_on_cuda_sets_cudnn_cublas_and_torch(restore_determinism):
    D.set_deterministic(True, torch.device("cuda", 0))
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    D.set_deterministic(False, torch.device("cuda", 0))
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_leaves_a_cpu_process_alone(restore_determinism):
    D.set_deterministic(True, torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_trainer_sets_determinism_for_its_device(monkeypatch):
    """The trainer applies train.deterministic (default on) to the device it trains on."""
    from pipeline.train import trainer

    calls = []
    monkeypatch.setattr(trainer, "set_deterministic", lambda on, dev: calls.append((on, dev.type)))
    assert trainer.apply_determinism({"deterministic": False}, torch.device("cpu")) is None
    trainer.apply_determinism({}, torch.device("cpu"))
    assert calls == [(False, "cpu"), (True, "cpu")]


# --- deliver 3: one GPU per queued job ------------------------------------------------------------------------

CLAIM = textwrap.dedent("""
    import sys, time, torch
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: {n}
    torch.cuda.set_device = lambda i: None
    from pipeline import device
    d = device.claim_device()
    assert device.claim_device() is d   # chosen once per process
    print(d.index, flush=True)
    hold = sys.argv[1]
    while hold != "-" and not __import__("os").path.exists(hold):
        time.sleep(0.05)
""")


def _claimer(tmp_path, n, hold, env=None):
    env = {**os.environ, "SSLPIPE_GPU_LOCK_DIR": str(tmp_path / "locks"), "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("LOCAL_RANK", None)
    return subprocess.Popen([sys.executable, "-c", CLAIM.format(n=n), hold], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first_line(proc) -> str:
    return proc.stdout.readline().strip()


def test_two_concurrent_jobs_take_two_different_gpus(tmp_path):
    release = tmp_path / "release"
    a = _claimer(tmp_path, 2, str(release))
    first = _first_line(a)   # job A holds its GPU until released
    b = _claimer(tmp_path, 2, str(release))
    second = _first_line(b)
    release.touch()
    assert a.wait(30) == 0 and b.wait(30) == 0, (a.stderr.read(), b.stderr.read())
    assert {first, second} == {"0", "1"}


def test_a_gpu_is_free_again_when_its_job_exits_and_jobs_wait_when_all_are_held(tmp_path):
    release = tmp_path / "release"
    a = _claimer(tmp_path, 1, str(release))
    assert _first_line(a) == "0"
    b = _claimer(tmp_path, 1, "-")   # the only GPU is held: B waits (never two jobs on one device)
    assert "waiting for a free GPU" in b.stderr.readline()
    assert b.poll() is None
    release.touch()
    assert a.wait(30) == 0
    assert _first_line(b) == "0" and b.wait(30) == 0


def test_locks_name_physical_gpus_from_cuda_visible_devices(tmp_path):
    """A job that sees GPUs 2,3 and one that sees 3 only never share GPU 3."""
    release = tmp_path / "release"
    a = _claimer(tmp_path, 1, str(release), {"CUDA_VISIBLE_DEVICES": "3"})
    assert _first_line(a) == "0"
    b = _claimer(tmp_path, 2, str(release), {"CUDA_VISIBLE_DEVICES": "3,2"})
    assert _first_line(b) == "1"   # its index 1 is physical GPU 2
    release.touch()
    assert a.wait(30) == 0 and b.wait(30) == 0
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["gpu-2.lock", "gpu-3.lock"]


def test_torchrun_keeps_its_local_rank_mapping(monkeypatch):
    monkeypatch.setattr(D, "_claimed", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(D, "claim_free_gpu", lambda: pytest.fail("no lock under torchrun"))
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert D.claim_device() == torch.device("cuda", 3)


# --- defect 11: the throughput benchmark on a GPU ---------------------------------------------------------------

def test_throughput_timer_waits_for_the_device_and_files_are_named_by_device(monkeypatch):
    from benchmarks import throughput

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: events.append("sync"))
    throughput.timed(lambda: events.append("step"), steps=2, warmup=1, device=torch.device("cuda", 0))
    assert events == ["step", "sync", "step", "step", "sync"]   # the clock reads finished work only
    events.clear()
    throughput.timed(lambda: events.append("step"), steps=1, warmup=0)   # CPU: nothing to wait for
    assert events == ["step"]
    assert throughput.default_out(torch.device("cpu")) == "benchmarks/results/throughput-cpu.json"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert throughput.default_out(torch.device("cuda", 0)) == "benchmarks/results/throughput-nvidia-h100-80gb-hbm3.json"


def test_amp_dtype_follows_train_amp_on_cuda_only():
    assert D.amp_dtype_of({"amp": "bf16"}, torch.device("cuda", 0)) is torch.bfloat16
    assert D.amp_dtype_of({"amp": "fp16"}, torch.device("cuda", 0)) is torch.float16
    assert D.amp_dtype_of({"amp": "off"}, torch.device("cuda", 0)) is None
    assert D.amp_dtype_of({"amp": "bf16"}, torch.device("cpu")) is None
