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
  the mean of the teacher's outputs at p over every global view and sample of the batch, matched or not (the
  authors' code: its DINOLoss.update_center averages the teacher's whole (2B, T, K) output; issue 26 item 9),
  all-reduced across ranks. Only the teacher's outputs are centred, and the teacher sees the global crops only, so the
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

Cost: the teacher's head runs on all its tokens (the centres need them all), the student's only on the
tokens some pair uses (every CLS token, and the patch tokens matched in at least one pair); the cross-entropies
of all pairs are folded into one weighted teacher target per student token (H is linear in the teacher
distribution), so each student token needs one log-softmax and no per-pair gather enters the backward pass.

GPU (issue 23, defects 2, 6, 10): the matching and every index derived from it are computed on the host from
the views' geometry (`plan`; the loader leaves geometry on the host) and copied to the device without blocking,
so the step has no boolean indexing or `nonzero`; the targets are built in float32 with autocast off, by gathers
and a fixed-order sum (no sparse product, no atomic `index_add_`): the same bits on every run.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pipeline.data.patch_augment import PatchAugment
from pipeline.data.transfer import to_device
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

    # --- matching and the step's index plan, on the host ----------------------------------------------
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

    def plan(self, geometry: list[torch.Tensor], grids: list[int]) -> StepPlan:
        """Every index of the step, from the views' geometry on the host (the loader keeps it there): the
        matched pairs are data, so everything shaped by them (which student tokens go through the head, which
        teacher row each target mixes, with which weight) is decided here, where reading it costs nothing; the
        device then only gathers with fixed-size index tensors (no boolean indexing, no `nonzero`, no atomics)."""
        c = self.cfg
        geometry = [g.cpu() for g in geometry]
        pairs = self.token_pairs(geometry, grids)
        b = geometry[0].shape[0]
        t_tokens = grids[0] ** 2 + 1
        # the student tokens some pair uses (every CLS token), numbered in view order: the head's input rows
        used = [torch.zeros(b, g * g + 1, dtype=torch.bool) for g in grids]
        for u in used:
            u[:, 0] = True
        for _, j, _, si, _ in pairs:
            used[j].scatter_(1, si, True)
        mask = torch.cat([u.reshape(-1) for u in used])
        s_rows = [r.view_as(u) for r, u in zip((mask.cumsum(0) - 1).split([u.numel() for u in used]), used)]
        # the matched (student row, teacher row, weight) triples; teacher row of (view i, sample n, token t) is
        # (i * B + n) * T + t: the teacher's head runs on all its tokens
        scale = 1.0 / (len(pairs) * b)
        sample = torch.arange(b)[:, None]
        rows_s, rows_t, weights, cls_ws = [], [], [], []
        for i, j, ti, si, valid in pairs:
            cls_w, patch_w = patch_wise_weights(valid, c["loss"], c["lambd"])
            keep = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
            rows_s.append(s_rows[j].gather(1, si)[keep])
            rows_t.append(((i * b + sample) * t_tokens + ti)[keep])
            weights.append(torch.cat([cls_w[:, None], patch_w], dim=1)[keep] * scale)
            cls_ws.append(cls_w)
        src, w = _fold_by_row(torch.cat(rows_s), torch.cat(rows_t), torch.cat(weights).float(), int(mask.sum()))
        return StepPlan(student_tokens=mask.nonzero().squeeze(1), target_rows=src, target_weights=w,
                        pair_views=[(i, j) for i, j, *_ in pairs],
                        student_cls=torch.stack([s_rows[j][:, 0] for _, j, *_ in pairs]),
                        cls_weights=torch.stack(cls_ws).float(),
                        matched=torch.stack([v.sum() for *_, v in pairs]).sum().float())

    # --- centring (§3.5): DINO's centre for CLS, one per patch position -----------------------------
    def token_centers(self) -> torch.Tensor:
        """(T, K) centres of the teacher's token positions: DINO's for CLS (0), C_p for patch 1 + p."""
        return torch.cat([self.center[None], self.patch_center])

    @torch.no_grad()
    def update_patch_center(self, teacher_logits: torch.Tensor) -> None:
        """C_p <- m C_p + (1 - m) mean of the teacher's outputs at patch position p (DINO eq. 4's rule, per
        position). teacher_logits: (views, B, T, K), every teacher token. The mean is over every global view and
        sample of the global batch, matched or not, as the authors' code centres (its DINOLoss.update_center
        averages the teacher's whole (2B, T, K) output over its first axis; §3.5: "C is the average of samples
        inside the batch"). A plain mean over fixed axes: deterministic on CUDA (no atomic `index_add_`), and
        the ranks hold equal batches, so the mean of their means is the global mean."""
        mean = teacher_logits[:, :, 1:].detach().float().mean(dim=(0, 1))
        dist.all_reduce_mean_(mean)
        self.patch_center.copy_(ema_center(self.patch_center, mean, self.cfg["center_momentum"]))

    # --- the step ---------------------------------------------------------------------------------
    def forward(self, batch):
        if not self.patch_terms:
            return super().forward(batch)
        return self.patch_wise_forward(batch)

    def patch_wise_forward(self, batch):
        c = self.cfg
        views = batch.views
        plan = self.plan(batch.geometry, [v.shape[-1] // self.patch_size for v in views])
        dev = views[0].device
        idx = plan.to(dev)
        student = self.student_tokens(views)
        with torch.no_grad():
            teacher = torch.stack(self.teacher_tokens(views[:self.N_GLOBAL]))            # (views, B, T, D)
            t_logits = self.teacher_head(teacher.flatten(0, 2)).view(*teacher.shape[:3], -1)
            p_t = teacher_probs(t_logits, self.token_centers(), self.teacher_temp())     # (views, B, T, K)
        flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in student])
        s_logits = self.head(flat.index_select(0, idx.student_tokens))
        with torch.no_grad():
            target = pair_targets(p_t.flatten(0, 2), idx.target_rows, idx.target_weights)
        # H is linear in the teacher distribution: sum_r w_r H(P_t[a_r], P_s[b_r]) = sum_b H(Q_b, P_s[b]) with
        # Q_b = sum_{r: b_r = b} w_r P_t[a_r], so one log-softmax per student token serves every pair it is in
        loss = soft_cross_entropy(target, s_logits, c["student_temp"]).sum()

        with torch.no_grad():  # diagnostics from the CLS rows only (cheap): DINO's loss on these outputs
            h_cls = torch.stack([soft_cross_entropy(p_t[i, :, 0], s_logits.index_select(0, rows), c["student_temp"])
                                 for (i, _), rows in zip(plan.pair_views, idx.student_cls)])
        # the centres after their use in the loss: CLS from the CLS outputs only (DINO eq. 4), patches per position
        self.update_center(self.center, t_logits[:, :, 0])
        self.update_patch_center(t_logits)
        # logged: the CLS term (eq. 7), the patch terms' share of the loss, matched patches per (sample, view pair),
        # and the collapse diagnostics of the teacher's CLS and patch targets
        return {"loss": loss, "dino": h_cls.mean(), "patch": loss.detach() - (h_cls * idx.cls_weights).mean(),
                "matched": idx.matched / h_cls.numel(), **collapse_diagnostics(p_t[:, :, 0].flatten(0, 1), "cls"),
                **collapse_diagnostics(p_t[:, :, 1:].flatten(0, 2), "patch")}


