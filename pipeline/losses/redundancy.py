"""Redundancy-reduction losses: Barlow Twins and VICReg (pure functions of tensors; no project imports).

Both losses are functions of *batch statistics* (means, variances, cross-correlation / covariance
matrices). Under DDP those statistics must be those of the global batch, so every sum over samples goes
through `all_reduce`, a callable summing a tensor over ranks (identity by default = one process). It
must be autograd-aware: every rank then computes the same global loss, the backward of the reduction
sums each rank's upstream gradient (world_size identical copies), and DDP's gradient averaging divides
that factor out again, so the DDP gradient equals the single-process gradient on the concatenated
batch. A plain `dist.all_reduce` (invisible to autograd) drops the other ranks' paths and leaves
gradients scaled by about 1/world_size. The sample count is reduced too, so uneven per-rank batches are
exact. Statistics are computed in float32 with autocast off: a bf16 d x d matmul of standardised
embeddings would put visible noise into C.

Tensors may carry leading dimensions (..., N, D): statistics are taken over N per leading index and the
losses are returned per leading index (GSSSL scores n patch embeddings against one mean embedding in a
single call). Without leading dimensions the result is a scalar.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _no_autocast(z: torch.Tensor):
    return torch.autocast(device_type=z.device.type, enabled=False)


def _off_diagonal_mask(d: int, device) -> torch.Tensor:
    return ~torch.eye(d, dtype=torch.bool, device=device)


def batch_standardize(zs: Sequence[torch.Tensor], all_reduce: AllReduce = identity, eps: float = 1e-5
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Standardise each tensor per dimension over the (global) batch, dim -2: (z - mean) / sqrt(var + eps),
    with the biased variance (divide by N) — Barlow Twins' BatchNorm1d(affine=False) before eq. 2, so
    identical views give C_ii = 1. All tensors must share N; their statistics travel in one packed
    reduction per pass (means, then variances: two passes for numerical stability).

    Returns the standardised tensors (float32 or wider) and the global count N (a detached scalar tensor).
    """
    zs = [_at_least_fp32(z) for z in zs]
    with _no_autocast(zs[0]):
        count = zs[0].new_tensor([zs[0].shape[-2]])
        sums = all_reduce(torch.cat([z.sum(-2).flatten() for z in zs] + [count]))
        n = sums[-1].detach()
        centred, offset = [], 0
        for z in zs:
            stat_shape = z.shape[:-2] + z.shape[-1:]
            k = stat_shape.numel()
            centred.append(z - (sums[offset:offset + k].view(stat_shape) / n).unsqueeze(-2))
            offset += k
        sq = all_reduce(torch.cat([c.pow(2).sum(-2).flatten() for c in centred]))
        out, offset = [], 0
        for c in centred:
            stat_shape = c.shape[:-2] + c.shape[-1:]
            k = stat_shape.numel()
            var = sq[offset:offset + k].view(stat_shape) / n
            out.append(c / torch.sqrt(var + eps).unsqueeze(-2))
            offset += k
    return out, n


def cross_correlation(a: torch.Tensor, b: torch.Tensor, n: torch.Tensor, all_reduce: AllReduce = identity) -> torch.Tensor:
    """Barlow Twins eq. 2: C_ij = sum_b a_{b,i} b_{b,j} / N over the global batch, for standardised a, b
    (..., N, D); leading dimensions broadcast. Returns (..., D, D)."""
    with _no_autocast(a):
        return all_reduce(_at_least_fp32(a).transpose(-1, -2) @ _at_least_fp32(b)) / n


def redundancy_terms(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Barlow Twins eq. 1 split into its two sums: (invariance sum_i (1 - C_ii)^2,
    redundancy reduction sum_i sum_{j != i} C_ij^2), each of shape c.shape[:-2]."""
    diag = torch.diagonal(c, dim1=-2, dim2=-1)
    on = (1 - diag).pow(2).sum(-1)
    off = c.masked_fill(~_off_diagonal_mask(c.shape[-1], c.device), 0).pow(2).sum((-2, -1))
    return on, off


def barlow_twins_terms(z_a: torch.Tensor, z_b: torch.Tensor, all_reduce: AllReduce = identity, eps: float = 1e-5
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(on-diagonal, off-diagonal) sums of Barlow Twins eq. 1 for embeddings (..., N, D): each standardised
    over the global batch, C = z_a_n^T z_b_n / N (eq. 2). Leading dimensions broadcast, e.g. GSSSL's
    (n_patches, N, D) patch embeddings against a (N, D) mean embedding."""
    (a, b), n = batch_standardize([z_a, z_b], all_reduce, eps)
    return redundancy_terms(cross_correlation(a, b, n, all_reduce))


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 5e-3, all_reduce: AllReduce = identity,
                      eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1):
    L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2, C the cross-correlation of eq. 2 computed
    along the global batch between the per-dimension standardised z_a and z_b; lambda = 5e-3."""
    on, off = barlow_twins_terms(z_a, z_b, all_reduce, eps)
    return on + lambd * off


def vicreg_terms(z_a: torch.Tensor, z_b: torch.Tensor, all_reduce: AllReduce = identity, eps: float = 1e-4,
                 gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VICReg's three terms (Bardes et al. 2022, §2) for embeddings (N, D) over the global batch:
      invariance s(Z, Z') = 1/(N D) sum_b ||z_b - z'_b||^2                         (eq. 5, the MSE)
      variance   v(Z) + v(Z'), v(Z) = 1/D sum_j max(0, gamma - sqrt(Var(z^j) + eps))   (eq. 1-2)
      covariance c(Z) + c(Z'), c(Z) = 1/D sum_{i != j} C(Z)_ij^2                      (eq. 4)
    with C(Z) = 1/(N-1) sum_b (z_b - zbar)(z_b - zbar)^T (eq. 3) and Var its diagonal (unbiased).
    Two packed reductions: [sum z, sum z', sum ||z - z'||^2, N], then both centred scatter matrices."""
    z_a, z_b = _at_least_fp32(z_a), _at_least_fp32(z_b)
    d = z_a.shape[-1]
    with _no_autocast(z_a):
        count = z_a.new_tensor([z_a.shape[0]])
        sums = all_reduce(torch.cat([z_a.sum(0), z_b.sum(0), (z_a - z_b).pow(2).sum().view(1), count]))
        n = sums[-1].detach()
        invariance = sums[2 * d] / (n * d)
        a, b = z_a - sums[:d] / n, z_b - sums[d:2 * d] / n
        cov = all_reduce(torch.stack([a.t() @ a, b.t() @ b])) / (n - 1)
        std = torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1) + eps)
        variance = F.relu(gamma - std).mean(-1).sum()
        covariance = (cov.masked_fill(~_off_diagonal_mask(d, cov.device), 0).pow(2).sum((-2, -1)) / d).sum()
    return invariance, variance, covariance


def vicreg_loss(z_a: torch.Tensor, z_b: torch.Tensor, inv_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, all_reduce: AllReduce = identity, eps: float = 1e-4,
                gamma: float = 1.0) -> torch.Tensor:
    """VICReg (Bardes et al. 2022, eq. 6): l = lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')],
    lambda = mu = 25, nu = 1. The paper's sum over branches is used; the authors' code averages the two
    variance terms instead (i.e. its mu = 25 equals mu = 12.5 here)."""
    inv, var, cov = vicreg_terms(z_a, z_b, all_reduce, eps, gamma)
    return inv_weight * inv + var_weight * var + cov_weight * cov
