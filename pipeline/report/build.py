"""The report: every run's metrics read once, one `Results` of seed-aggregated means, intervals and paired
differences, and from it the summary, the setup box, the tables, the figures and the page.

Reads metrics files only (the pretrain summary JSON and per-epoch CSV, the evaluate JSON, the test predictions,
the mine stage's metrics); it never imports training or evaluation code, so a report can be rebuilt anywhere the
metrics files are. Every path is relative to a `root` directory, so tests can point it at a temporary folder.

    report = build_report(root, runs, dataset="cifar10", title="...")   # pure: reads, returns text and PNGs
    paths = write_report(report, root)                                  # atomic writes under root/reports

The pieces, each usable alone: load (metrics files), results (means, intervals, differences), claims (compared
pairs, outcomes), budget (the setup box), tables, figures, page (markdown and the HTML template).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (tests draw with it)

from pipeline import paths
from pipeline.params import DataError
from pipeline.report import stats
from pipeline.report.budget import recipe_fact, setup_facts
from pipeline.report.claims import (CONFOUNDED, Comparison, claim_results, comparisons,
                                    exploratory_count, primary_keys, summary_protocols)
from pipeline.report.figures import (_label_points, accuracy_figure, convergence_figure, cost_figure,  # noqa: F401
                                     forest_figure, loss_figure, loss_terms, similarity_figure)
from pipeline.report.load import (REF_REQUIRED, REFERENCES, SEED_PAPERS, SEPPID_METHOD, RunMetrics,  # noqa: F401
                                  base_run, base_runs, load_claims, load_group, load_mine, load_papers,
                                  load_recipe_search, load_references, load_run, load_runs, untrained_runs)
from pipeline.report.page import Facts, FigureRef, Folded, Section, Text, render
from pipeline.report.results import Results, protocols
from pipeline.report.tables import (Table, claims_table, comparison_table, convergence_flags_table,  # noqa: F401
                                    convergence_table, cost_table, knn_table, probe_table, reference_table,
                                    sampler_table, select_references, seppid_tables, summary_claims_table, summary_methods_table)
from pipeline.utils import atomic_write_bytes, atomic_write_text

# the entry points, and the pieces older callers and tests import from here
__all__ = ["Report", "build", "build_report", "write_report", "FigureCanvasAgg", "REFERENCES", "REF_REQUIRED",
           "SEED_PAPERS", "RunMetrics", "base_run", "base_runs", "load_claims", "load_mine", "load_papers",
           "load_references", "load_run", "load_runs", "select_references", "loss_terms", "_label_points", "Table",
           "Results"]


@dataclass
class Report:
    title: str
    markdown: str
    html: str
    figures: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes
    tables: list[Table] = field(default_factory=list)


GLOSSARY = [
    ("kNN-k", "weighted k-nearest-neighbour classifier (cosine similarity, k neighbours) on the frozen encoder's "
              "features of the training images; no training."),
    ("linear", "linear probe: a logistic-regression classifier trained on the frozen features of all training images "
               "(regularisation chosen on a validation split)."),
    ("semi x% logreg", "the same probe trained on x % of the training labels only; label_spreading also uses the "
                       "unlabelled features. Averaged over several random label draws."),
    ("random-init floor", "the same backbone untrained: what the evaluation scores without any pretraining."),
    ("base", "the method a paper builds on and compares itself with (LeOCLR and SePP-ID: MoCo-v2; pNNCLR: NNCLR; GSSSL: "
             "Barlow Twins, and its grouped SimCLR / MoCo-v2 against plain SimCLR / MoCo-v2; PW-Self: DINO)."),
    ("difference", "run minus base, in top-1 points, on the same test images: a paired comparison."),
    ("95 % interval", "bootstrap interval over training seeds and test images; with one seed over test images only."),
    ("better / worse / ≈", "the difference's interval lies above 0 / below 0 / contains 0."),
    ("primary measure", "the protocol a paper reports its claim in; the claim's outcome is decided on it alone."),
    ("exploratory", "any other protocol: shown unadjusted, so about 1 in 20 of these intervals excludes 0 by chance."),
    ("seeds", "training seeds: each seed is a separate training run (data order, augmentation, initialisation)."),
    ("Table 9 control", "SePP-ID's control: as many randomly picked images as there are semantic pairs, each added as "
                        "two augmented copies of itself: more data, no semantic positives."),
    ("pair accuracy", "share of SePP-ID's mined pairs whose two images have the same label."),
    ("†", "a probe fit that stopped at its iteration budget before converging."),
]

OUTCOME_RULE = ("Outcome rule: a claim's primary measure is the protocol the paper reports it in. A claim is reproduced "
                "when every pair of our runs that tests it is better on the primary measure (95 % interval above 0), "
                "contradicted when at least one is worse and none better, and inconclusive at this budget otherwise. ")
# why a paper method's step differs from its base's, per paper method (issue 26): said only for the controls present
STEP_REASONS = {
    "leoclr": "LeOCLR sums two loss terms where MoCo-v2 has one, about twice the gradient at the same learning rate",
    "pnnclr": ("pNNCLR's shortcut passes the whole gradient through its pseudo-neighbour where its own equation passes "
               "only its mixing weight's share of it"),
}
STEP_RULE = ("A gain could then come from the larger step rather than the idea, so each has a control: the same "
             "method taking its base's step, compared with the same base. The verdict rests on the pair as "
             "published; the control only checks it. When the control's verdict on the primary measure differs from "
             f"the pair's, a claim that would be reproduced or contradicted is \"{CONFOUNDED}\" instead; a control not "
             "yet trained changes nothing. ")


def build_report(root: str | Path, runs: dict[str, dict], dataset: str, title: str,
                 references: str | Path = REFERENCES, pair_runs: dict[str, dict] | None = None,
                 beside: dict[str, str] | None = None, seeds: dict[str, list[int]] | None = None,
                 default_seed: int = 0, n_boot: int = stats.N_BOOT, image_size: int | None = None,
                 controls: dict[str, str] | None = None, sampler: str | None = None,
                 recipe_search: str | Path | None = None) -> Report:
    """Read every run's metrics (every training seed: `seeds`, {run: [seed, ...]}) under `root` and the reference
    YAML; return the report (nothing written). With `pair_runs` (SePP-ID), the mine stage's metrics too; `beside`
    ({run: base run}) adds the comparison of each paper's method with its base and the papers' claims; `controls`
    ({control run: paper run}) a step-size control of a `beside` pair, compared with the paper run's base.
    `sampler`: the run whose encoder mines SePP-ID's pairs; unless it is itself compared, it is shown as the
    sampler and kept out of the compared tables. A run with no metrics files yet is listed as not yet trained.
    `image_size`: the pretraining image size, for the setup box. `recipe_search`: the recipe search's table
    (benchmarks/recipe_search.py), for the setup box's line on which runs the recipe was searched on."""
    controls, beside, pair_runs = dict(controls or {}), dict(beside or {}), dict(pair_runs or {})
    for ctl, paper in controls.items():
        if paper not in beside or ctl not in runs:
            raise DataError(f"report.controls.{ctl}: expected a run controlling a paper run of report.beside, "
                            f"got {paper!r}" + ("" if ctl in runs else f" ({ctl!r} is not a run)"))
    beside.update({ctl: beside[paper] for ctl, paper in controls.items()})
    compared = set(beside) | set(beside.values())
    sampler = sampler if sampler in runs and sampler not in compared else None
    untrained = untrained_runs(root, {**runs, **pair_runs}, seeds, default_seed)
    ready = {n: s for n, s in runs.items() if n not in untrained and n != sampler}
    metrics = load_runs(root, ready, {n: s for n, s in pair_runs.items() if n not in untrained}, beside, seeds,
                        default_seed)
    sampler_run = (load_group(root, sampler, runs[sampler], (seeds or {}).get(sampler, [default_seed]), default_seed)
                   if sampler and sampler not in untrained else None)
    mine = load_mine(root) if pair_runs else None
    recipe = load_recipe_search(Path(root) / recipe_search) if recipe_search else None
    refs = load_references(references)
    papers = load_papers(references)
    res = Results(metrics + ([sampler_run] if sampler_run else []), n_boot)
    bases = base_runs(metrics, beside)
    comps = comparisons(metrics, bases, controls)
    claims = load_claims(references) if bases else []
    primary = primary_keys(claims, metrics, bases, controls)
    results = claim_results(claims, metrics, bases, res, controls, untrained, runs)
    labels = {p.key: p.label for p in protocols(metrics)}
    methods = [m.method for m in metrics] + ([SEPPID_METHOD] if pair_runs else [])
    waiting = _untrained_line(untrained, controls, beside, sampler, pair_runs)

    figures: dict[str, bytes] = {}
    for name, png in (("forest.png", forest_figure(comps, res, primary, metrics)),
                      ("accuracy.png", accuracy_figure(metrics, res)), ("cost.png", cost_figure(metrics, res)),
                      ("convergence.png", convergence_figure(metrics)), ("loss.png", loss_figure(metrics)),
                      ("similarity.png", _similarity(mine))):
        if png is not None:
            figures[name] = png

    sections = _sections(metrics, res, comps, results, primary, papers, labels, mine, refs, methods, dataset,
                         image_size, untrained, waiting, controls, sampler, sampler_run, runs, recipe)
    lead = (f"Self-supervised methods pretrained on {dataset} at a small budget (see the setup box) and evaluated on "
            "frozen features; each paper's method is compared, image by image, with the method it builds on. "
            "Accuracies are top-1 in percent on the test split.")
    md, page = render(title, sections, figures, lead)
    tables = [i for s in sections for i in s.items if isinstance(i, Table)]
    return Report(title, md, page, figures, tables)