@dataclass
class StepPlan:
    """The index tensors of one PW-Self step (PWSelf.plan): the rows of the concatenated student tokens that
    go through the head (R_s,), per head row the teacher rows (R_s, W) and weights (R_s, W) its target mixes,
    the (teacher view, student view) of each pair and the head rows of its student CLS tokens (pairs, B), the
    CLS weights (pairs, B) and the number of matched patch pairs ()."""
    student_tokens: torch.Tensor
    target_rows: torch.Tensor
    target_weights: torch.Tensor
    pair_views: list[tuple[int, int]]
    student_cls: torch.Tensor
    cls_weights: torch.Tensor
    matched: torch.Tensor

    def to(self, device) -> "StepPlan":
        """On `device`, copied without making the host wait (pinned, non-blocking)."""
        moved = {f: to_device(getattr(self, f), device) for f in
                 ("student_tokens", "target_rows", "target_weights", "student_cls", "cls_weights", "matched")}
        return replace(self, **moved)


def _fold_by_row(rows_s: torch.Tensor, rows_t: torch.Tensor, weights: torch.Tensor, n_student: int):
    """The (student row, teacher row, weight) triples as a dense (n_student, W) table per student row, W the
    most triples any row has (one per view pair it is in: a match is one-to-one within a pair); unused slots
    have weight 0 (and teacher row 0). Stable in the triples' order, so each row sums in pair order."""
    order = torch.sort(rows_s, stable=True).indices
    rows_s, rows_t, weights = rows_s[order], rows_t[order], weights[order]
    count = torch.bincount(rows_s, minlength=n_student)
    first = torch.cumsum(count, 0) - count
    slot = torch.arange(len(rows_s)) - first[rows_s]
    width = max(int(count.max()), 1) if n_student else 1
    src = torch.zeros(n_student, width, dtype=torch.long)
    w = torch.zeros(n_student, width, dtype=weights.dtype)
    src[rows_s, slot] = rows_t
    w[rows_s, slot] = weights
    return src, w


def pair_targets(p_t: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted teacher target of every student head row, (R_s, K): Q_b = sum_k w[b, k] P_t[rows[b, k]]
    (eqs. 8-10's weights / (batch x view pairs)). In float32 with autocast off (issue 23, defect 2: the sparse
    product this replaces went through addmm, which autocast ran in half precision, flushing most target
    entries to 0 under fp16), and as gathers + a fixed-order sum: no sparse coalescing (a host sync on CUDA)
    and no atomic adds (issue 23, defect 10), so the target is the same bits on every run."""
    with torch.autocast(p_t.device.type, enabled=False):
        p_t = p_t.float()
        out = weights[:, :1] * p_t.index_select(0, rows[:, 0])
        for k in range(1, rows.shape[1]):
            out = out + weights[:, k:k + 1] * p_t.index_select(0, rows[:, k])
        return out
