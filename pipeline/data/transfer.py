"""Host -> device copies that do not make the host wait for the GPU (issue 23, defect 6).

A plain `t.to("cuda")` from pageable memory is a synchronous copy (the CUDA caching allocator calls
cudaMemcpy + a stream synchronisation, which `torch.cuda.set_sync_debug_mode("error")` reports). Copying
from page-locked memory with `non_blocking=True` queues the copy on the current stream and returns; the
pinned buffer is kept alive by the caching host allocator until the copy has run. On the CPU (and for a
tensor already on the device) this is a plain `.to`, bit for bit.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t on `device` (and `dtype`), copied asynchronously from pinned memory when that is a host -> CUDA copy."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        if dtype is not None:
            t = t.to(dtype)
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device=device, dtype=dtype)


def constant(values, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small constant (a Python list / tuple, e.g. a normalisation's mean) as a tensor on `device`, without
    a synchronous copy: `torch.tensor(values, device="cuda")` copies synchronously."""
    return to_device(torch.tensor(values, dtype=dtype), device)
