"""The encoder artifact of a pretrain stage: backbone config + weights, read by evaluation and mining."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.models.backbones import build_backbone
from pipeline.params import DataError
from pipeline.utils import atomic_torch_save


def save_encoder(path: str | Path, backbone: nn.Module, backbone_cfg: dict, image_size: int, meta: dict,
                 heads: dict[str, nn.Module] | None = None) -> None:
    state = {"backbone_cfg": backbone_cfg, "image_size": image_size, "meta": meta,
             "backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
             "heads": {n: {k: v.detach().cpu() for k, v in h.state_dict().items()} for n, h in (heads or {}).items()}}
    atomic_torch_save(state, path)


def load_encoder(path: str | Path, map_location="cpu") -> tuple[nn.Module, dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: encoder missing (run its pretrain stage: dvc repro)")
    state = torch.load(path, map_location=map_location, weights_only=False)
    backbone = build_backbone(state["backbone_cfg"], state["image_size"])
    backbone.load_state_dict(state["backbone"])
    backbone.eval()
    return backbone, state
