"""GSSSL (Li et al. 2024, "Group-based siamese self-supervised learning", §3, Alg. 1).

Two views A, B per image (BYOL's augmentations, §4.1: per-view blur / solarisation, as Barlow Twins
here); from each, n overlapping fixed-size patches, each augmented again (pipeline/methods/patch_groups.py).
z_i = F(A_i), w_i = F(B_i) with F = projector(backbone), L2-normalised; Zbar, Wbar their means over
the n patches. Loss (eq. 3.3 and Alg. 1 lines 7-10):
    sum_i L_BT(z_i, Wbar) + sum_i L_BT(w_i, Zbar) + Loss_rank-k(Zbar, Wbar, C)
  - L_BT is Barlow Twins' loss (eq. 3.1-3.2, lambda = 5e-3) with C computed along the batch between a
    patch's projections and the other view's mean projections. Alg. 1 says "total" over i: a sum, not a
    mean (so the invariance term grows with n; `lambd` and `triplet_weight` are relative to it).
  - Loss_rank-k (eq. 3.4, pipeline/losses/triplet.py) on the cosine-similarity matrix of Zbar (rows) and
    Wbar: the mean over the batch of max(0, C + k-th largest off-diagonal of row i - diagonal). The paper
    writes it one way only (rows of Zbar), so it is not symmetrised. Its weight is 1 in the paper
    (`triplet_weight`, a parameter here). The paper gives neither k nor C; defaults k = 10 (at its batch
    of 100 on CIFAR-10, about as many same-class negatives per row as k - 1 skips) and C = 0.5.
No stop-gradient anywhere (the paper names none): gradients reach both the patches and the means.

DDP: eq. 3.4's "batch of d images" is the global batch: each rank's Zbar rows are scored against Wbar
gathered from every rank with gradient (k-th largest among all d - 1 negatives), and the mean over this
rank's rows, averaged by DDP, is the mean over all d rows. The Barlow Twins statistics are all-reduced
with autograd (pipeline/losses/redundancy.py). So the DDP gradient equals the single-process gradient
on the concatenated batch.
Optimisation (§4.1): LARS, lr 0.3 x bs/256, biases and BatchNorm parameters 0.0048 (`bias_lr_ratio` =
0.0048 / 0.3 of the weights' lr), no LARS adaptation and no weight decay for them.
"""
from __future__ import annotations

import torch

from pipeline.losses.redundancy import barlow_twins_terms
from pipeline.losses.triplet import rank_k_triplet
from pipeline.methods.base import ProjectorMethod, projector_params, two_view_params
from pipeline.methods.patch_groups import PatchGroups, group_params
from pipeline.methods.registry import register
from pipeline.errors import ParamError
from pipeline.schema import Float, Int
from pipeline import dist


def gsssl_loss(z: torch.Tensor, w: torch.Tensor, lambd: float, k: int, margin: float, triplet_weight: float
               ) -> dict[str, torch.Tensor]:
    """The loss of eq. 3.3 + eq. 3.4 for this rank's normalised patch projections z, w (n, B, D) of views A, B.
    Cross-sample statistics span every rank (see the module docstring)."""
    z_mean, w_mean = z.mean(0), w.mean(0)
    # both L_BT sums in one call (one packed reduction): [z_i vs Wbar ; w_i vs Zbar], terms (2, n)
    on, off = barlow_twins_terms(torch.stack([z, w]), torch.stack([w_mean, z_mean]).unsqueeze(1),
                                 all_reduce=dist.all_reduce_sum_with_grad)
    on, off = on.sum(), off.sum()
    b = z_mean.shape[0]
    own = torch.arange(b, device=z.device) + dist.rank() * b
    keys = dist.gather_with_grad(w_mean)
    if k > keys.shape[0] - 1:
        raise ParamError(f"methods.gsssl.rank_k: {k} needs at least {k + 1} images per step (the global batch is {keys.shape[0]})")
    triplet = rank_k_triplet(z_mean, keys, own, k, margin)
    bt = on + lambd * off
    return {"loss": bt + triplet_weight * triplet, "barlow_twins": bt, "on_diag": on, "off_diag": off, "rank_k": triplet}


@register("gsssl")
class GSSSL(ProjectorMethod):
    PARAMS = {"lambd": Float(0), "rank_k": Int(1), "margin": Float(0), "triplet_weight": Float(0),
              "bias_lr_ratio": Float(0), **group_params(pairing=False), **two_view_params(), **projector_params()}
    # §4.1: 2-layer projector, 4096 hidden, 512 out; n = 10 patches (its Table 1); patch size ours (see patch_crops)
    DEFAULTS = {"lambd": 5e-3, "rank_k": 10, "margin": 0.5, "triplet_weight": 1.0, "bias_lr_ratio": 0.0048 / 0.3,
                "groups": {"n": 10, "size": 24}, "proj_hidden": 4096, "proj_dim": 512, "proj_layers": 2,
                "blur_p": [1.0, 0.1], "solarize_p": [0.0, 0.2]}

    LOSS_REDUCTION = "sum"

    @classmethod
    def step_facts(cls, cfg):
        """Alg. 1: 2n Barlow Twins terms and the rank-k triplet, summed."""
        return {**super().step_facts(cfg), "loss_terms": 2 * {**cls.DEFAULTS, **cfg}["groups"]["n"] + 1}

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        self.groups = PatchGroups.of_method(self)

    def forward(self, batch):
        z, w = (self.groups.embed(self.project, v, i, self.pixel_norm) for i, v in enumerate(batch.views[:2]))
        c = self.cfg
        return gsssl_loss(z, w, c["lambd"], c["rank_k"], c["margin"], c["triplet_weight"])

    def param_groups(self):
        decay, no_decay = super().param_groups()
        return [decay, {**no_decay, "lr_scale": self.cfg["bias_lr_ratio"]}]
