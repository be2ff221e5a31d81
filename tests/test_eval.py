"""Evaluation protocols: weighted kNN, linear probe, semi-supervised subsets, feature cache and extraction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import pyarrow.parquet as pq
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

import pipeline.eval.linear as linear
from pipeline.eval.knn import knn_accuracy, knn_predict, nearest_neighbours, weighted_vote
from pipeline.eval.linear import SoftmaxRegression, linear_probe
from pipeline.eval.protocols import evaluate_features
from pipeline.eval.semi import balanced_subset, fit_semi, semi_supervised
from stages.evaluate import write_predictions


def blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    """Gaussian clusters around random unit-norm centres (distinct directions: cosine-separable)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim))
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm].astype(np.int64)


# --- kNN -------------------------------------------------------------------------------------------

def angle(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_weighted_knn_matches_hand_computation_and_differs_from_majority():
    # query at 0 deg; one class-0 point at 10 deg (very similar) and two class-1 points at +-60 deg;
    # a class-0 point at 180 deg is never among the 3 nearest
    train = np.array([angle(10), angle(60), angle(-60), angle(180)], dtype=np.float32) * [[3.0], [1.0], [0.5], [2.0]]
    train_y = np.array([0, 1, 1, 0])
    query = np.array([angle(0)], dtype=np.float32)
    T = 0.1
    s0, s1 = math.cos(math.radians(10)), math.cos(math.radians(60))
    by_hand = {0: math.exp(s0 / T), 1: 2 * math.exp(s1 / T)}   # ~19,300 vs ~297
    assert by_hand[0] > by_hand[1]                               # weighted vote: class 0
    # ... while a plain 2-vs-1 majority says class 1, and so does a vote with near-uniform weights
    assert knn_accuracy(train, train_y, query, np.array([0]), [3], temperature=T) == {3: 100.0}
    assert knn_accuracy(train, train_y, query, np.array([1]), [3], temperature=1e6) == {3: 100.0}
    # norms do not matter (cosine), and the similarities come back sorted with their indices
    sims, idx = nearest_neighbours(train, query, 3)
    np.testing.assert_allclose(sims[0], [s0, s1, s1], rtol=1e-5)
    assert idx[0, 0] == 0 and set(idx[0, 1:]) == {1, 2}
    # k=1 is the nearest label; k > n_train clamps to all 4 (the 180-degree point adds only e^(-1/T))
    assert knn_accuracy(train, train_y, query, np.array([0]), [1, 10], temperature=T) == {1: 100.0, 10: 100.0}


def test_knn_scores_by_hand_summed_weights():
    sims = np.array([[0.9, 0.5, 0.4], [0.8, 0.7, 0.1]], dtype=np.float32)
    labs = np.array([[2, 0, 0], [1, 1, 0]])
    T = 0.5
    # row 0: class 2 gets e^(0.9/T) = 6.05, class 0 gets e^(1.0) + e^(0.8) = 4.94 -> class 2
    # row 1: class 1 gets e^1.6 + e^1.4 = 9.0, class 0 e^0.2 = 1.2 -> class 1
    np.testing.assert_array_equal(weighted_vote(sims, labs, 3, T, 3), [2, 1])
    # T -> large: near-uniform weights, row 0 becomes the 2-vs-1 majority (class 0)
    np.testing.assert_array_equal(weighted_vote(sims, labs, 3, 100.0, 3), [0, 1])


def test_knn_k_list_from_one_search_equals_separate_searches():
    x_tr, y_tr = blobs(40, 5, 8, spread=0.9, seed=0)
    x_te, y_te = blobs(20, 5, 8, spread=0.9, seed=1)
    ks = [1, 5, 10, 20, 200]
    together = knn_accuracy(x_tr, y_tr, x_te, y_te, ks, temperature=0.1)
    for k in ks:
        assert together[k] == knn_accuracy(x_tr, y_tr, x_te, y_te, [k], temperature=0.1)[k]
    # the first k columns of the max-k search are exactly the k-search's neighbours
    s_big, i_big = nearest_neighbours(x_tr, x_te, 20)
    s_small, i_small = nearest_neighbours(x_tr, x_te, 5)
    np.testing.assert_array_equal(i_big[:, :5], i_small)
    np.testing.assert_allclose(s_big[:, :5], s_small, rtol=1e-6)
    assert 20.0 < together[10] <= 100.0   # noisy but well above chance (20%)


def test_knn_chunks_and_memmap_do_not_change_results(tmp_path):
    x_tr, y_tr = blobs(30, 4, 6, spread=1.0, seed=2)
    x_te, y_te = blobs(25, 4, 6, spread=1.0, seed=3)
    whole = nearest_neighbours(x_tr, x_te, 7, device="cpu")
    # 3 queries x 11 bank rows per product: the running top-k merges 11 chunks, the last one of 10 rows
    chunked = nearest_neighbours(x_tr, x_te, 7, device="cpu", query_block=3, bank_chunk=11)
    np.save(tmp_path / "bank.npy", x_tr)
    mapped = nearest_neighbours(np.load(tmp_path / "bank.npy", mmap_mode="r"), x_te, 7, device="cpu", bank_chunk=4)
    for other in (chunked, mapped):
        np.testing.assert_array_equal(whole[1], other[1])
        np.testing.assert_allclose(whole[0], other[0], rtol=1e-6)


def old_sklearn_neighbours(train, query, k):
    """The scikit-learn path this module replaced: brute-force cosine search on L2-normalised features."""
    norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    nn_ = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(norm(train))
    dist, ind = nn_.kneighbors(norm(query))
    return 1.0 - dist, ind


def test_knn_matches_the_old_sklearn_search_up_to_ties():
    rng = np.random.default_rng(12)
    x_tr = rng.normal(size=(700, 24)).astype(np.float32)
    x_te = rng.normal(size=(90, 24)).astype(np.float32)
    k = 25
    old_s, old_i = old_sklearn_neighbours(x_tr, x_te, k)
    new_s, new_i = nearest_neighbours(x_tr, x_te, k, device="cpu", query_block=32, bank_chunk=128)
    np.testing.assert_allclose(new_s, old_s, atol=1e-6)
    for row in range(len(x_te)):
        # the same neighbours in the same order, except that near-tied similarities (float rounding) may swap
        # or trade the last place: every neighbour clearly inside the top k is in both lists
        clear = lambda s, i: set(i[s > s[-1] + 1e-5])
        assert clear(new_s[row], new_i[row]) == clear(old_s[row], old_i[row])
    assert (new_i == old_i).mean() > 0.99
    y_tr = rng.integers(0, 5, size=len(x_tr))
    old_pred = weighted_vote(old_s.astype(np.float32), y_tr[old_i], k, 0.1, 5)
    np.testing.assert_array_equal(knn_predict(x_tr, y_tr, x_te, [k], 0.1, device="cpu")[k], old_pred)


# --- linear probe ------------------------------------------------------------------------------------

def test_linear_probe_separable_reaches_100_and_picks_C_from_grid():
    x_tr, y_tr = blobs(60, 3, 10, spread=0.05, seed=4)
    x_te, y_te = blobs(20, 3, 10, spread=0.05, seed=4)   # same centres (seed), fresh noise below
    x_te = x_te + np.random.default_rng(9).normal(scale=0.01, size=x_te.shape).astype(np.float32)
    grid = [0.001, 0.1, 10.0]
    res = linear_probe(x_tr, y_tr, x_te, y_te, grid, val_fraction=0.2, max_iter=500)
    assert res["top1"] == 100.0
    assert res["C"] in grid
    assert set(res["val_top1"]) == set(grid)
    assert res["val_top1"][res["C"]] == max(res["val_top1"].values())
    assert all(0.0 <= v <= 100.0 for v in res["val_top1"].values())


def test_linear_probe_chooses_on_validation_not_test():
    # labels are pure noise: every C is at chance on validation, ties go to the smallest C
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = np.zeros(200, dtype=np.int64)
    y[::2] = 1
    res = linear_probe(x, y, x[:50], y[:50], [10.0, 1.0], val_fraction=0.25, max_iter=200)
    if res["val_top1"][1.0] == res["val_top1"][10.0]:
        assert res["C"] == 1.0
    else:
        assert res["C"] == max(res["val_top1"], key=res["val_top1"].get)


def logistic_problem(n: int, classes: int, seed: int):
    """Features of mixed scale and offset with noisy linear labels: not separable, so the optimum is finite."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)) * rng.uniform(0.5, 3.0, size=8) + rng.normal(size=8)
    y = (x @ rng.normal(size=(8, classes)) + 2.0 * rng.normal(size=(n, classes))).argmax(axis=1)
    return x.astype(np.float32), y


@pytest.mark.parametrize("classes", [2, 4])
def test_softmax_regression_matches_sklearn_logistic_regression(classes):
    x, y = logistic_problem(300, classes, seed=classes)
    C = 0.5
    # scikit-learn's objective on standardised features: C * sum CE + ||W||^2 / 2 (binary: one weight vector)
    ref = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(StandardScaler().fit_transform(x), y)
    ours = SoftmaxRegression(C=C, tol=1e-6, device="cpu").fit(x, y)
    assert ours.converged_ and ours.grad_norm_ <= 1e-6 and ours.n_iter_ < 200
    x_std = StandardScaler().fit(x).transform(x)
    np.testing.assert_allclose(ours.predict_proba(x), ref.predict_proba(x_std), atol=2e-4)
    np.testing.assert_array_equal(ours.predict(x), ref.predict(x_std))
    # float32 products (the CUDA default) reach scikit-learn's own tolerance and nearly the same model
    fast = SoftmaxRegression(C=C, tol=1e-4, device="cpu", matmul_dtype="float32").fit(x, y)
    assert fast.converged_ and fast.matmul_dtype_ == "float32"
    np.testing.assert_allclose(fast.predict_proba(x), ref.predict_proba(x_std), atol=5e-3)
    # coef_ / intercept_ act on the raw features: the same logits as the standardised model
    np.testing.assert_allclose(x @ ours.coef_.T + ours.intercept_, ours.decision_function(x), atol=1e-4)


def test_softmax_regression_streamed_and_row_subset_equal_the_in_memory_fit(monkeypatch):
    x, y = logistic_problem(200, 3, seed=5)
    rows = np.arange(0, 200, 3)
    direct = SoftmaxRegression(C=1.0, tol=1e-6, device="cpu", chunk_rows=64).fit(x[rows], y[rows])
    by_rows = SoftmaxRegression(C=1.0, tol=1e-6, device="cpu", chunk_rows=16).fit_rows(x, y, rows)
    monkeypatch.setattr(linear, "DEVICE_FRACTION", 0.0)        # nothing fits "on the device": stream from host
    streamed = SoftmaxRegression(C=1.0, tol=1e-6, device="cpu", chunk_rows=16).fit_rows(x, y, rows)
    assert (direct.solver_, streamed.solver_) == ("lbfgs-device", "lbfgs-streamed")
    for other in (by_rows, streamed):
        np.testing.assert_allclose(other.predict_proba(x), direct.predict_proba(x), atol=1e-5)
        assert other.converged_


def test_softmax_regression_is_a_sklearn_estimator():
    x, y = logistic_problem(120, 3, seed=6)
    est = SoftmaxRegression(C=2.0, max_iter=300, device="cpu")
    assert clone(est).get_params() == est.get_params() == {"C": 2.0, "max_iter": 300, "tol": 1e-4, "device": "cpu",
                                                           "chunk_rows": linear.CHUNK_ROWS, "matmul_dtype": None, "warm_start": False}
    assert est.set_params(C=0.1).C == 0.1
    scores = cross_val_score(est, x, y, cv=3)                  # model selection drives it
    assert scores.shape == (3,) and np.all(scores > 0.4)       # chance is 1/3
    labels = np.array(["cat", "dog", "eel"])[y]                # any class labels, as scikit-learn's
    fitted = SoftmaxRegression(device="cpu").fit(x, labels)
    assert list(fitted.classes_) == ["cat", "dog", "eel"] and fitted.score(x, labels) == pytest.approx(
        np.mean(fitted.predict(x) == labels))
    np.testing.assert_allclose(fitted.predict_proba(x).sum(axis=1), 1.0, atol=1e-9)


def test_linear_probe_reports_convergence_and_predictions():
    x, y = logistic_problem(300, 3, seed=7)
    res, pred = linear_probe(x, y, x[:40], y[:40], [0.1, 1.0], val_fraction=0.2, max_iter=500, device="cpu",
                             return_predictions=True)
    assert res["converged"] and res["grad_norm"] <= 1e-4 and res["criterion"] == "max|grad| <= 0.0001"
    assert set(res["val_converged"]) == {0.1, 1.0} and all(res["val_converged"].values())
    assert res["top1"] == pytest.approx(100.0 * np.mean(pred == y[:40]))
    # one iteration is not enough: flagged, not hidden
    short = linear_probe(x, y, x[:40], y[:40], [1.0], val_fraction=0.2, max_iter=1, device="cpu")
    assert short["converged"] is False and short["n_iter"] == 1 and short["grad_norm"] > 1e-4


# --- semi-supervised ---------------------------------------------------------------------------------

def test_balanced_subset_equal_counts_and_seeded():
    y = np.repeat(np.arange(4), [50, 60, 70, 80])          # unbalanced on purpose, N = 260
    a = balanced_subset(y, 0.1, seed=0)                     # floor(0.1 * 260 / 4) = 6 per class
    counts = np.bincount(y[a], minlength=4)
    assert counts.tolist() == [6, 6, 6, 6]
    assert len(np.unique(a)) == len(a)
    b = balanced_subset(y, 0.1, seed=1)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, balanced_subset(y, 0.1, seed=0))
    # at least one per class even when fraction * N / C < 1
    tiny = balanced_subset(y, 0.001, seed=0)
    assert np.bincount(y[tiny], minlength=4).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("learner", ["label_spreading", "self_training"])
def test_semi_supervised_beats_chance_on_clusters(learner):
    x_tr, y_tr = blobs(100, 4, 16, spread=0.25, seed=6)
    x_te, y_te = blobs(25, 4, 16, spread=0.25, seed=6)
    x_te = x_te + np.random.default_rng(7).normal(scale=0.05, size=x_te.shape).astype(np.float32)
    res = semi_supervised(x_tr, y_tr, x_te, y_te, fractions=[0.02, 0.1], seeds=[0, 1], learner=learner,
                          C=1.0, max_iter=200, unlabelled_max=150)
    assert set(res) == {"0.02", "0.1"}
    for frac, per in res.items():
        assert set(per) == {"logreg", learner}
        for r in per.values():
            assert len(r["values"]) == 2
            assert r["mean"] == pytest.approx(np.mean(r["values"]))
            assert r["std"] == pytest.approx(np.std(r["values"], ddof=1))
            assert r["mean"] > 50.0          # chance is 25%
        assert per[learner]["n_unlabelled"] == 150 and per[learner]["unlabelled_max"] == 150
        assert per["logreg"]["converged"] == [True, True] and len(per["logreg"]["grad_norm"]) == 2
        if learner == "label_spreading":
            assert per[learner]["unreached_test"] == [0, 0]
    assert res["0.02"]["logreg"]["n_labelled"] == 8       # floor(0.02 * 400 / 4) = 2 per class
    assert res["0.1"]["logreg"]["n_labelled"] == 40


def test_label_spreading_unreached_points_count_as_errors():
    # two cosine-far clusters; every label sits in cluster A, so no label mass ever reaches cluster B
    rng = np.random.default_rng(11)
    a = np.array([1.0, 0, 0]) + 0.05 * rng.normal(size=(30, 3))
    b = np.array([0, 0, 1.0]) + 0.05 * rng.normal(size=(30, 3))
    model = fit_semi("label_spreading", a[:4].astype(np.float32), np.array([0, 0, 1, 1]),
                     np.concatenate([a[4:], b]).astype(np.float32), C=1.0, max_iter=100, seed=0)
    pred = model.predict(np.concatenate([a[:5], b[:5]]).astype(np.float32))
    assert (pred[5:] == -1).all() and model.unreached == 5      # not silently "class 0"
    assert set(pred[:5]) <= {0, 1}


def test_evaluate_features_shape_and_subset():
    x_tr, y_tr = blobs(50, 3, 8, spread=0.3, seed=8)
    x_te, y_te = blobs(10, 3, 8, spread=0.3, seed=8)
    cfg = {"batch_size": 8, "knn_k": [5, 20], "knn_temperature": 0.1, "linear_C": [0.1, 1.0],
           "linear_val_fraction": 0.2, "linear_max_iter": 100, "linear_tol": 1e-4, "semi_fractions": [0.1],
           "semi_seeds": [0, 1], "semi_learner": "label_spreading", "semi_unlabelled_max": 0, "train_subset": 120}
    out, preds = evaluate_features((x_tr, y_tr), (x_te, y_te, ["k"] * len(y_te)), cfg, log=lambda *_: None,
                                   device="cpu", return_predictions=True)
    assert out["n_train"] == 120 and out["n_test"] == 30 and out["feat_dim"] == 8
    assert set(out["knn"]) == {"5", "20"} and out["knn_temperature"] == 0.1
    assert set(out["linear"]["val_top1"]) == {"0.1", "1.0"} and out["linear"]["C"] in (0.1, 1.0)
    assert set(out["semi"]["0.1"]) == {"logreg", "label_spreading"}
    assert set(out["seconds"]) == {"knn", "linear", "semi"}
    assert out["linear"]["converged"] and out["semi_unlabelled_max"] == 0
    # one prediction column per protocol, and each reproduces its reported accuracy
    assert list(preds) == ["knn_5", "knn_20", "linear", "semi_10pct_logreg_s0", "semi_10pct_label_spreading_s0",
                           "semi_10pct_logreg_s1", "semi_10pct_label_spreading_s1"]
    assert out["knn"]["20"] == pytest.approx(100.0 * np.mean(preds["knn_20"] == y_te))
    assert out["linear"]["top1"] == pytest.approx(100.0 * np.mean(preds["linear"] == y_te))
    assert out["semi"]["0.1"]["label_spreading"]["values"][1] == pytest.approx(
        100.0 * np.mean(preds["semi_10pct_label_spreading_s1"] == y_te))


def test_predictions_parquet_columns_and_types(tmp_path):
    path = tmp_path / "predictions" / "run.parquet"
    labels = np.array([3, 0, 2], dtype=np.int64)
    write_predictions(path, labels, {"knn_20": np.array([3, 1, 2]), "semi_1pct_label_spreading_s0": np.array([3, -1, 2])})
    table = pq.read_table(path)
    assert table.column_names == ["index", "label", "knn_20", "semi_1pct_label_spreading_s0"]
    assert [str(t) for t in table.schema.types] == ["int32", "int16", "int16", "int16"]
    assert table.to_pydict() == {"index": [0, 1, 2], "label": [3, 0, 2], "knn_20": [3, 1, 2],
                                 "semi_1pct_label_spreading_s0": [3, -1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["run.parquet"]     # written atomically, no temp left


def test_warm_start_reaches_the_same_optimum_in_fewer_iterations():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    y = (x[:, :3] @ rng.normal(size=(3, 4))).argmax(1)
    cold = linear.SoftmaxRegression(C=1.0, tol=1e-6, device="cpu").fit(x, y)
    warm = linear.SoftmaxRegression(C=0.1, tol=1e-6, device="cpu", warm_start=True).fit(x, y)
    warm.set_params(C=1.0).fit(x, y)   # starts from the C = 0.1 solution
    assert cold.converged_ and warm.converged_ and warm.n_iter_ < cold.n_iter_
    np.testing.assert_allclose(warm.predict_proba(x), cold.predict_proba(x), atol=1e-4)
