"""Self-distillation losses (pure functions of tensors; no project imports).

DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"): the student
matches the teacher's centred, sharpened distribution over K prototypes. The pieces are exposed
separately so that patch-level variants (PW-Self) can apply the same cross-entropy to matched tokens.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, tau_t: float) -> torch.Tensor:
    """DINO eq. 1 teacher side with centring and sharpening (§3.1): P_t = softmax((g_t(x) - C) / tau_t).
    No gradient flows to the teacher (stop-gradient, Alg. 1). Computed in float32 (tau_t ~ 0.04 under AMP)."""
    return F.softmax((teacher_logits.detach().float() - center.float()) / tau_t, dim=-1)


def soft_cross_entropy(p_teacher: torch.Tensor, student_logits: torch.Tensor, tau_s: float) -> torch.Tensor:
    """H(P_t, P_s) = -sum_k P_t^k log P_s^k with P_s = softmax(g_s(x') / tau_s) (DINO eq. 1-2), per row
    (no reduction over the leading dims), so token-level losses can mask or weight the rows."""
    return -(p_teacher * F.log_softmax(student_logits.float() / tau_s, dim=-1)).sum(dim=-1)


def dino_loss(teacher_logits: Sequence[torch.Tensor], student_logits: Sequence[torch.Tensor], center: torch.Tensor,
              tau_t: float, tau_s: float) -> torch.Tensor:
    """DINO eq. 3 / Alg. 1: sum over teacher views x in {x1_g, x2_g} and student views x' != x of
    H(P_t(x), P_s(x')), averaged over the pairs and the batch.

    teacher_logits: one (B, K) tensor per global view (the teacher sees the global views only);
    student_logits: one (B, K) tensor per view, the global views first in the same order, so the pair
    (i, i) is the same view seen by both networks and is skipped.
    """
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher_logits):
        p = teacher_probs(t, center, tau_t)
        for j, s in enumerate(student_logits):
            if j == i:
                continue
            total = total + soft_cross_entropy(p, s, tau_s).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss: no (teacher view, different student view) pair")
    return total / pairs


def ema_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """DINO centring update (§3.1, eq. 4): C <- m C + (1 - m) * (1/B) sum_i g_t(x_i), with the mean taken
    over the whole (global) batch of teacher outputs."""
    return center * momentum + batch_mean.to(center.dtype) * (1 - momentum)


PATCH_AGGREGATIONS = ("pwml", "pwsl", "pwll")


def patch_wise_weights(valid: torch.Tensor, mode: str, lambd: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """PW-Self's per-sample loss for one (teacher view, student view) pair (Javidani et al. §3.5, eqs. 8-10),
    as the weights of its token cross-entropies: loss_b = cls_w[b] * H_cls[b] + sum_p patch_w[b, p] * H_p[b, p].

    valid: (B, M) marks the matched patch pairs (the rest is padding, weight 0). With n matched patches,
    MP = 1 + n tokens are matched (CLS included):
      pwml (eq. 8): (H_cls + sum_p H_p) / MP          mean over every matched token
      pwsl (eq. 9):  H_cls + sum_p H_p                 sum
      pwll (eq. 10): lambd * H_cls + (1 - lambd) * (sum_p H_p) / (MP - 1)
    No overlap (n = 0) leaves the CLS term only (§3.4); for pwll the empty patch mean counts as 0, so the
    CLS term keeps its weight lambd in every sample. The losses are linear in the H's, so weights let a
    caller fold every pair into one weighted teacher target per student token. The papers' loss averages
    loss_b over the batch and the view pairs (the BS x 18 denominators). Returns (cls_w (B,), patch_w (B, M)).
    """
    n = valid.sum(dim=1)
    if mode == "pwml":
        cls_w = 1.0 / (1 + n)
        return cls_w, valid * cls_w[:, None]
    if mode == "pwsl":
        return torch.ones(valid.shape[0], device=valid.device), valid.float()
    if mode == "pwll":
        return torch.full((valid.shape[0],), lambd, device=valid.device), valid * ((1 - lambd) / n.clamp(min=1))[:, None]
    raise ValueError(f"patch_wise_weights: mode must be one of {PATCH_AGGREGATIONS}, got {mode!r}")
