"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation without labels (§3.1, Alg. 1): a student (backbone + DINO head) is trained to match
the output distribution of a teacher, its momentum copy (theta_t <- l theta_t + (1 - l) theta_s, l on a
cosine schedule from 0.996 to 1). Multi-crop (§3.1): 2 global crops go to teacher and student, n
smaller local crops to the student only; the loss (eq. 3) sums H(P_t(x), P_s(x')) over every teacher
global view x and every other student view x'. Collapse is avoided by centring (eq. 4: the centre C is
an EMA of the teacher's mean output over the *global* batch, all-reduced across ranks, so it is the
same on every rank) and sharpening (a low teacher temperature, warmed up linearly from 0.04).
As in the paper's released code, the last layer is frozen for the first epoch to stabilise training.
Stochastic depth (`drop_path`, default 0.1): the paper's code builds the ViT student with `drop_path_rate` 0.1
(main_dino.py `--drop_path_rate`, "stochastic depth rate") and the teacher without; its ResNet has none, so
the key acts on ViT backbones only. PW-Self inherits it (its code is DINO's).

Works on a ResNet (pooled features) and a timm ViT (CLS token). Token access is factored out
(`student_tokens` / `teacher_tokens` return (B, 1 + N, D) per view; a ResNet gives N = 0) and the head,
centring and cross-entropy are methods of their own, so a patch-level subclass (PW-Self) reuses them on
patch tokens. DINO evaluates the teacher: it is the exported encoder (`encoder_to_export`).
Each step also returns collapse diagnostics of the teacher's targets (`collapse_diagnostics`: entropy, distinct
argmax prototypes), which the trainer averages into the per-epoch curve.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.views import ViewSpec
from pipeline.losses.distillation import dino_loss, ema_center, teacher_probs
from pipeline.methods.base import Method, cosine_momentum, momentum_copy, temperature_param
from pipeline.methods.registry import register
from pipeline.schema import Bool, Float, Int, List, Range01
from pipeline import dist


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, W_k = g_k v_k / ||v_k|| (the DINO head's last
    layer). Written out rather than torch's weight_norm hook so deepcopy (teacher) and state_dict are plain.
    `fix_norm` (norm_last_layer in the paper's code) keeps g = 1: unit-norm prototypes, which that code
    notes is more stable (off can train better on small ViTs). g is 1-D, so the base param_groups()
    leaves it out of weight decay."""

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone()  # nn.Linear init, as the paper's code
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim), requires_grad=not fix_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1)).unsqueeze(1)
        return F.linear(x, w)


class DINOHead(nn.Module):
    """DINO projection head (§3.1 "Network architecture"): a `layers`-layer MLP (hidden 2048, GELU, no BN)
    to a `bottleneck`-d output, L2 normalisation, then a weight-normalised linear layer to K prototypes.
    `bn` adds BatchNorm after each hidden layer (the paper's code: `use_bn_in_head`): on a briefly trained
    ResNet the pooled features of different images are nearly parallel, and without it the centred teacher
    output stays uniform (loss pinned at log K): the CPU profile's ResNet DINO keeps it. The ViT runs leave it
    off (`head_bn: false`): DINO's ViT recipe has no BN in the head, and in PW-Self one BN pass would mix the
    CLS tokens with many times as many patch tokens."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256, layers: int = 3,
                 norm_last_layer: bool = True, bn: bool = False):
        super().__init__()
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(dim, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.GELU()]
            dim = hidden
        mods.append(nn.Linear(dim, bottleneck))
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


@torch.no_grad()
def collapse_diagnostics(p_teacher: torch.Tensor, kind: str, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The two faces of collapse (DINO §5.3, Fig. 7) for the teacher targets P_t (N, K) of the selected rows
    (all by default): `teacher_entropy_<kind>`, the mean entropy H(P_t) in nats (log K: uniform collapse; 0:
    one-hot targets), and `prototypes_<kind>`, how many distinct argmax prototypes the rows use (1: every
    row the same prototype). Over this rank's batch. Detached tensors, computed without a host sync (masked
    sums and a scatter, no boolean indexing or unique), so the trainer reads them with the loss."""
    sel = torch.ones(p_teacher.shape[0], dtype=torch.bool, device=p_teacher.device) if rows is None else rows
    entropy = torch.special.entr(p_teacher.float()).sum(dim=-1)
    k = p_teacher.shape[-1]
    top = torch.where(sel, p_teacher.argmax(dim=-1), k)  # unselected rows land in a spare bin k
    used = torch.zeros(k + 1, device=p_teacher.device).scatter_(0, top, 1.0)[:k]
    return {f"teacher_entropy_{kind}": (entropy * sel).sum() / sel.sum().clamp(min=1), f"prototypes_{kind}": used.sum()}


@register("dino")
class DINO(Method):
    PARAMS = {
        "out_dim": Int(1), "hidden_dim": Int(1), "bottleneck_dim": Int(1), "head_layers": Int(1),
        "head_bn": Bool(), "norm_last_layer": Bool(), "momentum": Float(0, 1), "student_temp": temperature_param(),
        "teacher_temp": temperature_param(), "warmup_teacher_temp": temperature_param(),
        "warmup_teacher_temp_epochs": Float(0), "center_momentum": Float(0, 1), "freeze_last_layer": Float(0),
        "global_scale": Range01(), "local_scale": Range01(), "n_local": Int(0), "local_size": Int(1),
        # per view kind: [global view 1, global view 2, local views] (the paper's asymmetric augmentation)
        "blur_p": List(Float(0, 1), 3), "solarize_p": List(Float(0, 1), 3), "drop_path": Float(0, 1),
    }
    DEFAULTS = {
        "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "head_layers": 3, "head_bn": False, "norm_last_layer": True,
        "momentum": 0.996, "student_temp": 0.1, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 0.0, "center_momentum": 0.9, "freeze_last_layer": 1.0,
        "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4], "n_local": 6, "local_size": 96,
        "blur_p": [1.0, 0.1, 0.5], "solarize_p": [0.0, 0.2, 0.0], "drop_path": 0.1,
    }
    N_GLOBAL = 2

    def __init__(self, backbone, cfg, augment, image_size):
        super().__init__(backbone, cfg, augment, image_size)
        c = self.cfg
        self.head = DINOHead(backbone.feat_dim, c["out_dim"], c["hidden_dim"], c["bottleneck_dim"], c["head_layers"],
                             c["norm_last_layer"], c["head_bn"])
        self.teacher_backbone = momentum_copy(self.backbone)   # copied before the student's drop path: none
        self.teacher_head = momentum_copy(self.head)
        if hasattr(self.backbone, "set_drop_path"):
            self.backbone.set_drop_path(c["drop_path"])
        self.register_buffer("center", torch.zeros(c["out_dim"]))

    # --- views -----------------------------------------------------------------------------------
    def views(self) -> list[ViewSpec]:
        """2 global crops at the training size, then n_local local crops at local_size (§3.1 multi-crop)."""
        c = self.cfg

        def spec(size, scale, kind):
            return ViewSpec.from_augment(self.augment, size, crop_scale=tuple(scale), blur_p=c["blur_p"][kind],
                                         solarize_p=c["solarize_p"][kind])

        global_views = [spec(self.image_size, c["global_scale"], k) for k in range(self.N_GLOBAL)]
        return global_views + [spec(c["local_size"], c["local_scale"], 2)] * c["n_local"]

    # --- encoders: reusable by patch-level subclasses ---------------------------------------------
    @staticmethod
    def _features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if hasattr(backbone, "tokens"):
            return backbone.tokens(x)
        return backbone(x).unsqueeze(1)  # a CNN has no patch tokens: its pooled feature plays the CLS token

    def _encode(self, backbone: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """One backbone pass per run of same-resolution views (the paper's MultiCropWrapper): fewer, larger
        passes, and a ResNet's BatchNorm normalises both global crops together, as in the paper's code."""
        out, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats = self._features(backbone, torch.cat(views[start:end]))
            out.extend(feats.split([v.shape[0] for v in views[start:end]]))
            start = end
        return out

    def student_tokens(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per view: (B, 1 + N, D), the CLS token (a ResNet's pooled feature) then N patch tokens."""
        return self._encode(self.backbone, views)

    @torch.no_grad()
    def teacher_tokens(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._encode(self.teacher_backbone, views)

    def project(self, head: nn.Module, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Apply a DINO head to a list of (B, ..., D) features in one pass; returns (B, ..., K) per item."""
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        logits = head(flat).split([f[..., 0].numel() for f in feats])
        return [z.reshape(*f.shape[:-1], z.shape[-1]) for z, f in zip(logits, feats)]

    # --- schedules, loss, centre ------------------------------------------------------------------
    def teacher_temp(self) -> float:
        """tau_t: linear warm-up from warmup_teacher_temp to teacher_temp over warmup_teacher_temp_epochs
        (the paper's implementation details: 0.04 -> 0.07 over 30 epochs), then constant. Continuous in the
        fractional epoch (the paper's code steps once per epoch)."""
        c = self.cfg
        w = c["warmup_teacher_temp_epochs"]
        if w > 0 and self.epoch < w:
            return c["warmup_teacher_temp"] + (c["teacher_temp"] - c["warmup_teacher_temp"]) * self.epoch / w
        return c["teacher_temp"]

    def dino_ce(self, teacher_logits: list[torch.Tensor], student_logits: list[torch.Tensor],
                center: torch.Tensor | None = None, tau_t: float | None = None,
                tau_s: float | None = None) -> torch.Tensor:
        """DINO eq. 3 with this run's centre and temperatures unless given."""
        return dino_loss(teacher_logits, student_logits, self.center if center is None else center,
                         self.teacher_temp() if tau_t is None else tau_t,
                         self.cfg["student_temp"] if tau_s is None else tau_s)

    @torch.no_grad()
    def update_center(self, center: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """Eq. 4 over the global batch: this rank's sum of teacher outputs and its row count are all-reduced
        together (any number of rows per rank, e.g. patch tokens), so every rank gets the same centre."""
        flat = teacher_logits.detach().float().reshape(-1, center.shape[-1])
        stats = torch.cat([flat.sum(dim=0), flat.new_full((1,), flat.shape[0])])
        dist.all_reduce_mean_(stats)
        center.copy_(ema_center(center, stats[:-1] / stats[-1], self.cfg["center_momentum"]))

    # --- the step ---------------------------------------------------------------------------------
    def forward(self, batch):
        views = batch.views
        student = self.project(self.head, [t[:, 0] for t in self.student_tokens(views)])
        with torch.no_grad():
            teacher = self.project(self.teacher_head, [t[:, 0] for t in self.teacher_tokens(views[:self.N_GLOBAL])])
        loss = self.dino_ce(teacher, student)
        # collapse diagnostics of the targets this loss used (the previous centre), then the centre moves
        diagnostics = collapse_diagnostics(teacher_probs(torch.cat(teacher), self.center, self.teacher_temp()), "cls")
        self.update_center(self.center, torch.cat(teacher))  # after its use: the loss saw the previous centre
        return {"loss": loss, "dino": loss, **diagnostics}

    def before_optimizer_step(self) -> None:
        """Freeze the last layer during the first `freeze_last_layer` epochs: dropping its gradients makes the
        optimizer skip it entirely (no update, no weight decay, no moment accumulation), as the paper's code."""
        if self.epoch < self.cfg["freeze_last_layer"]:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def momentum_pairs(self):
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def target_momentum(self, progress):
        """l on a cosine schedule from `momentum` to 1 (§3.1, "Teacher network")."""
        return cosine_momentum(self.cfg["momentum"], progress)

    def encoder_to_export(self):
        # the paper evaluates the teacher, which outperforms the student during training
        return self.teacher_backbone

    def heads_to_export(self):
        return {"head": self.teacher_head}
