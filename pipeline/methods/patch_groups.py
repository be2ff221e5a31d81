"""Multi-patch grouping (GSSSL, Li et al. 2024, §3 and Alg. 1 lines 3-6), a piece any method can use.

From each augmented view: n overlapping fixed-size random patches (pipeline/data/patch_crops.py), each
augmented again on its own (§4.1: "the same data augmentation used in VICReg" — colour jitter,
greyscale, horizontal flip, Gaussian blur, solarisation, Figure 1; VICReg's per-branch blur 1.0 / 0.1
and solarisation 0.0 / 0.2), all n patches encoded, each projection L2-normalised ("we normalize the
learned projections", §3), and the group mean Zbar = 1/n sum_i z_i taken as the view's
distortion-invariant embedding. GSSSL scores every patch against the other view's group mean; SimCLR
and MoCo-v2 take it as the `groups` option (the paper's Table 5).

A method file opts in with `**group_params()` in its PARAMS and a `PatchGroups` built from its block.
The n patches of one view are encoded in one pass (BatchNorm sees the n x B patches of that view, as
SwAV-style multi-crop batches crops of one size; the two views stay separate passes, as in SimCLR here).
Random draws: patch positions and per-patch augmentation use a generator seeded per call from a seed
and a draw counter that are buffers of the module (so a checkpoint resumes the exact patch sequence,
whatever else consumes the global RNG, e.g. a DataLoader starting) and the rank (so ranks, which share
the seed, do not cut their images at the same places).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.patch_augment import PatchAugment
from pipeline.data.patch_crops import min_overlapping_size, random_patches
from pipeline.errors import ParamError
from pipeline.methods.memory import HostCounters
from pipeline.schema import Float, Int, List, Section, Str, Validator
from pipeline import dist

PAIRINGS = ("patch_to_mean", "mean_to_mean")


def group_params(pairing: bool = True) -> dict[str, Validator]:
    """The `groups` block: n patches of size x size per view (both required), their augmentation (VICReg's
    set; blur_p / solarize_p per view, as two_view_params), and, where the method has a choice (`pairing`),
    how the group enters its loss: each patch against the other view's mean, or mean against mean."""
    aug = {"jitter_p": Float(0, 1), "jitter": List(Float(0), 4), "grayscale_p": Float(0, 1), "hflip_p": Float(0, 1),
           "blur_p": List(Float(0, 1), 2), "solarize_p": List(Float(0, 1), 2)}
    if pairing:
        aug["pairing"] = Str(PAIRINGS)
    return {"groups": Section({"n": Int(1), "size": Int(1), **aug}, optional=tuple(aug))}


AUG_DEFAULTS = {"jitter_p": 0.8, "jitter": (0.4, 0.4, 0.2, 0.1), "grayscale_p": 0.2, "hflip_p": 0.5,
                "blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2), "pairing": "patch_to_mean"}


class PatchGroups(HostCounters):
    """n patches of size x size per view and their augmentation (VICReg's defaults); no parameters, two
    buffers (the patch RNG's seed and draw counter, with host copies: the step reads no device value) so
    checkpoints carry the patch sequence."""

    def __init__(self, n: int, size: int, **aug):
        super().__init__()
        self.n, self.size = n, size
        for k, v in {**AUG_DEFAULTS, **aug}.items():
            setattr(self, k, tuple(v) if isinstance(v, list) else v)
        self.register_counter("seed", int(torch.randint(0, 2**62, (), device="cpu")))
        self.register_counter("draws", 0)

    @classmethod
    def from_block(cls, block: dict, image_size: int, key: str) -> "PatchGroups":
        """From a validated `groups` block; `key` names it in errors (e.g. methods.gsssl.groups)."""
        lo = min_overlapping_size(image_size)
        if not lo <= block["size"] <= image_size:
            raise ParamError(f"{key}.size: expected {lo}..{image_size} (more than half the {image_size} px view, "
                             f"so that patches overlap), got {block['size']}")
        return cls(**block)

    @classmethod
    def of_method(cls, method: nn.Module) -> "PatchGroups | None":
        """The groups of a method whose block has a `groups` key (None without one: grouping off)."""
        block = method.cfg.get("groups")
        return None if block is None else cls.from_block(block, method.image_size, f"methods.{method.NAME}.groups")

    def augmenter(self, branch: int) -> PatchAugment:
        return PatchAugment(jitter_p=self.jitter_p, jitter=tuple(self.jitter), grayscale_p=self.grayscale_p,
                            hflip_p=self.hflip_p, blur_p=self.blur_p[branch], solarize_p=self.solarize_p[branch],
                            noise_p=0.0)   # VICReg's set has no pixel noise

    def next_generator(self, device) -> torch.Generator:
        """A fresh generator per call, from (seed, draw counter, rank); advances the counter."""
        draws = self.counter("draws")
        seed = hash((self.counter("seed"), draws, dist.rank())) % 2**63   # ints hash deterministically
        self.set_counter("draws", draws + 1)
        return torch.Generator(device=device).manual_seed(seed)

    def cut(self, view: torch.Tensor, branch: int, pixel_norm=None, generator: torch.Generator | None = None
            ) -> torch.Tensor:
        """n augmented patches of every image of a (B, C, S, S) view -> (n, B, C, size, size).
        pixel_norm: the view's (mean, std) normalisation, undone around the photometric ops."""
        generator = generator if generator is not None else self.next_generator(view.device)
        patches, _ = random_patches(view, self.n, self.size, generator)
        mean, std = pixel_norm if pixel_norm is not None else (None, None)
        flat = self.augmenter(branch)(patches.flatten(0, 1), 1, mean=mean, std=std, generator=generator)
        return flat.view_as(patches)

    def embed(self, encode: Callable[[torch.Tensor], torch.Tensor], view: torch.Tensor, branch: int, pixel_norm=None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Alg. 1 lines 3-6: cut + augment the patches of a view and encode them (`encode_patches`)."""
        return encode_patches(encode, self.cut(view, branch, pixel_norm, generator))


def encode_patches(encode: Callable[[torch.Tensor], torch.Tensor], patches: torch.Tensor) -> torch.Tensor:
    """Encode patches (n, B, C, s, s) in one pass; returns the L2-normalised projections (n, B, D),
    patch-major (z_i = out[i]). The group mean is out.mean(0)."""
    n, b = patches.shape[:2]
    return F.normalize(encode(patches.flatten(0, 1)), dim=-1).view(n, b, -1)
