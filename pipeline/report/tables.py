"""The report's tables, each a pure function of the loaded metrics and one `Results` (so every number in every
table is the same seed-aggregated mean or paired difference):

    summary_claims_table, summary_methods_table   the summary at the top
    claims_table, comparison_table                 each claim and each compared pair, with intervals and verdicts
    knn_table, probe_table, convergence_flags_table, cost_table, seppid_tables, convergence_table, reference_table
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from pipeline.report import stats
from pipeline.report.claims import (NOT_TESTED, NOT_YET_TRAINED, SEPPID_METHOD, SHORT_VERDICT, ClaimResult, Comparison, paper_name,
                                    summary_protocols, where)
from pipeline.report.load import FLOOR_METHOD, RunMetrics, base_run
from pipeline.report.results import (DASH, Results, flag, floors, fmt, k_sort, not_converged, num,
                                     protocols, semi_entry)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    key_columns: tuple[str, ...] = ()    # verdict / outcome columns: coloured, and must stay on screen at 900 px
    notes: list[tuple[str, str]] = field(default_factory=list)   # (summary, text): folded under the table
    anchor: str = ""                      # HTML id

def _delta_k(metrics: list[RunMetrics]) -> str | None:
    """The k used for the Δ-vs-floor column: 200 when measured (the design's choice), else the largest k."""
    ks = k_sort(k for m in metrics for k in (m.evaluate.get("knn") or {}))
    return "200" if "200" in ks else (ks[-1] if ks else None)


def _pair_cells(m: RunMetrics, mine: dict | None) -> list[str]:
    """(pairs, pair accuracy) cells of a run: the size and accuracy of the pair set it trained with."""
    if m.pairs is None:
        return [DASH, DASH]
    st = (mine or {}).get(m.pairs) or {}
    n = st.get("pairs", m.pretrain.get("train_pairs"))
    acc = num(st.get("pair_accuracy"))
    if m.pairs == "random" and st.get("kind") == "same_image":
        return [f"control: {DASH if n is None else n} images x 2 copies", "— (image with itself)"]
    acc_cell = DASH if acc is None else f"{100 * acc:.1f}%"
    return [f"{m.pairs} ({DASH if n is None else n})", acc_cell]



def _iv_cell(iv: stats.Interval | None, mean: float | None) -> str:
    if iv is not None:
        return f"{iv.mean:.2f} [{iv.lo:.2f}, {iv.hi:.2f}]"
    return fmt(mean)


def _diff_cell(d: stats.Difference | None, ours: float | None, base: float | None, short: bool = True) -> str:
    if d is not None:
        mark = {stats.BETTER: "better", stats.WORSE: "worse", stats.SAME: "≈"}[d.verdict] if short else d.verdict
        return f"{d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}] {mark}"
    if ours is None or base is None:
        return DASH
    return f"{ours - base:+.2f} (no per-image predictions)"


def _seeds_cell(m: RunMetrics) -> str:
    return str(len(m.seeds))



INTERVAL_NOTE = ("Mean over training seeds; in brackets the 95 % interval over seeds and test images (two-level bootstrap), "
                 "over test images only for a run with 1 seed.")


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
    floor_of = floors(metrics)
    with_pairs = any(m.pairs for m in metrics)
    cols = ["run", "method", "backbone", "seeds", "epochs"] + (["pairs (n)", "pair acc."] if with_pairs else [])
    cols += [p.label for p in protos] + ([f"Δ kNN-{dk} vs random"] if dk is not None else [])
    rows = []
    for m in metrics:
        row = [m.run, m.method, m.backbone, _seeds_cell(m), str(m.pretrain.get("epochs", DASH))]
        row += _pair_cells(m, mine) if with_pairs else []
        row += [_iv_cell(res.interval(m, p.key), res.mean(m, p.key)) for p in protos]
        if dk is not None:
            floor = floor_of.get(m.backbone)
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
                    "(semantic: mined pairs of different images; control: SePP-ID's Table 9 control, as many randomly picked images, "
                    "each added as two augmented copies of itself). Pair accuracy: share of mined pairs whose two images have "
                    "the same label (labels are used for this metric only).")
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
                e = semi_entry(m.evaluate, p.key)
                mean, std = num(e.get("mean")), num(e.get("std"))
                cell = DASH if mean is None else f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
            else:
                cell = _iv_cell(iv, res.mean(m, p.key))
            row.append(cell + flag(m, p.key))
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
            for fit in not_converged(inst.evaluate):
                rows.append([m.run, str(inst.seed), fit])
    if not rows:
        return None
    return Table("Fits that did not converge", ["run", "seed", "fit"], rows,
                 "These fits stopped at their iteration budget before the solver's tolerance: their "
                 "accuracy may be below what the features allow, so differences involving them are less trustworthy.")


