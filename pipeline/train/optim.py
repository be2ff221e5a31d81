"""Optimizers (SGD, LARS, Adam, AdamW) and the per-step learning-rate schedule (linear warm-up + cosine)."""
from __future__ import annotations

import math

import torch


# How each optimizer's `lr` scales with the global batch when `lr_scaling` is not set, from the papers' recipes:
#   sgd, lars: linear, lr x batch/256 (Goyal et al. 2017; SimCLR App. B.1, MoCo / SimSiam §4 "lr x BatchSize/256",
#              BYOL App. C, Barlow Twins §4, GSSSL §4: the papers state their base lr at batch 256)
#   adamw:     linear, lr x batch/256 (DINO §4 "Implementation details": lr = 0.0005 x batchsize/256; PW-Self
#              trains with DINO's recipe)
#   adam:      none (pNNCLR §4.1: Adam at 1e-3, stated for its batch 64, not scaled)
# `lr_scaling: linear | none` in a train block overrides the rule for that run.
DEFAULT_LR_SCALING = {"sgd": "linear", "lars": "linear", "adamw": "linear", "adam": "none"}


def peak_lr(train: dict) -> float:
    """The run's peak lr: `lr` scaled by batch/256 when the run's rule (`lr_scaling`, else the optimizer's rule in
    DEFAULT_LR_SCALING) is linear."""
    rule = train.get("lr_scaling") or DEFAULT_LR_SCALING[train["optimizer"]]
    if rule == "linear":
        return train["lr"] * train["batch_size"] / 256
    return train["lr"]


def build_optimizer(groups: list[dict], train: dict) -> torch.optim.Optimizer:
    """Groups may carry `lr_scale` (a multiple of the scheduled lr) and `fixed_lr: True` (kept at the peak lr
    times its lr_scale for the whole run: no warm-up, no decay; SimSiam's predictor, §4.2 / Table 1)."""
    name, lr, wd = train["optimizer"], peak_lr(train), train["weight_decay"]
    groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
    for g in groups:
        if g.get("fixed_lr"):
            g["lr"] = lr * g.get("lr_scale", 1.0)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train["momentum"], weight_decay=wd)
    if name == "lars":
        from timm.optim import Lars

        # timm's LARS adapts only groups with weight decay (biases / norms have 0): the usual exclusion
        return Lars(groups, lr=lr, momentum=train["momentum"], weight_decay=wd, trust_coeff=0.001)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)


def clip_gradients(params, max_norm: float, mode: str = "global") -> None:
    """Clip gradients in place. `global`: torch's clip_grad_norm_, one norm over every gradient together.
    `per_param`: each parameter's gradient to norm `max_norm` on its own, g <- g * min(1, max_norm / (||g|| + 1e-6)),
    as DINO's code (utils.clip_gradients, `--clip_grad 3.0`) and the PW-Self authors' code built on it: over a whole
    ViT one global norm of 3.0 binds far harder than 3.0 per parameter. No host sync (a clamp, not a branch)."""
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    if mode != "per_param":
        raise ValueError(f"train.grad_clip_mode: expected global or per_param, got {mode!r}")
    for p in params:
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.detach().norm(2) + 1e-6)).clamp(max=1.0))


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then half-cosine down to `peak * min_ratio`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr (times each group's lr_scale) for every group but the `fixed_lr` ones."""
    for g in opt.param_groups:
        if not g.get("fixed_lr"):
            g["lr"] = lr * g.get("lr_scale", 1.0)


def cosine_ramp(start: float, end: float, progress: float) -> float:
    """Half-cosine from `start` (progress 0) to `end` (progress 1): DINO's weight-decay and momentum schedules."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def set_weight_decay(opt: torch.optim.Optimizer, wd: float) -> None:
    """Scheduled weight decay for the groups that have any (biases and norms stay at 0)."""
    for g in opt.param_groups:
        if g.get("weight_decay", 0.0) > 0 or g.get("scheduled_wd"):
            g["weight_decay"] = wd
            g["scheduled_wd"] = True
