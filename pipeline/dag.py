"""The DAG generator: `dvc.yaml` derived from params and from the code's own import graph.

`python -m pipeline.dag` (also run by `python -m pipeline.profile NAME`) writes `dvc.yaml` with one stage
per step and per run instance (run x training seed). Each stage depends on exactly:
  * code: the project files its command imports, transitively (`import_closure_files`, read from the syntax
    trees, function-level imports included), plus the modules it loads by name for its configuration:
    a pretrain stage its method's file (`registry.module_of`) and, with the kNN monitor on, the monitor;
  * data: the artifacts of the stages it reads (paths from `pipeline.paths`);
  * params: only the keys that can change its outputs (`RUNTIME` keys change speed, never results;
    machine-local paths are read by the shard stage alone; a shared `train` key that a run's method or
    overrides set is not a param of that run's pretrain stage).
No list here is kept by hand: a new file in `pipeline/methods/` is a dependency of no stage until a
stage imports it, and an edit to one method's file reruns only that method's runs.
"""
from __future__ import annotations

import argparse
import ast
import sys
from functools import lru_cache
from pathlib import Path

import yaml

from pipeline import params as P
from pipeline import paths
from pipeline.methods import registry

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pipeline"

# keys that change how fast a stage runs, never what it computes: no stage depends on them
RUNTIME = {"train": P.RUNTIME_TRAIN_KEYS, "evaluate": ("num_workers",), "shard": ("workers",)}
# modules a pretrain stage loads by name when its configuration asks for them (importlib, not `import`)
MONITOR = "pipeline.train.monitor"


# --- the import graph -------------------------------------------------------------------------------

def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _packages_of(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@lru_cache(maxsize=None)
def _imports(path: Path) -> frozenset[str]:
    """Project modules `path` imports anywhere in its body (module level or inside functions)."""
    rel = path.relative_to(ROOT).with_suffix("")
    here = list(rel.parts[:-1])   # the package a relative import starts from (a package's own, for __init__)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative import
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                mod = ".".join([*base, *( [node.module] if node.module else [])])
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)   # `from pkg import submodule`
    return frozenset(m for m in out if m == PACKAGE or m.startswith(PACKAGE + "."))


@lru_cache(maxsize=None)
def _closure_of_module(module: str) -> frozenset[Path]:
    return frozenset(import_closure_files([_module_file(module)]))


def import_closure_files(files: list[Path]) -> set[Path]:
    """Every project file that importing/running `files` loads: the files, their imports, transitively,
    and the `__init__.py` of every package on the way (Python runs those too)."""
    seen: set[Path] = set()
    todo = [f for f in files if f is not None]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for mod in _imports(f):
            for m in (*_packages_of(mod), mod):
                mf = _module_file(m)
                if mf is not None and mf not in seen:
                    todo.append(mf)
    return seen


def code_deps(script: str, modules: tuple[str, ...] = ()) -> list[str]:
    """The sorted project files (relative to the root) a stage script runs, with `modules` loaded by name."""
    files = import_closure_files([ROOT / script])
    for m in modules:
        files |= _closure_of_module(m)
    return sorted(f.relative_to(ROOT).as_posix() for f in files | _package_data(files))


# a package's non-Python files (references, templates) are read by its modules: they are code too
DATA_SUFFIXES = (".yaml", ".yml", ".json", ".html", ".txt")


def _package_data(files: set[Path]) -> set[Path]:
    out = set()
    for d in {f.parent for f in files}:
        out |= {q for q in d.iterdir() if q.is_file() and q.suffix in DATA_SUFFIXES}
        out |= {q for sub in d.iterdir() if sub.is_dir() and not (sub / "__init__.py").exists()
                and sub.name != "__pycache__" for q in sub.rglob("*") if q.is_file() and q.suffix in DATA_SUFFIXES}
    return out


# --- the stages --------------------------------------------------------------------------------------

def _keys(p: dict, section: str, drop: tuple[str, ...] = ()) -> list[str]:
    skip = set(drop) | set(RUNTIME.get(section, ()))
    return [f"{section}.{k}" for k in p[section] if k not in skip]


def _eval_view(p: dict) -> list[str]:
    """The eval view's own key (resize + centre-crop ratio) where params set it; its default otherwise."""
    return ["evaluate.crop_ratio"] if "crop_ratio" in p["evaluate"] else []


