"""Linear probe on frozen features: a softmax classifier trained in torch behind scikit-learn's interface.

`SoftmaxRegression` is multinomial logistic regression on standardised features with scikit-learn's
objective divided by N (so C means what it means in `sklearn.linear_model.LogisticRegression`):

    loss(W, b) = mean_i CE(softmax(W x_i + b), y_i) + ||W||^2 / (2 C N)       (bias not penalised)

minimised by full-batch L-BFGS with a strong-Wolfe line search (Nocedal & Wright, Numerical
Optimization, Alg. 7.5 / 3.5). The objective and its gradient are always accumulated over row chunks,
from a standardised copy on the device when the features fit there, otherwise streamed from host
memory (a memory-mapped `.npy` works): the same full-batch objective either way. Convergence is the
criterion scikit-learn's lbfgs uses: max |gradient| <= tol; the fit records it, the final gradient
norm and the last relative loss change.

The regularisation strength C is chosen on a stratified validation split carved from train (never
on test), then the probe is refitted on the whole train set with that C and scored once on test —
the usual frozen-feature linear evaluation with model selection kept off the test set.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split

from pipeline.eval.knn import exact_fp32_matmul
from pipeline.device import claim_device

CHUNK_ROWS = 32768          # rows per objective/gradient chunk: bounds the (rows, classes) logits
DEVICE_FRACTION = 0.5       # the standardised copy goes on the device if it takes at most this share of free memory
HISTORY = 20                # L-BFGS memory (pairs of curvature vectors)
LINE_SEARCH_EVALS = 25      # strong-Wolfe evaluations per iteration at most (torch's default)


def device_free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def take_rows(x, rows: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    """float32 rows [start, stop) of x, or of x[rows]; only those rows are read (memmaps stay on disk)."""
    part = np.ascontiguousarray(x[start:stop] if rows is None else x[rows[start:stop]], dtype=np.float32)
    return part if part.flags.writeable else part.copy()   # torch wants memory it may write


class SoftmaxRegression(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression (softmax) in torch with scikit-learn's estimator interface.

    C: inverse L2 strength with scikit-learn's meaning (for 2 classes the softmax penalty is doubled so it
    equals the binary model scikit-learn fits). tol: stop when max |gradient| <= tol (scikit-learn's gtol).
    max_iter: L-BFGS iterations. warm_start: start from the previous fit's solution (in standardised
    space; scikit-learn's meaning), which a C grid visited in order converges from in far fewer iterations.
    device: None = the training device (GPU when present). matmul_dtype: "float32"
    or "float64" for the feature products (None: float64 on CPU, float32 on CUDA); the rest is float64.
    After fit: classes_, coef_ / intercept_ (for the raw features), n_iter_, converged_, grad_norm_,
    rel_loss_change_, loss_, solver_, n_evals_ (passes over the data).
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4, device=None,
                 chunk_rows: int = CHUNK_ROWS, matmul_dtype: str | None = None, warm_start: bool = False):
        self.C = C
        self.warm_start = warm_start
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.chunk_rows = chunk_rows
        self.matmul_dtype = matmul_dtype

    # --- fitting -------------------------------------------------------------------------------------

    def fit(self, X, y):
        return self.fit_rows(X, y, None)

    def fit_rows(self, X, y, rows: np.ndarray | None):
        """fit(X[rows], y[rows]) without copying X (rows: sorted indices, or None for all)."""
        y = np.asarray(y)
        if not hasattr(X, "ndim"):
            X = np.asarray(X, dtype=np.float32)
        if rows is not None:
            rows = np.sort(np.asarray(rows, dtype=np.int64))
            y = y[rows]
        n = len(y)
        if n == 0 or X.ndim != 2:
            raise ValueError(f"SoftmaxRegression.fit: expected a non-empty 2-D X, got shape {getattr(X, 'shape', None)}")
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.n_features_in_ = X.shape[1]
        dev = torch.device(self.device) if self.device is not None else claim_device()
        self.mean_, self.scale_ = self._standardisation(X, rows, n)
        data = self._device_copy(X, rows, n, dev)
        self.solver_ = "lbfgs-device" if data is not None else "lbfgs-streamed"
        targets = torch.from_numpy(y_idx.astype(np.int64)).to(dev)
        k, d = len(self.classes_), X.shape[1]
        # float64 parameters, loss and sums. The two (rows x D x classes) products run in `matmul_dtype`: float64 on
        # CPU (2x the cost; float32 logits blur the loss by ~1e-7/sqrt(N), and near a tight tolerance the line
        # search then cannot see a decrease), float32 on CUDA (where float64 is slow on most cards)
        mm_dtype = getattr(torch, self.matmul_dtype) if self.matmul_dtype else (
            torch.float32 if dev.type == "cuda" else torch.float64)
        w = torch.zeros(k, d, dtype=torch.float64, device=dev)
        b = torch.zeros(k, dtype=torch.float64, device=dev)
        previous = getattr(self, "_w_init", None)
        if self.warm_start and previous is not None and previous.shape == (k, d):
            w.copy_(torch.from_numpy(previous))
            b.copy_(torch.from_numpy(self._b_init))
        w.requires_grad_(True)
        b.requires_grad_(True)
        if k == 1:   # one class: nothing to learn, every prediction is that class
            self._finish(w, b, n_iter=0, converged=True, grad_norm=0.0, rel_change=0.0, loss=0.0)
            return self
        # 2 classes: softmax's symmetric optimum splits w between the rows, halving ||W||^2 (see class doc)
        l2 = (2.0 if k == 2 else 1.0) / (2.0 * float(self.C) * n)

        evals = [0]

        @torch.no_grad()
        def objective():
            """Full-batch loss; sets w.grad, b.grad. Accumulated over row chunks, gradient by hand:
            d mean CE / d logits = (softmax - onehot) / n."""
            w_mm = w.to(mm_dtype)
            gw, gb, total = torch.zeros_like(w), torch.zeros_like(b), 0.0
            for start, xs in self._chunks(X, rows, n, dev, data):
                xs = xs.to(mm_dtype)
                z = (xs @ w_mm.T).double() + b
                t = targets[start:start + len(xs)]
                total += float((z.logsumexp(dim=1) - z.gather(1, t[:, None])[:, 0]).sum())
                g = z.softmax(dim=1)
                g[torch.arange(len(t), device=dev), t] -= 1.0
                gw += (g.to(mm_dtype).T @ xs).double()
                gb += g.sum(dim=0)
            evals[0] += 1
            w.grad = gw / n + 2.0 * l2 * w
            b.grad = gb / n
            return total / n + l2 * float((w * w).sum())

        cache = {}

        def closure():
            """L-BFGS re-evaluates the current point at every step; reuse it instead of a second pass."""
            if "w" in cache and torch.equal(cache["w"], w) and torch.equal(cache["b"], b):
                w.grad, b.grad = cache["gw"].clone(), cache["gb"].clone()
                return cache["loss"]
            loss = objective()
            cache.update(w=w.detach().clone(), b=b.detach().clone(), gw=w.grad.clone(), gb=b.grad.clone(), loss=loss)
            return loss

        # one iteration per step, so this loop checks convergence; max_eval bounds the line search alone
        # (its default, 1.25 * max_iter, would leave the line search no evaluation at all)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=1, max_eval=1 + LINE_SEARCH_EVALS, history_size=HISTORY,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)
        prev, rel_change, it, converged = None, float("nan"), 0, False
        with exact_fp32_matmul(dev):
            while True:
                loss = closure()
                grad_norm = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
                if prev is not None:
                    rel_change = abs(prev - loss) / max(abs(loss), 1e-12)
                converged = grad_norm <= self.tol
                if converged or it >= self.max_iter or (prev is not None and prev == loss):
                    break   # converged, out of iterations, or the line search can no longer decrease the loss
                prev = loss
                opt.step(closure)
                it += 1
        self._finish(w, b, it, converged, grad_norm, rel_change, loss, mm_dtype)
        self.n_evals_ = evals[0]   # full passes over the fit rows (one "epoch" each)
        return self

    def _standardisation(self, X, rows, n) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and std (ddof 0) of the fit rows, accumulated in float64 over chunks.

        A constant feature keeps scale 1 (as scikit-learn's StandardScaler), so it maps to 0, not NaN.
        """
        total = np.zeros(X.shape[1])
        for start in range(0, n, self.chunk_rows):
            total += take_rows(X, rows, start, start + self.chunk_rows).sum(axis=0, dtype=np.float64)
        mean = total / n
        sq = np.zeros(X.shape[1])
        for start in range(0, n, self.chunk_rows):
            sq += ((take_rows(X, rows, start, start + self.chunk_rows) - mean) ** 2).sum(axis=0)
        std = np.sqrt(sq / n)
        return mean, np.where(std > 1e-12 * np.maximum(np.abs(mean), 1.0), std, 1.0)

    def _standardise(self, x: np.ndarray, dev: torch.device) -> torch.Tensor:
        mean = torch.as_tensor(self.mean_, dtype=torch.float32, device=dev)
        scale = torch.as_tensor(self.scale_, dtype=torch.float32, device=dev)
        return (torch.from_numpy(x).to(dev) - mean) / scale

    def _device_copy(self, X, rows, n, dev) -> torch.Tensor | None:
        """The standardised fit rows on the device when they fit in DEVICE_FRACTION of its free memory."""
        if n * X.shape[1] * 4 > DEVICE_FRACTION * device_free_bytes(dev):
            return None
        out = torch.empty(n, X.shape[1], device=dev)
        for start in range(0, n, self.chunk_rows):
            part = take_rows(X, rows, start, start + self.chunk_rows)
            out[start:start + len(part)] = self._standardise(part, dev)
        return out

    def _chunks(self, X, rows, n, dev, data):
        """(start, standardised rows on the device) over the fit rows: slices of the device copy, else streamed."""
        for start in range(0, n, self.chunk_rows):
            if data is not None:
                yield start, data[start:start + self.chunk_rows]
            else:
                yield start, self._standardise(take_rows(X, rows, start, start + self.chunk_rows), dev)

    def _finish(self, w, b, n_iter, converged, grad_norm, rel_change, loss, mm_dtype=torch.float32):
        """Store the solution for the raw (unstandardised) features: W' = W / scale, b' = b - W' mean."""
        w_std = w.detach().double().cpu().numpy()
        self.coef_ = (w_std / self.scale_).astype(np.float32)
        self.intercept_ = (b.detach().double().cpu().numpy() - self.coef_.astype(np.float64) @ self.mean_).astype(np.float32)
        self._w_std, self._b_std = w_std.astype(np.float32), b.detach().cpu().numpy()
        self._w_init, self._b_init = w_std, b.detach().double().cpu().numpy()   # for warm_start
        self.n_iter_, self.converged_, self.grad_norm_ = int(n_iter), bool(converged), float(grad_norm)
        self.rel_loss_change_, self.loss_ = float(rel_change), float(loss)
        self.matmul_dtype_ = str(mm_dtype).removeprefix("torch.")

    def convergence(self) -> dict:
        """JSON-ready convergence record of the last fit."""
        return {"converged": self.converged_, "criterion": f"max|grad| <= {self.tol:g}", "grad_norm": self.grad_norm_,
                "rel_loss_change": self.rel_loss_change_, "n_iter": self.n_iter_, "max_iter": int(self.max_iter),
                "solver": self.solver_, "matmul_dtype": self.matmul_dtype_}

    # --- prediction ----------------------------------------------------------------------------------

    @torch.no_grad()
    def decision_function(self, X) -> np.ndarray:
        """Logits (n, classes) computed on standardised features in chunks, as in training."""
        if not hasattr(self, "classes_"):
            raise ValueError("SoftmaxRegression: call fit before predicting")
        dev = torch.device(self.device) if self.device is not None else claim_device()
        w, b = torch.from_numpy(self._w_std).to(dev), torch.from_numpy(self._b_std).to(dev)
        out = []
        with exact_fp32_matmul(dev):
            for start in range(0, len(X), self.chunk_rows):
                xs = self._standardise(take_rows(X, None, start, start + self.chunk_rows), dev)
                out.append((xs @ w.T + b).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes_)), dtype=np.float32)

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(axis=1)]


