"""Feature extraction at scale: the eval view's resize + centre crop, DataLoader workers, torchrun ranks
(gloo, 2 processes) and the memory-mapped cache all give exactly the single-process features."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from torch import nn

from pipeline.data.eval_view import ResizeCentreCrop, eval_transform, resize_size
from pipeline.data.shards import image_of, group_samples, read_manifest, shard_paths
from pipeline.eval.feature_cache import feature_paths, load_features, save_features
from pipeline.eval.features import extract_features, extract_features_to, share, wanted_positions
from pipeline.params import DataError

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


class ConvNet(nn.Module):
    """A fixed, BN-free conv encoder (8-d features): real conv numerics, same weights in every process."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(8, generator=g))

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))


def split_images(shard_dir, split):
    """(key, PIL image) of a split in shard order, read directly from the tars."""
    return [(s["__key__"], image_of(s)) for path in shard_paths(shard_dir, split) for s in group_samples(path)]


# --- the eval view ----------------------------------------------------------------------------------------

def test_resize_size_is_the_standard_ratio():
    assert resize_size(224, 0.875) == 256 and resize_size(32, 0.875) == 37 and resize_size(96, 1.0) == 96
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="crop_ratio"):
            resize_size(224, bad)


def test_resize_centre_crop_box_on_300x200():
    """300 x 200 (w x h) at 224: shorter side 200 -> 256 so 300 -> 384; centre crop at top 16, left 80."""
    w, h = 300, 200
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    px = np.stack([xs * 255 / (w - 1), ys * 255 / (h - 1), np.zeros_like(xs)], -1).round().astype(np.uint8)
    img = Image.fromarray(px)
    out = ResizeCentreCrop(224, 0.875)(img)
    assert out.size == (224, 224)
    resized = F.resize(img, [256, 384], antialias=True)
    assert np.array_equal(np.asarray(out), np.asarray(resized)[16:16 + 224, 80:80 + 224])
    # in original pixels the crop spans x in [80, 304) * 300/384 = [62.5, 237.5) and y in [16, 240) * 200/256
    # = [12.5, 187.5); pixel centres sit half a pixel inside, and the red/green ramps encode x and y
    a = np.asarray(out).astype(float)
    x_of = lambda r: r * (w - 1) / 255  # noqa: E731
    y_of = lambda g: g * (h - 1) / 255  # noqa: E731
    assert abs(x_of(a[112, 0, 0]) - (80.5 * 300 / 384 - 0.5)) < 1.5
    assert abs(x_of(a[112, 223, 0]) - (303.5 * 300 / 384 - 0.5)) < 1.5
    assert abs(y_of(a[0, 112, 1]) - (16.5 * 200 / 256 - 0.5)) < 1.5
    assert abs(y_of(a[223, 112, 1]) - (239.5 * 200 / 256 - 0.5)) < 1.5


def test_cifar_size_images_are_unchanged_from_the_old_transform():
    """At image_size 32, a 32 x 32 image gives exactly the tensor of the old resize-to-size transform."""
    old = T.Compose([T.Resize([32, 32], antialias=True), T.ToTensor(), T.Normalize(MEAN, STD)])
    new = eval_transform(32, MEAN, STD)
    rng = np.random.default_rng(0)
    for _ in range(5):
        img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        assert torch.equal(new(img), old(img))
    # anything else goes through resize + centre crop (no more squashing the aspect ratio)
    wide = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    assert new(wide).shape == (3, 32, 32) and not torch.equal(new(wide), old(wide))


# --- which rows, which batches ----------------------------------------------------------------------------

def test_wanted_positions_and_shares():
    assert wanted_positions(10).tolist() == list(range(10))
    assert wanted_positions(10, limit=4).tolist() == [0, 1, 2, 3]
    assert wanted_positions(10, limit=6, positions=[7, 2, 5, 2, 0]).tolist() == [0, 2, 5]
    assert [list(share(7, 2, r)) for r in range(2)] == [[0, 1, 2], [3, 4, 5, 6]]
    assert [list(share(2, 3, r)) for r in range(3)] == [[], [0], [1]]


# --- extraction: workers, positions, the cache ------------------------------------------------------------

