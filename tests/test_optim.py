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


def _params_with_grads(*grads):
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    return ps


def test_per_param_clipping_clips_each_gradient_on_its_own_by_hand():
    """DINO's utils.clip_gradients: g <- g * 3 / (||g|| + 1e-6) where that is < 1, per parameter. Grads of norm 5
    (3-4-0) and 1: the first becomes (1.8, 2.4, 0) x 5 / (5 + 1e-6), the second stays; one global norm of
    sqrt(26) would have scaled both by 3 / sqrt(26)."""
    from pipeline.train.optim import clip_gradients

    big, small = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.6, 0.8])
    ps = _params_with_grads(big, small)
    clip_gradients(ps, 3.0, "per_param")
    assert torch.allclose(ps[0].grad, torch.tensor([1.8, 2.4, 0.0]) * 5 / (5 + 1e-6), rtol=1e-6)
    assert torch.equal(ps[1].grad, small)
    ps = _params_with_grads(big, small)
    clip_gradients(ps, 3.0, "global")
    k = 3.0 / 26 ** 0.5
    assert torch.allclose(ps[0].grad, big * k, rtol=1e-5) and torch.allclose(ps[1].grad, small * k, rtol=1e-5)


def test_per_param_clipping_skips_parameters_without_gradient_and_rejects_a_bad_mode():
    from pipeline.train.optim import clip_gradients

    p, q = _params_with_grads(torch.tensor([30.0, 40.0]))[0], torch.nn.Parameter(torch.ones(2))
    clip_gradients([p, q], 3.0, "per_param")
    assert q.grad is None and abs(float(p.grad.norm()) - 3.0) < 1e-5
    with pytest.raises(ValueError, match="grad_clip_mode"):
        clip_gradients([p], 3.0, "layerwise")


def test_dino_and_pwself_runs_clip_per_parameter():
    from pipeline.params import method_config, validate
    from pipeline.profile import resolve

    for profile, runs in (("cpu", ("dino", "dino-vit", "pwself")), ("gpu-resnet18", ("dino",)),
                          ("imagenet100", ("dino-vit", "pwself")), ("cifar10-vit", ("dino-vit", "pwself"))):
        p = validate(resolve(profile))
        for run in runs:
            train = method_config(p, run)[2]
            assert train["grad_clip"] == 3.0 and train["grad_clip_mode"] == "per_param", (profile, run)
