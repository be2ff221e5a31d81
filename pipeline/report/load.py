"""Loading a report's inputs: every run instance's metrics files, the mine stage's metrics, the papers' reference
numbers, claims and bibliography (references.yaml). Nothing here computes or renders.

Every path is taken relative to a `root` directory, so tests can point it at a temporary folder; a missing or
unreadable file is a DataError naming it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from pipeline import paths
from pipeline.params import DataError, instance_name

REFERENCES = Path(__file__).with_name("references.yaml")
SEED_PAPERS = (
    "gsssl-group-siamese-ssl.txt", "leoclr-original-images.txt", "pnnclr-pseudo-nearest-neighbours.txt",
    "pwself-patch-wise-ssl.txt", "seppid-semantic-positive-pairs.txt",
)
REF_REQUIRED = ("method", "dataset", "backbone", "epochs", "protocol", "top1", "source")
FLOOR_METHOD = "random"
SEPPID_METHOD = "seppid"  # the name of SePP-ID's rows in references.yaml
# per-epoch CSV columns that are bookkeeping, not loss terms
CURVE_META = ("epoch", "step", "loss", "lr", "views_per_s", "epoch_time_s", "knn_top1")
DIAGNOSTIC_PREFIXES = ("teacher_entropy_", "prototypes_")  # collapse diagnostics (DINO, PW-Self): not loss terms
DASH = "—"


@dataclass(eq=False)  # identity: a run's metrics hold DataFrames
class RunMetrics:
    run: str
    method: str
    backbone: str
    pretrain: dict
    evaluate: dict
    curve: pd.DataFrame | None  # None for an untrained (random) run
    pairs: str | None = None    # SePP-ID pair set the run trained with (pair_runs), None for a plain run
    seed: int = 0               # the training seed of this instance
    predictions: pd.DataFrame | None = None  # per-image test predictions (evaluate stage), None when not saved
    instances: list["RunMetrics"] = field(default_factory=list)  # every seed of the run, this one first

    @property
    def seeds(self) -> list[int]:
        return [i.seed for i in self.instances] or [self.seed]

    @property
    def trained(self) -> bool:
        return self.method != FLOOR_METHOD and (self.pretrain.get("epochs") or 0) > 0


# --- loading ---------------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found (run the {what} stage for this run first)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object")
    return obj


def _check_same(path: Path, obj: dict, key: str, want: str | None, run: str, section: str = "runs") -> None:
    # metrics left from an older params.yaml would otherwise be reported under the new name
    if key in obj and obj[key] != want:
        raise DataError(f"{path}: {key} {obj[key]!r} does not match {section}.{run}.{key} {want!r} (stale metrics: re-run the stage)")


def load_run(root: str | Path, run: str, method: str, backbone: str, pairs: str | None = None,
             instance: str | None = None, seed: int = 0) -> RunMetrics:
    """One instance's metrics files under `root` (`instance`: the run's name under this training seed, default
    the run itself); a missing or unreadable file raises DataError naming it. Predictions are optional."""
    root, instance = Path(root), instance or run
    pre_path = root / paths.pretrain_metrics(instance)
    ev_path = root / paths.evaluate_metrics(instance)
    curve_path = root / paths.curve(instance)
    pre = _read_json(pre_path, "pretrain")
    ev = _read_json(ev_path, "evaluate")
    section = "pair_runs" if pairs else "runs"
    for path, obj in ((pre_path, pre), (ev_path, ev)):
        _check_same(path, obj, "method", method, run, section)
        _check_same(path, obj, "backbone", backbone, run, section)
        _check_same(path, obj, "base_run", run, run, section)
        _check_same(path, obj, "seed", seed, run, section)
    if pairs or "pairs" in pre:  # a plain run's metrics must not come from a pair run of the same name
        _check_same(pre_path, pre, "pairs", pairs, run, section)
    curve = None
    if method != FLOOR_METHOD and (pre.get("epochs") or 0) > 0:  # a random floor has no curve to plot
        try:
            curve = pd.read_csv(curve_path)
        except FileNotFoundError:
            raise DataError(f"{curve_path}: not found (run the pretrain stage for this run first)") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise DataError(f"{curve_path}: not a readable CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not {"epoch", "loss"} <= set(curve.columns):
            raise DataError(f"{curve_path}: expected columns epoch and loss, got {', '.join(map(str, curve.columns))}")
    preds = load_predictions(root / paths.predictions(instance))
    return RunMetrics(run, method, backbone, pre, ev, curve, pairs, seed, preds)


def load_predictions(path: Path) -> pd.DataFrame | None:
    """A run's per-image test predictions sorted by test position; None when the file does not exist (runs
    evaluated before predictions were saved)."""
    if not path.exists():
        return None
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not {"index", "label"} <= set(df.columns):
        raise DataError(f"{path}: expected columns index and label, got {', '.join(map(str, df.columns))}")
    return df.sort_values("index").reset_index(drop=True)


def load_group(root: str | Path, run: str, spec: dict, seeds: list[int], default_seed: int) -> RunMetrics:
    """Every training seed of a run; the first instance stands for the run (curves, cost) and lists them all."""
    order = sorted(seeds, key=lambda s: (s != default_seed, s))  # the default seed's instance keeps the run's name
    group = [load_run(root, run, spec["method"], spec["backbone"], spec.get("pairs"),
                      instance_name(run, s, default_seed), s) for s in order]
    group[0].instances = group
    return group[0]


@dataclass(frozen=True)
class Untrained:
    """A run of params with no metrics yet (or not for every training seed): the report lists it, shows no number."""
    run: str
    method: str
    seeds_done: int   # training seeds whose metrics exist
    seeds: int        # training seeds the run has

    @property
    def label(self) -> str:
        return self.run if not self.seeds_done else f"{self.run} ({self.seeds_done} of {self.seeds} seeds)"


def _has_metrics(root: Path, instance: str) -> bool:
    """Whether an instance has any of its metrics files: one with none is not trained yet; one with some is
    loaded, so a lost file is an error naming it, not a silently missing run."""
    return (root / paths.pretrain_metrics(instance)).exists() or (root / paths.evaluate_metrics(instance)).exists()


def untrained_runs(root: str | Path, runs: dict[str, dict], seeds: dict[str, list[int]] | None = None,
                   default_seed: int = 0) -> dict[str, Untrained]:
    """{run: Untrained} for each run of `runs` with a training seed that has no metrics files at all. A run is
    shown only once every seed is trained, so its mean and interval never mix runs of different seed counts."""
    root, seeds = Path(root), seeds or {}
    out = {}
    for name, spec in runs.items():
        ss = seeds.get(name, [default_seed])
        done = sum(_has_metrics(root, instance_name(name, s, default_seed)) for s in ss)
        if done < len(ss):
            out[name] = Untrained(name, spec["method"], done, len(ss))
    return out


def load_runs(root: str | Path, runs: dict[str, dict], pair_runs: dict[str, dict] | None = None,
              beside: dict[str, str] | None = None, seeds: dict[str, list[int]] | None = None,
              default_seed: int = 0) -> list[RunMetrics]:
    """All runs in params order, each run that is compared with a base run listed right after it (`beside`:
    {run: base run}; a pair run's base defaults to the plain run of the same method and backbone).
    `runs` / `pair_runs` are params.yaml's mappings (name -> {method, backbone[, pairs]}); `seeds` its
    {run: [training seeds]} (a run not in it trained under `default_seed` only)."""
    seeds = seeds or {}
    every = [load_group(root, name, spec, seeds.get(name, [default_seed]), default_seed)
             for name, spec in [*runs.items(), *(pair_runs or {}).items()]]
    bases = base_runs(every, beside or {})
    out: list[RunMetrics] = []

    def place(m: RunMetrics) -> None:
        if m in out:
            return
        out.append(m)
        for q in every:
            if bases.get(q.run) is m:
                place(q)

    for m in every:
        if bases.get(m.run) is None or bases[m.run] not in every:
            place(m)
    return out + [m for m in every if m not in out]


def base_runs(metrics: list[RunMetrics], beside: dict[str, str]) -> dict[str, RunMetrics]:
    """{run: the run it is compared with}: `beside` entries, and each pair run's plain run of the same method
    and backbone (SePP-ID adds pairs to that run) unless `beside` names another."""
    by_name = {m.run: m for m in metrics}
    out = {run: by_name[base] for run, base in beside.items() if run in by_name and base in by_name}
    for m in metrics:
        if m.pairs is not None and m.run not in out:
            b = base_run(metrics, m)
            if b is not None:
                out[m.run] = b
    return out


def base_run(metrics: list[RunMetrics], pair_run: RunMetrics) -> RunMetrics | None:
    """The plain run a pair run adds pairs to: the first of the same method and backbone."""
    return next((m for m in metrics if m.pairs is None and m.method == pair_run.method and m.backbone == pair_run.backbone), None)


def load_mine(root: str | Path) -> dict:
    """reports/metrics/mine.json (the mine stage's metrics)."""
    path = Path(root) / paths.mine_metrics()
    if not path.exists():
        raise DataError(f"{path}: not found (run the mine stage first: dvc repro mine)")
    return _read_json(path, "mine")


def load_recipe_search(path: str | Path) -> dict:
    """The recipe search's table (benchmarks/recipe_search.py, named by report.recipe_search)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"report.recipe_search: {path} not found (python benchmarks/recipe_search.py writes it)")
    table = _read_json(path, "recipe search")
    if not isinstance(table.get("families"), dict):
        raise DataError(f"{path}: no 'families' (not a table of benchmarks/recipe_search.py's round two)")
    return table


def load_references(path: str | Path = REFERENCES) -> list[dict]:
    """The papers' reference numbers; every entry is checked so a typo in the YAML fails loudly."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    refs = raw.get("references") if isinstance(raw, dict) else None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a top-level 'references:' list")
    for i, r in enumerate(refs):
        missing = [k for k in REF_REQUIRED if not isinstance(r, dict) or k not in r]
        if missing:
            raise DataError(f"{path}: references[{i}]: missing {', '.join(missing)}")
        if not _is_number(r["top1"]) or not isinstance(r["source"], str) or not r["source"].startswith(SEED_PAPERS):
            raise DataError(f"{path}: references[{i}]: top1 must be a number and source must name a seed paper file")
    return refs


CLAIM_REQUIRED = ("source", "method", "quote", "setting")


def load_claims(path: str | Path = REFERENCES) -> list[dict]:
    """The seed papers' headline claims (references.yaml `claims:`), each checked like a reference row."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) if path.exists() else None
    claims = (raw or {}).get("claims") or []
    for i, c in enumerate(claims):
        missing = [k for k in CLAIM_REQUIRED if not isinstance(c, dict) or k not in c]
        if missing:
            raise DataError(f"{path}: claims[{i}]: missing {', '.join(missing)}")
        if not str(c["source"]).startswith(SEED_PAPERS):
            raise DataError(f"{path}: claims[{i}]: source must name a seed paper file")
    return claims


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


PAPER_REQUIRED = ("name", "cite")


def load_papers(path: str | Path = REFERENCES) -> dict[str, dict]:
    """{seed paper file: {name, cite}}: how the report names each paper (references.yaml `papers:`)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) if path.exists() else None
    papers = (raw or {}).get("papers") or {}
    for key, p in papers.items():
        missing = [k for k in PAPER_REQUIRED if not isinstance(p, dict) or k not in p]
        if missing or key not in SEED_PAPERS:
            raise DataError(f"{path}: papers.{key}: " + (f"missing {', '.join(missing)}" if missing else "not a seed paper file"))
    return papers


def paper_of(source: str) -> str:
    """The seed paper file a `source` ('<file>, Table 3') names."""
    return str(source).split(",", 1)[0].strip()
