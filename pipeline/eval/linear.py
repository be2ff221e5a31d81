"""Linear probe on frozen features: standardise, multinomial logistic regression (scikit-learn).

The regularisation strength C is chosen on a stratified validation split carved from train (never
on test), then the probe is refitted on the whole train set with that C and scored once on test —
the usual frozen-feature linear evaluation with model selection kept off the test set.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits


def make_probe(C: float, max_iter: int, seed: int = 0) -> Pipeline:
    # lbfgs fits the multinomial (softmax) loss for >2 classes; the scaler makes one C grid fit any encoder
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))


def fit_quietly(model, x: np.ndarray, y: np.ndarray) -> bool:
    """Fit; return whether the solver converged (instead of one warning per fit on stderr).

    BLAS is held to one thread: lbfgs multiplies by a thin (D, classes) matrix that threads barely
    speed up, while on a small shared CPU spinning BLAS threads slowed these fits ~50x (measured).
    """
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    clf = model[-1] if isinstance(model, Pipeline) else model
    n_iter, max_iter = getattr(clf, "n_iter_", 0), getattr(clf, "max_iter", 1)
    return bool(np.all(np.asarray(n_iter) < max_iter))


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float(100.0 * np.mean(model.predict(x) == y))


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices), stratified by class when every class has at least 2 samples."""
    idx = np.arange(len(labels))
    try:
        return tuple(train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed))
    except ValueError:
        # a class with a single sample (or fewer val slots than classes) cannot be stratified
        return tuple(train_test_split(idx, test_size=fraction, random_state=seed))


def linear_probe(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, Cs, val_fraction: float = 0.1, max_iter: int = 200,
                 seed: int = 0) -> dict:
    """{"top1": test accuracy %, "C": chosen C, "val_top1": {C: validation accuracy %}, "converged": bool}.

    Ties on validation accuracy go to the smaller C (the stronger regularisation).
    """
    Cs = sorted(float(c) for c in Cs)
    fit_idx, val_idx = validation_split(np.asarray(train_labels), val_fraction, seed)
    val_top1 = {}
    for C in Cs:
        model = make_probe(C, max_iter, seed)
        fit_quietly(model, train_feats[fit_idx], train_labels[fit_idx])
        val_top1[C] = accuracy(model, train_feats[val_idx], train_labels[val_idx])
    best = max(Cs, key=lambda c: (val_top1[c], -c))
    model = make_probe(best, max_iter, seed)
    converged = fit_quietly(model, train_feats, train_labels)
    return {"top1": accuracy(model, test_feats, test_labels), "C": best, "val_top1": val_top1,
            "converged": converged}
