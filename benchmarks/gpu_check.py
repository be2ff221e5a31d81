"""The prepared check for the first GPU (issue 23, deliver 5): one command, within 8 minutes on one GPU.

    python benchmarks/gpu_check.py          # on a GPU -> benchmarks/results/gpu-<device name>.json
    python benchmarks/gpu_check.py --dry    # the same code paths on the CPU at tiny shapes (seconds; tests/test_gpu_check.py)

Every item says which defect of issue 23 it guards (`guards`); an item that fails records its error and the
check goes on, so one run shows everything. The exit status is 1 when any item failed.

  method_steps   every method's trainer step (`Batch.to` with its device augmentation, then `train_step`) at the GPU
                 presets' per-GPU shapes, 3 steps under bf16 and under fp16 (+GradScaler): finite loss, no dtype
                 error; runs with patch groups also with the methods' default patch blur on (defects 1, 2, 3, 5, 12)
  no_host_sync   one more bf16 step of each under torch.cuda.set_sync_debug_mode("error"): the step never waits for
                 the GPU (defect 6; fp16 is not checked: GradScaler reads its inf flag on the host by design)
  step_vs_bare   SimCLR and MoCo-v2, ResNet-50 at 224 px, batch 256: the trainer's step vs the bare backbone's passes
                 with the same AMP and channels_last (defect 11, and the cost of defect 6's syncs)
  knn            kNN-200 of 10,000 queries against a 1.28 M x 2048 bank vs the bare torch.mm over the same bank, and
                 the GPU's neighbours equal to the CPU's (defects 8, 9: fp32 without TF32)
  fp32_features  a ResNet-50's fp32 features on the GPU vs on the CPU (defect 9: cuDNN's TF32 is off for mining)
  features       feature extraction images/s (the features stage's bf16 forward at its batch) and the loader cores
                 per GPU that rate needs, from benchmarks/results/loader-cpu.json (defect 12)
  loader_cores   loader cores per GPU the training step needs at step_vs_bare's rate (defect 12)
  resume         a checkpoint saved with 8 GPUs' CUDA RNG states resumes on this machine's device count (defect 4)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from throughput import timed  # noqa: E402  (the device is synchronised around the clock)
from gpu_presets import GPU_PROFILES, load_preset, step_shape, synthetic_batch, trained_runs  # noqa: E402
from pipeline.device import claim_device, device_slug, full_fp32, synchronize  # noqa: E402
from pipeline.eval.knn import BANK_CHUNK, nearest_neighbours  # noqa: E402
from pipeline.models.backbones import build_backbone  # noqa: E402
from pipeline.params import method_config  # noqa: E402
from pipeline.train.optim import build_optimizer  # noqa: E402
from pipeline.train.trainer import build_method, train_step  # noqa: E402
from pipeline.utils import atomic_write_json  # noqa: E402

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOADER = HERE / "results" / "loader-cpu.json"

# full: the presets' own shapes; dry: the tiny profile's methods at tiny shapes, same code paths
SIZES = {
    "full": {"presets": GPU_PROFILES, "batch": None, "steps": 3, "bare_batch": 256, "bare_steps": 10,
             "bank": 1_280_000, "dim": 2048, "queries": 10_000, "exact_bank": 65536, "exact_queries": 512,
             "feat_batch": 512, "feat_steps": 10},
    "dry": {"presets": ("tiny",), "batch": 6, "steps": 1, "bare_batch": 4, "bare_steps": 1,
            "bank": 4096, "dim": 64, "queries": 256, "exact_bank": 2048, "exact_queries": 64,
            "feat_batch": 8, "feat_steps": 1},
}


def item(name: str, guards: list[int], fn, results: dict) -> None:
    """Run one check; record its result or its error (the check goes on)."""
    t = time.perf_counter()
    try:
        out = fn()
        ok = out.pop("ok", True) if isinstance(out, dict) else True
        results[name] = {"guards": guards, "ok": bool(ok), **(out if isinstance(out, dict) else {"result": out})}
    except Exception as e:  # noqa: BLE001  (the check records every failure and goes on)
        results[name] = {"guards": guards, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                         "traceback": traceback.format_exc()[-3000:]}
    results[name]["seconds"] = time.perf_counter() - t
    print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']:.1f} s)", flush=True)
    free()


def free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the methods' steps -----------------------------------------------------------------------------------

def with_patch_blur(p: dict, run: str) -> dict | None:
    """The run with its method's default patch blur on (the 32-px presets set it to 0, hiding defect 1)."""
    name, block, _, _ = method_config(p, run)
    if not block.get("groups") and name != "gsssl":
        return None
    q = copy.deepcopy(p)
    spec = q["runs"].get(run) or q["pair_runs"][run]
    for target in (q["methods"][name], spec.get("overrides") or {}):
        if isinstance(target.get("groups"), dict):
            target["groups"]["blur_p"] = [1.0, 0.1]
        if "blur_p" in target:
            target["blur_p"] = [1.0, 0.1]
    return q


