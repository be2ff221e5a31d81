"""Encoders other code can load: safetensors + JSON config, safe loading, and a timm-loadable export.

Plain timm (no pipeline code) gives the pipeline's features to the bit: a standard ResNet-18 through
`pretrained_cfg_overlay=dict(file=...)`, the CPU profile's ViT-Tiny/8 depth 6 through `local-dir:`, and the CPU
profile's ResNet-18 w16 (CIFAR stem) through `create_model` with the recorded kwargs and stem (the README's lines).
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.export import export
from pipeline.models.backbones import build_backbone
from pipeline.models.encoder_io import load_encoder, load_head, save_encoder
from pipeline.models.heads import mlp

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def _trained_like(cfg: dict, size: int, seed: int = 0):
    """A backbone with non-trivial weights and BN statistics (a few train-mode forwards move them)."""
    torch.manual_seed(seed)
    b = build_backbone(cfg, size)
    b.train()
    with torch.no_grad():
        for _ in range(2):
            b(torch.randn(4, 3, size, size))
    return b.eval()


def _save(tmp_path, cfg, size, heads=None):
    b = _trained_like(cfg, size)
    enc = tmp_path / "models/run/encoder.safetensors"
    save_encoder(enc, b, cfg, size, meta={"run": "run", "method": "simclr", "seed": 3, "epochs": 1, "steps": 2},
                 heads=heads, preprocess={"mean": MEAN, "std": STD})
    return b, enc


def test_encoder_is_safetensors_plus_a_sorted_json_config(tmp_path):
    cfg = {"arch": "resnet18", "width": 16, "cifar_stem": True}
    head = mlp(128, 32, 8, layers=2)
    b, enc = _save(tmp_path, cfg, 32, heads={"projector": head})
    assert enc.read_bytes()[8:9] == b"{"                      # safetensors: 8-byte header length, then JSON
    text = enc.with_suffix(".json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert (config["run"], config["method"], config["seed"], config["image_size"]) == ("run", "simclr", 3, 32)
    assert config["mean"] == MEAN and config["std"] == STD and config["heads"] == ["projector"]
    assert config["backbone"] == cfg and config["timm"]["model_name"] == "resnet18"
    loaded, state = load_encoder(enc)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), b(x))
    assert torch.equal(load_head(state, "projector", enc).eval()(b(x)), head.eval()(b(x)))
    # byte-deterministic: the same weights give the same two files
    first = (enc.read_bytes(), enc.with_suffix(".json").read_bytes())
    _save(tmp_path, cfg, 32, heads={"projector": head})
    assert (enc.read_bytes(), enc.with_suffix(".json").read_bytes()) == first


def test_loading_never_unpickles(tmp_path, monkeypatch):
    """A legacy encoder.pt loads with weights_only=True only; safetensors never calls torch.load."""
    cfg = {"arch": "resnet18", "width": 8, "cifar_stem": True}
    b = _trained_like(cfg, 32)
    legacy = tmp_path / "encoder.pt"
    torch.save({"backbone_cfg": cfg, "image_size": 32, "meta": {"run": "x"}, "heads": {},
                "backbone": b.state_dict()}, legacy)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real(*a, **k))
    loaded, _ = load_encoder(legacy)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), b(x)) and calls == [True]
    _, enc = _save(tmp_path, cfg, 32)
    calls.clear()
    load_encoder(enc)
    assert calls == []


def test_plain_timm_loads_a_standard_resnet_to_the_bit(tmp_path):
    timm = pytest.importorskip("timm")
    cfg = {"arch": "resnet18", "width": 64, "cifar_stem": False}
    b, enc = _save(tmp_path, cfg, 64)
    out = export(enc, tmp_path / "export", crop_ratio=0.875)
    m = timm.create_model("resnet18", pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), b(x))
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["pretrained_cfg"]["mean"] == MEAN and cfg_json["pretrained_cfg"]["crop_pct"] == 0.875


def test_plain_timm_loads_the_cpu_vit_from_its_export_folder(tmp_path):
    timm = pytest.importorskip("timm")
    cfg = {"arch": "vit_tiny", "patch_size": 8, "depth": 6}   # profiles/cpu.yaml: vit_tiny_p8
    b, enc = _save(tmp_path, cfg, 32)
    out = export(enc, tmp_path / "export")
    m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), b(x))
    assert tuple(m.pretrained_cfg["mean"]) == tuple(MEAN)


def test_plain_timm_builds_the_cpu_resnet_with_its_cifar_stem(tmp_path):
    """The README's lines, verbatim in spirit: timm + torch.nn + safetensors, no pipeline import."""
    timm = pytest.importorskip("timm")
    import safetensors.torch as st

    cfg = {"arch": "resnet18", "width": 16, "cifar_stem": True}   # profiles/cpu.yaml: resnet18_w16
    b, enc = _save(tmp_path, cfg, 32)
    d = export(enc, tmp_path / "export")
    c = json.loads((d / "config.json").read_text())
    m = timm.create_model(c["architecture"], num_classes=0, **c["model_args"])
    for name, (cls, kw) in c["sslpipe"]["timm"]["stem"].items():
        setattr(m, name, getattr(torch.nn, cls)(**kw))
    m.load_state_dict(st.load_file(d / "model.safetensors"))
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), b(x))


def test_export_cli_names_a_missing_encoder(tmp_path, monkeypatch, capsys):
    from pipeline.export import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["nosuchrun"])
    assert "data/models/nosuchrun/encoder.safetensors: encoder missing" in capsys.readouterr().err
