"""The generated DAG: each stage depends on exactly the code, data and params that can change its outputs."""
from __future__ import annotations

import ast

import pytest

from pipeline import dag
from pipeline.dag import DATA_SUFFIXES
from pipeline import params as P
from pipeline.methods import registry
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def cpu():
    from pipeline.profile import resolve

    p = P.validate(resolve("cpu"))
    return p, dag.stages(p)


def users_of(stages: dict, dep: str) -> set[str]:
    return {name for name, st in stages.items() if dep in st.get("deps", [])}


def test_committed_dvc_yaml_is_generated_from_params():
    p = P.load(ROOT / "params.yaml")
    assert (ROOT / "dvc.yaml").read_text() == dag.render(p), "dvc.yaml is stale: run python -m pipeline.dag"


def test_import_closure_follows_from_imports_and_packages(tmp_path, monkeypatch):
    pkg = tmp_path / "pipeline"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pipeline.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import c\n")   # function-level, relative
    (pkg / "sub" / "c.py").write_text("import os\n")
    (pkg / "unused.py").write_text("")
    (tmp_path / "stage.py").write_text("import pipeline.a\n")
    monkeypatch.setattr(dag, "ROOT", tmp_path)
    dag._closure_of_module.cache_clear()
    dag._imports.cache_clear()
    assert dag.code_deps("stage.py") == ["pipeline/__init__.py", "pipeline/a.py", "pipeline/sub/__init__.py",
                                         "pipeline/sub/b.py", "pipeline/sub/c.py", "stage.py"]
    dag._closure_of_module.cache_clear()


def test_a_method_file_is_a_dependency_of_its_own_runs_only(cpu):
    p, stages = cpu
    def runs_of(*methods):
        return {f"pretrain.{n}" for n in P.instances(p) if P.run_spec(p, n)["method"] in methods}

    assert users_of(stages, "pipeline/methods/byol.py") == runs_of("byol")
    # a method built on another (PW-Self on DINO) also reruns when its base's file changes
    assert users_of(stages, "pipeline/methods/dino.py") == runs_of("dino", "pwself")
    for method, module in registry.modules().items():
        path = f"pipeline/methods/{module}.py"
        importers = {m for m, mod in registry.modules().items()
                     if path in dag.code_deps("stages/pretrain.py", (f"pipeline.methods.{mod}",))}
        assert users_of(stages, path) == runs_of(*importers) and method in importers, path
    # GSSSL's triplet loss belongs to GSSSL's runs alone
    assert users_of(stages, "pipeline/losses/triplet.py") == {f"pretrain.{n}" for n in P.instances(p)
                                                            if P.run_spec(p, n)["method"] == "gsssl"}


def test_code_deps_are_files_never_directories(cpu):
    _, stages = cpu
    for name, st in stages.items():
        for dep in st["deps"]:
            if dep.startswith(("pipeline", "stages")):
                assert dep.endswith((".py", *DATA_SUFFIXES)) and (ROOT / dep).is_file(), (name, dep)


def test_the_report_reads_its_package_data(cpu):
    # the references and the HTML template change the report as much as its code does
    _, stages = cpu
    deps = stages["report"]["deps"]
    assert {"pipeline/report/references.yaml", "pipeline/report/templates/report.html"} <= set(deps)
    assert not any(d.endswith(DATA_SUFFIXES) for s, st in stages.items() if s != "report" for d in st["deps"]
                   if d.startswith("pipeline"))


def test_the_encoder_loader_reaches_every_stage_that_loads_encoders(cpu):
    p, stages = cpu
    users = users_of(stages, "pipeline/models/encoder_io.py")
    assert {f"features.{n}" for n in P.instances(p)} | {"mine"} <= users
    assert not any(u.startswith(("evaluate.", "report", "shard")) for u in users)


def test_knn_code_reaches_evaluation_and_monitored_runs_only(cpu):
    p, stages = cpu
    monitored = {f"pretrain.{n}" for n in P.instances(p) if dag._monitored(p, n)}
    assert monitored, "the cpu profile monitors some runs"
    users = users_of(stages, "pipeline/eval/knn.py")
    assert users == {f"evaluate.{n}" for n in P.instances(p)} | monitored


def test_runtime_and_machine_local_params_reach_no_result(cpu):
    _, stages = cpu
    for name, st in stages.items():
        for key in ("train.num_workers", "train.checkpoint_every", "evaluate.batch_size", "train", "evaluate", "dataset"):
            assert key not in st.get("params", []), (name, key)
        if name != "shard":
            assert "dataset.root" not in st.get("params", []) and "dataset.source" not in st.get("params", []), name


