"""The params schema: load `params.yaml`, validate every key before any compute, fail in one line.

Each section has a schema of small validators; a method's own block is validated against the
`PARAMS` schema declared in that method's file (through the method registry), so adding a method
never touches this file. Unknown keys are errors: a typo must not silently fall back to a default.
"""
from __future__ import annotations

import copy
from pathlib import Path
import yaml

from pipeline.errors import DataError, ParamError, PipelineError  # noqa: F401  (re-exported)
from pipeline.schema import (  # noqa: F401  (re-exported: method files declared their PARAMS with these)
    Bool, Float, Int, List, MapOf, Range01, Section, Str, Validator)


# --- the schema ------------------------------------------------------------------------------------

SOURCES = ("cifar10", "cifar100", "stl10", "imagefolder", "webdataset")
ARCHS = ("resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")

def _urls(v, key):
    """A shard URL, a brace pattern, or a list of them (pipeline.data.remote expands them)."""
    if isinstance(v, str) and v or isinstance(v, list) and v and all(isinstance(u, str) and u for u in v):
        return v
    raise ParamError(f"{key}: expected a shard URL, a brace pattern or a list of them, got {v!r}")


# what pretraining reads instead of the labelled train split (pipeline.data.sources.pretrain_records): the
# source's own splits (stl10: [train, unlabeled]), an image folder (tree or flat), and/or webdataset shards
PRETRAIN_DATA = Section({"splits": List(Str(("train", "unlabeled")), min_len=1), "root": Str(), "urls": _urls},
                        optional=("splits", "root", "urls"))
DATASET = Section({
    "name": Str(), "source": Str(SOURCES), "root": Str(), "image_size": Int(8),
    "mean": List(Float(0, 1), 3), "std": List(Float(0, 1, open_min=True), 3),
    "urls": Section({"train": _urls, "test": _urls}), "pretrain": PRETRAIN_DATA, "cache": Str(),
}, optional=("root", "urls", "pretrain", "cache"))
# workers: processes of the shard writer (0 = every core); a runtime knob, the bytes do not depend on it
SHARD = Section({"samples_per_shard": Int(1), "skip_corrupt": Bool(), "max_images": Int(0), "workers": Int(0)},
                optional=("max_images", "workers"))
BACKBONE = Section(
    {"arch": Str(ARCHS), "width": Int(2), "cifar_stem": Bool(), "patch_size": Int(1), "depth": Int(1),
     "zero_init_last": Bool()},
    optional=("width", "cifar_stem", "patch_size", "depth", "zero_init_last"),
)
AUGMENT_KEYS: dict[str, Validator] = {
    "crop_scale": Range01(), "hflip": Float(0, 1), "color_jitter": List(Float(0), 4), "color_jitter_p": Float(0, 1),
    "grayscale_p": Float(0, 1), "blur_p": Float(0, 1), "solarize_p": Float(0, 1),
}
AUGMENT = Section(AUGMENT_KEYS)
# keys every method block (and run override) may set, beside the method's own PARAMS (pipeline/methods/base.py):
# `loss_scale` multiplies the loss the trainer backpropagates (a step-size control); `augment` replaces keys of the
# shared augment section for this method's views (e.g. SimCLR's own crop and jitter in a MoCo-v2 preset)
METHOD_KEYS: dict[str, Validator] = {"loss_scale": Float(0, open_min=True),
                                     "augment": Section(AUGMENT_KEYS, optional=tuple(AUGMENT_KEYS))}