def _monitored(p: dict, name: str) -> bool:
    _, _, train, _ = P.method_config(p, name)
    return bool(train.get("knn_monitor") and train["knn_monitor"][0] > 0)


def _shared_train_keys(p: dict, spec: dict) -> list[str]:
    """The shared `train.*` keys that reach a run: its method's `train` block and its own overrides replace
    the others whole (`params.method_config` merges one level deep), and both are listed as params already."""
    own = set(p["methods"][spec["method"]].get("train", {})) | set(spec.get("overrides", {}).get("train", {}))
    return _keys(p, "train", drop=tuple(own))


def _pretrain(p: dict, name: str, inst: dict) -> dict:
    spec = p[inst["section"]][inst["run"]]
    ds = p["dataset"]["name"]
    loaded = (registry.module_of(spec["method"]),) + ((MONITOR,) if _monitored(p, name) else ())
    deps = code_deps("stages/pretrain.py", loaded) + [paths.shards(ds).as_posix()]
    # a method that trains nothing (the random-init floor) reads no augmentation and no trainer setting
    trains = getattr(registry.get(spec["method"]), "TRAINS", True)
    recipe = ["augment", *_shared_train_keys(p, spec)] if trains else []
    prm = ["seed", "dataset.name", "dataset.image_size", "dataset.mean", "dataset.std", *recipe,
           f"{inst['section']}.{inst['run']}", f"methods.{spec['method']}", f"backbones.{spec['backbone']}"]
    if spec.get("pairs"):   # SePP-ID: the originals plus the mine stage's pairs
        deps.append(paths.pairs(ds).as_posix())
        prm.append("mine")
    return {
        # fixed: the stage re-executes itself under the launcher (pipeline/launch.py), a runtime setting
        "cmd": f"python -m stages.pretrain {name}",
        "deps": deps, "params": prm,
        # every output cached (none in git): DVC's run-cache can then restore the whole stage
        "outs": [paths.encoder(name).as_posix(), paths.encoder_config(name).as_posix(), paths.train_summary(name).as_posix(),
                 paths.train_curve(name).as_posix()],
    }


def _features(p: dict, name: str) -> dict:
    ds = p["dataset"]["name"]
    return {
        "cmd": f"python -m stages.features {name}",
        "deps": code_deps("stages/features.py") + [paths.shards(ds).as_posix(), paths.encoder(name).as_posix(),
                                                   paths.encoder_config(name).as_posix()],
        "params": ["dataset.name", "dataset.image_size", "dataset.mean", "dataset.std", "evaluate.train_subset",
                   *_eval_view(p)],
        "outs": [paths.features(name).as_posix()],
    }


def _evaluate(p: dict, name: str, inst: dict) -> dict:
    return {
        "cmd": f"python -m stages.evaluate {name}",
        "deps": code_deps("stages/evaluate.py") + [paths.features(name).as_posix(), paths.train_summary(name).as_posix(),
                                                   paths.train_curve(name).as_posix()],
        "params": ["seed", f"{inst['section']}.{inst['run']}.method", f"{inst['section']}.{inst['run']}.backbone",
                   *_keys(p, "evaluate", drop=("batch_size", "crop_ratio"))],
        # the git-tracked record of the run: its evaluation, and the pretrain stage's summary and curve published
        "metrics": [{paths.evaluate_metrics(name).as_posix(): {"cache": False}},
                    {paths.pretrain_metrics(name).as_posix(): {"cache": False}},
                    {paths.summary_metrics(name).as_posix(): {"cache": False}}],
        # the curve is a plain output: the top-level `plots:` draws it, once, beside every other run's
        "outs": [{paths.predictions(name).as_posix(): {"cache": False}}, {paths.curve(name).as_posix(): {"cache": False}}],
    }


