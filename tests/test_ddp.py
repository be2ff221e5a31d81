"""DDP on gloo with 2 CPU processes: cross-rank operations equal their single-process meaning."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.methods.mocov2 import MoCoV2
from pipeline.methods.simclr import SimCLR
from tests.close import close, gap

WORLD = 2
AUG = {"crop_scale": [0.2, 1.0], "hflip": 0.5, "color_jitter": [0.4, 0.4, 0.4, 0.1], "color_jitter_p": 0.8,
       "grayscale_p": 0.2, "blur_p": 0.0, "solarize_p": 0.0}


class TinyNet(nn.Module):
    """BN-free backbone: per-rank BatchNorm would (correctly) differ from whole-batch BN."""

    feat_dim = 6

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, self.feat_dim)

    def forward(self, x):
        return torch.tanh(self.fc(x.flatten(1)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_load(worker, out) -> list:
    """Run `worker(rank, port, out)` on WORLD gloo processes; each saves `out/grads<rank>.pt`; load them."""
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD)
    return [torch.load(Path(out) / f"grads{r}.pt") for r in range(WORLD)]


def _init(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)


def make_simclr():
    torch.manual_seed(0)
    return SimCLR(TinyNet(), {"temperature": 0.3, "proj_hidden": 8, "proj_dim": 5, "proj_layers": 1}, AUG, 4)


def full_batch(n=8):
    g = torch.Generator().manual_seed(42)
    return [torch.randn(n, 3, 4, 4, generator=g) for _ in range(2)]


def _simclr_worker(rank, port, out):
    _init(rank, port)
    model = nn.parallel.DistributedDataParallel(make_simclr())
    views = full_batch()
    b = views[0].shape[0] // WORLD
    local = SimpleNamespace(views=[v[rank * b:(rank + 1) * b] for v in views])
    model(local)["loss"].backward()
    torch.save({n: p.grad for n, p in model.module.named_parameters()}, f"{out}/grads{rank}.pt")
    dist.destroy_process_group()


def test_simclr_ddp_gradients_equal_single_process(tmp_path):
    mp.spawn(_simclr_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    single = make_simclr()
    single(SimpleNamespace(views=full_batch()))["loss"].backward()
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for n, p in single.named_parameters():
            assert close(grads[n], p.grad), (rank, n, gap(grads[n], p.grad))


def make_moco():
    torch.manual_seed(0)
    return MoCoV2(TinyNet(), {"temperature": 0.2, "queue_size": 20, "momentum": 0.9, "symmetric": True,
                              "proj_hidden": 8, "proj_dim": 5, "proj_layers": 1}, AUG, 4)


def _moco_worker(rank, port, out):
    _init(rank, port)
    torch.manual_seed(100 + rank)  # different data on every rank
    model = nn.parallel.DistributedDataParallel(make_moco(), broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        batch = SimpleNamespace(views=[torch.randn(3, 3, 4, 4) for _ in range(2)])
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
        model.module.after_step(0.5)
    torch.save(model.module.queue.state_dict(), f"{out}/queue{rank}.pt")
    dist.destroy_process_group()


def test_moco_queue_identical_on_every_rank(tmp_path):
    initial = make_moco().queue.keys.clone()
    mp.spawn(_moco_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    q0, q1 = (torch.load(tmp_path / f"queue{r}.pt") for r in range(WORLD))
    assert torch.equal(q0["keys"], q1["keys"])
    # 3 steps x 2 pushes (symmetric) x 6 gathered keys = 36 writes into a queue of 20
    assert int(q0["ptr"]) == 36 % 20
    assert not torch.allclose(q0["keys"], initial)
    assert torch.allclose(q0["keys"].norm(dim=1), torch.ones(20), atol=1e-5)


def test_queue_push_is_fifo():
    q = make_moco().queue
    keys = torch.nn.functional.normalize(torch.randn(25, 5), dim=1)
    q.push(keys[:15])
    q.push(keys[15:])
    assert int(q.ptr) == 5
    assert torch.allclose(q.keys[:5], keys[20:]) and torch.allclose(q.keys[5:], keys[5:20])


def _trainer_worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pathlib import Path

    from tests.conftest import tiny_params
    from pipeline.train.trainer import train

    p = tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0, "train.checkpoint_every": 2})
    train(p, "mocov2", root=Path(root))
    dist.destroy_process_group()


@pytest.mark.slow
def test_trainer_runs_under_torchrun_style_ddp(tmp_path, shard_dir):
    mp.spawn(_trainer_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    import json

    summary = json.loads((tmp_path / "data/models/mocov2/train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 24 // 8  # 24 train images, global batch 8
    ck = torch.load(tmp_path / "data/checkpoints/mocov2/last.pt", weights_only=False)
    assert ck["progress"]["step"] == 3 and "queue.keys" in ck["method"]
