"""`dvc repro` of the tiny profile in a temporary copy of the project, on the real CIFAR-10 JPEGs.

Also the DAG's promise, measured with DVC itself: after one edit, `dvc status` marks exactly the stages
that read what changed; and each stage process imported exactly the project files dvc.yaml lists for it.
(`dvc exp run --queue` / `--temp`: tests/test_experiments.py, on a smaller project.)
"""
from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import CIFAR, copy_repro, sh

# one pytest-xdist worker (--dist loadgroup) runs both users of the session's tiny `dvc repro`
# (conftest.tiny_repro), so it is built once
pytestmark = pytest.mark.xdist_group("tiny_repro")


@pytest.fixture(scope="module")
def project(request, tmp_path_factory):
    """This module's copy of the session's `dvc repro` of the tiny profile (conftest.tiny_repro: the profile rendered
    in a fresh copy of the project, the data beside it as in a checkout, every stage run with an import log)."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not present")
    return copy_repro(request.getfixturevalue("tiny_repro"), tmp_path_factory.mktemp("e2e"))


def params_of(project):
    return yaml.safe_load((project / "params.yaml").read_text())


def instances(project):
    from pipeline import params as P

    return P.instances(P.validate(params_of(project)))


def runs_whose_train_changes(project, key, value):
    from pipeline import params as P
    from pipeline.methods import registry

    before = P.validate(params_of(project))
    after = P.validate({**before, "train": {**before["train"], key: value}})
    trains = lambda run: getattr(registry.get(P.run_spec(before, run)["method"]), "TRAINS", True)   # noqa: E731
    return {f"pretrain.{n}" for n, i in P.instances(before).items()
            if trains(i["run"]) and P.method_config(before, i["run"])[2] != P.method_config(after, i["run"])[2]}


def stages_of(project):
    return yaml.safe_load((project / "dvc.yaml").read_text())["stages"]


def test_every_stage_wrote_its_outputs(project):
    from pipeline.eval.feature_cache import load_features

    shards = project / "data/shards/cifar10-tiny"
    assert len(list((shards / "train").glob("*.tar"))) == 4 and (shards / "manifest.parquet").exists()
    shard_metrics = json.loads((project / "reports/metrics/shard.json").read_text())
    assert shard_metrics["images"] == {"train": 256, "test": 256} and shard_metrics["skipped_corrupt"] == 0
    mine = json.loads((project / "reports/metrics/mine.json").read_text())
    assert mine["K"] == 26 and 0 < mine["semantic"]["pairs"] <= 2 * 26  # tiny: 10% of 256, at most 2 per anchor
    assert mine["random"]["pairs"] == mine["semantic"]["pairs"] and 0 <= mine["semantic"]["pair_accuracy"] <= 1
    for name in ("pairs.parquet", "random.parquet", "semantic/meta.json", "random/meta.json"):
        assert (project / "data/pairs/cifar10-tiny" / name).exists()
    p = params_of(project)
    for run, inst in instances(project).items():
        spec = p[inst["section"]][inst["run"]]
        assert (project / f"data/models/{run}/encoder.safetensors").exists()
        feats, labels, _ = load_features(project / f"data/features/{run}", "train")
        # ResNet-18 at width 8: 8 * 8 channels; ViT-Tiny: 192
        assert feats.shape == (256, 64 if spec["backbone"] == "resnet18_w8" else 192) and len(labels) == 256
        ev = json.loads((project / f"reports/metrics/evaluate/{run}.json").read_text())
        assert set(ev["knn"]) == {"10", "20", "200"} and 10 <= ev["linear"]["top1"] <= 100
        assert set(ev["semi"]["0.1"]) >= {"logreg", "label_spreading"}
        assert (ev["base_run"], ev["seed"]) == (inst["run"], inst["seed"])
        assert (project / f"reports/predictions/{run}.parquet").exists()
        pre = json.loads((project / f"reports/metrics/pretrain/{run}.json").read_text())
        extra = mine["semantic"]["pairs"] if spec.get("pairs") else 0  # SePP-ID: originals + pairs per epoch
        assert pre["steps"] == (0 if spec["method"] == "random" else (256 + extra) // 64)
        assert (pre["base_run"], pre["seed"]) == (inst["run"], inst["seed"])
    assert "loss" in (project / "reports/plots/pretrain/simclr.csv").read_text().splitlines()[0]


def test_report_lists_every_run_and_the_floor(project):
    md = (project / "reports/report.md").read_text()
    for run in {i["run"] for i in instances(project).values()}:
        assert f"| {run} |" in md
    # simclr trained under two seeds: one row, its mean with an interval over both seeds and the test images
    knn = md.split("## kNN accuracy\n", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in knn.splitlines() if line.startswith("| simclr |"))
    assert "| 2 |" in row and "[" in row
    html = (project / "reports/report.html").read_text()
    assert "data:image/png;base64," in html
    assert sh("dvc status", project).stdout.strip().endswith("up to date.")


def test_each_stage_imported_exactly_the_code_dvc_yaml_lists(project):
    logs = project.parent / "imports"
    stages = stages_of(project)
    checked = 0
    for log in sorted(logs.glob("*.txt")):
        script, *run = log.name[: -len(".txt")].split(".", 1)
        stage = ".".join([script, *run])
        imported = set(log.read_text().split())
        declared = {d for d in stages[stage]["deps"] if d.endswith(".py")}
        assert imported == declared, (stage, sorted(imported - declared), sorted(declared - imported))
        checked += 1
    assert checked == len(stages)


def changed_stages(project) -> set[str]:
    """Stages whose own code or params dependencies changed (what the edit itself invalidates)."""
    status = json.loads(sh("dvc status --json", project).stdout or "{}")
    return {name for name, entries in status.items()
            if any("changed deps" in e for e in entries if isinstance(e, dict))}


@pytest.mark.parametrize("edit, expect", [
    ("pipeline/methods/byol.py", lambda st: {"pretrain.byol"}),
    ("pipeline/methods/new_idea.py", lambda st: set()),
    ("pipeline/models/encoder_io.py",
     lambda st: {s for s in st if s.startswith(("features.", "pretrain.")) or s == "mine"}),
    ("pipeline/eval/knn.py",
     lambda st: {s for s in st if s.startswith("evaluate.")}
     | {s for s in st if s.startswith("pretrain.") and "pipeline/eval/knn.py" in st[s]["deps"]}),
])
def test_a_code_edit_marks_only_the_stages_that_import_it(project, edit, expect):
    path = project / edit
    original = path.read_text() if path.exists() else None
    path.write_text((original or "") + "\nEDITED_BY_TEST = 1\n")
    try:
        got = changed_stages(project)
    finally:
        path.write_text(original) if original is not None else path.unlink()
    assert got == expect(stages_of(project))


def test_params_changes_touch_only_their_stages(project):
    """Each stage lists exactly the params that can change its outputs: edit one key, see which go stale."""
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
            return changed_stages(project)
        finally:
            path.write_text(original)

    insts = instances(project)
    spec = {n: params_of(project)[i["section"]][i["run"]] for n, i in insts.items()}
    assert stale_after(["evaluate", "knn_temperature"], 0.07) == {f"evaluate.{n}" for n in insts}
    # runtime-only keys and machine-local paths change no result
    assert stale_after(["train", "num_workers"], 2) == set()
    assert stale_after(["train", "checkpoint_every"], 7) == set()
    assert stale_after(["evaluate", "batch_size"], 17) == set()
    assert stale_after(["dataset", "root"], "/elsewhere/same-images") == {"shard"}
    # a method's block reaches every run of that method (gsssl-simclr: SimCLR with GSSSL's groups), nothing else
    assert stale_after(["methods", "simclr", "temperature"], 0.2) == {
        f"pretrain.{n}" for n in insts if spec[n]["method"] == "simclr"}
    assert stale_after(["report", "title"], "x") == {"report"}
    # a shared train key reaches exactly the runs whose merged trainer settings it changes (not those setting their own)
    assert stale_after(["train", "lr"], 0.1) == runs_whose_train_changes(project, "lr", 0.1) != set()
    # SePP-ID: a mine.* change reruns the mine stage and the pair runs, never a plain run
    assert stale_after(["mine", "min_sim"], 0.95) == {"mine"} | {f"pretrain.{n}" for n in insts if spec[n].get("pairs")}
    assert stale_after(["backbones", "vit_tiny_p8", "depth"], 2) == {
        f"pretrain.{n}" for n in insts if spec[n]["backbone"] == "vit_tiny_p8"}


def test_bad_param_fails_before_compute_in_one_line(project):
    path = project / "params.yaml"
    original = path.read_text()
    try:
        path.write_text(original.replace("batch_size: 64", "batch_size: -64"))
        r = sh("python -m stages.pretrain simclr", project, check=False)
    finally:
        path.write_text(original)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: params.yaml: train.batch_size: expected an integer >= 1, got -64"


def test_reverting_a_change_restores_the_encoder_from_the_run_cache(project):
    """Resume state is no stage output, so DVC's run-cache holds each trained encoder: undoing an experiment
    checks the earlier encoder out instead of training it again."""
    path, enc = project / "params.yaml", project / "data/models/simclr/encoder.safetensors"
    original, before = path.read_text(), enc.read_bytes()
    p = yaml.safe_load(original)
    p["runs"]["simclr"]["overrides"] = {"temperature": 0.3}
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        sh("dvc repro pretrain.simclr", project)
        assert enc.read_bytes() != before
    finally:
        path.write_text(original)
    out = sh("dvc repro pretrain.simclr", project).stdout
    assert "skipping run" in out and enc.read_bytes() == before, out
