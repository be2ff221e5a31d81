"""The report's figures, each a pure function returning PNG bytes (or None when there is nothing to draw):

    forest_figure      paired differences with 95 % intervals, one row per compared pair and protocol
    accuracy_figure    absolute accuracies as dot plots with intervals, one-seed runs hollow, floors drawn
    cost_figure, convergence_figure, loss_figure, similarity_figure   (the appendix and the SePP-ID section)

Figures are drawn on an Agg canvas (no pyplot state, no display) and saved without metadata, so the same metrics
give the same bytes.
"""
from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from pipeline.report import stats
from pipeline.report.claims import Comparison, summary_protocols
from pipeline.report.load import FLOOR_METHOD, RunMetrics
from pipeline.report.results import Protocol, Results, floors, num, protocols

CURVE_META = ("epoch", "step", "loss", "lr", "views_per_s", "epoch_time_s", "knn_top1")
DIAGNOSTIC_PREFIXES = ("teacher_entropy_", "prototypes_")  # collapse diagnostics (DINO, PW-Self): not loss terms
VERDICT_COLORS = {stats.BETTER: "#1a7f37", stats.WORSE: "#cf222e", stats.SAME: "#6e7781"}


def _images_seen(m: RunMetrics) -> int | None:
    steps, batch = m.pretrain.get("steps"), m.pretrain.get("batch_size")
    return int(steps) * int(batch) if isinstance(steps, int) and isinstance(batch, int) else None


def _png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)  # Agg canvas directly: no pyplot global state, no display needed
    buf = io.BytesIO()
    # no Software/date metadata: the same metrics give the same bytes, so DVC hashes stay stable
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()



def _monitored(metrics: list[RunMetrics]) -> list[RunMetrics]:
    return [m for m in metrics if m.pretrain.get("knn_monitor")]


