"""Every `report.beside` pair of the CPU profile differs only by what its paper proposes: the two runs' resolved
configs (the method's defaults + block + run overrides, the merged train settings, the backbone, the run's other
fields) are compared key by key, and any difference not listed for that pair below fails."""
from __future__ import annotations

import pytest

from pipeline.methods import registry
from pipeline.params import method_config, run_spec, validate
from pipeline.profile import resolve

# (paper run, base run) -> the keys allowed to differ, each with why. "train.<key>" names a trainer setting.
ALLOWED = {
    ("leoclr", "mocov2"): {
        "variant": "LeOCLR's momentum / end-to-end switch (Table 5)",
        "symmetric": "MoCo-v2's view pairing; LeOCLR pairs the original image with both crops instead (§3, eq. 2)",
    },
    ("pnnclr", "nnclr"): {
        **dict.fromkeys(("alpha", "beta", "pseudo", "noise"), "the pseudo-nearest neighbour (§3.3, eqs. 4-5, "
                                                              "Table 4)"),
        "momentum": "the EMA target branch ('smooth weight update', eq. 6)",
        "pred_hidden": "NNCLR's predictor, which pNNCLR's EMA target replaces",
        "proj_layers": "pNNCLR's encoder head: two dense layers (§4.1)",
    },
    ("gsssl", "barlow_twins"): {
        **dict.fromkeys(("groups", "rank_k", "margin", "triplet_weight"), "multi-patch grouping and the rank-k "
                                                                          "triplet loss (§3)"),
        "bias_lr_ratio": "GSSSL's LARS bias / BN rate (§4)",
        "proj_layers": "GSSSL's projector: two linear layers (§4.1)",
        "train.lr": "the loss sums 2n Barlow Twins terms: the lr keeps the step on Barlow Twins' scale",
    },
    ("gsssl-simclr", "simclr"): {"groups": "multi-patch grouping (GSSSL Table 5)"},
    ("gsssl-mocov2", "mocov2"): {"groups": "multi-patch grouping (GSSSL Table 5)"},
    ("pwself", "dino-vit"): {
        **dict.fromkeys(("loss", "lambd"), "the patch-wise loss (§3.5, eqs. 8-10)"),
        "patch_augment": "patch-level augmentation (§3.3)",
    },
}


def resolved(p: dict, run: str) -> dict:
    """Flat view of everything that shapes a run's training: method block over the method's defaults,
    `train.*`, `backbone.*`, and the run's own fields other than its method and overrides."""
    method, block, train, backbone = method_config(p, run)
    flat = {**registry.get(method).DEFAULTS, **block}
    flat.update({f"train.{k}": v for k, v in train.items()})
    flat.update({f"backbone.{k}": v for k, v in backbone.items()})
    flat.update({f"run.{k}": v for k, v in run_spec(p, run).items() if k not in ("method", "overrides")})
    return flat


def differences(a: dict, b: dict) -> set[str]:
    missing = object()
    return {k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing)}


CPU = validate(resolve("cpu"))


@pytest.mark.parametrize("run, base", sorted(CPU["report"]["beside"].items()))
def test_beside_pair_differs_only_by_the_papers_idea(run, base):
    assert (run, base) in ALLOWED, f"report.beside {run}: {base} has no allowed-difference list in this test"
    extra = differences(resolved(CPU, run), resolved(CPU, base)) - ALLOWED[run, base].keys()
    assert not extra, f"{run} vs {base} also differ in {sorted(extra)}"


def test_allowed_lists_name_real_differences():
    """No stale entries: every allowed key does differ in its pair (else the list hides nothing and should go)."""
    for (run, base), allowed in ALLOWED.items():
        diff = differences(resolved(CPU, run), resolved(CPU, base))
        assert allowed.keys() <= diff, f"{run} vs {base}: {sorted(allowed.keys() - diff)} no longer differ"


def test_a_confound_is_caught():
    p = validate(resolve("cpu"))
    p["runs"]["pnnclr"].setdefault("overrides", {})["train"] = {"lr": 0.12}
    assert "train.lr" in differences(resolved(p, "pnnclr"), resolved(p, "nnclr")) - ALLOWED["pnnclr", "nnclr"].keys()
