"""PW-Self patch matching: per-sample vectorised vs the paper's batch-shared boxes (§4.1.2) vs a Python loop.

    nice -n 19 python benchmarks/patch_matching.py [--batch 256] [--locals 10] [--iters 200] [--device cpu]
        [--threads 0] [--out benchmarks/results/patch-matching-cpu.json]

Geometry as the loader makes it: RandomResizedCrop boxes on a --image-size image, global crops
scale (0.4, 1) on a grid of --grid-global patches, local crops scale (0.05, 0.4) on --grid-local, random
flips. A training step matches every (teacher global view, other student view) pair: 2 x (1 + locals)
calls (global-global and global-local). Reported per call and per step:
  vectorised  match_patches: per-sample boxes, padded + masked, no Python loop over samples;
  shared      match_patches_shared: the paper's one-box-per-batch shortcut (matching once, broadcast);
  loop        match_patches_reference: a per-sample Python loop (the naive per-sample way; fewer iterations);
  stacked     (per step) the vectorised matching with every view pair of equal grids stacked along the
              batch: 2 calls (global-global, global-local) instead of 2 x (1 + locals).
Also the matched pairs per view pair (mean) and the share of view pairs with no patch match.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.views import RATIO  # noqa: E402
from pipeline.data.patch_matching import match_patches, match_patches_reference, match_patches_shared  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402


def boxes(n: int, image_size: int, scale: tuple[float, float]) -> torch.Tensor:
    img = torch.empty(3, image_size, image_size)
    rows = [list(T.RandomResizedCrop.get_params(img, list(scale), list(RATIO))) + [int(torch.rand(()) < 0.5)]
            for _ in range(n)]
    return torch.tensor(rows, dtype=torch.int32)


def timed(fn, iters: int, device: torch.device, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--locals", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--grid-global", type=int, default=8)
    ap.add_argument("--grid-local", type=int, default=4)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--loop-iters", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/patch-matching-<device type>.json")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    g = [boxes(a.batch, a.image_size, (0.4, 1.0)).to(dev) for _ in range(2)]
    loc = [boxes(a.batch, a.image_size, (0.05, 0.4)).to(dev) for _ in range(a.locals)]
    gg, gl = a.grid_global, a.grid_local
    # the pairs of one step: (teacher global i, student view j != i)
    step = [(g[i], g[1 - i], gg, gg) for i in range(2)] + [(g[i], l_, gg, gl) for i in range(2) for l_ in loc]

    # the same pairs in 2 calls: view pairs with equal grids stacked along the batch dim
    gg_a, gg_b = torch.cat([g[0], g[1]]), torch.cat([g[1], g[0]])
    gl_a = torch.cat([g[i] for i in range(2) for _ in loc])
    gl_b = torch.cat([l_ for _ in range(2) for l_ in loc])

    res = {}
    for kind, args in {"global-local": (g[0], loc[0], gg, gl), "global-global": (g[0], g[1], gg, gg)}.items():
        res[kind] = {
            "vectorised_ms": 1e3 * timed(lambda: match_patches(*args), a.iters, dev),
            "vectorised_trim_ms": 1e3 * timed(lambda: match_patches(*args, trim=True), a.iters, dev),
            "shared_ms": 1e3 * timed(lambda: match_patches_shared(*args), a.iters, dev),
            "loop_ms": 1e3 * timed(lambda: match_patches_reference(args[0].cpu(), args[1].cpu(), *args[2:]),
                                   a.loop_iters, dev, warmup=1),
        }
    res["step"] = {
        "calls": len(step),
        "vectorised_ms": 1e3 * timed(lambda: [match_patches(*s) for s in step], max(1, a.iters // 10), dev),
        "shared_ms": 1e3 * timed(lambda: [match_patches_shared(*s) for s in step], max(1, a.iters // 10), dev),
        "vectorised_stacked_ms": 1e3 * timed(lambda: (match_patches(gg_a, gg_b, gg, gg), match_patches(gl_a, gl_b, gg, gl)),
                                             max(1, a.iters // 10), dev),
    }
    n_pairs = torch.cat([match_patches(*s)[2].sum(1).float() for s in step[2:]])
    out = {
        "config": {k: getattr(a, k) for k in ("batch", "locals", "image_size", "grid_global", "grid_local", "iters", "loop_iters")},
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "results": res,
        "global_local_pairs": {"mean": float(n_pairs.mean()), "max": float(n_pairs.max()),
                               "no_match_share": float((n_pairs == 0).float().mean()),
                               "bound": min(gg, gl) ** 2},
        "vectorised_over_shared": res["step"]["vectorised_ms"] / res["step"]["shared_ms"],
        "stacked_over_shared": res["step"]["vectorised_stacked_ms"] / res["step"]["shared_ms"],
        "loop_over_vectorised": res["global-local"]["loop_ms"] / res["global-local"]["vectorised_ms"],
    }
    path = Path(a.out or f"benchmarks/results/patch-matching-{dev.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, path)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
