"""Weighted k-nearest-neighbour classification of frozen features, as chunked matrix products in torch.

Protocol of Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (InstDisc, §3.4): each of the k nearest training features (cosine similarity s_i)
votes for its class with weight exp(s_i / T); the prediction is the class with the largest summed
weight. Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (DINO,
§4.1 / appendix) use the same rule with T = 0.1 and report k = 20; we report every k in the list
(default 10, 20, 200).

The search runs on the training device (GPU when present): queries and bank are L2-normalised once,
the bank is streamed in chunks (a memory-mapped `.npy` works), every chunk is multiplied with blocks
of queries and a running top-k per query is merged with the chunk's top-k. Memory is bounded by
QUERY_BLOCK x BANK_CHUNK similarities plus one bank chunk, whatever the bank size.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from pipeline.device import claim_device, full_fp32

# 2048 x 65536 float32 similarities = 512 MiB per block: large enough that the matmul, not top-k or
# the merge, dominates (see benchmarks/eval_scale.py), small enough for a 24 GiB machine
QUERY_BLOCK = 2048
BANK_CHUNK = 65536


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)   # an all-zero feature stays zero instead of becoming NaN


def exact_fp32_matmul(device: torch.device):
    """Full float32 matmuls and convolutions on CUDA (no TF32), so device results match the CPU's up to rounding.
    On any torch the project allows (`pipeline.device.full_fp32` picks the API this torch has)."""
    return full_fp32() if torch.device(device).type == "cuda" else contextlib.nullcontext()


def rows_to_device(x, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows [start, stop) of an array, memmap or tensor as float32 on `device` (only those rows are read)."""
    if isinstance(x, torch.Tensor):
        return x[start:stop].to(device=device, dtype=torch.float32)
    chunk = np.ascontiguousarray(x[start:stop], dtype=np.float32)
    if not chunk.flags.writeable:   # a read-only memmap: torch wants memory it may write
        chunk = chunk.copy()
    return torch.from_numpy(chunk).to(device)


def normalize_rows(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def merge_top_k(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, k: int):
    """The k largest of two (rows, *) candidate lists, sorted descending."""
    s, pos = torch.cat([best_s, s], dim=1).topk(k, dim=1)
    return s, torch.cat([best_i, i], dim=1).gather(1, pos)


@torch.no_grad()
def nearest_neighbours(train, query, k: int, device=None, query_block: int | None = None,
                       bank_chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarities, train indices), each (n_query, k) numpy, most similar first.

    `train` / `query`: arrays, memmaps or tensors. The bank is read once, chunk by chunk, normalised as
    it is read; the queries are normalised once and held on the device. A k larger than the bank uses all of it.
    """
    device = torch.device(device) if device is not None else claim_device()
    query_block, bank_chunk = query_block or QUERY_BLOCK, bank_chunk or BANK_CHUNK
    n_train, n_query = len(train), len(query)
    k = min(int(k), n_train)
    q = normalize_rows(rows_to_device(query, 0, n_query, device))
    best_s = torch.full((n_query, 0), -torch.inf, device=device)
    best_i = torch.zeros((n_query, 0), dtype=torch.int64, device=device)
    with exact_fp32_matmul(device):
        for b0 in range(0, n_train, bank_chunk):
            bank = normalize_rows(rows_to_device(train, b0, min(b0 + bank_chunk, n_train), device))
            kc = min(k, len(bank))
            new_s, new_i = [], []
            for q0 in range(0, n_query, query_block):
                s, i = (q[q0:q0 + query_block] @ bank.T).topk(kc, dim=1)
                new_s.append(s)
                new_i.append(i + b0)
            s, i = torch.cat(new_s), torch.cat(new_i)
            # the first chunk is taken as is; later ones are merged with the running best k
            best_s, best_i = (s, i) if best_s.shape[1] == 0 else merge_top_k(best_s, best_i, s, i, k)
    return best_s.cpu().numpy(), best_i.cpu().numpy()


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


def knn_predict(train_feats, train_labels, test_feats, ks, temperature: float = 0.1, num_classes: int | None = None,
                device=None) -> dict[int, np.ndarray]:
    """{k: predicted class per test row}; every k is read off one search for max(ks).

    The neighbours come back sorted by similarity, so the first k columns of the max(ks) search are
    exactly the k nearest: one search serves the whole list. A k larger than the train set uses all of it.
    """
    ks = [int(k) for k in ks]
    train_labels = np.asarray(train_labels, dtype=np.int64)
    num_classes = num_classes or int(train_labels.max()) + 1
    sims, idx = nearest_neighbours(train_feats, test_feats, max(ks), device=device)
    neighbour_labels = train_labels[idx]
    return {k: weighted_vote(sims, neighbour_labels, k, temperature, num_classes) for k in ks}


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, ks, temperature: float = 0.1,
                 device=None) -> dict[int, float]:
    """{k: top-1 accuracy in percent} of the weighted kNN vote (see knn_predict)."""
    test_labels = np.asarray(test_labels, dtype=np.int64)
    preds = knn_predict(train_feats, train_labels, test_feats, ks, temperature, device=device)
    return {k: float(100.0 * np.mean(pred == test_labels)) for k, pred in preds.items()}
