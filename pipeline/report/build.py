"""The report: every run's metrics in one table, the papers' reference numbers beside them, and figures.

Reads metrics files only (the pretrain summary JSON and per-epoch CSV, the evaluate JSON); it never imports
training or evaluation code, so a report can be rebuilt anywhere the metrics files are. Every path is taken
relative to a `root` directory, so tests can point it at a temporary folder.

    report = build_report(root, runs, dataset="cifar10", title="...")   # pure: reads, returns text and PNGs
    paths = write_report(report, root)                                  # atomic writes under root/reports

SePP-ID: runs of `pair_runs:` (trained with the mine stage's pairs) are listed right after their base run
(the plain run of the same method and backbone), with their pair set's size and pair accuracy from
reports/metrics/mine.json; a SePP-ID section adds the mining summary, the gain over the base run and the
similarity histogram of the mined pairs.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from pipeline import paths
from pipeline.params import DataError, instance_name
from pipeline.report import stats
from pipeline.utils import atomic_write_bytes, atomic_write_text

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


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Report:
    title: str
    markdown: str
    html: str
    figures: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes
    tables: list[Table] = field(default_factory=list)


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
        if _num(r["top1"]) is None or not isinstance(r["source"], str) or not r["source"].startswith(SEED_PAPERS):
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


# --- tables ----------------------------------------------------------------------------------------

def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _fmt(v: Any, digits: int = 2, suffix: str = "") -> str:
    x = _num(v)
    return DASH if x is None else f"{x:.{digits}f}{suffix}"


def _k_sort(keys) -> list[str]:
    return sorted({str(k) for k in keys}, key=lambda k: (float(k) if re.fullmatch(r"[0-9.]+", k) else math.inf, k))


def _pct_label(frac: str) -> str:
    return f"{float(frac) * 100:g}%"


def _delta_k(metrics: list[RunMetrics]) -> str | None:
    """The k used for the Δ-vs-floor column: 200 when measured (the design's choice), else the largest k."""
    ks = _k_sort(k for m in metrics for k in (m.evaluate.get("knn") or {}))
    return "200" if "200" in ks else (ks[-1] if ks else None)


def _pair_cells(m: RunMetrics, mine: dict | None) -> list[str]:
    """(pairs, pair accuracy) cells of a run: the size and accuracy of the pair set it trained with."""
    if m.pairs is None:
        return [DASH, DASH]
    st = (mine or {}).get(m.pairs) or {}
    n = st.get("pairs", m.pretrain.get("train_pairs"))
    acc = _num(st.get("pair_accuracy"))
    if m.pairs == "random" and st.get("kind") == "same_image":
        acc_cell = "— (image with itself)"
    else:
        acc_cell = DASH if acc is None else f"{100 * acc:.1f}%"
    return [f"{m.pairs} ({DASH if n is None else n})", acc_cell]


# --- protocols, means and intervals ----------------------------------------------------------------

@dataclass(frozen=True)
class Protocol:
    key: str    # the predictions column (semi: its prefix; one column per label draw, "_s<draw>")
    label: str  # as the tables show it

    @property
    def semi(self) -> bool:
        return self.key.startswith("semi_")


def protocols(metrics: list[RunMetrics]) -> list[Protocol]:
    """Every protocol measured on some run: kNN per k, linear, semi-supervised per fraction and learner."""
    evs = [i.evaluate for m in metrics for i in (m.instances or [m])]
    out = [Protocol(f"knn_{k}", f"kNN-{k}") for k in _k_sort(k for ev in evs for k in (ev.get("knn") or {}))]
    if any(_num((ev.get("linear") or {}).get("top1")) is not None for ev in evs):
        out.append(Protocol("linear", "linear"))
    fracs = _k_sort(f for ev in evs for f in (ev.get("semi") or {}))
    learners = sorted({lr for ev in evs for f in (ev.get("semi") or {}).values() for lr in (f or {})},
                      key=lambda s: (s != "logreg", s))  # the labelled-only baseline first
    out += [Protocol(f"semi_{float(f) * 100:g}pct_{lr}", f"semi {_pct_label(f)} {lr}") for f in fracs for lr in learners]
    return out


def _semi_entry(ev: dict, key: str) -> dict:
    """The evaluate JSON's semi entry of a protocol key semi_<pct>pct_<learner>."""
    pct, learner = re.fullmatch(r"semi_([0-9.e+-]+)pct_(.+)", key).groups()
    for frac, by_learner in (ev.get("semi") or {}).items():
        if math.isclose(float(frac) * 100, float(pct)):
            return (by_learner or {}).get(learner) or {}
    return {}


def json_value(ev: dict, key: str) -> float | None:
    """One instance's accuracy (%) in a protocol, from its evaluate metrics."""
    if key.startswith("knn_"):
        return _num((ev.get("knn") or {}).get(key[4:]))
    if key == "linear":
        return _num((ev.get("linear") or {}).get("top1"))
    return _num(_semi_entry(ev, key).get("mean"))


class Results:
    """Means over seeds from the metrics files, and, where every seed saved its per-image predictions, 95 %
    intervals over seeds and test images and paired differences (pipeline.report.stats)."""

    def __init__(self, metrics: list[RunMetrics], n_boot: int = stats.N_BOOT):
        self.metrics, self.n_boot = metrics, n_boot
        self._labels: np.ndarray | None = None
        self._boot: stats.Bootstrap | None = None
        self._cache: dict[tuple[str, str], np.ndarray | None] = {}
        self._per_seed: dict[tuple[str, str], np.ndarray] | None = None
        self._intervals: dict[tuple[str, str], stats.Interval] = {}

    def has_predictions(self, m: RunMetrics) -> bool:
        return all(i.predictions is not None for i in m.instances or [m])

    def _columns(self, df: pd.DataFrame, key: str) -> list[str]:
        if not key.startswith("semi_"):
            return [key] if key in df.columns else []
        return sorted((c for c in df.columns if re.fullmatch(re.escape(key) + r"_s\d+", str(c))),
                      key=lambda c: int(str(c).rsplit("_s", 1)[1]))

    def correct(self, m: RunMetrics, key: str) -> np.ndarray | None:
        """(seeds, test images) correctness of a run in a protocol; None without predictions for it."""
        if (m.run, key) not in self._cache:
            self._cache[(m.run, key)] = self._correct(m, key)
        return self._cache[(m.run, key)]

    def _correct(self, m: RunMetrics, key: str) -> np.ndarray | None:
        rows = []
        for inst in m.instances or [m]:
            df = inst.predictions
            cols = [] if df is None else self._columns(df, key)
            if not cols:
                return None
            labels = df["label"].to_numpy()
            if self._labels is None:
                self._labels = labels
            elif len(labels) != len(self._labels) or not np.array_equal(labels, self._labels):
                raise DataError(f"{paths.predictions(instance_name(inst.run, inst.seed, m.seed))}: its test labels differ "
                                "from the other runs' (evaluated on another test split: re-run its evaluate stage)")
            rows.append(df[cols].to_numpy().T)
        return stats.correct_matrix(rows, self._labels)

    @property
    def boot(self) -> stats.Bootstrap:
        if self._boot is None:
            self._boot = stats.Bootstrap(len(self._labels), n_boot=self.n_boot)
        return self._boot

    def _replicates(self, m: RunMetrics, key: str) -> np.ndarray:
        """Per-seed accuracies on every image resample, computed for all runs and protocols in one pass."""
        if self._per_seed is None:
            todo = [((r.run, p.key), c) for r in self.metrics for p in protocols(self.metrics)
                    if (c := self.correct(r, p.key)) is not None]
            reps = self.boot.per_seed(np.concatenate([c for _, c in todo])) if todo else None
            self._per_seed, start = {}, 0
            for name, c in todo:
                self._per_seed[name] = reps[:, start:start + len(c)]
                start += len(c)
        if (m.run, key) not in self._per_seed:  # a run outside `metrics`
            self._per_seed[(m.run, key)] = self.boot.per_seed(self.correct(m, key))
        return self._per_seed[(m.run, key)]

    def interval(self, m: RunMetrics, key: str) -> stats.Interval | None:
        c = self.correct(m, key)
        if c is None:
            return None
        if (m.run, key) not in self._intervals:
            self._intervals[(m.run, key)] = self.boot.accuracy(c, self._replicates(m, key))
        return self._intervals[(m.run, key)]

    def mean(self, m: RunMetrics, key: str) -> float | None:
        """Mean over seeds (from the predictions when there are any, else from the metrics files)."""
        iv = self.interval(m, key)
        if iv is not None:
            return iv.mean
        vals = [json_value(i.evaluate, key) for i in m.instances or [m]]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    def difference(self, m: RunMetrics, base: RunMetrics, key: str) -> stats.Difference | None:
        a, b = self.correct(m, key), self.correct(base, key)
        if a is None or b is None:
            return None
        return self.boot.difference(a, b, m.seeds, base.seeds, self._replicates(m, key), self._replicates(base, key))


def _iv_cell(iv: stats.Interval | None, mean: float | None) -> str:
    if iv is not None:
        return f"{iv.mean:.2f} [{iv.lo:.2f}, {iv.hi:.2f}]"
    return _fmt(mean)


def _diff_cell(d: stats.Difference | None, ours: float | None, base: float | None, short: bool = True) -> str:
    if d is not None:
        mark = {stats.BETTER: "better", stats.WORSE: "worse", stats.SAME: "≈"}[d.verdict] if short else d.verdict
        return f"{d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}] {mark}"
    if ours is None or base is None:
        return DASH
    return f"{ours - base:+.2f} (no per-image predictions)"


def _seeds_cell(m: RunMetrics) -> str:
    return str(len(m.seeds))


def _floors(metrics: list[RunMetrics]) -> dict[str, RunMetrics]:
    """The first `random` run of each backbone: an untrained encoder, the floor its trained runs must clear."""
    floors: dict[str, RunMetrics] = {}
    for m in metrics:
        if m.method == FLOOR_METHOD:
            floors.setdefault(m.backbone, m)
    return floors


def _not_converged(ev: dict) -> list[str]:
    """The fits of one evaluate JSON that did not converge: linear, and semi-supervised fits by draw."""
    out = []
    lin = ev.get("linear") or {}
    if lin.get("converged") is False:
        g = _num(lin.get("grad_norm"))
        out.append("linear" + ("" if g is None else f" (max |grad| {g:.2g})"))
    for frac, by_learner in (ev.get("semi") or {}).items():
        for learner, entry in (by_learner or {}).items():
            conv = (entry or {}).get("converged")
            conv = conv if isinstance(conv, list) else [conv]
            bad = [i for i, c in enumerate(conv) if c is False]
            if bad:
                out.append(f"semi {_pct_label(frac)} {learner} (draws {', '.join(map(str, bad))})")
    return out


def _flag(m: RunMetrics, key: str) -> str:
    """The † of a protocol cell when some seed's fit in it did not converge."""
    for inst in m.instances or [m]:
        ev = inst.evaluate
        if key == "linear" and (ev.get("linear") or {}).get("converged") is False:
            return " †"
        if key.startswith("semi_"):
            conv = _semi_entry(ev, key).get("converged")
            if conv is False or (isinstance(conv, list) and False in conv):
                return " †"
    return ""


INTERVAL_NOTE = ("Mean over training seeds; in brackets the 95 % interval over seeds and test images (two-level bootstrap, "
                 "pipeline/report/stats.py), over test images only for a run with 1 seed.")


def _no_predictions_note(metrics: list[RunMetrics], res: Results) -> str:
    missing = [m.run for m in metrics if not res.has_predictions(m)]
    if not missing:
        return ""
    return (f" No per-image predictions for {', '.join(missing)} (evaluated before they were saved): their cells "
            "show the mean only, without an interval or verdict.")


def knn_table(metrics: list[RunMetrics], res: Results, mine: dict | None = None) -> Table:
    """kNN accuracy per run with its interval, and the gain over the random-init floor of its backbone.
    With SePP-ID pair runs, two more columns: the pair set (kind and number of pairs) and its pair accuracy."""
    protos = [p for p in protocols(metrics) if p.key.startswith("knn_")]
    dk = _delta_k(metrics)
    floors = _floors(metrics)
    with_pairs = any(m.pairs for m in metrics)
    cols = ["run", "method", "backbone", "seeds", "epochs"] + (["pairs (n)", "pair acc."] if with_pairs else [])
    cols += [p.label for p in protos] + ([f"Δ kNN-{dk} vs random"] if dk is not None else [])
    rows = []
    for m in metrics:
        row = [m.run, m.method, m.backbone, _seeds_cell(m), str(m.pretrain.get("epochs", DASH))]
        row += _pair_cells(m, mine) if with_pairs else []
        row += [_iv_cell(res.interval(m, p.key), res.mean(m, p.key)) for p in protos]
        if dk is not None:
            floor = floors.get(m.backbone)
            if m.method == FLOOR_METHOD:
                row.append("(floor)")
            elif floor is None:
                row.append(f"{DASH} (no random run for {m.backbone})")
            else:
                ours, base = res.mean(m, f"knn_{dk}"), res.mean(floor, f"knn_{dk}")
                row.append(DASH if ours is None or base is None else f"{ours - base:+.2f}")
        rows.append(row)
    caption = ("Top-1 accuracy (%) on the test split of weighted kNN (cosine, k neighbours) on frozen-backbone features. "
               + INTERVAL_NOTE + " Δ is the gain over the untrained (random-init) encoder of the same backbone."
               + _no_predictions_note(metrics, res))
    if with_pairs:
        caption += (" SePP-ID runs follow their base run: trained on the original images plus a pair set of the mine stage "
                    "(semantic: mined pairs; random: the control of the SePP-ID paper's Table 9, as many pairs). Pair accuracy: "
                    "share of pairs whose two images have the same label (labels are used for this metric only).")
    return Table("kNN accuracy", cols, rows, caption)


def probe_table(metrics: list[RunMetrics], res: Results) -> Table:
    """Linear probe and semi-supervised accuracy per run; † marks a fit that did not converge."""
    protos = [p for p in protocols(metrics) if not p.key.startswith("knn_")]
    cols = ["run", "seeds"] + [p.label for p in protos]
    rows = []
    for m in metrics:
        row = [m.run, _seeds_cell(m)]
        for p in protos:
            iv = res.interval(m, p.key)
            if iv is None and p.semi and len(m.seeds) == 1:  # old metrics: mean ± std over the label draws
                e = _semi_entry(m.evaluate, p.key)
                mean, std = _num(e.get("mean")), _num(e.get("std"))
                cell = DASH if mean is None else f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
            else:
                cell = _iv_cell(iv, res.mean(m, p.key))
            row.append(cell + _flag(m, p.key))
        rows.append(row)
    caption = ("Top-1 accuracy (%) on the test split: linear probe (logistic regression, regularisation chosen on a validation "
               "split) and semi-supervised with a fraction of the training labels (logreg: the labelled part only; the other "
               "learner also uses unlabelled features). " + INTERVAL_NOTE + " A semi-supervised run's per-image accuracy is "
               "averaged over its label draws; without predictions, ± is the std over the draws. † : a fit that did not "
               "converge (see below)." + _no_predictions_note(metrics, res))
    return Table("Linear probe and semi-supervised", cols, rows, caption)


def convergence_flags_table(metrics: list[RunMetrics]) -> Table | None:
    """Every linear probe / semi-supervised fit that stopped at its iteration budget, per seed."""
    rows = []
    for m in metrics:
        for inst in m.instances or [m]:
            for fit in _not_converged(inst.evaluate):
                rows.append([m.run, str(inst.seed), fit])
    if not rows:
        return None
    return Table("Fits that did not converge", ["run", "seed", "fit"], rows,
                 "These fits stopped at their iteration budget (evaluate.linear_max_iter) before the solver's tolerance: their "
                 "accuracy may be below what the features allow, so differences involving them are less trustworthy.")


def cost_table(metrics: list[RunMetrics]) -> Table:
    """Pretraining cost per run: epochs, steps, images seen, wall time, throughput, memory (means over seeds)."""
    cols = ["run", "seeds", "epochs", "steps", "images seen", "pretrain time (s)", "views/s", "peak mem (MiB)"]
    rows = []
    for m in metrics:
        pres = [i.pretrain for i in m.instances or [m]]

        def mean(key):
            vals = [_num(p.get(key)) for p in pres]
            return None if any(v is None for v in vals) else float(np.mean(vals))
        trained = m.trained
        seen = _images_seen(m)
        rows.append([m.run, _seeds_cell(m), str(m.pretrain.get("epochs", DASH)), str(m.pretrain.get("steps", DASH)),
                     DASH if seen is None or not trained else f"{seen:,}",
                     _fmt(mean("wall_time_s"), 1) if trained else DASH, _fmt(mean("views_per_s"), 0) if trained else DASH,
                     _fmt(mean("peak_mem_mib"), 0)])
    return Table("Pretraining cost", cols, rows,
                 "Per run (mean over its seeds): images seen = steps x batch size; time and views/s are for pretraining and "
                 "depend on what else the machine ran at the time.")


def _images_seen(m: RunMetrics) -> int | None:
    steps, batch = m.pretrain.get("steps"), m.pretrain.get("batch_size")
    return int(steps) * int(batch) if isinstance(steps, int) and isinstance(batch, int) else None


def comparison_tables(metrics: list[RunMetrics], res: Results, mine: dict | None = None) -> list[Table]:
    """Our results, split so each fits a page: kNN, linear / semi-supervised, the non-converged fits, cost."""
    flags = convergence_flags_table(metrics)
    return [knn_table(metrics, res, mine), probe_table(metrics, res)] + ([flags] if flags else []) + [cost_table(metrics)]


def _pct(v) -> str:
    x = _num(v)
    return DASH if x is None else f"{100 * x:.1f}%"


def seppid_tables(metrics: list[RunMetrics], mine: dict) -> list[Table]:
    """SePP-ID: what the semantic sampler found (both pair sets), and each pair run against its base run."""
    bounds = f"[{mine.get('min_sim')}, {mine.get('max_sim')}]"
    cols = ["pair set", "encoder (layer)", "K of pool", "bounds", "pairs", "anchors covered", "positives / anchor",
            "pair accuracy"]
    rows = []
    for name in ("semantic", "random"):
        st = mine.get(name) or {}
        kind = "random: " + str(st.get("kind", "")).replace("_", " ") if name == "random" else "semantic (mined)"
        acc = _pct(st.get("pair_accuracy"))
        if name == "random" and st.get("kind") == "same_image":
            acc = "— (image with itself)"
        rows.append([kind, f"{mine.get('encoder_run')} ({mine.get('layer')})", f"{mine.get('K')} of {mine.get('pool')}",
                     bounds if name == "semantic" else DASH, str(st.get("pairs", DASH)),
                     str(st.get("anchors_covered", DASH)), _fmt(st.get("mean_positives_per_anchor")), acc])
    caption = (f"The mine stage: K training images encoded un-augmented by run {mine.get('encoder_run')}'s encoder, pairs "
               f"with cosine similarity in {bounds} (SePP-ID §3.1, Algorithm 1), at most "
               f"{mine.get('max_per_anchor') or 'any number of'} positives per anchor. The random set is the paper's "
               "Table 9 control: as many pairs, not semantic.")
    tables = [Table("SePP-ID: mined pairs", cols, rows, caption)]

    dk = _delta_k(metrics)
    cols = ["run", "pairs", "base run", f"kNN-{dk}", f"Δ kNN-{dk}", "linear", "Δ linear"]
    rows = []
    for m in metrics:
        if m.pairs is None:
            continue
        base = base_run(metrics, m)
        ours = (_num((m.evaluate.get("knn") or {}).get(dk)), _num((m.evaluate.get("linear") or {}).get("top1")))
        ref = ((_num((base.evaluate.get("knn") or {}).get(dk)), _num((base.evaluate.get("linear") or {}).get("top1")))
               if base else (None, None))
        d = [DASH if o is None or r is None else f"{o - r:+.2f}" for o, r in zip(ours, ref)]
        rows.append([m.run, m.pairs, base.run if base else f"{DASH} (no plain {m.method} run on {m.backbone})",
                     _fmt(ours[0]), d[0], _fmt(ours[1]), d[1]])
    tables.append(Table("SePP-ID: gain over the base run", cols, rows,
                        "Each pair run against the plain run of the same method and backbone (top-1 %, test split)."))
    return tables


BESIDE_PROTOCOLS = ("knn_10", "knn_200", "linear")


def _beside_protocols(metrics: list[RunMetrics]) -> list[Protocol]:
    """The beside table's columns: kNN-10 (PW-Self's claim), kNN-200, linear and the semi-supervised logreg fits."""
    return [p for p in protocols(metrics) if p.key in BESIDE_PROTOCOLS or (p.semi and p.key.endswith("_logreg"))]


DIFF_NOTE = ("Difference in points, run minus base, on the same test images; in brackets its 95 % interval (bootstrap over "
             "test images and seeds; seeds paired by seed value when both runs have the same seeds: the same seed gives the "
             "same data order and augmentation draws). Verdict: better / worse when the interval excludes 0, ≈ when it "
             "contains 0 (no difference detectable at this budget).")


def beside_table(metrics: list[RunMetrics], bases: dict[str, RunMetrics], res: Results) -> Table | None:
    """Each paper's method against the method it builds on (report.beside): the paired difference with its interval
    and verdict in each protocol, and the pretraining speed relative to the base."""
    rows_of = [m for m in metrics if m.run in bases]
    if not rows_of:
        return None
    protos = _beside_protocols(metrics)
    cols = ["run", "base run", "seeds"] + [f"Δ {p.label}" for p in protos] + ["views/s vs base"]
    rows = []
    for m in rows_of:
        base = bases[m.run]
        cells = [_diff_cell(res.difference(m, base, p.key), res.mean(m, p.key), res.mean(base, p.key)) + _flag(m, p.key)
                 + ("" if _flag(m, p.key) else _flag(base, p.key)) for p in protos]
        speed, base_speed = _num(m.pretrain.get("views_per_s")), _num(base.pretrain.get("views_per_s"))
        ratio = DASH if not speed or not base_speed else f"{speed / base_speed:.2f}x"
        rows.append([m.run, base.run, f"{len(m.seeds)} / {len(base.seeds)}"] + cells + [ratio])
    return Table("Methods beside their base", cols, rows,
                 "Each run against the run it builds on (report.beside; a SePP-ID pair run against its plain base run). "
                 + DIFF_NOTE + " † : a fit of either run did not converge. views/s compares pretraining throughput "
                 "(runs that shared the machine with other work are slower)." + _no_predictions_note(
                     [*rows_of, *{id(b): b for b in bases.values()}.values()], res))


def claim_pairs(claim: dict, metrics: list[RunMetrics], bases: dict[str, RunMetrics]) -> list[tuple[RunMetrics, RunMetrics]]:
    """Our (run, base) pairs that test a claim: its `runs` when given, SePP-ID's semantic pair runs, else the
    beside runs of its method."""
    if claim.get("runs"):
        picked = [m for m in metrics if m.run in claim["runs"] and m.run in bases]
    elif claim["method"] == SEPPID_METHOD:
        picked = [m for m in metrics if m.pairs == "semantic" and m.run in bases]
    else:
        picked = [m for m in metrics if m.method == claim["method"] and m.pairs is None and m.run in bases]
    return [(m, bases[m.run]) for m in picked]


def claims_table(claims: list[dict], metrics: list[RunMetrics], bases: dict[str, RunMetrics], res: Results) -> Table:
    """Each seed paper's headline claim against what we measured on our pair of runs."""
    labels = {p.key: p.label for p in protocols(metrics)}
    cols = ["paper", "claim (quoted)", "paper's setting", "our run vs base", "protocol", "our difference [95 % interval]",
            "verdict"]
    rows = []
    for c in claims:
        head = [c["source"], f"“{c['quote']}”", c["setting"]]
        pairs = claim_pairs(c, metrics, bases)
        if len(pairs) > 1:  # one quote, several of our pairs: the quote once
            head_rest = [c["source"], "(same claim)", DASH]
        key = c.get("protocol", "linear")
        if not pairs:
            rows.append(head + ["not run in this profile", labels.get(key, key), DASH, DASH])
        for n, (m, base) in enumerate(pairs):
            if n == 1:
                head = head_rest
            d = res.difference(m, base, key)
            ours = (f"{m.run} vs {base.run} ({len(m.seeds)} / {len(base.seeds)} seeds, "
                    f"{m.pretrain.get('epochs', DASH)} / {base.pretrain.get('epochs', DASH)} epochs)")
            if d is None:
                cell = _diff_cell(None, res.mean(m, key), res.mean(base, key))
                verdict = "not tested (no per-image predictions)" if res.mean(m, key) is not None else DASH
            else:
                cell, verdict = f"{d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}]", d.verdict + (
                    "" if min(d.seeds, d.seeds_base) > 1 else " (test images only: 1 seed)")
            rows.append(head + [ours, labels.get(key, key) + _flag(m, key), cell, verdict])
    return Table("Papers' claims", cols, rows,
                 "Each seed paper's headline claim, quoted with the setting it was measured in (references.yaml), against our "
                 "pair of runs at this profile's budget (far fewer epochs, a smaller backbone and image size: a verdict says "
                 "what this budget can detect, not whether the paper is right). " + DIFF_NOTE)


def _norm_dataset(name: str) -> str:
    n = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return {"imagenet1k": "imagenet", "in1k": "imagenet", "tinyimagenet200": "tinyimagenet"}.get(n, n)


def select_references(refs: list[dict], methods: list[str], dataset: str) -> list[dict]:
    """References for these methods, pre-trained and evaluated on this dataset (transfer rows from another
    pre-training dataset are not comparable, so they stay out). Order: methods as in the run list, plain
    settings before variants, then the YAML's (paper, table) order."""
    want = _norm_dataset(dataset)
    order = {m: i for i, m in enumerate(dict.fromkeys(methods))}
    picked = [(i, r) for i, r in enumerate(refs)
              if r["method"] in order and _norm_dataset(r["dataset"]) == want
              and _norm_dataset(r.get("pretrain_dataset", r["dataset"])) == want]
    picked.sort(key=lambda ir: (order[ir[1]["method"]], ir[1].get("variant") is not None, ir[0]))
    return [r for _, r in picked]


def reference_table(refs: list[dict], methods: list[str], dataset: str) -> Table:
    """`methods` may include "seppid" (when pair runs exist): SePP-ID's own rows, labelled with their setting."""
    sel = select_references(refs, [m for m in methods if m != FLOOR_METHOD], dataset)
    cols = ["method", "variant", "dataset", "backbone", "epochs", "protocol", "top-1 (%)", "source", "note"]
    rows = []
    for r in sel:
        proto = f"kNN (k={r['k']})" if r["protocol"] == "knn" and "k" in r else r["protocol"]
        rows.append([r["method"], r.get("variant") or DASH, r["dataset"], r["backbone"],
                     DASH + " (not stated)" if r["epochs"] is None else str(r["epochs"]), proto, _fmt(r["top1"]),
                     r["source"], r.get("note") or ""])
    caption = ("Published numbers, quoted from the seed papers in their own settings (dataset, backbone, epochs, batch size, "
               "protocol): they are not our measurements and differ from our setting, so compare them with care. "
               f"Shown: methods in this run list, pre-trained and evaluated on {dataset}.")
    return Table("Papers' reference numbers", cols, rows, caption)


# --- figures ---------------------------------------------------------------------------------------

def _png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)  # Agg canvas directly: no pyplot global state, no display needed
    buf = io.BytesIO()
    # no Software/date metadata: the same metrics give the same bytes, so DVC hashes stay stable
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def _monitored(metrics: list[RunMetrics]) -> list[RunMetrics]:
    return [m for m in metrics if m.pretrain.get("knn_monitor")]


