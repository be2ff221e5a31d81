"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning").

One encoder f = backbone + projection MLP (§4 "Projection MLP": 3 layers of 2048, BN on every layer, the
output's BN without ReLU; 2 layers in the paper's CIFAR experiments, App. D) and a bottleneck prediction MLP
h (2048 -> 512 -> 2048, BN on the hidden layer only). Loss (eq. 1-3, Alg. 1):
L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D the negative cosine; there is no momentum encoder, the
stop-gradient alone prevents collapse. Per-sample terms, so DDP's gradient mean is the global-batch gradient.
Views: the shared augment (the paper uses MoCo-v2's symmetric augmentation).

The predictor h trains at a fixed lr (§4.2 "Predictor", Table 1 "lr of h: fixed"): its parameter groups carry
`fixed_lr`, so the trainer's warm-up and cosine decay leave them at the peak lr (pipeline/train/optim.py).
"""
from __future__ import annotations

import torch

from pipeline.losses.predictive import negative_cosine
from pipeline.methods.base import ProjectorMethod, projector_params
from pipeline.methods.registry import register
from pipeline.models.heads import mlp
from pipeline.schema import Int


@register("simsiam")
class SimSiam(ProjectorMethod):
    PROJ_LAST_BN = True

    PARAMS = {"pred_hidden": Int(1), **projector_params()}
    DEFAULTS = {"proj_hidden": 2048, "proj_dim": 2048, "proj_layers": 3, "pred_hidden": 512}

    LOSS_TERMS = 2   # eq. 2: L = D(p1, z2) / 2 + D(p2, z1) / 2, the mean of both directions

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        c = self.cfg
        self.predictor = mlp(c["proj_dim"], c["pred_hidden"], c["proj_dim"], 2)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, p): the projection (the stop-gradient target for the other view) and its prediction."""
        z = self.project(x)
        return z, self.predictor(z)

    def param_groups(self) -> list[dict]:
        """The base groups (weight decay on weights only) for backbone + projector; the predictor's own pair of
        groups at a fixed lr (§4.2, Table 1)."""
        pred = {id(p) for p in self.predictor.parameters()}
        groups = []
        for g in super().param_groups():
            groups.append({**g, "params": [p for p in g["params"] if id(p) not in pred]})
            groups.append({**g, "params": [p for p in g["params"] if id(p) in pred], "fixed_lr": True})
        return groups

    def forward(self, batch):
        (z1, p1), (z2, p2) = (self.embed(v) for v in batch.views[:2])
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
        return {"loss": loss, "neg_cosine": loss}
