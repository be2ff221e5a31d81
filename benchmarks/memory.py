"""Per-GPU peak memory of every GPU preset's training step at its true shapes (issue 23, defect 12 / deliver 2).

    python benchmarks/memory.py                    # every GPU preset -> benchmarks/results/memory-presets.json
    python benchmarks/memory.py --presets stl10    # one preset (merged into the existing table)

Method: MEASURED ON THE CPU AT REDUCED BATCH AND EXTRAPOLATED LINEARLY. The trainer's own `train_step` (method
forward with heads and losses, backward, optimizer step, EMA/queue updates) runs on synthetic final views of the
preset's sizes at two small per-GPU batches b1 < b2, each a tracked step after an untracked warm-up step (which
creates the optimizer state a running trainer holds). A `TorchDispatchMode` (`LiveBytes`) adds up the bytes of
every live tensor storage (parameters, buffers, queues, gradients, optimizer state, activations saved for the
backward, temporaries) after every op and keeps the peak. Peak memory is a + s*b (weights, state and queues do
not grow with the batch; activations and per-sample temporaries do), so the per-GPU peak is a + s*(batch per GPU),
plus the DDP gradient buckets (one more copy of the gradients) when the run spans several GPUs.
The steps are traced in fp32 (fast on any CPU; CPU autocast in bf16 is slow without bf16 units). The AMP step
holds its activations in 2-byte types: the first run of each backbone in a preset is also traced under bf16
autocast at b1, and the ratio of its activation bytes to fp32's, (amp - a) / (fp32(b1) - a), scales the
activations of every run of that backbone (`amp_peak_gib`, what the fit uses; never below 0.5). That run is also
measured at 2*b2 to check
the linear fit (`validation.relative_error`; a quadratic term such as SimCLR's (2b)^2 logits would show there).

Why not fake tensors on a fake CUDA device: CUDA autocast is disabled where CUDA is absent (so the trace would be
fp32), modules cannot be moved to a fake device in place, and the methods read small buffers on the host
(`int(queue_ptr)`), which a fake tensor cannot answer.

What it does not count (the `margin` of the fit check covers it): the CUDA context and cuDNN/cuBLAS
workspaces (~1-2 GiB), the caching allocator's fragmentation, the loader's pinned buffers, NCCL buffers.
CPU autocast casts the same conv/matmul ops as CUDA's to the low-precision dtype (fp16 presets are measured with
bf16: the same bytes per element).
"""
from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_presets import GPU_PROFILES, load_preset, step_shape, synthetic_batch, trained_runs  # noqa: E402
from pipeline.params import method_config  # noqa: E402
from pipeline.train.optim import build_optimizer  # noqa: E402
from pipeline.train.trainer import build_method, train_step  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "memory-presets.json"
GIB = 2**30
MARGIN_GIB = 4.0      # CUDA context + cuDNN/cuBLAS workspaces + allocator fragmentation, not traced
FRAGMENTATION = 1.10  # the caching allocator rounds blocks up; keep 10 % headroom over the traced peak
SMALL = {32: (4, 8), 96: (2, 4), 224: (2, 4)}   # the two measured per-GPU batches, by image size


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages, after every op; `peak` is the most at any point. Storages are tracked by a
    weak reference (a storage outlives the tensor object while autograd holds it for the backward)."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, weakref.ref] = {}
        self.now = self.peak = 0

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if t.layout == torch.sparse_coo:   # no storage of its own: its indices and values hold the bytes
            for part in (t._indices(), t._values()):
                self.track(part)
            return
        if t.layout in (torch.sparse_csr, torch.sparse_bsr):
            for part in (t.crow_indices(), t.col_indices(), t.values()):
                self.track(part)
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.refs:
            return
        n = storage.nbytes()
        self.refs[key] = weakref.ref(storage, lambda _, k=key, n=n: self._free(k, n))
        self.now += n
        self.peak = max(self.peak, self.now)

    def _free(self, key: int, n: int) -> None:
        if self.refs.pop(key, None) is not None:
            self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def amp_of(train_cfg: dict, traced: str):
    """The dtype the step is traced under: fp32 ("upper": every activation at 4 bytes, an upper bound of the AMP
    step, and fast on any CPU), or the preset's AMP as bf16 ("amp": fp16 and bf16 take the same bytes; CPU
    autocast in bf16 is slow on CPUs without bf16 units)."""
    return None if traced == "upper" or train_cfg["amp"] == "off" else torch.bfloat16