def _similarity(mine: dict | None) -> bytes | None:
    return similarity_figure(mine) if mine else None


def _untrained_line(untrained: dict, controls: dict[str, str], beside: dict[str, str], sampler: str | None,
                    pair_runs: dict[str, dict]) -> Text | None:
    """One line naming every run of the run list that has no metrics yet, with its role in the report."""
    if not untrained:
        return None

    def role(run: str) -> str:
        if run in controls:
            return f"the step-size control of {controls[run]}"
        if run == sampler:
            return "SePP-ID's sampler"
        if run in beside:
            return f"compared with {beside[run]}"
        bases_of = [r for r, b in beside.items() if b == run]
        if bases_of:
            return f"base of {', '.join(bases_of)}"
        return "SePP-ID pair run" if run in pair_runs else ""

    named = [u.label + (f", {r}" if (r := role(u.run)) else "") for u in untrained.values()]
    return Text("Not yet trained (no metrics yet; shown once every seed is trained, no number of theirs appears "
                "before): " + "; ".join(named) + ".")


def _rule(controls: dict[str, str], runs: dict[str, dict], n: int, hits: int) -> str:
    """The outcome rule as the summary states it; the step-size part only when there are controls."""
    rule = OUTCOME_RULE
    if controls:
        methods = dict.fromkeys((runs.get(paper) or {}).get("method") for paper in controls.values())
        reasons = [STEP_REASONS[m] for m in methods if m in STEP_REASONS]
        rule += "Step-size controls: " + ("; ".join(reasons) + ". " if reasons else "")
        rule += STEP_RULE
        rule += "Other protocols are exploratory (unadjusted intervals, no multiple-comparison correction): "
    else:
        rule += "All other protocols are exploratory (unadjusted intervals, no multiple-comparison correction): "
    return rule + (f"{n} exploratory intervals here, of which {hits} exclude 0 "
                   f"(about {n / 20:.0f} expected by chance alone)." if n else "none here.")