def accuracy(model, x, y: np.ndarray) -> float:
    return float(100.0 * np.mean(model.predict(x) == np.asarray(y)))


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices), stratified by class when every class has at least 2 samples."""
    idx = np.arange(len(labels))
    try:
        return tuple(train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed))
    except ValueError:
        # a class with a single sample (or fewer val slots than classes) cannot be stratified
        return tuple(train_test_split(idx, test_size=fraction, random_state=seed))


def linear_probe(train_feats, train_labels, test_feats, test_labels, Cs, val_fraction: float = 0.1,
                 max_iter: int = 1000, seed: int = 0, tol: float = 1e-4, device=None,
                 return_predictions: bool = False):
    """{"top1": test %, "C": chosen C, "val_top1": {C: val %}, "val_converged": {C: bool}, "converged", "grad_norm",
    "rel_loss_change", "n_iter", "criterion", ...}; with return_predictions, also the test predictions.

    Ties on validation accuracy go to the smaller C (the stronger regularisation). The features are never
    copied whole: fits read their rows by index (memmaps stay on disk).
    """
    Cs = sorted(float(c) for c in Cs)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    fit_idx, val_idx = (np.sort(i) for i in validation_split(train_labels, val_fraction, seed))
    x_val = take_rows(train_feats, val_idx, 0, len(val_idx))
    val_top1, val_converged, fits = {}, {}, {}
    # the grid from the strongest regularisation up, each fit warm-started from the previous C's solution
    model = SoftmaxRegression(Cs[0], max_iter, tol, device, warm_start=True)
    for C in Cs:
        model.set_params(C=C).fit_rows(train_feats, train_labels, fit_idx)
        val_top1[C] = accuracy(model, x_val, train_labels[val_idx])
        val_converged[C] = model.converged_
        fits[C] = (model._w_init, model._b_init)
    best = max(Cs, key=lambda c: (val_top1[c], -c))
    model.set_params(C=best)
    model._w_init, model._b_init = fits[best]   # the refit on all of train starts from its validation fit
    model.fit(train_feats, train_labels)
    pred = model.predict(test_feats)
    out = {"top1": float(100.0 * np.mean(pred == np.asarray(test_labels))), "C": best, "val_top1": val_top1,
           "val_converged": val_converged, **model.convergence()}
    return (out, pred) if return_predictions else out
