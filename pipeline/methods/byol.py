"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

Online network = backbone + projector + predictor (§3.1; Linear-BN-ReLU-Linear MLPs, hidden 4096, out 256,
§3.3). Target network = an EMA copy of backbone + projector, xi <- tau xi + (1 - tau) theta, with tau
following a cosine schedule from tau_base = 0.996 to 1 over training (§3.3). Loss (eq. 2) symmetrised as in
the paper: L = l(p1, sg(z2')) + l(p2, sg(z1')), l = 2 - 2 cos. Per-sample terms only, so under DDP the mean
of the ranks' gradients is the gradient on the global batch (BatchNorm aside, as in the paper).
The paper's asymmetric augmentation (§3.3, Table 6): blur p = 1.0 / 0.1, solarisation p = 0.0 / 0.2 for
the two views; `blur_p` / `solarize_p` override them per view (no blur at 32 px in the CPU profile).
"""
from __future__ import annotations

import torch

from pipeline.losses.predictive import normalized_mse
from pipeline.methods.base import (ProjectorMethod, cosine_momentum, momentum_copy, projector_params,
                                   two_view_params)
from pipeline.methods.registry import register
from pipeline.models.heads import mlp
from pipeline.schema import Float, Int


@register("byol")
class BYOL(ProjectorMethod):
    PARAMS = {"momentum": Float(0, 1), "pred_hidden": Int(1), **two_view_params(),
              **projector_params()}
    DEFAULTS = {"momentum": 0.996, "proj_hidden": 4096, "proj_dim": 256, "proj_layers": 2, "pred_hidden": 4096,
                "blur_p": [1.0, 0.1], "solarize_p": [0.0, 0.2]}

    LOSS_TERMS, LOSS_REDUCTION = 2, "sum"   # §3.1: the symmetrised loss L_total = L + L~

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        c = self.cfg
        self.predictor = mlp(c["proj_dim"], c["pred_hidden"], c["proj_dim"], 2)
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)

    def online(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.project(x))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def forward(self, batch):
        x1, x2 = batch.views[:2]
        p1, p2 = self.online(x1), self.online(x2)
        t1, t2 = self.target(x1), self.target(x2)
        loss = normalized_mse(p1, t2) + normalized_mse(p2, t1)
        return {"loss": loss, "norm_mse": loss}

    def target_momentum(self, progress: float) -> float:
        return cosine_momentum(self.cfg["momentum"], progress)

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]
