"""The method interface the trainer drives. A method file holds only what makes the method different.

A method is an nn.Module owning its backbone, heads, momentum encoders and memory (queues, support
sets) as registered buffers, so one state_dict checkpoints all of it. The trainer calls:
  views()          -> the ViewSpecs the loader must produce for every image
  forward(batch)   -> {"loss": total, <term>: value, ...} (runs inside DDP's forward)
  after_step(p)    -> momentum / EMA updates, with p = training progress in [0, 1]: a method declares its
                      (online, target) pairs in `momentum_pairs()` and its coefficient in `target_momentum(p)`,
                      and `update_targets(p)` moves them all (one EMA mechanism for MoCo, BYOL, DINO, pNNCLR)
  param_groups()   -> what the optimizer trains (momentum encoders excluded)
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pipeline.data.views import ViewSpec
from pipeline.methods.memory import KeyQueue
from pipeline.methods.shuffle_bn import shuffled_encode
from pipeline.models.heads import mlp
from pipeline.schema import Bool, Float, Int, List, Validator


class Method(nn.Module):
    NAME = "?"
    PARAMS: dict[str, Validator] = {}
    DEFAULTS: dict = {}
    # the loader's normalisation of the views, (mean, std), set by the trainer: for methods that augment
    # view tensors in pixel space (patch-level augmentation); None = views in [0, 1]
    pixel_norm: tuple | None = None
    # What sets one step's size besides the lr (`step_facts`; tests/test_beside_pairs.py compares them across a
    # pair): the loss's terms and whether they are summed or averaged, and the embeddings each image adds to a
    # memory (queue / support set) per step. Each method file states its own, from its paper's loss.
    LOSS_TERMS = 1
    LOSS_REDUCTION = "mean"
    KEYS_PER_IMAGE = 0
    # whether `train.sync_bn` may turn its BatchNorms into SyncBatchNorm under DDP (the MoCo family keeps BN per GPU)
    SYNC_BN = True

    def __init__(self, backbone: nn.Module, cfg: dict, augment: dict, image_size: int):
        super().__init__()
        self.backbone = backbone
        self.cfg = {**self.DEFAULTS, **cfg}
        # a method's own `augment` keys (e.g. SimCLR's crop and jitter beside MoCo-v2's) over the shared section
        self.augment = {**augment, **self.cfg.get("augment", {})}
        self.image_size = image_size
        # `loss_scale` (every method; params.METHOD_KEYS): the trainer backpropagates loss_scale x loss, e.g. 0.5 =
        # LeOCLR's eq. 3 as the mean of its two terms, a step-size control beside MoCo-v2's one term
        self.loss_scale = float(self.cfg.get("loss_scale", 1.0))
        self.progress, self.epoch = 0.0, 0.0

    @classmethod
    def step_facts(cls, cfg: dict) -> dict:
        """The effective-step facts of this method under block `cfg` (no module is built): `loss_terms` and their
        `reduction` (sum | mean), the trainer's `loss_scale`, `straight_through_scale` (the gradient a
        straight-through estimate passes, None where there is none) and `keys_per_image` enqueued per step."""
        c = {**cls.DEFAULTS, **cfg}
        return {"loss_terms": cls.LOSS_TERMS, "reduction": cls.LOSS_REDUCTION, "loss_scale": c.get("loss_scale", 1.0),
                "straight_through_scale": None, "keys_per_image": cls.KEYS_PER_IMAGE}

    def views(self) -> list[ViewSpec]:
        """Two augmented views of the whole image (SimCLR-style); with per-view `blur_p` / `solarize_p` lists in
        the method's block (`two_view_params`), BYOL's asymmetric pair. Methods with other views override."""
        c = self.cfg
        if "blur_p" not in c:
            v = ViewSpec.from_augment(self.augment, self.image_size)
            return [v, v]
        return [ViewSpec.from_augment(self.augment, self.image_size, blur_p=c["blur_p"][i], solarize_p=c["solarize_p"][i])
                for i in range(2)]

    def forward(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_progress(self, progress: float, epoch: float) -> None:
        """Called before each step: fraction of training done, and epochs done (fractional), for schedules
        that live in the method (teacher temperature, last-layer freezing)."""
        self.progress, self.epoch = progress, epoch

    def before_optimizer_step(self) -> None:
        """After backward, before the optimizer: e.g. cancel gradients of a frozen layer."""

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        self.update_targets(progress)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The (online, target) module pairs that follow their online module by EMA; none by default."""
        return []

    def target_momentum(self, progress: float) -> float:
        """The EMA coefficient at `progress`: constant `momentum` (MoCo eq. 2); BYOL / DINO override with
        their cosine schedule."""
        return self.cfg["momentum"]

    @torch.no_grad()
    def update_targets(self, progress: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_o for every declared pair, m = target_momentum(progress)."""
        pairs = self.momentum_pairs()
        if pairs:
            m = self.target_momentum(progress)
            for online, target in pairs:
                ema_update(target, online, m)

    def param_groups(self) -> list[dict]:
        """Weights get weight decay; biases and norm parameters do not (LARS also skips adaptation)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]

    def encoder_to_export(self) -> nn.Module:
        """The backbone that evaluation and mining use (self-distillation methods export the teacher)."""
        return self.backbone

    def heads_to_export(self) -> dict[str, nn.Module]:
        """Heads saved with the encoder artifact (e.g. a projector that mining may encode with)."""
        return {}


