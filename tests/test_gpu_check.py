"""The prepared GPU check (issue 23, deliver 5) runs its code paths on the CPU in dry mode (so CI runs it)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check  # noqa: E402
from gpu_presets import load_preset  # noqa: E402
from pipeline.params import method_config  # noqa: E402


def test_dry_items_run_on_cpu_and_say_which_defect_they_guard(tmp_path):
    out = tmp_path / "gpu-cpu.json"
    rc = gpu_check.main(["--dry", "--out", str(out), "--only", "knn", "fp32_features", "features"])
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["ok"] and doc["env"]["dry"]
    assert {k: v["guards"] for k, v in doc["checks"].items()} == {"knn": [8, 9], "fp32_features": [9], "features": [12]}
    assert doc["checks"]["knn"]["rows_with_cpu_identical_top20"] == 1.0
    assert doc["checks"]["features"]["loader_cores_per_gpu"] >= 1


def test_grouped_runs_are_also_checked_with_the_methods_patch_blur_on():
    """Defect 1 hid behind the 32-px presets' blur_p 0: the check turns the methods' default blur back on."""
    p = load_preset("gpu-resnet18")
    assert method_config(p, "gsssl-simclr")[1]["groups"]["blur_p"] == [0.0, 0.0]
    blurred = gpu_check.with_patch_blur(p, "gsssl-simclr")
    assert method_config(blurred, "gsssl-simclr")[1]["groups"]["blur_p"] == [1.0, 0.1]
    assert gpu_check.with_patch_blur(p, "byol") is None


def test_a_failing_item_is_recorded_and_the_check_goes_on():
    results = {}
    gpu_check.item("boom", [4], lambda: 1 / 0, results)
    gpu_check.item("fine", [6], lambda: {"x": 1}, results)
    assert results["boom"]["ok"] is False and "ZeroDivisionError" in results["boom"]["error"]
    assert results["fine"]["ok"] and results["fine"]["x"] == 1


@pytest.mark.slow
def test_the_whole_dry_run_passes(tmp_path):
    """Every item on the tiny profile's methods (every method's step, bf16 autocast; resume), as on the GPU."""
    out = tmp_path / "gpu-cpu.json"
    rc = gpu_check.main(["--dry", "--out", str(out)])
    doc = json.loads(out.read_text())
    failed = {k: v.get("error") or {r: x.get("error") for r, x in v.get("runs", {}).items() if not x["ok"]}
              for k, v in doc["checks"].items() if not v["ok"]}
    assert rc == 0 and doc["ok"], failed
    assert set(doc["checks"]) == {"method_steps", "step_vs_bare", "knn", "fp32_features", "features", "loader_cores", "resume"}


def test_a_checkpoint_is_made_to_look_saved_on_8_gpus():
    """The resume item's setup for defect 4: every CUDA RNG state list becomes 8 long; CPU checkpoints have none."""
    ck = {"rng": {"torch": 1, "cuda": ["s0"]}, "model": {"w": 2}}
    assert gpu_check._widen_cuda_rng(ck, 8) and ck["rng"]["cuda"] == ["s0"] * 8
    assert not gpu_check._widen_cuda_rng({"rng": {"cuda": []}}, 8)
