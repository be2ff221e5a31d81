"""Contrastive losses (pure functions of tensors; no project imports).

Both are written for gathered keys: a rank passes its own queries, the keys gathered from every rank,
and the index of each query's positive (and of itself) inside the gathered keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(queries: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, self_index: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1): for query i with positive j,
    l(i, j) = -log( exp(s_ij / t) / sum_{k != i} exp(s_ik / t) ), s = cosine similarity; mean over queries.

    queries (Q, D); keys (K, D) hold every view of the global batch, the queries themselves included;
    positive[q] / self_index[q] index the query's positive / itself among the keys (self is excluded).
    """
    q = F.normalize(queries, dim=1)
    k = F.normalize(keys, dim=1)
    logits = q @ k.t() / temperature
    rows = torch.arange(q.shape[0], device=q.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, self_index] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    return F.cross_entropy(logits, positive)


def info_nce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (He et al. 2020, eq. 1; MoCo-v2 keeps it with an MLP head and t = 0.2):
    L = -log( exp(q.k+ / t) / (exp(q.k+ / t) + sum_{k-} exp(q.k- / t)) ), positives k (row-aligned with q),
    negatives the queue (N, D). q and k are L2-normalised here; the queue is stored normalised."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def info_nce_batch(queries: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """NNCLR's InfoNCE (Dwibedi et al. 2021, eq. 3-4): for query i with positive key j,
    L_i = -log( exp(q_i.k_j / t) / sum_k exp(q_i.k_k / t) ), q and k L2-normalised; mean over queries.

    Unlike `nt_xent`, queries and keys are different sets (nearest neighbours vs the other view's
    predictions), so nothing is masked: the denominator runs over every key, positive included.
    keys (K, D) may be gathered from every rank; positive[q] indexes query q's positive among them."""
    q = F.normalize(queries, dim=1)
    k = F.normalize(keys, dim=1)
    return F.cross_entropy(q @ k.t() / temperature, positive)
