"""Projection and prediction heads (MLPs, with or without BatchNorm), shared by every method."""
from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden: int, out: int, layers: int = 2, last_bn: bool = False, bn: bool = True) -> nn.Sequential:
    """`layers` Linear layers; Linear-BN-ReLU between them (BYOL / SimSiam / Barlow Twins style), or with `bn` off
    Linear-ReLU (MoCo-v2 §2's head: its code's nn.Linear with bias, ReLU, nn.Linear)."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += ([nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden)] if bn else [nn.Linear(dim, hidden)])
        mods.append(nn.ReLU(inplace=True))
        dim = hidden
    mods.append(nn.Linear(dim, out, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*mods)
