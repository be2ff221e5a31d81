"""Fault injection: the failures a long run meets, each injected at a chosen point, and what the pipeline promises.

For each fault: one line naming what failed and what to do; nothing lost (the rerun resumes, and the final
encoder equals an uninterrupted run's to the byte); no artifact that looks complete but is not. Faults are
injected deterministically through `SSLPIPE_FAULT` (`pipeline/faults.py`) in a subprocess that runs the
training library under the stage entry point (`pipeline.cli.main`, which prints the one line and sets the exit
status), each in its own project directory; the disk is filled with RLIMIT_FSIZE. The tiny profile, 24 images,
batch 8: 3 steps per epoch, 6 in all, a checkpoint every 2 steps and at each epoch end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, make_imagefolder, tiny_params

RUN = "mocov2"
ENCODER = f"data/models/{RUN}/encoder.safetensors"
CHECKPOINTS = f"data/checkpoints/{RUN}"


def params(**over) -> dict:
    return tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 1,
                          "train.checkpoint_every": 2, "train.epochs": 2, **over})


DRIVER = """
import json, sys
from pathlib import Path
from pipeline.cli import main
from tests.test_faults import params
from pipeline.train.trainer import train
main(lambda argv: train(params(**json.loads(sys.argv[2])), "mocov2", root=Path(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import imagefolder

    top = tmp_path_factory.mktemp("faults")
    out = top / "shards"
    write_shards(imagefolder(make_imagefolder(top / "images")), out, samples_per_shard=5, seed=0, skip_corrupt=False)
    return out


def project(tmp_path: Path, shards: Path, name: str = "p") -> Path:
    root = tmp_path / name
    (root / "data/shards").mkdir(parents=True)
    (root / "data/shards/tiny").symlink_to(shards)
    return root


@pytest.fixture(scope="module")
def reference_root(tmp_path_factory, shards) -> Path:
    """A project that trained the run uninterrupted."""
    from pipeline.train.trainer import train

    root = project(tmp_path_factory.mktemp("reference"), shards)
    train(params(**{"train.num_workers": 0}), RUN, root=root)
    return root


@pytest.fixture(scope="module")
def reference(reference_root) -> bytes:
    """The encoder weights of an uninterrupted run."""
    return (reference_root / ENCODER).read_bytes()


def run(root: Path, fault: str | None = None, env: dict | None = None, timeout: float = 300, **over):
    """The training run of `root` in a subprocess, with `fault` injected; (exit status, stdout, stderr)."""
    e = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    e.pop("SSLPIPE_FAULT", None)
    if fault:
        e["SSLPIPE_FAULT"] = fault
    r = subprocess.run([sys.executable, "-c", DRIVER, str(root), json.dumps(over)], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def the_error(stderr: str) -> str:
    """The one line a failed stage printed (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in re.split(r"[\r\n]", stderr) if ln.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def resume_to_the_end(root: Path, reference: bytes, capsys=None) -> str:
    """Rerun in this process (no fault): it must resume, and end on the uninterrupted run's encoder."""
    from pipeline.train.trainer import train

    summary = train(params(**{"train.num_workers": 0}), RUN, root=root)
    assert summary["steps"] == 6
    assert (root / ENCODER).read_bytes() == reference
    return capsys.readouterr().out if capsys is not None else ""


def checkpoint_step(root: Path) -> int:
    from pipeline.train.checkpoint import verify

    path = root / CHECKPOINTS / "last.pt"
    assert verify(path) is None
    return torch.load(path, weights_only=False)["progress"]["step"]


def no_complete_looking_partial(root: Path) -> None:
    """Nothing a DVC output path names exists unless the run finished; temp files are hidden, never outputs."""
    for name in ("encoder.safetensors", "encoder.json", "train.json"):
        assert not (root / f"data/models/{RUN}" / name).exists(), name


# --- a loader worker killed at any point of a step ---------------------------------------------------------------

@pytest.mark.parametrize("phase", ["forward", "backward", "optimizer", "checkpoint"])
def test_a_killed_loader_worker_ends_the_run_in_one_line_and_the_rerun_resumes(tmp_path, shards, reference, capsys,
                                                                               phase):
    # during step 3 (its forward, backward or optimizer step), or with the step-2 checkpoint's write in flight
    root = project(tmp_path, shards)
    code, _, err = run(root, f"kill-worker@{phase}:{2 if phase == 'checkpoint' else 3}")
    assert code == 1
    assert re.fullmatch(r"error: loader worker 0 \(pid \d+\) was killed by signal SIGKILL \(out of memory\? lower "
                        r"train.num_workers\); rerun the stage to resume", the_error(err))
    assert checkpoint_step(root) == (3 if phase == "checkpoint" else 2)
    no_complete_looking_partial(root)
    assert "resuming from" in resume_to_the_end(root, reference, capsys)


class _Worker:
    """A loader worker as `RunLoader` sees it: alive for its first `alive_checks` checks, then killed by SIGKILL."""

    def __init__(self, alive_checks: int):
        self.pid, self.checks, self.alive_checks = 4242, 0, alive_checks

    def is_alive(self) -> bool:
        self.checks += 1
        return self.checks <= self.alive_checks

    @property
    def exitcode(self):
        return None if self.checks <= self.alive_checks else -signal.SIGKILL

    def join(self, timeout=None):
        pass


def a_run_loader(worker: _Worker):
    from types import SimpleNamespace

    from pipeline.data.loader import RunLoader

    loader = RunLoader(None)
    loader._it = SimpleNamespace(_workers=[worker])
    return loader


def test_a_batch_whose_worker_is_still_dying_waits_for_the_death_and_names_it():
    # a killed worker's batch raises ConnectionResetError while the worker's other threads still exit (the
    # process is not yet waitable): what a loaded CI machine showed as a raw traceback
    worker = _Worker(alive_checks=5)
    error = a_run_loader(worker).death(ConnectionResetError(104, "Connection reset by peer"))
    assert str(error) == ("loader worker 0 (pid 4242) was killed by signal SIGKILL (out of memory? lower "
                          "train.num_workers); rerun the stage to resume")
    assert worker.checks == 6


def test_a_connection_error_with_every_worker_alive_is_not_called_a_death(monkeypatch):
    import pipeline.data.loader as loader

    monkeypatch.setattr(loader, "WORKER_EXIT_WAIT_S", 0.2)
    assert a_run_loader(_Worker(alive_checks=10**9)).death(ConnectionResetError(104, "reset")) is None
    assert a_run_loader(_Worker(alive_checks=10**9)).death(RuntimeError("CUDA out of memory")) is None


# --- the training process killed while writing -------------------------------------------------------------------

def test_killed_while_writing_a_checkpoint_the_rerun_resumes_from_the_previous(tmp_path, shards, reference, capsys):
    root = project(tmp_path, shards)
    code, _, _ = run(root, "kill@checkpoint-write:3")   # the step-4 checkpoint: written, not yet renamed
    assert code == -signal.SIGKILL
    assert checkpoint_step(root) == 3
    out = resume_to_the_end(root, reference, capsys)
    assert re.search(r"resuming from .*last.pt at epoch 2, step 3", out)


def test_killed_while_writing_the_encoder_no_encoder_is_left_and_the_rerun_writes_it(tmp_path, shards, reference):
    root = project(tmp_path, shards)
    code, _, _ = run(root, "kill@write:encoder.safetensors:1")   # the whole temp file written, not yet renamed
    assert code == -signal.SIGKILL
    no_complete_looking_partial(root)
    assert checkpoint_step(root) == 6
    resume_to_the_end(root, reference)


# --- a truncated or corrupt checkpoint ---------------------------------------------------------------------------

def test_a_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path, shards, reference, capsys):
    from pipeline.train.trainer import train

    root = project(tmp_path, shards)
    train(params(**{"train.num_workers": 0}), RUN, root=root, max_steps=4)
    last = root / CHECKPOINTS / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])   # what a crash on a network filesystem leaves
    capsys.readouterr()
    out = resume_to_the_end(root, reference, capsys)
    assert re.search(r"mocov2: .*last.pt is \d+ bytes, \d+ were written: truncated; resuming from the previous "
                     r"checkpoint prev.pt instead\n.*resuming from .*prev.pt at epoch 2, step 3", out)


# --- the disk full -----------------------------------------------------------------------------------------------

def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, shards, reference, capsys):
    root = project(tmp_path, shards)
    code, _, err = run(root, "full@open:.last.pt.new:2")   # the step-3 checkpoint fails; noticed at step 4's
    assert code == 1
    assert re.fullmatch(r"error: .*/last.pt: File too large \(disk full or over a file-size limit\): free space and "
                        r"rerun; finished files are intact and no partial one is left", the_error(err))
    assert checkpoint_step(root) == 2
    assert sorted(p.name for p in (root / CHECKPOINTS).iterdir()) == ["last.pt", "last.pt.sha256"]
    resume_to_the_end(root, reference, capsys)