def stages(p: dict) -> dict:
    ds = p["dataset"]["name"]
    out: dict[str, dict] = {
        "shard": {
            "cmd": "python -m stages.shard",
            "deps": code_deps("stages/shard.py"),
            "params": ["seed", "dataset.name", "dataset.source",
                       *[f"dataset.{k}" for k in ("root", "urls", "pretrain") if k in p["dataset"]], *_keys(p, "shard")],
            "outs": [paths.shards(ds).as_posix()],
            "metrics": [{paths.shard_metrics().as_posix(): {"cache": False}}],
        },
        "mine": {
            "cmd": "python -m stages.mine",
            "deps": code_deps("stages/mine.py") + [paths.shards(ds).as_posix(),
                                                   paths.encoder(p["mine"]["encoder_run"]).as_posix(),
                                                   paths.encoder_config(p["mine"]["encoder_run"]).as_posix()],
            "params": [*_keys(p, "mine"), "dataset.name", "dataset.image_size", "dataset.mean", "dataset.std",
                       "train.train_subset", "shard.samples_per_shard", *_eval_view(p)],
            "outs": [paths.pairs(ds).as_posix()],
            "metrics": [{paths.mine_metrics().as_posix(): {"cache": False}}],
        },
    }
    insts = P.instances(p)
    for name, inst in insts.items():
        out[f"pretrain.{name}"] = _pretrain(p, name, inst)
    for name in insts:
        out[f"features.{name}"] = _features(p, name)
    for name, inst in insts.items():
        out[f"evaluate.{name}"] = _evaluate(p, name, inst)
    out["report"] = {
        "cmd": "python -m stages.report",
        "deps": code_deps("stages/report.py")
        + [paths.pretrain_metrics(n).as_posix() for n in insts]
        + [paths.evaluate_metrics(n).as_posix() for n in insts]
        + [paths.predictions(n).as_posix() for n in insts]
        + [paths.curve(n).as_posix() for n in insts]
        + [paths.mine_metrics().as_posix()]
        + ([p["report"]["recipe_search"]] if p["report"].get("recipe_search") else []),
        "params": ["seed", "runs", "pair_runs", "report", "dataset.name", "dataset.image_size",
                   *(["seeds"] if p.get("seeds") else []), *(["mine.encoder_run"] if p.get("mine") else [])],
        "outs": [{o.as_posix(): {"cache": False}} for o in paths.report_outputs()],
    }
    return out


def top_level_plots(p: dict) -> list[dict]:
    """One chart per curve, every run overlaid (so `dvc plots diff` between experiments overlays them too)."""
    insts = list(P.instances(p))
    # loss over the run's first-epoch loss (stages/evaluate.py adds it): losses of different methods differ by
    # orders of magnitude and in sign; relative to their start they share one axis
    loss = {"x": "epoch", "y": {paths.curve(n).as_posix(): "loss_rel" for n in insts},
            "title": "Pretraining loss / the run's first-epoch loss"}
    monitored = [n for n in insts if _monitored(p, n)]
    plots = [{"loss": loss}]
    if monitored:
        plots.append({"knn_monitor": {"x": "epoch", "y": {paths.curve(n).as_posix(): "knn_top1" for n in monitored},
                                      "title": "kNN-200 top-1 (%) per epoch (train.knn_monitor)"}})
    return plots


HEADER = """\
# GENERATED by `python -m pipeline.dag` from params.yaml and the code's import graph: do not edit by hand.
# `python -m pipeline.profile NAME` regenerates it with params.yaml; tests/test_dag.py fails when it is stale.
# Stages: shard, mine, then per run instance (run x training seed): pretrain.<run>, features.<run>,
# evaluate.<run>; then report. Each lists exactly the project files its command imports, the artifacts it
# reads and the params that can change its outputs.
"""


def render(p: dict) -> str:
    # the live logs (pipeline.train.live): no stage's output, read from the workspace while a run trains
    live = [(paths.live(n) / "metrics.json").as_posix() for n in P.instances(p)]
    doc = {"stages": stages(p), "plots": top_level_plots(p), "metrics": live}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write dvc.yaml from params.yaml and the import graph.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="dvc.yaml")
    ap.add_argument("--check", action="store_true", help="exit 1 when the file differs from what would be written")
    a = ap.parse_args(argv)
    from pipeline.utils import atomic_write_text

    try:
        text = render(P.load(a.params))
    except P.PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if a.check:
        same = Path(a.out).exists() and Path(a.out).read_text() == text
        print(f"{a.out}: {'up to date' if same else 'stale: run python -m pipeline.dag'}")
        sys.exit(0 if same else 1)
    atomic_write_text(text, a.out)
    print(f"{a.out}: {len(stages(P.load(a.params)))} stages")


if __name__ == "__main__":
    main()
