"""Profiles: `python -m pipeline.profile NAME` renders profiles/NAME.yaml into params.yaml.

profiles/cpu.yaml is complete (and is params.yaml as shipped); every other profile names a profile
it `extends` and overrides only what differs (a null deletes a key). The pair lists `report.beside` and
`report.controls` are the exception: a profile that sets one replaces its base's whole (REPLACED), so a preset
lists exactly the pairs it compares and never inherits one it did not mean. The result is validated before
params.yaml is replaced, so a broken profile never lands in the workspace.

Runs are inherited only where they still make sense: a run of the base that the derived profile does not name
is dropped when its backbone or its method block is not in the derived profile (see `_inherit_runs`). So a new
method is one file plus one run (and its block) in profiles/cpu.yaml, and every derived profile still renders.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pipeline.params import ParamError, deep_merge, load, validate
from pipeline.utils import atomic_write_text

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
# (section, key) mappings a profile replaces rather than merges into its base's
REPLACED = (("report", "beside"), ("report", "controls"))


def resolve(name: str, seen: tuple = ()) -> dict:
    path = PROFILES / f"{name}.yaml"
    if not path.exists():
        have = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise ParamError(f"profile {name!r}: no {path} (have: {have})")
    if name in seen:
        raise ParamError(f"profile {name!r}: extends itself through {' -> '.join(seen)}")
    raw = yaml.safe_load(path.read_text()) or {}
    base = raw.pop("extends", None)
    keep = raw.pop("keep_runs", None)
    merged = _inherit_runs(deep_merge(resolve(base, seen + (name,)), raw), raw) if base else raw
    for section, key in REPLACED:
        if key in (raw.get(section) or {}):
            merged[section][key] = {k: v for k, v in (raw[section][key] or {}).items() if v is not None}
    return _keep_runs(merged, keep, name) if keep is not None else merged


def _inherit_runs(merged: dict, own: dict) -> dict:
    """Drop the runs `merged` inherited (not named in the profile's own `runs:` / `pair_runs:`) whose backbone
    or method block the profile does not have, e.g. a CPU run on `resnet18_w16` in a ResNet-50 preset that
    deletes that backbone. A run the profile names itself is kept, so its mistakes still fail validation."""
    backbones, methods = merged.get("backbones") or {}, merged.get("methods") or {}
    dropped = []
    for section in ("runs", "pair_runs"):
        named = own.get(section) or {}
        for run, spec in list((merged.get(section) or {}).items()):
            if run not in named and isinstance(spec, dict) and (
                    spec.get("backbone") not in backbones or spec.get("method") not in methods):
                del merged[section][run]
                dropped.append(run)
    return _drop_references(merged, dropped) if dropped else merged


def _drop_references(p: dict, dropped: list) -> dict:
    """Remove the pairs of report.beside and the seeds.runs entries that name a dropped run."""
    if p.get("report", {}).get("beside"):
        p["report"]["beside"] = {r: b for r, b in p["report"]["beside"].items() if r not in dropped and b not in dropped}
    if p.get("seeds", {}).get("runs"):
        p["seeds"]["runs"] = [r for r in p["seeds"]["runs"] if r not in dropped]
    return p


def _keep_runs(p: dict, keep: list, name: str) -> dict:
    """`keep_runs: [...]`: a profile that trains a few of its base's runs drops the others (and their pairs in
    report.beside and seeds.runs) without naming each of them, so it cannot drift as the base gains runs."""
    have = {*p.get("runs", {}), *(p.get("pair_runs") or {})}
    unknown = [r for r in keep if r not in have]
    if unknown:
        raise ParamError(f"profile {name}: keep_runs: {unknown} not among the runs of what it extends")
    p["runs"] = {r: spec for r, spec in p["runs"].items() if r in keep}
    p["pair_runs"] = {r: spec for r, spec in (p.get("pair_runs") or {}).items() if r in keep}
    if "beside" in p.get("report", {}):
        p["report"]["beside"] = {r: b for r, b in p["report"]["beside"].items() if r in keep and b in keep}
    if "controls" in p.get("report", {}):
        p["report"]["controls"] = {c: r for c, r in p["report"]["controls"].items()
                                   if c in keep and r in p["report"].get("beside", {})}
    if "seeds" in p:
        p["seeds"]["runs"] = [r for r in p["seeds"]["runs"] if r in keep]
    return p


def render(name: str) -> str:
    path = PROFILES / f"{name}.yaml"
    merged = resolve(name)
    try:
        validate(merged)
    except ParamError as e:
        raise ParamError(f"profile {name}: {e}") from None
    if "extends" not in (yaml.safe_load(path.read_text()) or {}):
        return path.read_text()  # a complete profile keeps its comments
    header = f"# Rendered from profiles/{name}.yaml by `python -m pipeline.profile {name}`; edit the profile, not this file.\n"
    return header + yaml.safe_dump(merged, sort_keys=False, default_flow_style=None, width=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="profile name: " + ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml"))))
    ap.add_argument("--out", default="params.yaml")
    ap.add_argument("--dvc-yaml", default=None,
                    help="where to write the DAG generated from it (default: dvc.yaml beside params.yaml; 'none' skips)")
    a = ap.parse_args(argv)
    dvc_yaml = a.dvc_yaml or (str(Path(a.out).with_name("dvc.yaml")) if Path(a.out).name == "params.yaml" else "none")
    try:
        atomic_write_text(render(a.name), a.out)
        if dvc_yaml != "none":   # the DAG follows the params: its stages are the profile's runs and seeds
            from pipeline import dag

            atomic_write_text(dag.render(load(a.out)), dvc_yaml)
    except ParamError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{a.out}: profile {a.name}" + ("" if dvc_yaml == "none" else f"; {dvc_yaml}: its DAG"))


if __name__ == "__main__":
    main()
