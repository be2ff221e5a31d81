"""The setup box: what this comparison could afford, read from the runs' own metrics (never hard-coded), the
random-init floors, and why the accuracies sit far below the papers'.

    facts = setup_facts(metrics, res, refs, dataset, image_size=32)   # [(label, text)], in reading order
"""
from __future__ import annotations

from collections import defaultdict

from pipeline.report.load import RunMetrics
from pipeline.report.results import Results, floors, num


def _join(items: list[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def epochs_by_run(metrics: list[RunMetrics]) -> dict[int, list[str]]:
    """{epochs: the trained runs that pretrained that many epochs}."""
    out: dict[int, list[str]] = defaultdict(list)
    for m in metrics:
        if m.trained:
            out[int(m.pretrain["epochs"])].append(m.run)
    return dict(sorted(out.items()))


def _epochs_text(by_ep: dict[int, list[str]]) -> str:
    """'16 (dino-vit and pwself); 4 (dino); 3 (every other run)': the most common count last, unnamed."""
    groups = sorted(by_ep.items(), key=lambda kv: len(kv[1]))
    if len(groups) == 1:
        return f"{groups[0][0]} (every run)"
    return "; ".join([f"{e} ({_join(runs)})" for e, runs in groups[:-1]] + [f"{groups[-1][0]} (every other run)"])


def _hardware(metrics: list[RunMetrics]) -> str:
    pres = [i.pretrain for m in metrics if m.trained for i in m.instances or [m]]
    devices = sorted({str(p.get("device", "?")) for p in pres})
    procs = sorted({int(p.get("world_size") or 1) for p in pres})
    cores = sorted({int(c) for p in pres if (c := p.get("cpu_count") or p.get("cpu_threads"))})
    n = "one process" if procs == [1] else f"{'/'.join(map(str, procs))} processes"
    text = f"{'/'.join(d.upper() if d == 'cpu' else d for d in devices)}, {n} per run"
    if cores:
        text += f", {'/'.join(map(str, cores))} cores"
    # which hardware timed each instance (train.json's timed_on): wall times compare only within one machine
    on: dict[str, int] = {}
    mixed = []
    for m in metrics:
        for i in (m.instances or [m]) if m.trained else []:
            models = i.pretrain.get("timed_on") or []
            if len(models) > 1:
                mixed.append(i.pretrain.get("run") or m.run)
            for model in models:
                on[model] = on.get(model, 0) + 1
    if len(on) == 1:
        text += f"; timed on {next(iter(on))}"
    elif on:
        text += ("; timed on " + _join([f"{k} ({v} run instances)" for k, v in sorted(on.items())])
                 + ": wall times and views/s compare only between runs timed on the same one")
    if mixed:
        text += f"; {_join(sorted(mixed))} resumed on other hardware (their wall times mix two machines)"
    return text


def setup_facts(metrics: list[RunMetrics], res: Results, refs: list[dict], dataset: str,
                image_size: int | None = None) -> list[tuple[str, str]]:
    trained = [m for m in metrics if m.trained]
    if not trained:
        return []
    insts = [i for m in trained for i in m.instances or [m]]
    out: list[tuple[str, str]] = []
    n_train = sorted({int(i.evaluate["n_train"]) for i in insts if i.evaluate.get("n_train")})
    seen = sorted({int(i.pretrain["train_images"]) for i in insts if i.pretrain.get("train_images")})
    if seen:
        of = f" of the {n_train[-1]:,} training images of {dataset}" if n_train else f" of {dataset}"
        out.append(("images", f"pretraining on {_join([f'{s:,}' for s in seen])}{of}"
                    + (f", at {image_size} x {image_size} px" if image_size else "")
                    + "; evaluated on the full splits"))
    out.append(("backbones", _join(sorted({m.backbone for m in trained}))))
    out.append(("epochs per run", _epochs_text(epochs_by_run(metrics))))
    batches = sorted({int(i.pretrain["batch_size"]) for i in insts if i.pretrain.get("batch_size")})
    if batches:
        out.append(("batch", "/".join(map(str, batches))))
    multi = [m.run for m in trained if len(m.seeds) > 1]
    single = [m.run for m in trained if len(m.seeds) == 1]
    n_seeds = max(len(m.seeds) for m in trained)
    seeds = (f"{n_seeds} training seeds for " + (_join(multi) if len(multi) <= 3 else f"{len(multi)} runs")
             if multi else "1 training seed for every run")
    if multi and single:
        seeds += f"; one seed for {_join(single)} (their intervals are over test images only)"
    out.append(("seeds", seeds))
    out.append(("hardware", _hardware(metrics)))
    pre = sum(num(i.pretrain.get("wall_time_s")) or 0.0 for i in insts)
    ev = sum(sum(v for v in (i.evaluate.get("seconds") or {}).values() if num(v) is not None)
             for m in metrics for i in m.instances or [m])
    out.append(("wall time", f"{_duration(pre + ev)} in all: pretraining {_duration(pre)} over {len(insts)} run "
                f"instances, evaluation {_duration(ev)} (feature extraction not counted)"))
    fl = []
    for bb, f in floors(metrics).items():
        cells = [f"{p} {v:.1f}" for p, key in (("kNN-200", "knn_200"), ("linear", "linear"))
                 if (v := res.mean(f, key)) is not None]
        if cells:
            fl.append(f"{bb}: {', '.join(cells)}")
    if fl:
        out.append(("random-init floors", "an untrained encoder scores " + "; ".join(fl)))
    out.append(("why far below the papers", why_low(metrics, res, refs, dataset)))
    return out


def _setting_text(setting: str) -> str:
    """'train.warmup_epochs=0.0, train.min_lr_ratio=1.0' -> 'no warm-up, then flat'; lr / weight decay / the
    residual BN init in words."""
    kv = dict(part.split("=", 1) for part in setting.replace("train.", "").replace("backbone.", "").split(", "))
    out = []
    if "zero_init_last" in kv:
        out.append("residual branches' last BN at gamma " + ("0" if kv["zero_init_last"] == "True" else "1"))
    if "warmup_epochs" in kv:
        w, m = float(kv["warmup_epochs"]), float(kv["min_lr_ratio"])
        shape = "flat" if m == 1.0 else ("cosine to 0" if m == 0.0 else f"cosine to {m:g} of the peak")
        out.append((f"{w:g}-epoch warm-up, then " if w else "no warm-up, ") + shape)
    if "lr" in kv:
        out.append(f"base lr {float(kv['lr']):g}")
    if "weight_decay" in kv:
        out.append(f"weight decay {float(kv['weight_decay']):g}")
    return ", ".join(out)


def _stage_note(spec: dict, stage: str) -> str:
    """' (one for all, scored on barlow_twins over 3 seeds)' where a stage differs from its family's one-seed rule."""
    seeds = (spec.get("seeds") or {}).get(stage, 1)
    on = (spec.get("scored_on") or {}).get(stage)
    if seeds == 1 and not on:
        return ""
    return (" (one for all" + (f", scored on {_join(on)}" if on else "") + (f" over {seeds} seeds" if seeds > 1 else "")
            + ")")


def recipe_fact(table: dict, metrics: list[RunMetrics]) -> str:
    """Which runs the recipe was searched on, what each family chose, and which runs inherit it unsearched
    (issue 26, item 7: the search covers the compared methods, or the report says it did not)."""
    parts, searched = [], set()
    for fam, spec in table["families"].items():
        runs = list(spec["runs"])
        searched.update(runs)
        chosen = (table.get("chosen") or {}).get(fam) or {}
        what = _join([s.replace("_", " ") for s in spec["stages"]]).capitalize()
        epochs = f" at {table['vit_epochs']} epochs" if fam == "vit" and table.get("vit_epochs") else ""
        if not chosen:
            parts.append(f"{what} for {_join(runs)}{epochs}: search not finished, the profile's values stand")
            continue
        picks = "; ".join(_setting_text(c["setting"]) + _stage_note(spec, label.split(" (")[0])
                          + ("" if not c["kept_current"] else " (the previous value kept)")
                          for label, c in chosen.items())
        who = (f"{_join(runs)} each on its own" if spec.get("per_run") else
               f"{_join(runs)} together")
        parts.append(f"{what} searched on {who}{epochs}: {picks}")
    others = sorted({m.run for m in metrics if m.trained and m.method != "random"} - searched)
    text = ("Searched on a validation split carved from the training images (kNN-200 of "
            f"{int(table.get('queries', 0)):,} held-out images, one seed per setting unless said): " + ". ".join(parts) + ". ")
    if others:
        text += f"Not searched: {_join(others)} train with their family's choice."
    return text


def why_low(metrics: list[RunMetrics], res: Results, refs: list[dict], dataset: str) -> str:
    """One paragraph: the papers' linear accuracy on this dataset against ours, and what the budget lacks."""
    ours = [v for m in metrics if m.trained and (v := res.mean(m, "linear")) is not None]
    theirs = [r for r in refs if str(r["dataset"]).lower().replace("-", "") == dataset.lower().replace("-", "")
              and r["protocol"] == "linear" and not r.get("pretrain_dataset") and r.get("epochs")]
    by_ep = epochs_by_run(metrics)
    text = ""
    if theirs:
        lo, hi = min(r["top1"] for r in theirs), max(r["top1"] for r in theirs)
        eps = sorted({int(r["epochs"]) for r in theirs})
        text += (f"The papers report {lo:.0f}-{hi:.0f} % in linear evaluation on {dataset} after "
                 f"{eps[0]}-{eps[-1]} epochs on full-size backbones. ")
    if ours:
        text += f"Ours reach {min(ours):.1f}-{max(ours):.1f} % "
    text += (f"after {_join([str(e) for e in by_ep])} epochs on narrow backbones and a subset of small images: "
             "most runs add a few points to the untrained encoder. The comparisons below measure whether a paper's "
             "idea helps at this early stage of training; they cannot test the papers' absolute numbers.")
    return text