def cost_table(metrics: list[RunMetrics]) -> Table:
    """Pretraining cost per run: epochs, steps, images seen, wall time, throughput, memory (means over seeds)."""
    cols = ["run", "seeds", "epochs", "steps", "images seen", "pretrain time (s)", "views/s", "peak mem (MiB)"]
    rows = []
    for m in metrics:
        pres = [i.pretrain for i in m.instances or [m]]

        def mean(key):
            vals = [num(p.get(key)) for p in pres]
            return None if any(v is None for v in vals) else float(np.mean(vals))
        trained = m.trained
        seen = _images_seen(m)
        rows.append([m.run, _seeds_cell(m), str(m.pretrain.get("epochs", DASH)), str(m.pretrain.get("steps", DASH)),
                     DASH if seen is None or not trained else f"{seen:,}",
                     fmt(mean("wall_time_s"), 1) if trained else DASH, fmt(mean("views_per_s"), 0) if trained else DASH,
                     fmt(mean("peak_mem_mib"), 0)])
    return Table("Pretraining cost", cols, rows,
                 "Per run (mean over its seeds): images seen = steps x batch size; time and views/s are for pretraining and "
                 "depend on what else the machine ran at the time.")


def _images_seen(m: RunMetrics) -> int | None:
    steps, batch = m.pretrain.get("steps"), m.pretrain.get("batch_size")
    return int(steps) * int(batch) if isinstance(steps, int) and isinstance(batch, int) else None


def _pct(v) -> str:
    x = num(v)
    return DASH if x is None else f"{100 * x:.1f}%"


def seppid_tables(metrics: list[RunMetrics], mine: dict, res: Results) -> list[Table]:
    """SePP-ID: what the semantic sampler found against the paper's Table 9 control, and each pair run against its
    base run (means over seeds and paired differences, from `res` like every other table)."""
    bounds = f"[{mine.get('min_sim')}, {mine.get('max_sim')}]"
    cols = ["pair set", "encoder (layer)", "images searched (K of pool)", "bounds", "pairs", "anchors covered",
            "positives / anchor", "pair accuracy"]
    rows = []
    for name in ("semantic", "random"):
        st = mine.get(name) or {}
        control = name == "random" and st.get("kind") == "same_image"
        kind = ("Table 9 control: random images, each with itself" if control else
                "random pairs of different images" if name == "random" else "semantic (mined)")
        acc = "— (image with itself)" if control else _pct(st.get("pair_accuracy"))
        k = st.get("K", mine.get("K"))
        rows.append([kind, f"{mine.get('encoder_run')} ({mine.get('layer')})", f"{k} of {mine.get('pool')}",
                     bounds if name == "semantic" else DASH, str(st.get("pairs", DASH)),
                     str(st.get("anchors_covered", DASH)), fmt(st.get("mean_positives_per_anchor")), acc])
    cap = mine.get("max_per_anchor")
    per_anchor = f"at most {cap} positives per anchor (the most similar)" if cap else "every positive of an anchor kept"
    caption = (f"The mine stage: K training images encoded un-augmented by run {mine.get('encoder_run')}'s encoder, pairs "
               f"with cosine similarity in {bounds} (SePP-ID §3.1, Algorithm 1), {per_anchor}. The control is SePP-ID's "
               "Table 9 control: as many randomly picked images as there are semantic pairs, each added as two augmented "
               "copies of itself, so the control adds data without adding semantic positives; it draws from the whole "
               "pool. Pair accuracy: share of the pairs whose two images have the same label (labels are used for this "
               "metric only); the paper's sampler reaches 92.03 % on ImageNet (its Table 1).")
    tables = [Table("SePP-ID: mined pairs", cols, rows, caption)]

    dk = _delta_k(metrics)
    keys = [k for k in (f"knn_{dk}", "linear") if any(p.key == k for p in protocols(metrics))]
    label = {f"knn_{dk}": f"kNN-{dk}", "linear": "linear"}
    cols = ["run", "base run", "seeds"]
    for k in keys:
        cols += [label[k], f"Δ {label[k]}", f"Δ {label[k]} [95 %]"]
    rows = []
    for m in metrics:
        if m.pairs is None:
            continue
        base = base_run(metrics, m)
        row = [m.run, base.run if base else f"{DASH} (no plain {m.method} run on {m.backbone})",
               f"{len(m.seeds)} / {len(base.seeds)}" if base else str(len(m.seeds))]
        for k in keys:
            ours, ref = res.mean(m, k), (res.mean(base, k) if base else None)
            d = res.difference(m, base, k) if base else None
            row += [fmt(ours), DASH if ours is None or ref is None else f"{ours - ref:+.2f}", _verdict_cell(d)]
        rows.append(row)
    tables.append(Table("SePP-ID: gain over the base run", cols, rows,
                        "Each pair run against the plain run of the same method and backbone: means over training seeds "
                        "(the same numbers as the accuracy tables) and their paired difference with its 95 % interval.",
                        key_columns=tuple(c for c in cols if c.endswith("[95 %]"))))
    return tables


