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
SHORT_VERDICT = {stats.BETTER: "better", stats.WORSE: "worse", stats.SAME: "≈"}
# the protocols a summary row shows: the papers' own (linear, kNN-10), kNN-200 and the labelled-only semi fits
SUMMARY_PROTOCOLS = ("knn_10", "knn_200", "linear")


@dataclass(frozen=True)
class Comparison:
    run: RunMetrics
    base: RunMetrics
    kind: str = "method"   # method: a paper's method vs its base | control: SePP-ID's semantic pairs vs Table 9 control

    @property
    def label(self) -> str:
        return f"{self.run.run} vs {self.base.run}"


def comparisons(metrics: list[RunMetrics], bases: dict[str, RunMetrics]) -> list[Comparison]:
    """Every compared pair, in run order: each run against its base, then each SePP-ID semantic pair run against the
    random control run of the same method and backbone (SePP-ID Table 9)."""
    out = [Comparison(m, bases[m.run]) for m in metrics if m.run in bases]
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


def claim_pairs(claim: dict, metrics: list[RunMetrics], bases: dict[str, RunMetrics]) -> list[Comparison]:
    """Our comparisons that test a claim: its `runs` when given, SePP-ID's semantic pair runs against their base,
    else the compared runs of its method."""
    if claim.get("runs"):
        picked = [m for m in metrics if m.run in claim["runs"] and m.run in bases]
    elif claim["method"] == SEPPID_METHOD:
        picked = [m for m in metrics if m.pairs == "semantic" and m.run in bases]
    else:
        picked = [m for m in metrics if m.method == claim["method"] and m.pairs is None and m.run in bases]
    return [Comparison(m, bases[m.run]) for m in picked]


def primary_keys(claims: list[dict], metrics: list[RunMetrics], bases: dict[str, RunMetrics]) -> dict[tuple[str, str], str]:
    """{(run, base run): the protocol key that is a claim's primary measure for that pair}. SePP-ID's semantic-vs-
    control pair shares its claim's primary measure (the paper's Table 9 compares them in linear evaluation)."""
    out: dict[tuple[str, str], str] = {}
    for c in claims:
        key = c.get("protocol", "linear")
        for comp in claim_pairs(c, metrics, bases):
            out[(comp.run.run, comp.base.run)] = key
        if c["method"] == SEPPID_METHOD:
            for comp in comparisons(metrics, bases):
                if comp.kind == "control":
                    out[(comp.run.run, comp.base.run)] = key
    return out


@dataclass(frozen=True)
class ClaimResult:
    claim: dict
    key: str                                                    # the primary protocol
    tests: list[tuple[Comparison, stats.Difference | None]]    # each pair with its primary difference

    @property
    def outcome(self) -> str:
        return outcome([d for _, d in self.tests])


def outcome(diffs: list[stats.Difference | None]) -> str:
    """The claim's outcome from its pairs' primary differences (the rule in the module docstring)."""
    if not diffs or any(d is None for d in diffs):
        return NOT_TESTED
    verdicts = [d.verdict for d in diffs]
    if all(v == stats.BETTER for v in verdicts):
        return REPRODUCED
    if stats.WORSE in verdicts and stats.BETTER not in verdicts:
        return CONTRADICTED
    return INCONCLUSIVE


def claim_results(claims: list[dict], metrics: list[RunMetrics], bases: dict[str, RunMetrics],
                  res: Results) -> list[ClaimResult]:
    out = []
    for c in claims:
        key = c.get("protocol", "linear")
        tests = [(comp, res.difference(comp.run, comp.base, key)) for comp in claim_pairs(c, metrics, bases)]
        out.append(ClaimResult(c, key, tests))
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
