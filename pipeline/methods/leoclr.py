"""LeOCLR ("LeOCLR: Leveraging Original Images for Contrastive Learning of Visual Representations", §3).

Three views per image (§3, Fig. 3, Algorithm 1): the original image X resized WITHOUT cropping, and two random
resized crops X1, X2; all three then get MoCo-v2's random augmentation (flip, colour jitter, grayscale).
The query encoder f_q sees only X; the momentum encoder f_k (eq. 1, theta_k <- m theta_k + (1 - m) theta_q,
m = 0.999) sees only the crops. Loss (eq. 3): l(u, sg(v1)) + l(u, sg(v2)), u = f_q(X), v^i = f_k(X^i), l = MoCo-v2's
InfoNCE (eq. 2) against the queue: both crops are pulled to the original, never to each other. Both crops' keys
are enqueued after the step (gathered across ranks: the queue is identical everywhere). Each term is the mean
over the batch, as MoCo-v2's here (eq. 3 writes a sum over the batch: only the scale differs). The key encoder
uses MoCo's Shuffle-BN (as MoCo-v2 here: `shuffle_bn`, base.MomentumContrast.key).

`variant: end_to_end` is the paper's §5 / Table 5 ablation: both branches trained by backpropagation (one shared
encoder, as in the SimCLR it is compared with), negatives the other images' crops in the global batch instead
of a queue; no momentum encoder, no queue.
"""
from __future__ import annotations

import torch

from pipeline.data.views import ViewSpec
from pipeline.losses.contrastive import info_nce_batch, info_nce_queue
from pipeline.methods.base import MomentumContrast, projector_params, temperature_param
from pipeline.methods.registry import register
from pipeline.methods.shuffle_bn import SHUFFLE_BN_DEFAULTS, shuffle_bn_params
from pipeline.schema import Float, Int, Str
from pipeline import dist

VARIANTS = ("momentum", "end_to_end")


@register("leoclr")
class LeOCLR(MomentumContrast):
    SYNC_BN = False  # per-GPU BN, as MoCo (§3.3) and MoCo-v2; Shuffle-BN decorrelates the key encoder's groups
    PARAMS = {"temperature": temperature_param(), "queue_size": Int(1), "momentum": Float(0, 1),
              "variant": Str(VARIANTS), **projector_params(), **shuffle_bn_params()}
    DEFAULTS = {"temperature": 0.2, "queue_size": 65536, "momentum": 0.999, "variant": "momentum",
                "proj_hidden": 2048, "proj_dim": 128, "proj_layers": 2, **SHUFFLE_BN_DEFAULTS}

    # eq. 3: l(u, sg(v1)) + l(u, sg(v2)), a sum of two InfoNCE terms (about twice MoCo-v2's one-term gradient under
    # SGD: `loss_scale: 0.5` is the step-size control), and both crops' keys enqueued (Algorithm 1)
    LOSS_TERMS, LOSS_REDUCTION = 2, "sum"

    @classmethod
    def step_facts(cls, cfg):
        facts = super().step_facts(cfg)
        facts["keys_per_image"] = 2 if {**cls.DEFAULTS, **cfg}["variant"] == "momentum" else 0   # end to end: no queue
        return facts

    def uses_key_encoder(self) -> bool:
        return self.cfg["variant"] == "momentum"

    def views(self) -> list[ViewSpec]:
        """[original (no crop: the whole image resized), crop 1, crop 2], each with the full photometric augmentation."""
        crop = ViewSpec.from_augment(self.augment, self.image_size)
        return [ViewSpec.from_augment(self.augment, self.image_size, crop_scale=None), crop, crop]

    def forward(self, batch):
        x, x1, x2 = batch.views[:3]
        t = self.cfg["temperature"]
        u = self.project(x)
        if self.uses_key_encoder():
            v1, v2 = self.key(x1), self.key(x2)
            l1, l2 = info_nce_queue(u, v1, self.queue.keys, t), info_nce_queue(u, v2, self.queue.keys, t)
            self._pending_keys = [v1, v2]
        else:
            # the crops' embeddings of every rank, with gradient, in one collective; rank r's rows start at r * B
            v1, v2 = self.project(x1), self.project(x2)
            keys = dist.gather_with_grad(torch.cat([v1, v2], dim=1))
            k1, k2 = keys.split(v1.shape[1], dim=1)
            positive = torch.arange(u.shape[0], device=u.device) + dist.rank() * u.shape[0]
            l1, l2 = info_nce_batch(u, k1, positive, t), info_nce_batch(u, k2, positive, t)
        loss = l1 + l2
        return {"loss": loss, "info_nce_crop1": l1, "info_nce_crop2": l2}
