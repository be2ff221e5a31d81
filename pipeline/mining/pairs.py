"""SePP-ID semantic sampler: blockwise search for semantic positive pairs, a random control, pair metrics.

SePP-ID (Alkhalefi et al., TMLR 2024), §3.1 and Algorithm 1: K embeddings of original images are
L2-normalised (line 6); every ordered pair (i, j), i != j, whose cosine similarity lies in [min, max]
(lines 11-16; paper: [0.97, 0.99]) is a semantic positive pair. An anchor may have several positives;
the upper bound drops near-identical images. Algorithm 1 forms the whole K x K matrix (line 12); here
rows are processed in blocks, so memory is O(block * K) and K can grow to ImageNet scale. The block matmuls
and the candidate search run on the GPU when there is one; candidates are re-scored exactly on the CPU, so the
pairs are the same on any device.
"""
from __future__ import annotations


import numpy as np
import torch
from tqdm import tqdm

from pipeline.device import claim_device, full_fp32

_EMPTY = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))


def _normalised(emb, chunk_rows: int = 8192) -> torch.Tensor:
    """Algorithm 1 line 6: L2-normalise each row (in float64, chunked), stored as float32 for the matmul."""
    x = emb.detach().cpu() if isinstance(emb, torch.Tensor) else torch.from_numpy(np.asarray(emb))
    if x.ndim != 2:
        raise ValueError(f"embeddings: expected a (K, D) array, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"embeddings: expected a numeric array, got dtype {x.dtype}")
    out = torch.empty(x.shape, dtype=torch.float32)
    for s in range(0, x.shape[0], chunk_rows):
        c = x[s:s + chunk_rows].double()
        if not torch.isfinite(c).all():
            bad = s + int((~torch.isfinite(c)).any(1).nonzero()[0])
            raise ValueError(f"embeddings: row {bad} contains NaN/Inf (check the encoder's output)")
        # a zero row stays zero (cosine 0 with everything) instead of dividing by zero
        out[s:s + chunk_rows] = (c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
    return out


def _exact_sims(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Cosine of candidate pairs recomputed per pair in float64 (exact products of float32 values).

    The float32 block matmul's rounding depends on the block's shape (BLAS kernels differ), so pairs are
    judged on this per-pair value instead: the same for any block size, and symmetric in (i, j).
    """
    out = torch.empty(len(i), dtype=torch.float64)
    step = max(1, chunk_elems // max(1, x.shape[1]))
    for s in range(0, len(i), step):
        out[s:s + step] = (x[i[s:s + step]].double() * x[j[s:s + step]].double()).sum(1)
    return out.float()


def _top_per_anchor(a: np.ndarray, p: np.ndarray, s: np.ndarray, m: int):
    """Keep each anchor's m most similar positives; equal similarities keep the lower positive index."""
    order = np.lexsort((p, -s, a))  # by anchor, then similarity descending, then positive index
    a, p, s = a[order], p[order], s[order]
    pos = np.arange(len(a))
    starts = np.maximum.accumulate(np.where(np.r_[True, a[1:] != a[:-1]], pos, 0)) if len(a) else pos
    keep = (pos - starts) < m
    return a[keep], p[keep], s[keep]


def mine_pairs(emb, lo: float, hi: float, block: int = 4096, max_per_anchor: int = 0,
               progress: bool = False, device=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ordered pairs (i, j), i != j, with cos(emb_i, emb_j) in [lo, hi] (SePP-ID Algorithm 1, lines 10-18).

    emb: (K, D) numpy array or torch tensor (any norm; rows are L2-normalised here).
    lo, hi: inclusive bounds, applied to the float32 similarity that is returned (the paper: 0.97, 0.99);
        pairs above `hi` (near-duplicates) and self-pairs are never returned.
    block: rows per block. Each block computes its rows against the columns from its first row onward
        (similarity is symmetric, so each unordered pair is computed once and mirrored): at most
        block x K float32 values (plus <= 16M-element temporaries) live at once; never K x K. The result does not
        depend on `block` (candidates from the float32 matmul are re-scored per pair, see _exact_sims).
    max_per_anchor: 0 (the paper) keeps every positive; m > 0 keeps each anchor's m most similar
        positives, ties broken by the lower positive index (deterministic).
    device: where the block matmuls and the candidate search run (None: `claim_device()`, the GPU when
        present); the block buffer, the (K, D) normalised copy and the search temporaries live there. The
        result does not depend on it: candidates are re-scored on the CPU from the same normalised rows.
    Returns (anchor int64, positive int64, similarity float32), sorted by (anchor, positive).
    """
    if not (-1.0 <= lo <= hi <= 1.0):
        raise ValueError(f"similarity bounds: need -1 <= lo <= hi <= 1, got lo={lo}, hi={hi}")
    if int(block) < 1:
        raise ValueError(f"block: expected a positive number of rows, got {block}")
    if int(max_per_anchor) < 0:
        raise ValueError(f"max_per_anchor: expected >= 0 (0 = no cap), got {max_per_anchor}")
    x = _normalised(emb)  # on the CPU: the exact re-score reads these rows whatever the device
    K, D = x.shape
    if K < 2:
        return _EMPTY
    block, cap = min(int(block), K), int(max_per_anchor)
    lo32, hi32 = np.float32(lo), np.float32(hi)
    # float32 dot products of unit vectors are off by at most ~D * 2^-24; the slack keeps every pair whose
    # exact similarity reaches lo among the candidates (the exact re-score then decides)
    cand_thr = float(lo32) - (2.0 * D * 2.0 ** -24 + 1e-6)
    dev = torch.device(device) if device is not None else claim_device()
    xd = x.to(dev)
    sims_buf = torch.empty(block * K, dtype=torch.float32, device=dev)  # reused: no block x K allocation per block
    sub_rows = max(1, (1 << 24) // K)  # rows re-scanned at once: <= 16M elements of temporaries
    parts_a, parts_p, parts_s = [], [], []
    kept = _EMPTY
    for s in tqdm(range(0, K, block), desc="mine pairs", unit="block", disable=not progress, dynamic_ncols=True):
        e = min(s + block, K)
        rows, cols = e - s, K - s
        sims = sims_buf[:rows * cols].view(rows, cols)
        with full_fp32():  # TF32's 10-bit mantissa would break the candidate slack bound
            torch.mm(xd[s:e], xd[s:].T, out=sims)
        sims[:, :rows].diagonal().fill_(-2.0)  # self-similarity: never a pair, and would make every row match
        # pairs are sparse: one max pass over the block finds the few rows that hold any candidate, and only
        # those are thresholded and scanned for indices (nonzero over the whole block costs more than the matmul)
        hot = (sims.amax(1) >= cand_thr).nonzero().squeeze(1)
        found = []
        for h in hot.split(sub_rows):
            r, c = (sims.index_select(0, h) >= cand_thr).nonzero(as_tuple=True)
            found.append((h[r] + s, c + s))
        gi = torch.cat([f[0] for f in found]).cpu() if found else torch.empty(0, dtype=torch.int64)
        gj = torch.cat([f[1] for f in found]).cpu() if found else torch.empty(0, dtype=torch.int64)
        upper = gj > gi  # each unordered pair once (the block's lower triangle repeats pairs mirrored)
        gi, gj = gi[upper], gj[upper]
        sim = _exact_sims(x, gi, gj)
        ok = (sim >= float(lo32)) & (sim <= float(hi32))  # exact in float32: compared at float32 resolution
        i, j, v = gi[ok].numpy(), gj[ok].numpy(), sim[ok].numpy()
        if cap:
            # top-m of a union == top-m of the per-part top-m: pruning as we go is exact and bounds memory
            kept = _top_per_anchor(np.concatenate([kept[0], i, j]), np.concatenate([kept[1], j, i]),
                                   np.concatenate([kept[2], v, v]), cap)
        else:
            parts_a.append(i), parts_p.append(j), parts_s.append(v)
    if cap:
        a, p, v = kept
    else:
        i, j, v = (np.concatenate(t) for t in (parts_a, parts_p, parts_s))
        a, p, v = np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([v, v])
    order = np.argsort(a * K + p, kind="stable")
    return a[order].astype(np.int64), p[order].astype(np.int64), v[order].astype(np.float32)


def random_pairs(n_pairs: int, K: int, seed: int, same_image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Control for SePP-ID Table 9: as many added pairs as mined, but not semantic. Sorted by (anchor, positive).

    same_image=False: n distinct ordered pairs (i, j), i != j, drawn uniformly (random images as positives).
    same_image=True: the paper's literal control (§4, Table 9): n distinct random images, each paired with
        itself, i.e. two augmented copies of the same image added to the dataset (anchor == positive).
    Deterministic for a given (n_pairs, K, seed).
    """
    n, K = int(n_pairs), int(K)
    rng = np.random.default_rng(seed)
    if same_image:
        if not 0 <= n <= K:
            raise ValueError(f"random_pairs: need 0 <= n_pairs <= K={K} images, got {n}")
        idx = np.sort(rng.choice(K, size=n, replace=False)).astype(np.int64)
        return idx, idx.copy()
    if not 0 <= n <= K * (K - 1):
        raise ValueError(f"random_pairs: need 0 <= n_pairs <= K*(K-1)={K * (K - 1)}, got {n}")
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    codes = np.empty(0, np.int64)
    while len(codes) < n:  # draw, drop repeats, top up: a few rounds unless n is close to K*(K-1)
        a = rng.integers(0, K, size=2 * (n - len(codes)) + 16)
        p = (a + rng.integers(1, K, size=len(a))) % K  # uniform over the K-1 other images
        new = a * K + p
        _, first = np.unique(new, return_index=True)
        new = new[np.sort(first)]  # deduplicate, keeping draw order
        codes = np.concatenate([codes, new[~np.isin(new, codes)]])
    codes = np.sort(codes[:n])
    return (codes // K).astype(np.int64), (codes % K).astype(np.int64)


def pair_metrics(anchor, positive, labels=None, K: int | None = None, sims=None, bins=10,
                 warn_ratio: float = 50.0) -> dict:
    """Metrics of a pair set (design §3.2): size, coverage, and pair accuracy (SePP-ID §4: share of pairs
    whose two images have the same label; labels are used for nothing else).

    labels: per mined index (length K) or None (pair_accuracy is then None). K: number of mined images
    (defaults to len(labels)). sims/bins: similarity histogram (numpy bins: a count or the edges).
    `warning` is a message when pairs outnumber the anchors that have any more than `warn_ratio` times over.
    """
    a, p = np.asarray(anchor, np.int64), np.asarray(positive, np.int64)
    if a.shape != p.shape:
        raise ValueError(f"pair_metrics: anchor and positive differ in length ({len(a)} vs {len(p)})")
    if K is None:
        K = len(labels) if labels is not None else (int(max(a.max(), p.max())) + 1 if len(a) else 0)
    n, covered = len(a), int(len(np.unique(a)))
    out = {"pairs": int(n), "K": int(K), "anchors_covered": covered,
           "anchors_covered_frac": covered / K if K else 0.0,
           "mean_positives_per_anchor": n / covered if covered else 0.0,
           "max_positives_per_anchor": int(np.bincount(a).max()) if n else 0,
           "pair_accuracy": None, "similarity_hist": None, "warning": None}
    if labels is not None and n:
        y = np.asarray(labels)
        if len(y) < K:
            raise ValueError(f"pair_metrics: {len(y)} labels for K={K} mined images")
        out["pair_accuracy"] = float(np.mean(y[a] == y[p]))
    if sims is not None:
        # edges rounded to float32 like the similarities, so a pair at exactly hi lands in the last bin
        edges = bins if np.ndim(bins) == 0 else np.asarray(bins, np.float32).astype(np.float64)
        counts, edges = np.histogram(np.asarray(sims, np.float32).astype(np.float64), bins=edges)
        out["similarity_hist"] = {"edges": [float(x) for x in edges], "counts": [int(c) for c in counts]}
    if covered and n > warn_ratio * covered:
        out["warning"] = (f"{n} pairs for {covered} anchors "
                          f"({n / covered:.0f} positives per anchor, > {warn_ratio:g}x): "
                          "set a cap on positives per anchor or raise the lower similarity threshold")
    return out
