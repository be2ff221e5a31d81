"""The CPU profile's shared recipe, chosen on a validation split carved from the training images.

    python benchmarks/recipe_search.py [--runs simclr mocov2] [--out benchmarks/results/recipe-search-cpu.json]
    python benchmarks/recipe_search.py --quick     # does it run? (synthetic shards, a few steps, nothing written)

The CPU profile trains every method for a few epochs on `train.train_subset` images; its shared augmentation
and schedule decide whether methods learn at all in that budget, so they are searched, not guessed:

  validation  bank: the first `--bank` training images (inside the pretraining subset, labels used by kNN
              only); queries: the last `--queries` images of the train split, outside the subset (never seen in
              pretraining). The test split is never read.
  score       kNN-200 top-1 (%) (τ = 0.1, the evaluate stage's protocol) of the frozen backbone.
  search      coordinate-wise, one stage after the other, each keeping the best of the one before (mean score
              over the runs, so every method gets the same setting):
              1. augmentation: crop scale minimum x colour-jitter strength s (SimCLR's s: jitter
                 (0.8 s, 0.8 s, 0.8 s, 0.2 s));
              2. schedule: warm-up epochs x final lr ratio of the cosine.
The table is written after every training (the search resumes where it stopped). Each score is one training
seed on `--queries` images: its binomial standard error near 40 % is ~0.7 points (5000 queries), so the
table also reports it; a setting is changed only when the best beats the current one by more than two of
those (otherwise the current one stays, and the table says so).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import params as P  # noqa: E402
from pipeline.data.shards import read_manifest  # noqa: E402
from pipeline.eval.features import extract_features  # noqa: E402
from pipeline.eval.knn import knn_accuracy  # noqa: E402
from pipeline.models.encoder_io import load_encoder  # noqa: E402
from pipeline.train.checkpoint import RunPaths  # noqa: E402
from pipeline.train.trainer import train  # noqa: E402
from pipeline.device import claim_device  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402

K, TEMPERATURE = 200, 0.1
CROP_MIN = (0.08, 0.2, 0.35)
JITTER_S = (0.5, 1.0)
WARMUP = (0.0, 0.5, 1.0)
MIN_LR_RATIO = (0.0, 0.1)


def jitter(s: float) -> list[float]:
    return [round(0.8 * s, 4)] * 3 + [round(0.2 * s, 4)]


def augment_candidates(p: dict) -> list[dict]:
    return [{"augment": {"crop_scale": [c, 1.0], "color_jitter": jitter(s)}} for c, s in itertools.product(CROP_MIN, JITTER_S)]


def schedule_candidates(p: dict) -> list[dict]:
    return [{"train": {"warmup_epochs": w, "min_lr_ratio": m}} for w, m in itertools.product(WARMUP, MIN_LR_RATIO)]


STAGES = (("augmentation", augment_candidates), ("schedule", schedule_candidates))


def current(p: dict, stage: str) -> dict:
    if stage == "augmentation":
        return {"augment": {"crop_scale": list(p["augment"]["crop_scale"]), "color_jitter": list(p["augment"]["color_jitter"])}}
    return {"train": {"warmup_epochs": p["train"]["warmup_epochs"], "min_lr_ratio": p["train"]["min_lr_ratio"]}}


def key_of(setting: dict) -> str:
    return ", ".join(f"{block}.{k}={v}" for block, kv in setting.items() for k, v in kv.items())


class Validation:
    """kNN-200 of an encoder on the carved split (features of the bank and queries, test split untouched)."""

    def __init__(self, p: dict, shard_dir: Path, bank: int, queries: int, device):
        n_train = len(read_manifest(shard_dir, "train"))
        subset = p["train"]["train_subset"] or n_train
        if subset + queries > n_train:
            raise SystemExit(f"--queries {queries}: the train split has {n_train} images and train.train_subset "
                             f"uses {subset}; the queries must lie outside the pretraining images")
        self.bank = np.arange(min(bank, subset))
        self.queries = np.arange(n_train - queries, n_train)
        self.p, self.shard_dir, self.device = p, shard_dir, device

    def __call__(self, encoder_path: Path) -> float:
        encoder, _ = load_encoder(encoder_path)
        d = self.p["dataset"]
        feats = [extract_features(encoder, self.shard_dir, "train", d["image_size"], d["mean"], d["std"], 512,
                                  self.device, positions=pos)[:2] for pos in (self.bank, self.queries)]
        (bank, bank_labels), (query, query_labels) = feats
        return knn_accuracy(bank, bank_labels, query, query_labels, [K], TEMPERATURE)[K]


def effective(p: dict, setting: dict, run: str) -> str:
    """The blocks a setting changes, as they train: equal strings train the same run."""
    q = {block: {**p[block], **kv} for block, kv in setting.items()}
    full = {b: q.get(b, p[b]) for b in ("augment", "train")}
    return json.dumps([run, full], sort_keys=True)


def score(p: dict, run: str, setting: dict, shard_dir: Path, validation: Validation) -> dict:
    q = copy.deepcopy(p)
    for block, kv in setting.items():
        q[block].update(kv)
    q = P.validate(q, methods=[P.run_spec(q, run)["method"]])
    root = Path(tempfile.mkdtemp(prefix="recipe-"))
    try:
        paths = RunPaths.for_run(root, q["dataset"]["name"], run)
        paths.shards = shard_dir
        t = time.perf_counter()
        summary = train(q, run, root, paths=paths)
        acc = validation(paths.encoder)
        return {"knn200": acc, "train_s": time.perf_counter() - t, "final_loss": summary.get("final_loss")}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--runs", nargs="*", default=["simclr", "mocov2"])
    ap.add_argument("--bank", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--out", default="benchmarks/results/recipe-search-cpu.json")
    ap.add_argument("--quick", action="store_true", help="synthetic shards, tiny runs, nothing written")
    a = ap.parse_args()
    p = P.load(a.params)
    shard_dir = Path("data/shards") / p["dataset"]["name"]
    if a.quick:
        from benchmarks.throughput import synthetic_shards
        shard_dir = synthetic_shards(Path(tempfile.mkdtemp()), p["dataset"]["image_size"], n=96)
        p["train"].update(batch_size=16, train_subset=32, epochs=1)
        for r in a.runs:
            p["methods"][P.run_spec(p, r)["method"]].get("train", {}).pop("batch_size", None)
        a.bank, a.queries = 32, 16
    validation = Validation(p, shard_dir, a.bank, a.queries, claim_device())
    out = Path(a.out)
    table = {} if a.quick or not out.exists() else json.loads(out.read_text())
    rows = table.setdefault("rows", [])
    done = {(r["stage"], r["setting"], r["run"]): r for r in rows}
    by_config: dict[str, dict] = {}
    se = 100 * math.sqrt(0.4 * 0.6 / a.queries)
    table.update(runs=a.runs, bank=int(len(validation.bank)), queries=a.queries, k=K, temperature=TEMPERATURE,
                 standard_error_points=se, params=a.params, torch=torch.__version__, threads=torch.get_num_threads())
    chosen = {}
    for stage, candidates in STAGES:
        base = {**current(p, stage)}
        means = {}
        for setting in candidates(p):
            key = key_of(setting)
            accs = []
            for run in a.runs:
                row = done.get((stage, key, run))
                same = effective(p, setting, run)
                if row is None and same in by_config:   # this stage's current setting is the last stage's choice
                    row = {**by_config[same], "stage": stage, "setting": key, "reused": True}
                if row is None:
                    row = {"stage": stage, "setting": key, "run": run, **score(p, run, setting, shard_dir, validation)}
                by_config[same] = row
                if (stage, key, run) not in done:
                    rows.append(row)
                    done[(stage, key, run)] = row
                    if not a.quick:
                        atomic_write_json(table, out)
                print(f"{stage:>12} | {key:<60} | {run:>8} | kNN-200 {row['knn200']:6.2f} | {row['train_s']:5.0f} s", flush=True)
                accs.append(row["knn200"])
            means[key] = (statistics.mean(accs), setting)
        best_key = max(means, key=lambda k: means[k][0])
        cur_key = key_of(base)
        keep = cur_key in means and means[best_key][0] - means[cur_key][0] <= 2 * se
        pick = cur_key if keep else best_key
        chosen[stage] = {"setting": pick, "mean_knn200": means[pick][0], "best": best_key,
                         "best_mean_knn200": means[best_key][0], "kept_current": keep}
        for block, kv in means[pick][1].items():   # the next stage searches on top of this one's choice
            p[block].update(kv)
        print(f"{stage}: {'kept' if keep else 'chose'} {pick} (mean kNN-200 {means[pick][0]:.2f}; best {best_key} "
              f"{means[best_key][0]:.2f}; 2 SE = {2 * se:.2f})", flush=True)
    table["chosen"] = chosen
    if not a.quick:
        atomic_write_json(table, out)


if __name__ == "__main__":
    main()