def convergence_table(metrics: list[RunMetrics]) -> Table | None:
    """The per-epoch kNN monitor (train.knn_monitor) of the runs that had it on: accuracy against epochs."""
    runs = _monitored(metrics)
    if not runs:
        return None
    epochs = max(len(m.pretrain["knn_monitor"]) for m in runs)
    cols = ["run", "method", "monitor images (bank / test)"] + [f"epoch {e}" for e in range(epochs)]
    rows = []
    for m in runs:
        vals = list(m.pretrain["knn_monitor"]) + [None] * (epochs - len(m.pretrain["knn_monitor"]))
        bank, test = m.pretrain.get("knn_monitor_images") or (None, None)
        rows.append([m.run, m.method, f"{bank} / {test}"] + [_fmt(v) for v in vals])
    return Table("Convergence: kNN-200 per epoch", cols, rows,
                 "Runs with the per-epoch kNN monitor on (train.knn_monitor): kNN-200 top-1 (%) of the encoder the run "
                 "would export, before training (epoch 0) and after each epoch; bank and test images evenly spaced over "
                 "their splits. Comparable between runs with the same monitor images, not with the full-split numbers "
                 "above (2000 test images: about ±1 point of sampling noise).")


def convergence_figure(metrics: list[RunMetrics]) -> bytes | None:
    runs = _monitored(metrics)
    if not runs:
        return None
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for m in runs:
        vals = m.pretrain["knn_monitor"]
        ax.plot(range(len(vals)), [float("nan") if v is None else v for v in vals], marker="o", label=m.run)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("kNN-200 top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Per-epoch kNN monitor", fontsize=10)
    return _png(fig)


