"""report stage: `python -m stages.report` -> reports/report.md, reports/report.html, reports/figures/*.png.

Reads only the metrics, curves and test predictions of every run instance in params.yaml (plus the mine
stage's metrics, the papers' reference numbers and, when report.recipe_search names it, the recipe search's table). A run with no metrics files yet is listed as not yet trained;
a run with some of its files is loaded, so a missing one is a one-line error naming it.
"""
from pipeline import params
from pipeline.cli import main
from pipeline.report.build import build


def run(argv) -> None:
    p = params.load("params.yaml", methods=())
    seeds: dict[str, list[int]] = {}
    for inst in params.instances(p).values():
        seeds.setdefault(inst["run"], []).append(inst["seed"])
    written = build(".", p["runs"], p["dataset"]["name"], p["report"]["title"], pair_runs=p["pair_runs"],
                    beside=p["report"].get("beside"), seeds=seeds, default_seed=p["seed"],
                    image_size=p["dataset"].get("image_size"), controls=p["report"].get("controls"),
                    sampler=(p.get("mine") or {}).get("encoder_run"),
                    recipe_search=p["report"].get("recipe_search") or None)
    print(f"report: {len(seeds)} runs ({sum(map(len, seeds.values()))} instances) -> {', '.join(str(x) for x in written)}")


if __name__ == "__main__":
    main(run)
