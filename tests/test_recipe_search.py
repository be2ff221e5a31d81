"""The recipe search's validation split is carved from the training images: its bank lies inside the
pretraining subset, its queries outside it, and a split that cannot be carved is refused. Its settings land at the
top of a run's merge (a method block's own lr is replaced too), and a stage's current setting is scored once."""
from __future__ import annotations

import math

import numpy as np
import pytest

import benchmarks.recipe_search as R
from benchmarks.recipe_search import FAMILIES, Validation, apply, beyond_edge, current, decide, effective, key_of
from pipeline import params as P
from pipeline.data.shards import read_manifest
from tests.conftest import tiny_params


def test_queries_outside_the_pretraining_subset_and_bank_inside(shard_dir):
    n = len(read_manifest(shard_dir, "train"))
    p = tiny_params(**{"train.train_subset": n - 4})
    v = Validation(p, shard_dir, bank=1000, queries=4, device="cpu")
    assert v.bank.tolist() == list(range(n - 4)) and v.queries.tolist() == list(range(n - 4, n))
    assert not np.intersect1d(v.bank, v.queries).size
    with pytest.raises(SystemExit, match="--queries 5"):
        Validation(p, shard_dir, bank=10, queries=5, device="cpu")


def test_a_setting_tops_the_merge_and_equal_configs_are_one_training():
    p = tiny_params()
    p["methods"]["simclr"]["train"] = {"lr": 0.123}
    q = apply(p, "simclr", {"lr": 0.5, "warmup_epochs": 0.0})
    assert P.method_config(q, "simclr")[2]["lr"] == 0.5 and P.method_config(p, "simclr")[2]["lr"] == 0.123
    cur = P.method_config(p, "simclr")[2]
    same = apply(p, "simclr", {"lr": cur["lr"], "warmup_epochs": cur["warmup_epochs"]})
    assert effective(same, "simclr") == effective(p, "simclr")          # the current setting: scored once
    assert effective(q, "simclr") != effective(p, "simclr")
    assert effective(apply(p, "simclr", {"knn_monitor": [5, 5]}), "simclr") == effective(p, "simclr")
    assert key_of({"lr": 0.5}) == "train.lr=0.5"


def test_schedule_grid_has_flat_and_both_cosines_with_and_without_warmup_and_lr_grid_is_shared():
    stage = {st.name: st.candidates for st in FAMILIES["sgd"]["stages"]}
    shapes = {(s["warmup_epochs"], s["min_lr_ratio"]) for s in stage["schedule"]({}, {})}
    assert shapes == {(w, m) for w in (0.0, 0.5) for m in (1.0, 0.1, 0.0)}
    lr = {st.name: st.candidates for st in FAMILIES["barlow"]["stages"]}["lr"]
    grid = [c["lr"] for c in lr({"lr": 0.06}, {"lr": 0.06})]
    assert grid == [0.015, 0.03, 0.06, 0.12]
    assert [c["lr"] for c in lr({"lr": 0.02}, {"lr": 0.06})] == grid + [0.02]   # off-grid current is scored too


def test_a_setting_changes_only_beyond_two_standard_errors():
    scores = {"cur": [40.0, 30.0], "new": [41.0, 30.5]}
    assert decide(scores, "cur", se=0.7) == ("cur", "new", True)
    scores["new"] = [42.0, 31.0]
    assert decide(scores, "cur", se=0.7) == ("new", "new", False)


def test_the_residual_init_goes_into_the_shared_backbone_and_is_searched_first():
    p = tiny_params()
    backbone = P.run_spec(p, "simclr")["backbone"]
    p["backbones"][backbone].pop("zero_init_last", None)   # unset: the builder's default
    assert P.run_spec(p, "mocov2")["backbone"] == backbone
    assert current(p, "simclr", ["backbone.zero_init_last", "lr"]) == {
        "backbone.zero_init_last": True, "lr": P.method_config(p, "simclr")[2]["lr"]}   # the builder's default
    q = apply(p, "simclr", {"backbone.zero_init_last": False})
    assert q["backbones"][backbone]["zero_init_last"] is False and "zero_init_last" not in p["backbones"][backbone]
    assert "backbone.zero_init_last" not in P.method_config(q, "simclr")[2]   # not a train key
    assert P.method_config(q, "mocov2")[3]["zero_init_last"] is False        # every run on that backbone
    assert effective(q, "simclr") != effective(p, "simclr")
    assert key_of({"backbone.zero_init_last": False}) == "backbone.zero_init_last=False"
    stages = [st.name for st in FAMILIES["sgd"]["stages"]]
    assert stages[0] == "residual_init" and stages[1] == "schedule"


def test_beyond_edge_steps_past_either_end_at_the_grids_ratio():
    assert beyond_edge([0.03, 0.06, 0.12], 0.12) == 0.24
    assert beyond_edge([0.03, 0.06, 0.12], 0.03) == 0.015
    assert beyond_edge([1e-4, 5e-4, 1e-3], 1e-3) == 2e-3
    assert beyond_edge([0.03, 0.06, 0.12], 0.06) is None