def loss_terms(columns) -> list[str]:
    """The per-term loss columns of a training curve: neither bookkeeping nor a collapse diagnostic."""
    return [col for col in columns if col not in CURVE_META and not col.startswith(DIAGNOSTIC_PREFIXES)]


def loss_figure(metrics: list[RunMetrics]) -> bytes | None:
    """Training loss per epoch, one panel per trained run (loss scales differ between methods)."""
    runs = [m for m in metrics if m.curve is not None and len(m.curve)]
    if not runs:
        return None
    ncol = min(3, len(runs))
    nrow = math.ceil(len(runs) / ncol)
    fig = Figure(figsize=(4.2 * ncol, 3.2 * nrow), layout="constrained")
    for i, m in enumerate(runs):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        c = m.curve
        terms = loss_terms(c.columns)
        ax.plot(c["epoch"], c["loss"], marker="o", lw=2, label="loss")
        for term in terms:  # per-term losses, thinner
            ax.plot(c["epoch"], c[term], lw=1, ls="--", label=term)
        values = c[["loss", *terms]].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        if len(values) and values.min() > 0 and values.max() / values.min() > 20:
            ax.set_yscale("log")  # unweighted terms (Barlow Twins' off-diagonal sum) would flatten the loss line
        ax.set_title(f"{m.run} ({m.method}, {m.backbone})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if terms:
            ax.legend(fontsize=7)
    return _png(fig)


FIG_DPI = 150           # figures are ~1400 px wide, shown at full width in the HTML
FIG_WIDTH = 9.4         # inches


def _backbone_colors(metrics: list[RunMetrics]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    return {bb: palette[i % len(palette)] for i, bb in enumerate(dict.fromkeys(m.backbone for m in metrics))}


def _bar_panel(ax, metrics: list[RunMetrics], res: Results, p: Protocol, colors: dict[str, str]) -> None:
    """One protocol: trained runs sorted by mean accuracy, interval whiskers, each backbone's floor a line."""
    runs = [(m, res.mean(m, p.key), res.interval(m, p.key)) for m in metrics if m.method != FLOOR_METHOD]
    runs = sorted([r for r in runs if r[1] is not None], key=lambda r: r[1])
    ys = range(len(runs))
    ax.barh(ys, [r[1] for r in runs], color=[colors[r[0].backbone] for r in runs], height=0.7)
    lo_hi = [(r[2].lo, r[2].hi) if r[2] is not None else (r[1], r[1]) for r in runs]
    ax.errorbar([r[1] for r in runs], list(ys), xerr=[[r[1] - lh[0] for r, lh in zip(runs, lo_hi)],
                                                      [lh[1] - r[1] for r, lh in zip(runs, lo_hi)]],
                fmt="none", ecolor="black", elinewidth=1, capsize=2)
    ax.set_yticks(list(ys), [r[0].run for r in runs], fontsize=7)
    values = [v for lh in lo_hi for v in lh]
    for bb, floor in _floors(metrics).items():
        f = res.mean(floor, p.key)
        if f is not None:
            ax.axvline(f, color=colors[bb], ls="--", lw=1.2, label=f"random init ({bb})")
            values.append(f)
    if values:
        lo, hi = min(values), max(values)
        pad = max(0.5, 0.06 * (hi - lo))
        ax.set_xlim(max(0.0, lo - pad), min(100.0, hi + pad))
    ax.set_title(p.label, fontsize=9)
    ax.set_xlabel("top-1 (%)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def accuracy_figure(metrics: list[RunMetrics], res: Results | None = None) -> bytes | None:
    """Per protocol a sorted horizontal bar chart: mean over seeds, 95 % interval whiskers, the random-init floor of
    each backbone as a dashed line; the axis spans the data, not 0-100."""
    res = res or Results(metrics)
    protos = [p for p in protocols(metrics) if any(res.mean(m, p.key) is not None for m in metrics if m.method != FLOOR_METHOD)]
    if not protos:
        return None
    n_runs = sum(m.method != FLOOR_METHOD for m in metrics)
    ncol = 2 if len(protos) > 1 else 1
    nrow = math.ceil(len(protos) / ncol)
    panel_h = 0.6 + 0.17 * n_runs
    fig = Figure(figsize=(FIG_WIDTH, panel_h * nrow + 0.4), layout="constrained")
    colors = _backbone_colors(metrics)
    for i, p in enumerate(protos):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        _bar_panel(ax, metrics, res, p, colors)
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    return _png(fig, FIG_DPI)


def cost_figure(metrics: list[RunMetrics], res: Results | None = None) -> bytes | None:
    """Accuracy against pretraining cost: wall time and images seen (steps x batch), one point per trained run with
    its interval; each backbone's random-init floor as a dashed line."""
    res = res or Results(metrics)
    key = next((p for p in protocols(metrics) if p.key == "knn_200"), None) or next(iter(protocols(metrics)), None)
    runs = [m for m in metrics if m.trained and res.mean(m, key.key) is not None] if key else []
    if not runs:
        return None
    colors = _backbone_colors(metrics)
    fig = Figure(figsize=(FIG_WIDTH, 4.2), layout="constrained")
    for j, (xlabel, xs) in enumerate((("pretraining wall time (s)", [_num(m.pretrain.get("wall_time_s")) for m in runs]),
                                       ("images seen (steps x batch)", [_images_seen(m) for m in runs]))):
        ax = fig.add_subplot(1, 2, j + 1)
        named = []
        for m, x in zip(runs, xs):
            if x is None:
                continue
            y, iv = res.mean(m, key.key), res.interval(m, key.key)
            err = [[y - iv.lo], [iv.hi - y]] if iv is not None else None
            ax.errorbar([x], [y], yerr=err, fmt="o", color=colors[m.backbone], ms=4, capsize=2)
            named.append((x, y, m.run))
        for bb, floor in _floors(metrics).items():
            f = res.mean(floor, key.key)
            if f is not None:
                ax.axhline(f, color=colors[bb], ls="--", lw=1, label=f"random init ({bb})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))  # 300, not 3x10^2
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if str(int(v))[0] in "25" else ""))
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(f"{key.label} top-1 (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
        if j == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
        _label_points(ax, named)
    return _png(fig, FIG_DPI)


LABEL_GAP_PT = 8.0      # a 6 pt label box is ~7.5 pt tall: the least vertical distance between two labels side by side
LABEL_NEAR_PT = 45.0    # points closer than this in x share a column of labels


def _label_points(ax, points: list[tuple[float, float, str]]) -> None:
    """Name each point. Points at about the same x (e.g. every 3-epoch run saw the same images) get their labels
    stacked at least LABEL_GAP_PT apart, centred on their points, each moved label linked to its point."""
    if not points:
        return
    fig = ax.figure
    FigureCanvasAgg(fig)
    fig.draw_without_rendering()   # the layout fixes where the points land
    at = [ax.transData.transform((x, y)) * 72 / fig.dpi for x, y, _ in points]   # in points
    order = sorted(range(len(points)), key=lambda i: at[i][0])
    columns = [[order[0]]]
    for i in order[1:]:
        if at[i][0] - at[columns[-1][-1]][0] > LABEL_NEAR_PT:
            columns.append([])
        columns[-1].append(i)
    for col in columns:
        col.sort(key=lambda i: at[i][1])
        ys = np.array([at[i][1] for i in col])
        lab = ys.copy()
        for k in range(1, len(lab)):
            lab[k] = max(lab[k], lab[k - 1] + LABEL_GAP_PT)
        lab += (ys - lab).mean()   # the stack centred on its points: as much above as below
        for i, ly in zip(col, lab):
            x, y, text = points[i]
            dy = float(ly - at[i][1])
            moved = abs(dy) > 1.0
            # right of every error bar within a few points of its own, so no label is struck through
            clear = max(at[j][0] for j in col if abs(at[j][0] - at[i][0]) <= 16.0) - at[i][0]
            dx = clear + (10 if moved else 4)
            ax.annotate(text, (x, y), fontsize=6, xytext=(dx, dy), textcoords="offset points",
                        va="center", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.55"} if moved else None)


def similarity_figure(mine: dict) -> bytes | None:
    """Histogram of the mined pairs' cosine similarities (within [min_sim, max_sim])."""
    hist = (mine.get("semantic") or {}).get("similarity_hist")
    if not hist or not hist.get("counts"):
        return None
    edges, counts = hist["edges"], hist["counts"]
    fig = Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge", edgecolor="white")
    ax.set_xlabel("cosine similarity of the pair")
    ax.set_ylabel("pairs")
    acc = _pct((mine.get("semantic") or {}).get("pair_accuracy"))
    ax.set_title(f"SePP-ID mined pairs: {sum(counts)} pairs, pair accuracy {acc}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


# --- rendering -------------------------------------------------------------------------------------

def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table) -> str:
    lines = [f"## {t.title}", ""]
    if t.caption:
        lines += [t.caption, ""]
    if not t.rows:
        return "\n".join(lines + ["_(none)_", ""])
    lines.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
    lines.append("|" + "|".join("---" for _ in t.columns) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
    return "\n".join(lines + [""])


def table_html(t: Table) -> str:
    out = [f"<h2>{html.escape(t.title)}</h2>"]
    if t.caption:
        out.append(f"<p class=\"caption\">{html.escape(t.caption)}</p>")
    if not t.rows:
        return "\n".join(out + ["<p><em>(none)</em></p>"])
    out.append("<div class=\"scroll\"><table>\n<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in t.columns) + "</tr></thead>\n<tbody>")
    # short cells (numbers with their interval) stay on one line; long text (quotes, settings) wraps
    out += ["<tr>" + "".join(f"<td class=\"wrap\">{html.escape(str(c))}</td>" if len(str(c)) > 30 or "no per-image" in str(c) else
                             f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in t.rows]
    out.append("</tbody>\n</table></div>")  # a wide table scrolls instead of running off the page
    return "\n".join(out)


FIGURE_TITLES = {"accuracy.png": "Top-1 per protocol: runs sorted, whiskers = 95 % interval, dashed = random-init floor",
                 "cost.png": "Accuracy against pretraining cost (wall time; images seen = steps x batch)",
                 "loss.png": "Training loss per epoch",
                 "convergence.png": "Per-epoch kNN-200 top-1 (train.knn_monitor)",
                 "similarity.png": "SePP-ID: cosine similarity of the mined pairs"}
CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1440px}table{border-collapse:collapse;font-size:13px}"
       "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top;white-space:nowrap}"
       "th{background:#f2f2f2}td.wrap{white-space:normal;min-width:12em}.scroll{overflow-x:auto}"
       ".caption{color:#444;max-width:1100px}figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}"
       "figcaption{color:#444;font-size:13px}")
INTRO = ("Accuracies are top-1 in percent on the test split. A run's mean is over its training seeds, with a 95 % interval over "
         "seeds and test images; each paper's method is compared image by image with the run it builds on, and a "
         "difference counts only when its interval excludes 0. The papers' own numbers are in the appendix.")


def render(title: str, dataset: str, tables: list[Table], figures: dict[str, bytes],
           appendix: list[Table] | None = None) -> tuple[str, str]:
    """(markdown, html): the tables, the figures, then the appendix tables. Markdown links the PNGs under figures/;
    the HTML embeds them as base64."""
    appendix = appendix or []
    md = [f"# {title}", "", f"Dataset: `{dataset}`. {INTRO}", ""] + [table_markdown(t) for t in tables] + ["## Figures", ""]
    md += [f"![{FIGURE_TITLES.get(n, n)}](figures/{n})\n" for n in figures] or ["_(no figures: no trained runs)_\n"]
    md += [table_markdown(Table(f"Appendix: {t.title}", t.columns, t.rows, t.caption)) for t in appendix]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>Dataset: <code>{html.escape(dataset)}</code>. {html.escape(INTRO)}</p>"]
    body += [table_html(t) for t in tables] + ["<h2>Figures</h2>"]
    for n, png in figures.items():
        alt = html.escape(FIGURE_TITLES.get(n, n))
        body.append(f"<figure><img alt=\"{alt}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"
                    f"<figcaption>{alt}</figcaption></figure>")
    body += [table_html(Table(f"Appendix: {t.title}", t.columns, t.rows, t.caption)) for t in appendix]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    return "\n".join(md), page


# --- entry points ----------------------------------------------------------------------------------

def build_report(root: str | Path, runs: dict[str, dict], dataset: str, title: str,
                 references: str | Path = REFERENCES, pair_runs: dict[str, dict] | None = None,
                 beside: dict[str, str] | None = None, seeds: dict[str, list[int]] | None = None,
                 default_seed: int = 0, n_boot: int = stats.N_BOOT) -> Report:
    """Read every run's metrics (every training seed: `seeds`, {run: [seed, ...]}) under `root` and the reference
    YAML; return the report (nothing written). With `pair_runs` (SePP-ID), the mine stage's metrics too; `beside`
    ({run: base run}) adds the comparison of each paper's method with its base and the papers' claims."""
    metrics = load_runs(root, runs, pair_runs, beside, seeds, default_seed)
    mine = load_mine(root) if pair_runs else None
    refs = load_references(references)
    res = Results(metrics, n_boot)
    bases = base_runs(metrics, beside or {})
    methods = [m.method for m in metrics] + ([SEPPID_METHOD] if pair_runs else [])
    tables = [claims_table(load_claims(references), metrics, bases, res)] if bases else []
    side = beside_table(metrics, bases, res)
    conv = convergence_table(metrics)
    tables += ([side] if side else []) + comparison_tables(metrics, res, mine)
    tables += ([conv] if conv else []) + (seppid_tables(metrics, mine) if mine else [])
    appendix = [reference_table(refs, methods, dataset)]
    figures = {}
    for name, png in (("accuracy.png", accuracy_figure(metrics, res)), ("cost.png", cost_figure(metrics, res)),
                      ("convergence.png", convergence_figure(metrics)), ("loss.png", loss_figure(metrics)),
                      ("similarity.png", similarity_figure(mine) if mine else None)):
        if png is not None:
            figures[name] = png
    md, page = render(title, dataset, tables, figures, appendix)
    return Report(title, md, page, figures, tables + appendix)


def write_report(report: Report, root: str | Path) -> list[Path]:
    """reports/report.md, reports/report.html and reports/figures/*.png under `root`, each written atomically."""
    out = Path(root) / paths.REPORTS
    written = []
    for name, png in report.figures.items():
        atomic_write_bytes(png, out / "figures" / name)
        written.append(out / "figures" / name)
    # the pages last: a reader that sees them also finds the figures they link
    atomic_write_text(report.markdown, out / "report.md")
    atomic_write_text(report.html, out / "report.html")
    return written + [out / "report.md", out / "report.html"]


def build(root: str | Path, runs: dict[str, dict], dataset: str, title: str,
          references: str | Path = REFERENCES, pair_runs: dict[str, dict] | None = None,
          beside: dict[str, str] | None = None, seeds: dict[str, list[int]] | None = None,
          default_seed: int = 0) -> list[Path]:
    """Build and write the report; returns the written paths."""
    return write_report(build_report(root, runs, dataset, title, references, pair_runs, beside, seeds, default_seed), root)
