"""Training throughput vs the bare backbone, and the shard loader's own rate, measured in one run.

    python benchmarks/throughput.py [--runs simclr mocov2] [--steps 15] [--out FILE]
        (default FILE: benchmarks/results/throughput-<device>.json: throughput-cpu.json on the CPU, e.g.
         throughput-nvidia-h100-80gb-hbm3.json on a GPU, so a GPU run never overwrites the CPU result)
    python benchmarks/throughput.py --quick     # does it run? (synthetic shards, 2 steps, batch 32; no output file)

For each run of params.yaml (shards must exist: `dvc repro shard`):
  ours    views/s of the trainer's real step (`Batch.to`: the batched photometric augmentation on the
          training device; `train_step`: method forward with heads and loss, backward, optimizer, EMA/queue
          updates) fed by the real DataLoader over the shards, workers included;
  step    views/s of the same step on one kept batch as the workers hand it over (uint8 crops: `Batch.to` with
          its augmentation, then `train_step`) with no loader running: the step alone, as on a machine whose
          loader workers have cores of their own (a GPU node); `ours` minus `step` is what the workers' decode
          takes from the step when they share its cores (here: 2);
  bare    views/s of the bare backbone doing the same passes on the same views and batch: forward +
          backward for views the method trains through, forward only for momentum-encoder views;
  loader  views/s of the DataLoader alone (decode + crop + flip in the workers), i.e. what training could consume.
Reported: ours / bare and step / bare (target >= 0.90 on CPU), and loader / ours (target >= 3).
On a GPU every pass runs as the trainer runs it (issue 23, defect 11): channels_last, autocast at `train.amp`
(bf16/fp16, GradScaler for fp16), and the timer synchronises the device before reading the clock.
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import params as P  # noqa: E402
from pipeline.data.loader import ShardStream, make_loader  # noqa: E402
from pipeline.data.shards import read_meta  # noqa: E402
from pipeline.train.optim import build_optimizer  # noqa: E402
from pipeline.train.trainer import build_method, train_step  # noqa: E402
from pipeline.device import amp_dtype_of, claim_device, device_slug, synchronize  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402

ROUNDS = 5   # alternating (ours, bare) timing rounds

# which views a method's backbone trains through (fwd+bwd) and which only a momentum encoder sees (fwd)
PASSES = {"simclr": lambda c: (2, 0), "mocov2": lambda c: (2 if c["symmetric"] else 1, 2 if c["symmetric"] else 1)}


def timed(fn, steps: int, warmup: int = 2, device: torch.device = torch.device("cpu")) -> float:
    """Seconds per call; the device's queued work is finished before the clock starts and before it stops."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / steps


