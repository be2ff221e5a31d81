"""True epochs, simulated at the profiles' sizes with the stream's own scheduling functions (indices only,
nothing decoded): every (rank, worker) slot builds its batches, and together they visit every sample once."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.loader import batches_per_epoch, epoch_order, rank_slice, worker_positions


def simulate(n: int, global_batch: int, ranks: int, workers: int, epoch: int = 0, seed: int = 0):
    """Every sample each (rank, worker) slot trains on in one epoch, and the steps each rank makes."""
    steps = batches_per_epoch(n, global_batch)
    local = global_batch // ranks
    order = epoch_order(seed, epoch, n)
    seen, steps_of = [], []
    for r in range(ranks):
        made = 0
        for w in range(workers):
            for e, b in worker_positions(epoch, 0, epoch + 1, steps, w, workers):
                seen.append(rank_slice(order, b, global_batch, r, local))
                made += 1
        steps_of.append(made)
    return np.concatenate(seen), steps_of, steps


@pytest.mark.parametrize("n, batch, ranks, workers", [
    (20000, 256, 1, 2),       # CPU profile: train_subset 20k, batch 256
    (50000, 512, 1, 8),       # GPU profile (gpu-resnet18): all of CIFAR-10, batch 512, 8 workers
    (50000, 512, 8, 8),       # the same on 8 GPUs with 8 workers each
    (1281167, 4096, 8, 8),    # ImageNet-1k at batch 4096 on 8 ranks x 8 workers
])
def test_an_epoch_visits_every_sample_once(n, batch, ranks, workers):
    seen, steps_of, steps = simulate(n, batch, ranks, workers)
    assert steps_of == [steps] * ranks                    # equal steps on every rank: DDP never hangs
    assert len(seen) == steps * batch == len(np.unique(seen))   # no sample twice
    assert len(seen) / n >= 0.99 and len(seen) > n - batch      # only the N mod G leftover is missed


def test_the_leftover_changes_with_the_epoch_and_the_worker_count_changes_nothing():
    a, _, _ = simulate(1000, 64, 2, 3, epoch=0)
    b, _, _ = simulate(1000, 64, 2, 3, epoch=1)
    assert set(range(1000)) - set(a) != set(range(1000)) - set(b)
    for workers in (1, 2, 5):
        assert np.array_equal(np.sort(simulate(1000, 64, 2, workers)[0]), np.sort(a))


def test_workers_take_turns_in_the_run_order_across_epochs():
    # resumed at epoch 1, step 3 of 5, over 3 epochs, 2 workers: worker 0 gets every other batch of the run
    got = list(worker_positions(1, 3, 3, 5, 0, 2))
    assert got == [(1, 3), (2, 0), (2, 2), (2, 4)]
    assert list(worker_positions(1, 3, 3, 5, 1, 2)) == [(1, 4), (2, 1), (2, 3)]
