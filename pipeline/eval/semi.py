"""Semi-supervised evaluation with a fraction of the train labels (e.g. 1% and 10%).

For each fraction and seed, a class-balanced labelled subset is drawn (the 1% / 10% low-shot setting of
SimCLR / BYOL, here with an equal count per class so a rare class is never left out), then two learners
are scored on test:
  * logreg — the linear probe (pipeline.eval.linear.SoftmaxRegression, torch) trained on the labelled
    features only (the papers' semi-supervised row);
  * a scikit-learn semi-supervised learner that also sees unlabelled train features:
    `label_spreading` (Zhou et al. 2004, "Learning with Local and Global Consistency": kNN graph on
    L2-normalised features, i.e. cosine neighbours, alpha = 0.99 as in their experiments)
    or `self_training` (Yarowsky 1995 style pseudo-labelling around the same softmax estimator).
LabelSpreading builds dense (N, classes) float64 label matrices and a kNN graph over everything it sees,
so it only ever sees a capped random subset of the unlabelled features (`unlabelled_max`, stated in the
metrics). Numbers are reported as mean, sample std and per-seed values, in percent; every logistic fit
records whether it converged.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier
from threadpoolctl import threadpool_limits

from pipeline.eval.knn import l2_normalize
from pipeline.eval.linear import SoftmaxRegression, take_rows

LEARNERS = ("label_spreading", "self_training")
LABEL_SPREADING_NEIGHBOURS = 7   # scikit-learn's default graph degree
# Zhou et al. 2004 use alpha = 0.99 (labels spread far); scikit-learn's default 0.2 clamps so hard that
# with 1% labels its early stop left whole regions of the kNN graph with no label mass (measured)
LABEL_SPREADING_ALPHA = 0.99
LABEL_SPREADING_MAX_ITER = 1000


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced labelled subset: floor(fraction * N / C) per class (at least 1).

    The count is capped at the smallest class so every class gets exactly the same number.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    per_class = max(1, int(np.floor(fraction * len(labels) / len(classes))))
    per_class = min(per_class, int(counts.min()))
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


def unlabelled_subset(n: int, labelled: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices of train samples outside `labelled`, a seeded random `cap` of them (0 = all)."""
    rest = np.setdiff1d(np.arange(n), labelled, assume_unique=True)
    if cap and len(rest) > cap:
        # its own stream ([seed, 1]) so the unlabelled draw does not shift with the labelled one
        rest = np.sort(np.random.default_rng([seed, 1]).choice(rest, size=cap, replace=False))
    return rest


def fit_semi(learner: str, x_lab: np.ndarray, y_lab: np.ndarray, x_unl: np.ndarray, C: float, max_iter: int,
             seed: int, device=None):
    """A fitted classifier (with `.predict`) trained on labelled + unlabelled features."""
    y = np.concatenate([y_lab, np.full(len(x_unl), -1, dtype=np.int64)])   # -1 marks unlabelled (sklearn)
    if learner == "label_spreading":
        x = l2_normalize(np.concatenate([x_lab, x_unl]))
        k = min(LABEL_SPREADING_NEIGHBOURS, len(x) - 1)
        model = LabelSpreading(kernel="knn", n_neighbors=max(k, 1), alpha=LABEL_SPREADING_ALPHA,
                               max_iter=LABEL_SPREADING_MAX_ITER)
        with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x, y)
        return _SpreadingPredictor(model)
    if learner == "self_training":
        x = np.concatenate([x_lab, x_unl])
        model = SelfTrainingClassifier(SoftmaxRegression(C=C, max_iter=max_iter, device=device))
        model.fit(x, y)
        return model
    raise ValueError(f"unknown semi-supervised learner {learner!r} (known: {', '.join(LEARNERS)})")


