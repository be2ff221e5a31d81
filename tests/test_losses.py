"""Losses against hand computations of their papers' equations."""
import math

import torch
import torch.nn.functional as F

from pipeline.losses.contrastive import info_nce_queue, nt_xent
from pipeline.methods.simclr import nt_xent_global


def hand_nt_xent(z1, z2, t):
    """SimCLR eq. 1 written out: l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t), averaged over all 2N."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        sims = [F.cosine_similarity(z[i], z[k], dim=0).item() / t for k in range(2 * n)]
        denom = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[j]) / denom)
    return total / (2 * n)


def test_nt_xent_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for t in (0.1, 0.5):
        assert math.isclose(nt_xent_global(z1, z2, t).item(), hand_nt_xent(z1, z2, t), rel_tol=1e-5)


def test_nt_xent_excludes_self_and_prefers_aligned_views():
    z = torch.randn(6, 8)
    aligned = nt_xent_global(z, z + 0.01 * torch.randn(6, 8), 0.5)
    shuffled = nt_xent_global(z, z[torch.tensor([1, 2, 3, 4, 5, 0])], 0.5)
    assert aligned < shuffled
    # keys are the queries themselves: without masking self, exp(1/t) would dominate every row
    q = F.normalize(torch.randn(3, 4), dim=1)
    loss = nt_xent(q, q, torch.tensor([1, 2, 0]), torch.tensor([0, 1, 2]), 0.1)
    s = q @ q.t() / 0.1
    want = sum(-(s[i, (i + 1) % 3] - torch.logsumexp(s[i][torch.arange(3) != i], 0)) for i in range(3)) / 3
    assert torch.allclose(loss, want, atol=1e-5)


def test_moco_info_nce_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    queue = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    t = 0.2
    total = 0.0
    for i in range(3):
        qi, ki = F.normalize(q[i], dim=0), F.normalize(k[i], dim=0)
        pos = math.exp((qi @ ki).item() / t)
        neg = sum(math.exp((qi @ queue[j]).item() / t) for j in range(5))
        total += -math.log(pos / (pos + neg))
    assert math.isclose(info_nce_queue(q, k, queue, t).item(), total / 3, rel_tol=1e-5)
