"""Our views against torchvision's transforms at the same settings, over thousands of seeded draws.

Ours draw a batch at once (crop boxes and flips in `views.View.render`, the photometric parameters in
`device_augment.draw_params`); the reference is SimCLR's per-image torchvision pipeline

    Compose([RandomResizedCrop(size, scale), RandomHorizontalFlip(hflip),
             RandomApply([ColorJitter(b, c, s, h)], color_jitter_p), RandomGrayscale(grayscale_p)])

whose draws are recorded by running it with its functional ops stubbed out (`torchvision_draws`).
Settings: mild (the committed CPU recipe, profiles/cpu.yaml `augment:`: crop 0.2-1, jitter 0.4/0.4/0.4/0.1) and
strong (SimCLR's: crop 0.08-1, jitter 0.8/0.8/0.8/0.2), both at 32 px from 32 px images, and strong at 224 px
from ImageNet-like image sizes. Compared:
1. the crop box: area fraction, log aspect ratio and normalised centre (two-sample KS), the fallback rate;
2. the rendered crop: ours against `resized_crop` on the PIL image (what the loader decodes) and on the tensor
   (bilinear, antialiased: torchvision's tensor default), upscaling small crops at 32 px and downscaling to 224 px;
3. colour jitter: the rate it applies, each factor's range and distribution (hue's included), the order of the
   four ops (each op's position) and the jittered images themselves;
4. the grayscale and flip rates.
The per-image ops themselves equal torchvision's functional ops: tests/test_device_augment.py.
"""
from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import yaml
from PIL import Image

from pipeline.data import device_augment as D
from pipeline.data.views import View, ViewSpec, crop_boxes

MILD = yaml.safe_load((Path(__file__).resolve().parents[1] / "profiles/cpu.yaml").read_text())["augment"]
STRONG = {**MILD, "crop_scale": [0.08, 1.0], "color_jitter": [0.8, 0.8, 0.8, 0.2]}
IMAGENET_SIZES = [(375, 500), (500, 333), (256, 256), (480, 640), (333, 500)]   # (height, width)
SETTINGS = {"mild-32": (MILD, 32, [(32, 32)]), "strong-32": (STRONG, 32, [(32, 32)]),
            "strong-224": (STRONG, 224, IMAGENET_SIZES)}
N, BATCH = 8000, 1000
MEAN, STD = (0.5,) * 3, (0.25,) * 3
JITTER = ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue")

# Tolerances. With fixed seeds the test is deterministic; the bounds are chosen so that sampling noise would pass
# them under any seed: two-sample KS at alpha ~1e-4 (c(alpha) = sqrt(-ln(alpha / 2) / 2) = 2.2; conservative for
# the discrete box sizes at 32 px), proportions within 4.5 standard errors of a two-sample difference. At n = 8000
# that is KS < 0.035 and |dp| < 0.03 at p = 0.5: a real change (crop scale 0.08 vs 0.2: KS ~0.13; a fixed jitter
# order: a 0 / 1 cell in the position table; p 0.8 vs 0.5) exceeds them many times over.
KS_C, SE_K = 2.2, 4.5


@contextlib.contextmanager
def one_thread():
    """Per-image torch ops on tiny tensors: thread hand-offs would dominate them (and compete with other work)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def ks(a, b) -> float:
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, x, "right") / len(a) - np.searchsorted(b, x, "right") / len(b)).max())


def assert_same_distribution(ours, theirs, what):
    d, bound = ks(ours, theirs), KS_C * math.sqrt(1 / len(ours) + 1 / len(theirs))
    assert d < bound, f"{what}: KS {d:.4f} >= {bound:.4f}"


def assert_same_rate(ours, theirs, what):
    ours, theirs = np.asarray(ours, float), np.asarray(theirs, float)
    p = (ours.sum() + theirs.sum()) / (len(ours) + len(theirs))
    bound = SE_K * math.sqrt(max(p * (1 - p), 1e-4) * (1 / len(ours) + 1 / len(theirs)))
    assert abs(ours.mean() - theirs.mean()) < bound, f"{what}: {ours.mean():.4f} vs {theirs.mean():.4f}"


def spec_of(setting: str) -> ViewSpec:
    augment, size, _ = SETTINGS[setting]
    return ViewSpec.from_augment(augment, size)


def sizes_of(setting: str, n: int) -> np.ndarray:
    sizes = SETTINGS[setting][2]
    return np.array([sizes[i % len(sizes)] for i in range(n)])


def smooth_images(sizes, seed=0) -> list[Image.Image]:
    """Photograph-like test images: coarse random colour fields, bilinearly enlarged, plus pixel noise (edges
    and texture, so a wrong pixel near a crop's border shows)."""
    rng, out = np.random.default_rng(seed), []
    for h, w in sizes:
        coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3), dtype=np.uint8))
        x = np.asarray(coarse.resize((w, h), Image.BILINEAR)).astype(np.int16) + rng.integers(-40, 41, (h, w, 3))
        out.append(Image.fromarray(x.clip(0, 255).astype(np.uint8)))
    return out


