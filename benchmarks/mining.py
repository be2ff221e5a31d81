"""SePP-ID pair mining at scale: wall time and peak memory of `mine_pairs` per block size, and extrapolation.

    python benchmarks/mining.py [--k 50000] [--dim 128] [--blocks 1024 2048 4096 8192] [--probe-dim 512] \
        [--device cpu|cuda] [--out benchmarks/results/mining-<device>.json]
    python benchmarks/mining.py --quick     # a small K to check the script runs (writes under /tmp; not a result)

Embeddings: K random unit vectors in D dimensions, a fifth of them planted at a cosine drawn from
[0.95, 1.0] to a random other point, so pairs fall inside [0.97, 0.99] and near-duplicates above it.
Each block size runs in its own subprocess (a fresh interpreter, so no allocator state carries over):
peak memory is the process's peak RSS during `mine_pairs` minus its RSS just before (the kernel's
high-water mark is reset first where Linux allows, else the getrusage peak delta); on CUDA it is the peak
of allocated device memory (the block buffer, the normalised copy, the search temporaries). Every block size
must return the same pairs (checked). The extrapolation (see `extrapolate`) fits time = K^2 (a D + b), using
one more run at --probe-dim, and memory = c block K + 4 K D.
Target: K = 50,000, D = 128 in <= 30 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMAGENET_TRAIN = 1_281_167


def planted_embeddings(K: int, D: int, seed: int, frac: float = 0.2, chunk: int = 8192) -> np.ndarray:
    """Random unit vectors; the last `frac` of rows are re-drawn at cosine t ~ U(0.95, 1) to a random base row."""
    rng = np.random.default_rng(seed)
    x = np.empty((K, D), np.float32)
    for s in range(0, K, chunk):  # float32 chunks keep the generator's own memory peak small
        c = rng.standard_normal((min(chunk, K - s), D), dtype=np.float32)
        x[s:s + len(c)] = c / np.linalg.norm(c, axis=1, keepdims=True)
    n_base = K - int(frac * K)
    for s in range(n_base, K, chunk):
        e = min(s + chunk, K)
        parent = x[rng.integers(0, n_base, e - s)]
        w = rng.standard_normal((e - s, D), dtype=np.float32)
        w -= np.sum(w * parent, axis=1, keepdims=True) * parent  # orthogonal to the parent
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        t = rng.uniform(0.95, 1.0, (e - s, 1)).astype(np.float32)
        x[s:e] = t * parent + np.sqrt(1 - t * t) * w
    return x


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _reset_hwm() -> bool:
    try:  # "5" resets the peak-RSS high-water mark (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args) -> None:
    import torch

    from pipeline.mining.pairs import mine_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    x = planted_embeddings(args.k, args.dim, args.seed)
    torch.mm(torch.ones(64, 64), torch.ones(64, 64))  # load BLAS and start its threads before the baseline
    cuda = args.device == "cuda"
    if cuda:  # warm the context and cuBLAS up, so neither is timed
        torch.mm(torch.ones(64, 64, device="cuda"), torch.ones(64, 64, device="cuda"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _rss_kb()
    reset = _reset_hwm()
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    a, p, s = mine_pairs(x, args.lo, args.hi, block=args.block, device=args.device)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    peak = _hwm_kb() if reset else None
    delta_kb = (peak - before) if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ru_before
    if cuda:
        delta_kb = torch.cuda.max_memory_allocated() / 1024
    digest = hashlib.sha256(a.tobytes() + p.tobytes() + s.tobytes()).hexdigest()[:16]
    print(json.dumps({"block": args.block, "wall_s": round(wall, 3), "peak_mem_mb": round(delta_kb / 1024, 1),
                      "peak_method": ("cuda max_memory_allocated" if cuda else
                                      "VmHWM reset" if peak is not None else "ru_maxrss delta"),
                      "device": args.device,
                      "host_peak_mem_mb": round(((peak - before) if peak is not None else 0) / 1024, 1),
                      "pairs": int(len(a)), "anchors_covered": int(len(np.unique(a))), "digest": digest,
                      "threads": torch.get_num_threads()}))


def extrapolate(rows: list[dict], probe: dict | None, K0: int, D0: int, mem_budget_gb: float) -> dict:
    """Time ~ K^2 (a D + b): a from the matmul, b from the O(K^2) candidate mask pass that does not grow with
    D; a and b come from the fastest block at D0 and the probe run at a second D (else all time is put on a D).
    Memory ~ c * block * K + 4 K D (the float32 normalised copy): c is the slope over the block sizes."""
    best = min(rows, key=lambda r: r["wall_s"])
    if probe is not None and probe["dim"] != D0:
        a = max((probe["wall_s"] - best["wall_s"]) / (K0 ** 2 * (probe["dim"] - D0)), 0.0)
        b = max(best["wall_s"] / K0 ** 2 - a * D0, 0.0)
    else:
        a, b = best["wall_s"] / (K0 ** 2 * D0), 0.0
    n = np.array([r["block"] * K0 for r in rows], float)
    mem = np.array([r["peak_mem_mb"] * 2 ** 20 for r in rows])
    if len(set(n)) >= 2:
        per_elem, fixed = np.polyfit(n, mem, 1)
    else:
        per_elem, fixed = mem.max() / n.max(), 0.0
    per_elem = max(float(per_elem), 5.0)  # float32 similarities + bool mask: 5 bytes is the floor
    out = {"basis": {"block": best["block"], "wall_s": best["wall_s"], "K": K0, "D": D0,
                     "probe": probe, "s_per_K2_per_dim": a, "s_per_K2": b,
                     "bytes_per_block_x_K_element": round(per_elem, 2),
                     "fixed_overhead_mb": round(float(fixed) / 2 ** 20, 1)},
           "model": "time = K^2 (a D + b); memory = c block K + 4 K D (+ pairs); measured on this machine",
           "targets": []}
    settings = [("50k", 50_000), ("ImageNet 10% (paper's K)", IMAGENET_TRAIN // 10), ("ImageNet full", IMAGENET_TRAIN)]
    for name, K in settings:
        for D in sorted({D0, 2048}):
            t = K ** 2 * (a * D + b)
            budget_left = mem_budget_gb * 2 ** 30 - 4 * K * D
            out["targets"].append({
                "setting": name, "K": K, "D": D, "est_wall_s": round(t, 1), "est_wall_h": round(t / 3600, 2),
                "est_mem_gb_block_4096": round((per_elem * 4096 * K + 4 * K * D) / 2 ** 30, 2),
                f"largest_block_within_{mem_budget_gb:g}GB": max(int(budget_left // (per_elem * K)), 0)})
    return out


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def run_child(args, block: int, dim: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--block", str(block), "--k", str(args.k), "--dim", str(dim),
           "--lo", str(args.lo), "--hi", str(args.hi), "--seed", str(args.seed), "--threads", str(args.threads),
           "--device", args.device]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"block {block}, D {dim}: child failed:\n{res.stderr[-2000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"K={args.k} D={dim} block={block}: {r['wall_s']:.2f} s, peak +{r['peak_mem_mb']:.0f} MB "
          f"(theory {5 * block * args.k / 2**20:.0f} MB), {r['pairs']} pairs", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--lo", type=float, default=0.97)
    ap.add_argument("--hi", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--probe-dim", type=int, default=512,
                    help="one more run at this D (best block) to split time into matmul and mask parts (0: skip)")
    ap.add_argument("--mem-budget-gb", type=float, default=8.0)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the block matmuls and the candidate search run (the pairs are the same)")
    ap.add_argument("--quick", action="store_true",
                    help="K = 4000, two block sizes, no probe, written to /tmp: checks that the script runs")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/mining-<device>.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--block", type=int, default=4096, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.k, args.blocks, args.probe_dim = 4000, [512, 2048], 0
        args.out = args.out or f"/tmp/mining-quick-{args.device}.json"
    args.out = args.out or f"benchmarks/results/mining-{args.device}.json"

    rows = [run_child(args, b, args.dim) for b in args.blocks]
    best = min(rows, key=lambda r: r["wall_s"])["block"]
    probe = {**run_child(args, best, args.probe_dim), "dim": args.probe_dim} if args.probe_dim else None
    same = len({(r["pairs"], r["digest"]) for r in rows}) == 1
    if not same:
        print("WARNING: block sizes returned different pairs", file=sys.stderr)
    result = {
        "benchmark": "SePP-ID pair mining (pipeline.mining.pairs.mine_pairs)",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "K": args.k, "D": args.dim, "lo": args.lo, "hi": args.hi, "seed": args.seed, "device": args.device,
        "gpu": _gpu_name() if args.device == "cuda" else None,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "niceness": os.nice(0), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "runs": rows, "identical_across_blocks": same,
        "target": {"K": 50_000, "D": 128, "max_wall_s": 30.0,
                   "met": (min(r["wall_s"] for r in rows) <= 30.0) if (args.k, args.dim) == (50_000, 128) else None},
        "extrapolation": extrapolate(rows, probe, args.k, args.dim, args.mem_budget_gb),
    }
    from pipeline.utils import atomic_write_json
    atomic_write_json(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
