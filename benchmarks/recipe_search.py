"""The CPU profile's recipe (schedule, base lr, weight decay), chosen on a validation split carved from training images.

    python benchmarks/recipe_search.py                       # every family below, in order; resumes where it stopped
    python benchmarks/recipe_search.py --families sgd        # one family
    python benchmarks/recipe_search.py --quick               # does it run? (synthetic shards, a few steps, nothing written)

The CPU profile trains every method for a few epochs on `train.train_subset` images; whether a method learns in
that budget depends on the schedule and step size, so they are searched, not guessed:

  validation  bank: the first `--bank` training images (inside the pretraining subset, labels used by kNN
              only); queries: the last `--queries` images of the train split, outside the subset (never seen in
              pretraining). The test split is never read.
  score       kNN-200 top-1 (%) (tau = 0.1, the evaluate stage's protocol) of the frozen backbone.
  families    searched one after the other, each on top of the choices before it:
              sgd     the shared SGD recipe every ResNet method trains with, scored as the mean over its runs
                      (the two base methods: every compared pair shares it): 1. the residual branches' last BN
                      at gamma 0 or 1 (the backbone's init: at this budget it moved NNCLR's test kNN by 3.8 points,
                      benchmarks/ab_baselines.py); 2. schedule: warm-up epochs x final lr ratio (1.0 = flat after
                      warm-up, 0.1 or 0 = cosine to that fraction of the peak); 3. base lr; 4. weight decay;
              barlow  Barlow Twins and GSSSL, on a copy of the backbone block (their init is theirs): 1. the
                      residual init, shared by the pair, chosen on its base as the sgd family's recipe is: the mean
                      of Barlow Twins over three training seeds (the sgd family's gamma 1 held on seed 0 but left
                      seeds 1 and 2 of both runs below their init: a one-seed score missed it); 2. the base lr,
                      each run on its own, seed 0 (GSSSL's loss sums 2n + 1 terms, so one lr cannot give both the
                      step their papers' LARS gives; issue 26, item 7);
              vit     the AdamW base lr of DINO's ViT recipe (PW-Self inherits it), at `--vit-epochs` instead of the
                      profile's 16 (a 16-epoch ViT training costs ~45 min on 2 cores).
  edges       a one-number stage (base lr, weight decay) whose best setting lies at an end of its grid gets one more
              candidate beyond that end, at the grid's own ratio (lr 0.03, 0.06, 0.12 best at 0.12 -> 0.24), up to
              `MAX_EXTENSIONS` times: an optimum outside the grid is not taken for the grid's end.
  decision    a setting changes only when the best beats the current one by more than two standard errors of
              their difference (each score: one seed on `--queries` images, binomial SE ~0.7 points near 40 %;
              the difference of two means over the same runs has that SE too), otherwise the current one stays
              and the table says so.
The augmentation (crop scale x jitter strength) was searched in the first round on the same split
(benchmarks/results/recipe-search-cpu-augment.json) and is not searched again.
Settings go into each searched run's `overrides.train`, the top of the merge, so a method block's own value (e.g.
GSSSL's lr) is replaced too; the init goes into the run's backbone block (the family's own copy where the family
has one). The profile names each family's choice: a family whose init differs trains on its own backbone
block. The table is written after every training; train_s is wall time as it ran (taken beside other work,
across interruptions: not a throughput measurement).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import params as P  # noqa: E402
from pipeline.data.shards import read_manifest  # noqa: E402
from pipeline.device import claim_device  # noqa: E402
from pipeline.eval.features import extract_features  # noqa: E402
from pipeline.eval.knn import knn_accuracy  # noqa: E402
from pipeline.models.backbones import ZERO_INIT_LAST  # noqa: E402
from pipeline.models.encoder_io import load_encoder  # noqa: E402
from pipeline.train.checkpoint import RunPaths  # noqa: E402
from pipeline.train.trainer import train  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402

K, TEMPERATURE = 200, 0.1
WARMUP = (0.0, 0.5)
MIN_LR_RATIO = (1.0, 0.1, 0.0)
LR_FACTORS = (0.5, 1.0, 2.0)
WD_FACTORS = (0.2, 1.0, 2.0)
MAX_EXTENSIONS = 2


def residual_init(cur: dict, shared: dict) -> list[dict]:
    """Each residual branch's last BN at gamma 0 (timm's default; SimCLR's and SimSiam's code) or 1 (torchvision's
    default; MoCo-v2's code; Barlow Twins' and VICReg's code set torchvision's zero_init_residual, i.e. 0). Goes
    into the runs' backbone block: the sgd family's choice carries to every ResNet run on that block."""
    return [{"backbone.zero_init_last": v} for v in (True, False)]


def schedule(cur: dict, shared: dict) -> list[dict]:
    return [{"warmup_epochs": w, "min_lr_ratio": m} for w, m in itertools.product(WARMUP, MIN_LR_RATIO)]


def base_lr(factors):
    """The shared lr x factors (every run of a family on one grid), plus the run's current lr if off the grid."""
    def candidates(cur: dict, shared: dict) -> list[dict]:
        grid = [float(f"{shared['lr'] * f:.6g}") for f in factors]
        return [{"lr": lr} for lr in grid + ([cur["lr"]] if cur["lr"] not in grid else [])]
    return candidates