def sampler_table(sampler: str, m: RunMetrics | None, spec: dict, mine: dict | None, res: Results) -> Table:
    """SePP-ID's sampler: the run whose encoder the mine stage searches with (SePP-ID §3.1 / §4: a MoCo-v2 pre-trained
    on its own). Not a compared method: its accuracy is shown here only, beside the label accuracy of its pairs."""
    cols = ["run", "role", "epochs", "seeds", "kNN-200", "linear", "mined pairs same-label"]
    if m is None:
        planned = ((spec.get("overrides") or {}).get("train") or {}).get("epochs")
        cells = [f"{planned} (planned)" if planned else DASH, DASH, NOT_YET_TRAINED, NOT_YET_TRAINED]
    else:
        cells = [str(m.pretrain.get("epochs", DASH)), str(len(m.seeds)), fmt(res.mean(m, "knn_200")),
                 fmt(res.mean(m, "linear"))]
    sem = _pct(((mine or {}).get("semantic") or {}).get("pair_accuracy"))
    enc = (mine or {}).get("encoder_run")
    acc = sem if enc == sampler else DASH if mine is None else f"not mined with it yet (current pairs: {enc}'s encoder, {sem})"
    return Table("SePP-ID's sampler", cols, [[sampler, "SePP-ID's sampler (not a compared method)", *cells, acc]],
                 "The MoCo-v2 run whose encoder finds SePP-ID's semantic pairs, pre-trained on its own as the paper does "
                 "(its sampler reaches 92.03 % same-label pairs on ImageNet, its Table 1). It is not one of the compared "
                 "methods, so it appears in no other table; the stronger it is, the more of its pairs share a class and "
                 "the more SePP-ID's verdict tests the paper's idea rather than wrong pairs.")


def _verdict_cell(d: stats.Difference | None) -> str:
    return DASH if d is None else f"[{d.lo:+.2f}, {d.hi:+.2f}] {SHORT_VERDICT[d.verdict]}"


def _source(source: str, papers: dict[str, dict]) -> str:
    """'GSSSL (Li, Wang, Geng & Xu, 2024), Table 1' for 'gsssl-group-siamese-ssl.txt, Table 1'."""
    place = where(source)
    return paper_name(source, papers) + (f", {place}" if place else "")


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