def test_features_through_workers_equal_single_process(shard_dir):
    """24 train images in 5 shards, batches of 4: 0 and 2 workers give the same features, in manifest order,
    each equal to the encoder applied to that image's eval view."""
    net = ConvNet()
    f0, l0, k0 = extract_features(net, shard_dir, "train", 24, MEAN, STD, batch_size=4, device="cpu")
    f2, l2, k2 = extract_features(net, shard_dir, "train", 24, MEAN, STD, batch_size=4, device="cpu", num_workers=2)
    manifest = read_manifest(shard_dir, "train")
    assert f0.shape == (24, 8) and f0.dtype == np.float32 and l0.dtype == np.int64
    assert k0 == manifest.key.tolist() and np.array_equal(l0, manifest.label.to_numpy())
    assert np.array_equal(f0, f2) and np.array_equal(l0, l2) and k0 == k2
    tf = eval_transform(24, MEAN, STD)
    with torch.no_grad():
        expect = net(torch.stack([tf(img) for _, img in split_images(shard_dir, "train")])).numpy()
    np.testing.assert_allclose(f0, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_positions_and_limit_pick_rows_in_shard_order(shard_dir):
    net = ConvNet()
    full, labels, keys = extract_features(net, shard_dir, "train", 32, MEAN, STD, batch_size=4, device="cpu")
    pos = [22, 1, 3, 7, 12, 13]
    for workers in (0, 3):
        f, l, k = extract_features(net, shard_dir, "train", 32, MEAN, STD, batch_size=4, device="cpu",
                                   positions=pos, limit=20, num_workers=workers)
        rows = [1, 3, 7, 12, 13]  # 22 is past the limit
        np.testing.assert_allclose(f, full[rows], rtol=1e-5, atol=1e-6)
        assert k == [keys[r] for r in rows] and np.array_equal(l, labels[rows])
    f, _, k = extract_features(net, shard_dir, "test", 32, MEAN, STD, batch_size=5, device="cpu", limit=7, num_workers=2)
    assert f.shape == (7, 8) and k == read_manifest(shard_dir, "test").key.tolist()[:7]


def test_cache_roundtrip_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 5)).astype(np.float32)
    labels = rng.integers(0, 3, size=7)
    keys = [f"train-{i:08d}" for i in range(7)]
    out = tmp_path / "features" / "run"
    save_features(out, "train", feats, labels, keys)
    f, lab, k = load_features(out, "train")
    assert isinstance(f, np.memmap) and not f.flags.writeable
    assert np.array_equal(f, feats) and f.dtype == np.float32 and lab.dtype == np.int64 and k == keys
    assert np.array_equal(lab, labels)
    f, _, _ = load_features(out, "train", mmap=False)
    assert not isinstance(f, np.memmap) and np.array_equal(f, feats)
    assert sorted(p.name for p in out.iterdir()) == ["train-keys.npy", "train-labels.npy", "train.npy"]
    with pytest.raises(DataError, match=r"test\.npy: features missing"):
        load_features(out, "test")


def test_damaged_cache_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    save_features(out, "train", np.ones((6, 4), np.float32), np.zeros(6), [f"k{i}" for i in range(6)])
    paths = feature_paths(out, "train")
    data = paths["feats"].read_bytes()
    paths["feats"].write_bytes(data[:len(data) - 20])  # truncated
    with pytest.raises(DataError, match=r"train\.npy: unreadable features cache .*rerun: dvc repro -f features") as e:
        load_features(out, "train")
    assert "\n" not in str(e.value)
    save_features(out, "train", np.ones((6, 4), np.float32), np.zeros(6), [f"k{i}" for i in range(6)])
    np.save(paths["labels"], np.zeros(5, np.int64))  # a label short
    with pytest.raises(DataError, match="inconsistent features cache"):
        load_features(out, "train")


def test_extract_to_cache_equals_in_memory(shard_dir, tmp_path):
    net = ConvNet()
    f, lab, k = extract_features(net, shard_dir, "train", 32, MEAN, STD, batch_size=5, device="cpu", limit=17)
    out = tmp_path / "features" / "net"
    assert extract_features_to(out, "train", net, shard_dir, 32, MEAN, STD, batch_size=5, device="cpu", limit=17,
                               num_workers=2) == (17, 8)
    f2, lab2, k2 = load_features(out, "train")
    assert np.array_equal(f2, f) and np.array_equal(lab2, lab) and k2 == k
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind


# --- torchrun: ranks gathered in order ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, shard_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        net = ConvNet()
        # 20 images in batches of 3: 7 batches, rank 0 gets 3 and rank 1 gets 4 (an empty step on rank 0)
        f, lab, k = extract_features(net, shard_dir, "train", 32, MEAN, STD, batch_size=3, device="cpu", limit=20,
                                     distributed=True, num_workers=rank)
        np.save(os.path.join(out, f"mem{rank}.npy"), f)
        with open(os.path.join(out, f"keys{rank}.txt"), "w") as fh:
            fh.write("\n".join(k))
        extract_features_to(os.path.join(out, "cache"), "test", net, shard_dir, 32, MEAN, STD, batch_size=4,
                            device="cpu", num_workers=1, distributed=True)
    finally:
        dist.destroy_process_group()


def test_ddp_gathered_features_equal_single_process(shard_dir, tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(shard_dir), str(tmp_path)), nprocs=2)
    net = ConvNet()
    f, _, k = extract_features(net, shard_dir, "train", 32, MEAN, STD, batch_size=3, device="cpu", limit=20)
    for rank in range(2):  # every rank holds all the features, in manifest order, bit-identical
        assert np.array_equal(np.load(tmp_path / f"mem{rank}.npy"), f)
        assert (tmp_path / f"keys{rank}.txt").read_text().split("\n") == k
    ft, lt, kt = extract_features(net, shard_dir, "test", 32, MEAN, STD, batch_size=4, device="cpu")
    f2, l2, k2 = load_features(tmp_path / "cache", "test")  # written by rank 0 alone
    assert np.array_equal(f2, ft) and np.array_equal(l2, lt) and k2 == kt
