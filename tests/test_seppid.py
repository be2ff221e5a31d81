"""SePP-ID end to end: the mine stage on tiny shards, pair shards, the combined training stream, params, report.

The pair search itself (exact pairs in [min, max], caps, block independence, metrics) is tested in
test_mining.py; here: what the pipeline builds around it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.data.loader import ShardStream
from pipeline.data.shards import group_samples, iter_split, pair_info, read_manifest, write_pair_shards, write_shards
from pipeline.data.sources import imagefolder as open_folder
from pipeline.data.eval_view import eval_transform
from pipeline.data.views import ViewSpec
from pipeline.mining.io import read_pairs, read_pairs_meta
from pipeline.mining.pairs import mine_pairs
from pipeline.mining.sampler import choose_images, mine
from pipeline.models.encoder_io import load_encoder, load_head, save_encoder
from pipeline.params import DataError, ParamError, method_config, validate
from pipeline.profile import resolve
from pipeline.train.trainer import build_method, train
from tests.conftest import ROOT, make_imagefolder, tiny_params
from tests.test_mining import LO, HI, hand_built

MEAN, STD = [0.5] * 3, [0.25] * 3
# no augmentation at all: a view is the image itself, so a view tells which image it came from
PLAIN = ViewSpec(size=32, crop_scale=None, hflip=0.0, color_jitter_p=0.0, grayscale_p=0.0)


def seppid_params(**over):
    base = {"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0, "train.epochs": 1,
            "train.checkpoint_every": 2, "mine.k_frac": 0.5, "mine.min_sim": 0.5, "mine.max_sim": 0.999,
            "mine.max_per_anchor": 0}
    return tiny_params(**{**base, **over})


def save_untrained_encoder(root: Path, p: dict, run: str = "mocov2") -> Path:
    """The encoder artifact of `run` as its pretrain stage writes it (untrained weights: mining needs none)."""
    torch.manual_seed(0)
    method, _, backbone_cfg = build_method(p, run)
    path = root / "data/models" / run / "encoder.safetensors"
    save_encoder(path, method.encoder_to_export(), backbone_cfg, p["dataset"]["image_size"], meta={},
                 heads=method.heads_to_export())
    return path


@pytest.fixture
def project(tmp_path, shard_dir):
    root = tmp_path / "proj"
    (root / "data/shards").mkdir(parents=True)
    (root / "data/shards/tiny").symlink_to(shard_dir)
    save_untrained_encoder(root, seppid_params())
    return root


def reference_embeddings(root: Path, positions, layer="projector"):
    """The mined images' embeddings computed independently of the sampler: decode, eval transform, encode."""
    backbone, state = load_encoder(root / "data/models/mocov2/encoder.safetensors")
    enc = torch.nn.Sequential(backbone, load_head(state, "projector")) if layer == "projector" else backbone
    tf = eval_transform(32, *[tiny_params()["dataset"][k] for k in ("mean", "std")])
    rows = [(k, tf(img)) for k, _, img in iter_split(root / "data/shards/tiny", "train", positions=positions)]
    with torch.no_grad():
        return [k for k, _ in rows], enc.eval()(torch.stack([x for _, x in rows])).numpy()


# --- the mine stage --------------------------------------------------------------------------------