def _sections(metrics, res, comps: list[Comparison], results, primary, papers, labels, mine, refs, methods, dataset,
              image_size, untrained=None, waiting=None, controls=None, sampler=None, sampler_run=None,
              runs=None, recipe=None) -> list[Section]:
    out = []
    if comps:
        n, hits = exploratory_count(comps, summary_protocols(metrics), primary, res)
        items = ([summary_claims_table(results, papers, res, labels, untrained)] if results else [])
        items += [summary_methods_table(comps, res, primary, metrics), Text(_rule(controls or {}, runs or {}, n, hits))]
        items += [waiting] if waiting else []
        out.append(Section("Summary", items, "summary"))
    facts = setup_facts(metrics + ([sampler_run] if sampler_run else []), res, refs, dataset, image_size)
    if facts and recipe:
        facts.insert(-1, ("recipe", recipe_fact(recipe, metrics)))
    if facts:
        out.append(Section("Setup and budget", [Facts(facts), Folded("Glossary", GLOSSARY)], "setup"))
    if results:
        out.append(Section("Papers' claims", [claims_table(results, papers, res, labels, mine, untrained)], "claims"))
    side = comparison_table(comps, res, primary, metrics)
    if side:
        out.append(Section("Methods against their base", [
            FigureRef("forest.png", "Paired differences, run minus base, with 95 % intervals: one row per pair and "
                                    "protocol; bold rows and diamonds: a claim's primary measure; grey: the interval "
                                    "contains 0."), side], "pairs"))
    flags = convergence_flags_table(metrics)
    out.append(Section("Accuracy of every run", [
        FigureRef("accuracy.png", "Top-1 per protocol: runs sorted, dot = mean over seeds with its 95 % interval, "
                                  "hollow = one training seed, dashed = random-init floor of the backbone"),
        knn_table(metrics, res, mine), probe_table(metrics, res)] + ([flags] if flags else [])
        + ([waiting] if waiting and not comps else []), "accuracy"))
    if mine:
        sampler_rows = [sampler_table(sampler, sampler_run, (runs or {}).get(sampler) or {}, mine, res)] if sampler else []
        out.append(Section("SePP-ID: the mined pairs", [*sampler_rows, *seppid_tables(metrics, mine, res),
                                                        FigureRef("similarity.png", "Cosine similarity of the mined pairs")],
                           "seppid"))
    conv = convergence_table(metrics)
    appendix = [cost_table(metrics), FigureRef("cost.png", "Accuracy against pretraining cost (wall time; images "
                                                           "seen = steps x batch)")]
    if conv:
        appendix += [conv, FigureRef("convergence.png", "kNN-200 per epoch, measured during training")]
    appendix += [FigureRef("loss.png", "Training loss per epoch, relative to the first epoch (per run)"),
                 reference_table(refs, methods, dataset, papers)]
    out.append(Section("Training cost, curves and the papers' numbers", appendix, "appendix", appendix=True))
    return out


def write_report(report: Report, root: str | Path) -> list[Path]:
    """reports/report.md, reports/report.html and reports/figures/*.png under `root`, each written atomically."""
    out = Path(root) / paths.REPORTS
    written = []
    # a declared DVC output even when no figure applies (one run, as in the quick profile: nothing to compare)
    (out / "figures").mkdir(parents=True, exist_ok=True)
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
          default_seed: int = 0, image_size: int | None = None, controls: dict[str, str] | None = None,
          sampler: str | None = None, recipe_search: str | Path | None = None) -> list[Path]:
    """Build and write the report; returns the written paths."""
    return write_report(build_report(root, runs, dataset, title, references, pair_runs, beside, seeds, default_seed,
                                     image_size=image_size, controls=controls, sampler=sampler,
                                     recipe_search=recipe_search), root)
