"""`dvc repro` of the tiny profile in a temporary copy of the project, on the real CIFAR-10 JPEGs."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT

CIFAR = ROOT.parent / "shared/datasets/cifar10-jpg"
COPY = ["dvc.yaml", "pipeline", "stages", "profiles", ".dvc/config", ".dvcignore", ".gitignore"]


def sh(cmd, cwd, check=True):
    r = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not present")
    dst = tmp_path_factory.mktemp("e2e") / "proj"
    dst.mkdir()
    for item in COPY:
        src = ROOT / item
        (dst / item).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / item)
    for p in dst.rglob("__pycache__"):
        shutil.rmtree(p)
    sh("git init -q && python -m pipeline.profile tiny", dst)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["dataset"]["root"] = str(CIFAR)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("dvc repro", dst)
    return dst


def runs(project):
    return yaml.safe_load((project / "params.yaml").read_text())["runs"]


def pair_runs(project):
    return yaml.safe_load((project / "params.yaml").read_text())["pair_runs"]


def test_every_stage_wrote_its_outputs(project):
    shards = project / "data/shards/cifar10-tiny"
    assert len(list((shards / "train").glob("*.tar"))) == 4 and (shards / "manifest.parquet").exists()
    shard_metrics = json.loads((project / "reports/metrics/shard.json").read_text())
    assert shard_metrics["images"] == {"train": 1000, "test": 1000} and shard_metrics["skipped_corrupt"] == 0
    mine = json.loads((project / "reports/metrics/mine.json").read_text())
    assert mine["K"] == 100 and 0 < mine["semantic"]["pairs"] <= 2 * 100  # tiny: 10% of 1000, at most 2 per anchor
    assert mine["random"]["pairs"] == mine["semantic"]["pairs"] and 0 <= mine["semantic"]["pair_accuracy"] <= 1
    for name in ("pairs.parquet", "random.parquet", "semantic/meta.json", "random/meta.json"):
        assert (project / "data/pairs/cifar10-tiny" / name).exists()
    for run, spec in {**runs(project), **pair_runs(project)}.items():
        assert (project / f"data/models/{run}/encoder.pt").exists()
        feats = np.load(project / f"data/features/{run}/train.npz")
        # ResNet-18 at width 8: 8 * 8 channels; ViT-Tiny: 192
        assert feats["feats"].shape == (1000, 64 if spec["backbone"] == "resnet18_w8" else 192)
        ev = json.loads((project / f"reports/metrics/evaluate/{run}.json").read_text())
        assert set(ev["knn"]) == {"10", "20", "200"} and 10 <= ev["linear"]["top1"] <= 100
        assert set(ev["semi"]["0.1"]) == {"logreg", "label_spreading"}
        pre = json.loads((project / f"reports/metrics/pretrain/{run}.json").read_text())
        extra = mine["semantic"]["pairs"] if spec.get("pairs") else 0  # SePP-ID: originals + pairs per epoch
        assert pre["steps"] == (0 if spec["method"] == "random" else (1000 + extra) // 64)
    assert "loss" in (project / "reports/plots/pretrain/simclr.csv").read_text().splitlines()[0]


def test_report_lists_both_methods_and_the_floor(project):
    md = (project / "reports/report.md").read_text()
    for run in {**runs(project), **pair_runs(project)}:
        assert run in md
    assert "## SePP-ID: mined pairs" in md and "(figures/similarity.png)" in md
    html = (project / "reports/report.html").read_text()
    assert "data:image/png;base64," in html
    assert sh("dvc status", project).stdout.strip().endswith("up to date.")


def test_params_changes_touch_only_their_stages(project):
    """Each stage lists exactly the params it reads: edit one key, see which stages go stale."""
    path = project / "params.yaml"
    original = path.read_text()

    def stale_after(key_path, value):
        p = yaml.safe_load(original)
        node = p
        for k in key_path[:-1]:
            node = node[k]
        node[key_path[-1]] = value
        path.write_text(yaml.safe_dump(p, sort_keys=False))
        try:
            out = sh("dvc status --json", project).stdout
        finally:
            path.write_text(original)
        return set(json.loads(out))

    all_runs, paired = runs(project), pair_runs(project)
    assert stale_after(["evaluate", "knn_temperature"], 0.07) == (
        {f"evaluate@{r}" for r in all_runs} | {f"evaluate_pairs@{r}" for r in paired})
    # a method's block reaches every run of that method (gsssl-simclr: SimCLR with GSSSL's groups), nothing else
    assert stale_after(["methods", "simclr", "temperature"], 0.2) == (
        {f"pretrain@{r}" for r, spec in all_runs.items() if spec["method"] == "simclr"}
        | {f"pretrain_pairs@{r}" for r, spec in paired.items() if spec["method"] == "simclr"})
    assert all_runs["gsssl-simclr"]["method"] == "simclr"
    assert stale_after(["report", "title"], "x") == {"report"}
    assert stale_after(["train", "lr"], 0.1) == {f"pretrain@{r}" for r in all_runs} | {f"pretrain_pairs@{r}" for r in paired}
    # SePP-ID: a mine.* change reruns the mine stage and the pair runs, never a plain run
    assert stale_after(["mine", "min_sim"], 0.95) == {"mine"} | {f"pretrain_pairs@{r}" for r in paired}
    assert stale_after(["pair_runs", "seppid-random", "pairs"], "semantic") == {"pretrain_pairs@seppid-random",
                                                                                "evaluate_pairs@seppid-random", "report"}
    assert stale_after(["backbones", "vit_tiny_p8", "depth"], 2) == {
        f"pretrain@{r}" for r, spec in all_runs.items() if spec["backbone"] == "vit_tiny_p8"}


def test_bad_param_fails_before_compute_in_one_line(project):
    path = project / "params.yaml"
    original = path.read_text()
    try:
        path.write_text(original.replace("batch_size: 64", "batch_size: -64"))
        r = sh("python stages/pretrain.py simclr", project, check=False)
    finally:
        path.write_text(original)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: params.yaml: train.batch_size: expected an integer >= 1, got -64"
