"""Step-size controls (issue 26): the trainer's `loss_scale` scales the gradient it backpropagates, pNNCLR's
`straight_through: alpha` passes eq. 4's own gradient alpha I, and each method's effective-step facts say so."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.base import gradient_scale
from pipeline.methods.leoclr import LeOCLR
from pipeline.methods.mocov2 import MoCoV2
from pipeline.methods.nnclr import NNCLR
from pipeline.methods.pnnclr import PNNCLR, pseudo_neighbour
from pipeline.params import ParamError, validate
from pipeline.profile import resolve
from pipeline.train.trainer import train_step
from tests.close import close, gap
from tests.test_ddp import AUG, TinyNet

HEADS = {"proj_hidden": 8, "proj_dim": 5, "proj_layers": 2}
LEO = {**HEADS, "temperature": 0.2, "queue_size": 20, "momentum": 0.9, "variant": "momentum", "shuffle_bn": False}
PNN = {**HEADS, "temperature": 0.1, "support_size": 20, "momentum": 0.9, "alpha": 0.25, "beta": 0.1,
       "pseudo": True, "noise": True}


def views(k: int, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(views=[torch.randn(n, 3, 4, 4, generator=g) for _ in range(k)])


def step_grads(method, k_views: int) -> dict[str, torch.Tensor]:
    """One trainer step (train_step, as the trainer calls it) at lr 0: the gradients it backpropagated."""
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train_step(method, method, opt, scaler, views(k_views), None, 0.0, 0.5)
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def test_loss_scale_scales_the_backpropagated_gradient():
    """LeOCLR eq. 3 with loss_scale 0.5 (the mean of its two terms): every gradient is 0.5 x the sum's."""
    grads = {}
    for scale in (1.0, 0.5):
        torch.manual_seed(0)
        grads[scale] = step_grads(LeOCLR(TinyNet(), {**LEO, "loss_scale": scale}, AUG, 4), 3)
    assert grads[1.0].keys() == grads[0.5].keys() and grads[1.0]
    for name, g in grads[1.0].items():
        assert g.abs().max() > 0, name
        assert close(grads[0.5][name], 0.5 * g, rel=1e-5), (name, gap(grads[0.5][name], 0.5 * g))


def test_loss_scale_is_a_key_of_every_method_and_must_be_positive():
    p = validate(resolve("cpu"))
    assert p["runs"]["leoclr-mean"]["overrides"]["loss_scale"] == 0.5
    raw = resolve("cpu")
    raw["methods"]["simclr"]["loss_scale"] = 0.0
    with pytest.raises(ParamError, match="methods.simclr.loss_scale"):
        validate(raw)


def test_straight_through_alpha_is_eq4s_jacobian_by_hand():
    """Eq. 4: z'' = z^ + (1 - alpha)(NN(z^) - z^) = alpha z^ + (1 - alpha) NN(z^), NN(z^) a support row (a constant),
    so d z''/d z^ = alpha I; with z^ = z / ||z||, dL/dz = alpha (w - (w . z^) z^) / ||z|| for L = sum(w * z'')."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64).float().requires_grad_(True)
    support = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    w = torch.randn(4, 5, generator=g)
    alpha = 0.25
    for mode, scale in (("identity", 1.0), ("alpha", alpha)):
        z.grad = None
        out = pseudo_neighbour(z, support, alpha, 0.0, st_scale=scale)
        (w * out).sum().backward()
        zd = z.detach()
        zn = zd / zd.norm(dim=1, keepdim=True)
        nn_rows = support[(zn @ support.t()).argmax(dim=1)]
        assert close(out.detach(), alpha * zn + (1 - alpha) * nn_rows), mode        # the value: eq. 4
        want = scale * (w - (w * zn).sum(1, keepdim=True) * zn) / zd.norm(dim=1, keepdim=True)
        assert close(z.grad, want, rel=1e-5), (mode, gap(z.grad, want))


def test_pnnclr_straight_through_alpha_scales_every_encoder_gradient_by_alpha():
    """The loss reaches the online network only through the straight-through positives (the targets carry no
    gradient), so `straight_through: alpha` takes alpha x the identity's gradient everywhere."""
    grads = {}
    for mode in ("identity", "alpha"):
        torch.manual_seed(0)
        m = PNNCLR(TinyNet(), {**PNN, "straight_through": mode}, AUG, 4)
        m.support.push(torch.randn(12, 5))   # a filled support set: real neighbours
        grads[mode] = step_grads(m, 2)
    assert grads["identity"].keys() == grads["alpha"].keys() and grads["identity"]
    for name, g in grads["identity"].items():
        assert close(grads["alpha"][name], PNN["alpha"] * g, rel=1e-5), (name, gap(grads["alpha"][name], 0.25 * g))


@pytest.mark.parametrize("cls, cfg, want", [
    (MoCoV2, {}, {"loss_terms": 1, "reduction": "mean", "keys_per_image": 1, "straight_through_scale": None}),
    (MoCoV2, {"symmetric": True}, {"loss_terms": 2, "reduction": "mean", "keys_per_image": 2}),
    (LeOCLR, {}, {"loss_terms": 2, "reduction": "sum", "keys_per_image": 2, "loss_scale": 1.0}),
    (LeOCLR, {"variant": "end_to_end"}, {"keys_per_image": 0}),
    (LeOCLR, {"loss_scale": 0.5}, {"loss_scale": 0.5}),
    (NNCLR, {}, {"loss_terms": 2, "reduction": "mean", "keys_per_image": 1, "straight_through_scale": None}),
    (PNNCLR, {}, {"loss_terms": 2, "reduction": "mean", "straight_through_scale": 1.0}),
    (PNNCLR, {"straight_through": "alpha", "alpha": 0.3}, {"straight_through_scale": 0.3}),
    (PNNCLR, {"straight_through": "alpha", "pseudo": False}, {"straight_through_scale": 0.0}),
])
def test_step_facts_follow_each_papers_loss(cls, cfg, want):
    facts = cls.step_facts(cfg)
    assert {k: facts[k] for k in want} == want


def test_gradient_scale_of_leoclr_is_twice_mocov2s_and_its_mean_control_matches():
    assert gradient_scale(LeOCLR.step_facts({})) == 2 * gradient_scale(MoCoV2.step_facts({})) == 2.0
    assert gradient_scale(LeOCLR.step_facts({"loss_scale": 0.5})) == gradient_scale(MoCoV2.step_facts({}))
    assert gradient_scale(PNNCLR.step_facts({"straight_through": "alpha"})) == 0.25
