"""NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning").

Encoder + projection MLP g (3 layers [2048, 2048, d]) + prediction MLP h (2 layers [4096, d]); every layer
BatchNorm-ed, ReLU after all but the last (§4.1, "Implementation details"; d = 256). A support set Q holds the
L2-normalised projections z1 of past batches, first in first out. The positive of a sample is the nearest
neighbour of its view-1 projection in Q (eq. 2: NN(z, Q) = argmax_q cos(z, q)) instead of z itself; the loss
is InfoNCE between NN(z1_i) and the other view's predictions p2 (eq. 3-4), negatives the other samples'
predictions, temperature 0.1, symmetrised by swapping the views (the mean of both directions here).

DDP: predictions are gathered from every rank with gradient (the SimCLR pattern), so each query sees the
whole global batch; the support set is filled from z1 gathered in rank order after the optimizer step, so it
is identical on every rank, and it is a buffer, so checkpoints save and restore it. The NN is a support-set
element, a constant for autograd: view 1's projection reaches the loss only through its prediction.
Augmentations: BYOL's (paper §4.1), blur / solarisation probabilities per view as in byol.py.
"""
from __future__ import annotations

import torch

from pipeline.losses.contrastive import info_nce_batch
from pipeline.methods.base import ProjectorMethod, projector_params, temperature_param, two_view_params
from pipeline.methods.memory import SupportSet, nearest_neighbour
from pipeline.methods.registry import register
from pipeline.models.heads import mlp
from pipeline.schema import Int
from pipeline import dist


@register("nnclr")
class NNCLR(ProjectorMethod):
    PROJ_LAST_BN = True
    LOSS_TERMS, KEYS_PER_IMAGE = 2, 1   # eq. 4 symmetrised: the mean of both directions; z1 into the support set

    PARAMS = {"temperature": temperature_param(), "support_size": Int(1), "pred_hidden": Int(1),
              **two_view_params(), **projector_params()}
    DEFAULTS = {"temperature": 0.1, "support_size": 98304, "proj_hidden": 2048, "proj_dim": 256, "proj_layers": 3,
                "pred_hidden": 4096, "blur_p": [1.0, 0.1], "solarize_p": [0.0, 0.2]}

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        c = self.cfg
        self.predictor = mlp(c["proj_dim"], c["pred_hidden"], c["proj_dim"], 2, last_bn=True)
        self.support = SupportSet(c["support_size"], c["proj_dim"])

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, p): the projection (looked up in the support set) and its prediction."""
        z = self.project(x)
        return z, self.predictor(z)

    def forward(self, batch):
        (z1, p1), (z2, p2) = (self.embed(v) for v in batch.views[:2])
        support = self.support.active()
        nn1, nn2 = nearest_neighbour(z1, support), nearest_neighbour(z2, support)
        # one collective for both views' predictions; rank r's rows start at r * B
        gathered = dist.gather_with_grad(torch.cat([p1, p2], dim=1))
        g1, g2 = gathered.split(p1.shape[1], dim=1)
        b = z1.shape[0]
        positive = torch.arange(b, device=z1.device) + dist.rank() * b
        t = self.cfg["temperature"]
        loss = (info_nce_batch(nn1, g2, positive, t) + info_nce_batch(nn2, g1, positive, t)) / 2
        self._pending = z1.detach()  # pushed after the step: a batch must not find itself as its own neighbour
        return {"loss": loss, "info_nce": loss}

    @torch.no_grad()
    def after_step(self, progress):
        pending = getattr(self, "_pending", None)
        if pending is not None:
            self.support.push(pending)
        self._pending = None