TRAIN_KEYS: dict[str, Validator] = {
    "epochs": Int(0), "train_subset": Int(0), "batch_size": Int(1), "num_workers": Int(0),
    "optimizer": Str(("sgd", "lars", "adam", "adamw")), "lr": Float(0), "momentum": Float(0, 1),
    "weight_decay": Float(0), "warmup_epochs": Float(0), "min_lr_ratio": Float(0, 1),
    "checkpoint_every": Int(1), "amp": Str(("bf16", "fp16", "off")), "channels_last": Bool(),
    "sync_bn": Bool(), "grad_clip": Float(0), "lr_scaling": Str(("linear", "none")),
    "weight_decay_end": Float(0), "knn_monitor": List(Int(0), 2), "knn_monitor_every": Int(1), "sync_every": Int(1),
    # global: one norm over all gradients; per_param: each parameter's own (DINO's and PW-Self's code), see optim.py
    "grad_clip_mode": Str(("global", "per_param")),
    # CUDA only: deterministic kernels (default true; false lets cuDNN benchmark): README, Scale-out
    "deterministic": Bool(),
    # the GPUs (ranks) the batch is split over (per-GPU BN batch: a real param) and the memory per GPU the
    # preset is sized for (runtime: benchmarks/memory.py checks the fit)
    "gpus": Int(1), "gpu_memory_gib": Float(0, open_min=True),
}
# train keys that change how fast a run goes, never what it computes: no stage depends on them, and a run
# may resume with other values
RUNTIME_TRAIN_KEYS = ("num_workers", "checkpoint_every", "sync_every", "gpu_memory_gib")
TRAIN = Section(TRAIN_KEYS, optional=("lr_scaling", "weight_decay_end", "knn_monitor", "knn_monitor_every", "sync_every",
                                      "grad_clip_mode", "deterministic", "gpus", "gpu_memory_gib"))
RUN = Section({"method": Str(), "backbone": Str(), "overrides": lambda v, k: v}, optional=("overrides",))
PAIR_KINDS = ("semantic", "random")
# a run trained on the original images plus a pair set of the mine stage (SePP-ID §3.2)
PAIR_RUN = Section({"method": Str(), "backbone": Str(), "pairs": Str(PAIR_KINDS), "overrides": lambda v, k: v},
                   optional=("overrides",))
# SePP-ID semantic sampler (§3.1, Algorithm 1): which encoder, which layer, which images, which bounds
MINE = Section({
    "encoder_run": Str(), "layer": Str(("projector", "backbone")), "k_frac": Float(0, 1, open_min=True),
    "min_sim": Float(-1, 1), "max_sim": Float(-1, 1), "block": Int(1), "max_per_anchor": Int(0), "seed": Int(0),
    "batch_size": Int(1), "random_control": Str(("same_image", "other_image")),
})
EVALUATE = Section({
    "batch_size": Int(1), "knn_k": List(Int(1), min_len=1), "knn_temperature": Float(0, open_min=True),
    "linear_C": List(Float(0, open_min=True), min_len=1), "linear_val_fraction": Float(0, 0.9, open_min=True),
    "linear_max_iter": Int(1), "linear_tol": Float(0, open_min=True), "semi_fractions": List(Float(0, 1, open_min=True)), "semi_seeds": List(Int(0), min_len=1),
    "semi_learner": Str(("label_spreading", "self_training")), "semi_unlabelled_max": Int(0), "train_subset": Int(0),
    # features/mine: DataLoader processes (a runtime knob: the features do not depend on it), and the eval
    # view's centre-crop ratio for large images (pipeline.data.eval_view; default 0.875: 224 from 256)
    "num_workers": Int(0), "crop_ratio": Float(0, 1, open_min=True),
}, optional=("num_workers", "crop_ratio"))
# beside: {run: base run} puts a paper's method next to the method it builds on, with the difference;
# controls: {control run: paper run} a run that differs from a `beside` paper run only by a step-size knob
# (e.g. loss_scale), compared with that paper run's base like the paper run itself
REPORT = Section({"title": Str(), "beside": MapOf(Str(), allow_empty=True), "controls": MapOf(Str(), allow_empty=True),
                  "recipe_search": Str()},
                 optional=("beside", "controls", "recipe_search"))

RUN_SECTIONS = ("runs", "pair_runs")

TOP = {
    "seed": Int(0), "launcher": Str(), "dataset": DATASET, "shard": SHARD, "backbones": MapOf(BACKBONE), "runs": MapOf(RUN),
    "augment": AUGMENT, "train": TRAIN, "methods": MapOf(lambda v, k: v), "evaluate": EVALUATE, "report": REPORT,
    "mine": MINE, "pair_runs": MapOf(PAIR_RUN, allow_empty=True),
    # the runs trained under several seeds, each seed its own instance (see `instances`). Kept apart from
    # the runs' own entries, so adding a seed adds stages and leaves the trained seeds cached.
    "seeds": Section({"values": List(Int(0), min_len=1), "runs": List(Str())}),
}


