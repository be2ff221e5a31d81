"""Unlabelled pretraining data (STL-10's unlabeled split, image folders) and webdataset shards as a source.

STL-10 is a tiny file of its real layout (stl10_binary/*_X.bin: N x 3 x 96 x 96 uint8, column-major); remote shards
are served by Python's http.server on 127.0.0.1 in a thread (stopped when the test ends).
"""
from __future__ import annotations

import contextlib
import http.server
import shutil
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data.shards import pretrain_split, read_manifest, read_meta, write_shards
from pipeline.data.sources import UNLABELLED, open_source
from pipeline.errors import DataError, ParamError
from tests.conftest import make_imagefolder


def make_stl10(root: Path, n=(6, 4, 10), seed=0) -> Path:
    """train / test / unlabeled splits of STL-10's binary layout with n images each (labels 1..10 on disk)."""
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, k in zip(("train", "test", "unlabeled"), n):
        rng.integers(0, 256, (k, 3, 96, 96), dtype=np.uint8).tofile(d / f"{split}_X.bin")
        if split != "unlabeled":
            (np.arange(k) % 10 + 1).astype(np.uint8).tofile(d / f"{split}_y.bin")
    (d / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    return root


def test_stl10_reader_gives_torchvision_pixels(tmp_path):
    """The local reader decodes exactly as torchvision's STL10 (whose download checks md5s a fixture cannot pass)."""
    import torchvision.datasets as tvd
    from PIL import Image

    from pipeline.data.sources import stl10_local

    root = make_stl10(tmp_path / "stl")
    tv = tvd.STL10.__new__(tvd.STL10)
    tv.root, tv.base_folder = str(root), "stl10_binary"
    images, labels = tv._STL10__loadfile("train_X.bin", "train_y.bin")
    src = stl10_local(root, ("train",))
    for i, rec in enumerate(src.splits["train"]):
        import io
        got = np.asarray(Image.open(io.BytesIO(rec.load())))
        assert np.array_equal(got, np.transpose(images[i], (1, 2, 0))) and rec.label == labels[i]
    assert src.classes[:2] == ["c0", "c1"]


def test_stl10_profile_pretrains_on_train_plus_unlabeled(tmp_path):
    """`python -m pipeline.profile stl10` -> a shard stage with the unlabelled split and pretrain stages that read it."""
    import subprocess
    import sys

    from pipeline.train.trainer import build_stream  # noqa: F401  (what a pretrain stage builds its stream with)

    out = tmp_path / "params.yaml"
    r = subprocess.run([sys.executable, "-m", "pipeline.profile", "stl10", "--out", str(out), "--dvc-yaml",
                        str(tmp_path / "dvc.yaml")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    p = yaml.safe_load(out.read_text())
    assert p["dataset"]["pretrain"] == {"splits": ["train", "unlabeled"]}
    dag = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert "dataset.pretrain" in dag["shard"]["params"]
    assert "data/shards/stl10" in dag["pretrain.pnnclr"]["deps"]
    dataset = {**p["dataset"], "root": str(make_stl10(tmp_path / "stl"))}
    shards = tmp_path / "data/shards/stl10"
    write_shards(open_source(dataset), shards, samples_per_shard=4, seed=0, skip_corrupt=False)
    meta = read_meta(shards)
    assert meta["counts"] == {"train": 6, "test": 4, "pretrain": 16}
    pre = read_manifest(shards, "pretrain")
    assert (pre.label == UNLABELLED).all() and sorted(pre["index"]) == list(range(16))
    assert sorted(read_manifest(shards, "train").label) == sorted(np.arange(6) % 10)   # evaluation keeps its labels
    assert pretrain_split(meta) == "pretrain"


def test_stream_reads_the_pretrain_split(tmp_path):
    from pipeline.data.loader import ShardStream
    from pipeline.data.views import ViewSpec

    img = make_imagefolder(tmp_path / "img", n_per_class=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted((img / "train").rglob("*.jpg"))):
        shutil.copy(f, flat / f"u{i:03d}.jpg")
    dataset = {"source": "imagefolder", "root": str(img), "pretrain": {"root": str(flat)}}
    write_shards(open_source(dataset), tmp_path / "sh", samples_per_shard=4, seed=0, skip_corrupt=False)
    meta = read_meta(tmp_path / "sh")
    assert meta["counts"]["pretrain"] == 6 and pretrain_split(meta) == "pretrain"
    views = [ViewSpec(size=32)] * 2
    s = ShardStream(tmp_path / "sh", views, [0.5] * 3, [0.25] * 3, 2, 6, 2, seed=0, split="pretrain")
    assert s.n_samples == 6 and all(k.startswith("pretrain-") for k in s.index.keys)


def test_image_folder_tree_and_errors(tmp_path):
    img = make_imagefolder(tmp_path / "img", n_per_class=2)
    tree = make_imagefolder(tmp_path / "tree", n_per_class=1, classes=("x", "y"))   # labels ignored: 4 images
    src = open_source({"source": "imagefolder", "root": str(img), "pretrain": {"root": str(tree), "splits": ["train"]}})
    assert len(src.splits["pretrain"]) == 6 + 4 and {r.label for r in src.splits["pretrain"]} == {UNLABELLED}
    (img / "unlabeled" / "deep").mkdir(parents=True)
    shutil.copy(next((img / "test").rglob("*.jpg")), img / "unlabeled" / "deep" / "a.jpg")
    src = open_source({"source": "imagefolder", "root": str(img), "pretrain": {"splits": ["unlabeled"]}})
    assert [Path(r.origin).name for r in src.splits["pretrain"]] == ["a.jpg"]
    with pytest.raises(ParamError, match=r"^dataset.pretrain.root: .*nothing is not a directory"):
        open_source({"source": "imagefolder", "root": str(img), "pretrain": {"root": str(tmp_path / "nothing")}})
    with pytest.raises(ParamError, match=r"^dataset.pretrain.splits: cifar10 has no unlabeled split"):
        from pipeline.data.sources import pretrain_records, Source
        pretrain_records({"source": "cifar10", "root": "x", "pretrain": {"splits": ["unlabeled"]}}, Source([], {}))


# --- webdataset shards over HTTP ------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    gets: list = []

    def do_GET(self):
        type(self).gets.append(self.path)
        super().do_GET()

    def log_message(self, *a):
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """An HTTP server on 127.0.0.1 (a free port) in a daemon thread; shut down on exit."""
    _Handler.gets = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_webdataset_source_over_http_equals_the_local_shards(tmp_path, shard_dir):
    """Shards served over HTTP (brace pattern), fetched once into the cache, re-sharded: the same images and labels
    as the local shards, in the same order; a second read hits the cache; a changed shard is fetched again."""
    n_train = len(list((shard_dir / "train").glob("*.tar")))
    n_test = len(list((shard_dir / "test").glob("*.tar")))
    cache = tmp_path / "cache"
    with serve(shard_dir) as base:
        dataset = {"source": "webdataset", "cache": str(cache),
                   "urls": {"train": f"{base}/train/shard-{{000000..{n_train - 1:06d}}}.tar",
                            "test": [f"{base}/test/shard-{j:06d}.tar" for j in range(n_test)]},
                   "pretrain": {"urls": [f"pipe:cat {shard_dir}/train/shard-000000.tar",
                                         f"file://{shard_dir}/test/shard-000000.tar"]}}
        write_shards(open_source(dataset), tmp_path / "wds", samples_per_shard=5, seed=0, skip_corrupt=False)
        assert len(_Handler.gets) == n_train + n_test
        open_source(dataset)                        # every remote shard already cached: no download
        assert len(_Handler.gets) == n_train + n_test
        with open(shard_dir / "test/shard-000000.tar", "ab") as f:   # the server's file changes (size, mtime)
            f.write(b"\0" * 1024)
        open_source(dataset)
        assert _Handler.gets[-1] == "/test/shard-000000.tar" and len(_Handler.gets) == n_train + n_test + 1
    local, remote = read_manifest(shard_dir), read_manifest(tmp_path / "wds")
    for split in ("train", "test"):
        a, b = local[local.split == split], remote[remote.split == split]
        # the source order is shard order; both writers then permute train the same seeded way
        assert sorted(a.label) == sorted(b.label) and len(a) == len(b)
    assert read_meta(tmp_path / "wds")["counts"]["pretrain"] == 5 + 5


def test_webdataset_errors_name_the_url(tmp_path):
    with serve(tmp_path) as base:
        with pytest.raises(DataError, match=r"/missing.tar: cannot reach the shard"):
            open_source({"source": "webdataset", "cache": str(tmp_path / "c"),
                         "urls": {"train": f"{base}/missing.tar", "test": f"{base}/missing.tar"}})
    with pytest.raises(ParamError, match=r"^dataset.urls: source webdataset needs shard urls for test"):
        open_source({"source": "webdataset", "urls": {"train": "a.tar"}})
    with pytest.raises(DataError, match=r"pipe:exit 3: exited with 3"):
        open_source({"source": "webdataset", "cache": str(tmp_path / "c"), "urls": {"train": "pipe:exit 3", "test": "x"}})