def weight_decay(cur: dict, shared: dict) -> list[dict]:
    return [{"weight_decay": float(f"{cur['weight_decay'] * f:.6g}")} for f in WD_FACTORS]


def beyond_edge(values, best: float) -> float | None:
    """The next value past `best` when it is the largest or smallest of `values`, at the ratio of the two values
    at that end of the grid; None when `best` lies inside the grid."""
    v = sorted(set(values))
    if len(v) < 2 or v[0] < best < v[-1]:
        return None
    end, inner = (v[-1], v[-2]) if best == v[-1] else (v[0], v[1])
    return float(f"{end * end / inner:.6g}")


def vit_lr(cur: dict, shared: dict) -> list[dict]:
    """AdamW's own scale (the shared lr is SGD's)."""
    return [{"lr": float(f"{cur['lr'] * f:.6g}")} for f in (0.5, 1.0, 2.0)]


class Stage(NamedTuple):
    """One search stage: its name, its candidates (from the first run's current train settings and the shared
    train block), whether a one-number stage is extended past its grid's edges (`beyond_edge`), whether each run
    is searched on its own (None: the family's `per_run`), how many training seeds score each setting (the
    first `seeds` of the profile's `seeds.values`: their mean is the score), and which runs score it when not all
    of the group (a non-idea setting of a pair chosen on its base, as the sgd family's on SimCLR / MoCo-v2)."""
    name: str
    candidates: Callable[[dict, dict], list[dict]]
    extend: bool
    per_run: bool | None = None
    seeds: int = 1
    scored_on: tuple[str, ...] = ()   # the runs whose scores decide (default: all of the group); applied to all


# family: runs, stages, per_run, epochs; own_backbone: the family's runs train on a copy of their backbone block,
# so a backbone setting it searches is the family's own and the families before it keep theirs
FAMILIES = {
    "sgd": dict(runs=["simclr", "mocov2"], per_run=False, epochs=None,
                stages=[Stage("residual_init", residual_init, False), Stage("schedule", schedule, False),
                        Stage("lr", base_lr(LR_FACTORS), True), Stage("weight_decay", weight_decay, True)]),
    # the init is shared by the pair (a non-idea setting), chosen on its base as the sgd family's is, and scored on
    # three seeds: on one seed the sgd family's gamma 1 looked fine for Barlow Twins, while seeds 1 and 2 of both
    # runs ended below their init (issue 26, the retrain)
    "barlow": dict(runs=["barlow_twins", "gsssl"], per_run=True, epochs=None, own_backbone=True,
                   stages=[Stage("residual_init", residual_init, False, per_run=False, seeds=3,
                                 scored_on=("barlow_twins",)),
                           Stage("lr", base_lr((0.25, 0.5, 1.0, 2.0)), True)]),
    "vit": dict(runs=["dino-vit"], per_run=False, epochs="vit", stages=[Stage("lr", vit_lr, True)]),
}


