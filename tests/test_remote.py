"""Shared artifacts: one clone runs the pipeline and pushes to a DVC remote (a local folder here), a fresh clone
pulls, and finds nothing to do — `dvc status` clean, `dvc repro` reruns no stage (README "Sharing results")."""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import copy_project, make_imagefolder

PROFILE = """\
extends: tiny
keep_runs: [simclr, random-resnet18_w8]   # the whole DAG (shard, mine, pretrain, features, evaluate, report), small
dataset: {{root: {root}}}
shard: {{max_images: 60}}
train: {{batch_size: 32}}
mine: {{encoder_run: random-resnet18_w8, layer: backbone}}
seeds: {{runs: []}}
"""


EXP_SHOW = r"dvc exp show --no-pager --drop '^(?!Experiment$|reports/metrics/summary/{run}\.json:|{run}\.)'"


def sh(cmd: str, cwd) -> str:
    r = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.mark.slow
def test_a_fresh_clone_pulls_everything_and_reruns_nothing(tmp_path):
    images = make_imagefolder(tmp_path / "images", n_per_class=20)
    a = copy_project(tmp_path / "a")
    (a / "profiles/share.yaml").write_text(PROFILE.format(root=images))
    sh("git init -q && git config user.email t@t && git config user.name t && python -m pipeline.profile share"
       " && git add -A && git commit -qm init && dvc repro -q", a)
    remote = tmp_path / "remote"
    sh(f"dvc remote add -d store {remote} && git add -A && git commit -qm results && dvc push --run-cache -q", a)
    assert any(remote.rglob("*")), "nothing pushed"

    b = tmp_path / "b"
    sh(f"git clone -q {a} {b}", tmp_path)
    assert not (b / "data/models").exists()          # a clone holds only what git tracks
    sh("dvc pull -q", b)
    assert "up to date" in sh("dvc status", b).lower()
    out = sh("dvc repro", b)
    assert "Running stage" not in out, out[-3000:]
    assert (b / "data/models/random-resnet18_w8/encoder.safetensors").read_bytes() == \
        (a / "data/models/random-resnet18_w8/encoder.safetensors").read_bytes()
    # README "Reading results": one run's summary per experiment, in a 160-column terminal
    table = sh(f"COLUMNS=160 {EXP_SHOW.format(run='simclr')}", b)
    assert "simclr.knn200" in table and "simclr.views_s" in table and "…" not in table, table
    assert max(len(line) for line in table.splitlines()) <= 160
