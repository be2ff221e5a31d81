"""MoCo-v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"; MoCo: He et al. 2020).

Query encoder (backbone + MLP head) trained by backprop; key encoder = its momentum copy,
theta_k <- m theta_k + (1 - m) theta_q (MoCo eq. 2); InfoNCE against a FIFO queue of past keys
(MoCo eq. 1, t = 0.2 in v2). The queue is filled with the keys gathered from every rank, in rank order,
so it is identical on all ranks; it is a buffer, so checkpoints save and restore it (both pieces live in
base.MomentumContrast, shared with LeOCLR).
`symmetric: true` adds the loss with the views swapped (a common CIFAR setting; off = the paper).
Shuffle-BN (MoCo §3.3, on by default; `shuffle_bn: false` turns it off): the key encoder normalises shuffled
sub-batches, `shuffle_bn_groups` of them in the global batch (8: MoCo's 8 GPUs; under DDP each rank takes
groups / world size of them), shuffled across ranks under DDP (shuffle_bn.py). BN stays per GPU under DDP
(MoCo §3.3): `SYNC_BN = False` keeps `train.sync_bn` from converting the query encoder.

`groups` (off by default): GSSSL's multi-patch grouping (Li et al. 2024, Table 5, "MoCo + Multi-Image
Patches"; pipeline/methods/patch_groups.py). As for SimCLR, the paper does not say how the group enters
the loss; following GSSSL's eq. 3.3 (each patch against the other view's group mean), every query patch
q_i of view 1 (query encoder) is scored by InfoNCE against the mean of view 2's key-encoder patch
projections, Kbar, with the queue as negatives, averaged over the n patches (`pairing: patch_to_mean`);
`mean_to_mean` scores the query group mean instead. The queue stores the key group means.
"""
from __future__ import annotations


from pipeline.losses.contrastive import info_nce_queue
from pipeline.methods.base import MomentumContrast, projector_params, temperature_param
from pipeline.methods.patch_groups import PatchGroups, encode_patches, group_params
from pipeline.methods.registry import register
from pipeline.methods.shuffle_bn import SHUFFLE_BN_DEFAULTS, shuffle_bn_params
from pipeline.schema import Bool, Float, Int


@register("mocov2")
class MoCoV2(MomentumContrast):
    SYNC_BN = False  # per-GPU BN, as MoCo (§3.3) and MoCo-v2; Shuffle-BN decorrelates the key encoder's groups
    PARAMS = {"temperature": temperature_param(), "queue_size": Int(1), "momentum": Float(0, 1),
              "symmetric": Bool(), **projector_params(), **group_params(),
              **shuffle_bn_params()}
    DEFAULTS = {"temperature": 0.2, "queue_size": 65536, "momentum": 0.999, "symmetric": False,
                "proj_hidden": 2048, "proj_dim": 128, "proj_layers": 2, **SHUFFLE_BN_DEFAULTS}

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        self.groups = PatchGroups.of_method(self)

    def forward(self, batch):
        if self.groups is not None:
            return self._grouped(batch)
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

    def _grouped(self, batch):
        g, t = self.groups, self.cfg["temperature"]
        patches = [g.cut(v, i, self.pixel_norm) for i, v in enumerate(batch.views[:2])]   # (n, B, C, s, s) each

        def score(q, k_mean):
            if g.pairing == "mean_to_mean":
                return info_nce_queue(q.mean(0), k_mean, self.queue.keys, t)
            return info_nce_queue(q.flatten(0, 1), k_mean.repeat(g.n, 1), self.queue.keys, t)

        k2 = encode_patches(self.key, patches[1]).mean(0)
        loss = score(encode_patches(self.project, patches[0]), k2)
        keys = [k2]
        if self.cfg["symmetric"]:
            k1 = encode_patches(self.key, patches[0]).mean(0)
            loss = (loss + score(encode_patches(self.project, patches[1]), k1)) / 2
            keys.append(k1)
        self._pending_keys = keys
        return {"loss": loss, "info_nce": loss}
