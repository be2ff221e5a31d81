"""One factor at a time: why a baseline trails a reference implementation at equal budget (issue 26, item 11).

    python benchmarks/ab_baselines.py                      # every experiment below; resumes where it stopped
    python benchmarks/ab_baselines.py --only nnclr         # the experiments whose name starts with this
    python benchmarks/ab_baselines.py --quick              # does it run? (synthetic shards, nothing written)

Each variant is the CPU profile's run with exactly one change (an override of the run's block or train settings,
or of its backbone), trained on the profile's budget (train.train_subset images, its epochs, seed 0) and scored with
the evaluate stage's kNN protocol on the test split: kNN-200, tau 0.1, every training image as the bank, the 10,000
test images as queries (the protocol of the issue's reference numbers). One seed each: the binomial standard error
of one score near 40 % is 0.5 points (10,000 queries); a factor is named a cause only when its variant moves the
score by more than two of those over the committed variant of the same table (seed-to-seed spread of the comparison's
3-seed runs is of the same size: see the report). Trainings live in data/ab-baselines/<hash> and resume.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import params as P  # noqa: E402
from pipeline.device import claim_device  # noqa: E402
from pipeline.eval.features import extract_features  # noqa: E402
from pipeline.eval.knn import knn_accuracy  # noqa: E402
from pipeline.models.encoder_io import load_encoder  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402
from benchmarks.recipe_search import train_resumable  # noqa: E402

K, TEMPERATURE = 200, 0.1
# Every variant changes the recipe the issue measured (the CPU profile before this round's recipe search), so the
# table's rows stay comparable after the profile adopts the search's choices (e.g. its gamma-1 init, a variant here).
ISSUE_TRAIN = {"lr": 0.06, "weight_decay": 5.0e-4, "warmup_epochs": 0.5, "min_lr_ratio": 0.0}
ISSUE_BACKBONE_UNSET = ("zero_init_last",)   # the builder's default then: timm's gamma 0

STRONG = {"crop_scale": [0.08, 1.0], "color_jitter": [0.8, 0.8, 0.8, 0.2]}   # SimCLR's own views (its §B.9, CIFAR)

# experiment: (run, {variant: change}); a change is {"overrides": ...} (the run's block / train), {"backbone": ...}
# or {"augment": ...} (the shared view block)
EXPERIMENTS = {
    "nnclr": ("nnclr", {
        "committed": {},
        "temperature 0.5 (the reference's loss default)": {"overrides": {"temperature": 0.5}},
        "flat lr (the reference's schedule)": {"overrides": {"train": {"warmup_epochs": 0.0, "min_lr_ratio": 1.0}}},
        "no solarisation (the reference's SimCLR views)": {"overrides": {"solarize_p": [0.0, 0.0]}},
        "residual BN gamma 1 (torchvision's init)": {"backbone": {"zero_init_last": False}},
        "flat lr, no solarisation, residual BN gamma 1 (the three that moved it)": {
            "backbone": {"zero_init_last": False},
            "overrides": {"solarize_p": [0.0, 0.0], "train": {"warmup_epochs": 0.0, "min_lr_ratio": 1.0}}},
    }),
    "simclr-strong": ("simclr", {
        "strong views": {"augment": STRONG},
        "strong views, residual BN gamma 1": {"augment": STRONG, "backbone": {"zero_init_last": False}},
        "strong views, flat lr": {"augment": STRONG,
                                  "overrides": {"train": {"warmup_epochs": 0.0, "min_lr_ratio": 1.0}}},
        "strong views, residual BN gamma 1, flat lr (the two that moved it)": {
            "augment": STRONG, "backbone": {"zero_init_last": False},
            "overrides": {"train": {"warmup_epochs": 0.0, "min_lr_ratio": 1.0}}},
    }),
}


def issue_recipe(p: dict) -> dict:
    q = copy.deepcopy(p)
    q["train"].update(ISSUE_TRAIN)
    for block in q["backbones"].values():
        for k in ISSUE_BACKBONE_UNSET:
            block.pop(k, None)
    return q


def variant_params(p: dict, run: str, change: dict) -> dict:
    q = issue_recipe(p)
    spec = P.run_spec(q, run)
    if "overrides" in change:
        spec["overrides"] = P.deep_merge(spec.get("overrides", {}), change["overrides"])
    if "backbone" in change:
        name = f"{spec['backbone']}-ab"
        q["backbones"][name] = {**q["backbones"][spec["backbone"]], **change["backbone"]}
        spec["backbone"] = name
    if "augment" in change:
        q["augment"].update(change["augment"])
    spec.setdefault("overrides", {}).setdefault("train", {})["knn_monitor"] = [0, 0]   # no effect on training
    return q


def config_of(q: dict, run: str) -> str:
    method, block, train_cfg, backbone = P.method_config(q, run)
    runtime = ("num_workers", "checkpoint_every", "sync_every", "knn_monitor", "knn_monitor_every")
    return json.dumps([run, method, block, {k: v for k, v in train_cfg.items() if k not in runtime}, backbone,
                       q["augment"], q["seed"]], sort_keys=True, default=str)


def knn_test(q: dict, encoder_path: Path, shard_dir: Path, device) -> float:
    encoder, _ = load_encoder(encoder_path)
    d = q["dataset"]
    (bank, bank_labels, _), (query, query_labels, _) = (
        extract_features(encoder, shard_dir, split, d["image_size"], d["mean"], d["std"], 512, device)
        for split in ("train", "test"))
    return knn_accuracy(bank, bank_labels, query, query_labels, [K], TEMPERATURE)[K]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="benchmarks/results/ab-baselines-cpu.json")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    p = P.load(a.params)
    shard_dir = Path("data/shards") / p["dataset"]["name"]
    work = Path("data/ab-baselines")
    if a.quick:
        from benchmarks.throughput import synthetic_shards
        shard_dir = synthetic_shards(Path(tempfile.mkdtemp()), p["dataset"]["image_size"], n=96)
        p["train"].update(batch_size=16, train_subset=32, epochs=1)
        for run, _ in EXPERIMENTS.values():
            p["methods"][P.run_spec(p, run)["method"]].get("train", {}).pop("batch_size", None)
        work = Path(tempfile.mkdtemp())
    out = Path(a.out)
    table = {} if a.quick or not out.exists() else json.loads(out.read_text())
    table.update(k=K, temperature=TEMPERATURE, split="test", seed=p["seed"], torch=torch.__version__,
                 threads=torch.get_num_threads(), params=a.params,
                 standard_error_points=100 * math.sqrt(0.4 * 0.6 / 10000))
    rows = table.setdefault("rows", {})
    device = claim_device()
    for name, (run, variants) in EXPERIMENTS.items():
        if not name.startswith(a.only):
            continue
        for label, change in variants.items():
            q = variant_params(p, run, change)
            config = config_of(q, run)
            key = f"{name} | {label}"
            if key in rows and rows[key]["config"] == config:
                print(f"{key}: kNN-200 {rows[key]['knn200']:.2f} (recorded)", flush=True)
                continue
            t = time.perf_counter()
            root, encoder, summary = train_resumable(q, run, config, shard_dir, work)
            acc = knn_test(q, encoder, shard_dir, device)
            rows[key] = {"experiment": name, "run": run, "variant": label, "change": change, "knn200": acc,
                         "final_loss": summary.get("final_loss"), "wall_s": round(time.perf_counter() - t, 1),
                         "config": config}
            if not a.quick:
                atomic_write_json(table, out)
                shutil.rmtree(root, ignore_errors=True)
            print(f"{key}: kNN-200 {acc:.2f}", flush=True)


if __name__ == "__main__":
    main()
