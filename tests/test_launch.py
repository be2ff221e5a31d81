"""The launcher is a runtime setting (issue 23, deliver 3): dvc.yaml does not depend on it, and the pretrain,
features and mine stages re-execute themselves under it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import dag, launch
from pipeline import params as P

ROOT = Path(__file__).resolve().parent.parent


def test_rendering_with_two_launchers_gives_identical_stages():
    """Changing the launcher reruns no stage: the commands, deps and params of every stage are the same."""
    p = P.load(ROOT / "profiles" / "cpu.yaml")
    one = dag.stages({**p, "launcher": "python"})
    eight = dag.stages({**p, "launcher": "torchrun --nproc_per_node=8"})
    assert one == eight
    assert one["pretrain.simclr"]["cmd"] == "python -m stages.pretrain simclr"
    assert not any("launcher" in prm for s in one.values() for prm in s.get("params", []))


def test_launcher_from_env_beats_params(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"launcher": "torchrun --nproc_per_node=2"}))
    monkeypatch.delenv(launch.ENV, raising=False)
    assert launch.configured_launcher(params) == "torchrun --nproc_per_node=2"
    monkeypatch.setenv(launch.ENV, "srun python")
    assert launch.configured_launcher(params) == "srun python"
    monkeypatch.delenv(launch.ENV)
    assert launch.configured_launcher(tmp_path / "absent.yaml") == "python"


def test_plain_python_and_processes_already_launched_do_not_relaunch(monkeypatch):
    assert launch.is_plain("python") and launch.is_plain(sys.executable) and not launch.is_plain("torchrun --nproc_per_node=8")
    assert launch.launch_command("torchrun --nproc_per_node=8", "stages.pretrain", ["simclr"]) == \
        ["torchrun", "--nproc_per_node=8", "-m", "stages.pretrain", "simclr"]
    monkeypatch.setenv(launch.ENV, "torchrun --nproc_per_node=8")
    monkeypatch.setattr(os, "execvpe", lambda *a: pytest.fail("relaunched a torchrun worker"))
    monkeypatch.setenv("LOCAL_RANK", "0")   # a torchrun worker
    launch.relaunch("stages.pretrain", ["simclr"])


@pytest.mark.parametrize("stage,args", [("pretrain", ["simclr"]), ("features", ["simclr"]), ("mine", [])])
def test_stage_reexecutes_under_the_launcher(tmp_path, stage, args):
    """The stage process is replaced by `<launcher> -m stages.<stage> <args>` before it reads anything."""
    record = tmp_path / "argv.txt"
    fake = tmp_path / "fake-launcher"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {record}\necho \"$SSLPIPE_LAUNCHED\" >> {record}\n")
    fake.chmod(0o755)
    env = {**os.environ, launch.ENV: f"{fake} --nproc_per_node=4", "PYTHONPATH": str(ROOT)}
    env.pop("LOCAL_RANK", None)
    env.pop(launch.MARK, None)
    r = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert record.read_text().split("\n")[:2] == [" ".join(["--nproc_per_node=4", "-m", f"stages.{stage}", *args]), "1"]
