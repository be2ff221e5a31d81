"""Loader cost per view on one core: the old per-sample path against the new split path.

    python benchmarks/loader.py [--images 64] [--repeats 3] [--out benchmarks/results/loader-cpu.json]
    python benchmarks/loader.py --quick      # does it run? (a few images, nothing written)

Three settings (synthetic JPEGs: 32 x 32 for CIFAR, 500 x 375 for the ImageNet-sized ones):
  cifar-two-view   2 x 32 px, SimCLR's CIFAR augmentation (no blur)
  byol-two-view    2 x 224 px, BYOL's augmentation (blur p 1.0 / 0.1, solarisation p 0 / 0.2)
  dino-multi-crop  2 x 224 px global + 10 x 96 px local crops, DINO's augmentation
Paths:
  old     what a loader worker did before (HEAD~ of pipeline/data/views.py): decode, then per sample and
          view PIL / torchvision v1 crop, flip, ColorJitter, RandomGrayscale, torchvision GaussianBlur,
          RandomSolarize, ToTensor, Normalize
  worker  what a worker does now: decode, crop, flip, to uint8 (`View`)
  device  the batched photometric half (`ViewAugment`) on this machine's training device (CPU here)
Reported per setting: views/s per core of old and worker, the device's views/s, and the CPU cost cut
(old / worker: what a GPU's feeding cores save). Timings are meaningful only on an idle machine.
"""
from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.device_augment import ViewAugment  # noqa: E402
from pipeline.data.sources import decode_rgb  # noqa: E402
from pipeline.data.views import RATIO, View, ViewSpec  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIMCLR = dict(color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=0.8, grayscale_p=0.2)
BYOL = dict(color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_p=0.8, grayscale_p=0.2)
SETTINGS = {
    "cifar-two-view": (32, [ViewSpec(32, (0.2, 1.0), **SIMCLR)] * 2),
    "byol-two-view": (None, [ViewSpec(224, (0.08, 1.0), blur_p=1.0, **BYOL),
                             ViewSpec(224, (0.08, 1.0), blur_p=0.1, solarize_p=0.2, **BYOL)]),
    "dino-multi-crop": (None, [ViewSpec(224, (0.4, 1.0), blur_p=1.0, **BYOL),
                               ViewSpec(224, (0.4, 1.0), blur_p=0.1, solarize_p=0.2, **BYOL)]
                        + [ViewSpec(96, (0.05, 0.4), blur_p=0.5, **BYOL)] * 10),
}


class LegacyView:
    """The per-sample worker path this change replaced: PIL / torchvision v1 transforms on each view."""

    def __init__(self, spec: ViewSpec):
        self.spec = spec
        ops = []
        if spec.color_jitter_p > 0 and any(spec.color_jitter):
            ops.append(T.RandomApply([T.ColorJitter(*spec.color_jitter)], p=spec.color_jitter_p))
        if spec.grayscale_p > 0:
            ops.append(T.RandomGrayscale(p=spec.grayscale_p))
        if spec.blur_p > 0:
            ops.append(T.RandomApply([T.GaussianBlur(spec.blur_kernel, sigma=(0.1, 2.0))], p=spec.blur_p))
        if spec.solarize_p > 0:
            ops.append(T.RandomSolarize(128, p=spec.solarize_p))
        self.photometric = T.Compose(ops)
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])

    def __call__(self, img):
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.spec.crop_scale), list(RATIO))
        out = F.resized_crop(img, top, left, h, w, [self.spec.size, self.spec.size], antialias=True)
        if torch.rand(()) < self.spec.hflip:
            out = F.hflip(out)
        return self.normalize(self.photometric(out))


def jpegs(n: int, size: tuple[int, int]) -> list[bytes]:
    """n JPEGs of smooth random content (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench(name: str, images: int, repeats: int, device: torch.device) -> dict:
    side, specs = SETTINGS[name]
    data = jpegs(images, (side, side) if side else (500, 375))
    n_views = images * len(specs)
    legacy = [LegacyView(s) for s in specs]
    views = [View(s, MEAN, STD) for s in specs]
    augs = [ViewAugment(s, MEAN, STD) for s in specs]

    def old():
        for b in data:
            img = decode_rgb(b)
            for v in legacy:
                v(img)

    crops: list[list[torch.Tensor]] = [[] for _ in specs]

    def worker():
        g = torch.Generator().manual_seed(0)
        for c in crops:
            c.clear()
        images = [decode_rgb(b) for b in data]       # as the loader: decode the batch, then each view over it
        for k, v in enumerate(views):
            crops[k].append(v.render(images, g)[0])

    worker_s = best_of(worker, repeats)
    batches = [torch.cat(c).to(device) for c in crops]

    def on_device():
        for k, (a, x) in enumerate(zip(augs, batches)):
            a(x, seed=k)
        if device.type == "cuda":
            torch.cuda.synchronize()

    on_device()   # warm-up (CUDA kernels, allocator)
    device_s = best_of(on_device, repeats)
    old_s = best_of(old, repeats)
    return {"setting": name, "images": images, "views": n_views,
            "old_views_per_s_per_core": n_views / old_s, "worker_views_per_s_per_core": n_views / worker_s,
            "device_views_per_s": n_views / device_s, "device": device.type,
            "cpu_cost_cut_old_over_worker": old_s / worker_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/loader-cpu.json")
    ap.add_argument("--quick", action="store_true", help="4 images, 1 repeat, nothing written")
    a = ap.parse_args()
    if a.quick:
        a.images, a.repeats = 4, 1
    torch.set_num_threads(1)     # per core: a loader worker is one process on one core
    device = torch.device(a.device)
    results = [bench(s, a.images, a.repeats, device) for s in a.settings]
    for r in results:
        print(f"{r['setting']:>16}: old {r['old_views_per_s_per_core']:.1f} views/s/core, worker "
              f"{r['worker_views_per_s_per_core']:.1f} views/s/core ({r['cpu_cost_cut_old_over_worker']:.1f}x less CPU), "
              f"device ({r['device']}) {r['device_views_per_s']:.0f} views/s")
    if not a.quick:
        env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": 1,
               "device": str(device), "images": a.images, "repeats": a.repeats}
        atomic_write_json({"env": env, "results": results}, a.out)


if __name__ == "__main__":
    main()
