"""PW-Self (Javidani et al., "Patch-Wise Self-Supervised Visual Representation Learning", §3, Alg. 1).

DINO on a ViT (the `DINO` class: multi-crop, EMA teacher, centring, sharpening, teacher-temperature
warm-up, last-layer freezing, teacher export) plus patch-level terms. For every (teacher global view i,
student view j != i) pair, the patches of the two crops that cover the same part of the original image
are matched from the crops' geometry (§3.4; `pipeline.data.patch_matching`, per sample, not the paper's
one-box-per-batch shortcut of §4.1.2), and the DINO cross-entropy H(P_t, P_s) is taken on the CLS tokens
and on every matched pair of patch tokens. Per sample and view pair the terms are aggregated as PWML
(mean over the matched tokens, eq. 8), PWSL (sum, eq. 9) or PWLL (lambd * CLS + (1 - lambd) * mean of
the patches, eq. 10), then averaged over the batch and the view pairs, as DINO (eq. 7).

Choices, from the paper:
- Patch tokens go through the same projection head as the CLS token: "Either of the ViT encoders extract
  representations for the entire image (CLS tokens) as well as each of the patches" and the loss is
  H(g[p], l[p]) over token positions p of the same outputs P (§3.5, eqs. 8-10; Alg. 1 l. 27-31).
- They are centred and sharpened like the CLS outputs: §3.5 defines P_t = softmax((theta_t(x) - C) / tau_t)
  for every teacher output, "C is the average of samples inside the batch". Each token position of the
  teacher's (global-crop) grid has its own centre, as in the authors' code: the CLS token keeps DINO's
  centre (eq. 4, from the CLS outputs only), and patch position p gets C_p, an EMA with DINO's momentum of
  the teacher's outputs at p over the batch (the used rows: the positions some pair matches), all-reduced
  across ranks. Only the teacher's outputs are centred, and the teacher sees the global crops only, so the
  student's (local) grids need none. One centre shared by CLS and patches is a bug: the patch outputs drift
  away from the CLS mean, so subtracting it leaves a common offset that the sharpening temperature turns
  into one-hot patch targets (patch collapse; tests/test_pwself.py reproduces it). The CLS centre stays
  DINO's, so the run is exactly DINO's when the patch terms vanish.
- Patch-level photometric augmentation (§3.3) applies to every view, teacher inputs included (Fig. 1: "the
  two views are cut into patches and undergo patch-level photometric augmentation. Subsequently, they are
  encoded by two separate Vision Transformers"; Alg. 1 l. 13-14 augment img1 (teacher) and img2
  (student)). It follows DINO's whole-view augmentation (kept, so that PW-Self without its patch parts is
  DINO) and runs in the loader on each stacked view batch (`ViewSpec.patch_augment`), seeded per batch.
- PWLL with lambd = 1 removes the patch terms: the step is then DINO's own (same loss and gradients, and
  the patch work is skipped); with patch_augment off as well, the views are DINO's too, so the run is DINO.

Cost: the head runs once per network on only the tokens some pair uses (every CLS token, and the patch
tokens matched in at least one pair); the cross-entropies of all pairs are folded into one weighted teacher
target per student token (H is linear in the teacher distribution), so each student token needs one
log-softmax and no per-pair gather enters the backward pass.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.data.patch_augment import PatchAugment
from pipeline.data.patch_matching import match_patches
from pipeline.losses.distillation import (PATCH_AGGREGATIONS, ema_center, patch_wise_weights, soft_cross_entropy,
                                          teacher_probs)
from pipeline.methods.dino import DINO, collapse_diagnostics
from pipeline.methods.registry import register
from pipeline.errors import ParamError
from pipeline.schema import Bool, Float, Str
from pipeline import dist


def _with_cls(idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, M) patch indices -> (B, 1 + M) token indices: the CLS token (0) first, then patch p at 1 + p;
    padding points at the CLS token, which every view's row table holds."""
    return torch.cat([idx.new_zeros(idx.shape[0], 1), torch.where(valid, idx + 1, 0)], dim=1)


