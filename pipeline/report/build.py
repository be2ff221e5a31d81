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

import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.params import DataError
from pipeline.utils import atomic_write_bytes, atomic_write_text

REFERENCES = Path(__file__).with_name("references.yaml")
SEED_PAPERS = (
    "gsssl-group-siamese-ssl.txt", "leoclr-original-images.txt", "pnnclr-pseudo-nearest-neighbours.txt",
    "pwself-patch-wise-ssl.txt", "seppid-semantic-positive-pairs.txt",
)
REF_REQUIRED = ("method", "dataset", "backbone", "epochs", "protocol", "top1", "source")
FLOOR_METHOD = "random"
SEPPID_METHOD = "seppid"  # the name of SePP-ID's rows in references.yaml
MINE_METRICS = "reports/metrics/mine.json"
# per-epoch CSV columns that are bookkeeping, not loss terms
CURVE_META = ("epoch", "step", "loss", "lr", "views_per_s", "epoch_time_s", "knn_top1")
DASH = "—"


@dataclass
class RunMetrics:
    run: str
    method: str
    backbone: str
    pretrain: dict
    evaluate: dict
    curve: pd.DataFrame | None  # None for an untrained (random) run
    pairs: str | None = None    # SePP-ID pair set the run trained with (pair_runs), None for a plain run

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


def load_run(root: str | Path, run: str, method: str, backbone: str, pairs: str | None = None) -> RunMetrics:
    """One run's metrics files under `root`; a missing or unreadable file raises DataError naming it."""
    root = Path(root)
    pre_path = root / "reports/metrics/pretrain" / f"{run}.json"
    ev_path = root / "reports/metrics/evaluate" / f"{run}.json"
    curve_path = root / "reports/plots/pretrain" / f"{run}.csv"
    pre = _read_json(pre_path, "pretrain")
    ev = _read_json(ev_path, "evaluate")
    section = "pair_runs" if pairs else "runs"
    for path, obj in ((pre_path, pre), (ev_path, ev)):
        _check_same(path, obj, "method", method, run, section)
        _check_same(path, obj, "backbone", backbone, run, section)
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
    return RunMetrics(run, method, backbone, pre, ev, curve, pairs)


def load_runs(root: str | Path, runs: dict[str, dict], pair_runs: dict[str, dict] | None = None,
              beside: dict[str, str] | None = None) -> list[RunMetrics]:
    """All runs in params order, each run that is compared with a base run listed right after it (`beside`:
    {run: base run}; a pair run's base defaults to the plain run of the same method and backbone).
    `runs` / `pair_runs` are params.yaml's mappings (name -> {method, backbone[, pairs]})."""
    plain = [load_run(root, name, spec["method"], spec["backbone"]) for name, spec in runs.items()]
    paired = [load_run(root, name, spec["method"], spec["backbone"], spec["pairs"]) for name, spec in (pair_runs or {}).items()]
    every = plain + paired
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
    path = Path(root) / MINE_METRICS
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


