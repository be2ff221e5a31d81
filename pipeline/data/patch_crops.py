"""Overlapping fixed-size random patches cut from a batch of views (GSSSL §3, Alg. 1 lines 3-4).

GSSSL divides each augmented view "into n fixed-sized image patches through overlapping random
cropping" (§3; Figure 1: "randomly cropped into n fixed-size image patches with overlapping"). Our
reading: every patch is a size x size window at a uniformly random position inside the view, drawn
independently per image and per patch, at the view's own resolution (no resize: fixed-size patches are
what makes the n encoder passes cheap). The paper does not give the size for CIFAR; it must exceed half
the view so that any two windows share pixels on both axes (two intervals of length p inside [0, S)
always intersect iff p > S / 2): "overlapping" is then a guarantee, not a chance.

Tensor-side and vectorised (one gather for the whole batch), so it runs on the training device after
the loader, on views that are already normalised.
"""
from __future__ import annotations

import torch


def min_overlapping_size(view_size: int) -> int:
    """The smallest patch side whose random windows always overlap: p > S / 2."""
    return view_size // 2 + 1


def random_patches(x: torch.Tensor, n: int, size: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut `n` random size x size windows from every image of x (B, C, H, W).

    Returns (patches (n, B, C, size, size), offsets (n, B, 2) of each window's top-left (row, col) in
    x's pixels). Patch-major: patches[i] is the batch A_i of GSSSL's notation (the i-th patch of every
    image), so encoding patches.flatten(0, 1) gives embeddings that reshape to (n, B, D).
    """
    B, C, H, W = x.shape
    if not 0 < size <= min(H, W):
        raise ValueError(f"random_patches: patch size {size} does not fit a {H}x{W} view")
    dev = x.device
    top = torch.randint(0, H - size + 1, (n, B), device=dev, generator=generator)
    left = torch.randint(0, W - size + 1, (n, B), device=dev, generator=generator)
    ar = torch.arange(size, device=dev)
    rows = (top[..., None] + ar)[..., :, None]                 # (n, B, size, 1)
    cols = (left[..., None] + ar)[..., None, :]                # (n, B, 1, size)
    img = torch.arange(B, device=dev).view(1, B, 1, 1)
    # advanced indexing on (B, H, W, C): one gather for every window -> (n, B, size, size, C)
    patches = x.permute(0, 2, 3, 1)[img, rows, cols]
    return patches.permute(0, 1, 4, 2, 3).contiguous(), torch.stack([top, left], dim=-1)