def seed_instances(p: dict, runs: list[str], seeds: int) -> list[str]:
    """The instances (run x training seed) that score a setting: each run under the first `seeds` seeds of
    `seeds.values` (the run's own name under the global seed, as the pipeline names them)."""
    if seeds == 1:
        return list(runs)
    values = p.get("seeds", {}).get("values", [])[:seeds]
    if len(values) < seeds:
        raise SystemExit(f"a stage scores {seeds} seeds; seeds.values has {len(values)}")
    return [P.instance_name(r, s, p["seed"]) for r in runs for s in values]


def own_backbone(p: dict, family: str, runs: list[str]) -> dict:
    """`p` with `runs` moved onto a copy of their backbone block named for `family` (one copy per block)."""
    q = copy.deepcopy(p)
    for run in runs:
        spec = P.run_spec(q, run)
        name = f"{spec['backbone']}.{family}"
        q["backbones"].setdefault(name, copy.deepcopy(q["backbones"][spec["backbone"]]))
        spec["backbone"] = name
    return q


def describe(fam: dict) -> dict:
    """What the table records of a family: its runs and stages, and where a stage departs from the family's rule."""
    return {"runs": fam["runs"], "per_run": fam["per_run"], "stages": [st.name for st in fam["stages"]],
            "seeds": {st.name: st.seeds for st in fam["stages"] if st.seeds > 1},
            "scored_on": {st.name: list(st.scored_on) for st in fam["stages"] if st.scored_on},
            "own_backbone": bool(fam.get("own_backbone"))}


def key_of(setting: dict) -> str:
    return ", ".join(f"{k if k.startswith('backbone.') else 'train.' + k}={v}" for k, v in setting.items())


def current(p: dict, run: str, keys) -> dict:
    """`run`'s current value of each setting key (train keys, or 'backbone.<key>' of its backbone block)."""
    _, _, train_cfg, backbone = P.method_config(p, run)
    defaults = {"zero_init_last": ZERO_INIT_LAST}   # what the backbone builder uses when the key is unset
    return {k: backbone.get(k[9:], defaults.get(k[9:])) if k.startswith("backbone.") else train_cfg[k] for k in keys}


def apply(p: dict, run: str, setting: dict) -> dict:
    """`p` with `setting` at the top of `run`'s train merge (its overrides); a 'backbone.<key>' setting goes into
    `run`'s backbone block, which every run on that block shares (`own_backbone` gives a family its own)."""
    q = copy.deepcopy(p)
    spec = P.run_spec(q, run)
    over = spec.setdefault("overrides", {})
    over["train"] = {**over.get("train", {}), **{k: v for k, v in setting.items() if not k.startswith("backbone.")}}
    for k, v in setting.items():
        if k.startswith("backbone."):
            q["backbones"][spec["backbone"]] = {**q["backbones"][spec["backbone"]], k[9:]: v}
    return q


def effective(p: dict, run: str) -> str:
    """What `run` trains under `p`: equal strings train the same encoder (a stage's current setting is the last
    stage's choice, so it is scored once)."""
    method, block, train_cfg, backbone = P.method_config(p, run)
    runtime = ("num_workers", "checkpoint_every", "sync_every", "knn_monitor", "knn_monitor_every")
    train_cfg = {k: v for k, v in train_cfg.items() if k not in runtime}
    return json.dumps([run, method, block, train_cfg, backbone, p["augment"]], sort_keys=True, default=str)


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