def test_mine_writes_exactly_the_pairs_of_the_chosen_images(project):
    p = seppid_params()
    metrics = mine(p, project)
    out = project / "data/pairs/tiny"
    assert not list(project.rglob("*.tmp"))  # the temp dir was renamed into place
    positions = choose_images(24, 0.5, seed=0)
    assert len(positions) == 12 == metrics["K"] and metrics["pool"] == 24
    keys, emb = reference_embeddings(project, positions)
    idx = np.array([int(k.rsplit("-", 1)[1]) for k in keys])
    a, q, s = mine_pairs(emb, 0.5, 0.999)
    assert len(a) > 12  # several positives per anchor on this untrained encoder
    df = read_pairs(out / "pairs.parquet")
    np.testing.assert_array_equal(df.anchor.to_numpy(), idx[a])
    np.testing.assert_array_equal(df.positive.to_numpy(), idx[q])
    np.testing.assert_allclose(df.similarity.to_numpy(), s, atol=1e-5)
    assert read_pairs_meta(out / "pairs.parquet")["encoder_run"] == "mocov2"

    # metrics: labels of the manifest, used only here
    label = dict(zip(*[read_manifest(project / "data/shards/tiny", "train")[c] for c in ("index", "label")]))
    sem = metrics["semantic"]
    assert sem["pairs"] == len(a) and sem["anchors_covered"] == len(np.unique(a))
    assert sem["pair_accuracy"] == pytest.approx(np.mean([label[i] == label[j] for i, j in zip(idx[a], idx[q])]))
    assert sum(sem["similarity_hist"]["counts"]) == len(a)
    assert sem["similarity_hist"]["edges"][0] == pytest.approx(0.5) and sem["similarity_hist"]["edges"][-1] == pytest.approx(0.999)

    # the control (paper's Table 9): as many pairs, each a training image with itself
    rnd = read_pairs(out / "random.parquet")
    assert len(rnd) == len(a) and (rnd.anchor == rnd.positive).all() and metrics["random"]["pairs"] == len(a)
    assert set(rnd.anchor) <= set(label)


def test_pair_shards_hold_both_images_of_every_pair(project):
    mine(seppid_params(), project)
    out = project / "data/pairs/tiny"
    train_bytes = {}
    for shard in sorted((project / "data/shards/tiny/train").glob("*.tar")):
        for s in group_samples(shard):
            train_bytes[int(s["__key__"].rsplit("-", 1)[1])] = (s["jpg"], int(s["cls"]))
    for name, parquet in (("semantic", "pairs.parquet"), ("random", "random.parquet")):
        df = read_pairs(out / parquet)
        seen = []
        for shard in sorted((out / name).glob("shard-*.tar")):
            for s in group_samples(shard):
                info = pair_info(s)
                assert s["anchor.jpg"] == train_bytes[info["anchor"]][0]
                assert s["positive.jpg"] == train_bytes[info["positive"]][0]
                assert (info["anchor_label"], info["positive_label"]) == (train_bytes[info["anchor"]][1], train_bytes[info["positive"]][1])
                seen.append((info["anchor"], info["positive"]))
        assert sorted(seen) == sorted(zip(df.anchor, df.positive))  # every pair once
        assert json.loads((out / name / "meta.json").read_text())["pairs"] == len(df)


def test_mine_is_deterministic_and_seeded(project, tmp_path):
    p = seppid_params()
    mine(p, project)
    first = {f.relative_to(project): f.read_bytes() for f in (project / "data/pairs").rglob("*") if f.is_file()}
    mine(p, project)
    again = {f.relative_to(project): f.read_bytes() for f in (project / "data/pairs").rglob("*") if f.is_file()}
    assert first == again  # same params, same bytes: stable DVC hashes
    assert not np.array_equal(choose_images(24, 0.5, 0), choose_images(24, 0.5, 1))
    # the pool is the training subset: no image beyond it is ever mined
    m = mine(seppid_params(**{"train.train_subset": 10, "mine.k_frac": 1.0}), project)
    first10 = set(read_manifest(project / "data/shards/tiny", "train")["index"][:10])
    df = read_pairs(project / "data/pairs/tiny/pairs.parquet")
    assert m["K"] == 10 and set(df.anchor) | set(df.positive) <= first10


