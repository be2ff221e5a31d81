"""Memories shared by methods: a FIFO of embeddings filled from the global batch (MoCo queue, NNCLR support set),
and the nearest-neighbour lookup in it (NNCLR, pNNCLR).

Buffers only, so a method's state_dict checkpoints them and resume restores them exactly. Integer counters the
step reads on the host (how many support-set slots are filled, a generator's seed and step) keep a host copy
beside their buffer (`HostCounters`), so reading them never waits for the GPU (issue 23, defect 6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import dist


class HostCounters(nn.Module):
    """Integer scalar buffers (checkpointed like any buffer) with a host copy that the step reads: `int(buffer)`
    on a GPU tensor is a device -> host copy that waits for every queued kernel. `set_counter` writes both;
    loading a state_dict refreshes the host copies from the loaded buffers (once, at restore)."""

    def __init__(self):
        super().__init__()
        self._host_counters: dict[str, int] = {}

    def register_counter(self, name: str, value: int) -> None:
        self.register_buffer(name, torch.tensor(int(value), dtype=torch.long))
        self._host_counters[name] = int(value)

    def counter(self, name: str) -> int:
        return self._host_counters[name]

    def set_counter(self, name: str, value: int) -> None:
        self._host_counters[name] = int(value)
        getattr(self, name).fill_(int(value))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        for name in self._host_counters:
            self._host_counters[name] = int(getattr(self, name))


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


class SupportSet(KeyQueue, HostCounters):
    """KeyQueue plus a count of the slots written so far (a buffer too, with a host copy): until the FIFO is
    full, only those slots are searched, so the random initial keys are never returned as neighbours."""

    def __init__(self, size: int, dim: int):
        super().__init__(size, dim)
        self.register_counter("filled", 0)

    @torch.no_grad()
    def push(self, local_keys: torch.Tensor) -> None:
        super().push(local_keys)
        n = local_keys.shape[0] * dist.world_size()
        self.set_counter("filled", min(self.counter("filled") + n, self.keys.shape[0]))

    def active(self) -> torch.Tensor:
        """The written slots (the FIFO fills from slot 0, so they are the first `filled` rows); their number is
        read from the host copy."""
        return self.keys[: self.counter("filled")]


@torch.no_grad()
def nearest_neighbour(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """NNCLR eq. 2: for each row of z (B, D), the row of `support` (K, D, L2-normalised) with the highest
    cosine similarity. An empty support set (the very first step) returns z itself, normalised.
    In float32 with autocast off (issue 23, defect 3): under autocast the similarity matmul ran in bf16 / fp16,
    whatever `.float()` said, and close neighbours tied or swapped (12 % of rows on clustered data)."""
    with torch.autocast(z.device.type, enabled=False):
        zn = F.normalize(z.detach().float(), dim=1)
        if support.shape[0] == 0:
            return zn
        s = support.float()
        return s.index_select(0, (zn @ s.t()).argmax(dim=1))