def bench_run(p: dict, run: str, steps: int, shard_dir: Path) -> dict:
    torch.manual_seed(0)
    method, train_cfg, _ = build_method(p, run)
    name = p["runs"][run]["method"]
    meta = read_meta(shard_dir)
    bs = train_cfg["batch_size"]
    device = claim_device()
    channels_last = device.type == "cuda" and train_cfg["channels_last"]   # as the trainer wraps it
    method.to(device, memory_format=torch.channels_last) if channels_last else method.to(device)
    amp_dtype = amp_dtype_of(train_cfg, device)
    n_views = len(method.views())

    def batches():
        stream = ShardStream(shard_dir, method.views(), p["dataset"]["mean"], p["dataset"]["std"], bs,
                             meta["counts"]["train"], bs, p["seed"], subset=train_cfg["train_subset"])
        stream.start_at(0, 0, 10**6)        # one loader for the whole benchmark, as the trainer does
        return iter(make_loader(stream, train_cfg["num_workers"], pin_memory=device.type == "cuda"))

    # loader alone (its workers are shut down before the step is timed, so they take no CPU from it)
    def loader_alone() -> float:
        loading = batches()
        return timed(lambda: next(loading), steps, device=device)

    loader_s = loader_alone()
    gc.collect()

    # ours: the trainer's step on batches streamed by the real loader; bare: the backbone's passes on one
    # kept batch (in memory: no loading). Timed in alternating rounds, so drift of the machine's speed
    # (other processes, thermal) reaches both alike; the ratio is the median over rounds.
    opt = build_optimizer(method.param_groups(), train_cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    method.train()
    training = batches()
    raw = next(training)
    kept = raw.to(device, channels_last=channels_last)
    fb, fwd_only = PASSES[name](method.cfg)
    bb = method.backbone
    key_bb = getattr(method, "key_backbone", bb)
    views = kept.views

    def ours():
        train_step(method, method, opt, scaler, next(training).to(device, channels_last=channels_last), amp_dtype, 0.0, 0.5)

    def step():
        train_step(method, method, opt, scaler, raw.to(device, channels_last=channels_last), amp_dtype, 0.0, 0.5)

    def bare():
        bb.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = sum(bb(views[i % n_views]).float().pow(2).mean() for i in range(fb))
        scaler.scale(loss).backward()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for i in range(fwd_only):
                key_bb(views[(i + 1) % n_views])

    per_round = max(1, steps // ROUNDS)
    rounds = [(timed(ours, per_round, warmup=2 if r == 0 else 0, device=device),
               timed(step, per_round, warmup=1 if r == 0 else 0, device=device),
               timed(bare, per_round, warmup=1 if r == 0 else 0, device=device)) for r in range(ROUNDS)]
    ours_s, step_s, bare_s = (statistics.median(r[i] for r in rounds) for i in range(3))
    vps = lambda s: n_views * bs / s  # noqa: E731
    return {"run": run, "method": name, "device": device_slug(device), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
            "channels_last": channels_last, "batch_size": bs, "views_per_step": n_views * bs,
            "passes": {"forward_backward": fb, "forward_only": fwd_only}, "num_workers": train_cfg["num_workers"],
            "ours_views_per_s": vps(ours_s), "step_views_per_s": vps(step_s), "bare_views_per_s": vps(bare_s),
            "loader_views_per_s": vps(loader_s),
            "ratio_ours_over_bare": statistics.median(b / o for o, _, b in rounds),
            "ratio_step_over_bare": statistics.median(b / s for _, s, b in rounds),
            "ratio_per_round": [b / o for o, _, b in rounds], "ratio_step_per_round": [b / s for _, s, b in rounds],
            "rounds": ROUNDS, "ratio_loader_over_ours": ours_s / loader_s}


def synthetic_shards(root: Path, size: int, n: int = 160) -> Path:
    """Shards of n random size x size JPEGs in two classes (for --quick: no dataset needed)."""
    import numpy as np
    from PIL import Image

    from pipeline.data.shards import write_shards
    from pipeline.data.sources import imagefolder

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / "img" / split / c).mkdir(parents=True)
            for i in range(n // 2):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "img" / split / c / f"{i}.jpg")
    write_shards(imagefolder(root / "img"), root / "shards", 50, 0, False)
    return root / "shards"


def default_out(device: torch.device) -> str:
    """One file per device: a GPU run never overwrites the committed CPU result (throughput-cpu.json)."""
    return f"benchmarks/results/throughput-{device_slug(device)}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--runs", nargs="*", default=["simclr", "mocov2"])
    ap.add_argument("--steps", type=int, default=25, help="timed steps of each kind, over the rounds")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/throughput-<device>.json")
    ap.add_argument("--quick", action="store_true", help="synthetic shards, 2 steps, batch 32, nothing written")
    a = ap.parse_args()
    p = P.load(a.params)
    shard_dir = Path("data/shards") / p["dataset"]["name"]
    if a.quick:
        a.steps, p["train"]["batch_size"], p["train"]["train_subset"] = 2, 32, 0
        for r in a.runs:
            p["methods"][p["runs"][r]["method"]].get("train", {}).pop("batch_size", None)
        shard_dir = synthetic_shards(Path(tempfile.mkdtemp()), p["dataset"]["image_size"])
    results = [bench_run(p, r, a.steps, shard_dir) for r in a.runs]
    device = claim_device()
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "cuda": torch.cuda.is_available(), "steps": a.steps, "device": device_slug(device)}
    if not a.quick:
        atomic_write_json({"env": env, "results": results}, a.out or default_out(device))
    for r in results:
        print(f"{r['run']:>8}: ours {r['ours_views_per_s']:.0f} views/s, step alone {r['step_views_per_s']:.0f}, "
              f"bare backbone {r['bare_views_per_s']:.0f} -> ratio {r['ratio_ours_over_bare']:.3f} with the loader, "
              f"{r['ratio_step_over_bare']:.3f} step alone; loader alone {r['loader_views_per_s']:.0f} views/s "
              f"= {r['ratio_loader_over_ours']:.2f}x what training consumes")


if __name__ == "__main__":
    main()
