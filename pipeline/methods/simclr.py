"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Two views, a shared encoder + MLP projector, NT-Xent over the 2N views of the *global* batch (§2.1,
eq. 1): each rank's embeddings are gathered from every rank with gradient, so negatives span all
ranks and the DDP gradient equals the single-process gradient on the concatenated batch.

`groups` (off by default): GSSSL's multi-patch grouping (Li et al. 2024, Table 5, "SimCLR + Multi-Image
Patches"; pipeline/methods/patch_groups.py). The paper does not say how the group enters the loss; we
follow its own loss (eq. 3.3: each patch against the other view's group mean) with NT-Xent in place of
L_BT (`pairing: patch_to_mean`): every patch z_i of view A is a query whose positive is Wbar of the same
image and whose negatives are both group means of every other image (its own Zbar, built from itself, is
excluded like NT-Xent's self), and symmetrically for view B; the mean over all 2n queries keeps SimCLR's
loss scale. `pairing: mean_to_mean` is plain NT-Xent between the two group means.
"""
from __future__ import annotations

import torch

from pipeline.losses.contrastive import nt_xent
from pipeline.methods.base import ProjectorMethod, projector_params, temperature_param
from pipeline.methods.patch_groups import PatchGroups, group_params
from pipeline.methods.registry import register
from pipeline import dist


def nt_xent_global(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent for this rank's two views, against both views gathered from every rank.

    Gathered keys are [all ranks' z1 ; all ranks' z2]; this rank's rows start at rank * B in each half.
    """
    b = z1.shape[0]
    keys = torch.cat([dist.gather_with_grad(z1), dist.gather_with_grad(z2)])
    half = keys.shape[0] // 2
    own = torch.arange(b, device=z1.device) + dist.rank() * b
    self_index = torch.cat([own, own + half])
    positive = torch.cat([own + half, own])
    return nt_xent(torch.cat([z1, z2]), keys, positive, self_index, temperature)


def nt_xent_grouped(z: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of each patch against the other view's group mean, for patch embeddings z, w (n, B, D).

    Keys are the group means of every rank, [all Zbar ; all Wbar]; a patch of view A (B) has its image's
    Wbar (Zbar) as positive and its own group's mean excluded. Mean over the 2 n B local queries."""
    n, b = z.shape[:2]
    keys = torch.cat([dist.gather_with_grad(z.mean(0)), dist.gather_with_grad(w.mean(0))])
    half = keys.shape[0] // 2
    own = (torch.arange(b, device=z.device) + dist.rank() * b).repeat(n)     # patch-major, as z.flatten(0, 1)
    self_index = torch.cat([own, own + half])
    positive = torch.cat([own + half, own])
    return nt_xent(torch.cat([z.flatten(0, 1), w.flatten(0, 1)]), keys, positive, self_index, temperature)


@register("simclr")
class SimCLR(ProjectorMethod):
    PARAMS = {"temperature": temperature_param(), **projector_params(), **group_params()}
    DEFAULTS = {"temperature": 0.5, "proj_hidden": 2048, "proj_dim": 128, "proj_layers": 2}

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        self.groups = PatchGroups.of_method(self)

    def forward(self, batch):
        if self.groups is not None:
            return self._grouped(batch)
        z1, z2 = (self.project(v) for v in batch.views[:2])
        loss = nt_xent_global(z1, z2, self.cfg["temperature"])
        return {"loss": loss, "nt_xent": loss}

    def _grouped(self, batch):
        z, w = (self.groups.embed(self.project, v, i, self.pixel_norm) for i, v in enumerate(batch.views[:2]))
        t = self.cfg["temperature"]
        loss = nt_xent_grouped(z, w, t) if self.groups.pairing == "patch_to_mean" else nt_xent_global(z.mean(0), w.mean(0), t)
        return {"loss": loss, "nt_xent": loss}
