"""Numbers of a report: the protocols measured, each run's mean over its training seeds with its 95 % interval,
paired differences between two runs (pipeline.report.stats), the random-init floors, the fits that did not converge.

Every table, figure and verdict of the report takes its numbers from one `Results`: a run's accuracy is always
its mean over seeds (never one seed's value), and a difference is always the paired difference of those means.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.params import DataError, instance_name
from pipeline.report import stats
from pipeline.report.load import FLOOR_METHOD, RunMetrics

DASH = "—"

def num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def fmt(v: Any, digits: int = 2, suffix: str = "") -> str:
    x = num(v)
    return DASH if x is None else f"{x:.{digits}f}{suffix}"


def k_sort(keys) -> list[str]:
    return sorted({str(k) for k in keys}, key=lambda k: (float(k) if re.fullmatch(r"[0-9.]+", k) else math.inf, k))


def pct_label(frac: str) -> str:
    return f"{float(frac) * 100:g}%"


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
    out = [Protocol(f"knn_{k}", f"kNN-{k}") for k in k_sort(k for ev in evs for k in (ev.get("knn") or {}))]
    if any(num((ev.get("linear") or {}).get("top1")) is not None for ev in evs):
        out.append(Protocol("linear", "linear"))
    fracs = k_sort(f for ev in evs for f in (ev.get("semi") or {}))
    learners = sorted({lr for ev in evs for f in (ev.get("semi") or {}).values() for lr in (f or {})},
                      key=lambda s: (s != "logreg", s))  # the labelled-only baseline first
    out += [Protocol(f"semi_{float(f) * 100:g}pct_{lr}", f"semi {pct_label(f)} {lr}") for f in fracs for lr in learners]
    return out


def semi_entry(ev: dict, key: str) -> dict:
    """The evaluate JSON's semi entry of a protocol key semi_<pct>pct_<learner>."""
    pct, learner = re.fullmatch(r"semi_([0-9.e+-]+)pct_(.+)", key).groups()
    for frac, by_learner in (ev.get("semi") or {}).items():
        if math.isclose(float(frac) * 100, float(pct)):
            return (by_learner or {}).get(learner) or {}
    return {}


def json_value(ev: dict, key: str) -> float | None:
    """One instance's accuracy (%) in a protocol, from its evaluate metrics."""
    if key.startswith("knn_"):
        return num((ev.get("knn") or {}).get(key[4:]))
    if key == "linear":
        return num((ev.get("linear") or {}).get("top1"))
    return num(semi_entry(ev, key).get("mean"))


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


def floors(metrics: list[RunMetrics]) -> dict[str, RunMetrics]:
    """The first `random` run of each backbone: an untrained encoder, the floor its trained runs must clear."""
    floors: dict[str, RunMetrics] = {}
    for m in metrics:
        if m.method == FLOOR_METHOD:
            floors.setdefault(m.backbone, m)
    return floors


def not_converged(ev: dict) -> list[str]:
    """The fits of one evaluate JSON that did not converge: linear, and semi-supervised fits by draw."""
    out = []
    lin = ev.get("linear") or {}
    if lin.get("converged") is False:
        g = num(lin.get("grad_norm"))
        out.append("linear" + ("" if g is None else f" (max |grad| {g:.2g})"))
    for frac, by_learner in (ev.get("semi") or {}).items():
        for learner, entry in (by_learner or {}).items():
            conv = (entry or {}).get("converged")
            conv = conv if isinstance(conv, list) else [conv]
            bad = [i for i, c in enumerate(conv) if c is False]
            if bad:
                out.append(f"semi {pct_label(frac)} {learner} (draws {', '.join(map(str, bad))})")
    return out


def flag(m: RunMetrics, key: str) -> str:
    """The † of a protocol cell when some seed's fit in it did not converge."""
    for inst in m.instances or [m]:
        ev = inst.evaluate
        if key == "linear" and (ev.get("linear") or {}).get("converged") is False:
            return " †"
        if key.startswith("semi_"):
            conv = semi_entry(ev, key).get("converged")
            if conv is False or (isinstance(conv, list) and False in conv):
                return " †"
    return ""
