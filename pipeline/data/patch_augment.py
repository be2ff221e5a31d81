"""PW-Self patch-level photometric augmentation (Javidani et al., §3.3; Alg. 1 lines 12-14).

Each view, already spatially augmented, is cut into the ViT's grid x grid patches and every patch is
augmented on its own, independently of the others and of the whole image: colour jitter (brightness,
contrast, saturation, hue), solarisation, Gaussian blur and Gaussian noise. The paper gives no
probabilities or strengths; each operator is applied to each patch independently with its own
probability (so every patch gets a random combination, possibly none), with DINO-like defaults.
Greyscale and horizontal flip (off by default) complete VICReg's set for GSSSL's patches (GSSSL §4.1,
Figure 1: colour jitter, greyscale, flip, blur, solarisation); their draws come after all the others and
only when enabled, so settings without them give bit-identical results.

Vectorised: the batch is laid out patch-major, (B, g, g, C, ph*pw), per-patch parameters and masks are
broadcast over the pixels, hue shifts are one batched 3x3 matmul, and blur runs as one grouped
convolution over the selected patches only (each patch padded by replication of its own border: a patch
is a standalone unit, nothing bleeds in from its neighbours). All random draws are made up front in a fixed order, so the result is
deterministic under torch.manual_seed (or a given generator) whatever is selected. Patches that no
operator selects are returned bit-identical.

Works in [0, 1] pixel space: pass the dataset's mean/std when the views are normalised (the loader
normalises), so they are un-normalised first and re-normalised after.

Precision and host syncs (issue 23, defects 1 and 6): the whole augmentation runs in float32 with autocast
off, whatever the caller's autocast region (GSSSL and grouped SimCLR / MoCo-v2 cut and augment their patches
inside the forward: under CUDA autocast the blur convolution returned half precision and `index_copy` into
the float32 batch raised; CPU autocast promotes `index_copy` and hid it, but still blurred and hue-rotated in
bf16). On a CUDA device nothing reads the device back: the blur runs on every patch and is kept where
selected (fixed shapes instead of `nonzero`), the YIQ inverse is a constant, and the constants are copied
from pinned memory without blocking. On the CPU the blur runs on the selected patches only (no sync there),
bit for bit as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.transfer import to_device

OPS = ("jitter", "grayscale", "blur", "solarize", "noise", "hflip")     # applied in this order


def _uniform(shape, lo: float, hi: float, device, generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, device=device, generator=generator)


def _gray(y: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale; y: (..., C, L) -> (..., 1, L)."""
    return (0.299 * y[..., 0:1, :] + 0.587 * y[..., 1:2, :] + 0.114 * y[..., 2:3, :]) if y.shape[-2] == 3 else y


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)   # once, not per step (a per-step inverse on CUDA is a solver call)


def _hue_matrix(angle: torch.Tensor) -> torch.Tensor:
    """Hue shift as a rotation of the chroma plane in YIQ space: a linear, vectorisable approximation of
    torchvision's HSV hue shift. angle (...) -> (..., 3, 3) RGB -> RGB matrices."""
    fwd, inv = (to_device(m, angle.device, angle.dtype) for m in (_RGB2YIQ, _YIQ2RGB))
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(*angle.shape, 3, 3, device=angle.device, dtype=angle.dtype)
    rot[..., 0, 0] = 1
    rot[..., 1, 1], rot[..., 1, 2], rot[..., 2, 1], rot[..., 2, 2] = cos, -sin, sin, cos
    return inv @ rot @ fwd


