"""Memories shared by methods: a FIFO of embeddings filled from the global batch (MoCo queue, NNCLR support set).

Buffers only, so a method's state_dict checkpoints them and resume restores them exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train import dist


class KeyQueue(nn.Module):
    """A FIFO of L2-normalised keys (K, D) with a write pointer, both buffers (saved in checkpoints)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, local_keys: torch.Tensor) -> None:
        """Enqueue the keys of the global batch (gathered here), overwriting the oldest ones."""
        k = F.normalize(dist.gather_no_grad(local_keys.detach()), dim=1).to(self.keys.dtype)
        n, size = k.shape[0], self.keys.shape[0]
        if n > size:
            k, n = k[-size:], size
        idx = (self.ptr + torch.arange(n, device=k.device)) % size
        self.keys[idx] = k
        self.ptr.copy_((self.ptr + n) % size)
