"""The encoder artifact of a pretrain stage, read by evaluation, mining and the kNN monitor, and by other code.

Two files (`pipeline.paths.encoder` / `encoder_config`):
  * `encoder.safetensors`: the backbone's tensors under `backbone.<key>`, where <key> is the timm module's own
    state-dict key (the timm ResNet / VisionTransformer inside `pipeline.models.backbones`), and each exported
    head's under `heads.<head>.<key>`. No pickle: loading runs no code.
  * `encoder.json`: what rebuilds it (the backbone block and image size), how to feed it (mean, std), the timm
    model name and kwargs that build the same network (`timm_spec`), and the run's settings (method, run, seed,
    epochs, steps); sorted keys, settings only, so a bit-identical run gives byte-identical files.
`python -m pipeline.export <run>` turns the pair into a folder plain timm loads (config.json + model.safetensors).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import DataError
from pipeline.models.backbones import VIT_DIMS, build_backbone
from pipeline.models.heads import mlp
from pipeline.paths import encoder_config_of
from pipeline.utils import atomic_write_bytes, atomic_write_text

FORMAT = "sslpipe.encoder/1"
BACKBONE_PREFIX, HEADS_PREFIX = "backbone.", "heads."
# the timm module inside a pipeline backbone (`ResNetBackbone.net`, `ViTBackbone.net`): stripped for timm keys
NET_PREFIX = "net."
# what a run measures about its machine: belongs in the metrics JSON, never in a DVC output (a retrain would
# change the encoder's hash and rerun everything downstream)
VOLATILE_META = ("wall_time_s", "views_per_s", "peak_mem_mib", "device", "host", "hostname", "path")
TIMM_VIT = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}


def resolved_backbone_cfg(cfg: dict, image_size: int) -> dict:
    """The backbone block with the defaults `build_backbone` applies written out (width 64, the CIFAR stem at
    <= 64 px, full ViT depth), so a reader needs no pipeline code to know the architecture."""
    cfg = dict(cfg)
    if cfg["arch"].startswith("resnet"):
        cfg.setdefault("width", 64)
        cfg.setdefault("cifar_stem", image_size <= 64)
    else:
        cfg.setdefault("depth", VIT_DIMS[cfg["arch"]][1])
    return cfg


def timm_spec(cfg: dict, image_size: int) -> dict:
    """How plain timm builds this backbone: `timm.create_model(model_name, **kwargs)`.

    `native` is true when that alone gives the same module (the standard ResNet-18/50 stem at width 64, every
    ViT): its weights then load with `pretrained_cfg_overlay=dict(file=...)`. A ResNet with the CIFAR stem or
    another width is timm's ResNet with its stem replaced: `stem` lists the replacements (see the README)."""
    cfg = resolved_backbone_cfg(cfg, image_size)
    arch = cfg["arch"]
    if arch.startswith("vit"):
        dim, _, heads = VIT_DIMS[arch]
        kwargs = {"img_size": image_size, "patch_size": cfg["patch_size"], "embed_dim": dim, "depth": cfg["depth"],
                  "num_heads": heads, "num_classes": 0, "dynamic_img_size": True}
        return {"model_name": TIMM_VIT[arch], "kwargs": kwargs, "native": True, "stem": None}
    w = cfg["width"]
    if w == 64 and not cfg["cifar_stem"]:
        return {"model_name": arch, "kwargs": {"num_classes": 0}, "native": True, "stem": None}
    # timm sizes layer1 from a deep stem of width/2; the pipeline then swaps in a single conv (see backbones.py)
    kwargs = {"num_classes": 0, "channels": [w, 2 * w, 4 * w, 8 * w], "stem_type": "deep", "stem_width": w // 2}
    conv = ({"in_channels": 3, "out_channels": w, "kernel_size": 3, "stride": 1, "padding": 1, "bias": False}
            if cfg["cifar_stem"] else
            {"in_channels": 3, "out_channels": w, "kernel_size": 7, "stride": 2, "padding": 3, "bias": False})
    stem = {"conv1": ["Conv2d", conv], "bn1": ["BatchNorm2d", {"num_features": w}]}
    if cfg["cifar_stem"]:
        stem["maxpool"] = ["Identity", {}]
    return {"model_name": arch, "kwargs": kwargs, "native": False, "stem": stem}


def build_timm(config: dict) -> nn.Module:
    """The encoder's backbone as a plain timm module (no pipeline class), from its config: create_model with the
    recorded kwargs, then the recorded stem replacements (torch.nn modules by name). Weights not loaded."""
    import timm

    spec = config["timm"]
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    for attr, (cls, kwargs) in (spec.get("stem") or {}).items():   # {attr: [torch.nn class, kwargs]}
        setattr(model, attr, getattr(nn, cls)(**kwargs))
    return model


def encoder_config(backbone_cfg: dict, image_size: int, meta: dict, preprocess: dict | None = None,
                   heads: list[str] = ()) -> dict:
    pre = preprocess or {}
    return {
        "format": FORMAT, "weights": "encoder.safetensors",
        "run": meta.get("run"), "method": meta.get("method"), "seed": meta.get("seed"), "meta": meta,
        "backbone": resolved_backbone_cfg(backbone_cfg, image_size), "image_size": image_size,
        "mean": pre.get("mean"), "std": pre.get("std"),
        "timm": timm_spec(backbone_cfg, image_size), "heads": sorted(heads),
    }


def _tensors(module: nn.Module, prefix: str, strip: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in module.state_dict().items():
        k = k[len(strip):] if strip and k.startswith(strip) else k
        out[prefix + k] = v.detach().cpu().contiguous().clone()   # clone: safetensors refuses shared storage
    return out


def save_encoder(path: str | Path, backbone: nn.Module, backbone_cfg: dict, image_size: int, meta: dict,
                 heads: dict[str, nn.Module] | None = None, preprocess: dict | None = None) -> None:
    """Write the weights (`path`, .safetensors) and the config beside it; a bit-identical run gives byte-identical
    files. `meta` holds settings only (run, method, seed, steps, ...): timings, host names or absolute paths are
    refused. `preprocess`: {"mean", "std"} of the images the encoder was trained on."""
    from safetensors.torch import save

    volatile = [k for k in meta if k in VOLATILE_META or (isinstance(meta[k], str) and meta[k].startswith("/"))]
    if volatile:
        raise ValueError(f"save_encoder: meta must not hold machine-dependent values: {', '.join(volatile)}")
    path = Path(path)
    tensors = _tensors(backbone, BACKBONE_PREFIX, strip=NET_PREFIX)
    for name, head in (heads or {}).items():
        tensors.update(_tensors(head, f"{HEADS_PREFIX}{name}."))
    config = encoder_config(backbone_cfg, image_size, meta, preprocess, list(heads or {}))
    config["weights"] = path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(save(tensors, metadata={"format": "pt"}), path)
    atomic_write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoder_config_of(path))


def read_encoder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an encoder; safe loading only (safetensors; a legacy .pt with weights_only=True)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: encoder missing (run its pretrain stage: dvc repro)")
    if path.suffix == ".pt":
        return _read_legacy(path)
    from safetensors.torch import load_file

    cfg_path = encoder_config_of(path)
    if not cfg_path.exists():
        raise DataError(f"{cfg_path}: the encoder's config is missing (rerun its pretrain stage: dvc repro)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{cfg_path}: not valid JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise DataError(f"{cfg_path}: format {config.get('format')!r}, expected {FORMAT!r}")
    try:
        return config, load_file(str(path), device="cpu")
    except Exception as e:  # a truncated or foreign file: name it
        raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _read_legacy(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An `encoder.pt` of an older pipeline version (a dict of plain containers and tensors)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path}: not a loadable encoder ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    config = encoder_config(state["backbone_cfg"], state["image_size"], state.get("meta", {}),
                            heads=list(state.get("heads", {})))
    tensors = {BACKBONE_PREFIX + k.removeprefix(NET_PREFIX): v for k, v in state["backbone"].items()}
    for name, sd in state.get("heads", {}).items():
        tensors.update({f"{HEADS_PREFIX}{name}.{k}": v for k, v in sd.items()})
    return config, tensors


def split_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, dict]]:
    """(backbone state dict in timm keys, {head: state dict})."""
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    heads: dict[str, dict] = {}
    for k, v in tensors.items():
        if k.startswith(HEADS_PREFIX):
            name, key = k[len(HEADS_PREFIX):].split(".", 1)
            heads.setdefault(name, {})[key] = v
    return backbone, heads


def load_encoder(path: str | Path, map_location="cpu") -> tuple[nn.Module, dict]:
    """(backbone in eval mode, state): state holds `backbone_cfg`, `image_size`, `meta`, `heads` (state dicts)
    and the whole `config`."""
    path = Path(path)
    config, tensors = read_encoder(path)
    backbone_sd, heads = split_tensors(tensors)
    backbone = build_backbone(config["backbone"], config["image_size"])
    try:
        backbone.net.load_state_dict(backbone_sd)
    except RuntimeError as e:
        raise DataError(f"{path}: weights do not fit its config's backbone ({str(e).splitlines()[0]})") from None
    backbone.to(map_location).eval()
    state = {"backbone_cfg": config["backbone"], "image_size": config["image_size"], "meta": config.get("meta", {}),
             "heads": heads, "config": config}
    return backbone, state


def load_head(state: dict, name: str, path: str | Path = "encoder.safetensors") -> nn.Module:
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
