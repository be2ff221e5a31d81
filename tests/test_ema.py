"""One EMA mechanism (base.Method.update_targets over the declared momentum_pairs): after several steps every
target equals what the hand-written per-method updates it replaced gave, bit for bit."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.methods.byol import BYOL
from pipeline.methods.dino import DINO
from pipeline.methods.leoclr import LeOCLR
from pipeline.methods.mocov2 import MoCoV2
from pipeline.methods.pnnclr import PNNCLR
from tests.test_ddp import AUG, TinyNet

HEADS = {"proj_hidden": 8, "proj_dim": 5, "proj_layers": 2}


def cosine(base, p):
    return 1 - (1 - base) * (math.cos(math.pi * p) + 1) / 2


# method, cfg, the (online, target) attribute pairs the old after_step moved, the old coefficient
CASES = {
    "byol": (BYOL, {**HEADS, "pred_hidden": 7, "momentum": 0.9},
             [("backbone", "target_backbone"), ("projector", "target_projector")], lambda p: cosine(0.9, p)),
    "dino": (DINO, {"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4, "head_layers": 2, "momentum": 0.9},
             [("backbone", "teacher_backbone"), ("head", "teacher_head")], lambda p: cosine(0.9, p)),
    "pnnclr": (PNNCLR, {**HEADS, "support_size": 8, "momentum": 0.9},
               [("backbone", "target_backbone"), ("projector", "target_projector")], lambda p: 0.9),
    "mocov2": (MoCoV2, {**HEADS, "queue_size": 8, "momentum": 0.9},
               [("backbone", "key_backbone"), ("projector", "key_projector")], lambda p: 0.9),
    "leoclr": (LeOCLR, {**HEADS, "queue_size": 8, "momentum": 0.9},
               [("backbone", "key_backbone"), ("projector", "key_projector")], lambda p: 0.9),
}


def old_update(target, online, m):
    """The replaced formula: theta_t <- m theta_t + (1 - m) theta_o, with the same foreach kernels."""
    t, o = list(target), list(online)
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, o, alpha=1 - m)


@pytest.mark.parametrize("name", sorted(CASES))
def test_targets_after_steps_equal_the_old_formula(name):
    cls, cfg, pairs, momentum = CASES[name]
    torch.manual_seed(0)
    m = cls(TinyNet(), cfg, AUG, 4)
    assert [(getattr(m, a), getattr(m, b)) for a, b in pairs] == m.momentum_pairs()
    want = {b: [p.detach().clone() for p in getattr(m, b).parameters()] for _, b in pairs}
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        progress = step / 5
        with torch.no_grad():  # a stand-in optimizer step on the online modules
            for a, _ in pairs:
                for p in getattr(m, a).parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        m.after_step(progress)
        for a, b in pairs:
            old_update(want[b], [p.detach() for p in getattr(m, a).parameters()], momentum(progress))
    for _, b in pairs:
        assert all(torch.equal(p, w) for p, w in zip(getattr(m, b).parameters(), want[b])), b


def test_end_to_end_leoclr_has_no_target():
    m = LeOCLR(TinyNet(), {**HEADS, "queue_size": 8, "momentum": 0.9, "variant": "end_to_end"}, AUG, 4)
    assert m.momentum_pairs() == [] and not hasattr(m, "key_backbone")
    m.after_step(0.5)  # nothing to move, nothing to enqueue