def _blur_patches(p: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """p: (N, C, ph, pw) patches, sigma: (N,) -> each patch blurred with its own separable Gaussian,
    one grouped convolution for all of them; replicate padding keeps each patch self-contained."""
    n, c, ph, pw = p.shape
    if n == 0:
        return p
    x = torch.arange(k, device=p.device, dtype=p.dtype) - (k - 1) / 2
    w = torch.exp(-(x[None, :] ** 2) / (2 * sigma[:, None].to(p.dtype) ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(c, dim=0)          # (N*C, k)
    pad = (k - 1) // 2
    out = F.pad(p.reshape(1, n * c, ph, pw), (pad, pad, pad, pad), mode="replicate")
    out = F.conv2d(out, w[:, None, :, None], groups=n * c)
    out = F.conv2d(out, w[:, None, None, :], groups=n * c)
    return out.reshape(n, c, ph, pw)


# devices where the blur runs on the selected patches only (their indices read with `nonzero`, which costs no
# sync on the host); anywhere else, fixed shapes
SELECT_ON_HOST = frozenset({"cpu"})


def _blur_selected(flat: torch.Tensor, sel: torch.Tensor, sigma: torch.Tensor, k: int, fixed_shape: bool) -> torch.Tensor:
    """flat (N, C, ph, pw) with the patches where sel (N,) is set blurred (sigma (N,)). fixed_shape: blur every
    patch and keep the selected ones (no `nonzero`, whose data-dependent size makes a GPU wait); otherwise
    blur only the selected patches (the CPU path: less work, no sync to avoid)."""
    if fixed_shape:
        return torch.where(sel[:, None, None, None], _blur_patches(flat, sigma, k), flat)
    idx = sel.nonzero().squeeze(1)
    return flat.index_copy(0, idx, _blur_patches(flat[idx], sigma[idx], k))


def patch_augment(x: torch.Tensor, grid: int, *, enabled: bool = True, mean=None, std=None,
                  jitter_p: float = 0.8, jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
                  blur_p: float = 0.2, blur_sigma: tuple[float, float] = (0.1, 2.0),
                  solarize_p: float = 0.2, solarize_threshold: float = 0.5,
                  noise_p: float = 0.2, noise_std: float = 0.05, grayscale_p: float = 0.0, hflip_p: float = 0.0,
                  generator: torch.Generator | None = None, return_masks: bool = False):
    """Augment every patch of a batch of views independently (§3.3).

    x: (B, C, H, W), H and W divisible by `grid` (the ViT's patches per side). jitter = (brightness,
    contrast, saturation, hue) strengths as torchvision's ColorJitter (factors drawn per patch);
    contrast uses the patch's own mean grey. Each op's probability is per patch; grayscale follows
    jitter (torchvision's RandomGrayscale: luma copied to every channel) and hflip mirrors the patch in
    place (last, it commutes with the per-pixel ops). mean/std: the
    normalisation of x, if any. Returns the augmented batch (same shape and dtype), and with
    `return_masks` also {op: (B, grid, grid) bool} of the patches each op was applied to.
    """
    B, C, H, W = x.shape
    if H % grid or W % grid:
        raise ValueError(f"patch_augment: image size {H}x{W} is not divisible by grid {grid}")
    dev = x.device
    if not enabled:
        return (x, {op: torch.zeros(B, grid, grid, dtype=torch.bool, device=dev) for op in OPS}) if return_masks else x
    # float32 with autocast off, whatever the caller's region (module doc)
    with torch.autocast(dev.type, enabled=False):
        out, masks = _augment(x.float(), grid, mean, std, jitter_p, jitter, blur_p, blur_sigma, solarize_p,
                              solarize_threshold, noise_p, noise_std, grayscale_p, hflip_p, generator)
    out = out.to(x.dtype)
    return (out, masks) if return_masks else out


def _augment(x, grid, mean, std, jitter_p, jitter, blur_p, blur_sigma, solarize_p, solarize_threshold, noise_p,
             noise_std, grayscale_p, hflip_p, generator):
    """patch_augment's body on a float32 x, autocast off; returns (out, {op: (B, grid, grid) masks})."""
    B, C, H, W = x.shape
    ph, pw = H // grid, W // grid
    dev = x.device

    # every draw up front, fixed order: the result depends on the seed only
    shape = (B, grid, grid, 1, 1)
    probs = {"jitter": jitter_p, "blur": blur_p, "solarize": solarize_p, "noise": noise_p}
    masks = {op: torch.rand(shape, device=dev, generator=generator) < probs[op] for op in probs}
    b, c, s, h = jitter
    f_b = _uniform(shape, max(0.0, 1 - b), 1 + b, dev, generator)
    f_c = _uniform(shape, max(0.0, 1 - c), 1 + c, dev, generator)
    f_s = _uniform(shape, max(0.0, 1 - s), 1 + s, dev, generator)
    f_h = _uniform((B, grid, grid), -h, h, dev, generator) * (2 * math.pi)
    sigma = _uniform((B, grid, grid), blur_sigma[0], blur_sigma[1], dev, generator)
    noise = torch.randn((B, grid, grid, C, ph * pw), device=dev, generator=generator) * noise_std
    for op, p in (("grayscale", grayscale_p), ("hflip", hflip_p)):   # drawn last, and only when used
        masks[op] = (torch.rand(shape, device=dev, generator=generator) < p) if p > 0 else torch.zeros(shape, dtype=torch.bool, device=dev)

    # patch-major layout (B, g, g, C, ph*pw), one copy: per-patch parameters broadcast over contiguous
    # inner dims (fast elementwise ops), and blur sees each patch as a plain (C, ph, pw) image
    x_p = x.reshape(B, C, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, grid, grid, C, ph * pw)
    if mean is not None:
        m_ = to_device(torch.as_tensor(mean, dtype=x.dtype), dev).view(-1, 1)
        s_ = to_device(torch.as_tensor(std, dtype=x.dtype), dev).view(-1, 1)
    y = x_p * s_ + m_ if mean is not None else x_p

    if jitter_p > 0:
        j = (y * f_b).clamp(0, 1)
        grey_mean = _gray(j).mean(dim=-1, keepdim=True)          # the patch's own mean, not the image's
        j = (f_c * j + (1 - f_c) * grey_mean).clamp(0, 1)
        if C == 3:
            j = (f_s * j + (1 - f_s) * _gray(j)).clamp(0, 1)
            if h > 0:
                j = (_hue_matrix(f_h) @ j).clamp(0, 1)
        y = torch.where(masks["jitter"], j, y)
    if grayscale_p > 0:
        y = torch.where(masks["grayscale"], _gray(y).expand_as(y), y)
    if blur_p > 0:
        k = min(2 * math.ceil(2 * blur_sigma[1]) + 1, 2 * min(ph, pw) - 1)   # ~2 sigma each side, within a patch
        if k >= 3:
            flat = _blur_selected(y.reshape(B * grid * grid, C, ph, pw), masks["blur"].reshape(-1), sigma.reshape(-1),
                                  k, fixed_shape=dev.type not in SELECT_ON_HOST)
            y = flat.reshape(B, grid, grid, C, ph * pw)
    if solarize_p > 0:
        y = torch.where(masks["solarize"] & (y >= solarize_threshold), 1 - y, y)
    if noise_p > 0:
        y = torch.where(masks["noise"], (y + noise).clamp(0, 1), y)

    y = (y - m_) / s_ if mean is not None else y
    any_op = masks["jitter"] | masks["grayscale"] | masks["blur"] | masks["solarize"] | masks["noise"]
    out = torch.where(any_op, y, x_p).reshape(B, grid, grid, C, ph, pw)
    if hflip_p > 0:
        out = torch.where(masks["hflip"].unsqueeze(-1), out.flip(-1), out)
    out = out.permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
    return out, {op: masks[op].reshape(B, grid, grid) for op in OPS}


@dataclass(frozen=True)
class PatchAugment:
    """patch_augment's settings, e.g. from a params block (`PatchAugment(**cfg)`)."""
    enabled: bool = True
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    solarize_threshold: float = 0.5
    noise_p: float = 0.2
    noise_std: float = 0.05
    grayscale_p: float = 0.0
    hflip_p: float = 0.0

    def __call__(self, x: torch.Tensor, grid: int, mean=None, std=None, generator=None, return_masks=False):
        return patch_augment(x, grid, enabled=self.enabled, mean=mean, std=std, jitter_p=self.jitter_p,
                             jitter=tuple(self.jitter), blur_p=self.blur_p, blur_sigma=tuple(self.blur_sigma),
                             solarize_p=self.solarize_p, solarize_threshold=self.solarize_threshold,
                             noise_p=self.noise_p, noise_std=self.noise_std, grayscale_p=self.grayscale_p,
                             hflip_p=self.hflip_p, generator=generator,
                             return_masks=return_masks)
