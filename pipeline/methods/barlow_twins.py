"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction").

Two views, a shared encoder + projector (§3, implementation details: 3 Linear layers of 8192,
Linear-BN-ReLU twice, the last plain), and the cross-correlation loss of eq. 1 between the two batches of embeddings, each
standardised per dimension over the *global* batch. Means, variances and C are summed over ranks with an
autograd-aware all-reduce (see pipeline/losses/redundancy.py), so the DDP gradient equals the
single-process gradient on the concatenated batch.
Views: BYOL's asymmetric augmentations (§3, implementation details): blur p = 1.0 / 0.1 and solarisation
p = 0.0 / 0.2 for the two views, set per view by `blur_p` / `solarize_p` (no blur at 32 px on CIFAR).
Optimisation (§4 "Implementation details"; its code's LARS groups): lr 0.2 for the weights and 0.0048 for the
biases and BatchNorm parameters, which get neither weight decay nor LARS adaptation: `bias_lr_ratio` is the
biases' lr over the weights' (default 0.0048 / 0.2; 1 = one lr, as the CPU profile's SGD blocks).
"""
from __future__ import annotations

from pipeline.losses.redundancy import barlow_twins_terms
from pipeline.methods.base import ProjectorMethod, projector_params, two_view_params
from pipeline.methods.registry import register
from pipeline.schema import Float
from pipeline import dist


@register("barlow_twins")
class BarlowTwins(ProjectorMethod):
    PARAMS = {"lambd": Float(0), "bias_lr_ratio": Float(0), **two_view_params(), **projector_params()}
    DEFAULTS = {"lambd": 5e-3, "bias_lr_ratio": 0.0048 / 0.2, "proj_hidden": 8192, "proj_dim": 8192, "proj_layers": 3,
                "blur_p": [1.0, 0.1], "solarize_p": [0.0, 0.2]}

    def param_groups(self):
        decay, no_decay = super().param_groups()   # biases and norm parameters: no decay, no LARS adaptation
        return [decay, {**no_decay, "lr_scale": self.cfg["bias_lr_ratio"]}]

    def forward(self, batch):
        z1, z2 = (self.project(v) for v in batch.views[:2])
        on, off = barlow_twins_terms(z1, z2, all_reduce=dist.all_reduce_sum_with_grad)
        return {"loss": on + self.cfg["lambd"] * off, "on_diag": on, "off_diag": off}