# --- the draws ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def our_draws(setting: str) -> dict[str, np.ndarray]:
    """N views in batches of BATCH, each batch from its own generator as the loader does. At 32 px through
    `View.render` (boxes and flips from its geometry); at 224 px rendering thousands of views is too slow for a
    unit test, so the boxes come from `crop_boxes`, the function render draws them with (the flip draw does not
    depend on the size: checked at 32 px)."""
    spec, hw = spec_of(setting), sizes_of(setting, N)
    images = smooth_images([(32, 32)] * 16) if spec.size == 32 else None
    boxes, flips, params = [], [], []
    for b in range(N // BATCH):
        g = torch.Generator().manual_seed(100 + b)
        if images is not None:
            _, geo = View(spec, MEAN, STD).render([images[i % 16] for i in range(BATCH)], g)
            boxes.append(geo[:, :4].numpy())
            flips.append(geo[:, 4].numpy().astype(bool))
        else:
            rows = hw[b * BATCH:(b + 1) * BATCH]
            boxes.append(crop_boxes(rows[:, 0], rows[:, 1], spec.crop_scale, generator=g))
        params.append(D.draw_params(spec, BATCH, torch.Generator().manual_seed(200 + b)))
    cat = lambda k, dim=-1: torch.cat([p[k] for p in params], dim).numpy()  # noqa: E731
    return {"box": np.concatenate(boxes), "hw": hw, "flip": np.concatenate(flips) if flips else None,
            "jitter": cat("jitter"), "factors": cat("factors").T, "order": cat("order", 0), "gray": cat("grayscale")}


def torchvision_pipeline(spec: ViewSpec) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(spec.size, scale=spec.crop_scale), T.RandomHorizontalFlip(spec.hflip),
                      T.RandomApply([T.ColorJitter(*spec.color_jitter)], p=spec.color_jitter_p),
                      T.RandomGrayscale(spec.grayscale_p)])


