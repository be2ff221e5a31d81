"""Multi-node resume: ranks that share no filesystem resume together from rank 0's checkpoint (gloo, 2 processes)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_ddp import WORLD, free_port
from tests.test_resume import assert_same_state, final_state, params, project


def _worker(rank, port, roots, max_steps, log_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pipeline.train import checkpoint
    from pipeline.train.trainer import train

    restore = checkpoint.Checkpointer.restore

    def logged_restore(self, *args):  # where this rank starts: the proof that both resumed at the same step
        progress = restore(self, *args)
        Path(log_dir, f"start{rank}.json").write_text(json.dumps({"step": progress.step, "epoch": progress.epoch}))
        return progress

    checkpoint.Checkpointer.restore = logged_restore
    train(params(epochs=2), "mocov2", root=Path(roots[rank]), max_steps=max_steps)
    dist.destroy_process_group()


def spawn(roots, max_steps, log_dir) -> list[dict]:
    log_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(free_port(), [str(r) for r in roots], max_steps, str(log_dir)), nprocs=WORLD)
    return [json.loads((log_dir / f"start{r}.json").read_text()) for r in range(WORLD)]


def test_ranks_without_shared_checkpoint_dir_resume_together(tmp_path, shard_dir):
    # 24 images, global batch 8: 3 steps per epoch, 6 in all; each rank has its own project directory
    full = [project(tmp_path, f"full{r}", shard_dir) for r in range(WORLD)]
    spawn(full, None, tmp_path / "log-full")

    cut = [project(tmp_path, f"cut{r}", shard_dir) for r in range(WORLD)]
    spawn(cut, 4, tmp_path / "log-cut")  # stops mid-epoch 2
    ck = "data/checkpoints/mocov2/last.pt"
    assert (cut[0] / ck).exists() and not (cut[1] / ck).exists()  # only rank 0 writes (and, here, can read) it

    fresh = project(tmp_path, "fresh1", shard_dir)  # rank 1 on "another node": a directory without the checkpoint
    starts = spawn([cut[0], fresh], None, tmp_path / "log-resume")
    assert starts == [{"step": 4, "epoch": 1}, {"step": 4, "epoch": 1}]
    assert_same_state(final_state(full[0]), final_state(cut[0]))
    assert final_state(cut[0])["progress"]["step"] == 6
    assert not (fresh / ck).exists()  # rank 1 writes no checkpoint of its own