@pytest.mark.parametrize("peak, tried, chosen", [
    (0.2, [0.03, 0.06, 0.12, 0.24, 0.48], 0.24),    # best at the top end twice: extended until it lies inside
    (0.05, [0.03, 0.06, 0.12], 0.06),               # best inside: the grid as given
    (10.0, [0.03, 0.06, 0.12, 0.24, 0.48], 0.48),   # still at the end after MAX_EXTENSIONS: stops there
])
def test_a_one_number_stage_is_extended_while_its_best_lies_at_an_end(monkeypatch, peak, tried, chosen):
    def score(q, run, config, *_):   # a score peaked at `peak` on a log scale, the same for both runs
        return {"knn200": 40.0 - 3 * abs(math.log2(P.method_config(q, run)[2]["lr"] / peak)), "train_s": 0.0,
                "final_loss": None}

    monkeypatch.setattr(R, "score", score)
    p = tiny_params(**{"train.lr": 0.06})
    for run in ("simclr", "mocov2"):
        P.method_config(p, run)[1].get("train", {}).pop("lr", None)
    fam = {"runs": ["simclr", "mocov2"], "per_run": False, "epochs": None,
           "stages": [R.Stage("lr", R.base_lr((0.5, 1.0, 2.0)), True)]}
    table = {}
    q = R.search_family("sgd", fam, p, table, None, None, 0.7, 1, lambda: None, None)
    assert [float(r["setting"].split("=")[1]) for r in table["rows"] if r["run"] == "simclr"] == tried
    assert q["train"]["lr"] == chosen


def test_the_barlow_familys_init_is_its_own_shared_by_the_pair_and_scored_on_three_seeds(monkeypatch):
    """The Barlow family searches the init on a copy of the backbone block (the sgd family's choice stays on
    every other run), one setting for both runs of the pair, each setting scored as the mean over the
    three training seeds of the pair's base (the sgd family's recipe is chosen on its bases too); its lr is then
    searched per run on seed 0."""
    trained = []

    def score(q, run, config, *_):   # gamma 0 helps seeds 1 and 2 only: one seed would keep gamma 1
        gamma0 = P.method_config(q, run)[3]["zero_init_last"]
        trained.append(run)
        return {"knn200": 30.0 + (4.0 if gamma0 and run[-3:] in ("-s1", "-s2") else 0.0)
                - (9.0 if gamma0 and run.startswith("gsssl") else 0.0), "train_s": 0.0, "final_loss": None}

    monkeypatch.setattr(R, "score", score)
    p = tiny_params(**{"seeds.values": [0, 1, 2], "seeds.runs": ["barlow_twins", "gsssl"], "seed": 0})
    shared = P.run_spec(p, "simclr")["backbone"]
    for run in ("barlow_twins", "gsssl", "simclr"):
        P.run_spec(p, run)["backbone"] = shared
    p["backbones"][shared]["zero_init_last"] = False
    table = {}
    fam = {**FAMILIES["barlow"], "stages": [FAMILIES["barlow"]["stages"][0]]}
    q = R.search_family("barlow", fam, p, table, None, None, 0.7, 1, lambda: None, None)
    init_rows = [(r["run"], r["setting"]) for r in table["rows"] if r["stage"] == "residual_init"]
    assert sorted({run for run, _ in init_rows}) == ["barlow_twins", "barlow_twins-s1", "barlow_twins-s2"]
    assert len(init_rows) == 6 and sorted(set(trained)) == sorted({run for run, _ in init_rows})   # on the base
    (label, pick), = table["chosen"]["barlow"].items()
    assert label == "residual_init (barlow_twins, gsssl), scored on barlow_twins, 3 seeds"
    assert pick["setting"] == "backbone.zero_init_last=True" and not pick["kept_current"]
    assert P.method_config(q, "barlow_twins")[3]["zero_init_last"] is True
    assert P.method_config(q, "gsssl")[3] == P.method_config(q, "barlow_twins")[3]     # one init for the pair
    assert P.method_config(q, "simclr")[3]["zero_init_last"] is False                  # the sgd family's stays
    assert p["backbones"][shared]["zero_init_last"] is False and P.run_spec(p, "gsssl")["backbone"] == shared
    lr = FAMILIES["barlow"]["stages"][1]
    assert lr.name == "lr" and lr.seeds == 1 and lr.per_run is None and FAMILIES["barlow"]["per_run"]


def test_seed_instances_name_each_seed_as_the_pipeline_does():
    p = tiny_params(**{"seeds.values": [0, 1, 2], "seeds.runs": ["barlow_twins"], "seed": 0})
    assert R.seed_instances(p, ["barlow_twins"], 1) == ["barlow_twins"]
    assert R.seed_instances(p, ["barlow_twins"], 3) == ["barlow_twins", "barlow_twins-s1", "barlow_twins-s2"]
    with pytest.raises(SystemExit, match="seeds.values has 3"):
        R.seed_instances(p, ["barlow_twins"], 4)


def test_the_table_describes_every_family_it_holds_choices_for():
    """The report's recipe line reads the families from the table: a family searched by an earlier invocation
    (its choices in the table) stays described when another family is searched."""
    d = R.describe(FAMILIES["barlow"])
    assert d["stages"] == ["residual_init", "lr"] and d["seeds"] == {"residual_init": 3}
    assert d["scored_on"] == {"residual_init": ["barlow_twins"]} and d["own_backbone"] and d["per_run"]
    assert R.describe(FAMILIES["sgd"])["seeds"] == {} and not R.describe(FAMILIES["sgd"])["own_backbone"]