def test_disk_full_while_writing_the_encoder(tmp_path, shards, reference):
    root = project(tmp_path, shards)
    code, _, err = run(root, "full@open:encoder.safetensors:1")
    assert code == 1
    assert re.fullmatch(r"error: .*/encoder.safetensors: File too large .*", the_error(err))
    no_complete_looking_partial(root)
    assert [p.name for p in (root / f"data/models/{RUN}").iterdir()] == ["curve.csv"]   # no temp file left
    resume_to_the_end(root, reference)


# --- pre-emption (SIGTERM) ---------------------------------------------------------------------------------------

def test_sigterm_checkpoints_at_the_step_boundary_and_exits_for_requeue(tmp_path, shards, reference, capsys):
    root = project(tmp_path, shards)
    code, _, err = run(root, "term@backward:5")   # during step 5: checkpointed after it, though none is due
    assert code == 143
    assert re.fullmatch(r"error: mocov2: stopped by SIGTERM; checkpoint written at step 5 \(.*last.pt\); exit status "
                        r"143: requeue or rerun the stage to resume", the_error(err))
    assert checkpoint_step(root) == 5
    out = resume_to_the_end(root, reference, capsys)
    assert re.search(r"resuming from .*last.pt at epoch 2, step 5", out)


def test_the_requeue_status_is_configurable(tmp_path, shards):
    root = project(tmp_path, shards)
    code, _, err = run(root, "term@forward:1", env={"SSLPIPE_REQUEUE_EXIT": "99"}, **{"train.num_workers": 0})
    assert code == 99 and "exit status 99" in the_error(err)
    assert checkpoint_step(root) == 1


