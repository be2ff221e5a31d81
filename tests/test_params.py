"""Params: validated before compute, one-line errors naming the key; profiles render to valid params."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline.params import ParamError, load, validate
from pipeline.profile import PROFILES, render, resolve
from tests.conftest import ROOT


def raw_cpu():
    return resolve("cpu")


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["train"].update(batch_size=-3), "train.batch_size: expected an integer >= 1, got -3"),
    (lambda p: p["train"].update(optimiser="sgd"), "train.optimiser: unknown key"),
    (lambda p: p["train"].update(optimizer="rmsprop"), "train.optimizer: expected one of ['sgd', 'lars', 'adam', 'adamw'], got 'rmsprop'"),
    (lambda p: p["methods"]["simclr"].update(temperature=0), "methods.simclr.temperature: expected a number > 0"),
    (lambda p: p["methods"]["mocov2"].update(queue=5), "methods.mocov2.queue: unknown key"),
    (lambda p: p["runs"]["simclr"].update(backbone="resnet99"), "runs.simclr.backbone: 'resnet99' is not defined under backbones"),
    (lambda p: p["runs"].update(x={"method": "nope", "backbone": "resnet18_w16"}), "runs.x.method: 'nope' has no block under methods"),
    (lambda p: p["methods"].update(nope={}), "methods.nope: unknown method 'nope'"),
    (lambda p: p["augment"].update(crop_scale=[0.9, 0.2]), "augment.crop_scale: expected [lo, hi] with lo <= hi"),
    (lambda p: p["dataset"].update(source="mnist"), "dataset.source: expected one of"),
    (lambda p: p["evaluate"].pop("knn_k"), "evaluate.knn_k: missing"),
    (lambda p: p["methods"]["simclr"].update(train={"lr": "fast"}), "methods.simclr.train.lr: expected a number"),
    # issue 26: step-size controls, per-method views, clipping mode
    (lambda p: p["report"]["controls"].update(nope="leoclr"), "report.controls.nope: not a run under runs or pair_runs"),
    (lambda p: p["report"]["controls"].update({"leoclr-mean": "simsiam"}),
     "report.controls.leoclr-mean: 'simsiam' is not a paper run of report.beside"),
    (lambda p: p["runs"]["leoclr-mean"]["overrides"].update(loss_scale=-1), "runs.leoclr-mean.overrides.loss_scale"),
    (lambda p: p["methods"]["simclr"].update(augment={"crop": [0.1, 1]}), "methods.simclr.augment.crop: unknown key"),
    (lambda p: p["methods"]["pnnclr"].update(straight_through="half"), "methods.pnnclr.straight_through: expected one of"),
    (lambda p: p["train"].update(grad_clip_mode="layer"), "train.grad_clip_mode: expected one of ['global', 'per_param']"),
])
def test_bad_params_name_the_key(edit, message):
    p = raw_cpu()
    edit(p)
    with pytest.raises(ParamError) as e:
        validate(p)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shipped_params_are_the_rendered_cpu_profile():
    assert (ROOT / "params.yaml").read_text() == render("cpu")


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES.glob("*.yaml")))
def test_every_profile_renders_to_valid_params(name):
    validate(yaml.safe_load(render(name)))


def test_method_train_overrides_merge_over_shared_train():
    from pipeline.params import method_config

    p = raw_cpu()
    p["methods"]["simclr"]["train"] = {"optimizer": "lars", "lr": 0.3}
    _, block, train, _ = method_config(validate(p), "simclr")
    assert train["optimizer"] == "lars" and train["lr"] == 0.3 and train["epochs"] == p["train"]["epochs"]
    assert "train" not in block


def test_stage_reports_bad_params_in_one_line_before_compute(tmp_path):
    p = raw_cpu()
    p["train"]["warmup_epochs"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    r = subprocess.run([sys.executable, str(ROOT / "stages/pretrain.py"), "simclr"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    assert r.stderr == "error: params.yaml: train.warmup_epochs: expected a number >= 0, got -1\n"


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(ParamError, match="not found"):
        load(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [1,\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load(tmp_path / "params.yaml")


def test_run_overrides_merge_over_the_method_block_and_are_validated():
    from pipeline.params import method_config

    p = raw_cpu()
    p["methods"]["simclr"]["train"] = {"lr": 0.3}
    p["runs"]["simclr-t02"] = {"method": "simclr", "backbone": "resnet18_w16",
                               "overrides": {"temperature": 0.2, "train": {"optimizer": "adam"}}}
    name, block, train, _ = method_config(validate(p), "simclr-t02")
    assert name == "simclr" and block["temperature"] == 0.2 and block["proj_dim"] == p["methods"]["simclr"]["proj_dim"]
    assert train["optimizer"] == "adam" and train["lr"] == 0.3
    p["runs"]["simclr-t02"]["overrides"] = {"temprature": 0.2}
    with pytest.raises(ParamError, match=r"runs\.simclr-t02\.overrides\.temprature: unknown key"):
        validate(p)
