"""Feature extraction on the CPU profile's shards: where the time goes, as ratios measured in one run.

    python benchmarks/features.py [--images 10240] [--runs simclr dino-vit] [--out benchmarks/results/features-cpu.json]
    python benchmarks/features.py --quick        # does it run? (a few images, nothing written)

For each encoder (a trained `data/models/<run>/encoder.safetensors`) on the first `--images` train images:
  decode    reading the shards and the eval view alone (no model): what feeds the encoder
  bare      the backbone's forward alone on the same views, already decoded (batches of evaluate.batch_size)
  bare-mon  the same in the kNN monitor's CPU batches (`pipeline.train.monitor.CPU_BATCH`), as the monitor
            encodes its decoded-once views
  ours-wN   `extract_features` end to end with N DataLoader workers (N = 0 and evaluate.num_workers)
Reported: images/s of each, ours / bare as a time ratio (1.0 = the model is the only cost) and bare /
bare-mon. Meaningful only on an idle
machine: nothing else may run beside it.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import paths  # noqa: E402
from pipeline.data.eval_view import DEFAULT_CROP_RATIO, eval_transform  # noqa: E402
from pipeline.data.shards import read_manifest  # noqa: E402
from benchmarks.loader import best_of  # noqa: E402
from pipeline.eval.features import SplitBatches, extract_features, wanted_positions  # noqa: E402
from pipeline.models.encoder_io import load_encoder  # noqa: E402
from pipeline.params import load as load_params  # noqa: E402
from pipeline.train.monitor import CPU_BATCH  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10240)
    ap.add_argument("--runs", nargs="+", default=["simclr", "dino-vit"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=0, help="0: evaluate.batch_size")
    ap.add_argument("--out", default="benchmarks/results/features-cpu.json")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.images, a.repeats, a.runs = 64, 1, a.runs[:1]
    p = load_params()
    ds, ev = p["dataset"], p["evaluate"]
    shard_dir = paths.shards(ds["name"])
    bs, workers = a.batch_size or ev["batch_size"], ev["num_workers"]
    manifest = read_manifest(shard_dir, "train").sort_values("position", kind="stable").reset_index(drop=True)
    wanted = wanted_positions(len(manifest), a.images)
    transform = eval_transform(ds["image_size"], ds["mean"], ds["std"], ev.get("crop_ratio", DEFAULT_CROP_RATIO))

    def decoded():
        return list(SplitBatches(shard_dir, "train", manifest, wanted, range(-(-len(wanted) // bs)), bs, transform))

    t_decode = best_of(decoded, a.repeats)
    batches = [x for _, x in decoded()]
    small = list(torch.cat(batches).split(CPU_BATCH))
    rows = {}
    for run in a.runs:
        backbone, _ = load_encoder(paths.encoder(run))

        @torch.no_grad()
        def bare(views=batches):
            for x in views:
                backbone(x)

        def ours(n):
            return lambda: extract_features(backbone, shard_dir, "train", ds["image_size"], ds["mean"], ds["std"],
                                            bs, "cpu", limit=a.images, num_workers=n)

        t_bare, t_mon = best_of(bare, a.repeats), best_of(lambda: bare(small), a.repeats)
        row = {"decode_img_s": len(wanted) / t_decode, "bare_img_s": len(wanted) / t_bare,
               f"bare_b{CPU_BATCH}_img_s": len(wanted) / t_mon, f"bare_over_bare_b{CPU_BATCH}": t_bare / t_mon}
        for n in sorted({0, workers}):
            t = best_of(ours(n), a.repeats)
            row[f"ours_w{n}_img_s"] = len(wanted) / t
            row[f"ours_w{n}_over_bare"] = t / t_bare
        rows[run] = row
        print(run, {k: round(v, 2) for k, v in row.items()}, flush=True)
    if not a.quick:
        atomic_write_json({"images": len(wanted), "batch_size": bs, "monitor_cpu_batch": CPU_BATCH,
                           "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                           "torch": torch.__version__, "runs": rows}, Path(a.out))


if __name__ == "__main__":
    main()
