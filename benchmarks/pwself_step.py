"""PW-Self vs plain DINO: the cost of one training step on the same ViT, views and batch, measured in one run.

    nice -n 19 python benchmarks/pwself_step.py [--params params.yaml] [--pwself-run pwself] [--dino-run dino-vit]
        [--batch 0] [--reps 12] [--threads 1] [--device cpu] [--out benchmarks/results/pwself-step-cpu.json]

Both methods are built from the params' runs (the CPU profile: ViT-Tiny, 6 blocks, 8 px patches, 32 px globals,
2 locals of 16 px, head to 4096 prototypes, AdamW) with the same seed, and step on the same batch: the views
and crop boxes the loader's ViewSpecs produce for random images (so the patch matches are the real
distribution). A step is the trainer's `train_step`: forward (PW-Self: matching, head on the used tokens,
every pair's token cross-entropies), backward, optimizer, EMA update. The two are timed in interleaved
repetitions (DINO, PW-Self, DINO, ...) so that load from other processes hits both alike; reported: each
method's median step, the median over repetitions of the per-repetition ratio (target <= 1.15), the rows
each head projects per image, and where each step goes (torch.profiler, one step each). The per-patch augmentation runs in the loader, off the step:
its cost per batch is reported separately.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import params as P  # noqa: E402
from pipeline.data.loader import Batch  # noqa: E402
from pipeline.data.views import View  # noqa: E402
from pipeline.train.optim import build_optimizer  # noqa: E402
from pipeline.train.trainer import build_method, train_step  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402


def make_batch(method, n: int, p: dict, seed: int = 0):
    """The views and geometry the loader would make for n random images (its ViewSpecs, one batch)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    size = p["dataset"]["image_size"]
    views = [View(s, p["dataset"]["mean"], p["dataset"]["std"]) for s in method.views()]
    imgs = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    outs = [[v(img) for img in imgs] for v in views]
    x = [torch.stack([o[0] for o in out]) for out in outs]
    geo = [torch.stack([o[1] for o in out]) for out in outs]
    return Batch(x, geo, torch.zeros(n, dtype=torch.long), torch.arange(n)), views


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--pwself-run", default="pwself")
    ap.add_argument("--dino-run", default="dino-vit")
    ap.add_argument("--batch", type=int, default=0, help="0: the run's train.batch_size")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/pwself-step-<device type>.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    p = P.load(a.params)

    methods = {}
    for name, run in (("dino", a.dino_run), ("pwself", a.pwself_run)):
        torch.manual_seed(p["seed"])
        m, train_cfg, bb = build_method(p, run)
        m.to(dev).train()
        opt = build_optimizer(m.param_groups(), train_cfg)
        m.set_progress(0.5, 1.0)  # past the last-layer freeze: every parameter steps
        methods[name] = (m, opt, train_cfg)
    n = a.batch or methods["pwself"][2]["batch_size"]
    batch, pw_views = make_batch(methods["pwself"][0], n, p)
    batch = batch.to(dev)
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def step(name):
        m, opt, cfg = methods[name]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = train_step(m, m, opt, scaler, batch, None, cfg["grad_clip"], 0.5)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    for _ in range(a.warmup):
        for name in methods:
            step(name)
    times = {name: [] for name in methods}
    for r in range(a.reps):  # interleaved, alternating which goes first
        for name in (("dino", "pwself") if r % 2 == 0 else ("pwself", "dino")):
            times[name].append(step(name)[0])
    ratios = [pw / d for pw, d in zip(times["pwself"], times["dino"])]
    _, out = step("pwself")

    # rows through each head per image (the intrinsic extra work: every matched token gets the K-wide head and
    # softmax), and where each step goes (one profiled step each, self CPU time by op)
    from torch.profiler import ProfilerActivity, profile
    rows, top = {}, {}
    for name, (m, _, _) in methods.items():
        seen = {}
        hooks = [h.register_forward_hook(lambda mod, inp, o, k=k: seen.__setitem__(k, inp[0].shape[0] / n))
                 for k, h in (("student", m.head), ("teacher", m.teacher_head))]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(name)
        for h in hooks:
            h.remove()
        rows[name] = seen
        top[name] = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                     for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]]

    # the matmul work those rows imply (multiply-adds per image; fwd + bwd = 3x fwd for the student, fwd for
    # the teacher; attention's token-token products left out): the floor for the ratio on any machine
    def linear_macs(mod):
        return sum(x.weight.numel() for x in mod.modules() if isinstance(x, torch.nn.Linear)) + sum(
            x.weight_v.numel() for x in mod.modules() if hasattr(x, "weight_v"))

    m0 = methods["dino"][0]
    bb, hd = linear_macs(m0.backbone), linear_macs(m0.head)
    s_tok = sum(x.shape[-1] * x.shape[-2] // m0.backbone.patch_size ** 2 + 1 for x in batch.views)
    t_tok = sum(x.shape[-1] * x.shape[-2] // m0.backbone.patch_size ** 2 + 1 for x in batch.views[:2])
    work = {k: 3 * (s_tok * bb + r["student"] * hd) + t_tok * bb + r["teacher"] * hd for k, r in rows.items()}

    # the loader-side per-patch augmentation (off the step), per batch of all views
    aug = [v for v in pw_views if v.spec.patch_augment is not None]
    xs = [x.cpu() for x in batch.views]
    t = time.perf_counter()
    for _ in range(3):
        for v, x in zip(pw_views, xs):
            v.batch(x)
    aug_ms = 1e3 * (time.perf_counter() - t) / 3

    res = {
        "config": {"params": a.params, "pwself_run": a.pwself_run, "dino_run": a.dino_run, "batch": n,
                   "reps": a.reps, "views": [list(x.shape[-2:]) for x in batch.views],
                   "pwself": {k: methods["pwself"][0].cfg[k] for k in ("loss", "lambd", "patch_augment", "out_dim")}},
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "step_ms": {k: {"median": 1e3 * statistics.median(v), "min": 1e3 * min(v), "all": [1e3 * x for x in v]}
                    for k, v in times.items()},
        "ratio_median": statistics.median(ratios),
        "ratio_of_medians": statistics.median(times["pwself"]) / statistics.median(times["dino"]),
        "ratio_of_mins": min(times["pwself"]) / min(times["dino"]),
        "target": 1.15,
        "matched_patches_per_view_pair": float(out["matched"]),
        "head_rows_per_image": rows,
        "matmul_macs_per_image": work,
        "matmul_work_ratio": work["pwself"] / work["dino"],
        "profile_top_ops": top,
        "patch_augment_loader_ms_per_batch": aug_ms if aug else 0.0,
    }
    path = Path(a.out or f"benchmarks/results/pwself-step-{dev.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, path)
    print(json.dumps({k: v for k, v in res.items() if k != "profile_top_ops"}, indent=2))
    for name, ops in top.items():
        print(name + ":\n" + "\n".join(f"  {o['op']:40s} {o['self_ms']:9.1f} ms  x{o['calls']}" for o in ops))
    return res


if __name__ == "__main__":
    main()
