"""The report stage: fake metrics for three runs (two methods + a random floor) in tmp_path, then the outputs."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.params import PipelineError
from pipeline.report import build as rb

RUNS = {
    "simclr": {"method": "simclr", "backbone": "r18"},
    "mocov2": {"method": "mocov2", "backbone": "r18"},
    "random-r18": {"method": "random", "backbone": "r18"},
}
KNN = {"simclr": (41.0, 42.5, 45.25), "mocov2": (38.0, 39.0, 40.5), "random-r18": (20.0, 21.0, 22.75)}
REGISTRY = {"simclr", "mocov2", "byol", "simsiam", "barlow_twins", "vicreg", "nnclr", "dino", "gsssl", "seppid",
            "pnnclr", "leoclr", "pwself"}


def write_metrics(root: Path, runs=RUNS) -> None:
    for i, (run, spec) in enumerate(runs.items()):
        trained = spec["method"] != "random"
        pre = {"run": run, **spec, "epochs": 3 if trained else 0, "steps": 30 if trained else 0,
               "wall_time_s": 12.5 * (i + 1) if trained else 0.0, "views_per_s": 1000.0 + i if trained else 0.0,
               "peak_mem_mib": 512.0, "final_loss": 5.0 if trained else None, "device": "cpu", "world_size": 1}
        k10, k20, k200 = KNN[run]
        ev = {"run": run, **spec, "feat_dim": 128, "n_train": 1000, "n_test": 200,
              "knn": {"10": k10, "20": k20, "200": k200},
              "linear": {"top1": k200 + 5, "C": 1.0, "val_top1": k200 + 4},
              "semi": {f: {"logreg": {"mean": 30.0 + i, "std": 1.5, "values": [28.5, 30.0, 31.5]},
                           "label_spreading": {"mean": 32.0, "std": 0.5, "values": [31.5, 32.0, 32.5]}}
                       for f in ("0.01", "0.1")},
              "seconds": {"knn": 0.1}}
        for sub, obj in (("pretrain", pre), ("evaluate", ev)):
            p = root / "reports/metrics" / sub / f"{run}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(obj))
        curve = root / "reports/plots/pretrain" / f"{run}.csv"
        curve.parent.mkdir(parents=True, exist_ok=True)
        if trained:
            curve.write_text("epoch,step,loss,lr,views_per_s,epoch_time_s,nt_xent\n"
                             + "".join(f"{e},{10 * e},{6 - e * 0.5},0.06,1000,4.0,{6 - e * 0.5}\n" for e in (1, 2, 3)))
        else:
            curve.write_text("epoch,step,loss\n")


@pytest.fixture
def report(tmp_path):
    write_metrics(tmp_path)
    paths = rb.build(tmp_path, RUNS, "cifar10", "Test report")
    return tmp_path, paths


def _md_rows(md: str, title: str) -> list[list[str]]:
    """The rows of the markdown table under heading `## title`."""
    section = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r] for r in rows]


def test_outputs_written(report):
    root, paths = report
    for rel in ("reports/report.md", "reports/report.html", "reports/figures/loss.png", "reports/figures/accuracy.png"):
        assert root / rel in paths and (root / rel).stat().st_size > 0
    assert (root / "reports/figures/loss.png").read_bytes().startswith(b"\x89PNG")
    assert not list((root / "reports").rglob("*.tmp"))  # atomic writes leave no temp files


def test_markdown_lists_methods_floor_and_delta(report):
    root, _ = report
    md = (root / "reports/report.md").read_text()
    assert md.startswith("# Test report")
    header, *rows = _md_rows(md, "kNN accuracy")
    by_run = {r[0]: dict(zip(header, r)) for r in rows}
    assert set(by_run) == set(RUNS)
    assert by_run["simclr"]["method"] == "simclr" and by_run["mocov2"]["method"] == "mocov2"
    assert by_run["random-r18"]["method"] == "random" and by_run["simclr"]["seeds"] == "1"
    delta = "Δ kNN-200 vs random"
    assert by_run["simclr"][delta] == "+22.50"  # 45.25 - 22.75
    assert by_run["mocov2"][delta] == "+17.75"  # 40.50 - 22.75
    assert by_run["random-r18"][delta] == "(floor)"
    assert by_run["simclr"]["kNN-10"] == "41.00"  # no predictions: the mean, no interval
    assert "No per-image predictions for simclr, mocov2, random-r18" in md
    header, *rows = _md_rows(md, "Linear probe and semi-supervised")
    probe = {r[0]: dict(zip(header, r)) for r in rows}
    assert probe["simclr"]["linear"] == "50.25"
    assert probe["simclr"]["semi 1% logreg"] == "30.00 ± 1.50"
    assert probe["mocov2"]["semi 10% label_spreading"] == "32.00 ± 0.50"
    header, *rows = _md_rows(md, "Appendix: Pretraining cost")
    cost = {r[0]: dict(zip(header, r)) for r in rows}
    assert cost["random-r18"]["pretrain time (s)"] == "—"
    assert cost["mocov2"]["pretrain time (s)"] == "25.0" and cost["mocov2"]["views/s"] == "1001"
    assert "![" in md and "(figures/loss.png)" in md and "(figures/accuracy.png)" in md


def test_references_table_is_labelled_and_separate(report):
    root, _ = report
    md = (root / "reports/report.md").read_text()
    # an appendix after our results
    assert md.index("## kNN accuracy") < md.index("# Appendix") < md.index("## Appendix: Papers' reference numbers")
    header, *rows = _md_rows(md, "Appendix: Papers' reference numbers")
    for col in ("method", "dataset", "backbone", "epochs", "protocol", "top-1 (%)", "source"):
        assert col in header
    assert rows, "simclr and mocov2 have CIFAR-10 reference numbers in the papers"
    refs = [dict(zip(header, r)) for r in rows]
    assert {r["method"] for r in refs} <= {"simclr", "mocov2"}
    assert {r["dataset"] for r in refs} == {"cifar10"}
    # papers by name, authors and year, not by file name
    assert all(re.fullmatch(r"[\w-]+ \([^)]*\d{4}\), Table \d+", r["source"]) for r in refs), refs
    # e.g. GSSSL's Table 1: SimCLR, ResNet-18, 1000 epochs, linear, 91.0 (printed as 0.910)
    assert any(r["method"] == "simclr" and r["epochs"] == "1000" and r["top-1 (%)"] == "91.00"
               and r["source"] == "GSSSL (Li, Wang, Geng & Xu, 2024), Table 1" for r in refs)
    # none of the papers' numbers leaks into our table
    ours = md.split("## kNN accuracy", 1)[1].split("# Appendix", 1)[0]
    assert "Table" not in ours and ".txt" not in md


def test_html_embeds_images_and_tables(report):
    root, _ = report
    page = (root / "reports/report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == 3 and all(base64.b64decode(b).startswith(b"\x89PNG") for b in imgs)  # accuracy, cost, loss
    assert "Papers&#x27; reference numbers" in page and "<table>" in page
    assert "figures/" not in page  # standalone: no links to files beside it


def test_report_is_deterministic(tmp_path):
    write_metrics(tmp_path)
    a = rb.build_report(tmp_path, RUNS, "cifar10", "t")
    b = rb.build_report(tmp_path, RUNS, "cifar10", "t")
    assert a.markdown == b.markdown and a.figures == b.figures


@pytest.mark.parametrize("missing", ["reports/metrics/evaluate/mocov2.json", "reports/metrics/pretrain/simclr.json",
                                     "reports/plots/pretrain/simclr.csv"])
def test_missing_metrics_file_names_it(tmp_path, missing):
    write_metrics(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(PipelineError) as e:
        rb.build(tmp_path, RUNS, "cifar10", "t")
    msg = str(e.value)
    assert missing in msg and "\n" not in msg
    assert not (tmp_path / "reports/report.md").exists()


def test_random_floor_needs_no_curve(tmp_path):
    write_metrics(tmp_path)
    (tmp_path / "reports/plots/pretrain/random-r18.csv").unlink()
    rb.build_report(tmp_path, RUNS, "cifar10", "t")


def test_stale_metrics_are_an_error(tmp_path):
    write_metrics(tmp_path)
    runs = {**RUNS, "simclr": {"method": "byol", "backbone": "r18"}}
    with pytest.raises(PipelineError, match=r"simclr\.json: method 'simclr' does not match runs\.simclr\.method 'byol'"):
        rb.build_report(tmp_path, runs, "cifar10", "t")


def test_no_floor_for_backbone(tmp_path):
    runs = {"simclr": RUNS["simclr"]}
    write_metrics(tmp_path, runs)
    rep = rb.build_report(tmp_path, runs, "cifar10", "t")
    ours = rep.tables[0]
    assert ours.title == "kNN accuracy" and ours.rows[0][-1].startswith("—")


def test_references_yaml_parses_with_required_fields():
    raw = yaml.safe_load(rb.REFERENCES.read_text())
    refs = raw["references"]
    assert len(refs) > 100
    seeds = Path(__file__).resolve().parents[2] / "shared/seeds"
    for r in refs:
        for key in rb.REF_REQUIRED:
            assert key in r, (key, r)
        assert r["method"] in REGISTRY, r
        assert isinstance(r["top1"], (int, float)) and 0 < r["top1"] <= 100, r
        assert r["epochs"] is None or (isinstance(r["epochs"], int) and r["epochs"] > 0), r
        assert isinstance(r["backbone"], str) and isinstance(r["dataset"], str) and isinstance(r["protocol"], str)
        paper, table = r["source"].split(", ")
        assert paper in rb.SEED_PAPERS and re.fullmatch(r"Table \d+", table), r
        if seeds.is_dir():
            assert (seeds / paper).is_file()
        if r["protocol"] == "knn":
            assert r.get("k") in (10, 20), r
    # every paper contributes, and CIFAR-10 is covered
    assert {r["source"].split(",")[0] for r in refs} == set(rb.SEED_PAPERS)
    assert sum(r["dataset"] == "cifar10" for r in refs) >= 20
    assert rb.load_references() == refs  # the loader's own checks agree


def test_select_references_filters_method_dataset_and_transfer():
    refs = rb.load_references()
    sel = rb.select_references(refs, ["mocov2"], "CIFAR-10")
    assert sel and all(r["method"] == "mocov2" and r["dataset"] == "cifar10" for r in sel)
    assert all("pretrain_dataset" not in r for r in sel)  # ImageNet-pretrained transfer rows are not comparable
    assert rb.select_references(refs, ["random"], "cifar10") == []


def test_beside_places_a_method_after_its_base_with_differences(tmp_path):
    # leoclr builds on mocov2: listed right after it, with its gains over it in every protocol
    runs = {"leoclr": {"method": "leoclr", "backbone": "r18"}, **RUNS}
    KNN["leoclr"] = (40.0, 41.5, 43.0)
    try:
        write_metrics(tmp_path, runs)
        rep = rb.build_report(tmp_path, runs, "cifar10", "t", beside={"leoclr": "mocov2"})
    finally:
        del KNN["leoclr"]
    ours = _md_rows(rep.markdown, "kNN accuracy")
    assert [r[0] for r in ours[1:]] == ["simclr", "mocov2", "leoclr", "random-r18"]
    side = _md_rows(rep.markdown, "Every pair on every protocol")
    cell = {r[1]: dict(zip(side[0], r)) for r in side[1:] if r[0] == "leoclr vs mocov2"}
    assert cell["kNN-200"]["difference [95 % interval]"] == "+2.50 (no interval)"      # 43.0 - 40.5
    assert cell["linear"]["difference [95 % interval]"] == "+2.50 (no interval)" and cell["linear"]["measure"] == "primary"
    assert cell["semi 1% logreg"]["difference [95 % interval]"] == "-2.00 (no interval)"  # semi means 30 + i: leoclr 0, mocov2 2
    assert cell["kNN-200"]["measure"] == "exploratory"
    claims = _md_rows(rep.markdown, "Claims against our runs, pair by pair")
    leo = next(dict(zip(claims[0], r)) for r in claims[1:] if r[0].startswith("LeOCLR"))
    assert "5.1% on ImageNet-1K" in rep.markdown and leo["our run vs base"] == "leoclr vs mocov2"
    assert leo["verdict"] == "not tested (no per-image predictions)"


def test_beside_names_must_be_runs():
    from tests.conftest import tiny_params
    with pytest.raises(PipelineError, match=r"report\.beside\.leoclr: 'nope' is not a run"):
        tiny_params(**{"report.beside": {"leoclr": "nope"}})


def _write_seeded(root: Path, acc: dict[str, float], n: int = 400) -> dict[str, list[int]]:
    """Three seeds of leoclr, mocov2 (and one of the others) with per-image predictions: a run is right on the
    images whose difficulty lies below its accuracy, so leoclr beats mocov2 on the same images."""
    import numpy as np
    import pandas as pd
    runs = {"leoclr": {"method": "leoclr", "backbone": "r18"}, **RUNS}
    KNN["leoclr"] = (40.0, 41.5, 43.0)
    try:
        write_metrics(root, runs)
    finally:
        del KNN["leoclr"]
    seeds = {"leoclr": [0, 1, 2], "mocov2": [0, 1, 2]}
    labels = np.arange(n) % 10
    difficulty = (np.arange(n) + 0.5) / n
    for run in runs:
        for seed in seeds.get(run, [0]):
            inst = run if seed == 0 else f"{run}-s{seed}"
            for sub in ("pretrain", "evaluate"):
                src = root / "reports/metrics" / sub / f"{run}.json"
                obj = {**json.loads(src.read_text()), "run": inst, "base_run": run, "seed": seed}
                if sub == "evaluate" and run == "mocov2":
                    obj["linear"]["converged"] = False
                (root / "reports/metrics" / sub / f"{inst}.json").write_text(json.dumps(obj))
            curve = root / "reports/plots/pretrain" / f"{run}.csv"
            if seed:
                (root / "reports/plots/pretrain" / f"{inst}.csv").write_text(curve.read_text())
            right = difficulty < acc[run] / 100 + 0.01 * (seed - 1)
            pred = np.where(right, labels, (labels + 1) % 10)
            cols = {"index": np.arange(n), "label": labels, "knn_10": pred, "knn_20": pred, "knn_200": pred, "linear": pred}
            cols.update({f"semi_{p}pct_{lr}_s{d}": pred for p in (1, 10) for lr in ("logreg", "label_spreading") for d in (0, 1)})
            (root / "reports/predictions").mkdir(parents=True, exist_ok=True)
            pd.DataFrame(cols).to_parquet(root / "reports/predictions" / f"{inst}.parquet")
    return seeds


def test_seeds_and_predictions_give_intervals_verdicts_and_flags(tmp_path):
    seeds = _write_seeded(tmp_path, {"leoclr": 60.0, "mocov2": 50.0, "simclr": 55.0, "random-r18": 20.0})
    runs = {"leoclr": {"method": "leoclr", "backbone": "r18"}, **RUNS}
    rep = rb.build_report(tmp_path, runs, "cifar10", "t", beside={"leoclr": "mocov2"}, seeds=seeds, n_boot=300)
    knn = {r[0]: dict(zip(_md_rows(rep.markdown, "kNN accuracy")[0], r)) for r in _md_rows(rep.markdown, "kNN accuracy")[1:]}
    # leoclr right on the first 236, 240, 244 of 400 images: mean 60.00 over its 3 seeds
    cell = knn["leoclr"]["kNN-200"]
    mean, lo, hi = map(float, re.fullmatch(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", cell).groups())
    assert mean == 60.0 and lo < 60 < hi and knn["leoclr"]["seeds"] == "3"
    side = _md_rows(rep.markdown, "Every pair on every protocol")
    row = {r[1]: dict(zip(side[0], r)) for r in side[1:]}
    # leoclr is right on every image mocov2 gets right, and on 40 more: +10 points, clearly better
    assert row["kNN-200"]["difference [95 % interval]"].startswith("+10.00 [") and row["kNN-200"]["verdict"] == "better"
    assert row["linear †"]["verdict"] == "better"  # mocov2's linear probe did not converge
    claims = _md_rows(rep.markdown, "Claims against our runs, pair by pair")
    leo = next(dict(zip(claims[0], r)) for r in claims[1:] if r[0].startswith("LeOCLR"))
    assert leo["verdict"] == "better" and leo["difference [95 % interval]"].startswith("+10.00 [")
    assert leo["seeds / epochs"] == "3 + 3 seeds, 3 epochs"
    summary = _md_rows(rep.markdown, "Paper claims: outcome at this budget")
    assert [r[-1] for r in summary[1:] if r[0].startswith("LeOCLR")] == ["reproduced"]
    flags = _md_rows(rep.markdown, "Fits that did not converge")
    assert [r[:2] for r in flags[1:]] == [["mocov2", "0"], ["mocov2", "1"], ["mocov2", "2"]]
    assert "No per-image predictions" not in rep.markdown
    assert set(rep.figures) >= {"accuracy.png", "cost.png"}


def test_loss_panels_plot_loss_terms_not_collapse_diagnostics():
    """PW-Self's curve columns: its loss terms are plotted, its entropy / prototype-count diagnostics are not."""
    cols = ["epoch", "step", "loss", "dino", "patch", "matched", "teacher_entropy_cls", "prototypes_cls",
            "teacher_entropy_patch", "prototypes_patch", "lr", "views_per_s", "epoch_time_s", "knn_top1"]
    assert rb.loss_terms(cols) == ["dino", "patch", "matched"]


def test_labels_of_points_at_one_x_never_overlap():
    """Every 3-epoch run saw the same images: their points share x, and their names must still read."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    fig = Figure(figsize=(4, 3), layout="constrained")
    ax = fig.add_subplot()
    points = [(60000.0, 35.0 + 0.02 * i, f"run-{i}") for i in range(8)] + [(64000.0, 35.3, "pairs"), (300000.0, 36.0, "vit")]
    for x, y, _ in points:
        ax.errorbar([x], [y], yerr=[[0.5], [0.5]], fmt="o")
    ax.set_xscale("log")
    rb._label_points(ax, points)
    rb.FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    boxes = {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts}   # the words, not their leader lines
    assert set(boxes) == {name for _, _, name in points}
    names = sorted(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not boxes[a].overlaps(boxes[b]), (a, b)
    # right of the error bars of its own column (the "pairs" point sits a few points to the right)
    bar_right = ax.transData.transform((64000.0, 35.3))[0]
    assert all(boxes[f"run-{i}"].x0 > bar_right for i in range(8))
