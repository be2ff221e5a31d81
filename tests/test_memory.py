"""benchmarks/memory.py's live-storage accounting (issue 23, defect 12), checked by hand-counted bytes."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from memory import LiveBytes  # noqa: E402


def test_live_bytes_counts_new_storages_not_views_and_frees_them():
    x = torch.zeros(1024)                  # 4096 bytes, made before tracking
    live = LiveBytes()
    live.track(x)
    with live:
        y = x * 2                          # +4096
        v = y[:10]                         # a view: the same storage, nothing new
        assert live.now == 8192
        del y, v                           # the storage dies with its last reference
        z = torch.zeros(256, dtype=torch.float64)   # +2048
        assert live.now == 4096 + 2048
    assert live.peak == 8192
    del z


def test_live_bytes_counts_what_autograd_keeps_for_the_backward():
    a = torch.randn(1000, requires_grad=True)   # 4000 bytes (not tracked: only what the step makes)
    live = LiveBytes()
    with live:
        loss = a.exp().sum()    # exp keeps its output (4000 bytes) for the backward; the sum is 4 bytes
        assert live.now == 4000 + 4
        loss.backward()         # the saved output is freed; a.grad (4000) appears (+ backward temporaries)
        del loss
    assert live.now == 4000     # only the gradient is left
    assert live.peak >= 4000 + 4 + 4000


def test_live_bytes_counts_a_sparse_tensor_by_its_indices_and_values():
    """PW-Self's patch targets are sparse (torch.sparse.mm): 3 non-zeros = 2 x 3 int64 indices + 3 float32 values."""
    live = LiveBytes()
    with live:
        s = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2], [2, 0, 1]]), torch.ones(3), (3, 3)).coalesce()
        assert live.now >= 2 * 3 * 8 + 3 * 4
    del s
