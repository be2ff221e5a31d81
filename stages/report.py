"""report stage: `python stages/report.py` -> reports/report.md, reports/report.html, reports/figures/*.png.

Reads only the metrics files of the runs in params.yaml (and the papers' reference numbers); a missing
metrics file is a one-line error naming it.
"""
import sys

from pipeline import params
from pipeline.report.build import build


def run() -> None:
    p = params.load("params.yaml")
    paths = build(".", p["runs"], p["dataset"]["name"], p["report"]["title"])
    print(f"report: {len(p['runs'])} runs -> {', '.join(str(x) for x in paths)}")


if __name__ == "__main__":
    try:
        run()
    except params.PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