# --- one of two DDP ranks killed ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(root: Path, fault_rank1: str | None, timeout: float = 240):
    """Two gloo ranks on one project directory; rank 1 alone gets the fault. [(code, stderr)] per rank, and the
    seconds the survivor took after its peer died."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "SSLPIPE_DIST_TIMEOUT_S": "60"}
        env.pop("SSLPIPE_FAULT", None)
        if rank == 1 and fault_rank1:
            env["SSLPIPE_FAULT"] = fault_rank1
        procs.append(subprocess.Popen([sys.executable, "-c", DRIVER, str(root), json.dumps({"train.num_workers": 0})],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out1 = procs[1].communicate(timeout=timeout)
    died = time.monotonic()
    out0 = procs[0].communicate(timeout=timeout)
    return [(procs[0].returncode, out0[1]), (procs[1].returncode, out1[1])], time.monotonic() - died


@pytest.mark.slow
def test_a_killed_ddp_rank_ends_the_survivor_in_bounded_time_in_one_line(tmp_path, shards):
    root = project(tmp_path, shards)
    (code0, err0), (code1, _) = run_ddp(root, "kill@backward:3")[0]
    assert code1 == -signal.SIGKILL
    assert code0 == 1
    assert re.fullmatch(r"error: mocov2: rank 0 of 2: a collective failed: another rank died or stopped answering "
                        r"\(.*\); rerun the stage \(all ranks\) to resume from the last checkpoint", the_error(err0))
    assert checkpoint_step(root) == 2
    ranks, _ = run_ddp(root, None)
    assert [code for code, _ in ranks] == [0, 0]
    assert checkpoint_step(root) == 6 and (root / ENCODER).exists()


# --- the other long stages: shard and features, run as stages in a copy of the project ---------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("images") / "images")


def stage_project(tmp_path: Path, images: Path) -> Path:
    """A copy of the project whose params.yaml is the tiny profile on the 24-image folder `images`."""
    import yaml

    from pipeline.profile import render
    from tests.conftest import copy_project

    root = copy_project(tmp_path / "proj")
    p = yaml.safe_load(render("tiny"))   # what `python -m pipeline.profile tiny` writes (the copy's profiles are ours)
    p["dataset"].update(name="tiny", source="imagefolder", root=str(images))
    p["shard"].update(samples_per_shard=5, max_images=0, workers=1)
    p["evaluate"].update(batch_size=8, num_workers=0)
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return root


def _file_size_limit(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # past the limit a write fails with EFBIG, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def stage(root: Path, *argv: str, fault: str | None = None, file_size_limit: int | None = None):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("SSLPIPE_FAULT", None)
    if fault:
        env["SSLPIPE_FAULT"] = fault
    r = subprocess.run([sys.executable, "-m", *argv], cwd=root, env=env, capture_output=True, text=True, timeout=300,
                       preexec_fn=_file_size_limit(file_size_limit) if file_size_limit else None)
    return r.returncode, r.stderr


@pytest.mark.slow
def test_disk_full_while_sharding_leaves_no_shards_and_no_temp_directory(tmp_path, images):
    root = stage_project(tmp_path, images)
    code, err = stage(root, "stages.shard", file_size_limit=4096)   # less than one shard of 5 images
    assert code == 1
    assert re.fullmatch(r"error: data/shards/tiny: File too large \(disk full or over a file-size limit\): free "
                        r"space and rerun; finished files are intact and no partial one is left", the_error(err))
    assert not (root / "data/shards").exists() or list((root / "data/shards").iterdir()) == []
    code, err = stage(root, "stages.shard")
    assert code == 0, err[-2000:]
    assert len(list((root / "data/shards/tiny/train").glob("*.tar"))) == 5


@pytest.mark.slow
def test_features_disk_full_or_killed_leave_no_features_file_and_no_temp_file(tmp_path, images, shards, reference_root):
    root = stage_project(tmp_path, images)
    (root / "data/shards").mkdir(parents=True)
    (root / "data/shards/tiny").symlink_to(shards)
    (root / ENCODER).parent.mkdir(parents=True)
    for part in ("encoder.safetensors", "encoder.json"):   # the encoder is its weights and its config
        shutil.copy(reference_root / ENCODER.rsplit("/", 1)[0] / part, root / ENCODER.rsplit("/", 1)[0] / part)
    out = root / f"data/features/{RUN}"
    code, err = stage(root, "stages.features", RUN, file_size_limit=4096)   # the features file does not fit
    assert code == 1
    assert re.fullmatch(rf"error: {out.relative_to(root)}/train.npy: File too large .*", the_error(err))
    assert list(out.iterdir()) == []   # no train.npy, no temp file

    code, _ = stage(root, "stages.features", RUN, fault="kill@write:test-keys.npy:1")   # test.npy's temp is full
    assert code == -signal.SIGKILL
    assert not (out / "test.npy").exists() and list(out.glob(".*.tmp"))   # what the killed writer left
    code, err = stage(root, "stages.features", RUN)
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}{x}.npy" for s in ("test", "train") for x in ("", "-keys", "-labels"))


# --- bad inputs, before compute ----------------------------------------------------------------------------------

def test_a_corrupt_pair_shard_is_named_with_the_mine_stage_as_remedy(tmp_path, shards):
    from pipeline.data.loader import ShardStream
    from pipeline.data.shards import read_manifest, write_pair_shards
    from pipeline.data.views import ViewSpec
    from pipeline.errors import DataError

    train = read_manifest(shards, "train")
    labels = dict(zip(train["index"].tolist(), train["label"].tolist()))
    idx = train["index"].to_numpy()
    pairs = tmp_path / "pairs/semantic"
    write_pair_shards(shards, pairs, idx[:6], idx[6:12], labels, 5, seed=0)
    bad = pairs / "shard-000000.tar"
    bad.write_bytes(bad.read_bytes()[:1500])   # cut inside the second member
    with pytest.raises(DataError, match=rf"^{bad}: corrupt shard \(.*\); rerun: dvc repro -f mine$"):
        ShardStream(shards, [ViewSpec(size=16)], [0.5] * 3, [0.2] * 3, 8, 24, 8, 0, pairs_dir=pairs)


def test_a_missing_or_empty_dataset_root_is_one_line_naming_it(tmp_path):
    from pipeline.data.sources import imagefolder
    from pipeline.errors import ParamError

    with pytest.raises(ParamError, match=rf"^dataset.root: {tmp_path}/none is not a directory$"):
        imagefolder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParamError, match=r"^dataset.root: .*empty has no train/test/ folder"):
        imagefolder(tmp_path / "empty")
    for split in ("train", "test"):
        (tmp_path / "empty" / split / "cat").mkdir(parents=True)
    with pytest.raises(ParamError, match=r"^dataset.root: .*empty/train holds no images \(.*\) in its class folders$"):
        imagefolder(tmp_path / "empty")


@pytest.mark.parametrize("name, make, why", [
    ("deep.png", lambda rng: Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)),
     r"mode I;16 \(high bit depth\) would be clipped to 8-bit RGB: convert it to 8-bit"),
    ("pixel.png", lambda rng: Image.fromarray(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)),
     r"1x1 pixels, a side under 8"),
])
def test_an_unusable_image_in_an_imagefolder_is_named_before_any_shard_is_written(tmp_path, name, make, why):
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import imagefolder
    from pipeline.errors import DataError

    root = make_imagefolder(tmp_path / "images", n_per_class=2)
    make(np.random.default_rng(0)).save(root / "train/b" / name)
    with pytest.raises(DataError, match=rf"^{root}/train/b/{name}: unusable image \({why}\); or remove it, or set "
                                        r"shard.skip_corrupt: true to skip and count it$"):
        write_shards(imagefolder(root), tmp_path / "shards", 5, 0, skip_corrupt=False)
    assert not (tmp_path / "shards").exists()
    stats = write_shards(imagefolder(root), tmp_path / "shards", 5, 0, skip_corrupt=True)
    assert stats["skipped_corrupt"] == 1 and stats["images"]["train"] == 6


def test_other_8_bit_modes_and_sizes_are_converted_and_shard(tmp_path):
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import imagefolder

    root = make_imagefolder(tmp_path / "images", n_per_class=2)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)).convert("CMYK").save(root / "train/a/cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).convert("P").save(root / "train/a/palette.png")
    Image.fromarray(rng.integers(0, 255, (300, 40, 3), dtype=np.uint8)).save(root / "train/a/tall.png")
    stats = write_shards(imagefolder(root), tmp_path / "shards", 5, 0, skip_corrupt=False)
    assert stats["skipped_corrupt"] == 0 and stats["images"]["train"] == 9
