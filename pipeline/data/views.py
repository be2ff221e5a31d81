"""Views: the augmentations a method asks for, each returning its crop geometry.

A method lists `ViewSpec`s; the loader applies each spec to every image. Spatial augmentation uses
torchvision's own crop parameters (`RandomResizedCrop.get_params`) and reports the crop box in
original-image pixels plus the flip flag, which patch-level methods (PW-Self) need. A spec may also ask
for PW-Self's per-patch photometric augmentation (§3.3), applied to each stacked batch of the view.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

from pipeline.data.patch_augment import PatchAugment

RATIO = (3 / 4, 4 / 3)


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


class View:
    """Callable: PIL image -> (normalised tensor, geometry tensor [top, left, height, width, flipped])."""

    def __init__(self, spec: ViewSpec, mean, std):
        self.spec = spec
        photometric = []
        if spec.color_jitter_p > 0 and any(spec.color_jitter):
            photometric.append(T.RandomApply([T.ColorJitter(*spec.color_jitter)], p=spec.color_jitter_p))
        if spec.grayscale_p > 0:
            photometric.append(T.RandomGrayscale(p=spec.grayscale_p))
        if spec.blur_p > 0:
            k = max(3, (spec.size // 10) | 1)   # ~10% of the view, odd, as in SimCLR
            photometric.append(T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=spec.blur_p))
        if spec.solarize_p > 0:
            photometric.append(T.RandomSolarize(128, p=spec.solarize_p))
        self.photometric = T.Compose(photometric)
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.mean, self.std = tuple(mean), tuple(std)

    def box(self, img) -> tuple[int, int, int, int]:
        if self.spec.crop_scale is None:
            return 0, 0, img.height, img.width
        return T.RandomResizedCrop.get_params(img, list(self.spec.crop_scale), list(RATIO))

    def __call__(self, img):
        top, left, h, w = self.box(img)
        out = F.resized_crop(img, top, left, h, w, [self.spec.size, self.spec.size], antialias=True)
        flipped = bool(torch.rand(()) < self.spec.hflip)
        if flipped:
            out = F.hflip(out)
        out = self.normalize(self.photometric(out))
        return out, torch.tensor([top, left, h, w, int(flipped)], dtype=torch.int32)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """The batch-level part of the view, on the stacked (B, C, H, W) views: the per-patch augmentation,
        vectorised over the batch (in pixel space: the views are un-normalised and re-normalised)."""
        if self.spec.patch_augment is None or not self.spec.patch_augment.enabled:
            return x
        return self.spec.patch_augment(x, self.spec.patch_grid, mean=self.mean, std=self.std)


def eval_transform(image_size: int, mean, std):
    """Un-augmented view for feature extraction and mining: resize to the training size, normalise."""
    return T.Compose([T.Resize([image_size, image_size], antialias=True), T.ToTensor(), T.Normalize(mean, std)])
