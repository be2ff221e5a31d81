"""Weighted k-nearest-neighbour classification of frozen features.

Protocol of Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (InstDisc, §3.4): each of the k nearest training features (cosine similarity s_i)
votes for its class with weight exp(s_i / T); the prediction is the class with the largest summed
weight. Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (DINO,
§4.1 / appendix) use the same rule with T = 0.1 and report k = 20; we report every k in the list
(default 10, 20, 200).
"""
from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

# test rows per neighbour query: the (block, n_train) similarity block stays ~64 MB of float32
BLOCK_ELEMS = 1 << 24


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)   # an all-zero feature stays zero instead of becoming NaN


def nearest_neighbours(train: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarities, train indices), each (n_query, k), most similar first.

    One brute-force cosine search for the largest k; the test set is queried in blocks so memory is
    bounded by BLOCK_ELEMS whatever the test-set size.
    """
    train, query = l2_normalize(train), l2_normalize(query)
    k = min(k, len(train))
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train)
    block = int(np.clip(BLOCK_ELEMS // max(len(train), 1), 1, 4096))
    sims = np.empty((len(query), k), dtype=np.float32)
    idx = np.empty((len(query), k), dtype=np.int64)
    for start in range(0, len(query), block):
        dist, ind = nn.kneighbors(query[start:start + block], return_distance=True)
        sims[start:start + block] = 1.0 - dist   # sklearn's cosine distance is 1 - cosine similarity
        idx[start:start + block] = ind
    return sims, idx


def weighted_vote(sims: np.ndarray, neighbour_labels: np.ndarray, k: int, temperature: float,
                  num_classes: int) -> np.ndarray:
    """Predicted class per row from the first k (sorted) neighbours, votes weighted exp(sim / T)."""
    s, lab = sims[:, :k], neighbour_labels[:, :k]
    # shift by the row max before exp: same argmax, no overflow for small T
    w = np.exp((s - s[:, :1]) / temperature)
    # per-(row, class) sums of the weights in one bincount over flattened (row * C + class) ids
    flat = (np.arange(len(s))[:, None] * num_classes + lab).ravel()
    scores = np.bincount(flat, weights=w.ravel().astype(np.float64), minlength=len(s) * num_classes)
    return scores.reshape(len(s), num_classes).argmax(axis=1)


def knn_accuracy(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, ks, temperature: float = 0.1) -> dict[int, float]:
    """{k: top-1 accuracy in percent}; every k is read off one search for max(ks).

    The neighbours come back sorted by similarity, so the first k columns of the max(ks) search are
    exactly the k nearest: one search serves the whole list. A k larger than the train set uses all of it.
    """
    ks = [int(k) for k in ks]
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    sims, idx = nearest_neighbours(train_feats, test_feats, max(ks))
    neighbour_labels = train_labels[idx]
    out = {}
    for k in ks:
        pred = weighted_vote(sims, neighbour_labels, k, temperature, num_classes)
        out[k] = float(100.0 * np.mean(pred == test_labels))
    return out