def step_cases(size: dict) -> list[tuple[str, dict, str]]:
    """(label, params, run) for every distinct step of the presets (runs that differ only in epochs run once)."""
    from memory import measured_key

    cases, seen = [], set()
    for preset in size["presets"]:
        p = load_preset(preset)
        if size["batch"]:   # dry: GSSSL's rank-k must stay below the tiny batch
            for block in p["methods"].values():
                if "rank_k" in block:
                    block["rank_k"] = min(block["rank_k"], size["batch"] - 2)
        for run in trained_runs(p):
            key = (measured_key(p, run, step_shape(p, run)), step_shape(p, run)["batch_per_gpu"])
            if key in seen:
                continue
            seen.add(key)
            cases.append((f"{preset}/{run}", p, run))
            blurred = with_patch_blur(p, run)
            if blurred is not None:
                cases.append((f"{preset}/{run}+patch_blur", blurred, run))
    return cases


def run_steps(p: dict, run: str, device, amp: str, n: int | None, steps: int, sync_check: bool) -> dict:
    torch.manual_seed(0)
    method, train_cfg, _ = build_method(p, run)
    cl = device.type == "cuda" and train_cfg["channels_last"]
    method.to(device, memory_format=torch.channels_last) if cl else method.to(device)
    opt = build_optimizer(method.param_groups(), train_cfg)
    dtype = AMP[amp] if device.type == "cuda" or amp == "bf16" else None   # CPU autocast: bf16 only
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16 and device.type == "cuda")
    batch = n or step_shape(p, run, method)["batch_per_gpu"]
    raw = synthetic_batch(method, batch, p["dataset"]["image_size"], "cpu", augment=True,
                          mean=p["dataset"]["mean"], std=p["dataset"]["std"])
    if device.type == "cuda":
        raw = raw.pin_memory()   # as the trainer's loader hands it over
    method.train()
    losses = []
    for i in range(steps):
        out = train_step(method, method, opt, scaler, raw.to(device, channels_last=cl), dtype, train_cfg["grad_clip"],
                         (i + 1) / (steps + 1))
        losses.append(out["loss"].detach().float())
    losses = torch.stack(losses).cpu()
    res = {"batch_per_gpu": batch, "amp": amp if dtype is not None else "off (CPU)", "losses": losses.tolist(),
           "ok": bool(torch.isfinite(losses).all())}
    if sync_check:
        res["no_host_sync"] = host_sync_free(lambda: train_step(method, method, opt, scaler, raw.to(device, channels_last=cl),
                                                                dtype, train_cfg["grad_clip"], 1.0), device)
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return res


