"""The ImageNet-1k preset end to end on a synthetic ImageFolder of 224-px JPEGs: shard, mine, pretrain (with a
SePP-ID pair run), features, evaluate, report, through `dvc repro` in a temporary copy of the project.

Shrunk in size and steps only: 3 classes x 6 images, ResNet-50 at width 8 (the preset's 64 costs ~60x the
compute), one epoch of batch 6, a 12-key queue. The preset's 224-px views and augmentation are kept."""
from __future__ import annotations

import json

import pytest
import yaml

from pipeline.eval.feature_cache import load_features
from pipeline.params import validate
from tests.conftest import copy_project, make_imagefolder, sh

RUNS = ("mocov2-100ep", "mocov2", "leoclr")


def shrink(p: dict, root: str) -> dict:
    """The preset with fewer images, a narrower ResNet-50 and a few steps: every other value as rendered."""
    p["dataset"].update(root=root, name="synthetic224")
    p["shard"]["samples_per_shard"] = 5
    p["backbones"]["resnet50"]["width"] = 8
    p["runs"] = {r: p["runs"][r] for r in RUNS}
    p["pair_runs"] = {"seppid-mocov2": p["pair_runs"]["seppid-mocov2"]}
    p["mine"].update(min_sim=-1.0, max_sim=1.0, max_per_anchor=1, batch_size=6)  # a few pairs from an untrained encoder
    p["train"].update(epochs=1, batch_size=6, num_workers=0, checkpoint_every=2, gpus=1)   # one CPU process
    for run in ("mocov2-100ep", "simclr", "byol"):
        p["runs"].get(run, {}).pop("overrides", None)
    for m in ("mocov2", "leoclr"):
        p["methods"][m]["queue_size"] = 12
    p["evaluate"].update(batch_size=6, linear_C=[1.0], linear_max_iter=50, semi_fractions=[0.5], semi_seeds=[0],
                         semi_unlabelled_max=18)
    p["report"]["beside"] = {"leoclr": "mocov2"}
    p["report"]["controls"] = {}   # leoclr-mean is not among the runs kept
    return validate(p)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthetic224")
    images = make_imagefolder(tmp / "images", n_per_class=6, size=224)
    dst = copy_project(tmp / "proj")
    sh("git init -q && python -m pipeline.profile imagenet1k", dst)
    params = shrink(yaml.safe_load((dst / "params.yaml").read_text()), str(images))
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("python -m pipeline.dag", dst)  # dvc.yaml has one stage per run of the shrunk params
    sh("dvc repro", dst)
    return dst, params


@pytest.mark.slow
def test_every_stage_runs_on_224px_jpegs_with_the_imagenet_preset(project):
    dst, params = project
    assert params["dataset"]["image_size"] == 224 and params["augment"]["blur_p"] == 0.5  # the preset's views
    shard = json.loads((dst / "reports/metrics/shard.json").read_text())
    assert shard["images"] == {"train": 18, "test": 18}
    mine = json.loads((dst / "reports/metrics/mine.json").read_text())
    assert mine["K"] == 2 and mine["semantic"]["pairs"] >= 1  # K = 10% of 18 images, rounded up
    for run in [*RUNS, "seppid-mocov2"]:
        feats, _, _ = load_features(dst / f"data/features/{run}", "train")
        assert feats.shape == (18, 8 * 8 * 4)  # ResNet-50 at width 8: 8 x width x 4 (bottleneck) channels
        pre = json.loads((dst / f"reports/metrics/pretrain/{run}.json").read_text())
        extra = mine["semantic"]["pairs"] if run == "seppid-mocov2" else 0  # SePP-ID: originals + pairs
        assert pre["steps"] == (18 + extra) // 6
        ev = json.loads((dst / f"reports/metrics/evaluate/{run}.json").read_text())
        assert set(ev["knn"]) == {"10", "20", "200"}
    md = (dst / "reports/report.md").read_text()
    assert all(run in md for run in RUNS)