def measure_peaks(p: dict, run: str, batches: list[int], traced: str = "upper") -> list[int]:
    """Peak live bytes of one trainer step of `run` at each per-GPU batch in `batches`, on the CPU. One untracked
    step first creates what a running trainer holds (optimizer state, EMA targets, queues); each tracked step then
    counts those, the gradients, the activations and the temporaries."""
    torch.manual_seed(0)
    method, train_cfg, _ = build_method(p, run)
    opt = build_optimizer(method.param_groups(), train_cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    method.train()
    ds = p["dataset"]

    def step(n: int) -> None:
        data = synthetic_batch(method, n, ds["image_size"], "cpu", augment=False, mean=ds["mean"], std=ds["std"])
        train_step(method, method, opt, scaler, data, amp_of(train_cfg, traced), train_cfg["grad_clip"], 0.5)

    step(batches[0])
    peaks = []
    for n in batches:
        opt.zero_grad(set_to_none=True)
        live = LiveBytes()
        held = [*method.parameters(), *method.buffers(),
                *(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))]
        for t in held:
            live.track(t)
        with live:
            step(n)
        peaks.append(live.peak)
    return peaks


def param_bytes(p: dict, run: str) -> int:
    with torch.device("meta"):
        method = build_method(p, run)[0]
    return sum(t.numel() * t.element_size() for t in method.parameters() if t.requires_grad)


def estimate(p: dict, run: str, validate: bool = False) -> dict:
    shape = step_shape(p, run)
    b1, b2 = SMALL.get(shape["image_size"], SMALL[224])
    need = method_config(p, run)[1].get("rank_k", 0) + 2   # GSSSL's rank-k triplet needs more images than k
    if b1 < need:
        b1, b2 = need, 2 * need
    m1, m2, *m3 = measure_peaks(p, run, [b1, b2, 2 * b2] if validate else [b1, b2])
    slope = (m2 - m1) / (b2 - b1)
    fixed = m1 - slope * b1
    ddp = param_bytes(p, run) if shape["gpus"] > 1 else 0
    peak = fixed + slope * shape["batch_per_gpu"] + ddp
    row = {"shape": shape, "traced": "fp32 (upper bound of the AMP step where amp_over_fp32 <= 1)", "measured_bytes": {str(b1): m1, str(b2): m2}, "fixed_bytes": int(fixed),
           "bytes_per_image": int(slope), "ddp_bucket_bytes": ddp, "peak_gib": peak / GIB}
    if validate:
        b3, m3 = 2 * b2, m3[0]
        amp = measure_peaks(p, run, [b1], traced="amp")[0]
        row["validation"] = {"batch": b3, "measured_bytes": m3, "predicted_bytes": int(fixed + slope * b3),
                             "relative_error": (fixed + slope * b3 - m3) / m3,
                             # the AMP step (bf16 autocast) against the fp32 trace at the same small batch
                             "amp_batch": b1, "amp_bytes": amp, "amp_over_fp32": amp / m1}
    return row


def measured_key(p: dict, run: str, shape: dict) -> str:
    """What the measured fixed bytes and bytes per image depend on: not the batch or the GPUs it is split over."""
    name, block, train, _ = method_config(p, run)
    what = {k: v for k, v in shape.items() if k not in ("batch_size", "gpus", "batch_per_gpu")}
    return json.dumps({**what, "block": block, "optimizer": train["optimizer"], "traced": "fp32"}, sort_keys=True, default=str)


def rescale(old: dict, shape: dict, p: dict, run: str) -> dict:
    """A measured row at another batch per GPU / GPU count (the measurement is the same step's)."""
    ddp = param_bytes(p, run) if shape["gpus"] > 1 else 0
    peak = old["fixed_bytes"] + old["bytes_per_image"] * shape["batch_per_gpu"] + ddp
    row = {k: v for k, v in old.items() if k not in ("shape", "peak_gib", "ddp_bucket_bytes", "fits", "gpu_memory_gib")}
    return {**row, "shape": shape, "ddp_bucket_bytes": ddp, "peak_gib": peak / GIB}


