"""The encoder artifact of a pretrain stage: backbone config + weights, read by evaluation and mining."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.models.backbones import build_backbone
from pipeline.models.heads import mlp
from pipeline.errors import DataError
from pipeline.utils import atomic_torch_save


# what a run measures about its machine: belongs in the metrics JSON, never in a DVC output (a retrain would
# change the encoder's hash and rerun everything downstream)
VOLATILE_META = ("wall_time_s", "views_per_s", "peak_mem_mib", "device", "host", "hostname", "path")


def save_encoder(path: str | Path, backbone: nn.Module, backbone_cfg: dict, image_size: int, meta: dict,
                 heads: dict[str, nn.Module] | None = None) -> None:
    """Write the encoder artifact; a bit-identical training run gives a byte-identical file.

    `meta` holds settings only (run, method, steps, ...): timings, host names or absolute paths are refused."""
    volatile = [k for k in meta if k in VOLATILE_META or (isinstance(meta[k], str) and meta[k].startswith("/"))]
    if volatile:
        raise ValueError(f"save_encoder: meta must not hold machine-dependent values: {', '.join(volatile)}")
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


def load_head(state: dict, name: str, path: str | Path = "encoder.pt") -> nn.Module:
    """An exported MLP head (e.g. MoCo-v2's projector) rebuilt from its weights alone: layer sizes are read off
    the Linear weights, a BatchNorm after the last Linear from its running statistics (heads.mlp's layout)."""
    sd = state.get("heads", {}).get(name)
    if sd is None:
        have = ", ".join(state.get("heads", {})) or "none"
        raise DataError(f"{path}: exports no {name!r} head (exported heads: {have})")
    linears = sorted({int(k.split(".")[0]) for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2})
    if not linears:
        raise DataError(f"{path}: head {name!r} has no Linear layer")
    shapes = [tuple(sd[f"{i}.weight"].shape) for i in linears]  # (out, in)
    in_dim, hidden, out = shapes[0][1], shapes[0][0], shapes[-1][0]
    last_bn = f"{linears[-1] + 1}.running_mean" in sd
    bn = len(linears) < 2 or f"{linears[0] + 1}.running_mean" in sd   # a MoCo-v2 head has none between its layers
    head = mlp(in_dim, hidden, out, layers=len(linears), last_bn=last_bn, bn=bn)
    try:
        head.load_state_dict(sd)
    except RuntimeError as e:
        raise DataError(f"{path}: head {name!r} is not an MLP of pipeline.models.heads ({str(e).splitlines()[0]})") from None
    return head.eval()
