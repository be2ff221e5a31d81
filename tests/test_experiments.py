"""DVC experiments on the project (README "Experiments"): `dvc exp run --queue` runs a params change in a copy of
the workspace under `dvc queue start`, and `dvc exp run --temp` in a temporary one; each shows its own metrics in
`dvc exp show` and leaves the workspace as it was.

A small project (conftest.small_repro: two runs on a synthetic ImageFolder, every stage of the DAG) keeps this apart
from the tiny profile's full DAG (tests/test_pipeline_e2e.py), so the two can run side by side under pytest-xdist."""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import copy_repro, sh

METRICS = "reports/metrics/evaluate/simclr.json"
# one pytest-xdist worker (--dist loadgroup) runs every user of the session's small `dvc repro`
# (conftest.small_repro), so it is built once
pytestmark = pytest.mark.xdist_group("small_repro")


@pytest.fixture(scope="module")
def project(small_repro, tmp_path_factory):
    """This module's copy of the small project, its pipeline run committed as the baseline."""
    root = copy_repro(small_repro, tmp_path_factory.mktemp("experiments"))
    sh("git add -A && git commit -qm baseline", root)
    return root


def experiments(project) -> dict[str, dict]:
    """{experiment name: its evaluate metrics of simclr} from `dvc exp show`."""
    exps = {}
    for entry in json.loads(sh("dvc exp show --json", project).stdout):
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name"):
                    exps[rev["name"]] = ((rev.get("data") or {}).get("metrics", {}).get(METRICS, {}).get("data", {}))
    return exps


def test_a_queued_experiment_runs_in_a_dvc_copy_with_its_own_metrics(project):
    baseline = json.loads((project / METRICS).read_text())
    # '+': the run has no overrides of its own yet; lr 10x the profile's (0.06), so every metric moves
    sh("dvc exp run --queue -n simclr-lr06 -S +runs.simclr.overrides.train.lr=0.6", project)
    sh("dvc queue start -j 1", project)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = sh("dvc queue status", project).stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(3)
    assert "Failed" not in status, status + sh("dvc queue logs simclr-lr06", project, check=False).stdout
    exps = experiments(project)
    print(f"\n{status}metrics per experiment: {exps}")   # what the closing notes quote (pytest -s)
    assert exps.get("simclr-lr06", {}).get("knn"), exps
    assert exps["simclr-lr06"] != baseline
    assert json.loads((project / METRICS).read_text()) == baseline   # the workspace is not touched


def test_a_temp_experiment_runs_in_a_temporary_copy(project):
    before = (project / "params.yaml").read_text()
    r = sh("dvc exp run --temp -n temp-run -S report.title=temp", project)   # only the report reruns
    assert "temp-run" in sh("dvc exp list", project).stdout, r.stdout
    assert (project / "params.yaml").read_text() == before
