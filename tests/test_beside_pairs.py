"""Every `report.beside` pair of every profile (profiles/*.yaml, rendered with inheritance by pipeline/profile.py)
differs only by what its paper proposes. The two runs' resolved configs are compared key by key: the method's
defaults + block + run overrides (inherited blocks included), the method's own `augment` keys over the shared
section, the merged train settings, the backbone, the run's other fields, and the method's effective-step facts
(`step.*`, from `Method.step_facts`: loss terms, sum or mean, loss scale, straight-through scale, keys enqueued
per image, and the gradient scale they make). Any difference not listed for that pair below fails.

A difference marked `Controlled` changes the step size rather than the idea: the paper's own loss keeps it, and
the profile must then train a control run (`report.controls`) that varies it, so the report can show whether
the verdict survives it. Adam and AdamW take the same step for any constant gradient scale (up to eps), so
under them a step-size difference needs no control.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest

from pipeline.methods import registry
from pipeline.methods.base import gradient_scale
from pipeline.params import method_config, run_spec, validate
from pipeline.profile import PROFILES, resolve


@dataclass(frozen=True)
class Controlled:
    """An allowed difference that changes the effective step: needs a control run varying it (under SGD / LARS)."""
    why: str


# (paper run, base run) -> the keys allowed to differ, each with the paper's section. "train.<key>" names a trainer
# setting, "step.<key>" an effective-step fact, "augment.<key>" the method's views.
ALLOWED = {
    ("leoclr", "mocov2"): {
        "variant": "LeOCLR's momentum / end-to-end switch (§5, Table 5)",
        "symmetric": "MoCo-v2's view pairing; LeOCLR pairs the original image with both crops instead (§3, eq. 2)",
        "step.loss_terms": "LeOCLR eq. 3: l(u, sg(v1)) + l(u, sg(v2)), two InfoNCE terms",
        "step.reduction": "LeOCLR eq. 3 sums its two terms",
        "step.gradient_scale": Controlled("eq. 3's sum takes about twice MoCo-v2's step under SGD"),
        "step.keys_per_image": "LeOCLR Algorithm 1: both crops' keys are enqueued, so the queue turns over twice as "
                               "fast (not controlled: a queue twice as long would double the negatives instead)",
    },
    ("pnnclr", "nnclr"): {
        **dict.fromkeys(("alpha", "beta", "pseudo", "noise"), "the pseudo-nearest neighbour (§3.3, eqs. 4-5, "
                                                              "Table 4)"),
        "momentum": "the EMA target branch ('smooth weight update', eq. 6)",
        "pred_hidden": "NNCLR's predictor, which pNNCLR's EMA target replaces (§4.1: two dense layers, no predictor)",
        "proj_layers": "pNNCLR's encoder head: two dense layers (§4.1)",
        "straight_through": "the control's gradient through eq. 4 (alpha I instead of the identity)",
        "step.straight_through_scale": Controlled("pNNCLR's positive is eq. 4's z'' of the online z (the gradient "
                                                  "reaches the encoder through it); NNCLR's NN is a constant"),
    },
    ("gsssl", "barlow_twins"): {
        **dict.fromkeys(("groups", "rank_k", "margin", "triplet_weight"), "multi-patch grouping and the rank-k "
                                                                          "triplet loss (§3)"),
        "bias_lr_ratio": "GSSSL §4.1: biases / BN at 0.0048 against its weights' 0.3 (Barlow Twins: 0.2)",
        "proj_layers": "GSSSL's projector: two linear layers (§4.1)",
        "proj_hidden": "GSSSL §4.1: 4096 hidden units",
        "proj_dim": "GSSSL §4.1: 512 output units",
        "step.loss_terms": "GSSSL Alg. 1: 2n Barlow Twins terms and the rank-k triplet",
        "step.reduction": "GSSSL Alg. 1 sums its terms ('total')",
        "step.gradient_scale": "GSSSL's summed terms; its lr is set against it (train.lr)",
        "train.lr": "GSSSL §4.1: 0.3 (Barlow Twins §4: 0.2); on CPU (SGD, no LARS to normalise the summed 2n "
                    "terms' step) each run's lr is chosen by the validation search on its own (profiles/cpu.yaml, "
                    "benchmarks/recipe_search.py barlow)",
        **dict.fromkeys(("train.batch_size", "train.epochs"), "GSSSL §4.1: batch 100, 30 epochs (its convergence "
                                                              "claim, Table 1), against Barlow Twins' own"),
    },
    ("gsssl-simclr", "simclr"): {
        "groups": "multi-patch grouping (GSSSL Table 5)",
        "train.epochs": "GSSSL Table 5: the patched method at 30 epochs against the base's 1000",
    },
    ("gsssl-mocov2", "mocov2"): {
        "groups": "multi-patch grouping (GSSSL Table 5)",
        "train.epochs": "GSSSL Table 5: the patched method at 30 epochs against the base's 1000",
    },
    ("pwself", "dino-vit"): {
        **dict.fromkeys(("loss", "lambd"), "the patch-wise loss (§3.5, eqs. 8-10)"),
        "patch_augment": "patch-level augmentation (§3.3)",
    },
}
# what a control run may change against its paper run: the knob and the step facts it moves
CONTROL_KNOBS = {"loss_scale", "straight_through", "step.loss_scale", "step.straight_through_scale",
                 "step.gradient_scale"}
SCALE_INVARIANT = {"adam", "adamw"}


def resolved(p: dict, run: str) -> dict:
    """Flat view of everything that shapes a run's training: method block over the method's defaults,
    the views' augmentation, `train.*`, `backbone.*`, the run's own fields other than its method and overrides,
    and the method's effective-step facts."""
    method, block, train, backbone = method_config(p, run)
    cls = registry.get(method)
    flat = {**cls.DEFAULTS, **block}
    flat.pop("augment", None)
    flat.update({f"augment.{k}": v for k, v in {**p["augment"], **block.get("augment", {})}.items()})
    flat.update({f"train.{k}": v for k, v in train.items()})
    flat.update({f"backbone.{k}": v for k, v in backbone.items()})
    flat.update({f"run.{k}": v for k, v in run_spec(p, run).items() if k not in ("method", "overrides")})
    facts = cls.step_facts(block)
    flat.update({f"step.{k}": v for k, v in facts.items()})
    flat["step.gradient_scale"] = gradient_scale(facts)
    return flat


