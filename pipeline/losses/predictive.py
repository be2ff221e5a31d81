"""Predictive (non-contrastive) losses: a prediction p regresses a stop-gradient target z (pure functions of
tensors; no project imports). Both are means over the rows of one view pair; methods symmetrise them.
Computed in float32: under bf16 autocast the cosine would be rounded to ~3 significant digits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, eq. 2): ||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z),
    averaged over the batch. z is the target network's projection: it is detached here (sg(z'))."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) with stop-gradient (Chen & He 2021, eq. 1 and 3): -cos(p, sg(z)), averaged over the
    batch; z is detached, so no gradient reaches the branch that produced it."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()
