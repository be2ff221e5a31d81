"""The photometric half of a view, batched on the training device, with per-sample random parameters.

Same distribution as torchvision's per-sample pipeline (SimCLR appendix A / BYOL table 6):
RandomApply(ColorJitter(b, c, s, h), p) with the four adjustments in a random order per sample,
RandomGrayscale(p), RandomApply(GaussianBlur(k, sigma ~ U(0.1, 2.0)), p), RandomSolarize(128/255, p),
then normalisation and, for PW-Self, the per-patch augmentation (§3.3). Each op is the same function
as torchvision's functional op on float images (tested), applied to the selected samples only.

Every random parameter of a batch is drawn up front on the CPU from one generator seeded by the batch's
seed, so a batch gets the same parameters on any device and a resumed run the same augmentation. Which samples
an op selects is therefore known on the host; the parameters and sample indices reach the device by
non-blocking copies from pinned memory (`transfer.to_device`), so augmenting a batch never makes the host wait
for the GPU (issue 23, defect 6).
Images are float in [0, 1] throughout; the loader hands over uint8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.transfer import constant, to_device
from pipeline.data.views import BLUR_SIGMA, ViewSpec
from pipeline.utils import mix_seed

SOLARIZE_THRESHOLD = 128 / 255     # torchvision's RandomSolarize(128) on uint8 images


# --- the ops, batched: x (B, 3, H, W) float in [0, 1]; one parameter per sample ---------------------------

def _per_sample(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return to_device(f, x.device, x.dtype).view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1 - f) * b).clamp(0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (torchvision's rgb_to_grayscale weights): (B, 3, H, W) -> (B, 1, H, W)."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(f, x)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey level."""
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), _per_sample(f, x))


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the image's own grayscale."""
    return _blend(x, grayscale(x), _per_sample(f, x))


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)         # elementwise over the three planes: no strided reduction
    c = v - torch.minimum(torch.minimum(r, g), b)     # chroma
    flat = c == 0
    s = c / torch.where(flat, torch.ones_like(v), v)
    c_safe = torch.where(flat, torch.ones_like(c), c)
    rc, gc, bc = (v - r) / c_safe, (v - g) / c_safe, (v - b) / c_safe
    # the sector of the hue circle depends on which channel is the maximum (red wins ties, then green)
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    return torch.remainder(h / 6.0, 1.0), s, v


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Branch-free: channel n in (5, 3, 1) for (r, g, b) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    (the same values as the sector table p, q, t of torchvision's _hsv2rgb)."""
    h6, vs = h * 6.0, v * s
    planes = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        planes.append(v - vs * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(planes, 1).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by f (a fraction of the circle, |f| <= 0.5) in HSV space."""
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + to_device(f, x.device, x.dtype).view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each image blurred with its own sigma: a separable Gaussian (one horizontal and one vertical
    grouped 1-D convolution, k + k instead of k * k taps per pixel), reflect padding as torchvision's."""
    n, c, h, w = x.shape
    if n == 0:
        return x
    t = torch.linspace(-(kernel - 1) / 2, (kernel - 1) / 2, kernel, device=x.device, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t[None] / to_device(sigma, x.device, x.dtype)[:, None]) ** 2)
    k1 = (k1 / k1.sum(1, keepdim=True)).repeat_interleave(c, 0)            # (n * c, k)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k1[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k1[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    return torch.where(x >= threshold, 1 - x, x)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# --- the random parameters of one batch -------------------------------------------------------------------

def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def draw_params(spec: ViewSpec, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random parameter of n samples, in a fixed order (CPU tensors): which ops apply, the four
    jitter factors (ranges as ColorJitter's), the jitter order (a uniform random permutation per
    sample), the blur sigmas."""
    b, c, s, h = spec.color_jitter
    g = generator
    return {
        "jitter": torch.rand(n, generator=g) < spec.color_jitter_p,
        "factors": torch.stack([_uniform(n, max(0.0, 1 - b), 1 + b, g), _uniform(n, max(0.0, 1 - c), 1 + c, g),
                                _uniform(n, max(0.0, 1 - s), 1 + s, g), _uniform(n, -h, h, g)]),
        "order": torch.rand(n, 4, generator=g).argsort(1),
        "grayscale": torch.rand(n, generator=g) < spec.grayscale_p,
        "blur": torch.rand(n, generator=g) < spec.blur_p,
        "sigma": _uniform(n, BLUR_SIGMA[0], BLUR_SIGMA[1], g),
        "solarize": torch.rand(n, generator=g) < spec.solarize_p,
    }


def _on(x: torch.Tensor, mask: torch.Tensor, fn, *args) -> torch.Tensor:
    """x with fn applied, in place, to the samples of the (CPU) mask only; the mask is known on the host: no
    sync."""
    idx = mask.nonzero().squeeze(1)
    if len(idx) == 0:
        return x
    idx_dev = to_device(idx, x.device)
    x[idx_dev] = fn(x[idx_dev], *(a[idx] for a in args))
    return x


def color_jitter(x: torch.Tensor, strengths, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """ColorJitter on the jittered samples, each with its own factors and order of the four adjustments.

    Brightness, contrast and saturation are one blend f * x + (1 - f) * target (target 0, the mean grey level,
    the grayscale image), so each of the four positions is a single pass over the batch: per sample the target
    of its op at that position, f = 1 (exactly x) where its op there is hue or off. Hue (HSV) runs on its own
    samples only. Bit for bit the ops applied one at a time (tested)."""
    idx = params["jitter"].nonzero().squeeze(1)
    if len(idx) == 0:
        return x
    dev = x.device
    idx_dev = to_device(idx, dev)
    y = x[idx_dev]
    factors, order = params["factors"][:, idx], params["order"][idx]
    linear = [op for op in range(3) if strengths[op] != 0]       # ColorJitter skips an op of strength 0
    for pos in range(4):
        op = order[:, pos]
        if linear:
            on = sum(op == k for k in linear).bool()
            f = torch.where(on, factors.gather(0, op.clamp(max=2)[None])[0], torch.ones(()))
            per = lambda t: to_device(t, dev, y.dtype).view(-1, 1, 1, 1)  # noqa: E731
            grey = grayscale(y)
            target = per(op == 1) * grey.mean(dim=(1, 2, 3), keepdim=True) + per(op == 2) * grey
            y = y.mul_(per(f)).add_(target.mul_(1 - per(f))).clamp_(0, 1)
        if strengths[3] != 0:
            y = _on(y, op == 3, adjust_hue, factors[3])
    x[idx_dev] = y
    return x


def photometric(x: torch.Tensor, spec: ViewSpec, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply the spec's photometric ops with the given per-sample parameters; x float in [0, 1] (not modified)."""
    x = x.clone()
    strengths = spec.color_jitter
    if spec.color_jitter_p > 0 and any(strengths):
        x = color_jitter(x, strengths, params)
    if spec.grayscale_p > 0:
        x = _on(x, params["grayscale"], lambda y: grayscale(y).expand_as(y))
    if spec.blur_p > 0:
        x = _on(x, params["blur"], lambda y, s: gaussian_blur(y, s, spec.blur_kernel), params["sigma"])
    if spec.solarize_p > 0:
        x = _on(x, params["solarize"], solarize)
    return x


class ViewAugment:
    """The device half of one view: uint8 (B, C, H, W) on any device -> augmented, normalised float."""

    def __init__(self, spec: ViewSpec, mean, std):
        self.spec, self.mean, self.std = spec, tuple(mean), tuple(std)

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        params = draw_params(self.spec, x.shape[0], torch.Generator().manual_seed(seed))
        y = photometric(x.float().div_(255), self.spec, params)
        mean = constant(self.mean, y.device, y.dtype).view(1, -1, 1, 1)
        std = constant(self.std, y.device, y.dtype).view(1, -1, 1, 1)
        y = (y - mean) / std
        pa = self.spec.patch_augment
        if pa is not None and pa.enabled:
            g = torch.Generator(device=y.device).manual_seed(mix_seed(seed, 3))
            y = pa(y, self.spec.patch_grid, mean=self.mean, std=self.std, generator=g)
        return y