def gradient_scale(facts: dict) -> float:
    """How many times one term's gradient a step takes (up to the terms' alignment): summed terms add up, averaged
    ones do not; times the loss scale and any straight-through scale."""
    terms = facts["loss_terms"] if facts["reduction"] == "sum" else 1
    st = facts["straight_through_scale"]
    return terms * facts["loss_scale"] * (1.0 if st is None else st)


class ProjectorMethod(Method):
    """A method whose encoder is backbone + projection MLP (exported with the encoder, e.g. for mining).
    `proj_bn` (projector_params) switches BatchNorm between its layers; PROJ_BN is the method's default."""

    PROJ_LAST_BN = False
    PROJ_BN = True

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        self.projector = build_projector(self, last_bn=self.PROJ_LAST_BN)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def heads_to_export(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}


class MomentumContrast(ProjectorMethod):
    """MoCo's machinery (He et al. 2020, §3.2), shared by MoCo-v2 and LeOCLR: a key encoder that is a momentum
    copy of backbone + projector, theta_k <- m theta_k + (1 - m) theta_q (MoCo eq. 2), and a FIFO queue of past
    keys as negatives. `forward` leaves the keys to enqueue in `_pending_keys`; `after_step` pushes them (the
    queue gathers them from every rank in rank order, so it is identical on all ranks) and then moves the key
    encoder. Both are modules / buffers, so one state_dict checkpoints them. Needs `queue_size`, `momentum`.
    With `shuffle_bn` (MoCo §3.3) the key encoder normalises shuffled sub-batches (pipeline/methods/shuffle_bn.py).
    Projection head: MoCo-v2's "2-layer MLP head (hidden layer 2048-d, with ReLU)" (MoCo-v2 §2; its code:
    Linear-ReLU-Linear), no BatchNorm by default (`proj_bn: true` adds it)."""

    PROJ_BN = False
    KEYS_PER_IMAGE = 1

    @classmethod
    def step_facts(cls, cfg):
        """MoCo-v2: one InfoNCE term, one key per image; `symmetric` averages a second term and enqueues its keys."""
        facts = super().step_facts(cfg)
        if {**cls.DEFAULTS, **cfg}.get("symmetric"):
            facts.update(loss_terms=2, keys_per_image=2)
        return facts

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        self._pending_keys: list[torch.Tensor] = []
        self._key_calls = 0  # key() calls in this step: each draws its own Shuffle-BN permutation
        if self.uses_key_encoder():
            self.key_backbone = momentum_copy(self.backbone)
            self.key_projector = momentum_copy(self.projector)
            self.queue = KeyQueue(self.cfg["queue_size"], self.cfg["proj_dim"])

    def uses_key_encoder(self) -> bool:
        """False for a variant trained end to end (LeOCLR, Table 5): no key encoder, no queue."""
        return True

    def set_progress(self, progress, epoch):
        super().set_progress(progress, epoch)
        self._key_calls = 0

    def _key_encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.key_backbone(x))

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.get("shuffle_bn", False):
            return self._key_encode(x)
        # the permutation seed: this step (progress is the same on every rank and after a resume) and call
        seed = round(self.progress * 2 ** 30) * 16 + self._key_calls
        self._key_calls += 1
        return shuffled_encode(self._key_encode, x, self.cfg["shuffle_bn_groups"], seed,
                               modules=(self.key_backbone, self.key_projector))

    def momentum_pairs(self):
        if not self.uses_key_encoder():
            return []
        return [(self.backbone, self.key_backbone), (self.projector, self.key_projector)]

    @torch.no_grad()
    def after_step(self, progress):
        if self.uses_key_encoder():
            for k in self._pending_keys:  # enqueued after backward: the loss's graph holds the current queue
                self.queue.push(k)
            self._pending_keys = []
        self.update_targets(progress)


def two_view_params() -> dict[str, Validator]:
    """Per-view blur / solarisation probabilities (BYOL's asymmetric augmentation, its Table 6)."""
    return {"blur_p": List(Float(0, 1), 2), "solarize_p": List(Float(0, 1), 2)}


def projector_params() -> dict[str, Validator]:
    return {"proj_hidden": Int(1), "proj_dim": Int(1), "proj_layers": Int(1), "proj_bn": Bool()}


def build_projector(method: Method, last_bn: bool = False) -> nn.Module:
    c = method.cfg
    return mlp(method.backbone.feat_dim, c["proj_hidden"], c["proj_dim"], c.get("proj_layers", 2), last_bn=last_bn,
               bn=c.get("proj_bn", method.PROJ_BN))


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy for a momentum (EMA) encoder: trained only by `ema_update`."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, m: float) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_o (MoCo eq. 2; BYOL's target update). Parameters only:
    the target runs in train mode and keeps its own BatchNorm statistics, as in MoCo."""
    t_params = [p for p in target.parameters()]
    o_params = [p for p in online.parameters()]
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, o_params, alpha=1 - m)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL/DINO schedule: m = 1 - (1 - base) * (cos(pi * progress) + 1) / 2, from base to 1."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def temperature_param() -> Validator:
    return Float(0, open_min=True)