def differences(a: dict, b: dict) -> set[str]:
    missing = object()
    return {k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing)}


NAMES = sorted(p.stem for p in PROFILES.glob("*.yaml"))
RENDERED = {name: validate(resolve(name)) for name in NAMES}
PAIRS = [(name, run, base) for name in NAMES for run, base in sorted(RENDERED[name]["report"].get("beside", {}).items())]
CONTROLS = [(name, control, paper) for name in NAMES
            for control, paper in sorted(RENDERED[name]["report"].get("controls", {}).items())]


def pair_violations(p: dict, run: str, base: str) -> list[str]:
    """What is wrong with one beside pair of params `p`: differences not allowed for it, and step-size differences
    without a control run that varies them."""
    if (run, base) not in ALLOWED:
        return [f"report.beside {run}: {base} has no allowed-difference list in tests/test_beside_pairs.py"]
    allowed = ALLOWED[run, base]
    a, b = resolved(p, run), resolved(p, base)
    diff = differences(a, b)
    out = [f"{run} vs {base} also differ in {sorted(diff - allowed.keys())}"] if diff - allowed.keys() else []
    if a["train.optimizer"] in SCALE_INVARIANT:
        return out
    controls = [c for c, paper in p["report"].get("controls", {}).items() if paper == run]
    for key in sorted(k for k in diff if isinstance(allowed.get(k), Controlled)):
        if not any(resolved(p, c).get(key) != a[key] for c in controls):
            out.append(f"{run} vs {base}: {key} {a[key]!r} vs {b.get(key)!r} ({allowed[key].why}) and no run of "
                       f"report.controls varies it")
    return out


@pytest.mark.parametrize("name, run, base", PAIRS, ids=[f"{n}:{r}" for n, r, _ in PAIRS])
def test_beside_pair_differs_only_by_the_papers_idea(name, run, base):
    assert not pair_violations(RENDERED[name], run, base), pair_violations(RENDERED[name], run, base)


@pytest.mark.parametrize("name, control, paper", CONTROLS, ids=[f"{n}:{c}" for n, c, _ in CONTROLS])
def test_a_control_differs_from_its_paper_run_only_by_its_knob(name, control, paper):
    p = RENDERED[name]
    extra = differences(resolved(p, control), resolved(p, paper)) - CONTROL_KNOBS
    assert not extra, f"{name}: control {control} differs from {paper} in {sorted(extra)}"
    seeded = p.get("seeds", {}).get("runs", [])
    assert (control in seeded) == (paper in seeded), f"{name}: {control} is not seeded like {paper}"


def test_every_pair_is_in_some_profile_and_its_allowed_keys_differ_somewhere():
    """No stale entries: each allowed key differs in its pair in at least one profile (else it hides nothing)."""
    for (run, base), allowed in ALLOWED.items():
        seen = [n for n, r, b in PAIRS if (r, b) == (run, base)]
        assert seen, f"{run}: {base} is beside in no profile"
        diff = set().union(*(differences(resolved(RENDERED[n], run), resolved(RENDERED[n], base)) for n in seen))
        for n, c, paper in CONTROLS:
            if paper == run and (n, run, base) in PAIRS:
                diff |= differences(resolved(RENDERED[n], c), resolved(RENDERED[n], base))
        assert allowed.keys() <= diff, f"{run} vs {base}: {sorted(allowed.keys() - diff)} differ in no profile"


def test_leoclr_mean_takes_mocov2s_step_and_pnnclr_st_alpha_eq4s():
    p = RENDERED["cpu"]
    assert resolved(p, "leoclr")["step.gradient_scale"] == 2 * resolved(p, "mocov2")["step.gradient_scale"]
    assert resolved(p, "leoclr-mean")["step.gradient_scale"] == resolved(p, "mocov2")["step.gradient_scale"]
    assert resolved(p, "pnnclr")["step.straight_through_scale"] == 1.0
    assert resolved(p, "pnnclr-st-alpha")["step.straight_through_scale"] == p["methods"]["pnnclr"]["alpha"]


def test_a_confound_is_caught():
    p = copy.deepcopy(RENDERED["cpu"])
    p["runs"]["pnnclr"].setdefault("overrides", {})["train"] = {"lr": 0.12}
    assert "train.lr" in differences(resolved(p, "pnnclr"), resolved(p, "nnclr")) - ALLOWED["pnnclr", "nnclr"].keys()


def test_a_step_size_difference_without_its_control_is_caught():
    p = copy.deepcopy(RENDERED["cpu"])
    p["report"]["controls"] = {}
    problems = pair_violations(p, "leoclr", "mocov2") + pair_violations(p, "pnnclr", "nnclr")
    assert any("step.gradient_scale" in s for s in problems) and any("step.straight_through_scale" in s for s in problems)


def test_an_inherited_block_difference_is_caught():
    """A preset that sets one side's views and inherits the other's from the CPU block (issue 26, item 2)."""
    p = copy.deepcopy(RENDERED["stl10"])
    p["methods"]["pnnclr"]["blur_p"] = [0.0, 0.0]
    assert any("blur_p" in s for s in pair_violations(p, "pnnclr", "nnclr"))
