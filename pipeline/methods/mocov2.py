"""MoCo-v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"; MoCo: He et al. 2020).

Query encoder (backbone + MLP head) trained by backprop; key encoder = its momentum copy,
theta_k <- m theta_k + (1 - m) theta_q (MoCo eq. 2); InfoNCE against a FIFO queue of past keys
(MoCo eq. 1, t = 0.2 in v2). The queue is filled with the keys gathered from every rank, in rank order,
so it is identical on all ranks; it is a buffer, so checkpoints save and restore it (both pieces live in
base.MomentumContrast, shared with LeOCLR).
`symmetric: true` adds the loss with the views swapped (a common CIFAR setting; off = the paper).
Shuffle-BN is not implemented: with SyncBN off and one process the key BN sees the whole batch.
"""
from __future__ import annotations

import torch

from pipeline.losses.contrastive import info_nce_queue
from pipeline.methods.base import MomentumContrast, projector_params, temperature_param
from pipeline.methods.registry import register
from pipeline.params import Bool, Float, Int


@register("mocov2")
class MoCoV2(MomentumContrast):
    PARAMS = {"temperature": temperature_param(), "queue_size": Int(1), "momentum": Float(0, 1),
              "symmetric": Bool(), **projector_params()}
    DEFAULTS = {"temperature": 0.2, "queue_size": 65536, "momentum": 0.999, "symmetric": False,
                "proj_hidden": 2048, "proj_dim": 128, "proj_layers": 2}

    def forward(self, batch):
        x1, x2 = batch.views[:2]
        t = self.cfg["temperature"]
        q1, k2 = self.project(x1), self.key(x2)
        loss = info_nce_queue(q1, k2, self.queue.keys, t)
        keys = [k2]
        if self.cfg["symmetric"]:
            q2, k1 = self.project(x2), self.key(x1)
            loss = (loss + info_nce_queue(q2, k1, self.queue.keys, t)) / 2
            keys.append(k1)
        self._pending_keys = keys  # pushed by MomentumContrast.after_step
        return {"loss": loss, "info_nce": loss}
