"""Shared artifacts: one clone runs the pipeline and pushes to a DVC remote (a local folder here), a fresh clone
pulls, and finds nothing to do — `dvc status` clean, `dvc repro` reruns no stage (README "Sharing results").

The clone that ran the pipeline is a copy of the session's `dvc repro` of the small project (conftest.small_repro,
which tests/test_experiments.py also copies): the whole DAG (shard, mine, pretrain, features, evaluate, report),
with its DVC cache and run-cache, reproduced once for both modules."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT, copy_repro

# one pytest-xdist worker (--dist loadgroup) runs every user of the session's small `dvc repro`
# (conftest.small_repro), so it is built once
pytestmark = pytest.mark.xdist_group("small_repro")

EXP_SHOW = r"dvc exp show --no-pager --drop '^(?!Experiment$|reports/metrics/summary/{run}\.json:|{run}\.)'"


def sh(cmd: str, cwd) -> str:
    r = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.mark.slow
def test_a_fresh_clone_pulls_everything_and_reruns_nothing(small_repro, tmp_path):
    a = copy_repro(small_repro, tmp_path / "a")   # the pipeline run in clone a (its workspace, cache and run-cache)
    sh("git add -A && git commit -qm init", a)
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


@pytest.mark.slow
def test_the_committed_artifacts_restore_the_encoders_in_a_fresh_clone(small_repro, tmp_path):
    """scripts/artifacts.sh keeps the expensive outputs (every pretrain stage's, the mine stage's) in the
    repository's own DVC remote: a fresh clone restores them byte for byte, and once the shard stage is rebuilt
    (byte-identical) no pretrain or mine stage is stale; features and evaluation are not kept."""
    a = copy_repro(small_repro, tmp_path / "a")
    shutil.copytree(ROOT / "scripts", a / "scripts")
    sh("git add -A && git commit -qm init", a)
    out = sh("bash scripts/artifacts.sh push && git add artifacts && git commit -qm artifacts", a)
    lock = yaml.safe_load((a / "dvc.lock").read_text())["stages"]
    kept = {s for s in lock if s.startswith("pretrain.") or s == "mine"}
    assert kept == {"mine", "pretrain.simclr", "pretrain.random-resnet18_w8"} and f"pushed {len(kept)} stages" in out

    b = a.parent / "clone"    # beside clone a, as a second checkout would be
    sh(f"git clone -q {a} {b}", a.parent)
    assert not (b / "data/models").exists()
    sh("bash scripts/artifacts.sh pull", b)
    enc = "data/models/simclr/encoder.safetensors"
    assert (b / enc).read_bytes() == (a / enc).read_bytes()
    assert not (b / "data/features").exists()                      # cheap outputs are rebuilt, not kept
    assert not [d for d in (b / "data").rglob("*") if d.is_dir() and not any(d.iterdir())]   # no empty leftovers
    sh("dvc repro -q shard", b)
    status = json.loads(subprocess.run(["dvc", "status", "--json"], cwd=b, capture_output=True, text=True,
                                       check=True).stdout or "{}")
    assert status and not kept & set(status), status   # features and evaluation stale (not kept), nothing kept
