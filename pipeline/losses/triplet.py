"""Triplet losses on similarity matrices (pure functions of tensors; no project imports)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rank_k_triplet(queries: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, k: int, margin: float
                   ) -> torch.Tensor:
    """GSSSL's rank-k triplet loss (Li et al. 2024, §3, eq. 3.4; the truncated triplet of Wang et al. 2021):
    L = 1/d sum_i max(0, C + sim(Zbar_i, Wbar_{i, rank-k}) - sim(Zbar_i, Wbar_i)),
    sim the cosine similarity, C the margin, and Wbar_{i, rank-k} the k-th most similar *negative* key of
    row i (every key but the positive): the diagonal must beat the k-th largest off-diagonal value of its
    row, not the hardest one, so that the k - 1 nearest negatives (likely the same class) are spared.

    queries (Q, D): this rank's Zbar; keys (K, D): Wbar, possibly gathered from every rank;
    positive[q] indexes query q's positive among the keys. Returns the mean over the queries.
    """
    if not 1 <= k <= keys.shape[0] - 1:
        raise ValueError(f"rank_k_triplet: k = {k} needs 1 <= k <= {keys.shape[0] - 1} negatives per row")
    sim = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).t()
    rows = torch.arange(sim.shape[0], device=sim.device)
    pos = sim[rows, positive]
    # torch.full, not torch.tensor: a host scalar copied to the GPU would block the step
    negatives = sim.index_put((rows, positive), torch.full((), float("-inf"), device=sim.device, dtype=sim.dtype))
    kth = negatives.topk(k, dim=1).values[:, -1]
    return F.relu(margin + kth - pos).mean()