def host_sync_free(step, device) -> dict:
    """One step with CUDA's sync debug mode at "error": any op that waits for the GPU raises, naming itself."""
    if device.type != "cuda":
        step()   # the same step, unguarded: the CPU has nothing to wait for
        return {"checked": False, "reason": "no CUDA device"}
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return {"checked": True, "ok": True}
    except RuntimeError as e:
        return {"checked": True, "ok": False, "error": str(e)[:1000], "where": traceback.format_exc()[-2000:]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
        synchronize(device)


def method_steps(size: dict, device) -> dict:
    rows, ok, syncs_ok = {}, True, True
    for k, (label, p, run) in enumerate(step_cases(size)):
        # dry (CPU): bf16 autocast for every step, fp16 (GradScaler off without CUDA) for the first only
        for amp in ("bf16", "fp16") if device.type == "cuda" or k == 0 else ("bf16",):
            try:
                r = run_steps(p, run, device, amp, size["batch"], size["steps"], sync_check=amp == "bf16")
            except Exception as e:  # noqa: BLE001
                r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500], "traceback": traceback.format_exc()[-2000:]}
            rows[f"{label}@{amp}"] = r
            ok &= r["ok"]
            syncs_ok &= r.get("no_host_sync", {}).get("ok", True)
            print(f"  {label} {amp}: {'ok' if r['ok'] else 'FAILED ' + r.get('error', 'non-finite loss')}", flush=True)
            free()
    return {"ok": ok, "no_host_sync_ok": syncs_ok, "runs": rows}


# --- step vs bare backbone -------------------------------------------------------------------------------

def step_vs_bare(size: dict, device, dry: bool) -> dict:
    p = load_preset("tiny" if dry else "imagenet1k")
    out = {}
    for run in ("simclr", "mocov2"):
        torch.manual_seed(0)
        method, train_cfg, _ = build_method(p, run)
        cl = device.type == "cuda" and train_cfg["channels_last"]
        method.to(device, memory_format=torch.channels_last) if cl else method.to(device)
        dtype = AMP.get(train_cfg["amp"]) if device.type == "cuda" else None
        opt = build_optimizer(method.param_groups(), train_cfg)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
        raw = synthetic_batch(method, size["bare_batch"], p["dataset"]["image_size"], "cpu", augment=True,
                              mean=p["dataset"]["mean"], std=p["dataset"]["std"])
        if device.type == "cuda":
            raw = raw.pin_memory()
        views = raw.to(device, channels_last=cl).views
        name = p["runs"][run]["method"]
        fb, fwd = (2, 0) if name == "simclr" else ((2, 2) if method.cfg["symmetric"] else (1, 1))
        bb, key_bb = method.backbone, getattr(method, "key_backbone", method.backbone)
        method.train()

        def step():
            train_step(method, method, opt, scaler, raw.to(device, channels_last=cl), dtype, 0.0, 0.5)

        def bare():
            bb.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = sum(bb(views[i % len(views)]).float().pow(2).mean() for i in range(fb))
            scaler.scale(loss).backward()
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                for i in range(fwd):
                    key_bb(views[(i + 1) % len(views)])

        s = timed(step, size["bare_steps"], warmup=1, device=device)
        b = timed(bare, size["bare_steps"], warmup=1, device=device)
        n_views = len(views) * size["bare_batch"]
        out[run] = {"batch": size["bare_batch"], "amp": str(dtype).replace("torch.", "") if dtype else "off",
                    "channels_last": cl, "step_views_per_s": n_views / s, "bare_views_per_s": n_views / b,
                    "ratio_step_over_bare": b / s}
        del method, opt
        free()
    return out


# --- kNN at ImageNet scale -------------------------------------------------------------------------------

