"""Evaluation at ImageNet-like shapes: torch kNN and softmax probe vs a plain matmul and the old scikit-learn path.

    python benchmarks/eval_scale.py [--device cpu|cuda] [--knn-sizes 100000 300000 1281167] [--dim 2048]
        [--queries 10000] [--classes 1000] [--probe-sizes 50000 100000 200000] [--out benchmarks/results/eval-scale-<device>.json]
    python benchmarks/eval_scale.py --quick    # tiny shapes to check the script runs (writes under /tmp; not a result)

Synthetic features (Gaussian, float32) are written chunk by chunk to memory-mapped `.npy` files in a temp
directory (the 1.28 M x 2048 bank is ~10.5 GB) and read back with `np.load(mmap_mode="r")`, as the
evaluate stage reads its cache.
  * kNN: `knn_predict` (k = 10, 20, 200) against the machine's own matmul throughput for the same shapes,
    measured in the same run: `torch.mm` of the queries with one in-memory bank chunk, repeated to the same
    total (queries x D x N) — no I/O, no normalisation, no top-k. ratio = matmul time / kNN time (target >= 0.70).
    The old scikit-learn path (`nearest_neighbours` as of the commit before the torch rewrite, copied below)
    runs on a query subset at the smallest bank and is extrapolated linearly in queries (labelled so).
  * Probe: seconds per pass over the data (one loss + gradient evaluation of the full-batch L-BFGS: an
    "epoch") at several N, from two fits of different lengths (the difference cancels set-up), and the old
    scikit-learn probe (StandardScaler + LogisticRegression lbfgs) per iteration at the smallest N.
Peak memory: the process's anonymous resident memory (RssAnon, sampled every 50 ms: the mapped feature
files are page cache, not counted) and its peak RSS including mapped pages (VmHWM).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.eval.knn import BANK_CHUNK, exact_fp32_matmul, knn_predict, l2_normalize  # noqa: E402
from pipeline.eval.linear import SoftmaxRegression  # noqa: E402


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak RssAnon (MiB) while the block runs, sampled by a thread; VmHWM after it (reset before where allowed)."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM (Linux >= 4.0)
        except OSError:
            pass
        self.peak_anon, self._stop = proc_status_kb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak_anon = max(self.peak_anon, proc_status_kb("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon_mib = round(max(self.peak_anon, proc_status_kb("RssAnon")) / 1024, 1)
        self.peak_rss_mib = round(proc_status_kb("VmHWM") / 1024, 1)


def write_features(path: Path, n: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """A float32 (n, dim) Gaussian `.npy`, written in chunks (bounded memory), returned memory-mapped read-only."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        out[start:start + chunk] = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def old_sklearn_neighbours(train, query, k):
    """The scikit-learn kNN search this project used before the torch rewrite (pipeline/eval/knn.py at 0e366c1)."""
    from sklearn.neighbors import NearestNeighbors

    train, query = l2_normalize(train), l2_normalize(query)
    k = min(k, len(train))
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train)
    block = int(np.clip((1 << 24) // max(len(train), 1), 1, 4096))
    sims = np.empty((len(query), k), dtype=np.float32)
    idx = np.empty((len(query), k), dtype=np.int64)
    for start in range(0, len(query), block):
        dist, ind = nn.kneighbors(query[start:start + block], return_distance=True)
        sims[start:start + block] = 1.0 - dist
        idx[start:start + block] = ind
    return sims, idx


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_reference(queries: np.ndarray, bank: np.ndarray, n: int, device) -> float:
    """Seconds of plain torch.mm for queries (Q, D) @ (D, n): one in-memory bank chunk, repeated to n columns."""
    q = torch.from_numpy(np.array(queries)).to(device)
    chunk = torch.from_numpy(np.array(bank[:BANK_CHUNK])).to(device)
    with exact_fp32_matmul(device):
        torch.mm(q, chunk.T)   # warm-up (allocator, BLAS threads)
        sync(device)
        t = time.perf_counter()
        for start in range(0, n, BANK_CHUNK):
            c = chunk[: min(BANK_CHUNK, n - start)]
            torch.mm(q, c.T)
        sync(device)
    return time.perf_counter() - t


def bench_knn(tmp: Path, sizes, dim, n_queries, classes, device, old_queries) -> list[dict]:
    queries = write_features(tmp / "queries.npy", n_queries, dim, seed=1)
    bank_all = write_features(tmp / "bank.npy", max(sizes), dim, seed=0)
    labels = np.random.default_rng(2).integers(0, classes, size=max(sizes))
    knn_predict(bank_all[:1000], labels[:1000], queries[:100], [10], 0.1, classes, device=device)   # warm-up
    rows = []
    for n in sorted(sizes):
        bank = bank_all[:n]
        sync(device)
        with PeakMemory() as mem:
            t = time.perf_counter()
            knn_predict(bank, labels[:n], queries, [10, 20, 200], 0.1, classes, device=device)
            sync(device)
            t_knn = time.perf_counter() - t
        t_mm = matmul_reference(queries, bank, n, device)
        row = {"n_bank": n, "dim": dim, "n_queries": n_queries, "knn_s": round(t_knn, 3), "matmul_s": round(t_mm, 3),
               "ratio_matmul_over_knn": round(t_mm / t_knn, 3),
               "knn_gflops": round(2 * n_queries * dim * n / t_knn / 1e9, 1),
               "peak_anon_mib": mem.peak_anon_mib, "peak_rss_incl_mapped_mib": mem.peak_rss_mib}
        print(json.dumps(row), flush=True)
        rows.append(row)
    n = min(sizes)
    t = time.perf_counter()
    old_sklearn_neighbours(np.array(bank_all[:n]), np.array(queries[:old_queries]), 200)
    t_old = time.perf_counter() - t
    old = {"n_bank": n, "queries_measured": old_queries, "seconds_measured": round(t_old, 3),
           "seconds_for_all_queries_extrapolated": round(t_old * n_queries / old_queries, 1),
           "speedup_of_torch_knn_extrapolated": round(t_old * n_queries / old_queries / rows[0]["knn_s"], 1)}
    print(json.dumps({"old_sklearn_knn": old}), flush=True)
    return rows, old


def probe_seconds_per_pass(x, y, C, device, iters=(2, 6)) -> tuple[float, dict]:
    """Seconds per loss+gradient pass: two fits of different lengths, the difference over their extra passes."""
    fits = []
    for it in iters:
        t = time.perf_counter()
        est = SoftmaxRegression(C=C, max_iter=it, tol=0.0, device=device).fit(x, y)
        sync(torch.device(device))
        fits.append((time.perf_counter() - t, est.n_evals_, est))
    (t0, e0, _), (t1, e1, est) = fits
    return (t1 - t0) / max(e1 - e0, 1), {"solver": est.solver_, "matmul_dtype": est.matmul_dtype_}


def bench_probe(tmp: Path, sizes, dim, classes, device, old_n) -> tuple[list[dict], dict]:
    x_all = write_features(tmp / "probe.npy", max(sizes), dim, seed=3)
    # labels a noisy linear function of the features, so the probe has something to fit
    w = np.random.default_rng(4).standard_normal((dim, classes), dtype=np.float32)
    y_all = np.concatenate([(np.asarray(x_all[s:s + 65536]) @ w).argmax(axis=1) for s in range(0, len(x_all), 65536)])
    SoftmaxRegression(max_iter=2, device=device).fit(x_all[:1000], y_all[:1000])   # warm-up (torch init, threads)
    rows = []
    for n in sorted(sizes):
        with PeakMemory() as mem:
            per_pass, info = probe_seconds_per_pass(x_all[:n], y_all[:n], 1.0, device)
        row = {"n": n, "dim": dim, "classes": classes, "seconds_per_pass": round(per_pass, 3),
               "seconds_per_pass_per_100k": round(per_pass / n * 1e5, 3), **info,
               "peak_anon_mib": mem.peak_anon_mib, "peak_rss_incl_mapped_mib": mem.peak_rss_mib}
        print(json.dumps(row), flush=True)
        rows.append(row)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    import warnings

    x_old, y_old = np.array(x_all[:old_n]), y_all[:old_n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5)).fit(x_old, y_old)
        t_old = time.perf_counter() - t
    n_iter = int(np.max(model[-1].n_iter_))
    ours = next((r for r in rows if r["n"] == old_n), None)
    old = {"n": old_n, "iterations": n_iter, "seconds": round(t_old, 3), "seconds_per_iteration": round(t_old / n_iter, 3),
           "note": "scikit-learn lbfgs: ~1.1-1.3 loss+gradient passes per iteration; compare with seconds_per_pass"}
    if ours:
        old["ratio_old_per_iteration_over_ours_per_pass"] = round(t_old / n_iter / ours["seconds_per_pass"], 2)
    print(json.dumps({"old_sklearn_probe": old}), flush=True)
    return rows, old


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--knn-sizes", type=int, nargs="+", default=[100_000, 300_000, 1_281_167])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--old-queries", type=int, default=200, help="queries the old scikit-learn kNN runs (extrapolated)")
    ap.add_argument("--probe-sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    ap.add_argument("--old-probe-n", type=int, default=50_000)
    ap.add_argument("--tmp", default=None, help="directory for the memory-mapped features (default: a temp dir)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.quick:
        a.knn_sizes, a.dim, a.queries, a.classes, a.old_queries = [3000, 9000], 64, 500, 10, 100
        a.probe_sizes, a.old_probe_n = [2000, 4000], 2000
    device = torch.device(a.device)
    out = Path(a.out or ("/tmp/eval-scale-quick.json" if a.quick else f"benchmarks/results/eval-scale-{device.type}.json"))
    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="eval-scale-") as tmp:
        knn_rows, old_knn = bench_knn(Path(tmp), a.knn_sizes, a.dim, a.queries, a.classes, device, a.old_queries)
        probe_rows, old_probe = bench_probe(Path(tmp), a.probe_sizes, a.dim, a.classes, device, a.old_probe_n)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                    "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
                    "torch": torch.__version__},
        "quick": a.quick, "target": "kNN at >= 0.70 of torch.mm throughput for the same shapes; probe cost per pass linear in N",
        "knn": knn_rows, "old_sklearn_knn": old_knn, "probe": probe_rows, "old_sklearn_probe": old_probe,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
