"""What the report concludes: the compared pairs of runs, each paper claim's outcome, and the summary.

A *comparison* is one of our runs against the run it builds on (report.beside, each SePP-ID pair run against
its plain base run) or, for SePP-ID, the semantic pairs against the paper's Table 9 control (the same number of
randomly picked images added as two augmented copies of themselves): the comparison the paper itself makes.

The outcome rule, stated in the report: a claim's *primary* measure is the protocol the paper reports it in
(linear evaluation for most, kNN-10 for PW-Self). Per compared pair the primary measure's paired 95 % interval
gives better / worse / ≈ (stats.verdict). The claim is

- *reproduced* when every pair that tests it is better on the primary measure,
- *contradicted* when at least one pair is worse and none is better,
- *inconclusive at this budget* otherwise (an interval that contains 0).

Step-size controls (issue 26): where a paper's method takes a larger optimisation step than its base for a reason
other than its idea (LeOCLR sums two loss terms where MoCo-v2 has one, about twice the gradient under the same SGD;
pNNCLR's straight-through passes the identity where its eq. 4 gives alpha times it), a control run of the same method
with the base's step is compared with the same base. The outcome rests on the as-published pair; when the control's
primary verdict differs from the as-published pair's, a claim that would be reproduced or contradicted is
*inconclusive: confounded by step size* (the difference may come from the step, not the idea). A control not yet
trained changes nothing and is shown as such.

Every other protocol is *exploratory*: its intervals are unadjusted 95 % intervals, so among N of them about
N / 20 "better" or "worse" verdicts are expected by chance alone; they inform, they decide nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.report import stats
from pipeline.report.load import FLOOR_METHOD, SEPPID_METHOD, RunMetrics, paper_of
from pipeline.report.results import Protocol, Results, protocols

REPRODUCED, CONTRADICTED, INCONCLUSIVE, NOT_TESTED = (
    "reproduced", "contradicted", "inconclusive at this budget", "not tested")
CONFOUNDED = "inconclusive: confounded by step size"
NOT_YET_TRAINED = "not yet trained"
SHORT_VERDICT = {stats.BETTER: "better", stats.WORSE: "worse", stats.SAME: "≈"}
# the protocols a summary row shows: the papers' own (linear, kNN-10), kNN-200 and the labelled-only semi fits
SUMMARY_PROTOCOLS = ("knn_10", "knn_200", "linear")


@dataclass(frozen=True)
class Comparison:
    run: RunMetrics
    base: RunMetrics
    kind: str = "method"   # method: a paper's method vs its base | control: SePP-ID's semantic pairs vs Table 9
    #                        control | step: a step-size control of a paper's method vs that method's base
    of: str = ""           # step: the paper run it controls

    @property
    def label(self) -> str:
        return f"{self.run.run} vs {self.base.run}"


def comparisons(metrics: list[RunMetrics], bases: dict[str, RunMetrics],
                controls: dict[str, str] | None = None) -> list[Comparison]:
    """Every compared pair, in run order: each run against its base (a step-size control of `controls`, {control:
    paper run}, against its paper run's base), then each SePP-ID semantic pair run against the random control run
    of the same method and backbone (SePP-ID Table 9)."""
    controls = controls or {}
    out = [Comparison(m, bases[m.run], "step" if m.run in controls else "method", controls.get(m.run, ""))
           for m in metrics if m.run in bases]
    for m in metrics:
        if m.pairs == "semantic":
            control = next((c for c in metrics if c.pairs == "random" and c.method == m.method
                            and c.backbone == m.backbone), None)
            if control is not None:
                out.append(Comparison(m, control, "control"))
    return out


def summary_protocols(metrics: list[RunMetrics]) -> list[Protocol]:
    """kNN-10 (PW-Self's claim), kNN-200, linear (the others' claims) and the labelled-only semi-supervised fits."""
    return [p for p in protocols(metrics) if p.key in SUMMARY_PROTOCOLS or (p.semi and p.key.endswith("_logreg"))]


def claim_pairs(claim: dict, metrics: list[RunMetrics], bases: dict[str, RunMetrics],
                controls: dict[str, str] | None = None) -> list[Comparison]:
    """Our comparisons that test a claim: its `runs` when given, SePP-ID's semantic pair runs against their base,
    else the compared runs of its method. A step-size control never tests a claim itself (see ClaimResult)."""
    metrics = [m for m in metrics if m.run not in (controls or {})]
    if claim.get("runs"):
        picked = [m for m in metrics if m.run in claim["runs"] and m.run in bases]
    elif claim["method"] == SEPPID_METHOD:
        picked = [m for m in metrics if m.pairs == "semantic" and m.run in bases]
    else:
        picked = [m for m in metrics if m.method == claim["method"] and m.pairs is None and m.run in bases]
    return [Comparison(m, bases[m.run]) for m in picked]


def primary_keys(claims: list[dict], metrics: list[RunMetrics], bases: dict[str, RunMetrics],
                 controls: dict[str, str] | None = None) -> dict[tuple[str, str], str]:
    """{(run, base run): the protocol key that is a claim's primary measure for that pair}. SePP-ID's semantic-vs-
    control pair shares its claim's primary measure (the paper's Table 9 compares them in linear evaluation), and a
    step-size control its paper run's (the outcome rule reads it there)."""
    out: dict[tuple[str, str], str] = {}
    for c in claims:
        key = c.get("protocol", "linear")
        for comp in claim_pairs(c, metrics, bases, controls):
            out[(comp.run.run, comp.base.run)] = key
            for ctl, paper in (controls or {}).items():
                if paper == comp.run.run and ctl in bases:
                    out[(ctl, bases[ctl].run)] = key
        if c["method"] == SEPPID_METHOD:
            for comp in comparisons(metrics, bases):
                if comp.kind == "control":
                    out[(comp.run.run, comp.base.run)] = key
    return out


@dataclass(frozen=True)
class ControlTest:
    """A step-size control of one as-published pair: the control run against the paper run's base."""
    run: str                           # the control run
    base: str                          # the paper run's base
    about: str                         # what the control changes, in words
    diff: stats.Difference | None      # control minus base on the primary measure; None when not trained
    untrained: str = ""                # "not yet trained" (with its seeds done) when it has no metrics yet
    metrics: RunMetrics | None = None  # the control run's metrics when trained

    @property
    def label(self) -> str:
        return f"{self.run} vs {self.base}"


@dataclass(frozen=True)
class ClaimResult:
    claim: dict
    key: str                                                    # the primary protocol
    tests: list[tuple[Comparison, stats.Difference | None]]    # each pair with its primary difference
    controls: tuple[ControlTest | None, ...] = ()              # per test: its step-size control, if it has one

    @property
    def outcome(self) -> str:
        ctl = [c.diff if c is not None else None for c in self.controls] or None
        return outcome([d for _, d in self.tests], ctl)


def outcome(diffs: list[stats.Difference | None], controls: list[stats.Difference | None] | None = None) -> str:
    """The claim's outcome from its pairs' primary differences and, per pair, its step-size control's (None: no
    control, or not trained): the rule in the module docstring."""
    if not diffs or any(d is None for d in diffs):
        return NOT_TESTED
    verdicts = [d.verdict for d in diffs]
    if all(v == stats.BETTER for v in verdicts):
        decided = REPRODUCED
    elif stats.WORSE in verdicts and stats.BETTER not in verdicts:
        decided = CONTRADICTED
    else:
        return INCONCLUSIVE
    if any(c is not None and c.verdict != d.verdict for d, c in zip(diffs, controls or [])):
        return CONFOUNDED
    return decided


def control_about(control: dict, paper: dict) -> str:
    """What a step-size control changes against its paper run, in words, from the two runs' overrides in params
    (the report reads params, never the training code)."""
    ours, theirs = control.get("overrides") or {}, paper.get("overrides") or {}
    changed = {k: v for k, v in ours.items() if theirs.get(k) != v}
    words = []
    for k, v in changed.items():
        if k == "loss_scale":
            words.append(f"its loss multiplied by {v:g}" + (" (the mean of its two terms, not their sum)"
                                                            if v == 0.5 else ""))
        elif k == "straight_through" and v == "alpha":
            words.append("its equation's own straight-through gradient (alpha times the identity, not the identity)")
        else:
            words.append("one setting changed to match its base's step")
    return "; ".join(dict.fromkeys(words)) or "its base's step"


def control_tests(comps: list[Comparison], controls: dict[str, str], bases: dict[str, RunMetrics],
                  untrained: dict, runs: dict[str, dict], key: str, res: Results) -> tuple[ControlTest | None, ...]:
    """Per as-published pair, its step-size control on the primary measure `key` (`untrained`: {run: Untrained})."""
    out = []
    for comp in comps:
        ctl = next((c for c, paper in controls.items() if paper == comp.run.run), None)
        if ctl is None:
            out.append(None)
            continue
        about = control_about(runs.get(ctl) or {}, runs.get(comp.run.run) or {})
        if ctl in bases and bases[ctl] is comp.base:
            cm = next(m for m in res.metrics if m.run == ctl)
            out.append(ControlTest(ctl, comp.base.run, about, res.difference(cm, comp.base, key), metrics=cm))
        else:
            u = untrained.get(ctl)
            out.append(ControlTest(ctl, comp.base.run, about, None,
                                   NOT_YET_TRAINED + (f" ({u.seeds_done} of {u.seeds} seeds)" if u and u.seeds_done else "")))
    return tuple(out)


def claim_results(claims: list[dict], metrics: list[RunMetrics], bases: dict[str, RunMetrics],
                  res: Results, controls: dict[str, str] | None = None, untrained: dict | None = None,
                  runs: dict[str, dict] | None = None) -> list[ClaimResult]:
    out = []
    for c in claims:
        key = c.get("protocol", "linear")
        comps = claim_pairs(c, metrics, bases, controls)
        tests = [(comp, res.difference(comp.run, comp.base, key)) for comp in comps]
        ctl = control_tests(comps, controls or {}, bases, untrained or {}, runs or {}, key, res) if controls else ()
        out.append(ClaimResult(c, key, tests, ctl))
    return out


def paper_name(source: str, papers: dict[str, dict]) -> str:
    """'LeOCLR (Anonymous authors, 2024)': the paper's name and citation from references.yaml, else its file."""
    p = papers.get(paper_of(source))
    return f"{p['name']} ({p['cite']})" if p else paper_of(source)


def where(source: str) -> str:
    """The place in the paper a source names ('Table 5', 'Abstract')."""
    parts = str(source).split(",", 1)
    return parts[1].strip() if len(parts) > 1 else ""


def exploratory_count(comps: list[Comparison], protos: list[Protocol], primary: dict[tuple[str, str], str],
                      res: Results) -> tuple[int, int]:
    """(intervals that are exploratory, of them excluding 0): how many chance findings to expect."""
    n = hits = 0
    for comp in comps:
        for p in protos:
            if primary.get((comp.run.run, comp.base.run)) == p.key:
                continue
            d = res.difference(comp.run, comp.base, p.key)
            if d is not None:
                n += 1
                hits += d.verdict != stats.SAME
    return n, hits


def is_floor(m: RunMetrics) -> bool:
    return m.method == FLOOR_METHOD
