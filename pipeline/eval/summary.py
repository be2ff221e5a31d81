"""One small metrics file per run instance: the numbers a reader compares, in few short columns.

`reports/metrics/summary/<run>.json` (`pipeline.paths.summary_metrics`, `{<run>: {...}}`), written by the
evaluate stage from its own metrics and the pretrain stage's summary: kNN-200 top-1, linear top-1, semi-supervised top-1 at 1 % and 10 %
labels (the configured `evaluate.semi_learner`, mean over `semi_seeds`), views/s, the training seed. Keyed by
the run, so `dvc exp show` names the columns `<run>.knn200`, ... and narrows to one run's six in ~95 columns
(README, "Reading results").
"""
from __future__ import annotations


def _r(x):
    return None if x is None else round(float(x), 2)


def run_summary(evaluation: dict, pretrain: dict, semi_learner: str) -> dict:
    """{knn200, linear, semi1, semi10, views_s, seed}: percentages rounded to 0.01; None where not measured."""
    semi = evaluation.get("semi", {})

    def semi_at(frac: float):
        row = next((v for k, v in semi.items() if abs(float(k) - frac) < 1e-9), None)
        return _r(row.get(semi_learner, {}).get("mean")) if row else None

    return {"knn200": _r(evaluation.get("knn", {}).get("200")), "linear": _r(evaluation.get("linear", {}).get("top1")),
            "semi1": semi_at(0.01), "semi10": semi_at(0.1), "views_s": _r(pretrain.get("views_per_s")),
            "seed": evaluation.get("seed", pretrain.get("seed"))}