def validate(raw: dict, methods=None) -> dict:
    """Validate a whole params mapping; return a normalised copy. Raises ParamError naming the key.

    `methods`: the methods whose blocks (and runs' overrides) are checked against their `PARAMS` schema,
    which imports their files; None checks every method. A stage checks only the methods it runs, so it
    loads (and depends on) no other method's code.
    """
    if not isinstance(raw, dict):
        raise ParamError("params: expected a mapping at the top level")
    p = Section(TOP, optional=("seeds", "launcher"))(copy.deepcopy(raw), "")
    from pipeline.methods import registry

    for name in p["methods"]:
        registry.module_of(name, key=f"methods.{name}")   # an unknown method is an error for every stage
    checked = set(p["methods"]) if methods is None else set(methods)
    for name, block in p["methods"].items():
        if name in checked:
            p["methods"][name] = _method_block(name, block, f"methods.{name}")
    for section in RUN_SECTIONS:
        for run, spec in p[section].items():
            if spec["method"] not in p["methods"]:
                raise ParamError(f"{section}.{run}.method: {spec['method']!r} has no block under methods (have: {', '.join(p['methods'])})")
            if "overrides" in spec and spec["method"] in checked:
                spec["overrides"] = _method_block(spec["method"], spec["overrides"], f"{section}.{run}.overrides")
            if spec["backbone"] not in p["backbones"]:
                raise ParamError(f"{section}.{run}.backbone: {spec['backbone']!r} is not defined under backbones (have: {', '.join(p['backbones'])})")
    for run in p["pair_runs"]:
        # one stage, one encoder, one metrics file per name: a name may not mean two runs
        if run in p["runs"]:
            raise ParamError(f"pair_runs.{run}: the name is already a run under runs (run names must be unique across runs and pair_runs)")
    every_run = [*p["runs"], *p["pair_runs"]]
    for run in p.get("seeds", {}).get("runs", []):
        if run not in every_run:
            raise ParamError(f"seeds.runs: {run!r} is not a run under runs or pair_runs (have: {', '.join(every_run)})")
    seen: dict[str, str] = {}
    for name, inst in instances(p).items():
        if name in seen or (name != inst["run"] and name in every_run):
            raise ParamError(f"seeds.runs: {inst['run']}'s instance {name!r} clashes with a run of that name")
        seen[name] = inst["run"]
    for run, base in p["report"].get("beside", {}).items():
        for key, name in ((f"report.beside.{run}", run), (f"report.beside.{run}", base)):
            if name not in every_run:
                raise ParamError(f"{key}: {name!r} is not a run under runs or pair_runs (have: {', '.join(every_run)})")
    beside = p["report"].get("beside", {})
    for control, paper in p["report"].get("controls", {}).items():
        if control not in every_run:
            raise ParamError(f"report.controls.{control}: not a run under runs or pair_runs (have: {', '.join(every_run)})")
        if paper not in beside:
            raise ParamError(f"report.controls.{control}: {paper!r} is not a paper run of report.beside (have: {', '.join(beside)})")
    for run in every_run:   # each GPU gets an equal share of the batch (issue 23: GSSSL's 100 over 8 GPUs did not)
        train = method_config(p, run)[2]
        if train["batch_size"] % train.get("gpus", 1):
            raise ParamError(f"{run}: train.batch_size {train['batch_size']} does not split over train.gpus "
                             f"{train['gpus']} (set a batch divisible by the GPUs, or other GPUs)")
    m = p["mine"]
    if m["encoder_run"] not in p["runs"]:
        # a pair run cannot mine: its own training would depend on the pairs it mines (a cycle)
        raise ParamError(f"mine.encoder_run: {m['encoder_run']!r} is not a run under runs (have: {', '.join(p['runs'])})")
    if m["min_sim"] > m["max_sim"]:
        raise ParamError(f"mine.min_sim: expected <= mine.max_sim ({m['max_sim']}), got {m['min_sim']}")
    for name, bb in p["backbones"].items():
        if bb["arch"].startswith("vit") and "patch_size" not in bb:
            raise ParamError(f"backbones.{name}.patch_size: missing (required for {bb['arch']})")
    if max(p["evaluate"]["knn_k"]) < 1:
        raise ParamError("evaluate.knn_k: expected at least one k >= 1")
    return p