def torchvision_draws(spec: ViewSpec, hw: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """What torchvision's pipeline draws for images of sizes `hw`: the pipeline runs on blank tensors of those
    sizes (only the shape is read) with `resized_crop`, `hflip`, the jitter ops and `rgb_to_grayscale` replaced by
    recorders that return the image unchanged, so every random decision is torchvision's own code."""
    pipe, calls = torchvision_pipeline(spec), []
    recorder = lambda name: lambda img, *args, **kw: calls.append((name, args)) or img  # noqa: E731
    blanks = {tuple(s): torch.empty(3, *s) for s in np.unique(hw, axis=0).tolist()}
    out = {"box": [], "flip": [], "jitter": [], "order": [], "factors": [], "gray": []}
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(), one_thread():
        for name in ("resized_crop", "hflip", "rgb_to_grayscale") + JITTER:
            mp.setattr(TF, name, recorder(name))
        torch.manual_seed(seed)
        for s in hw.tolist():
            calls.clear()
            pipe(blanks[tuple(s)])
            names = [c[0] for c in calls]
            out["box"].append(calls[0][1][:4])
            out["flip"].append("hflip" in names)
            order = [JITTER.index(c[0]) for c in calls if c[0] in JITTER]
            out["jitter"].append(bool(order))
            out["order"].append(order or [-1] * 4)
            factors = {JITTER.index(c[0]): c[1][0] for c in calls if c[0] in JITTER}
            out["factors"].append([factors.get(k, np.nan) for k in range(4)])
            out["gray"].append("rgb_to_grayscale" in names)
    return {k: np.asarray(v) for k, v in out.items()} | {"hw": hw}


@functools.lru_cache(maxsize=None)
def reference_draws(setting: str) -> dict[str, np.ndarray]:
    return torchvision_draws(spec_of(setting), sizes_of(setting, N), seed=7)


def box_features(box: np.ndarray, hw: np.ndarray) -> dict[str, np.ndarray]:
    top, left, h, w = box.T.astype(float)
    H, W = hw.T.astype(float)
    return {"area fraction": h * w / (H * W), "log aspect": np.log(w / h),
            "centre x": (left + w / 2) / W, "centre y": (top + h / 2) / H}


# --- 1. the crop box ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", SETTINGS)
def test_crop_box_distribution_is_random_resized_crops(setting):
    ours, theirs = our_draws(setting), reference_draws(setting)
    a, b = box_features(ours["box"], ours["hw"]), box_features(theirs["box"], theirs["hw"])
    for k in a:
        assert_same_distribution(a[k], b[k], f"{setting} {k}")
    hi = SETTINGS[setting][0]["crop_scale"][1]
    # the whole image: a try at scale ~1 or the fallback after 10 failed tries (~0.3 % at 32 px; see the next test)
    assert_same_rate(a["area fraction"] > hi - 1e-9, b["area fraction"] > hi - 1e-9, f"{setting} whole image")
    assert ((ours["box"][:, :2] >= 0) & (ours["box"][:, 2:] > 0)).all()
    assert (ours["box"][:, 0] + ours["box"][:, 2] <= ours["hw"][:, 0]).all()
    assert (ours["box"][:, 1] + ours["box"][:, 3] <= ours["hw"][:, 1]).all()


def test_crop_fallback_after_ten_failed_tries_is_the_central_crop():
    """Where no try fits often (scale near 1 on images beyond the 3:4-4:3 ratio: about half the draws), the
    fallback — the whole image cut to the nearest allowed ratio, centred — is as frequent as torchvision's."""
    n, scale = 3000, (0.8, 1.0)
    hw = np.array([[32, 48], [48, 32], [40, 32]] * (n // 3))
    spec = ViewSpec(size=32, crop_scale=scale)
    ours = crop_boxes(hw[:, 0], hw[:, 1], scale, generator=torch.Generator().manual_seed(0))
    theirs = torchvision_draws(spec, hw, seed=1)["box"]
    central = {(32, 48): (0, 2, 32, 43), (48, 32): (2, 0, 43, 32), (40, 32): (0, 0, 40, 32)}
    for s, box in central.items():
        rows = (hw == s).all(1)
        got, want = (ours[rows] == box).all(1), (theirs[rows] == box).all(1)
        assert want.mean() > 0.01, s                   # the fallback is exercised
        assert_same_rate(got, want, f"fallback {s}")
    a, b = box_features(ours, hw), box_features(theirs, hw)
    for k in a:
        assert_same_distribution(a[k], b[k], f"fallback {k}")


# --- 2. the rendered crop ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size, sources", [(32, [(32, 32)] * 48), (224, IMAGENET_SIZES[:3] * 4)],
                         ids=["upscale-32", "downscale-224"])
def test_rendered_crop_is_torchvision_resized_crop(size, sources):
    """The loader decodes PIL images, so the reference is torchvision's `resized_crop` on the PIL image (PIL's
    bilinear, antialiased when downscaling) then `hflip`: equal to the byte. torchvision's tensor path (bilinear,
    antialias=True, its default) is within 1 grey level (its rounding); without antialiasing a 224 px view
    from a larger image would differ far more."""
    images = smooth_images(sources, seed=size)
    view = View(ViewSpec(size=size, crop_scale=(0.08, 1.0)), MEAN, STD)
    x, geo = view.render(images, torch.Generator().manual_seed(3))
    pil, tensor, aliased = [], [], []
    for img, (top, left, h, w, flip) in zip(images, geo.tolist()):
        f = TF.hflip if flip else (lambda y: y)
        pil.append(TF.pil_to_tensor(f(TF.resized_crop(img, top, left, h, w, [size, size]))))
        t = TF.pil_to_tensor(img)
        tensor.append(f(TF.resized_crop(t, top, left, h, w, [size, size], antialias=True)))
        aliased.append(f(TF.resized_crop(t, top, left, h, w, [size, size], antialias=False)))
    diffs = [(x.int() - torch.stack(ref).int()).abs().float() for ref in (pil, tensor, aliased)]
    (d_pil, m_pil), (d_tensor, m_tensor), (_, m_aliased) = [(d.max().item(), d.mean().item()) for d in diffs]
    assert d_pil == 0, f"PIL resized_crop: max {d_pil:.0f}, mean {m_pil:.3f}"
    assert d_tensor <= 1 and m_tensor < 0.3, f"tensor resized_crop: max {d_tensor:.0f}, mean {m_tensor:.3f}"
    if size == 224:
        assert m_aliased > 1, m_aliased       # (0.18 antialiased, 2.2 not, on these images)


# --- 3. colour jitter ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", SETTINGS)
def test_color_jitter_rate_factors_and_order_are_color_jitters(setting):
    ours, theirs = our_draws(setting), reference_draws(setting)
    assert_same_rate(ours["jitter"], theirs["jitter"], f"{setting} jitter applied")
    strengths = SETTINGS[setting][0]["color_jitter"]
    on_o, on_t = ours["jitter"], theirs["jitter"]
    for k, s in enumerate(strengths):
        lo, hi = (-s, s) if k == 3 else (max(0.0, 1 - s), 1 + s)     # ColorJitter's ranges
        a, b = ours["factors"][on_o, k], theirs["factors"][on_t, k]
        assert_same_distribution(a, b, f"{setting} {JITTER[k]} factor")
        for f in (a, b):     # in range, and both ends reached: P(min of n uniforms > lo + 10 / n of the range) = e^-10
            assert lo <= f.min() and f.max() <= hi, JITTER[k]
            assert f.min() - lo < 10 / len(f) * (hi - lo) and hi - f.max() < 10 / len(f) * (hi - lo), JITTER[k]
    # the order: torchvision applies the four ops in a uniformly random permutation per image; each op at each
    # position in ~1/4 of the jittered images (a fixed order would put 1 and 0 in this table)
    for pos in range(4):
        for op in range(4):
            assert_same_rate(ours["order"][on_o, pos] == op, theirs["order"][on_t, pos] == op,
                             f"{setting} {JITTER[op]} at position {pos}")


def test_jittered_images_are_distributed_as_torchvisions():
    """End to end at the strong setting: our batched photometric ops with their drawn parameters against
    torchvision's RandomApply(ColorJitter) + RandomGrayscale image by image, on the same images: per-image mean
    brightness, contrast (luma std), colourfulness (mean chroma) and hue rotation (hue's range and rate)."""
    spec, n = spec_of("strong-32"), 2000
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.8 + 0.1                      # one colour per image, plus texture
    x = (base + 0.15 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)
    ours = D.photometric(x, spec, D.draw_params(spec, n, torch.Generator().manual_seed(1)))
    pipe = T.Compose(torchvision_pipeline(spec).transforms[2:])
    with torch.random.fork_rng(), one_thread():
        torch.manual_seed(2)
        theirs = torch.stack([pipe(im) for im in x])

    hue_in = D._rgb_to_hsv(x)[0]

    def stats(y):
        luma, chroma = D.grayscale(y), y.amax(1) - y.amin(1)
        turn = torch.remainder(D._rgb_to_hsv(y)[0] - hue_in + 0.5, 1.0) - 0.5     # each pixel's hue rotation
        return {"brightness": luma.mean((1, 2, 3)), "contrast": luma.std((1, 2, 3)),
                "colourfulness": chroma.mean((1, 2)), "hue rotation": turn.mean((1, 2))}
    a, b = stats(ours), stats(theirs)
    for k in a:
        assert_same_distribution(a[k].numpy(), b[k].numpy(), k)


# --- 4. grayscale and flip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", SETTINGS)
def test_grayscale_and_flip_rates(setting):
    ours, theirs = our_draws(setting), reference_draws(setting)
    assert_same_rate(ours["gray"], theirs["gray"], f"{setting} grayscale")
    assert abs(ours["gray"].mean() - SETTINGS[setting][0]["grayscale_p"]) < 0.02     # and the profile's p: 4.5 SE
    if ours["flip"] is not None:
        assert_same_rate(ours["flip"], theirs["flip"], f"{setting} flip")
        assert abs(ours["flip"].mean() - SETTINGS[setting][0]["hflip"]) < 0.03        # 5 SE
    # independent draws: jitter and grayscale co-occur at the product of their rates, as in torchvision
    assert_same_rate(ours["jitter"] & ours["gray"], theirs["jitter"] & theirs["gray"], f"{setting} jitter and grey")