def test_mine_layer_backbone_and_missing_projector(project):
    m = mine(seppid_params(**{"mine.layer": "backbone"}), project)
    assert m["feat_dim"] == 64 and m["layer"] == "backbone"  # ResNet-18 width 8: 8 * 8 channels
    assert mine(seppid_params(), project)["feat_dim"] == 128  # the projector's output
    p = seppid_params(**{"mine.encoder_run": "random-resnet18_w8"})
    save_untrained_encoder(project, p, "random-resnet18_w8")
    with pytest.raises(ParamError, match=r"^mine\.layer: 'projector', but .*random-resnet18_w8/encoder\.safetensors exports no projector"):
        mine(p, project)
    with pytest.raises(ParamError, match=r"mine\.k_frac: 0\.01 of 24 training images is 0 image"):
        mine(seppid_params(**{"mine.k_frac": 0.01}), project)


def test_mine_stage_script_warns_in_one_line(tmp_path):
    """The stage as DVC runs it: params.yaml in the cwd, metrics JSON written, one warning line when pairs are dense."""
    root = tmp_path / "proj"
    write_shards(open_folder(make_imagefolder(tmp_path / "img", n_per_class=20)), root / "data/shards/tiny", 25, 0, False)
    raw = resolve("tiny")
    raw["dataset"]["name"] = "tiny"
    raw["mine"].update(k_frac=1.0, min_sim=-1.0, max_sim=1.0, max_per_anchor=0)  # every pair: 59 positives per anchor
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    save_untrained_encoder(root, validate(raw))
    r = subprocess.run([sys.executable, str(ROOT / "stages/mine.py")], cwd=root, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "3540 pairs for 60 anchors" in warnings[0]
    metrics = json.loads((root / "reports/metrics/mine.json").read_text())
    assert metrics["semantic"]["pairs"] == 60 * 59 and metrics["semantic"]["mean_positives_per_anchor"] == 59
    assert "mine: 3540 pairs over 60 of 60 anchors" in r.stdout


# --- the combined training stream ------------------------------------------------------------------

def image_tensors(shard_dir):
    tf = eval_transform(32, MEAN, STD)
    return {int(k.rsplit("-", 1)[1]): tf(img) for k, _, img in iter_split(shard_dir, "train")}


def labels_of(shard_dir):
    m = read_manifest(shard_dir, "train")
    return dict(zip(m["index"], m["label"]))


PAIRS = [(0, 5), (5, 0), (3, 3), (7, 1), (12, 20), (20, 12), (23, 2), (9, 17)]  # incl. one image with itself


def pair_stream(shard_dir, pairs_dir, batch=8, views=3, rank=0, world=1, **kw):
    return ShardStream(shard_dir, [PLAIN] * views, MEAN, STD, local_batch=batch // world, n_samples=24, global_batch=batch,
                       seed=0, rank=rank, world_size=world, pairs_dir=pairs_dir, **kw)


@pytest.fixture
def pairs_dir(tmp_path, shard_dir):
    a, p = zip(*PAIRS)
    out = tmp_path / "pairs/semantic"
    write_pair_shards(shard_dir, out, a, p, labels_of(shard_dir), samples_per_shard=3, seed=0)
    return out


def test_epoch_holds_every_original_and_every_pair_once_in_the_right_views(shard_dir, pairs_dir):
    ds = pair_stream(shard_dir, pairs_dir)
    assert (ds.n_samples, ds.n_pairs, ds.steps) == (24, 8, 4)  # (24 originals + 8 pairs) / 8
    imgs, label = image_tensors(shard_dir), labels_of(shard_dir)
    seen = []
    for b in ds:
        b = b.to("cpu")   # views are uint8 until the batch reaches its device (augmentation happens there)
        for i in range(len(b.index)):
            a, p = int(b.index[i]), int(b.positive[i])
            assert torch.allclose(b.views[0][i], imgs[a], atol=1e-6)  # view 0: the anchor
            assert torch.allclose(b.views[1][i], imgs[p], atol=1e-6)  # view 1: its (semantic) positive
            assert torch.allclose(b.views[2][i], imgs[a], atol=1e-6)  # further views: the anchor again
            assert int(b.label[i]) == label[a]
            seen.append((a, p))
    want = [(i, i) for i in range(24)] + PAIRS
    assert sorted(seen) == sorted(want)  # each original and each pair exactly once


def test_pair_stream_resumes_and_splits_over_ranks(shard_dir, pairs_dir):
    full = list(pair_stream(shard_dir, pairs_dir))
    ds = pair_stream(shard_dir, pairs_dir)
    ds.set_epoch(0, skip_batches=2)
    rest = list(ds)
    assert len(rest) == 2
    for x, y in zip(full[2:], rest):  # per-batch seeds: the skipped batches are not needed to reproduce the rest
        assert torch.equal(x.index, y.index) and torch.equal(x.positive, y.positive) and torch.equal(x.views[1], y.views[1])
    per_rank = [list(pair_stream(shard_dir, pairs_dir, batch=8, rank=r, world=2)) for r in range(2)]
    assert [len(b) for b in per_rank] == [4, 4]  # same number of steps on every rank: DDP never hangs
    pairs_seen = {(int(a), int(p)) for bs in per_rank for b in bs for a, p in zip(b.index, b.positive) if a != p}
    assert pairs_seen and pairs_seen <= set(PAIRS)


def test_stream_without_pairs_is_unchanged(shard_dir):
    plain = ShardStream(shard_dir, [ViewSpec(size=16)] * 2, MEAN, STD, 4, 24, 4, seed=0)
    assert plain.n_pairs == 0 and plain.steps == 6
    for b in plain:
        assert torch.equal(b.index, b.positive)


def test_missing_pair_shards_name_the_directory(shard_dir, tmp_path):
    with pytest.raises(DataError, match=r"pairs/semantic: no pair shards \(run the mine stage first"):
        pair_stream(shard_dir, tmp_path / "pairs/semantic")


# --- training with pairs ---------------------------------------------------------------------------

def test_pair_run_trains_on_originals_plus_pairs_and_refuses_other_pairs(project, capsys):
    p = seppid_params()
    m = mine(p, project)
    n_pairs = m["semantic"]["pairs"]
    s = train(p, "seppid-mocov2", root=project)
    assert s["pairs"] == "semantic" and s["train_pairs"] == n_pairs and s["train_images"] == 24
    assert s["steps_per_epoch"] == (24 + n_pairs) // 8
    assert s["method"] == "mocov2" and (project / "data/models/seppid-mocov2/encoder.safetensors").exists()
    assert train(p, "seppid-random", root=project, max_steps=2) == {"stopped_at_step": 2}
    capsys.readouterr()
    train(p, "seppid-random", root=project, max_steps=3)
    assert "seppid-random: resuming from" in capsys.readouterr().out  # same pairs: resumed
    # other mine params -> other pairs: the checkpoint trained on the old pairs is not resumed
    p2 = seppid_params(**{"mine.seed": 1})
    mine(p2, project)
    train(p2, "seppid-random", root=project, max_steps=3)
    assert "is from other settings; starting from scratch" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["simclr", "simsiam", "vicreg", "dino"])
