"""Evaluation protocols: weighted kNN, linear probe, semi-supervised subsets, feature cache and extraction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.data.shards import read_manifest, write_shards
from pipeline.data.sources import imagefolder
from pipeline.data.views import eval_transform
from pipeline.eval.features import extract_features, load_features, save_features
from pipeline.eval.knn import knn_accuracy, nearest_neighbours, weighted_vote
from pipeline.eval.linear import linear_probe
from pipeline.eval.protocols import evaluate_features
from pipeline.eval.semi import balanced_subset, fit_semi, semi_supervised
from pipeline.params import DataError


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


def test_knn_blocks_do_not_change_results(monkeypatch):
    import pipeline.eval.knn as knn

    x_tr, y_tr = blobs(30, 4, 6, spread=1.0, seed=2)
    x_te, y_te = blobs(25, 4, 6, spread=1.0, seed=3)
    whole = knn.nearest_neighbours(x_tr, x_te, 7)
    monkeypatch.setattr(knn, "BLOCK_ELEMS", len(x_tr) * 3)   # 3 test rows per query block
    blocked = knn.nearest_neighbours(x_tr, x_te, 7)
    np.testing.assert_array_equal(whole[1], blocked[1])
    np.testing.assert_allclose(whole[0], blocked[0], rtol=1e-6)


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
        assert per[learner]["n_unlabelled"] == 150
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
           "linear_val_fraction": 0.2, "linear_max_iter": 100, "semi_fractions": [0.1], "semi_seeds": [0, 1],
           "semi_learner": "label_spreading", "semi_unlabelled_max": 0, "train_subset": 120}
    out = evaluate_features((x_tr, y_tr), (x_te, y_te, ["k"] * len(y_te)), cfg, log=lambda *_: None)
    assert out["n_train"] == 120 and out["n_test"] == 30 and out["feat_dim"] == 8
    assert set(out["knn"]) == {"5", "20"} and out["knn_temperature"] == 0.1
    assert set(out["linear"]["val_top1"]) == {"0.1", "1.0"} and out["linear"]["C"] in (0.1, 1.0)
    assert set(out["semi"]["0.1"]) == {"logreg", "label_spreading"}
    assert set(out["seconds"]) == {"knn", "linear", "semi"}


# --- feature cache and extraction -------------------------------------------------------------------------

def test_features_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 5)).astype(np.float32)
    labels = rng.integers(0, 3, size=7)
    keys = [f"train-{i:08d}" for i in range(7)]
    path = tmp_path / "sub" / "train.npz"
    save_features(path, feats, labels, keys)
    f2, l2, k2 = load_features(path)
    np.testing.assert_array_equal(f2, feats)
    np.testing.assert_array_equal(l2, labels)
    assert f2.dtype == np.float32 and l2.dtype == np.int64 and k2 == keys
    assert [p.name for p in path.parent.iterdir()] == ["train.npz"]     # no temp file left behind
    with pytest.raises(DataError, match="features missing"):
        load_features(tmp_path / "nope.npz")


class PoolBackbone(nn.Module):
    """A deterministic stand-in encoder: 2x2 average pool of the normalised image -> 12-d features."""

    feat_dim = 12

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_extract_features_on_tiny_shards(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    n_train = {"cat": 4, "dog": 3}
    for split, per in (("train", n_train), ("test", {"cat": 2, "dog": 2})):
        for cls, n in per.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                size = (int(rng.integers(10, 20)), int(rng.integers(10, 20)))
                Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    shard_dir = tmp_path / "shards"
    write_shards(imagefolder(root), shard_dir, samples_per_shard=3, seed=0, skip_corrupt=False)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]

    feats, labels, keys = extract_features(PoolBackbone(), shard_dir, "train", 8, mean, std, batch_size=2, device="cpu")
    manifest = read_manifest(shard_dir, "train")
    assert feats.shape == (7, 12) and feats.dtype == np.float32 and labels.dtype == np.int64
    assert keys == manifest.key.tolist()                        # manifest (shard) order, each once
    np.testing.assert_array_equal(labels, manifest.label.to_numpy())
    assert sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1, 1]
    # the features are the un-augmented eval view of each image, pushed through the backbone
    first = manifest.iloc[0]
    cls = ["cat", "dog"][first["label"]]
    files = sorted((root / "train" / cls).iterdir())
    img = Image.open(files[first["index"] - (0 if cls == "cat" else n_train["cat"])]).convert("RGB")
    expect = PoolBackbone()(eval_transform(8, mean, std)(img)[None]).numpy()[0]
    np.testing.assert_allclose(feats[0], expect, rtol=1e-5, atol=1e-6)

    t_feats, t_labels, t_keys = extract_features(PoolBackbone(), shard_dir, "test", 8, mean, std, batch_size=3,
                                                 device=torch.device("cpu"), limit=3)
    assert t_feats.shape == (3, 12) and t_keys == read_manifest(shard_dir, "test").key.tolist()[:3]
