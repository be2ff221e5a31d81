"""PW-Self patch matching (Javidani et al., "Patch-wise Self-supervised Visual Representation Learning", §3.4).

Two crops of one image, each resized and cut into a grid of patches (ViT tokens), share the pixels of
the intersection of their boxes (eq. 1). A patch belongs to that intersection when MORE than half its
height and more than half its width lie inside it (rows and columns are separable). Along each axis the
view with more rows (columns) inside is sampled to match the one with fewer, first and last always
matched:

    index(i) = floor(i * (G - 1) / (L - 1)),   i = 0 .. L - 1   (L = 1 -> index 0)

where L / G are the smaller / larger counts. The paper prints G / (L - 1) (eqs. 2-5), which contradicts
its own worked example (Fig. 2: 3 vs 4 rows and 4 vs 6 columns select global rows 1, 2, 4 and columns
1, 2, 4, 6); (G - 1) reproduces it and always keeps the last index in range (design brief §4). The
matched pairs are the cross product of matched rows x matched columns. A horizontal flip (applied after
crop + resize, views.py) only mirrors the column index, c -> grid - 1 - c (eq. 6), so matching is done in
un-flipped coordinates and mirrored afterwards. No overlap -> no patch pairs (only the CLS tokens match).

Boxes are views.py's geometry rows [top, left, height, width, flipped] in original-image pixels.
Intersection tests use exact integer arithmetic (coordinates scaled by the grid), so "exactly half" is
decided exactly, never by float rounding.

`match_patches` is per sample and vectorised over the batch (padded indices + a mask, no Python loop,
no host sync unless `trim=True`). The paper instead forces one crop box per batch so that matching runs
once (§4.1.2); `match_patches_shared` is that variant, kept for the benchmark. `match_patches_reference`
is a plain per-sample brute force with exact fractions, for tests and as the naive baseline.
"""
from __future__ import annotations

from fractions import Fraction

import torch


def intersect(geo_a: torch.Tensor, geo_b: torch.Tensor) -> torch.Tensor:
    """(B, >=4) boxes [top, left, height, width] -> (B, 4) intersection in the same format (eq. 1);
    height / width clamp to 0 when the boxes do not overlap on that axis."""
    a, b = geo_a[:, :4].long(), geo_b[:, :4].long()
    top = torch.maximum(a[:, 0], b[:, 0])
    left = torch.maximum(a[:, 1], b[:, 1])
    bottom = torch.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    right = torch.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    return torch.stack([top, left, (bottom - top).clamp(min=0), (right - left).clamp(min=0)], dim=1)


def _inside_1d(start: torch.Tensor, length: torch.Tensor, i_start: torch.Tensor, i_length: torch.Tensor,
               grid: int) -> torch.Tensor:
    """(B,) crop interval [start, start + length) split into `grid` equal parts; (B, grid) mask of the parts
    with more than half their length inside [i_start, i_start + i_length). Scaled by `grid` so every
    boundary is an integer: part k spans [grid*start + k*length, grid*start + (k+1)*length)."""
    k = torch.arange(grid, device=start.device)
    p0 = grid * start[:, None] + k * length[:, None]
    p1 = p0 + length[:, None]
    i0 = (grid * i_start)[:, None]
    i1 = (grid * (i_start + i_length))[:, None]
    overlap = (torch.minimum(p1, i1) - torch.maximum(p0, i0)).clamp(min=0)
    return 2 * overlap > length[:, None]          # strictly more than half: exactly half is outside