def comparison_table(metrics: list[RunMetrics], mine: dict | None = None) -> Table:
    """One row per run: accuracies, pretrain cost, and the gain over the random-init floor of its backbone.
    With SePP-ID pair runs, two more columns: the pair set (kind and number of pairs) and its pair accuracy."""
    ks = _k_sort(k for m in metrics for k in (m.evaluate.get("knn") or {}))
    fracs = _k_sort(f for m in metrics for f in (m.evaluate.get("semi") or {}))
    learners = sorted({lr for m in metrics for f in (m.evaluate.get("semi") or {}).values() for lr in (f or {})},
                      key=lambda s: (s != "logreg", s))  # the labelled-only baseline first
    dk = _delta_k(metrics)
    # the first `random` run of each backbone is its floor: an untrained encoder's kNN accuracy
    floors: dict[str, RunMetrics] = {}
    for m in metrics:
        if m.method == FLOOR_METHOD:
            floors.setdefault(m.backbone, m)

    with_pairs = any(m.pairs for m in metrics)
    cols = ["run", "method", "backbone"] + (["pairs (n)", "pair acc."] if with_pairs else []) + ["epochs"]
    cols += [f"kNN-{k}" for k in ks] + ["linear"]
    cols += [f"semi {_pct_label(f)} {lr}" for f in fracs for lr in learners]
    cols += ["pretrain time (s)", "views/s", "peak mem (MiB)"]
    if dk is not None:
        cols.append(f"Δ kNN-{dk} vs random")
    rows = []
    for m in metrics:
        ev, pre = m.evaluate, m.pretrain
        knn = ev.get("knn") or {}
        row = [m.run, m.method, m.backbone] + (_pair_cells(m, mine) if with_pairs else []) + [str(pre.get("epochs", DASH))]
        row += [_fmt(knn.get(k)) for k in ks]
        row.append(_fmt((ev.get("linear") or {}).get("top1")))
        for f in fracs:
            for lr in learners:
                s = ((ev.get("semi") or {}).get(f) or {}).get(lr) or {}
                mean, std = _num(s.get("mean")), _num(s.get("std"))
                row.append(DASH if mean is None else f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}")
        trained = m.trained
        row += [_fmt(pre.get("wall_time_s"), 1) if trained else DASH, _fmt(pre.get("views_per_s"), 0) if trained else DASH,
                _fmt(pre.get("peak_mem_mib"), 0)]
        if dk is not None:
            floor = floors.get(m.backbone)
            if m.method == FLOOR_METHOD:
                row.append("(floor)")
            elif floor is None:
                row.append(f"{DASH} (no random run for {m.backbone})")
            else:
                ours, base = _num(knn.get(dk)), _num((floor.evaluate.get("knn") or {}).get(dk))
                row.append(DASH if ours is None or base is None else f"{ours - base:+.2f}")
        rows.append(row)
    caption = ("Our runs. Top-1 accuracy (%) on the test split of frozen-backbone features: weighted kNN (cosine, k neighbours), "
               "linear probe (logistic regression), semi-supervised with a fraction of the training labels (mean ± std over seeds). "
               "Δ is the kNN gain over the untrained (random-init) encoder of the same backbone. Time and views/s are for pretraining.")
    if with_pairs:
        caption += (" SePP-ID runs follow their base run: trained on the original images plus a pair set of the mine stage "
                    "(semantic: mined pairs; random: the control of the SePP-ID paper's Table 9, as many pairs). Pair accuracy: "
                    "share of pairs whose two images have the same label (labels are used for this metric only).")
    return Table("Our results", cols, rows, caption)


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


def beside_table(metrics: list[RunMetrics], bases: dict[str, RunMetrics]) -> Table | None:
    """Each paper's method against the method it builds on (report.beside): the gains in every protocol and the
    pretraining speed relative to the base."""
    rows_of = [m for m in metrics if m.run in bases]
    if not rows_of:
        return None
    ks = _k_sort(k for m in metrics for k in (m.evaluate.get("knn") or {}))
    fracs = _k_sort(f for m in metrics for f in (m.evaluate.get("semi") or {}))

    def scores(m: RunMetrics) -> list[float | None]:
        ev = m.evaluate
        out = [_num((ev.get("knn") or {}).get(k)) for k in ks] + [_num((ev.get("linear") or {}).get("top1"))]
        return out + [_num((((ev.get("semi") or {}).get(f) or {}).get("logreg") or {}).get("mean")) for f in fracs]

    cols = ["run", "base run"] + [f"kNN-{k}" for k in ks] + ["linear"] + [f"semi {_pct_label(f)} logreg" for f in fracs]
    cols += ["views/s vs base"]
    rows = []
    for m in rows_of:
        base = bases[m.run]
        cells = []
        for o, r in zip(scores(m), scores(base)):
            cells.append(DASH if o is None else f"{o:.2f}" if r is None else f"{o:.2f} ({o - r:+.2f})")
        speed, base_speed = _num(m.pretrain.get("views_per_s")), _num(base.pretrain.get("views_per_s"))
        ratio = DASH if not speed or not base_speed else f"{speed / base_speed:.2f}x"
        rows.append([m.run, base.run] + cells + [ratio])
    return Table("Methods beside their base", cols, rows,
                 "Each run against the run it builds on (report.beside; a SePP-ID pair run against its plain base run): "
                 "top-1 % on the test split, in brackets the difference to the base run. views/s compares pretraining "
                 "throughput measured in the same profile (runs that shared the machine with other work are slower).")


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

