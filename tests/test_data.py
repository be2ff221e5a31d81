"""Shard stage and training stream: determinism, bad input, rank/worker splitting, resume."""
from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline.data.loader import ShardStream
from pipeline.data.shards import iter_split, read_manifest, write_shards
from pipeline.data.sources import imagefolder as open_folder
from pipeline.data.views import View, ViewSpec
from pipeline.params import DataError

MEAN, STD = [0.5] * 3, [0.25] * 3


def digest(d):
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_params_give_byte_identical_shards(tmp_path, imagefolder):
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(open_folder(imagefolder), a, 5, seed=3, skip_corrupt=False)
    write_shards(open_folder(imagefolder), b, 5, seed=3, skip_corrupt=False)
    assert digest(a) == digest(b)
    write_shards(open_folder(imagefolder), b, 5, seed=4, skip_corrupt=False)
    assert digest(a) != digest(b)


def test_manifest_and_reader_agree(shard_dir, imagefolder):
    m = read_manifest(shard_dir)
    assert set(m.columns) >= {"key", "index", "label", "split", "shard"}
    assert (m.split == "train").sum() == 24 and (m.split == "test").sum() == 24
    train = m[m.split == "train"]
    assert sorted(train["index"]) == list(range(24))        # every image once
    assert list(train["index"]) != list(range(24))          # in seeded random order
    got = [(k, lbl) for k, lbl, _ in iter_split(shard_dir, "train")]
    assert got == list(zip(train.key, train.label))
    # labels follow the class folders: ImageFolder index i belongs to class i // 8
    assert all(lbl == idx // 8 for idx, lbl in zip(train["index"], train.label))


def test_corrupt_image_names_the_file_or_is_skipped_and_counted(tmp_path, imagefolder):
    bad = imagefolder / "train" / "b" / "0003.jpg"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEG
    with pytest.raises(DataError, match=r"0003\.jpg: unreadable image.*skip_corrupt"):
        write_shards(open_folder(imagefolder), tmp_path / "out", 5, 0, skip_corrupt=False)
    assert not (tmp_path / "out").exists()  # nothing that looks complete was left behind
    stats = write_shards(open_folder(imagefolder), tmp_path / "out", 5, 0, skip_corrupt=True)
    assert stats["skipped_corrupt"] == 1 and stats["images"]["train"] == 23
    assert "0003.jpg" in stats["skipped"][0]


def test_max_images_keeps_a_seeded_subset(tmp_path, imagefolder):
    stats = write_shards(open_folder(imagefolder), tmp_path / "out", 5, 0, False, max_images=10)
    assert stats["images"] == {"train": 10, "test": 10}
    labels = set(read_manifest(tmp_path / "out", "test").label)
    assert len(labels) > 1  # a random subset, not the first class folder


def stream(shard_dir, rank=0, world=1, batch=4, views=2, **kw):
    spec = ViewSpec(size=16)
    return ShardStream(shard_dir, [spec] * views, MEAN, STD, local_batch=batch // world, n_samples=24, global_batch=batch,
                       seed=0, rank=rank, world_size=world, shuffle_buffer=6, **kw)


def keys_of(ds):
    return [b.index.tolist() for b in ds]


def test_every_rank_gets_the_same_number_of_batches(shard_dir):
    # 24 images, 5 per shard -> 5 shards of unequal size; global batch 8 over 2 ranks -> 3 steps each
    per_rank = [keys_of(stream(shard_dir, rank=r, world=2, batch=8)) for r in range(2)]
    assert [len(b) for b in per_rank] == [3, 3]
    assert all(len(x) == 4 for b in per_rank for x in b)


def test_batches_hold_the_requested_views_and_geometry(shard_dir):
    b = next(iter(stream(shard_dir, views=3)))
    assert len(b.views) == 3 and b.views[0].shape == (4, 3, 16, 16)
    assert b.geometry[0].shape == (4, 5) and not torch.equal(b.views[0], b.views[1])


def test_resume_skips_batches_and_reproduces_the_rest(shard_dir):
    full = list(stream(shard_dir))
    ds = stream(shard_dir)
    ds.set_epoch(0, skip_batches=2)
    rest = list(ds)
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest):
        assert torch.equal(a.index, b.index) and torch.equal(a.views[0], b.views[0])


def test_epochs_differ_and_subset_limits_images(shard_dir):
    ds = stream(shard_dir)
    e0 = keys_of(ds)
    ds.set_epoch(1)
    assert keys_of(ds) != e0
    sub = ShardStream(shard_dir, [ViewSpec(size=16)], MEAN, STD, 4, 24, 4, seed=0, subset=10, shuffle_buffer=3)
    seen = {i for b in sub for i in b.index.tolist()}
    train = read_manifest(shard_dir, "train")
    assert seen <= set(train["index"][:10]) and sub.steps == 2


def test_view_reports_crop_box_and_flip():
    from PIL import Image

    img = Image.new("RGB", (40, 30))
    torch.manual_seed(0)
    x, g = View(ViewSpec(size=16, crop_scale=(0.2, 0.5), hflip=1.0), MEAN, STD)(img)
    top, left, h, w, flipped = g.tolist()
    assert x.shape == (3, 16, 16) and flipped == 1
    assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40 and 0.2 * 1200 * 0.7 <= h * w <= 0.5 * 1200 * 1.3
    _, g = View(ViewSpec(size=16, crop_scale=None, hflip=0.0), MEAN, STD)(img)
    assert g.tolist() == [0, 0, 30, 40, 0]  # no crop: the whole image
