"""All evaluation protocols on cached features, driven by the `evaluate` params section.

kNN (pipeline.eval.knn), linear probe (pipeline.eval.linear) and semi-supervised (pipeline.eval.semi),
each timed, on the training device (GPU when present). The semi-supervised logistic regression reuses
the C the linear probe chose on its validation split, so no protocol ever selects a hyper-parameter on
test. Every protocol's per-image test predictions come back beside the metrics (one column each), so
two runs can be compared image by image.
"""
from __future__ import annotations

import time

import numpy as np

from pipeline.eval.knn import knn_predict
from pipeline.eval.linear import linear_probe
from pipeline.eval.semi import semi_supervised


def evaluate_features(train, test, cfg: dict, seed: int = 0, log=print, device=None,
                      return_predictions: bool = False):
    """Run every protocol. `train` / `test`: (feats, labels) or (feats, labels, keys), feats arrays or memmaps;
    `cfg`: params["evaluate"].

    Returns {"feat_dim", "n_train", "n_test", "knn": {"k": %}, "knn_temperature", "linear", "semi", "seconds"}
    with string keys throughout (JSON-ready); with return_predictions also {column: test predictions}:
    "knn_<k>", "linear", "semi_<pct>_<learner>_s<seed>".
    """
    x_tr, y_tr = np.asarray(train[0], dtype=np.float32), np.asarray(train[1], dtype=np.int64)   # no copy of a float32 memmap
    x_te, y_te = np.asarray(test[0], dtype=np.float32), np.asarray(test[1], dtype=np.int64)
    if cfg["train_subset"]:
        # the train shards are in seeded random order, so the first N features are a uniform random subset
        x_tr, y_tr = x_tr[: cfg["train_subset"]], y_tr[: cfg["train_subset"]]
    seconds, preds = {}, {}
    num_classes = int(max(y_tr.max(), y_te.max())) + 1

    t = time.perf_counter()
    knn_preds = knn_predict(x_tr, y_tr, x_te, cfg["knn_k"], cfg["knn_temperature"], num_classes, device=device)
    knn = {k: float(100.0 * np.mean(p == y_te)) for k, p in knn_preds.items()}
    preds.update({f"knn_{k}": p for k, p in knn_preds.items()})
    seconds["knn"] = time.perf_counter() - t
    log("knn: " + ", ".join(f"k={k} {acc:.2f}%" for k, acc in knn.items()) + f" ({seconds['knn']:.1f} s)")

    t = time.perf_counter()
    lin, preds["linear"] = linear_probe(x_tr, y_tr, x_te, y_te, cfg["linear_C"], cfg["linear_val_fraction"],
                                        cfg["linear_max_iter"], seed, tol=cfg["linear_tol"], device=device,
                                        return_predictions=True)
    seconds["linear"] = time.perf_counter() - t
    flag = "" if lin["converged"] else f", NOT converged: max|grad| {lin['grad_norm']:.2g} > {cfg['linear_tol']:g}"
    log(f"linear: {lin['top1']:.2f}% (C={lin['C']:g}, {lin['n_iter']} iterations{flag}) ({seconds['linear']:.1f} s)")

    t = time.perf_counter()
    semi, semi_preds = semi_supervised(x_tr, y_tr, x_te, y_te, cfg["semi_fractions"], cfg["semi_seeds"],
                                       cfg["semi_learner"], C=lin["C"], max_iter=cfg["linear_max_iter"],
                                       unlabelled_max=cfg["semi_unlabelled_max"], device=device,
                                       return_predictions=True)
    preds.update(semi_preds)
    seconds["semi"] = time.perf_counter() - t
    for frac, res in semi.items():
        log(f"semi {100 * float(frac):g}%: " + ", ".join(f"{name} {r['mean']:.2f}±{r['std']:.2f}%" for name, r in res.items()))
    log(f"semi: {seconds['semi']:.1f} s")

    metrics = {
        "feat_dim": int(x_tr.shape[1]), "n_train": int(len(x_tr)), "n_test": int(len(x_te)),
        "knn": {str(k): acc for k, acc in knn.items()}, "knn_temperature": float(cfg["knn_temperature"]),
        "linear": {**lin, "val_top1": {str(c): acc for c, acc in lin["val_top1"].items()},
                   "val_converged": {str(c): ok for c, ok in lin["val_converged"].items()}},
        "semi": semi, "semi_unlabelled_max": int(cfg["semi_unlabelled_max"]),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    return (metrics, preds) if return_predictions else metrics
