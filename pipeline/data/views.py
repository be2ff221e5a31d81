"""Views: the augmentations a method asks for, each returning its crop geometry.

A method lists `ViewSpec`s; the loader applies each spec to every image. The spatial part runs in the
loader workers on the decoded image (`View`): a random resized crop with torchvision's crop-parameter
rule (`RandomResizedCrop.get_params`, drawn from the batch's generator) and a horizontal flip, reporting
the crop box in original-image pixels plus the flip flag, which patch-level methods (PW-Self) need; the
view leaves the worker as uint8. The photometric part (colour jitter, grayscale, blur, solarisation,
normalisation, and PW-Self's per-patch augmentation, §3.3) runs batched on the training device
(`pipeline.data.device_augment.ViewAugment`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from pipeline.data.patch_augment import PatchAugment
# moved to eval_view (the features stage needs no training augmentation); re-exported for old importers

RATIO = (3 / 4, 4 / 3)
BLUR_SIGMA = (0.1, 2.0)     # SimCLR appendix A / BYOL


@dataclass(frozen=True)
class ViewSpec:
    size: int
    crop_scale: tuple[float, float] | None = (0.2, 1.0)   # None: the whole image, resized (no crop)
    hflip: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    # PW-Self §3.3: after the whole-view augmentation, every patch of a patch_grid x patch_grid split is
    # augmented on its own (None: off)
    patch_augment: PatchAugment | None = None
    patch_grid: int = 0

    @classmethod
    def from_augment(cls, augment: dict, size: int, **over) -> "ViewSpec":
        spec = cls(size=size, crop_scale=tuple(augment["crop_scale"]), hflip=augment["hflip"],
                   color_jitter=tuple(augment["color_jitter"]), color_jitter_p=augment["color_jitter_p"],
                   grayscale_p=augment["grayscale_p"], blur_p=augment["blur_p"], solarize_p=augment["solarize_p"])
        return replace(spec, **over)

    @property
    def blur_kernel(self) -> int:
        """~10 % of the view, odd, at least 3 (SimCLR appendix A)."""
        return max(3, (self.size // 10) | 1)


def crop_boxes(heights, widths, scale, ratio=RATIO, generator: torch.Generator | None = None) -> np.ndarray:
    """(n, 4) int64 [top, left, h, w]: a random resized crop of each of n images by torchvision's
    `RandomResizedCrop.get_params` rule (area fraction uniform in `scale`, log aspect ratio uniform in `ratio`,
    the first of 10 tries that fits, else the central crop at the nearest allowed ratio; the offset uniform over
    the positions that fit). Every draw of the n images at once, from `generator`: a fixed block of uniforms per
    call, so the boxes depend on the generator's state only (not on which tries fit)."""
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    n = len(heights)
    u = torch.rand(n, 10, 2, generator=generator, dtype=torch.float64).numpy()
    offset = torch.rand(n, 2, generator=generator, dtype=torch.float64).numpy()
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    target = (heights * widths)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = np.exp(lo + (hi - lo) * u[..., 1])
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)    # round half to even, as Python's round
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.argmax(1)
    rows = np.arange(n)
    h, w = h[rows, first], w[rows, first]
    # no try fits: the whole image, cut to the nearest allowed aspect ratio
    in_ratio = widths / heights
    cw = np.where(in_ratio > max(ratio), np.round(heights * max(ratio)).astype(np.int64), widths)
    ch = np.where(in_ratio < min(ratio), np.round(widths / min(ratio)).astype(np.int64), heights)
    found = fits.any(1)
    h, w = np.where(found, h, ch), np.where(found, w, cw)
    top = np.where(found, np.floor(offset[:, 0] * (heights - h + 1)), (heights - h) // 2).astype(np.int64)
    left = np.where(found, np.floor(offset[:, 1] * (widths - w + 1)), (widths - w) // 2).astype(np.int64)
    return np.stack([top, left, h, w], 1)


class View:
    """The worker's part of a view: decoded PIL images -> uint8 (n, C, size, size) crops and their geometry
    [top, left, height, width, flipped] (int32, (n, 5)); random draws from `generator` (the global RNG when
    None), all of a batch's at once."""

    def __init__(self, spec: ViewSpec, mean, std):
        self.spec = spec
        self.mean, self.std = tuple(mean), tuple(std)

    def boxes(self, images, generator: torch.Generator | None = None) -> np.ndarray:
        heights, widths = [im.height for im in images], [im.width for im in images]
        if self.spec.crop_scale is None:
            return np.stack([np.zeros(len(images), np.int64), np.zeros(len(images), np.int64),
                             np.asarray(heights, np.int64), np.asarray(widths, np.int64)], 1)
        return crop_boxes(heights, widths, self.spec.crop_scale, generator=generator)

    def render(self, images, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = self.boxes(images, generator)
        flips = (torch.rand(len(images), generator=generator) < self.spec.hflip).numpy()
        size = self.spec.size
        out = np.empty((len(images), size, size, 3), dtype=np.uint8)
        for i, (img, (top, left, h, w)) in enumerate(zip(images, boxes.tolist())):
            # torchvision's resized_crop on PIL images, byte for byte: crop, then PIL's bilinear resize (antialiased).
            # Not resize(box=...): its filter reads pixels outside the box, blending them into the border rows
            crop = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT) if flips[i] else crop)
        geometry = np.concatenate([boxes, flips[:, None].astype(np.int64)], 1).astype(np.int32)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(geometry)

    def __call__(self, img, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One image: (uint8 (C, size, size), geometry (5,))."""
        x, g = self.render([img], generator)
        return x[0], g[0]

    def batch(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The per-patch augmentation of the spec on stacked normalised (B, C, H, W) views, vectorised over
        the batch (in pixel space: un-normalised and re-normalised); the identity when off."""
        if self.spec.patch_augment is None or not self.spec.patch_augment.enabled:
            return x
        return self.spec.patch_augment(x, self.spec.patch_grid, mean=self.mean, std=self.std, generator=generator)