@register("pwself")
class PWSelf(DINO):
    PARAMS = {**DINO.PARAMS, "loss": Str(PATCH_AGGREGATIONS), "lambd": Float(0, 1), "patch_augment": Bool()}
    # the paper's full method: PWML (its main tables) with patch-level augmentation (Tables 8 and 10)
    DEFAULTS = {**DINO.DEFAULTS, "loss": "pwml", "lambd": 0.2, "patch_augment": True}

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        if not hasattr(backbone, "tokens") or not hasattr(backbone, "patch_size"):
            raise ParamError(f"methods.pwself: needs a ViT backbone (patch tokens), got {type(backbone).__name__}")
        self.patch_size = backbone.patch_size
        for key, size in (("dataset.image_size", image_size), ("methods.pwself.local_size", self.cfg["local_size"])):
            if size % self.patch_size:
                raise ParamError(f"{key}: {size} is not a multiple of the ViT patch size {self.patch_size}")
        c = self.cfg
        # PWLL with lambd = 1 gives the patches weight 0: DINO exactly
        self.patch_terms = not (c["loss"] == "pwll" and c["lambd"] == 1.0)
        # one centre per patch position of the teacher's grid (the global crops, at the training size)
        self.register_buffer("patch_center", torch.zeros((image_size // self.patch_size) ** 2, c["out_dim"]))

    def views(self):
        """DINO's multi-crop views, each with per-patch augmentation on the ViT's patch grid when enabled (§3.3)."""
        specs = super().views()
        if not self.cfg["patch_augment"]:
            return specs
        return [replace(s, patch_augment=PatchAugment(), patch_grid=s.size // self.patch_size) for s in specs]

    # --- matching ---------------------------------------------------------------------------------
    def token_pairs(self, geometry: list[torch.Tensor], grids: list[int]):
        """Per (teacher global view i, student view j != i), in DINO's pair order: (i, j, teacher token
        indices (B, 1 + M), student token indices (B, 1 + M), valid (B, M)). Token 0 is CLS; the rest are
        the matched patches from the views' boxes and flips (§3.4), padding marked invalid."""
        out = []
        for i in range(self.N_GLOBAL):
            for j in range(len(geometry)):
                if j != i:
                    ia, ib, valid = match_patches(geometry[i], geometry[j], grids[i], grids[j])
                    out.append((i, j, _with_cls(ia, valid), _with_cls(ib, valid), valid))
        return out

    def project_used(self, head, tokens: list[torch.Tensor], uses: list[tuple[int, torch.Tensor]]):
        """Run `head` once on the tokens that some pair uses. tokens: per view (B, T, D); uses: (view, (B, L)
        token indices). Returns (logits (R, K) of the used tokens, per view a (B, T) map token -> row, and the
        token position (R,) of every row: 0 = CLS, 1 + p = patch p of that view's grid)."""
        used = [torch.zeros(t.shape[:2], dtype=torch.bool, device=t.device) for t in tokens]
        for u in used:
            u[:, 0] = True
        for v, idx in uses:
            used[v].scatter_(1, idx, True)
        mask = torch.cat([u.reshape(-1) for u in used])
        rows = (mask.cumsum(0) - 1).split([u.numel() for u in used])
        pos = torch.cat([torch.arange(u.shape[1], device=u.device).expand_as(u).reshape(-1) for u in used])
        flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens])
        return head(flat[mask]), [r.view_as(u) for r, u in zip(rows, used)], pos[mask]

    # --- centring (§3.5): DINO's centre for CLS, one per patch position -----------------------------
    def token_centers(self, pos: torch.Tensor) -> torch.Tensor:
        """(R,) teacher token positions -> (R, K) centres: DINO's for CLS (0), C_p for patch 1 + p."""
        return torch.cat([self.center[None], self.patch_center])[pos]

    @torch.no_grad()
    def update_patch_center(self, teacher_logits: torch.Tensor, pos: torch.Tensor) -> None:
        """C_p <- m C_p + (1 - m) mean of the teacher's outputs at patch position p (DINO eq. 4's rule, per
        position), over the global batch: per-position sums and counts all-reduced together, so every rank
        gets the same centres. A position no pair used this step (no output) keeps its centre."""
        flat = teacher_logits.detach().float()
        stats = flat.new_zeros(1 + self.patch_center.shape[0], flat.shape[1] + 1)  # row 0 collects the CLS rows
        stats.index_add_(0, pos, torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1))
        stats = stats[1:]
        dist.all_reduce_mean_(stats)
        count = stats[:, -1:]
        mean = stats[:, :-1] / count.clamp(min=1e-12)  # the ratio of means = the global mean
        updated = ema_center(self.patch_center, mean, self.cfg["center_momentum"])
        self.patch_center.copy_(torch.where(count > 0, updated, self.patch_center))

    # --- the step ---------------------------------------------------------------------------------
    def forward(self, batch):
        if not self.patch_terms:
            return super().forward(batch)
        return self.patch_wise_forward(batch)

    def patch_wise_forward(self, batch):
        c = self.cfg
        views = batch.views
        grids = [v.shape[-1] // self.patch_size for v in views]
        pairs = self.token_pairs(batch.geometry, grids)
        student = self.student_tokens(views)
        with torch.no_grad():
            teacher = self.teacher_tokens(views[:self.N_GLOBAL])
            t_logits, t_rows, t_pos = self.project_used(self.teacher_head, teacher,
                                                        [(i, ti) for i, _, ti, _, _ in pairs])
            p_t = teacher_probs(t_logits, self.token_centers(t_pos), self.teacher_temp())
        s_logits, s_rows, _ = self.project_used(self.head, student, [(j, si) for _, j, _, si, _ in pairs])
        with torch.no_grad():
            target, cls_w, n_matched = self.pair_targets(pairs, t_rows, s_rows, p_t, s_logits.shape[0])
        # H is linear in the teacher distribution: sum_r w_r H(P_t[a_r], P_s[b_r]) = sum_b H(Q_b, P_s[b]) with
        # Q_b = sum_{r: b_r = b} w_r P_t[a_r], so one log-softmax per student token serves every pair it is in
        loss = soft_cross_entropy(target, s_logits, c["student_temp"]).sum()

        with torch.no_grad():  # diagnostics from the CLS rows only (cheap): DINO's loss on these outputs
            h_cls = torch.stack([soft_cross_entropy(p_t[t_rows[i][:, 0]], s_logits[s_rows[j][:, 0]], c["student_temp"])
                                 for i, j, *_ in pairs])
        # the centres after their use in the loss: CLS from the CLS outputs only (DINO eq. 4), patches per position
        self.update_center(self.center, t_logits[torch.cat([r[:, 0] for r in t_rows])])
        self.update_patch_center(t_logits, t_pos)
        # logged: the CLS term (eq. 7), the patch terms' share of the loss, matched patches per (sample, view pair),
        # and the collapse diagnostics of the teacher's CLS and patch targets
        return {"loss": loss, "dino": h_cls.mean(), "patch": loss.detach() - (h_cls * cls_w).mean(),
                "matched": n_matched / h_cls.numel(), **collapse_diagnostics(p_t, "cls", t_pos == 0),
                **collapse_diagnostics(p_t, "patch", t_pos > 0)}

    def pair_targets(self, pairs, t_rows, s_rows, p_t: torch.Tensor, n_student: int):
        """The weighted teacher target of every used student token, (R_s, K): sum over the matched (teacher
        token, student token) pairs of w * P_t, w from eqs. 8-10 / (batch x view pairs); one sparse
        (R_s x R_t) @ (R_t x K) product over the matched pairs only (padding dropped). Also returns the CLS
        weights (view pairs, B) and the number of matched patch pairs."""
        c = self.cfg
        scale = 1.0 / (len(pairs) * pairs[0][4].shape[0])
        rows_s, rows_t, weights, cls_ws = [], [], [], []
        for i, j, ti, si, valid in pairs:
            cls_w, patch_w = patch_wise_weights(valid, c["loss"], c["lambd"])
            keep = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
            rows_t.append(t_rows[i].gather(1, ti)[keep])
            rows_s.append(s_rows[j].gather(1, si)[keep])
            weights.append(torch.cat([cls_w[:, None], patch_w], dim=1)[keep] * scale)
            cls_ws.append(cls_w)
        index = torch.stack([torch.cat(rows_s), torch.cat(rows_t)])
        w = torch.sparse_coo_tensor(index, torch.cat(weights).to(p_t.dtype), (n_student, p_t.shape[0]),
                                    check_invariants=False)  # in range by construction
        return torch.sparse.mm(w, p_t), torch.stack(cls_ws), sum(v.sum() for *_, v in pairs).float()
