"""How good are the SePP-ID sampler's pairs at each similarity bound? (issue 26, deliver 4)

    python benchmarks/mine_thresholds.py      # the mine stage's encoder (mine.encoder_run) as trained by dvc repro

SePP-ID fixes the cosine bounds at [0.97, 0.99] for its ImageNet MoCo-v2 (§3.1, Algorithm 1 line 11) and chose
them by the accuracy of the mined pairs, measured with ImageNet's labels (§3.1, §4, Table 1: 92 % for MoCo-v2).
Those bounds belong to that encoder: how many pairs a bound admits, and how many of them share a class, depends on
how the sampler's embedding spreads. This script measures both for our sampler, for K = 10 % of the pretraining
pool (the paper's §4) and the whole pool (its Table 8's 100 %), at the projector (the paper's choice) and the
backbone, plus each image's nearest neighbour's class agreement (an upper reference for what a bound can reach
at full coverage). Labels are used for these metrics only, as in the paper.
Output: benchmarks/results/mine-thresholds-cpu.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import params as P  # noqa: E402
from pipeline import paths  # noqa: E402
from pipeline.mining.pairs import mine_pairs, pair_metrics  # noqa: E402
from pipeline.mining.sampler import embed_chosen  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402

LOWER = (0.98, 0.97, 0.95, 0.93, 0.90, 0.85)
K_FRACS = (0.1, 1.0)   # SePP-ID §4's K = 10 % and Table 8's 100 % (the profile's mine.k_frac is one of them)


def nearest_neighbour_agreement(feats: np.ndarray, labels: np.ndarray, block: int = 4096) -> float:
    x = torch.nn.functional.normalize(torch.as_tensor(feats, dtype=torch.float32), dim=1)
    y = torch.as_tensor(labels)
    hits = 0
    for i in range(0, len(x), block):
        s = x[i:i + block] @ x.T
        s[torch.arange(len(s)), torch.arange(i, i + len(s))] = -2.0   # not itself
        hits += int((y[s.argmax(1)] == y[i:i + block]).sum())
    return hits / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="benchmarks/results/mine-thresholds-cpu.json")
    a = ap.parse_args()
    p = P.load(a.params, methods=())
    m = p["mine"]
    trained = json.loads((paths.encoder(m["encoder_run"]).parent / "train.json").read_text())
    table = {"encoder_run": m["encoder_run"], "epochs": trained.get("epochs"), "steps": trained.get("steps"),
             "max_sim": m["max_sim"], "profile_bounds": [m["min_sim"], m["max_sim"]], "layers": {}}
    for layer in ("projector", "backbone"):
        for k_frac in K_FRACS:
            q = copy.deepcopy(p)
            q["mine"].update(layer=layer, k_frac=k_frac)
            feats, labels, _, _ = embed_chosen(q, Path("."))
            rows = []
            for lo in LOWER:
                an, po, _ = mine_pairs(feats, lo, m["max_sim"], block=m["block"], device="cpu")
                s = pair_metrics(an, po, labels, K=len(labels))
                rows.append({"min_sim": lo, "pairs": s["pairs"], "anchors_covered_frac": s["anchors_covered_frac"],
                             "pair_accuracy": s["pair_accuracy"]})
                acc = "n/a" if s["pair_accuracy"] is None else f"{100 * s['pair_accuracy']:.1f} %"
                print(f"{layer:>9} K={len(labels):6d} [{lo:.2f}, {m['max_sim']}]: {s['pairs']:9d} pairs, "
                      f"{100 * s['anchors_covered_frac']:5.1f} % anchors, accuracy {acc}", flush=True)
            table["layers"].setdefault(layer, {})[str(k_frac)] = {
                "K": int(len(labels)), "nearest_neighbour_agreement": nearest_neighbour_agreement(feats, labels),
                "rows": rows}
    atomic_write_json(table, Path(a.out))


if __name__ == "__main__":
    main()