def _pct(v) -> str:
    x = num(v)
    return "—" if x is None else f"{100 * x:.1f}%"


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
    """Training loss per epoch, one small panel per trained run, each curve divided by its own first-epoch value
    (loss scales differ between methods by orders of magnitude: relative to epoch 1 every panel reads alike); the
    per-term losses thinner, named in a legend below the panel, never over the curves."""
    runs = [m for m in metrics if m.curve is not None and len(m.curve)]
    if not runs:
        return None
    ncol = min(4, len(runs))
    nrow = math.ceil(len(runs) / ncol)
    fig = Figure(figsize=(FIG_WIDTH, 2.6 * nrow), layout="constrained")
    for i, m in enumerate(runs):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        c = m.curve
        for col, style in [("loss", {"lw": 2, "marker": "o", "ms": 3})] + [(t, {"lw": 1, "ls": "--"}) for t in loss_terms(c.columns)]:
            y = c[col].to_numpy(dtype=float)
            first = y[0] if len(y) and np.isfinite(y[0]) and y[0] != 0 else np.nan
            ax.plot(c["epoch"], y / abs(first), label=col, **style)
        ax.set_title(f"{m.run}", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if i % ncol == 0:
            ax.set_ylabel("loss / epoch-1 loss", fontsize=7)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=5.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    return _png(fig, FIG_DPI)


FIG_DPI = 150           # figures are ~1400 px wide, shown at full width in the HTML
FIG_WIDTH = 9.4         # inches


def _backbone_colors(metrics: list[RunMetrics]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    return {bb: palette[i % len(palette)] for i, bb in enumerate(dict.fromkeys(m.backbone for m in metrics))}



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
    for j, (xlabel, xs) in enumerate((("pretraining wall time (s)", [num(m.pretrain.get("wall_time_s")) for m in runs]),
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
        for bb, floor in floors(metrics).items():
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
            # right of every error bar of its column, so no label is struck through
            clear = max(at[j][0] for j in col) - at[i][0]
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




# --- the forest plot and the dot plots -----------------------------------------------------------------------

def forest_rows(comps: list[Comparison], res: Results, primary: dict[tuple[str, str], str],
                metrics: list[RunMetrics]) -> list[tuple[str, str, stats.Difference, bool]]:
    """The forest plot's rows, top to bottom: (pair, protocol, paired difference, is a claim's primary measure)."""
    rows = []
    for c in comps:
        for p in summary_protocols(metrics):
            d = res.difference(c.run, c.base, p.key)
            if d is not None:
                rows.append((c.label + (" (control)" if c.kind == "control" else " (step control)" if c.kind == "step" else ""),
                             p.label, d,
                             primary.get((c.run.run, c.base.run)) == p.key))
    return rows


def forest_figure(comps: list[Comparison], res: Results, primary: dict[tuple[str, str], str],
                  metrics: list[RunMetrics]) -> bytes | None:
    """Paired differences (run minus base, points) with their 95 % intervals: one row per compared pair and
    protocol, grouped by pair, a line at 0, coloured by verdict; a claim's primary measure is a filled diamond with
    its label in bold, exploratory ones are small dots."""
    rows = forest_rows(comps, res, primary, metrics)
    if not rows:
        return None
    fig = Figure(figsize=(FIG_WIDTH, 0.8 + 0.16 * len(rows) + 0.1 * len(comps)), layout="constrained")
    ax = fig.add_subplot()
    y, ys, labels, last = 0.0, [], [], None
    for pair, proto, d, prim in rows:
        if pair != last:
            if last is not None:
                y += 0.6                 # a gap between pairs
                ax.axhline(y - 0.8, color="0.85", lw=0.6)
            last = pair
        color = VERDICT_COLORS[d.verdict]
        ax.plot([d.lo, d.hi], [y, y], color=color, lw=2.2 if prim else 1.2, solid_capstyle="butt")
        ax.plot([d.mean], [y], marker="D" if prim else "o", ms=6 if prim else 3.5, color=color,
                markeredgecolor="black" if prim else color, lw=0)
        ys.append(y)
        labels.append((f"{pair} · {proto}", prim))
        y += 1.0
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(ys, [t for t, _ in labels], fontsize=6.5)
    for tick, (_, prim) in zip(ax.get_yticklabels(), labels):
        if prim:
            tick.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel("difference in top-1 points, run minus base (95 % interval)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], color=VERDICT_COLORS[v], marker="o", lw=1.2, label=lab) for v, lab in
               ((stats.BETTER, "better"), (stats.WORSE, "worse"), (stats.SAME, "≈ (interval contains 0)"))]
    handles.append(Line2D([], [], color="0.3", marker="D", markeredgecolor="black", lw=2.2,
                          label="a claim's primary measure (bold)"))
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=4, frameon=False)
    return _png(fig, FIG_DPI)


def _dot_panel(ax, metrics: list[RunMetrics], res: Results, p: Protocol, colors: dict[str, str]) -> None:
    """One protocol: trained runs sorted by mean, a dot with its 95 % interval; a run trained under one seed is a
    hollow dot (its interval covers test images only); each backbone's random-init floor a dashed line."""
    runs = [(m, res.mean(m, p.key), res.interval(m, p.key)) for m in metrics if m.method != FLOOR_METHOD]
    runs = sorted([r for r in runs if r[1] is not None], key=lambda r: r[1])
    values = []
    for y, (m, mean, iv) in enumerate(runs):
        lo, hi = (iv.lo, iv.hi) if iv is not None else (mean, mean)
        one = len(m.seeds) == 1
        ax.plot([lo, hi], [y, y], color=colors[m.backbone], lw=1.4)
        ax.plot([mean], [y], "o", ms=4.5, color=colors[m.backbone], markerfacecolor="white" if one else colors[m.backbone])
        values += [lo, hi]
    ax.set_yticks(list(range(len(runs))), [r[0].run + (" (1 seed)" if len(r[0].seeds) == 1 else "") for r in runs],
                  fontsize=6.5)
    for bb, floor in floors(metrics).items():
        f = res.mean(floor, p.key)
        if f is not None:
            ax.axvline(f, color=colors[bb], ls="--", lw=1.1)
            values.append(f)
    if values:
        lo, hi = min(values), max(values)
        pad = max(0.5, 0.06 * (hi - lo))
        ax.set_xlim(max(0.0, lo - pad), min(100.0, hi + pad))
    ax.set_title(p.label, fontsize=9)
    ax.set_xlabel("top-1 (%)", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def accuracy_figure(metrics: list[RunMetrics], res: Results | None = None) -> bytes | None:
    """Per protocol a dot plot of every trained run's mean with its 95 % interval, sorted; hollow: one seed; dashed:
    the random-init floor of each backbone. The axis spans the data (so read the numbers, not the lengths)."""
    res = res or Results(metrics)
    protos = [p for p in protocols(metrics) if any(res.mean(m, p.key) is not None for m in metrics if m.method != FLOOR_METHOD)]
    if not protos:
        return None
    n_runs = sum(m.method != FLOOR_METHOD for m in metrics)
    ncol = 2 if len(protos) > 1 else 1
    nrow = math.ceil(len(protos) / ncol)
    fig = Figure(figsize=(FIG_WIDTH, (0.7 + 0.16 * n_runs) * nrow + 0.5), layout="constrained")
    colors = _backbone_colors(metrics)
    for i, p in enumerate(protos):
        _dot_panel(fig.add_subplot(nrow, ncol, i + 1), metrics, res, p, colors)
    handles = [Line2D([], [], color=c, marker="o", lw=1.4, label=bb) for bb, c in colors.items()]
    handles += [Line2D([], [], color="0.3", marker="o", markerfacecolor="white", lw=0, label="one training seed"),
                Line2D([], [], color="0.3", ls="--", label="random-init floor")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    return _png(fig, FIG_DPI)