def train_resumable(q: dict, run: str, config: str, shard_dir: Path, work: Path) -> tuple[Path, Path, dict]:
    """Train `run` under `q` in a directory named by its configuration, so an interrupted search resumes the
    training itself from its last checkpoint (the trainer resumes exactly). Returns (its directory, the encoder,
    the training summary); the caller removes the directory once the encoder is scored."""
    q = P.validate(q, methods=[P.run_spec(q, run)["method"]])
    root = work / hashlib.sha1(config.encode()).hexdigest()[:16]
    paths = RunPaths.for_run(root, q["dataset"]["name"], run)
    paths.shards = shard_dir
    return root, paths.encoder, train(q, run, root, paths=paths)


def score(q: dict, run: str, config: str, shard_dir: Path, validation: Validation, work: Path) -> dict:
    t = time.perf_counter()
    root, encoder, summary = train_resumable(q, run, config, shard_dir, work)
    acc = validation(encoder)
    shutil.rmtree(root, ignore_errors=True)
    return {"knn200": acc, "train_s": round(time.perf_counter() - t, 1), "final_loss": summary.get("final_loss")}


def decide(scores: dict[str, list[float]], cur_key: str, se: float) -> tuple[str, str, bool]:
    means = {k: statistics.mean(v) for k, v in scores.items()}
    best = max(means, key=means.get)
    keep = cur_key in means and means[best] - means[cur_key] <= 2 * se
    return (cur_key if keep else best), best, keep