def test_any_base_method_trains_with_pairs(project, method):
    """SePP-ID on another framework (the paper's Tables 3, 10-12) is a pair run naming that method."""
    p = seppid_params(**{f"pair_runs.seppid-{method}": {"method": method, "backbone": "resnet18_w8", "pairs": "semantic"}})
    mine(p, project)
    assert train(p, f"seppid-{method}", root=project, max_steps=2) == {"stopped_at_step": 2}
    ck = torch.load(project / f"data/checkpoints/seppid-{method}/last.pt", weights_only=False)
    assert ck["progress"]["step"] == 2 and all(torch.isfinite(v).all() for v in ck["method"].values() if v.is_floating_point())


def test_pair_run_needs_the_mine_stage(project):
    with pytest.raises(DataError, match=r"data/pairs/tiny/semantic: no pair shards \(run the mine stage first"):
        train(seppid_params(), "seppid-mocov2", root=project)


# --- params ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda p: p["mine"].update(encoder_run="nope"), "mine.encoder_run: 'nope' is not a run under runs"),
    (lambda p: p["mine"].update(encoder_run="seppid-mocov2"), "mine.encoder_run: 'seppid-mocov2' is not a run under runs"),
    (lambda p: p["mine"].update(min_sim=0.99, max_sim=0.97), "mine.min_sim: expected <= mine.max_sim (0.97), got 0.99"),
    (lambda p: p["mine"].update(layer="head"), "mine.layer: expected one of ['projector', 'backbone'], got 'head'"),
    (lambda p: p["mine"].update(k_frac=0), "mine.k_frac: expected a number > 0 and <= 1, got 0"),
    (lambda p: p["mine"].update(max_sim=1.5), "mine.max_sim: expected a number >= -1 and <= 1, got 1.5"),
    (lambda p: p["mine"].update(max_per_anchor=-1), "mine.max_per_anchor: expected an integer >= 0, got -1"),
    (lambda p: p["mine"].update(thresholds=1), "mine.thresholds: unknown key"),
    (lambda p: p["mine"].pop("block"), "mine.block: missing"),
    (lambda p: p["pair_runs"]["seppid-mocov2"].update(pairs="nearest"), "pair_runs.seppid-mocov2.pairs: expected one of ['semantic', 'random']"),
    (lambda p: p["pair_runs"].update(mocov2={"method": "mocov2", "backbone": "resnet18_w16", "pairs": "semantic"}),
     "pair_runs.mocov2: the name is already a run under runs"),
    (lambda p: p["pair_runs"]["seppid-random"].update(backbone="r99"), "pair_runs.seppid-random.backbone: 'r99' is not defined under backbones"),
    (lambda p: p["pair_runs"]["seppid-random"].update(overrides={"temprature": 1}), "pair_runs.seppid-random.overrides.temprature: unknown key"),
])
def test_bad_seppid_params_name_the_key(edit, message):
    p = resolve("cpu")
    edit(p)
    with pytest.raises(ParamError) as e:
        validate(p)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_pair_runs_resolve_like_runs_and_may_be_empty():
    p = resolve("cpu")
    p["pair_runs"]["seppid-simsiam"] = {"method": "simsiam", "backbone": "resnet18_w16", "pairs": "semantic",
                                        "overrides": {"train": {"lr": 0.01}}}
    v = validate(p)
    name, block, train_cfg, bb = method_config(v, "seppid-simsiam")  # SePP-ID on SimSiam: just the run's method
    assert name == "simsiam" and train_cfg["lr"] == 0.01 and bb == v["backbones"]["resnet18_w16"]
    with pytest.raises(ParamError, match="no such run under runs or pair_runs"):
        method_config(v, "nope")
    p["pair_runs"] = {}
    p["seeds"]["runs"] = [r for r in p["seeds"]["runs"] if r in p["runs"]]   # seeds name runs that exist
    assert validate(p)["pair_runs"] == {}


