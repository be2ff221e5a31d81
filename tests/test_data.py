"""Shard stage and training stream: determinism, bad input, rank/worker splitting, resume."""
from __future__ import annotations

import hashlib
import os
import signal

import pytest
import torch

from pipeline.data.loader import ShardStream, make_loader
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


@pytest.mark.parametrize("skip", [False, True])
def test_parallel_writer_gives_the_single_process_bytes(tmp_path, imagefolder, skip):
    if skip:
        bad = imagefolder / "train" / "a" / "0005.jpg"
        bad.write_bytes(bad.read_bytes()[:100])   # a skipped image shifts every later position
    one, many = tmp_path / "one", tmp_path / "many"
    a = write_shards(open_folder(imagefolder), one, 5, seed=3, skip_corrupt=skip, workers=1)
    b = write_shards(open_folder(imagefolder), many, 5, seed=3, skip_corrupt=skip, workers=3)
    assert digest(one) == digest(many) and a == b
    assert a["skipped_corrupt"] == int(skip)


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
                       seed=0, rank=rank, world_size=world, **kw)


def keys_of(ds):
    return [b.index.tolist() for b in ds]


def test_every_rank_gets_the_same_number_of_batches_and_an_epoch_visits_every_image_once(shard_dir):
    # 24 images, 5 per shard -> 5 shards of unequal size; global batch 8 over 2 ranks -> 3 steps each
    per_rank = [keys_of(stream(shard_dir, rank=r, world=2, batch=8)) for r in range(2)]
    assert [len(b) for b in per_rank] == [3, 3]
    assert all(len(x) == 4 for b in per_rank for x in b)
    seen = [i for b in per_rank for x in b for i in x]
    assert sorted(seen) == list(range(24))           # a true epoch: every image once, over both ranks


def test_batches_hold_uint8_views_and_geometry_and_to_finishes_them(shard_dir):
    b = next(iter(stream(shard_dir, views=3)))
    assert len(b.views) == 3 and b.views[0].shape == (4, 3, 16, 16) and b.views[0].dtype == torch.uint8
    assert b.geometry[0].shape == (4, 5) and not torch.equal(b.views[0], b.views[1])
    assert (b.epoch, b.step_in_epoch) == (0, 0)
    ready = b.to("cpu")
    assert ready.views[0].dtype == torch.float32 and ready.augment is None
    assert torch.equal(ready.to("cpu").views[0], ready.views[0])       # applied once, not again
    assert torch.equal(ready.views[0], b.to("cpu").views[0])           # seeded by the batch itself


def test_start_at_runs_across_epochs_and_resumes_exactly(shard_dir):
    full = stream(shard_dir)
    full.start_at(0, 0, 3)
    batches = list(full)
    assert len(full) == 18 and [(b.epoch, b.step_in_epoch) for b in batches[5:8]] == [(0, 5), (1, 0), (1, 1)]
    for e in range(3):   # every epoch a new permutation of all 24 images
        assert sorted(i for b in batches[6 * e:6 * e + 6] for i in b.index.tolist()) == list(range(24))
    assert keys_of(batches[:6]) != keys_of(batches[6:12])
    ds = stream(shard_dir)
    ds.start_at(1, 2, 3)
    rest = list(ds)
    assert len(rest) == len(ds) == 10
    for a, b in zip(batches[8:], rest):
        assert (a.epoch, a.step_in_epoch) == (b.epoch, b.step_in_epoch) and a.seed == b.seed
        assert torch.equal(a.index, b.index) and torch.equal(a.views[0], b.views[0])
        assert torch.equal(a.to("cpu").views[1], b.to("cpu").views[1])


@pytest.mark.parametrize("workers", [2, 3])
def test_batches_do_not_depend_on_the_number_of_workers(shard_dir, workers):
    def run(n):
        ds = stream(shard_dir, rank=1, world=2, batch=8)
        ds.start_at(0, 1, 2)
        return list(make_loader(ds, n, pin_memory=False))
    ref, got = run(0), run(workers)
    assert [(b.epoch, b.step_in_epoch) for b in got] == [(b.epoch, b.step_in_epoch) for b in ref]
    for a, b in zip(ref, got):
        assert torch.equal(a.index, b.index) and a.seed == b.seed
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
        assert all(torch.equal(x, y) for x, y in zip(a.geometry, b.geometry))


