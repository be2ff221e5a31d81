"""Shared fixtures: a tiny synthetic ImageFolder, its shards, a tiny params mapping, one `dvc repro` of the tiny
profile per session (the end-to-end tests work on copies of it) and one of a small two-run project (the experiment
and remote tests work on copies of that). Each `dvc repro` is an xdist group of its own, so under `-n 2` the two
run on different workers (the largest groups are scheduled first)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# the real CIFAR-10 JPEGs beside the checkout (profiles' dataset.root: ../shared/datasets/cifar10-jpg)
CIFAR = ROOT.parent / "shared/datasets/cifar10-jpg"
# what a project copy needs to run `dvc repro` (params.yaml and dvc.yaml are rendered in the copy)
PROJECT_FILES = ["pipeline", "stages", "profiles", ".dvc/config", ".dvcignore", ".gitignore"]


def pytest_configure(config):
    """Under pytest-xdist (the README's `-n 2`) the workers share the cores: one thread each, in the worker and in
    every process it starts, since two workers at two threads each on two cores make torch's threads spin-wait on
    each other. (Results cannot depend on it: no test compares floats more tightly than a reduction order allows.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def sh(cmd, cwd, check=True, env=None):
    r = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True, env=env)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def copy_project(dst: Path) -> Path:
    """The project's code and profiles in `dst` (no data, no reports, no bytecode), for end-to-end runs."""
    for item in PROJECT_FILES:
        src = ROOT / item
        (dst / item).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / item)
    for p in list(dst.rglob("__pycache__")):
        shutil.rmtree(p)
    return dst


def make_imagefolder(root: Path, n_per_class: int = 8, classes=("a", "b", "c"), size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c_i, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                img[..., c_i % 3] = 200  # a class colour, so features can separate classes
                Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture
def imagefolder(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "images")


@pytest.fixture
def shard_dir(tmp_path, imagefolder) -> Path:
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import imagefolder as open_folder

    out = tmp_path / "data/shards/tiny"
    write_shards(open_folder(imagefolder), out, samples_per_shard=5, seed=0, skip_corrupt=False)
    return out


def tiny_params(**over) -> dict:
    """The tiny test profile, validated, with overrides (dotted keys) applied."""
    from pipeline.params import validate
    from pipeline.profile import resolve

    raw = resolve("tiny")
    for key, val in over.items():
        node = raw
        *parents, last = key.split(".")
        for k in parents:
            node = node[k]
        node[last] = val
    return validate(raw)


def _checkout_outputs() -> dict[str, object]:
    """The checkout's reports/ files with their mtime and size, and the names of its data/ files (names only:
    a `dvc checkout` beside the tests may rewrite data files with the same content)."""
    out: dict[str, object] = {}
    for f in (ROOT / "reports").rglob("*"):
        if f.is_file():
            out[f.relative_to(ROOT).as_posix()] = (f.stat().st_mtime_ns, f.stat().st_size)
    for f in (ROOT / "data").rglob("*"):
        if f.is_file():
            out[f.relative_to(ROOT).as_posix()] = True
    return out


@pytest.fixture(scope="session", autouse=True)
def checkout_outputs_untouched():
    """Tests work in temporary directories: none may write into the checkout's reports/ or add to its data/."""
    before = _checkout_outputs()
    yield
    after = _checkout_outputs()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"tests wrote into the checkout: {changed[:10]}"


@pytest.fixture(scope="session")
def tiny_repro(tmp_path_factory) -> Path:
    """`dvc repro` of the tiny profile, once per session, in <top>/proj; <top>/imports holds each stage process's
    import log (SSLPIPE_IMPORT_LOG). The data lies beside the project as in a checkout (<top>/shared/datasets), so
    dataset.root stays the profile's relative path: the real CIFAR-10 JPEGs, or where they are absent a synthetic
    10-class ImageFolder in their place (tests/test_pipeline_e2e.py skips then).

    tests/test_pipeline_e2e.py works on its own copy (`copy_repro`)."""
    top = tmp_path_factory.mktemp("tiny-repro")
    dst = copy_project(top / "proj")
    (top / "shared").mkdir()
    if CIFAR.is_dir():
        (top / "shared" / "datasets").symlink_to(CIFAR.parent)
    else:
        make_imagefolder(top / "shared/datasets" / CIFAR.name, n_per_class=26, classes=[f"c{i}" for i in range(10)])
    sh("git init -q && git config user.email t@t && git config user.name t && python -m pipeline.profile tiny", dst)
    (top / "imports").mkdir()
    sh("dvc repro", dst, env={**os.environ, "SSLPIPE_IMPORT_LOG": str(top / "imports")})
    return dst


SMALL_PROFILE = """\
extends: tiny
keep_runs: [simclr, random-resnet18_w8]   # the whole DAG (shard, mine, pretrain, features, evaluate, report), small
dataset: {{root: {root}}}
shard: {{max_images: 60, samples_per_shard: 30}}
train: {{batch_size: 32}}
mine: {{encoder_run: random-resnet18_w8, layer: backbone}}
seeds: {{runs: []}}
"""


@pytest.fixture(scope="session")
def small_repro(tmp_path_factory) -> Path:
    """`dvc repro` of a small project (profile `small`: two runs on a synthetic ImageFolder, every stage of the
    DAG), once per session, in <top>/proj; the images lie in <top>/images (an absolute dataset.root, so clones
    anywhere read them). Shared by tests/test_experiments.py and tests/test_remote.py, which each work on their own
    copy (`copy_repro`), so neither sees the other's commits, experiments or remotes, in any order."""
    top = tmp_path_factory.mktemp("small-repro")
    images = make_imagefolder(top / "images", n_per_class=20)
    dst = copy_project(top / "proj")
    (dst / "profiles/small.yaml").write_text(SMALL_PROFILE.format(root=images))
    sh("git init -q && git config user.email t@t && git config user.name t && python -m pipeline.profile small"
       " && dvc repro -q", dst)
    return dst


def copy_repro(src: Path, top: Path) -> Path:
    """A copy of the reproduced project `src` (tiny_repro, small_repro) and what lies beside it (its import logs, the
    data link, the images) in the directory `top`: its workspace, git repository and DVC cache. Returns the copy's
    project directory."""
    shutil.copytree(src.parent, top, symlinks=True, dirs_exist_ok=True)
    return top / src.name