def _method_block(method: str, block: dict | None, key: str) -> dict:
    """A method's block (or a run's overrides of it) against that method's PARAMS; `train` overrides the trainer."""
    from pipeline.methods import registry

    cls = registry.get(method, key=key)
    block = dict(block or {})
    train_over = block.pop("train", None)
    schema = {**METHOD_KEYS, **cls.PARAMS}
    checked = Section(schema, optional=tuple(schema))(block, key)
    if train_over is not None:
        checked["train"] = Section(TRAIN_KEYS, optional=tuple(TRAIN_KEYS))(train_over, f"{key}.train")
    return checked


def load(path: str | Path = "params.yaml", methods=None) -> dict:
    """Read and validate a params file (`methods`: as for `validate`); errors name the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamError(f"{path}: not found (run from the project root, or render one: python -m pipeline.profile cpu)") from None
    except yaml.YAMLError as e:
        raise ParamError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return validate(raw, methods)
    except ParamError as e:
        raise ParamError(f"{path}: {e}") from None


def instance_name(run: str, seed: int, default_seed: int) -> str:
    """A run trained under the global `seed` keeps the run's name (and its artifacts); another seed adds `-s<seed>`."""
    return run if seed == default_seed else f"{run}-s{seed}"


def instances(p: dict) -> dict[str, dict]:
    """{instance: {"run", "section", "seed"}}: every run of `runs:` / `pair_runs:` once per training seed.

    A run listed in `seeds.runs` trains once per seed of `seeds.values`; any other run once, under the global `seed`. Each instance is its own pretrain /
    features / evaluate stages and artifacts; all of them read the run's params, so `dvc exp run -S
    runs.<run>.<key>=...` retrains every seed of the run.
    """
    out = {}
    for section in RUN_SECTIONS:
        for run, spec in p.get(section, {}).items():
            seeds = p["seeds"]["values"] if run in p.get("seeds", {}).get("runs", []) else [p["seed"]]
            for seed in seeds:
                out[instance_name(run, seed, p["seed"])] = {"run": run, "section": section, "seed": seed}
    return out


def run_spec(p: dict, run: str) -> dict:
    """A run's entry, from `runs:` or `pair_runs:` (names are unique across both); an instance name gives its run's."""
    for section in RUN_SECTIONS:
        if run in p.get(section, {}):
            return p[section][run]
    inst = instances(p).get(run)
    if inst is not None:
        return p[inst["section"]][inst["run"]]
    have = [r for section in RUN_SECTIONS for r in p.get(section, {})]
    raise ParamError(f"runs.{run}: no such run under runs or pair_runs (have: {', '.join(have)})")


def base_run(p: dict, name: str) -> str:
    """The run an instance trains (`simclr` for `simclr-s1`); a run's own name otherwise."""
    inst = instances(p).get(name)
    return inst["run"] if inst else name


def training_seed(p: dict, name: str) -> int:
    """The seed a run instance trains (and draws its evaluation splits) under; the global `seed` for a plain run."""
    insts = instances(p)
    if name not in insts:
        run_spec(p, name)   # raises for an unknown name; a known run is not trained under the global seed
        raise ParamError(f"{name}: not trained under seed {p['seed']} (its instances: "
                         f"{', '.join(n for n, i in insts.items() if i['run'] == name)})")
    return insts[name]["seed"]


def method_config(p: dict, run: str) -> tuple[str, dict, dict, dict]:
    """(method name, method block, merged train settings, backbone block) for one run.

    A run may override its method's block (`runs.<run>.overrides`), e.g. DINO on a ViT with AdamW beside
    DINO on a ResNet with SGD; overrides are validated against the method's schema like the block itself."""
    spec = run_spec(p, run)
    over = dict(spec.get("overrides", {}))
    block = {**p["methods"][spec["method"]], **over}
    # trainer settings: shared train <- the method's train <- the run's train
    train = {**p["train"], **p["methods"][spec["method"]].get("train", {}), **over.get("train", {})}
    block.pop("train", None)
    return spec["method"], block, train, p["backbones"][spec["backbone"]]


def deep_merge(base: dict, over: dict) -> dict:
    """`over` onto `base`, recursively for mappings; a None in `over` deletes the key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
