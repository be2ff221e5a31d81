"""A method is one file plus one run in profiles/cpu.yaml: every derived profile still renders.

A throwaway method is added to a copy of the project (its file, its block under `methods:` and one run in
cpu.yaml, nothing else); each profile is rendered in that copy. Derived profiles drop the inherited run where
its backbone is not theirs, and keep it where it is (tiny redefines `vit_tiny_p8`).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import yaml

from tests.conftest import copy_project

METHOD_FILE = '''
"""Throwaway method for tests/test_profiles_inherit.py: the negative cosine of two views' projections."""
from pipeline.losses.predictive import negative_cosine
from pipeline.methods.base import ProjectorMethod, projector_params
from pipeline.methods.registry import register


@register("throwaway")
class Throwaway(ProjectorMethod):
    PARAMS = projector_params()
    DEFAULTS = {"proj_hidden": 64, "proj_dim": 32, "proj_layers": 2}

    def forward(self, batch):
        z1, z2 = (self.project(v) for v in batch.views[:2])
        loss = negative_cosine(z1, z2.detach())
        return {"loss": loss}
'''

RENDER_ALL = textwrap.dedent('''
    import sys
    from pipeline.profile import PROFILES, main
    for name in sorted(p.stem for p in PROFILES.glob("*.yaml")):
        main([name, "--out", f"rendered-{name}.yaml", "--dvc-yaml", f"rendered-{name}.dvc.yaml"])
''')


def _add_method(root, backbone_of_run: dict):
    (root / "pipeline/methods/throwaway.py").write_text(METHOD_FILE)
    cpu = (root / "profiles/cpu.yaml").read_text()
    runs = "".join(f"  {run}: {{method: throwaway, backbone: {bb}}}\n" for run, bb in backbone_of_run.items())
    cpu = cpu.replace("\nruns:\n", "\nruns:\n" + runs, 1).replace("\nmethods:\n", "\nmethods:\n  throwaway: {proj_dim: 16}\n", 1)
    (root / "profiles/cpu.yaml").write_text(cpu)


def test_a_new_method_renders_in_every_profile(tmp_path):
    root = copy_project(tmp_path / "proj")
    _add_method(root, {"throwaway": "resnet18_w16", "throwaway-vit": "vit_tiny_p8"})
    r = subprocess.run([sys.executable, "-c", RENDER_ALL], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    runs = {p.stem.split("-", 1)[1]: yaml.safe_load(p.read_text())["runs"]
            for p in root.glob("rendered-*.yaml") if not p.name.endswith(".dvc.yaml")}
    every = {q.stem for q in (root / "profiles").glob("*.yaml")}
    assert set(runs) == every and {"cpu", "tiny", "gpu-resnet18", "stl10"} <= every
    assert runs["cpu"]["throwaway"] == {"method": "throwaway", "backbone": "resnet18_w16"}
    # tiny deletes resnet18_w16 (drops the run) and redefines vit_tiny_p8 (keeps that run, on its own ViT)
    assert "throwaway" not in runs["tiny"] and runs["tiny"]["throwaway-vit"]["backbone"] == "vit_tiny_p8"
    for name in every - {"cpu", "tiny"}:
        assert not {"throwaway", "throwaway-vit"} & set(runs[name]), name
    # the DAG of the CPU profile trains it, and its pretrain stage depends on its file
    dag = yaml.safe_load((root / "rendered-cpu.dvc.yaml").read_text())["stages"]
    assert "pipeline/methods/throwaway.py" in dag["pretrain.throwaway"]["deps"]


def test_a_run_the_profile_names_still_fails_validation(tmp_path):
    """Only inherited runs are dropped: a derived profile's own run on a missing backbone is an error."""
    from pipeline.profile import _inherit_runs

    merged = {"backbones": {"r50": {}}, "methods": {"simclr": {}},
              "runs": {"a": {"method": "simclr", "backbone": "r18"}, "b": {"method": "simclr", "backbone": "r18"},
                       "c": {"method": "simclr", "backbone": "r50"}},
              "report": {"beside": {"a": "c", "c": "b"}}, "seeds": {"runs": ["a", "c"]}}
    out = _inherit_runs(merged, {"runs": {"b": {"backbone": "r18"}}})
    assert list(out["runs"]) == ["b", "c"]        # a dropped (inherited, no backbone); b named, kept
    assert out["report"]["beside"] == {"c": "b"} and out["seeds"]["runs"] == ["c"]