def patches_inside(box_view: torch.Tensor, inter: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which patch rows / columns of a view lie in the intersection (§3.4, "more than half its width and height").

    box_view: (B, >=4) the view's crop [top, left, height, width]; inter: (B, 4) the intersection, same
    format (height or width 0: empty). The crop is resized to grid x grid patches, so patch (r, c) covers
    rows [top + r*h/grid, top + (r+1)*h/grid) and the matching columns of the original image.
    Returns (row_mask (B, grid), col_mask (B, grid)) bool; patch (r, c) is inside iff row_mask[r] & col_mask[c].
    """
    box, inter = box_view[:, :4].long(), inter[:, :4].long()
    rows = _inside_1d(box[:, 0], box[:, 2], inter[:, 0], inter[:, 2], grid)
    cols = _inside_1d(box[:, 1], box[:, 3], inter[:, 1], inter[:, 3], grid)
    return rows, cols


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, g) bool -> (B, g) indices of the True entries in ascending order first (the rest >= g)."""
    g = mask.shape[1]
    k = torch.arange(g, device=mask.device)
    return torch.where(mask, k, k + g).sort(dim=1).values


def _match_axis(mask_a: torch.Tensor, mask_b: torch.Tensor):
    """Match the inside rows (or columns) of two views along one axis (eqs. 2-5 with (G - 1)).

    Returns (pos_a (B, m), pos_b (B, m), count (B,)) with m = min(grid_a, grid_b): the first `count`
    entries are the matched index pairs, in order; the rest are clamped padding."""
    ga, gb = mask_a.shape[1], mask_b.shape[1]
    m = min(ga, gb)
    na, nb = mask_a.sum(1), mask_b.sum(1)
    small, large = torch.minimum(na, nb), torch.maximum(na, nb)
    i = torch.arange(m, device=mask_a.device)[None, :]
    sampled = (i * (large - 1).clamp(min=0)[:, None]) // (small - 1).clamp(min=1)[:, None]
    # the view with more entries is sampled; the one with fewer uses all of them (ties: identity either way)
    ka = torch.where((na > nb)[:, None], sampled, i).clamp(max=ga - 1)
    kb = torch.where((nb > na)[:, None], sampled, i).clamp(max=gb - 1)
    pos_a = _positions(mask_a).gather(1, ka).clamp(max=ga - 1)
    pos_b = _positions(mask_b).gather(1, kb).clamp(max=gb - 1)
    return pos_a, pos_b, small


def match_patches(geo_a: torch.Tensor, geo_b: torch.Tensor, grid_a: int, grid_b: int, trim: bool = False):
    """Per-sample patch correspondences between two views, vectorised over the batch (§3.4, Alg. 1 l. 10).

    geo_a, geo_b: (B, 5) [top, left, height, width, flipped] in original-image pixels (views.py).
    grid_a, grid_b: patches per side of each view (image size // ViT patch size).
    Returns (idx_a, idx_b, valid), each (B, M): flat patch-token indices r * grid + c into each view's
    patch tokens (no CLS offset; flipped views mirrored), and the mask of real pairs. Valid pairs come
    first, row-major over matched rows x matched columns; padding has index 0 and valid False.
    M = min(grid_a, grid_b)**2 (a static bound: no host sync), or the batch's largest count if `trim`.
    """
    if geo_a.shape != geo_b.shape or geo_a.dim() != 2 or geo_a.shape[1] < 5:
        raise ValueError(f"match_patches: geometries must both be (B, 5), got {tuple(geo_a.shape)} and {tuple(geo_b.shape)}")
    inter = intersect(geo_a, geo_b)
    rows_a, cols_a = patches_inside(geo_a, inter, grid_a)
    rows_b, cols_b = patches_inside(geo_b, inter, grid_b)
    ra, rb, n_rows = _match_axis(rows_a, rows_b)
    ca, cb, n_cols = _match_axis(cols_a, cols_b)
    # mirror AFTER matching: the flip only relabels columns of the resized crop (eq. 6)
    ca = torch.where(geo_a[:, 4:5].bool(), grid_a - 1 - ca, ca)
    cb = torch.where(geo_b[:, 4:5].bool(), grid_b - 1 - cb, cb)

    m = ra.shape[1]
    n_pairs = n_rows * n_cols
    M = m * m
    if trim:
        M = int(n_pairs.max()) if n_pairs.numel() else 0
    # pair p -> (p // n_cols, p % n_cols): the valid pairs are packed first, row-major
    p = torch.arange(M, device=geo_a.device)[None, :]
    nc = n_cols.clamp(min=1)[:, None]
    valid = p < n_pairs[:, None]
    ir = (p // nc).clamp(max=m - 1)
    ic = (p % nc).clamp(max=m - 1)
    idx_a = ra.gather(1, ir) * grid_a + ca.gather(1, ic)
    idx_b = rb.gather(1, ir) * grid_b + cb.gather(1, ic)
    return idx_a.masked_fill(~valid, 0), idx_b.masked_fill(~valid, 0), valid


def match_patches_shared(geo_a: torch.Tensor, geo_b: torch.Tensor, grid_a: int, grid_b: int):
    """The paper's batch-shared variant (§4.1.2): every image of a batch gets the same crop boxes, so
    matching runs once and its indices are broadcast. Uses sample 0's geometry for the whole batch (only
    correct if the loader shares boxes across the batch). Same outputs as `match_patches`, trimmed,
    expanded (no copy) to (B, M)."""
    B = geo_a.shape[0]
    ia, ib, valid = match_patches(geo_a[:1], geo_b[:1], grid_a, grid_b, trim=True)
    return ia.expand(B, -1), ib.expand(B, -1), valid.expand(B, -1)


# ---------------------------------------------------------------------------------------------------
# Independent brute force: one sample at a time, exact fractions, a literal reading of §3.4.

def _inside_ref(start: int, length: int, i0: int, i1: int, grid: int) -> list[int]:
    out = []
    for k in range(grid):
        p0 = start + Fraction(k * length, grid)
        p1 = start + Fraction((k + 1) * length, grid)
        overlap = max(Fraction(0), min(p1, Fraction(i1)) - max(p0, Fraction(i0)))
        if overlap > (p1 - p0) / 2:
            out.append(k)
    return out


def _pick_ref(n_small: int, n_large: int) -> list[int]:
    if n_small == 1:
        return [0]
    return [(i * (n_large - 1)) // (n_small - 1) for i in range(n_small)]


def _axis_ref(inside_a: list[int], inside_b: list[int]) -> list[tuple[int, int]]:
    if not inside_a or not inside_b:
        return []
    if len(inside_a) >= len(inside_b):
        return [(inside_a[j], inside_b[i]) for i, j in enumerate(_pick_ref(len(inside_b), len(inside_a)))]
    return [(inside_a[i], inside_b[j]) for i, j in enumerate(_pick_ref(len(inside_a), len(inside_b)))]


def match_patches_reference(geo_a, geo_b, grid_a: int, grid_b: int) -> list[list[tuple[int, int]]]:
    """Per-sample Python brute force of `match_patches` (tests, naive baseline): for each sample the list
    of matched (token index in a, token index in b), row-major over matched rows x matched columns."""
    out = []
    for ga_row, gb_row in zip(torch.as_tensor(geo_a).tolist(), torch.as_tensor(geo_b).tolist()):
        ta, la, ha, wa, fa = (int(v) for v in ga_row[:5])
        tb, lb, hb, wb, fb = (int(v) for v in gb_row[:5])
        top, bottom = max(ta, tb), min(ta + ha, tb + hb)
        left, right = max(la, lb), min(la + wa, lb + wb)
        if bottom <= top or right <= left:
            out.append([])
            continue
        rows = _axis_ref(_inside_ref(ta, ha, top, bottom, grid_a), _inside_ref(tb, hb, top, bottom, grid_b))
        cols = _axis_ref(_inside_ref(la, wa, left, right, grid_a), _inside_ref(lb, wb, left, right, grid_b))
        pairs = []
        for r_a, r_b in rows:
            for c_a, c_b in cols:
                c_a2 = grid_a - 1 - c_a if fa else c_a
                c_b2 = grid_b - 1 - c_b if fb else c_b
                pairs.append((r_a * grid_a + c_a2, r_b * grid_b + c_b2))
        out.append(pairs)
    return out
