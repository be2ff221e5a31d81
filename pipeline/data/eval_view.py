"""The un-augmented evaluation view: what feature extraction, mining and the kNN monitor feed an encoder.

Kept apart from the training augmentations (`views.py`), so the features stage depends on this small file
only. The protocol is the standard one for large images (ResNet/SimCLR/DINO linear evaluation on ImageNet):
resize the shorter side to round(image_size / crop_ratio), e.g. 256 for 224 at crop_ratio 0.875, then take
the centre image_size x image_size crop. An image already at image_size x image_size (CIFAR at 32 px, the
CIFAR protocol) is used whole, exactly as before this protocol existed, so CIFAR features do not change.
"""
from __future__ import annotations

import torchvision.transforms as T
import torchvision.transforms.functional as F

DEFAULT_CROP_RATIO = 0.875  # 224 / 256


def resize_size(image_size: int, crop_ratio: float) -> int:
    """The shorter side before the centre crop: round(image_size / crop_ratio) (0.875: 224 -> 256)."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio: expected a number in (0, 1], got {crop_ratio}")
    return max(int(image_size), int(round(image_size / crop_ratio)))


class ResizeCentreCrop:
    """PIL image -> image_size x image_size PIL image (shorter side resized, centre crop; as-is when already square at size)."""

    def __init__(self, image_size: int, crop_ratio: float = DEFAULT_CROP_RATIO):
        self.image_size, self.crop_ratio = int(image_size), float(crop_ratio)
        self.resize_to = resize_size(self.image_size, self.crop_ratio)

    def __call__(self, img):
        if img.size == (self.image_size, self.image_size):
            return img
        img = F.resize(img, self.resize_to, antialias=True)  # an int: the shorter side, aspect ratio kept
        return F.center_crop(img, [self.image_size, self.image_size])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, resize_to={self.resize_to})"


def eval_transform(image_size: int, mean, std, crop_ratio: float = DEFAULT_CROP_RATIO):
    """Un-augmented view for feature extraction and mining: resize + centre crop (see the module doc), normalise."""
    return T.Compose([ResizeCentreCrop(image_size, crop_ratio), T.ToTensor(), T.Normalize(mean, std)])