def test_subset_limits_images(shard_dir):
    sub = ShardStream(shard_dir, [ViewSpec(size=16)], MEAN, STD, 4, 24, 4, seed=0, subset=10)
    seen = [i for b in sub for i in b.index.tolist()]
    train = read_manifest(shard_dir, "train")
    assert sub.steps == 2 and len(set(seen)) == 8 and set(seen) <= set(train["index"][:10])


def test_truncated_shard_is_named_in_one_line(shard_dir):
    shard = shard_dir / "train" / "shard-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"shard-000002\.tar: corrupt shard") as err:
        stream(shard_dir)
    assert "\n" not in str(err.value)


def test_corrupt_image_inside_a_shard_ends_the_loader_in_one_line(shard_dir):
    ds = stream(shard_dir)
    row = int(ds.samples_of(0, 1)[0])            # the first image of batch 1 (a worker's batch)
    m = int(ds.index.first[row])
    member = next(k for k in range(m, m + int(ds.index.count[row])) if ds.index.names[ds.index.name[k]] == "jpg")
    path = ds.index.paths[int(ds.index.shard[member])]
    with open(path, "r+b") as f:                 # same size, garbage bytes: the tar is intact, the JPEG is not
        f.seek(int(ds.index.offset[member]))
        f.write(b"\0" * int(ds.index.size[member]))
    with pytest.raises(DataError, match=r"shard-\d+\.tar: sample train-\d+: unreadable image") as err:
        list(make_loader(ds, 2, pin_memory=False))
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


class DyingStream(ShardStream):
    def _make_batch(self, items, epoch, b):
        if b == 1:                               # the second worker dies on its first batch
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._make_batch(items, epoch, b)


def test_a_dead_worker_is_named_with_its_signal(shard_dir):
    ds = DyingStream(shard_dir, [ViewSpec(size=16)], MEAN, STD, 4, 24, 4, seed=0)
    with pytest.raises(DataError, match=r"loader worker 1 \(pid \d+\) was killed by signal SIGKILL") as err:
        list(make_loader(ds, 2, pin_memory=False))
    assert "\n" not in str(err.value)


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


def test_crop_boxes_follow_torchvisions_random_resized_crop():
    """Vectorised draws, same rule: area fraction and log-ratio distributions match torchvision's get_params over
    many draws; boxes always fit; an image no try fits gets torchvision's central fallback crop exactly."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    from pipeline.data.views import RATIO, crop_boxes

    n, (H, W), scale = 20000, (30, 50), (0.2, 0.9)
    got = crop_boxes([H] * n, [W] * n, scale, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    img = Image.new("RGB", (W, H))
    ref = np.array([RandomResizedCrop.get_params(img, list(scale), list(RATIO)) for _ in range(n)])
    assert ((got[:, 0] >= 0) & (got[:, 0] + got[:, 2] <= H) & (got[:, 1] >= 0) & (got[:, 1] + got[:, 3] <= W)).all()
    for stat in (lambda b: b[:, 2] * b[:, 3] / (H * W), lambda b: np.log(b[:, 3] / b[:, 2]),
                 lambda b: b[:, 0] / np.maximum(1, H - b[:, 2]), lambda b: b[:, 1] / np.maximum(1, W - b[:, 3])):
        a, r = stat(got), stat(ref)
        se = np.sqrt(a.var() / n + r.var() / n)
        assert abs(a.mean() - r.mean()) < 4 * se and abs(a.std() - r.std()) < 0.03 * r.std()
    # 4 x 200: no try fits; torchvision's fallback is the central crop at the nearest allowed ratio
    thin = crop_boxes([4, 200], [200, 4], (0.9, 1.0), generator=torch.Generator().manual_seed(1))
    want = [RandomResizedCrop.get_params(Image.new("RGB", (w, h)), [0.9, 1.0], list(RATIO)) for h, w in ((4, 200), (200, 4))]
    assert thin.tolist() == [list(b) for b in want]
