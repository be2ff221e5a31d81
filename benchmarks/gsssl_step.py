"""Training-step cost of GSSSL and the grouped SimCLR / MoCo-v2 variants relative to plain SimCLR.

    nice -n 19 python benchmarks/gsssl_step.py [--params params.yaml] [--batch 256] [--steps 3] [--rounds 2] \
        [--runs simclr gsssl gsssl-simclr gsssl-mocov2] [--out benchmarks/results/gsssl-step-cpu.json]

Each run is built from the params file exactly as the trainer builds it (its method block, backbone and
image size) and timed on random view tensors of the loader's shape: forward (including patch cutting and
per-patch augmentation), backward, SGD step and after_step. One warm-up step per run, then `--rounds`
rounds in which every run does `--steps` steps in turn (interleaved, so load from other processes hits all
runs alike); the median step time per run and its ratio to the first run are reported, both wall-clock
and process CPU time (all threads): on a shared machine the CPU time is the steadier measure of cost.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.params import load  # noqa: E402
from pipeline.train.trainer import build_method  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", nargs="+", default=["simclr", "gsssl", "gsssl-simclr", "gsssl-mocov2"])
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)

    p = load(a.params)
    size = p["dataset"]["image_size"]
    torch.manual_seed(0)
    views = [torch.randn(a.batch, 3, size, size) for _ in range(2)]
    batch = SimpleNamespace(views=views)
    models = {}
    for run in a.runs:
        method, _, _ = build_method(p, run)
        method.train()
        opt = torch.optim.SGD(method.parameters(), lr=1e-3, momentum=0.9)
        models[run] = (method, opt)

    def step(run):
        method, opt = models[run]
        t, c = time.perf_counter(), time.process_time()
        out = method(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.after_step(0.5)
        return time.perf_counter() - t, time.process_time() - c

    for run in a.runs:
        step(run)   # warm-up
    times = {run: [] for run in a.runs}
    for _ in range(a.rounds):
        for run in a.runs:
            times[run] += [step(run) for _ in range(a.steps)]
    med = {run: [statistics.median(t[j] for t in ts) for j in (0, 1)] for run, ts in times.items()}
    ref = a.runs[0]
    result = {"batch": a.batch, "image_size": size, "threads": torch.get_num_threads(), "host": platform.node(),
              "runs": {run: {"method": p["runs"][run]["method"], "overrides": p["runs"][run].get("overrides", {}),
                             "median_wall_s": med[run][0], "median_cpu_s": med[run][1], "steps_wall_cpu_s": times[run],
                             f"wall_ratio_to_{ref}": med[run][0] / med[ref][0],
                             f"cpu_ratio_to_{ref}": med[run][1] / med[ref][1]} for run in a.runs}}
    for run, r in result["runs"].items():
        print(f"{run:>14}: wall {r['median_wall_s']:.3f} s/step x{r[f'wall_ratio_to_{ref}']:.2f}   "
              f"cpu {r['median_cpu_s']:.3f} s/step x{r[f'cpu_ratio_to_{ref}']:.2f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
