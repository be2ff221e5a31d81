"""The GPU presets' training steps at their true shapes: shared by benchmarks/memory.py and benchmarks/gpu_check.py.

A run's step shape is what its per-GPU memory and its GPU check depend on: method, backbone, image size, the
views (size and count), the global batch, the GPUs it is split over (`train.gpus`), the batch per GPU and the
AMP dtype. `synthetic_batch` builds a `Batch` as the loader hands it over (uint8 views with their pending
device augmentation, or final float views) without shards, so a step can run at any shape on any device.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.device_augment import ViewAugment  # noqa: E402
from pipeline.data.loader import Batch  # noqa: E402
from pipeline.params import method_config, validate  # noqa: E402
from pipeline.profile import resolve  # noqa: E402

GPU_PROFILES = ("gpu-resnet18", "imagenet1k", "imagenet100", "stl10", "cifar10-vit")


def load_preset(name: str) -> dict:
    return validate(resolve(name))


def trained_runs(p: dict) -> list[str]:
    """Every run of the preset that trains (seeds share their run's shape; the random-init floors do not train)."""
    runs = [*p["runs"], *p["pair_runs"]]
    return [r for r in runs if method_config(p, r)[0] != "random" and method_config(p, r)[2]["epochs"] > 0]


def step_shape(p: dict, run: str, method=None) -> dict:
    """What a run's step memory depends on (the memory table records it; a changed preset makes it stale)."""
    name, block, train, backbone = method_config(p, run)
    gpus = train.get("gpus", 1)
    if method is None:
        from pipeline.train.trainer import build_method

        with torch.device("meta"):   # the views need the method's settings, not its weights
            method = build_method(p, run)[0]
    sizes: dict[int, int] = {}
    for v in method.views():
        sizes[v.size] = sizes.get(v.size, 0) + 1
    return {"method": name, "backbone": dict(backbone), "image_size": p["dataset"]["image_size"],
            "views": {str(s): n for s, n in sorted(sizes.items(), reverse=True)},
            "batch_size": train["batch_size"], "gpus": gpus, "batch_per_gpu": train["batch_size"] // gpus,
            "amp": train["amp"]}


def synthetic_batch(method, n: int, image_size: int, device, augment: bool, mean, std, seed: int = 0) -> Batch:
    """A batch of n random images in every view the method asks for: as the loader hands it over (uint8 views,
    augmentation pending: `augment=True`, apply it with `Batch.to`) or final normalised float views."""
    g = torch.Generator().manual_seed(seed)
    specs = method.views()
    views = [torch.randint(0, 256, (n, 3, s.size, s.size), generator=g, dtype=torch.uint8) for s in specs]
    if not augment:
        m = torch.tensor(mean).view(1, 3, 1, 1)
        sd = torch.tensor(std).view(1, 3, 1, 1)
        views = [((v.float() / 255 - m) / sd).to(device) for v in views]
    # every crop the whole image (overlapping fully: the most patch matches PW-Self can make)
    geometry = [torch.tensor([[0.0, 0.0, image_size, image_size, 0.0]]).repeat(n, 1) for _ in specs]
    index = torch.arange(n, dtype=torch.int64)
    return Batch(views=views, geometry=geometry, label=torch.zeros(n, dtype=torch.int64), index=index,
                 positive=index.clone(), seed=seed, augment=[ViewAugment(s, mean, std) for s in specs] if augment else None)
