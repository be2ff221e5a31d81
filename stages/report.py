"""report stage: `python -m stages.report` -> reports/report.md, reports/report.html, reports/figures/*.png.

Reads only the metrics files of the runs and pair runs in params.yaml (plus the mine stage's metrics and
the papers' reference numbers); a missing
metrics file is a one-line error naming it.
"""
import sys

from pipeline import params
from pipeline.report.build import build


def run() -> None:
    p = params.load("params.yaml", methods=())
    paths = build(".", p["runs"], p["dataset"]["name"], p["report"]["title"], pair_runs=p["pair_runs"],
                  beside=p["report"].get("beside"), seeds=p.get("seeds"), default_seed=p["seed"])
    n_inst = len(params.instances(p))
    print(f"report: {len(p['runs']) + len(p['pair_runs'])} runs ({n_inst} seeded instances) -> {', '.join(str(x) for x in paths)}")


if __name__ == "__main__":
    try:
        run()
    except params.PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
