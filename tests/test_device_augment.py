"""Batched photometric augmentation on the device: each op equals torchvision's functional op, and the
random parameters follow the per-sample pipeline's distribution."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from pipeline.data import device_augment as D
from pipeline.data.patch_augment import PatchAugment
from pipeline.data.views import ViewSpec

ATOL = 2e-5


def images(n=6, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = x[0, :1]                      # one grey image (zero chroma: hue's degenerate case)
    x[1, :, :5, :5] = 1.0                # saturated corner (ties between channels)
    return x


def per_sample(fn, x, factors):
    return torch.stack([fn(x[i], float(f)) for i, f in enumerate(factors)])


@pytest.mark.parametrize("ours, theirs, lo, hi", [
    (D.adjust_brightness, TF.adjust_brightness, 0.3, 1.7),
    (D.adjust_contrast, TF.adjust_contrast, 0.3, 1.7),
    (D.adjust_saturation, TF.adjust_saturation, 0.0, 1.8),
    (D.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_jitter_ops_equal_torchvision_per_sample(ours, theirs, lo, hi):
    x = images()
    f = torch.linspace(lo, hi, len(x))
    assert torch.allclose(ours(x, f), per_sample(theirs, x, f), atol=ATOL)


def test_grayscale_solarize_and_blur_equal_torchvision():
    x = images()
    assert torch.allclose(D.grayscale(x), TF.rgb_to_grayscale(x), atol=ATOL)
    assert torch.equal(D.solarize(x), TF.solarize(x, 128 / 255))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    for k in (3, 9, 23):
        if k // 2 >= x.shape[-1]:
            continue
        want = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(s), float(s)]) for i, s in enumerate(sigma)])
        assert torch.allclose(D.gaussian_blur(x, sigma, k), want, atol=ATOL), k


def test_photometric_applies_each_op_to_the_selected_samples_in_their_own_order():
    spec = ViewSpec(size=20, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=1.0, grayscale_p=0.5, blur_p=0.5,
                    solarize_p=0.5)
    x = images()
    params = D.draw_params(spec, len(x), torch.Generator().manual_seed(1))
    got = D.photometric(x, spec, params)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(len(x)):  # the per-sample reference: torchvision's functional ops, one image at a time
        y = x[i]
        for op in params["order"][i].tolist():
            y = ops[op](y, float(params["factors"][op, i]))
        if params["grayscale"][i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if params["blur"][i]:
            s = float(params["sigma"][i])
            y = TF.gaussian_blur(y, [spec.blur_kernel] * 2, [s, s])
        if params["solarize"][i]:
            y = TF.solarize(y, 128 / 255)
        assert torch.allclose(got[i], y, atol=1e-4), i


def test_color_jitter_in_one_pass_per_position_is_the_ops_one_at_a_time_bit_for_bit():
    for strengths in ((0.4, 0.4, 0.4, 0.1), (0.4, 0.0, 0.4, 0.0), (0.0, 0.4, 0.0, 0.2)):
        spec = ViewSpec(size=20, color_jitter=strengths, color_jitter_p=0.7)
        x = images()
        params = D.draw_params(spec, len(x), torch.Generator().manual_seed(2))
        want = x.clone()
        for i in range(len(x)):
            if not params["jitter"][i]:
                continue
            for op in params["order"][i].tolist():
                if strengths[op]:
                    want[i:i + 1] = D.JITTER_OPS[op](want[i:i + 1], params["factors"][op, i:i + 1])
        got = D.color_jitter(x.clone(), strengths, params)
        assert torch.equal(got, want), strengths


def test_random_parameters_follow_the_per_sample_distribution():
    spec = ViewSpec(size=32, color_jitter=(0.4, 0.3, 0.2, 0.1), color_jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                    solarize_p=0.1)
    n = 20000
    p = D.draw_params(spec, n, torch.Generator().manual_seed(0))
    tol = 4 * math.sqrt(0.25 / n)       # 4 standard errors of a proportion
    for key, want in (("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5), ("solarize", 0.1)):
        assert abs(p[key].float().mean().item() - want) < tol, key
    for row, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        f = p["factors"][row]
        assert lo <= f.min() and f.max() <= hi
        assert abs(f.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo) + 1e-3     # uniform: centred
        assert abs(f.std().item() - (hi - lo) / math.sqrt(12)) < 0.02 * (hi - lo)
    assert 0.1 <= p["sigma"].min() and p["sigma"].max() <= 2.0
    # the jitter order is a uniform random permutation: each op first in ~1/4 of the samples, all 24 orders seen
    first = torch.bincount(p["order"][:, 0], minlength=4).float() / n
    assert (first - 0.25).abs().max() < tol
    assert len({tuple(o) for o in p["order"][:2000].tolist()}) == 24
    # independent draws: jitter and grayscale co-occur at the product of their probabilities
    both = (p["jitter"] & p["grayscale"]).float().mean().item()
    assert abs(both - 0.16) < tol


def test_view_augment_normalises_is_seeded_and_applies_patch_augment():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    spec = ViewSpec(size=8, color_jitter_p=0.0, grayscale_p=0.0)
    u8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    plain = D.ViewAugment(spec, mean, std)(u8, seed=1)
    want = (u8.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(plain, want, atol=1e-6)
    full = D.ViewAugment(ViewSpec(size=8, blur_p=0.5, solarize_p=0.5), mean, std)
    assert torch.equal(full(u8, seed=5), full(u8, seed=5)) and not torch.equal(full(u8, seed=5), full(u8, seed=6))
    patch = D.ViewAugment(ViewSpec(size=8, color_jitter_p=0.0, grayscale_p=0.0, patch_augment=PatchAugment(),
                                   patch_grid=2), mean, std)
    g = torch.Generator().manual_seed(D.mix_seed(1, 3))
    assert torch.equal(patch(u8, seed=1), PatchAugment()(want, 2, mean=mean, std=std, generator=g))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_result():
    spec = ViewSpec(size=32, blur_p=0.5, solarize_p=0.2)
    u8 = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    aug = D.ViewAugment(spec, (0.5,) * 3, (0.25,) * 3)
    assert torch.allclose(aug(u8.cuda(), seed=3).cpu(), aug(u8, seed=3), atol=1e-4)
