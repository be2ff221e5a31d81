"""pNNCLR (Biswas, Buckchash & Prasad, "pNNCLR: Stochastic Pseudo Neighborhoods for Contrastive Learning based
Unsupervised Representation Learning Problems", §3.3).

NNCLR (support set Q, FIFO, of past view-1 projections; NN(z) = argmax_q cos(z, q), NNCLR eq. 2) with three
changes, each a switch for the paper's Table 4 ablation:
  smooth weight update (always on, "swu"): the other view's branch is a target network f' = EMA of the online
    backbone + projector, theta_f' <- lambda theta_f' + (1 - lambda) theta_f (eq. 6), with stop-gradient;
  `pseudo` (pNN): the positive is pulled back towards z, z'' = z + (1 - alpha)(NN(z) - z) (eq. 4); off = NN(z);
  `noise`: z' ~ N(z'', (beta ||z'' - z||)^2) independently per dimension (eq. 5); off = z' = z''.
Loss (eq. 7-9): InfoNCE between pNN(z_i) and the target embeddings of the other view (negatives: the other
images' target embeddings in the global batch), mean over the batch, the two directions averaged. Eq. 9 sums
them; the paper trains with Adam, whose updates do not change with a constant loss scale (up to its eps), so
the mean trains as the sum there, and it keeps pNNCLR's loss on NNCLR's scale (NNCLR averages its two
directions): under SGD, beside NNCLR, a sum would double pNNCLR's effective lr and confound the comparison.
Defaults alpha = 0.25, beta = 0.10: the best rows of Table 5 (the prose beside it swaps the two values).
No predictor: the paper's encoder is backbone + two dense layers (2048, BN between, §4.1).
Augmentations: the paper names none beyond its base; per-view `blur_p` / `solarize_p` (BYOL's asymmetric pair,
as NNCLR §4.1 uses) can be set in the block, so that beside NNCLR both see the same views.

Gradient: the paper's formulas make the positive a function of a support-set element, which has no gradient;
with `pseudo` and `noise` off (the "swu" row of Table 4) nothing at all would then reach the encoder. The
positive is therefore a straight-through estimate, as in the Keras NNCLR example (which, like this paper, has no
predictor): its value is eq. 4-5, its gradient with respect to z the identity. Eq. 4 itself, z'' = alpha z +
(1 - alpha) NN(z) with NN(z) constant, passes alpha I: `straight_through: alpha` trains with that gradient, the
step-size control beside NNCLR (identity takes 1 / alpha = 4x eq. 4's step under SGD at alpha = 0.25).

Support set and target as in NNCLR / BYOL: Q is filled after the step from z1 gathered across ranks (identical
everywhere); Q, the target and the noise generator's seed and step counter are buffers / modules, so a
checkpoint restores them and a resumed run draws the same noise. The noise of step s on rank r comes from a
generator seeded by (seed, s, r): independent of the data loader and of other code drawing random numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.contrastive import info_nce_batch
from pipeline.methods.base import (ProjectorMethod, momentum_copy, projector_params, temperature_param,
                                   two_view_params)
from pipeline.methods.memory import HostCounters, SupportSet, nearest_neighbour
from pipeline.methods.registry import register
from pipeline.schema import Bool, Float, Int, Str
from pipeline import dist
from pipeline.utils import mix_seed


def pseudo_neighbour(z: torch.Tensor, support: torch.Tensor, alpha: float, beta: float,
                     generator: torch.Generator | None = None, st_scale: float = 1.0) -> torch.Tensor:
    """pNN(z) (eq. 4-5) for each row of z (B, D), on the unit sphere of the support set: with z^ = z / ||z||,
    z'' = z^ + (1 - alpha)(NN(z^) - z^) and z' = z'' + beta ||z'' - z^|| * eps, eps ~ N(0, I) drawn from
    `generator`. alpha = 0 gives NN(z), beta = 0 gives z''. Straight-through: value z', gradient `st_scale` x identity
    in z^ (1: identity; alpha: eq. 4's own d z''/d z^ = alpha I, NN(z^) a constant)."""
    zn = F.normalize(z.float(), dim=1)
    nn_z = nearest_neighbour(zn, support)
    pnn = torch.lerp(zn.detach(), nn_z, 1 - alpha)                       # eq. 4
    if beta > 0:
        sigma = beta * (pnn - zn.detach()).norm(dim=1, keepdim=True)    # eq. 5: one std for every dimension
        pnn = pnn + sigma * torch.randn(pnn.shape, generator=generator, device=pnn.device, dtype=pnn.dtype)
    return pnn + st_scale * (zn - zn.detach())  # exactly the value pnn; d/dz^ = st_scale * identity


# the gradient the straight-through positive passes to z^: `identity` (the default, as the Keras NNCLR example's
# straight-through) or `alpha`, eq. 4's own Jacobian alpha I (4x smaller at alpha = 0.25: the step-size control)
STRAIGHT_THROUGH = ("identity", "alpha")


def straight_through_scale(cfg: dict) -> float:
    """1 for `straight_through: identity`; eq. 4's alpha for `alpha` (0 with `pseudo` off: z'' = NN(z), a constant)."""
    if cfg.get("straight_through", "identity") == "identity":
        return 1.0
    return cfg["alpha"] if cfg["pseudo"] else 0.0


@register("pnnclr")
class PNNCLR(ProjectorMethod, HostCounters):
    PARAMS = {"temperature": temperature_param(), "support_size": Int(1), "momentum": Float(0, 1),
              "alpha": Float(0, 1), "beta": Float(0), "pseudo": Bool(), "noise": Bool(), **projector_params(),
              **two_view_params(), "straight_through": Str(STRAIGHT_THROUGH)}
    # lambda (eq. 6) and the temperature are not given by the paper: NNCLR's t = 0.1, MoCo's lambda = 0.99
    DEFAULTS = {"temperature": 0.1, "support_size": 10000, "momentum": 0.99, "alpha": 0.25, "beta": 0.10,
                "pseudo": True, "noise": True, "proj_hidden": 2048, "proj_dim": 2048, "proj_layers": 2,
                "straight_through": "identity"}
    LOSS_TERMS, KEYS_PER_IMAGE = 2, 1   # eq. 9's two directions, averaged (module docstring); z1 into the support set

    @classmethod
    def step_facts(cls, cfg):
        c = {**cls.DEFAULTS, **cfg}
        return {**super().step_facts(cfg), "straight_through_scale": straight_through_scale(c)}

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)
        self.support = SupportSet(self.cfg["support_size"], self.cfg["proj_dim"])
        # drawn from the seeded global RNG at construction, so a run's noise follows from params.seed
        self.register_counter("noise_seed", int(torch.randint(0, 2**62, (), device="cpu")))
        self.register_counter("noise_step", 0)   # both with host copies: the step reads no device value
        self._pending = None

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def alpha_beta(self) -> tuple[float, float]:
        """(alpha, beta) after the ablation switches: no pseudo neighbour = alpha 0, no noise = beta 0."""
        c = self.cfg
        return (c["alpha"] if c["pseudo"] else 0.0), (c["beta"] if c["noise"] else 0.0)

    def noise_generator(self, device: torch.device) -> torch.Generator:
        """This step's generator on this rank; advances the step counter (a buffer: resume continues it)."""
        g = torch.Generator(device=device)
        step = self.counter("noise_step")
        g.manual_seed(mix_seed(self.counter("noise_seed"), step, dist.rank()))
        self.set_counter("noise_step", step + 1)
        return g

    def forward(self, batch):
        x1, x2 = batch.views[:2]
        z1, z2 = self.project(x1), self.project(x2)
        t1, t2 = self.target(x1), self.target(x2)
        alpha, beta = self.alpha_beta()
        support = self.support.active()
        g = self.noise_generator(z1.device) if beta > 0 else None
        st = straight_through_scale(self.cfg)
        q1, q2 = (pseudo_neighbour(z, support, alpha, beta, g, st) for z in (z1, z2))
        # targets carry no gradient: one no-grad collective for both views; rank r's rows start at r * B
        keys = dist.gather_no_grad(torch.cat([t1, t2], dim=1))
        k1, k2 = keys.split(t1.shape[1], dim=1)
        positive = torch.arange(z1.shape[0], device=z1.device) + dist.rank() * z1.shape[0]
        t = self.cfg["temperature"]
        loss = (info_nce_batch(q1, k2, positive, t) + info_nce_batch(q2, k1, positive, t)) / 2   # eq. 9, averaged
        self._pending = z1.detach()  # pushed after the step: a batch must not find itself as its own neighbour
        return {"loss": loss, "info_nce": loss}

    @torch.no_grad()
    def after_step(self, progress):
        if self._pending is not None:
            self.support.push(self._pending)
        self._pending = None
        self.update_targets(progress)  # eq. 6, constant lambda

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]