def reference_table(refs: list[dict], methods: list[str], dataset: str, papers: dict[str, dict] | None = None) -> Table:
    """`methods` may include "seppid" (when pair runs exist): SePP-ID's own rows, labelled with their setting."""
    sel = select_references(refs, [m for m in methods if m != FLOOR_METHOD], dataset)
    cols = ["method", "variant", "dataset", "backbone", "epochs", "protocol", "top-1 (%)", "source", "note"]
    rows = []
    for r in sel:
        proto = f"kNN (k={r['k']})" if r["protocol"] == "knn" and "k" in r else r["protocol"]
        rows.append([r["method"], r.get("variant") or DASH, r["dataset"], r["backbone"],
                     DASH + " (not stated)" if r["epochs"] is None else str(r["epochs"]), proto, fmt(r["top1"]),
                     _source(r["source"], papers or {}), r.get("note") or ""])
    caption = ("Published numbers, quoted from the seed papers in their own settings (dataset, backbone, epochs, batch size, "
               "protocol): they are not our measurements and differ from our setting, so compare them with care. "
               f"Shown: methods in this run list, pre-trained and evaluated on {dataset}.")
    return Table("Papers' reference numbers", cols, rows, caption)



def _monitored(metrics: list[RunMetrics]) -> list[RunMetrics]:
    return [m for m in metrics if m.pretrain.get("knn_monitor")]


def shown_epochs(n: int) -> list[int]:
    """Epoch columns of the convergence table: every one of a short run; of a long one the first four, every fourth
    and the last (16 epochs: 0, 1, 2, 3, 4, 8, 12, 16)."""
    return sorted({e for e in range(n) if e < 4 or e % 4 == 0} | {n - 1}) if n else []


def convergence_table(metrics: list[RunMetrics]) -> Table | None:
    """The per-epoch kNN monitor of the runs that had it on: accuracy against epochs (see shown_epochs)."""
    runs = _monitored(metrics)
    if not runs:
        return None
    epochs = shown_epochs(max(len(m.pretrain["knn_monitor"]) for m in runs))
    cols = ["run", "method", "monitor images (bank / test)"] + [f"epoch {e}" for e in epochs]
    rows = []
    for m in runs:
        vals = list(m.pretrain["knn_monitor"])
        bank, test = m.pretrain.get("knn_monitor_images") or (None, None)
        rows.append([m.run, m.method, f"{bank} / {test}"] + [fmt(vals[e]) if e < len(vals) else "" for e in epochs])
    return Table("Convergence: kNN-200 per epoch", cols, rows,
                 "Runs that measured kNN-200 during training: top-1 (%) of the encoder the run would export, before "
                 "training (epoch 0) and after each epoch (of a long run, every fourth epoch); bank and test images evenly "
                 "spaced over their splits. Comparable between runs with the same monitor images, not with the full-split "
                 "numbers (2000 test images: about ±1 point of sampling noise).")


# --- the summary, the claims and the compared pairs --------------------------------------------------------

def _short(d: stats.Difference | None, ours: float | None = None, base: float | None = None) -> str:
    if d is None:
        return DASH if ours is None or base is None else f"{ours - base:+.2f} (no interval)"
    return f"{d.mean:+.2f} {SHORT_VERDICT[d.verdict]}"


def _interval(d: stats.Difference) -> str:
    return f"{d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}]"


PRIMARY_MARK = "*"   # after a cell that is a claim's primary measure


def summary_methods_table(comps: list[Comparison], res: Results, primary: dict[tuple[str, str], str],
                          metrics: list[RunMetrics]) -> Table:
    """One line per compared pair: the paired difference and its verdict on each summary protocol; * marks the
    protocol that is a paper claim's primary measure."""
    protos = summary_protocols(metrics)
    cols = ["method vs base"] + [p.label for p in protos]
    rows = []
    for c in comps:
        row = [c.label + (" (semantic pairs vs Table 9 control)" if c.kind == "control" else
                          f" (step-size control of {c.of})" if c.kind == "step" else
                          " (Table 9 control vs base)" if c.run.pairs == "random" else "")]
        for p in protos:
            d = res.difference(c.run, c.base, p.key)
            mark = PRIMARY_MARK if primary.get((c.run.run, c.base.run)) == p.key else ""
            row.append(_short(d, res.mean(c.run, p.key), res.mean(c.base, p.key)) + mark)
        rows.append(row)
    return Table("Each method against its base", cols, rows,
                 "Difference in top-1 points, run minus base, mean over seeds; better / worse: its 95 % interval excludes "
                 f"0, ≈: it contains 0. {PRIMARY_MARK} : a paper claim's primary measure; every other cell is exploratory.",
                 key_columns=tuple(cols[1:]), anchor="summary-methods")


