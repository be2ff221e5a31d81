"""Optimizer lr rules: each optimizer's batch scaling (the papers' recipes), `lr_scaling` overrides, and groups at
a fixed lr (SimSiam's predictor) that the per-step schedule leaves alone."""
from __future__ import annotations

import pytest
import torch

from pipeline.methods.simsiam import SimSiam
from pipeline.train.optim import build_optimizer, lr_at, peak_lr, set_lr
from tests.test_ddp import AUG, TinyNet


def train_cfg(optimizer, lr, batch, **over):
    return {"optimizer": optimizer, "lr": lr, "batch_size": batch, "weight_decay": 0.0, "momentum": 0.9, **over}


@pytest.mark.parametrize("optimizer, lr, batch, want", [
    ("sgd", 0.03, 512, 0.06),        # MoCo / SimSiam: lr x batch/256
    ("lars", 0.3, 128, 0.15),        # SimCLR / Barlow Twins / BYOL
    ("adamw", 0.0005, 512, 0.001),   # DINO §4: 0.0005 x batchsize/256
    ("adamw", 0.0005, 64, 0.000125),
    ("adam", 0.001, 512, 0.001),     # pNNCLR §4.1: Adam 1e-3, not scaled
])
def test_peak_lr_follows_each_optimizers_rule(optimizer, lr, batch, want):
    assert peak_lr(train_cfg(optimizer, lr, batch)) == pytest.approx(want)


def test_lr_scaling_overrides_the_rule():
    assert peak_lr(train_cfg("adamw", 0.0005, 512, lr_scaling="none")) == 0.0005
    assert peak_lr(train_cfg("adam", 0.001, 512, lr_scaling="linear")) == pytest.approx(0.002)
    assert peak_lr(train_cfg("sgd", 0.1, 512, lr_scaling="none")) == 0.1


def test_fixed_lr_groups_stay_at_the_peak_through_warmup_and_decay():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    cfg = train_cfg("sgd", 0.1, 512)
    opt = build_optimizer([{"params": [a]}, {"params": [b], "fixed_lr": True},
                           {"params": [c], "fixed_lr": True, "lr_scale": 0.5}], cfg)
    for step in (0, 5, 99):
        set_lr(opt, lr_at(step, 100, 10, 0.2, 0.0))
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, 100, 10, 0.2, 0.0))
        assert opt.param_groups[1]["lr"] == pytest.approx(0.2) and opt.param_groups[2]["lr"] == pytest.approx(0.1)


def test_simsiam_predictor_is_in_fixed_lr_groups_only():
    heads = {"proj_hidden": 8, "proj_dim": 8, "proj_layers": 2, "pred_hidden": 4}
    m = SimSiam(TinyNet(), heads, AUG, 4)
    groups = m.param_groups()
    pred = {id(p) for p in m.predictor.parameters()}
    fixed = [id(p) for g in groups if g.get("fixed_lr") for p in g["params"]]
    scheduled = [id(p) for g in groups if not g.get("fixed_lr") for p in g["params"]]
    assert sorted(fixed) == sorted(pred) and not pred & set(scheduled)
    assert len(fixed) + len(scheduled) == sum(1 for p in m.parameters() if p.requires_grad)
    # weight decay still only on the weights, in both halves
    assert all(p.ndim <= 1 for g in groups if g.get("weight_decay") == 0.0 for p in g["params"])
