"""The recipe search's validation split is carved from the training images: its bank lies inside the
pretraining subset, its queries outside it, and a split that cannot be carved is refused."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.recipe_search import Validation, current, effective, key_of
from pipeline.data.shards import read_manifest
from tests.conftest import tiny_params


def test_queries_outside_the_pretraining_subset_and_bank_inside(shard_dir):
    n = len(read_manifest(shard_dir, "train"))
    p = tiny_params(**{"train.train_subset": n - 4})
    v = Validation(p, shard_dir, bank=1000, queries=4, device="cpu")
    assert v.bank.tolist() == list(range(n - 4)) and v.queries.tolist() == list(range(n - 4, n))
    assert not np.intersect1d(v.bank, v.queries).size
    with pytest.raises(SystemExit, match="--queries 5"):
        Validation(p, shard_dir, bank=10, queries=5, device="cpu")


def test_a_stage_reuses_the_run_the_previous_stage_chose():
    p = tiny_params()
    aug = current(p, "augmentation")
    before = effective(p, aug, "simclr")
    for block, kv in aug.items():
        p[block].update(kv)
    assert effective(p, current(p, "schedule"), "simclr") == before
    assert effective(p, {"train": {"warmup_epochs": 9.0}}, "simclr") != before
    assert key_of(aug).startswith("augment.crop_scale=")