def search_family(name: str, fam: dict, p: dict, table: dict, shard_dir: Path, validation: Validation, se: float,
                  vit_epochs: int, save, work: Path) -> dict:
    rows = table.setdefault("rows", [])
    done = {(r["family"], r["stage"], r["setting"], r["run"]): r for r in rows}
    by_config = {r["config"]: r for r in rows if "config" in r}
    runs = fam["runs"]
    for run in runs:   # the monitor costs time and changes nothing in training
        p = apply(p, run, {"knn_monitor": [0, 0], **({"epochs": vit_epochs} if fam["epochs"] == "vit" else {})})
    if fam.get("own_backbone"):
        p = own_backbone(p, name, runs)
    chosen = {}
    for stage, candidates, extend, per_run, seeds, scored_on in fam["stages"]:
        per_run = fam["per_run"] if per_run is None else per_run
        groups = [[r] for r in runs] if per_run else [runs]
        for group in groups:
            scored = seed_instances(p, [r for r in group if not scored_on or r in scored_on], seeds)
            cur = P.method_config(p, group[0])[2]
            settings = candidates(cur, p["train"])
            cur_key = key_of(current(p, group[0], settings[0]))
            scores, by_key = {}, {}
            extensions = 0
            for setting in settings:   # grows while the best lies at an end of the grid (`beyond_edge`)
                key = key_of(setting)
                by_key[key] = setting
                for run in scored:
                    q = apply(p, run, setting)
                    config = effective(q, run)
                    row = done.get((name, stage, key, run))
                    if row is not None and row.get("config", config) != config:   # scored on other earlier choices
                        rows.remove(row)
                        del done[(name, stage, key, run)]
                        row = None
                    if row is None and config in by_config:
                        row = {**by_config[config], "family": name, "stage": stage, "setting": key, "reused": True}
                    if row is None:
                        row = {"family": name, "stage": stage, "setting": key, "run": run, "config": config,
                               **score(q, run, config, shard_dir, validation, work)}
                    by_config[config] = row
                    if (name, stage, key, run) not in done:
                        rows.append(row)
                        done[(name, stage, key, run)] = row
                        save()
                    print(f"{name:>6} | {stage:>12} | {key:<50} | {run:>15} | kNN-200 {row['knn200']:6.2f} | "
                          f"{row['train_s']:6.0f} s", flush=True)
                    scores.setdefault(key, []).append(row["knn200"])
                if extend and setting is settings[-1] and extensions < MAX_EXTENSIONS and len(setting) == 1:
                    (name_k,) = setting
                    means = {k: statistics.mean(v) for k, v in scores.items()}
                    best_value = by_key[max(means, key=means.get)][name_k]
                    nxt = beyond_edge([s_[name_k] for s_ in settings], best_value)
                    if nxt is not None:
                        settings.append({name_k: nxt})
                        extensions += 1
            pick, best, keep = decide(scores, cur_key, se)
            means = {k: round(statistics.mean(v), 3) for k, v in scores.items()}
            label = (f"{stage} ({', '.join(group)})" + (f", scored on {', '.join(scored_on)}" if scored_on else "")
                     + (f", {seeds} seeds" if seeds > 1 else ""))
            chosen[label] = {"setting": pick, "mean_knn200": means[pick], "current": cur_key,
                             "current_mean_knn200": means.get(cur_key), "best": best,
                             "best_mean_knn200": means[best], "kept_current": keep, "means": means}
            for run in group:   # the next stage searches on top of this one's choice
                p = apply(p, run, by_key[pick])
            table.setdefault("chosen", {})[name] = dict(chosen)   # a stopped search leaves no stale choice behind
            save()
            print(f"{name}: {label}: {'kept' if keep else 'chose'} {pick} (mean {means[pick]:.2f}; current "
                  f"{cur_key} {means.get(cur_key)}; best {best} {means[best]:.2f}; 2 SE = {2 * se:.2f})", flush=True)
    if name == "sgd":   # the shared recipe: later families inherit it through the train block
        for k, v in P.method_config(p, runs[0])[2].items():
            if k in ("warmup_epochs", "min_lr_ratio", "lr", "weight_decay"):
                p["train"][k] = v
    table.setdefault("chosen", {})[name] = chosen
    save()
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--bank", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--vit-epochs", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/recipe-search-cpu.json")
    ap.add_argument("--quick", action="store_true", help="synthetic shards, tiny runs, nothing written")
    a = ap.parse_args()
    p = P.load(a.params)
    shard_dir = Path("data/shards") / p["dataset"]["name"]
    families = {f: copy.deepcopy(FAMILIES[f]) for f in a.families}
    if a.quick:
        from benchmarks.throughput import synthetic_shards
        shard_dir = synthetic_shards(Path(tempfile.mkdtemp()), p["dataset"]["image_size"], n=96)
        p["train"].update(batch_size=16, train_subset=32, epochs=1)
        p["methods"]["gsssl"]["rank_k"] = 4
        for fam in families.values():
            for r in fam["runs"]:
                spec = P.run_spec(p, r)
                p["methods"][spec["method"]].get("train", {}).pop("batch_size", None)
                spec.get("overrides", {}).get("train", {}).update(epochs=1)
            fam["stages"] = [st._replace(candidates=lambda c, s, f=st.candidates: f(c, s)[:2], extend=False)
                             for st in fam["stages"]]
        a.bank, a.queries, a.vit_epochs = 32, 16, 1
    validation = Validation(p, shard_dir, a.bank, a.queries, claim_device())
    out = Path(a.out)
    table = {} if a.quick or not out.exists() else json.loads(out.read_text())
    se = 100 * math.sqrt(0.4 * 0.6 / a.queries)
    # every family with choices in the table is described (an earlier invocation's too), this one's as searched now
    described = {f: families.get(f, FAMILIES[f]) for f in FAMILIES if f in families or f in (table.get("chosen") or {})}
    table.update(bank=int(len(validation.bank)), queries=a.queries, k=K, temperature=TEMPERATURE, vit_epochs=a.vit_epochs,
                 standard_error_points=se, params=a.params, torch=torch.__version__, threads=torch.get_num_threads(),
                 families={f: describe(v) for f, v in described.items()})

    work = Path(tempfile.mkdtemp()) if a.quick else Path("data/recipe-search")

    def save():
        if not a.quick:
            atomic_write_json(table, out)

    for name, fam in families.items():
        p = search_family(name, fam, p, table, shard_dir, validation, se, a.vit_epochs, save, work)


if __name__ == "__main__":
    main()
