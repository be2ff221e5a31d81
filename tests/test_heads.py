"""Projection heads: MoCo-v2's Linear-ReLU-Linear without BatchNorm (MoCo-v2 §2) beside the BN-ed MLPs, and the
exported head rebuilt from its weights either way (the mine stage encodes with MoCo-v2's projector)."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.methods.leoclr import LeOCLR
from pipeline.methods.mocov2 import MoCoV2
from pipeline.methods.simclr import SimCLR
from pipeline.models.encoder_io import load_head
from pipeline.models.heads import mlp
from tests.test_ddp import AUG, TinyNet

HEADS = {"proj_hidden": 8, "proj_dim": 5, "proj_layers": 2}


def kinds(head: nn.Module) -> list[str]:
    return [type(m).__name__ for m in head]


def test_mlp_without_bn_is_linear_relu_linear_with_biases():
    head = mlp(6, 8, 5, 2, bn=False)
    assert kinds(head) == ["Linear", "ReLU", "Linear"]
    assert head[0].bias is not None and head[2].bias is not None
    assert kinds(mlp(6, 8, 5, 2)) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_moco_family_heads_have_no_batchnorm_and_others_keep_it():
    for cls, extra in ((MoCoV2, {"queue_size": 8, "shuffle_bn": False}),
                       (LeOCLR, {"queue_size": 8, "shuffle_bn": False})):
        m = cls(TinyNet(), {**HEADS, **extra}, AUG, 4)
        assert kinds(m.projector) == ["Linear", "ReLU", "Linear"], cls.__name__
        assert kinds(m.key_projector) == ["Linear", "ReLU", "Linear"], cls.__name__
        with_bn = cls(TinyNet(), {**HEADS, **extra, "proj_bn": True}, AUG, 4)
        assert "BatchNorm1d" in kinds(with_bn.projector)
    assert "BatchNorm1d" in kinds(SimCLR(TinyNet(), {**HEADS, "temperature": 0.5}, AUG, 4).projector)


def test_an_exported_head_is_rebuilt_with_or_without_bn():
    torch.manual_seed(0)
    x = torch.randn(7, 6)
    for bn, last_bn in ((False, False), (True, False), (True, True)):
        head = mlp(6, 8, 5, 3, last_bn=last_bn, bn=bn).eval()
        rebuilt = load_head({"heads": {"projector": head.state_dict()}}, "projector")
        assert kinds(rebuilt) == kinds(head), (bn, last_bn)
        assert torch.allclose(rebuilt(x), head(x)), (bn, last_bn)
