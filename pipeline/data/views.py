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


def crop_box(height: int, width: int, scale, ratio=RATIO, generator: torch.Generator | None = None
             ) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop by torchvision's `RandomResizedCrop.get_params` rule (area
    fraction uniform in `scale`, log aspect ratio uniform in `ratio`, 10 tries, then the central crop at
    the nearest allowed ratio), every draw from `generator`."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(lo, hi, generator=generator).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class View:
    """The worker's part of a view. Callable: PIL image -> (uint8 (C, size, size) tensor, geometry tensor
    [top, left, height, width, flipped]); random draws from `generator` (the global RNG when None)."""

    def __init__(self, spec: ViewSpec, mean, std):
        self.spec = spec
        self.mean, self.std = tuple(mean), tuple(std)

    def box(self, img, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        if self.spec.crop_scale is None:
            return 0, 0, img.height, img.width
        return crop_box(img.height, img.width, self.spec.crop_scale, generator=generator)

    def __call__(self, img, generator: torch.Generator | None = None):
        top, left, h, w = self.box(img, generator)
        # PIL's bilinear resize of the box is antialiased, as torchvision's resized_crop on PIL images
        out = img.resize((self.spec.size, self.spec.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        flipped = bool(torch.rand((), generator=generator) < self.spec.hflip)
        if flipped:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)
        return x, torch.tensor([top, left, h, w, int(flipped)], dtype=torch.int32)

    def batch(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The per-patch augmentation of the spec on stacked normalised (B, C, H, W) views, vectorised over
        the batch (in pixel space: un-normalised and re-normalised); the identity when off."""
        if self.spec.patch_augment is None or not self.spec.patch_augment.enabled:
            return x
        return self.spec.patch_augment(x, self.spec.patch_grid, mean=self.mean, std=self.std, generator=generator)