def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # Agg canvas directly: no pyplot global state, no display needed
    buf = io.BytesIO()
    # no Software/date metadata: the same metrics give the same bytes, so DVC hashes stay stable
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
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
        ax.plot(c["epoch"], c["loss"], marker="o", lw=2, label="loss")
        for term in [col for col in c.columns if col not in CURVE_META]:  # per-term losses, thinner
            ax.plot(c["epoch"], c[term], lw=1, ls="--", label=term)
        ax.set_title(f"{m.run} ({m.method}, {m.backbone})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if len(c.columns.difference(CURVE_META)):
            ax.legend(fontsize=7)
    return _png(fig)


def accuracy_figure(metrics: list[RunMetrics]) -> bytes | None:
    """kNN (each k) and linear top-1 per run, as grouped bars."""
    ks = _k_sort(k for m in metrics for k in (m.evaluate.get("knn") or {}))
    series = [(f"kNN-{k}", [_num((m.evaluate.get("knn") or {}).get(k)) for m in metrics]) for k in ks]
    series.append(("linear", [_num((m.evaluate.get("linear") or {}).get("top1")) for m in metrics]))
    series = [(n, v) for n, v in series if any(x is not None for x in v)]
    if not metrics or not series:
        return None
    fig = Figure(figsize=(max(5.0, 1.3 * len(metrics) * len(series) / 2 + 2), 3.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, (name, vals) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, [0.0 if v is None else v for v in vals], width, label=name)
    ax.set_xticks(range(len(metrics)), [f"{m.run}\n({m.method})" for m in metrics], fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(series))
    ax.set_title("Frozen-feature accuracy per run", fontsize=10)
    return _png(fig)


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
    out.append("<table>\n<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in t.columns) + "</tr></thead>\n<tbody>")
    out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in t.rows]
    out.append("</tbody>\n</table>")
    return "\n".join(out)


FIGURE_TITLES = {"loss.png": "Training loss per epoch", "accuracy.png": "kNN and linear top-1 per run",
                 "convergence.png": "Per-epoch kNN-200 top-1 (train.knn_monitor)",
                 "similarity.png": "SePP-ID: cosine similarity of the mined pairs"}
CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
       "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f2f2f2}"
       ".caption{color:#444;max-width:1000px}img{max-width:100%;border:1px solid #eee}")


def render(title: str, dataset: str, tables: list[Table], figures: dict[str, bytes]) -> tuple[str, str]:
    """(markdown, html). Markdown links the PNGs under figures/; the HTML embeds them as base64."""
    intro = f"Dataset: `{dataset}`. Accuracies are top-1 in percent."
    md = [f"# {title}", "", intro, ""] + [table_markdown(t) for t in tables] + ["## Figures", ""]
    md += [f"![{FIGURE_TITLES.get(n, n)}](figures/{n})\n" for n in figures] or ["_(no figures: no trained runs)_\n"]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>Dataset: <code>{html.escape(dataset)}</code>. Accuracies are top-1 in percent.</p>"]
    body += [table_html(t) for t in tables] + ["<h2>Figures</h2>"]
    for n, png in figures.items():
        alt = html.escape(FIGURE_TITLES.get(n, n))
        body.append(f"<figure><img alt=\"{alt}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"
                    f"<figcaption>{alt}</figcaption></figure>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    return "\n".join(md), page


# --- entry points ----------------------------------------------------------------------------------

def build_report(root: str | Path, runs: dict[str, dict], dataset: str, title: str,
                 references: str | Path = REFERENCES, pair_runs: dict[str, dict] | None = None,
                 beside: dict[str, str] | None = None) -> Report:
    """Read every run's metrics under `root` and the reference YAML; return the report (nothing written).
    With `pair_runs` (SePP-ID), the mine stage's metrics too; `beside` ({run: base run}) adds the comparison
    of each paper's method with its base."""
    metrics = load_runs(root, runs, pair_runs, beside)
    mine = load_mine(root) if pair_runs else None
    refs = load_references(references)
    methods = [m.method for m in metrics] + ([SEPPID_METHOD] if pair_runs else [])
    tables = [comparison_table(metrics, mine)]
    side = beside_table(metrics, base_runs(metrics, beside or {}))
    conv = convergence_table(metrics)
    tables += ([side] if side else []) + ([conv] if conv else []) + (seppid_tables(metrics, mine) if mine else [])
    tables.append(reference_table(refs, methods, dataset))
    figures = {}
    for name, png in (("loss.png", loss_figure(metrics)), ("accuracy.png", accuracy_figure(metrics)),
                      ("convergence.png", convergence_figure(metrics)),
                      ("similarity.png", similarity_figure(mine) if mine else None)):
        if png is not None:
            figures[name] = png
    md, page = render(title, dataset, tables, figures)
    return Report(title, md, page, figures, tables)


def write_report(report: Report, root: str | Path) -> list[Path]:
    """reports/report.md, reports/report.html and reports/figures/*.png under `root`, each written atomically."""
    out = Path(root) / "reports"
    paths = []
    for name, png in report.figures.items():
        atomic_write_bytes(png, out / "figures" / name)
        paths.append(out / "figures" / name)
    # the pages last: a reader that sees them also finds the figures they link
    atomic_write_text(report.markdown, out / "report.md")
    atomic_write_text(report.html, out / "report.html")
    return paths + [out / "report.md", out / "report.html"]


def build(root: str | Path, runs: dict[str, dict], dataset: str, title: str,
          references: str | Path = REFERENCES, pair_runs: dict[str, dict] | None = None,
          beside: dict[str, str] | None = None) -> list[Path]:
    """Build and write the report; returns the written paths."""
    return write_report(build_report(root, runs, dataset, title, references, pair_runs, beside), root)