class _SpreadingPredictor:
    """Predicts with a fitted LabelSpreading on L2-normalised inputs (the graph lives on the unit sphere).

    A test point whose graph neighbours carry no label mass (a region no label reached) gets no
    prediction (-1, so it counts as an error) instead of scikit-learn's NaN argmax, which silently
    says class 0; `unreached` counts them.
    """

    def __init__(self, model):
        self.model = model
        self.unreached = 0

    def predict(self, x):
        with np.errstate(invalid="ignore", divide="ignore"):
            proba = self.model.predict_proba(l2_normalize(x))
        ok = np.isfinite(proba).all(axis=1) & (proba.sum(axis=1) > 0)
        self.unreached = int((~ok).sum())
        pred = self.model.classes_[np.where(ok[:, None], proba, -np.inf).argmax(axis=1)]
        return np.where(ok, pred, -1)


def summarize(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "values": [float(x) for x in v]}


def pct_name(fraction: float) -> str:
    """0.01 -> "1pct", 0.005 -> "0.5pct": a column-name-safe label of a label fraction."""
    return f"{100 * float(fraction):g}pct"


def semi_supervised(train_feats, train_labels: np.ndarray, test_feats, test_labels: np.ndarray, fractions, seeds,
                    learner: str = "label_spreading", C: float = 1.0, max_iter: int = 1000, unlabelled_max: int = 0,
                    device=None, return_predictions: bool = False):
    """{str(fraction): {"logreg": summary, learner: summary}}, summary = {mean, std, values, n_labelled, ...}.

    The logreg summary carries per-seed `converged` / `grad_norm`; the learner's carries `unlabelled_max`
    (the cap, 0 = none) beside the `n_unlabelled` it actually saw. With return_predictions, also
    {"semi_<pct>_<learner>_s<seed>": test predictions} (learner "logreg" or the semi-supervised one).
    """
    if learner not in LEARNERS:
        raise ValueError(f"unknown semi-supervised learner {learner!r} (known: {', '.join(LEARNERS)})")
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    out, preds = {}, {}
    for fraction in fractions:
        sup, semi, unreached, conv, semi_conv, n_lab, n_unl = [], [], [], [], [], 0, 0
        for seed in seeds:
            lab = balanced_subset(train_labels, fraction, seed)
            x_lab, y_lab = take_rows(train_feats, lab, 0, len(lab)), train_labels[lab]
            probe = SoftmaxRegression(C, max_iter, device=device).fit(x_lab, y_lab)
            pred = probe.predict(test_feats)
            sup.append(float(100.0 * np.mean(pred == test_labels)))
            conv.append(probe.convergence())
            preds[f"semi_{pct_name(fraction)}_logreg_s{seed}"] = pred
            unl = unlabelled_subset(len(train_labels), lab, unlabelled_max, seed)
            model = fit_semi(learner, x_lab, y_lab, take_rows(train_feats, unl, 0, len(unl)), C, max_iter, seed,
                             device=device)
            pred = model.predict(test_feats)
            semi.append(float(100.0 * np.mean(pred == test_labels)))
            preds[f"semi_{pct_name(fraction)}_{learner}_s{seed}"] = pred
            unreached.append(getattr(model, "unreached", 0))
            if learner == "self_training":
                semi_conv.append(model.estimator_.converged_)   # its last fit, on labelled + pseudo-labelled
            n_lab, n_unl = len(lab), len(unl)
        out[str(fraction)] = {
            "logreg": {**summarize(sup), "n_labelled": n_lab, "converged": [c["converged"] for c in conv],
                       "grad_norm": [c["grad_norm"] for c in conv], "criterion": conv[0]["criterion"]},
            learner: {**summarize(semi), "n_labelled": n_lab, "n_unlabelled": n_unl,
                      "unlabelled_max": int(unlabelled_max)}}
        if learner == "label_spreading":
            out[str(fraction)][learner]["unreached_test"] = unreached
        else:
            out[str(fraction)][learner]["converged"] = semi_conv
    return (out, preds) if return_predictions else out
