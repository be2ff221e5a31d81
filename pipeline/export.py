"""`python -m pipeline.export <run>`: a pretrained encoder as a folder plain timm loads.

Writes `data/exports/<run>/` (`pipeline.paths.export_dir`; `--out` elsewhere):
  * `model.safetensors`: the backbone's state dict in timm's own keys (no `net.` prefix, no heads);
  * `config.json`: timm's hub layout (`architecture`, `num_classes`, `model_args`, `pretrained_cfg` with the
    input size, mean/std, eval crop), plus the pipeline's encoder config under `sslpipe`.
A standard backbone (ResNet-18/50 at width 64 with the ImageNet stem, every ViT) then loads with
`timm.create_model("local-dir:<folder>", pretrained=True)`, or
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"), **model_args)`.
A ResNet with the CIFAR stem (or another width) is timm's ResNet with its stem replaced: `config.json`'s
`sslpipe.timm.stem` lists the replacements, and `pipeline.models.encoder_io.build_timm` applies them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import paths
from pipeline.data.eval_view import DEFAULT_CROP_RATIO
from pipeline.errors import PipelineError
from pipeline.models.encoder_io import read_encoder, split_tensors
from pipeline.utils import atomic_write_bytes, atomic_write_text


def timm_config(config: dict, crop_ratio: float = DEFAULT_CROP_RATIO) -> dict:
    """timm's hub `config.json` for an encoder config (`crop_ratio`: the eval view's, evaluate.crop_ratio)."""
    spec, size = config["timm"], config["image_size"]
    model_args = {k: v for k, v in spec["kwargs"].items() if k != "num_classes"}
    pretrained_cfg = {
        "input_size": [3, size, size], "mean": config["mean"], "std": config["std"], "num_classes": 0,
        # the pipeline's eval view: shorter side to round(size / crop_ratio), centre crop (pipeline.data.eval_view)
        "crop_pct": crop_ratio, "crop_mode": "center", "interpolation": "bilinear",
    }
    return {"architecture": spec["model_name"], "num_classes": 0, "model_args": model_args,
            "pretrained_cfg": pretrained_cfg, "sslpipe": config}


def export(encoder: str | Path, out: str | Path, crop_ratio: float = DEFAULT_CROP_RATIO) -> Path:
    """Write `out/model.safetensors` + `out/config.json` for the encoder at `encoder`; returns `out`."""
    from safetensors.torch import save

    config, tensors = read_encoder(encoder)
    backbone, _ = split_tensors(tensors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(save(backbone, metadata={"format": "pt"}), out / "model.safetensors")
    atomic_write_text(json.dumps(timm_config(config, crop_ratio), indent=2, sort_keys=True) + "\n", out / "config.json")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run instance with a trained encoder (data/models/<run>/)")
    ap.add_argument("--out", default=None, help="output folder (default: data/exports/<run>)")
    ap.add_argument("--params", default="params.yaml", help="params file whose evaluate.crop_ratio is recorded")
    a = ap.parse_args(argv)
    try:
        crop = DEFAULT_CROP_RATIO
        if Path(a.params).exists():
            import yaml

            crop = (yaml.safe_load(Path(a.params).read_text()) or {}).get("evaluate", {}).get("crop_ratio", crop)
        out = export(paths.encoder(a.run), a.out or paths.export_dir(a.run), crop)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    cfg = json.loads((out / "config.json").read_text())
    how = (f'timm.create_model("local-dir:{out}", pretrained=True)' if cfg["sslpipe"]["timm"]["native"] else
           f'pipeline.models.encoder_io.build_timm(config["sslpipe"]) + load_state_dict (stem: {", ".join(cfg["sslpipe"]["timm"]["stem"])})')
    print(f"{out}: {cfg['architecture']} {cfg['model_args']}; load with {how}")


if __name__ == "__main__":
    main()
