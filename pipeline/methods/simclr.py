"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Two views, a shared encoder + MLP projector, NT-Xent over the 2N views of the *global* batch (§2.1,
eq. 1): each rank's embeddings are gathered from every rank with gradient, so negatives span all
ranks and the DDP gradient equals the single-process gradient on the concatenated batch.
"""
from __future__ import annotations

import torch

from pipeline.losses.contrastive import nt_xent
from pipeline.methods.base import ProjectorMethod, projector_params, temperature_param
from pipeline.methods.registry import register
from pipeline.train import dist


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


@register("simclr")
class SimCLR(ProjectorMethod):
    PARAMS = {"temperature": temperature_param(), **projector_params()}
    DEFAULTS = {"temperature": 0.5, "proj_hidden": 2048, "proj_dim": 128, "proj_layers": 2}

    def forward(self, batch):
        z1, z2 = (self.project(v) for v in batch.views[:2])
        loss = nt_xent_global(z1, z2, self.cfg["temperature"])
        return {"loss": loss, "nt_xent": loss}