def knn_check(size: dict, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    # exactness first, on a bank both devices hold: clustered rows, where TF32 flips neighbours
    centres = torch.randn(64, size["dim"], generator=g)
    bank = centres[torch.randint(0, 64, (size["exact_bank"],), generator=g)] + 0.05 * torch.randn(size["exact_bank"], size["dim"], generator=g)
    q = bank[: size["exact_queries"]] + 0.01 * torch.randn(size["exact_queries"], size["dim"], generator=g)
    _, i_dev = nearest_neighbours(bank, q, 20, device=device)
    _, i_cpu = nearest_neighbours(bank, q, 20, device=torch.device("cpu"))
    same = float((i_dev == i_cpu).all(axis=1).mean())
    # speed at full size (the bank generated on the device: 10.5 GB fp32 at 1.28 M x 2048)
    n, d, nq = size["bank"], size["dim"], size["queries"]
    big = torch.randn(n, d, device=device)
    queries = torch.randn(nq, d, device=device)

    def ours():
        nearest_neighbours(big, queries, 200, device=device)

    buf = torch.empty(nq, min(BANK_CHUNK, n), device=device)

    def mm():
        with full_fp32():
            for b0 in range(0, n, BANK_CHUNK):
                chunk = big[b0:b0 + BANK_CHUNK]
                torch.mm(queries, chunk.T, out=buf[:, :len(chunk)])

    t_ours, t_mm = timed(ours, 1, warmup=1, device=device), timed(mm, 1, warmup=1, device=device)
    del big, queries, buf
    return {"bank": [n, d], "queries": nq, "k": 200, "seconds": t_ours, "torch_mm_seconds": t_mm,
            "ratio_mm_over_ours": t_mm / t_ours, "rows_with_cpu_identical_top20": same, "ok": same >= 0.999}


def fp32_features(device, dry: bool) -> dict:
    torch.manual_seed(0)
    cfg = {"arch": "resnet18", "width": 8, "cifar_stem": True} if dry else {"arch": "resnet50", "width": 64, "cifar_stem": False}
    size = 32 if dry else 224
    net = build_backbone(cfg, size).eval()
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        want = net(x)
        with full_fp32():
            got = net.to(device)(x.to(device)).cpu()
    rel = float((got - want).abs().max() / want.abs().max())
    # TF32 (10-bit mantissa) gives ~1e-3 through a ResNet; IEEE fp32 differs from the CPU by reduction order only
    return {"max_relative_difference": rel, "ok": rel < 1e-4}


# --- features and loader cores ---------------------------------------------------------------------------

def per_core_images_per_s() -> float:
    """Decode + eval view per core at 224 px: the loader benchmark's two-view rate at 224 px halved (one decode
    serves its two crops there; the eval view is one decode + one resize/crop per image)."""
    rows = json.loads(LOADER.read_text())["results"]
    two_view = next(r for r in rows if r["setting"] == "byol-two-view")
    return two_view["worker_views_per_s_per_core"] / 2


def features_check(size: dict, device, dry: bool) -> dict:
    cfg = {"arch": "resnet18", "width": 8, "cifar_stem": True} if dry else {"arch": "resnet50", "width": 64, "cifar_stem": False}
    px = 32 if dry else 224
    net = build_backbone(cfg, px).to(device).eval()
    x = torch.randn(size["feat_batch"], 3, px, px, device=device)
    cuda = device.type == "cuda"

    @torch.no_grad()
    def forward():   # as pipeline.eval.features._extract runs it: bf16 autocast on CUDA, TF32 off
        with full_fp32(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            net(x).float()

    s = timed(forward, size["feat_steps"], warmup=1, device=device)
    rate = size["feat_batch"] / s
    core = per_core_images_per_s()
    return {"images_per_s": rate, "batch": size["feat_batch"], "per_core_images_per_s_224": core,
            "loader_cores_per_gpu": math.ceil(rate / core)}


def loader_cores(results: dict) -> dict:
    rows = json.loads(LOADER.read_text())["results"]
    per_core = next(r for r in rows if r["setting"] == "byol-two-view")["worker_views_per_s_per_core"]
    bare = results.get("step_vs_bare", {})
    need = {run: math.ceil(r["step_views_per_s"] / per_core) for run, r in bare.items() if isinstance(r, dict) and "step_views_per_s" in r}
    return {"views_per_s_per_core_224": per_core, "cores_per_gpu": need, "ok": bool(need)}


# --- resume across device counts -------------------------------------------------------------------------

def _widen_cuda_rng(obj, n: int) -> bool:
    """Every non-empty list of CUDA RNG states (key "cuda") in a checkpoint, in place, as if saved with n GPUs.
    Returns whether there was one (a CPU checkpoint has none)."""
    found = False
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "cuda" and isinstance(v, list) and v:
                obj[k] = [v[0]] * n
                found = True
            else:
                found |= _widen_cuda_rng(v, n)
    return found


def resume_check(device) -> dict:
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import imagefolder
    from pipeline.profile import resolve
    from pipeline.params import validate
    from pipeline.train.trainer import train
    from PIL import Image
    import numpy as np

    root = Path(tempfile.mkdtemp(prefix="gpu-check-resume-"))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / "img" / split / c).mkdir(parents=True)
            for i in range(16):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "img" / split / c / f"{i}.jpg")
    raw = resolve("tiny")
    raw["train"].update(batch_size=8, num_workers=0, checkpoint_every=2)
    p = validate(raw)
    write_shards(imagefolder(root / "img"), root / "data/shards" / p["dataset"]["name"], 8, 0, False)
    first = train(p, "simclr", root=root, max_steps=2)
    ckpts = list(root.rglob("last.pt"))
    widened = False
    for path in ckpts:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if _widen_cuda_rng(ck, 8):
            widened = True
            torch.save(ck, path)
    second = train(p, "simclr", root=root, max_steps=4)
    return {"saved_at": first.get("stopped_at_step"), "resumed_to": second.get("stopped_at_step"),
            "cuda_rng_states_widened_to_8": widened, "device_count": torch.cuda.device_count(),
            "ok": first.get("stopped_at_step") == 2 and second.get("stopped_at_step") == 4}


