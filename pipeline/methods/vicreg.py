"""VICReg (Bardes et al. 2022, "VICReg: Variance-Invariance-Covariance Regularization for SSL").

Two views, a shared encoder + expander (§4.1 and appendix C: 3 Linear layers of 8192, Linear-BN-ReLU
twice, the last plain), and eq. 6: lambda * s(Z, Z') + mu * [v(Z) + v(Z')] + nu * [c(Z) + c(Z')] with
lambda = mu = 25, nu = 1. Means, variances and covariances are those of the *global* batch, summed over
ranks with an autograd-aware all-reduce, so the DDP gradient equals the single-process gradient on the
concatenated batch. The paper's sum over branches is used; the authors' code halves the variance term
(set var_weight: 12.5 to match it). Views: BYOL's asymmetric augmentations (appendix C.1): blur
p = 1.0 / 0.1, solarisation p = 0.0 / 0.2, set per view by `blur_p` / `solarize_p` (no blur at 32 px).
"""
from __future__ import annotations

from pipeline.losses.redundancy import vicreg_terms
from pipeline.methods.base import ProjectorMethod, projector_params, two_view_params
from pipeline.methods.registry import register
from pipeline.schema import Float
from pipeline import dist


@register("vicreg")
class VICReg(ProjectorMethod):
    PARAMS = {"inv_weight": Float(0), "var_weight": Float(0), "cov_weight": Float(0),
              **two_view_params(), **projector_params()}
    DEFAULTS = {"inv_weight": 25.0, "var_weight": 25.0, "cov_weight": 1.0,
                "proj_hidden": 8192, "proj_dim": 8192, "proj_layers": 3,
                "blur_p": [1.0, 0.1], "solarize_p": [0.0, 0.2]}

    def forward(self, batch):
        z1, z2 = (self.project(v) for v in batch.views[:2])
        inv, var, cov = vicreg_terms(z1, z2, all_reduce=dist.all_reduce_sum_with_grad)
        c = self.cfg
        loss = c["inv_weight"] * inv + c["var_weight"] * var + c["cov_weight"] * cov
        return {"loss": loss, "invariance": inv, "variance": var, "covariance": cov}
