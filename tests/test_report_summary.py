"""The report's conclusions: claim outcomes by the stated rule, one set of seed-aggregated numbers in every table,
SePP-ID's semantic pairs against its Table 9 control, the setup box read from the metrics, prose without internal
names, and the page's building blocks on their own."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.report import build as rb
from pipeline.report import page, stats
from pipeline.report.claims import CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, outcome
from pipeline.report.tables import Table, shown_epochs
from tests.close import close

N = 400   # test images; accuracies move in steps of 0.25 points
RUNS = {"mocov2": {"method": "mocov2", "backbone": "r18"}, "leoclr": {"method": "leoclr", "backbone": "r18"},
        "simclr": {"method": "simclr", "backbone": "r18"}, "random-r18": {"method": "random", "backbone": "r18"}}
PAIR_RUNS = {"seppid-mocov2": {"method": "mocov2", "backbone": "r18", "pairs": "semantic"},
             "seppid-random": {"method": "mocov2", "backbone": "r18", "pairs": "random"}}
SEEDS = {"mocov2": [0, 1, 2], "leoclr": [0, 1, 2], "seppid-mocov2": [0, 1, 2], "seppid-random": [0, 1, 2]}
# mean accuracy per run, and how far seed s sits from it: offset * (s - 1); a different offset per run, so one
# seed's difference between two runs is never their mean difference
ACC = {"mocov2": 50.0, "leoclr": 60.0, "simclr": 55.5, "random-r18": 20.0, "seppid-mocov2": 52.5, "seppid-random": 51.0}
OFFSET = {"mocov2": 1.75, "leoclr": 1.25, "seppid-mocov2": 0.75, "seppid-random": 2.25}
MINE = {"encoder_run": "mocov2", "layer": "projector", "K": 2000, "pool": 20000, "min_sim": 0.97, "max_sim": 0.99,
        "max_per_anchor": 0,
        "semantic": {"K": 2000, "pairs": 321, "anchors_covered": 150, "mean_positives_per_anchor": 2.14,
                     "pair_accuracy": 0.3536, "similarity_hist": {"edges": [0.97, 0.98, 0.99], "counts": [300, 21]}},
        "random": {"K": 20000, "pairs": 321, "anchors_covered": 321, "mean_positives_per_anchor": 1.0,
                   "pair_accuracy": 1.0, "kind": "same_image"}}


def seed_acc(run: str, seed: int) -> float:
    return ACC[run] + OFFSET.get(run, 0.0) * (seed - 1) if run in SEEDS else ACC[run]


def write_all(root: Path) -> None:
    """Metrics, curves and per-image predictions of every instance; each evaluate JSON holds exactly the accuracy
    of its own predictions, so a table that read one seed's JSON would show that seed's value."""
    labels = np.arange(N) % 10
    difficulty = (np.arange(N) + 0.5) / N
    for run, spec in {**RUNS, **PAIR_RUNS}.items():
        for seed in SEEDS.get(run, [0]):
            inst = run if seed == 0 else f"{run}-s{seed}"
            acc = seed_acc(run, seed)
            trained = spec["method"] != "random"
            pred = np.where(difficulty < acc / 100, labels, (labels + 1) % 10)
            pre = {"run": inst, "base_run": run, "seed": seed, **spec, "epochs": 3 if trained else 0,
                   "steps": 78 * 3 if trained else 0, "batch_size": 256, "train_images": 20000 if trained else None,
                   "wall_time_s": 1800.0 if trained else 0.0, "views_per_s": 700.0, "peak_mem_mib": 512.0,
                   "device": "cpu", "world_size": 1}
            ev = {"run": inst, "base_run": run, "seed": seed, **spec, "n_train": 50000, "n_test": N,
                  "knn": {"10": acc, "200": acc}, "linear": {"top1": acc, "converged": True},
                  "semi": {"0.01": {"logreg": {"mean": acc, "std": 0.0, "converged": [True, True]}}},
                  "seconds": {"knn": 60.0, "linear": 60.0}}
            for sub, obj in (("pretrain", pre), ("evaluate", ev)):
                path = root / "reports/metrics" / sub / f"{inst}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(obj))
            curve = root / "reports/plots/pretrain" / f"{inst}.csv"
            curve.parent.mkdir(parents=True, exist_ok=True)
            curve.write_text("epoch,step,loss\n" + "".join(f"{e},{78 * e},{6 - e}\n" for e in (1, 2, 3)))
            cols = {"index": np.arange(N), "label": labels, "knn_10": pred, "knn_200": pred, "linear": pred,
                    "semi_1pct_logreg_s0": pred, "semi_1pct_logreg_s1": pred}
            (root / "reports/predictions").mkdir(parents=True, exist_ok=True)
            pd.DataFrame(cols).to_parquet(root / "reports/predictions" / f"{inst}.parquet")
    (root / "reports/metrics/mine.json").write_text(json.dumps(MINE))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_all(root)
    rep = rb.build_report(root, RUNS, "cifar10", "T", pair_runs=PAIR_RUNS, beside={"leoclr": "mocov2"},
                          seeds=SEEDS, n_boot=200, image_size=32)
    return root, rep


def _point_values(cell: str) -> set[str]:
    """The numbers a cell states as values (interval bounds in brackets left out: they are not means)."""
    return set(re.findall(r"[+-]?\d+\.\d\d", re.sub(r"\[[^\]]*\]", "", cell)))


def test_no_table_shows_one_seed_where_the_mean_is_meant(report):
    """Every accuracy and difference in every table is the mean over seeds: seed 0's own accuracy or seed 0's own
    difference between two runs must appear nowhere (the SePP-ID gain table used to show seed 0's)."""
    _, rep = report
    forbidden = {f"{seed_acc(r, 0):.2f}" for r in SEEDS}
    pairs = [("leoclr", "mocov2"), ("seppid-mocov2", "mocov2"), ("seppid-random", "mocov2"),
             ("seppid-mocov2", "seppid-random")]
    forbidden |= {f"{seed_acc(a, 0) - seed_acc(b, 0):+.2f}" for a, b in pairs}
    means = {f"{ACC[r]:.2f}" for r in ACC} | {f"{ACC[a] - ACC[b]:+.2f}" for a, b in pairs}
    assert not forbidden & means   # the test data keep the two apart
    shown = {v for t in rep.tables for row in t.rows for cell in row for v in _point_values(cell)}
    assert not shown & forbidden, sorted(shown & forbidden)
    gain = next(t for t in rep.tables if t.title == "SePP-ID: gain over the base run")
    row = dict(zip(gain.columns, gain.rows[0]))
    assert row["kNN-200"] == "52.50" and row["Δ kNN-200"] == "+2.50"     # means over the 3 seeds: 52.5 - 50.0
    assert row["seeds"] == "3 / 3"


def test_forest_plot_has_a_row_per_pair_and_protocol_with_primaries_marked(report):
    from pipeline.report.claims import comparisons, primary_keys
    from pipeline.report.figures import forest_rows
    from pipeline.report.results import Results

    root, rep = report
    metrics = rb.load_runs(root, RUNS, PAIR_RUNS, {"leoclr": "mocov2"}, SEEDS)
    bases = rb.base_runs(metrics, {"leoclr": "mocov2"})
    comps = comparisons(metrics, bases)
    res = Results(metrics, n_boot=200)
    primary = primary_keys(rb.load_claims(), metrics, bases)
    rows = forest_rows(comps, res, primary, metrics)
    # 4 pairs (leoclr, the two pair runs against mocov2, semantic against control) x kNN-10, kNN-200, linear, semi 1%
    assert len(rows) == 4 * 4
    assert [(r[0], r[1]) for r in rows if r[3]] == [("leoclr vs mocov2", "linear"), ("seppid-mocov2 vs mocov2", "linear"),
                                                    ("seppid-mocov2 vs seppid-random (control)", "linear")]
    leo = next(r[2] for r in rows if r[0] == "leoclr vs mocov2" and r[1] == "kNN-200")
    assert close(torch.tensor(leo.mean), torch.tensor(10.0), rel=1e-9) and leo.lo > 0
    assert rep.figures["forest.png"].startswith(b"\x89PNG") and rep.figures["accuracy.png"].startswith(b"\x89PNG")


def test_semantic_pairs_are_compared_with_the_table_9_control(report):
    _, rep = report
    side = next(t for t in rep.tables if t.title == "Every pair on every protocol")
    pairs = {r[0] for r in side.rows}
    assert "seppid-mocov2 vs seppid-random" in pairs and "seppid-mocov2 vs mocov2" in pairs
    row = next(dict(zip(side.columns, r)) for r in side.rows if r[0] == "seppid-mocov2 vs seppid-random" and r[1] == "linear")
    assert row["difference [95 % interval]"].startswith("+1.50 [") and row["measure"] == "primary"  # 52.5 - 51.0
    mined = next(t for t in rep.tables if t.title == "SePP-ID: mined pairs")
    by_set = {r[0]: dict(zip(mined.columns, r)) for r in mined.rows}
    control = by_set["Table 9 control: random images, each with itself"]
    assert control["images searched (K of pool)"] == "20000 of 20000"       # K of the control from mine.json
    assert by_set["semantic (mined)"]["images searched (K of pool)"] == "2000 of 20000"
    assert "any number" not in mined.caption and "every positive of an anchor kept" in mined.caption
    assert "two augmented copies of itself" in mined.caption
    claims = next(t for t in rep.tables if t.title.startswith("Claims against our runs"))
    seppid = next(dict(zip(claims.columns, r)) for r in claims.rows if r[0].startswith("SePP-ID"))
    assert "mined pairs 35.4 % same-label (paper: 92.03 %)" in seppid["verdict"]


def test_summary_and_setup_open_the_report(report):
    _, rep = report
    md = rep.markdown
    assert md.index("# Summary") < md.index("# Setup and budget") < md.index("## kNN accuracy")
    assert rep.html.index('<section id="summary">') < rep.html.index('<section id="setup">') < rep.html.index("kNN accuracy")
    claims = next(t for t in rep.tables if t.title == "Paper claims: outcome at this budget")
    by_paper = {r[0].split(" (")[0]: r[-1] for r in claims.rows}
    assert by_paper["LeOCLR"] == REPRODUCED            # +10 points on the primary measure, linear
    assert by_paper["SePP-ID"] == REPRODUCED           # +2.5 points over 400 images, 3 seeds
    methods = next(t for t in rep.tables if t.title == "Each method against its base")
    leo = dict(zip(methods.columns, next(r for r in methods.rows if r[0] == "leoclr vs mocov2")))
    assert leo["linear"] == "+10.00 better*" and leo["kNN-200"] == "+10.00 better"   # * : the primary measure
    setup = dict(re.findall(r"- \*\*(.+?)\*\*: (.+)", md.split("# Setup and budget", 1)[1].split("\n# ", 1)[0]))
    assert setup["images"].startswith("pretraining on 20,000 of the 50,000 training images of cifar10, at 32 x 32 px")
    assert setup["epochs per run"] == "3 (every run)"
    assert setup["batch"] == "256" and setup["hardware"].startswith("CPU")
    # 13 trained instances x 30 min pretraining; 14 instances (with the floor) x 2 min evaluation
    assert setup["wall time"].startswith("7.0 h in all: pretraining 6.5 h over 13 run instances, evaluation 28 min")
    assert "linear 20.0" in setup["random-init floors"]


def test_prose_names_no_configuration_keys_or_files(report):
    root, rep = report
    for text in (rep.markdown, rep.html):
        for internal in ("report.beside", "train.knn_monitor", "evaluate.linear_max_iter", "stats.py", ".yaml", ".txt",
                         "pipeline/", "at most any number"):
            assert internal not in text, internal


@pytest.mark.parametrize("verdicts, want", [
    ([stats.BETTER], REPRODUCED), ([stats.BETTER, stats.BETTER], REPRODUCED), ([stats.SAME], INCONCLUSIVE),
    ([stats.SAME, stats.WORSE], CONTRADICTED), ([stats.BETTER, stats.WORSE], INCONCLUSIVE),
    ([stats.BETTER, stats.SAME], INCONCLUSIVE), ([], NOT_TESTED), ([None], NOT_TESTED)])
def test_outcome_rule(verdicts, want):
    interval = {stats.BETTER: (0.5, 1.5), stats.WORSE: (-1.5, -0.5), stats.SAME: (-0.5, 0.5)}
    diffs = [None if v is None else stats.Difference(sum(interval[v]) / 2, *interval[v], 3, 100) for v in verdicts]
    assert outcome(diffs) == want


def test_epochs_per_run_names_the_exceptions():
    from pipeline.report.budget import _epochs_text
    assert _epochs_text({3: ["a", "b", "c"], 16: ["vit", "pw"], 4: ["dino"]}) == \
        "4 (dino); 16 (vit and pw); 3 (every other run)"


def test_convergence_columns_are_compact():
    assert shown_epochs(4) == [0, 1, 2, 3]
    assert shown_epochs(17) == [0, 1, 2, 3, 4, 8, 12, 16]
    assert shown_epochs(6) == [0, 1, 2, 3, 4, 5]


def test_page_colours_key_columns_and_folds_notes():
    t = Table("T", ["pair", "verdict"], [["a vs b", "better"], ["c vs d", "≈"], ["e vs f", "worse"]],
              key_columns=("verdict",), notes=[("Paper, Table 1", "“quoted”")])
    md, html = page.render("Title", [page.Section("S", [t, page.Text("note")], "s")], {})
    assert '<td class="verdict better">better</td>' in html and '<td class="verdict same">≈</td>' in html
    assert '<td class="verdict worse">worse</td>' in html and '<th class="verdict">verdict</th>' in html
    assert "<details><summary>Quotes and settings</summary>" in html and "“quoted”" in html
    assert html.startswith("<!DOCTYPE html>") and "<title>Title</title>" in html
    assert "| a vs b | better |" in md and "> **Paper, Table 1.** “quoted”" in md


def test_setup_box_says_which_runs_the_recipe_was_searched_on(tmp_path):
    """Issue 26, item 7: the search covers the compared methods, or the report says it did not."""
    write_all(tmp_path)
    table = {"queries": 5000, "vit_epochs": 4,
             "families": {"sgd": {"runs": ["simclr", "mocov2"], "per_run": False,
                                  "stages": ["residual_init", "schedule", "lr"]},
                          "barlow": {"runs": ["barlow_twins"], "per_run": True, "stages": ["lr"]},
                          "bt": {"runs": ["barlow_twins", "gsssl"], "per_run": True, "stages": ["residual_init", "lr"],
                                 "seeds": {"residual_init": 3}, "scored_on": {"residual_init": ["barlow_twins"]}}},
             "chosen": {"sgd": {"residual_init (simclr, mocov2)": {"setting": "backbone.zero_init_last=False",
                                                                   "kept_current": False},
                                "schedule (simclr, mocov2)": {"setting": "train.warmup_epochs=0.0, train.min_lr_ratio=1.0",
                                                             "kept_current": False},
                                "lr (simclr, mocov2)": {"setting": "train.lr=0.06", "kept_current": True}},
                        "bt": {"residual_init (barlow_twins, gsssl), scored on barlow_twins, 3 seeds": {
                            "setting": "backbone.zero_init_last=True", "kept_current": False},
                               "lr (barlow_twins)": {"setting": "train.lr=0.03", "kept_current": True}}}}
    (tmp_path / "recipe.json").write_text(json.dumps(table))
    rep = rb.build_report(tmp_path, RUNS, "cifar10", "T", beside={"leoclr": "mocov2"}, seeds=SEEDS, n_boot=50,
                          image_size=32, recipe_search="recipe.json")
    setup = dict(re.findall(r"- \*\*(.+?)\*\*: (.+)", rep.markdown.split("# Setup and budget", 1)[1].split("\n# ", 1)[0]))
    recipe = setup["recipe"]
    assert "Residual init, schedule and lr searched on simclr and mocov2 together: residual branches' last BN at " \
           "gamma 1; no warm-up, flat; base lr 0.06 (the previous value kept)" in recipe
    assert "Lr for barlow_twins: search not finished" in recipe
    assert ("Residual init and lr searched on barlow_twins and gsssl each on its own: residual branches' last BN at "
            "gamma 0 (one for all, scored on barlow_twins over 3 seeds); base lr 0.03 (the previous value kept)") in recipe
    assert "one seed per setting unless said" in recipe
    assert recipe.endswith("Not searched: leoclr train with their family's choice.")   # the paper run, unsearched
    assert list(setup).index("recipe") == list(setup).index("why far below the papers") - 1
    (tmp_path / "recipe.json").write_text("{}")
    with pytest.raises(rb.DataError, match="recipe.json: no 'families'"):
        rb.build_report(tmp_path, RUNS, "cifar10", "T", seeds=SEEDS, n_boot=50, recipe_search="recipe.json")


def test_hardware_names_what_timed_each_run_and_flags_mixed_machines():
    """Wall times compare only on one machine: the setup names the hardware each instance was timed on, and a
    run resumed on other hardware (train.json's timed_on lists two) is named."""
    from types import SimpleNamespace

    from pipeline.report.budget import _hardware

    def inst(run, *timed_on):
        return SimpleNamespace(pretrain={"run": run, "device": "cpu", "world_size": 1, "timed_on": list(timed_on)})

    def metrics(*insts):
        return [SimpleNamespace(run=i.pretrain["run"], trained=True, instances=[i], pretrain=i.pretrain) for i in insts]

    one = _hardware(metrics(inst("a", "CPU X, 2 threads"), inst("b", "CPU X, 2 threads")))
    assert one == "CPU, one process per run; timed on CPU X, 2 threads"
    two = _hardware(metrics(inst("a", "CPU X, 2 threads"), inst("b", "CPU Y, 2 threads", "CPU X, 2 threads")))
    assert "CPU X, 2 threads (2 run instances) and CPU Y, 2 threads (1 run instances)" in two
    assert "compare only between runs timed on the same one" in two and two.endswith(
        "b resumed on other hardware (their wall times mix two machines)")
    assert _hardware(metrics(inst("a"))) == "CPU, one process per run"   # trained before timed_on was recorded
