"""Does the torch evaluation reproduce an older commit's scikit-learn kNN and linear probe on the same features?

    python scripts/compare_eval.py RUN [RUN ...] [--commit 0e366c1] [--out benchmarks/results/eval-ab-cpu.json] [--redo]

For each run with cached features (`dvc repro features.<run>`), the old commit's `pipeline/eval/knn.py` and
`linear.py` (read with `git show`, imported from a temp dir) and the current ones evaluate the same train/test
features with the params' evaluate settings. Reported per run: both kNN accuracies, the share of identical
neighbour ids in the top-200 and the largest similarity difference (ids differ only where similarities tie
to float32 rounding), both linear probes (accuracy, chosen C, converged), and the committed metrics file's
numbers when there is one. Results merge into the output file, which is rewritten after each run, so the
comparison can be run in parts; a run already in the file is skipped unless --redo.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import params as P  # noqa: E402
from pipeline import paths  # noqa: E402
from pipeline.eval import knn as new_knn  # noqa: E402
from pipeline.eval import linear as new_linear  # noqa: E402
from pipeline.eval.feature_cache import load_features  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402


def old_modules(commit: str):
    """The commit's knn and linear modules (they import only numpy / scikit-learn)."""
    pkg = Path(tempfile.mkdtemp()) / "old_eval"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("knn", "linear"):
        src = subprocess.run(["git", "show", f"{commit}:pipeline/eval/{name}.py"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(src)
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("old_eval.knn"), importlib.import_module("old_eval.linear")


def compare(run: str, ev: dict, old_knn, old_linear) -> dict:
    xtr, ytr, _ = load_features(paths.features(run), "train", mmap=False)
    xte, yte, _ = load_features(paths.features(run), "test", mmap=False)
    n = ev["train_subset"] or len(xtr)
    xtr, ytr = xtr[:n], ytr[:n]
    k = max(ev["knn_k"])
    sims_old, ids_old = old_knn.nearest_neighbours(xtr, xte, k)
    sims_new, ids_new = new_knn.nearest_neighbours(xtr, xte, k)
    out = {
        "knn_old": old_knn.knn_accuracy(xtr, ytr, xte, yte, ev["knn_k"], ev["knn_temperature"]),
        "knn_new": new_knn.knn_accuracy(xtr, ytr, xte, yte, ev["knn_k"], ev["knn_temperature"]),
        "topk_ids_identical": float(np.mean(ids_old == ids_new)),
        "max_similarity_difference": float(np.abs(sims_old - sims_new).max()),
    }
    old = old_linear.linear_probe(xtr, ytr, xte, yte, ev["linear_C"], ev["linear_val_fraction"], 200, 0)
    new = new_linear.linear_probe(xtr, ytr, xte, yte, ev["linear_C"], ev["linear_val_fraction"], ev["linear_max_iter"],
                                  0, tol=ev["linear_tol"])
    out["linear_old"] = {key: old[key] for key in ("top1", "C", "converged")}
    out["linear_new"] = {key: new[key] for key in ("top1", "C", "converged", "grad_norm")}
    committed = paths.evaluate_metrics(run)
    if committed.exists():
        m = json.loads(committed.read_text())
        out["committed"] = {"knn": m["knn"], "linear": {key: m["linear"].get(key) for key in ("top1", "C", "converged")}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--commit", default="0e366c1", help="the commit whose scikit-learn evaluation is the reference")
    ap.add_argument("--out", default="benchmarks/results/eval-ab-cpu.json")
    ap.add_argument("--redo", action="store_true", help="compare runs already in --out again")
    a = ap.parse_args()
    ev = P.load(methods=())["evaluate"]
    old_knn, old_linear = old_modules(a.commit)
    out = Path(a.out)
    results = {}
    if out.exists():
        previous = json.loads(out.read_text())
        if previous["reference_commit"] != a.commit:
            sys.exit(f"{out} compares against {previous['reference_commit']}, not --commit {a.commit}: pass another --out")
        results = previous["results"]
    for run in a.runs:
        if run in results and not a.redo:
            print(f"{run}: already in {out}, skipped (--redo compares it again)", flush=True)
            continue
        results[run] = compare(run, ev, old_knn, old_linear)
        r = results[run]
        print(f"{run}: kNN old {r['knn_old']} new {r['knn_new']} (top-{max(ev['knn_k'])} ids identical "
              f"{100 * r['topk_ids_identical']:.2f} %, max |Δsim| {r['max_similarity_difference']:.1e}); linear old "
              f"{r['linear_old']['top1']:.2f} (converged {r['linear_old']['converged']}) new {r['linear_new']['top1']:.2f} "
              f"(converged {r['linear_new']['converged']})", flush=True)
        atomic_write_json({"reference_commit": a.commit, "results": results}, out)


if __name__ == "__main__":
    main()