def summary_claims_table(results: list[ClaimResult], papers: dict[str, dict], res: Results,
                         labels: dict[str, str], untrained: dict | None = None) -> Table:
    """One line per paper claim: what it says, our primary difference(s) and the outcome."""
    with_controls = any(ct is not None for r in results for ct in r.controls)
    cols = ["paper's claim", "our test", "primary difference [95 %]", "outcome"]
    rows = []
    for r in results:
        c = r.claim
        name = paper_name(c["source"], papers)
        what = c.get("short") or c["quote"]
        tests = "; ".join(f"{comp.label}, {labels.get(r.key, r.key)}" for comp, _ in r.tests) or _not_run(r, untrained)
        diffs = "; ".join(_interval(d) if d is not None else DASH for _, d in r.tests) or DASH
        diffs += "".join(f"; step-size control {ct.run}: {_control_cell(ct)}" for ct in r.controls if ct is not None)
        rows.append([f"{name}: {what}", tests, diffs, r.outcome])
    caption = "Outcome by the rule below, on the claim's primary measure (the protocol the paper reports the claim in)."
    if with_controls:
        caption += (" The outcome rests on the as-published pair; the step-size control (the same method taking its "
                    "base's step) only checks it.")
    return Table("Paper claims: outcome at this budget", cols, rows, caption,
                 key_columns=("outcome",), anchor="summary-claims")


CONTROL_MARK = " (step-size control)"   # after the pair of a control's row in the claims table


def _control_cell(ct) -> str:
    """A step-size control's primary difference and verdict, or that it is not trained yet."""
    return ct.untrained or DASH if ct.diff is None else f"{_interval(ct.diff)} {SHORT_VERDICT[ct.diff.verdict]}"


def _control_row(name: str, ct, key_label: str, base: RunMetrics) -> list[str]:
    """The claims table's row of a step-size control, right under the pair it checks."""
    m = ct.metrics
    if ct.diff is None:
        cell, verdict = DASH, ct.untrained or DASH
    else:
        cell, verdict = _interval(ct.diff), f"{SHORT_VERDICT[ct.diff.verdict]} (control)"
    seeds = DASH if m is None else f"{len(m.seeds)} + {len(base.seeds)} seeds, {_epochs_pair(m, base)} epochs"
    return [name, ct.label + CONTROL_MARK, cell, verdict, key_label, seeds]


def _not_run(r: ClaimResult, untrained: dict | None) -> str:
    """Why a claim has no test: its runs are in params but not trained yet, or the profile does not run them."""
    c = r.claim
    waiting = [u.label for u in (untrained or {}).values()
               if (u.run in c["runs"] if c.get("runs") else u.method == c["method"])]
    return f"{NOT_YET_TRAINED}: {', '.join(waiting)}" if waiting else "not run in this profile"