def activation_ratio(row: dict) -> float:
    """AMP activation bytes over fp32's, from the bf16 trace at the smaller batch: (amp - fixed) / (fp32 - fixed)."""
    v = row["validation"]
    fp32 = row["measured_bytes"][str(v["amp_batch"])]
    return (v["amp_bytes"] - row["fixed_bytes"]) / max(fp32 - row["fixed_bytes"], 1)


def fit_preset(p: dict, rows: dict) -> None:
    """Each run's AMP peak per GPU (the fp32 trace's activations scaled by the preset's measured AMP ratio, never
    below 0.5: bf16 halves at best) and whether it fits the preset's stated memory per GPU."""
    for run, row in rows.items():
        s = row["shape"]
        ratios = [activation_ratio(r) for r in rows.values() if "validation" in r and r["shape"]["backbone"] == s["backbone"]]
        ratio = max([0.5, *ratios])
        amp = row["fixed_bytes"] + ratio * row["bytes_per_image"] * s["batch_per_gpu"] + row["ddp_bucket_bytes"]
        row["amp_activation_ratio"] = ratio if s["amp"] != "off" else 1.0
        row["amp_peak_gib"] = (amp if s["amp"] != "off" else row["peak_gib"] * GIB) / GIB
        gib = method_config(p, run)[2].get("gpu_memory_gib")
        row["gpu_memory_gib"] = gib
        row["fits"] = None if gib is None else fits(row, gib)
        print(f"  {run}: {s['gpus']} GPU(s) x {s['batch_per_gpu']}: AMP peak {row['amp_peak_gib']:.1f} GiB "
              f"(fp32 {row['peak_gib']:.1f}) of {gib} -> fits {row['fits']}", flush=True)


def fits(row: dict, gpu_memory_gib: float) -> bool:
    return row["amp_peak_gib"] * FRAGMENTATION + MARGIN_GIB <= gpu_memory_gib


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=["imagenet1k", "imagenet100", "stl10", "gpu-resnet18"])
    ap.add_argument("--runs", nargs="*", default=None, help="only these runs (default: every run that trains)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--remeasure", action="store_true",
                    help="measure again even where the table holds a measurement of the same step (same method "
                         "settings, optimizer, backbone, views, AMP: only the batch per GPU differs)")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    table = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    table.setdefault("presets", {})
    table["method"] = ("measured on the CPU (trainer's train_step, 2 steps, autocast at the preset's dtype) at two "
                       "small per-GPU batches, live storage bytes traced per op, extrapolated linearly to the "
                       "preset's batch per GPU; + DDP gradient buckets when gpus > 1")
    table["fit_rule"] = {"fragmentation": FRAGMENTATION, "margin_gib": MARGIN_GIB,
                         "fits": "amp_peak_gib * fragmentation + margin_gib <= train.gpu_memory_gib"}
    done: dict[str, dict] = {}
    for name in a.presets:
        p = load_preset(name)
        rows = table["presets"].get(name, {})
        runs = [r for r in trained_runs(p) if a.runs is None or r in a.runs]
        backbones_seen: list = []
        for run in runs:
            shape = step_shape(p, run)
            same = measured_key(p, run, shape)
            check = shape["backbone"] not in backbones_seen   # the first run of each backbone: AMP ratio, linearity
            backbones_seen.append(shape["backbone"])
            old = next((r for r in [rows.get(run), *rows.values(), *done.values()]
                        if r and r.get("key") == same and (not check or "validation" in r)), None)
            row = rescale(old, shape, p, run) if old and not a.remeasure else estimate(p, run, validate=check)
            row["key"] = same
            done[same] = row
            rows[run] = row
            table["presets"][name] = rows
            atomic_write_json(table, a.out)   # each run as it is measured: an interrupted table keeps them
            print(f"{name} {run}: {row['shape']['gpus']} GPU(s) x batch {row['shape']['batch_per_gpu']}: "
                  f"{row['peak_gib']:.1f} GiB per GPU traced in fp32"
                  + (f"; linearity check at b={row['validation']['batch']}: {100 * row['validation']['relative_error']:+.1f} %"
                     if "validation" in row else ""), flush=True)
        table["presets"][name] = {r: rows[r] for r in trained_runs(p) if r in rows}
        fit_preset(p, table["presets"][name])
        atomic_write_json(table, a.out)


if __name__ == "__main__":
    main()
