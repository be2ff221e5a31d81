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


def with_relative_loss(csv_text: str) -> str:
    """The per-epoch curve with a `loss_rel` column: each epoch's loss over the run's first-epoch loss.

    Losses of different methods span -1 (negative cosines) to thousands (Barlow Twins' sums); relative to its own
    first epoch every run starts at 1, so all of them share one readable axis in `dvc plots show`. The other
    columns are kept byte for byte."""
    lines = csv_text.rstrip("\n").split("\n")
    header = lines[0].split(",")
    if "loss_rel" in header or "loss" not in header:
        return csv_text
    col = header.index("loss")
    rows = [line.split(",") for line in lines[1:] if line]
    first = next((float(r[col]) for r in rows if r[col] not in ("", "nan")), None)
    out = [lines[0] + ",loss_rel"]
    for line, r in zip((line for line in lines[1:] if line), rows):
        rel = "" if first in (None, 0.0) or r[col] in ("", "nan") else f"{float(r[col]) / abs(first):.6g}"
        out.append(f"{line},{rel}")
    return "\n".join(out) + "\n"