# --- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, nothing written unless --out")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/gpu-<device>.json (not written with --dry)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these items")
    a = ap.parse_args(argv)
    device = torch.device("cpu") if a.dry else claim_device()
    if device.type != "cuda" and not a.dry:
        print("error: no CUDA device (use --dry for the CPU run of the same code paths)", file=sys.stderr)
        return 2
    size = SIZES["dry" if a.dry else "full"]
    results: dict = {}
    checks = {
        "method_steps": ([1, 2, 3, 5, 6, 12], lambda: method_steps(size, device)),
        "step_vs_bare": ([6, 11], lambda: step_vs_bare(size, device, a.dry)),
        "knn": ([8, 9], lambda: knn_check(size, device)),
        "fp32_features": ([9], lambda: fp32_features(device, a.dry)),
        "features": ([12], lambda: features_check(size, device, a.dry)),
        "loader_cores": ([12], lambda: loader_cores(results)),
        "resume": ([4, 5], lambda: resume_check(device)),
    }
    t0 = time.perf_counter()
    for name, (guards, fn) in checks.items():
        if a.only is None or name in a.only:
            item(name, guards, fn, results)
    if "method_steps" in results and results["method_steps"].get("no_host_sync_ok") is False:
        results["method_steps"]["ok"] = False
    env = {"device": device_slug(device), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpus": torch.cuda.device_count(), "python": platform.python_version(), "dry": a.dry,
           "seconds": time.perf_counter() - t0}
    doc = {"env": env, "ok": all(r["ok"] for r in results.values()), "checks": results}
    out = a.out or (None if a.dry else str(HERE / "results" / f"gpu-{device_slug(device)}.json"))
    if out:
        atomic_write_json(doc, out)
        print(f"-> {out}")
    print(f"gpu check: {'all ok' if doc['ok'] else 'FAILED: ' + ', '.join(k for k, r in results.items() if not r['ok'])} "
          f"in {env['seconds']:.0f} s")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