# --- report ----------------------------------------------------------------------------------------

def test_report_puts_pair_runs_beside_their_base_with_pair_stats(tmp_path, monkeypatch):
    from pipeline.report import build as rb
    from tests.test_report import KNN, write_metrics

    runs = {"mocov2": {"method": "mocov2", "backbone": "r18"}, "random-r18": {"method": "random", "backbone": "r18"},
            "simclr": {"method": "simclr", "backbone": "r18"}}
    pair_runs = {"seppid-mocov2": {"method": "mocov2", "backbone": "r18", "pairs": "semantic"},
                 "seppid-random": {"method": "mocov2", "backbone": "r18", "pairs": "random"}}
    monkeypatch.setitem(KNN, "seppid-mocov2", (40.0, 41.0, 42.0))
    monkeypatch.setitem(KNN, "seppid-random", (38.0, 39.0, 40.0))
    write_metrics(tmp_path, {**runs, **pair_runs})  # the pretrain metrics of a pair run carry its `pairs`
    mine_metrics = {"encoder_run": "mocov2", "layer": "projector", "K": 2000, "pool": 20000, "min_sim": 0.97, "max_sim": 0.99,
                    "max_per_anchor": 0, "semantic": {"pairs": 321, "anchors_covered": 150, "mean_positives_per_anchor": 2.14,
                                                      "pair_accuracy": 0.6543,
                                                      "similarity_hist": {"edges": [0.97, 0.98, 0.99], "counts": [300, 21]}},
                    "random": {"pairs": 321, "anchors_covered": 321, "mean_positives_per_anchor": 1.0, "pair_accuracy": 1.0,
                               "kind": "same_image"}}
    (tmp_path / "reports/metrics/mine.json").write_text(json.dumps(mine_metrics))
    rb.build(tmp_path, runs, "cifar10", "T", pair_runs=pair_runs)
    with pytest.raises(DataError, match=r"pretrain/seppid-mocov2\.json: pairs 'semantic' does not match pair_runs\.seppid-mocov2\.pairs 'random'"):
        rb.build(tmp_path, runs, "cifar10", "T", pair_runs={**pair_runs, "seppid-mocov2": {**pair_runs["seppid-mocov2"], "pairs": "random"}})
    md = (tmp_path / "reports/report.md").read_text()
    header, *rows = [r for r in _rows(md, "kNN accuracy")]
    assert [r[0] for r in rows] == ["mocov2", "seppid-mocov2", "seppid-random", "random-r18", "simclr"]
    by = {r[0]: dict(zip(header, r)) for r in rows}
    assert by["seppid-mocov2"]["pairs (n)"] == "semantic (321)" and by["seppid-mocov2"]["pair acc."] == "65.4%"
    assert by["seppid-random"]["pair acc."].startswith("— (image with itself)") and by["mocov2"]["pairs (n)"] == "—"
    header, *gain = _rows(md, "SePP-ID: gain over the base run")
    g = {r[0]: dict(zip(header, r)) for r in gain}
    assert g["seppid-mocov2"]["base run"] == "mocov2" and g["seppid-mocov2"]["Δ kNN-200"] == "+1.50"  # 42.0 - 40.5
    header, *mined = _rows(md, "SePP-ID: mined pairs")
    assert mined[0][header.index("pairs")] == "321" and mined[0][header.index("pair accuracy")] == "65.4%"
    assert "(figures/similarity.png)" in md and (tmp_path / "reports/figures/similarity.png").read_bytes().startswith(b"\x89PNG")
    header, *refs = _rows(md, "Appendix: Papers' reference numbers")
    seppid_refs = [dict(zip(header, r)) for r in refs if r[0] == "seppid"]
    # SePP-ID's CIFAR-10 rows (its Table 7), with their setting
    assert {(r["backbone"], r["epochs"], r["top-1 (%)"]) for r in seppid_refs} >= {("resnet18", "800", "77.46")}
    assert all(r["dataset"] == "cifar10" and "Table" in r["source"] for r in seppid_refs)
    with pytest.raises(DataError, match=r"reports/metrics/mine\.json: not found \(run the mine stage first"):
        (tmp_path / "reports/metrics/mine.json").unlink()
        rb.build(tmp_path, runs, "cifar10", "T", pair_runs=pair_runs)


def _rows(md, title):
    from tests.test_report import _md_rows

    return _md_rows(md, title)


def test_hand_built_pairs_far_apart_are_found_whatever_the_blocks():
    """test_mining's hand-built set with its rows scattered: every pair straddles blocks, and the result maps back."""
    x, want = hand_built()
    perm = np.random.default_rng(5).permutation(len(x))  # new row r holds old row perm[r]
    inv = np.argsort(perm)
    want_scattered = sorted((int(inv[i]), int(inv[j])) for i, j, _ in want)
    for block in (1, 2, 5, 19):
        a, p, s = mine_pairs(x[perm], LO, HI, block=block)
        assert list(zip(a.tolist(), p.tolist())) == want_scattered
        assert np.all((s >= np.float32(LO)) & (s <= np.float32(HI)))