def claims_table(results: list[ClaimResult], papers: dict[str, dict], res: Results, labels: dict[str, str],
                 mine: dict | None = None, untrained: dict | None = None) -> Table:
    """Each claim against each of our pairs that tests it: the difference and verdict right after the pair; the
    quote and the paper's setting folded below the table."""
    with_controls = any(ct is not None for r in results for ct in r.controls)
    cols = ["paper", "our run vs base", "difference [95 % interval]", "verdict", "measure", "seeds / epochs"]
    rows, notes = [], []
    for r in results:
        c = r.claim
        name = paper_name(c["source"], papers)
        notes.append((f"{name}, {where(c['source'])}", f"“{c['quote']}” Setting: {c['setting']}."))
        if not r.tests:
            rows.append([name, _not_run(r, untrained), DASH, NOT_TESTED, labels.get(r.key, r.key), DASH])
        for i, (comp, d) in enumerate(r.tests):
            m, base = comp.run, comp.base
            if d is None:
                cell = _short(None, res.mean(m, r.key), res.mean(base, r.key))
                verdict = "not tested (no per-image predictions)" if res.mean(m, r.key) is not None else DASH
            else:
                cell = _interval(d)
                verdict = SHORT_VERDICT[d.verdict] + ("" if min(d.seeds, d.seeds_base) > 1 else " (1 seed)")
            if c["method"] == SEPPID_METHOD and mine:
                acc = num((mine.get("semantic") or {}).get("pair_accuracy"))
                if acc is not None:
                    verdict += f"; mined pairs {100 * acc:.1f} % same-label (paper: 92.03 %)"
            rows.append([name, comp.label, cell, verdict, labels.get(r.key, r.key) + flag(m, r.key),
                         f"{len(m.seeds)} + {len(base.seeds)} seeds, {_epochs_pair(m, base)} epochs"])
            ct = r.controls[i] if i < len(r.controls) else None
            if ct is not None:
                rows.append(_control_row(name, ct, labels.get(r.key, r.key), base))
    caption = ("Each paper's headline claim against our pair of runs at this budget (a verdict says what this budget "
               "can detect, not whether the paper is right). " + DIFF_NOTE)
    keys = ("difference [95 % interval]", "verdict")
    if with_controls:
        caption += (" A step-size control's row (the same method taking its base's step, against the same base) "
                    "follows the pair it checks; the verdict is the as-published pair's. Controls: "
                    + "; ".join(dict.fromkeys(f"{ct.run}, {r.tests[i][0].run.run} with {ct.about}"
                                              for r in results for i, ct in enumerate(r.controls) if ct is not None))
                    + ". When a control's verdict differs from its pair's, the outcome is inconclusive (see the rule "
                    "under the summary).")
    return Table("Claims against our runs, pair by pair", cols, rows, caption,
                 key_columns=keys, notes=notes, anchor="claims")


def _epochs_pair(m: RunMetrics, base: RunMetrics) -> str:
    a, b = m.pretrain.get("epochs", DASH), base.pretrain.get("epochs", DASH)
    return str(a) if a == b else f"{a} / {b}"


DIFF_NOTE = ("Difference in points, run minus base, on the same test images, with its 95 % interval (bootstrap over "
             "test images and seeds; seeds paired by seed value, which gives both runs the same data order and "
             "augmentation draws). better / worse: the interval excludes 0; ≈: it contains 0.")


def comparison_table(comps: list[Comparison], res: Results, primary: dict[tuple[str, str], str],
                     metrics: list[RunMetrics]) -> Table | None:
    """Every compared pair on every summary protocol, one row each: difference, interval, verdict, and whether it
    is a claim's primary measure or exploratory."""
    if not comps:
        return None
    protos = summary_protocols(metrics)
    cols = ["pair", "protocol", "difference [95 % interval]", "verdict", "measure"]
    rows = []
    for c in comps:
        for p in protos:
            d = res.difference(c.run, c.base, p.key)
            fl = flag(c.run, p.key) or flag(c.base, p.key)
            if d is None:
                cell, verdict = _short(None, res.mean(c.run, p.key), res.mean(c.base, p.key)), DASH
            else:
                cell, verdict = _interval(d), SHORT_VERDICT[d.verdict] + ("" if min(d.seeds, d.seeds_base) > 1 else " (1 seed)")
            measure = "primary" if primary.get((c.run.run, c.base.run)) == p.key else "exploratory"
            rows.append([c.label, p.label + fl, cell, verdict, measure])
    return Table("Every pair on every protocol", cols, rows,
                 "Each run against the run it builds on, and SePP-ID's semantic pairs against its Table 9 control. "
                 + DIFF_NOTE + " † : a fit of either run did not converge." + _no_predictions_note(
                     [*{id(x): x for c in comps for x in (c.run, c.base)}.values()], res),
                 key_columns=("difference [95 % interval]", "verdict"), anchor="pairs")