def test_a_shared_train_key_is_a_param_of_exactly_the_runs_it_reaches(cpu):
    """Changing `train.<k>` changes a run's merged trainer settings iff its pretrain stage lists `train.<k>`
    (a run whose method or overrides set k does not see the shared value)."""
    p, stages = cpu
    keys = [k for k in p["train"] if k not in dag.RUNTIME["train"]]
    listed_somewhere = overridden_somewhere = False
    for name in P.instances(p):
        base = P.method_config(p, name)[2]
        params = stages[f"pretrain.{name}"]["params"]
        trains = getattr(registry.get(P.run_spec(p, name)["method"]), "TRAINS", True)
        for k in keys:
            changed = {**p, "train": {**p["train"], k: "<changed>"}}
            reaches = trains and P.method_config(changed, name)[2] != base
            assert reaches == (f"train.{k}" in params), (name, k)
            listed_somewhere |= reaches
            overridden_somewhere |= not reaches
    assert listed_somewhere and overridden_somewhere   # the cpu profile has both cases


def test_the_random_init_floor_reads_no_recipe(cpu):
    """It trains nothing (issue 26, item 12): no shared train key and no augmentation may rerun it; its encoder
    follows from the seed, the backbone and its own (empty) block only."""
    p, stages = cpu
    floors = [n for n in P.instances(p) if P.run_spec(p, n)["method"] == "random"]
    assert floors
    for name in floors:
        params = stages[f"pretrain.{name}"]["params"]
        assert not [k for k in params if k.startswith("train.") or k == "augment"], (name, params)
        assert f"backbones.{P.run_spec(p, name)['backbone']}" in params and "seed" in params


def test_seeds_are_instances_reading_their_runs_params():
    from pipeline.profile import resolve

    raw = resolve("cpu")
    raw["seeds"] = {"values": [0, 1, 2], "runs": ["simclr"]}
    p = P.validate(raw)
    stages = dag.stages(p)
    for name in ("simclr", "simclr-s1", "simclr-s2"):
        assert "runs.simclr" in stages[f"pretrain.{name}"]["params"]
        assert stages[f"pretrain.{name}"]["cmd"].endswith(f"-m stages.pretrain {name}")
        assert f"data/models/{name}/encoder.safetensors" in stages[f"features.{name}"]["deps"]
    # the list of seeds is not a dependency of any trained seed: adding one leaves the others cached
    assert not any("seeds" in st.get("params", []) for n, st in stages.items() if n != "report")
    assert P.training_seed(p, "simclr-s2") == 2 and P.training_seed(p, "simclr") == 0
    assert P.base_run(p, "simclr-s2") == "simclr" and P.run_spec(p, "simclr-s2") == p["runs"]["simclr"]
    raw["seeds"] = {"values": [1], "runs": ["nope"]}
    with pytest.raises(P.ParamError, match="seeds.runs: 'nope' is not a run"):
        P.validate(raw)


def test_each_curve_is_declared_once(cpu):
    p, stages = cpu
    plots = dag.top_level_plots(p)
    assert [list(d)[0] for d in plots] == ["loss", "knn_monitor"]
    assert not any("plots" in st for st in stages.values())
    loss_files = plots[0]["loss"]["y"]
    assert len(loss_files) == len(P.instances(p)) == len(set(loss_files))


def test_the_registry_imports_only_the_method_asked_for():
    import subprocess
    import sys

    code = ("import sys; from pipeline.methods import registry; registry.get('byol'); "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.methods.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = set(ast.literal_eval(out.strip()))
    assert "pipeline.methods.byol" in loaded
    assert not loaded & {"pipeline.methods.simclr", "pipeline.methods.dino", "pipeline.methods.gsssl"}


def test_no_library_module_spells_an_artifact_path():
    for f in sorted((ROOT / "pipeline").rglob("*.py")):
        if f.name in ("paths.py",):
            continue
        tree = ast.parse(f.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not node.value.startswith(("data/", "reports/")), (f, node.value)


def test_origin_root_sees_through_dvc_temp_copies(tmp_path):
    from pipeline.paths import origin_root

    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "run" / "tmpabc"
    copy.mkdir(parents=True)
    assert origin_root(copy) == (tmp_path / "proj").resolve()
    assert origin_root(tmp_path) == tmp_path.resolve()


def test_quick_profile_keeps_one_run_and_its_floor():
    from pipeline.profile import resolve

    p = P.validate(resolve("quick"))
    assert set(P.instances(p)) == {"simclr", "random-resnet18_w16"}
    assert p["pair_runs"] == {} and p["report"]["beside"] == {} and p["seeds"]["runs"] == []
    assert set(dag.stages(p)) == {"shard", "mine", "report", *(f"{s}.{r}" for s in ("pretrain", "features", "evaluate")
                                                               for r in ("simclr", "random-resnet18_w16"))}
