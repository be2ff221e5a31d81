"""PW-Self patch matching (vectorised vs brute force, the paper's worked example, flips, borders) and
patch-level augmentation."""
from __future__ import annotations

import pytest
import torch

from pipeline.data.patch_augment import OPS, PatchAugment, _hue_matrix, patch_augment
from pipeline.data.patch_matching import (intersect, match_patches, match_patches_reference,
                                             match_patches_shared, patches_inside)


def geo(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def pairs(idx_a, idx_b, valid, i=0) -> list[tuple[int, int]]:
    v = valid[i]
    return list(zip(idx_a[i][v].tolist(), idx_b[i][v].tolist()))


# global crop rows/cols [0, 80), grid 8 -> 10 px patches. Local crop rows [40, 92), cols [20, 80), grid 4
# -> 13 x 15 px patches. Intersection rows [40, 80): local rows 0-2 (row 3 has 1 px of 13 inside),
# global rows 4-7; cols [20, 80): local cols 0-3, global cols 2-7. So 3 x 4 local vs 4 x 6 global (Fig. 2).
GLOBAL = (0, 0, 80, 80, 0)
LOCAL = (40, 20, 52, 60, 0)


def expected_example(flip_g=False, flip_l=False):
    g_rows = [4 + r for r in (0, 1, 3)]              # 1-based rows 1, 2, 4 of the intersection
    g_cols = [2 + c for c in (0, 1, 3, 5)]           # 1-based cols 1, 2, 4, 6
    out = []
    for lr, gr in zip(range(3), g_rows):
        for lc, gc in zip(range(4), g_cols):
            gc = 7 - gc if flip_g else gc
            lc = 3 - lc if flip_l else lc
            out.append((gr * 8 + gc, lr * 4 + lc))
    return out


def test_worked_example_selects_rows_124_and_cols_1246():
    rows_g, cols_g = patches_inside(geo(GLOBAL), intersect(geo(GLOBAL), geo(LOCAL)), 8)
    rows_l, cols_l = patches_inside(geo(LOCAL), intersect(geo(GLOBAL), geo(LOCAL)), 4)
    assert rows_g[0].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert cols_g[0].nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7]
    assert rows_l[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert cols_l[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    ia, ib, valid = match_patches(geo(GLOBAL), geo(LOCAL), 8, 4)
    assert valid.shape == (1, 16) and int(valid.sum()) == 12
    assert pairs(ia, ib, valid) == expected_example()
    # symmetric: swapping the views swaps the pairs
    ia, ib, valid = match_patches(geo(LOCAL), geo(GLOBAL), 4, 8)
    assert pairs(ia, ib, valid) == [(b, a) for a, b in expected_example()]
    assert match_patches_reference(geo(GLOBAL), geo(LOCAL), 8, 4) == [expected_example()]


@pytest.mark.parametrize("flip_g,flip_l", [(1, 0), (0, 1), (1, 1)])
def test_flip_mirrors_column_index(flip_g, flip_l):
    g = geo(GLOBAL[:4] + (flip_g,))
    l_ = geo(LOCAL[:4] + (flip_l,))
    ia, ib, valid = match_patches(g, l_, 8, 4)
    assert pairs(ia, ib, valid) == expected_example(bool(flip_g), bool(flip_l))


def test_exactly_half_is_not_inside():
    # crop [0, 40), grid 4 -> 10 px patches; intersection [15, 40): patch 1 ([10, 20)) has exactly 5 px inside
    box = geo((0, 0, 40, 40))
    inter = geo((15, 14, 25, 26))     # cols [14, 40): patch 1 has 6 px inside -> in
    rows, cols = patches_inside(box, inter, 4)
    assert rows[0].tolist() == [False, False, True, True]
    assert cols[0].tolist() == [False, True, True, True]
    # non-integer patch edges: crop 0..10, grid 4 -> 2.5 px patches; [0, 2) holds 2 of 2.5 px -> in,
    # [0, 1) holds 1 of 2.5 -> out; [5, 10) -> patches 2, 3 exactly
    assert patches_inside(geo((0, 0, 10, 10)), geo((0, 0, 2, 1)), 4)[0][0].tolist() == [True, False, False, False]
    assert patches_inside(geo((0, 0, 10, 10)), geo((0, 0, 2, 1)), 4)[1][0].tolist() == [False] * 4
    assert patches_inside(geo((0, 0, 10, 10)), geo((5, 0, 5, 10)), 4)[0][0].tolist() == [False, False, True, True]


def test_no_overlap_gives_no_pairs():
    a = geo((0, 0, 20, 20, 0), (0, 0, 20, 20, 1), (0, 0, 20, 20, 0))
    b = geo((30, 0, 10, 10, 0), (0, 20, 20, 20, 0), (19, 19, 10, 10, 0))   # apart; touching; 1 px corner
    ia, ib, valid = match_patches(a, b, 8, 4)
    assert not valid.any()
    assert (ia == 0).all() and (ib == 0).all()
    assert match_patches_reference(a, b, 8, 4) == [[], [], []]
    # trim: a batch with no pairs at all has M = 0
    assert match_patches(a, b, 8, 4, trim=True)[2].shape == (3, 0)


def test_single_row_or_column():
    # L = 1: the local view has one row inside (rows [0, 10) of a crop of height 40, grid 4 -> 1 of 4);
    # the global has 2 rows there -> only the first is matched
    g = geo((0, 0, 20, 40, 0))          # grid 2 -> 10 px rows, 20 px cols
    l_ = geo((10, 0, 40, 40, 0))        # grid 4 -> 10 px rows/cols; intersection rows [10, 20)
    ia, ib, valid = match_patches(g, l_, 2, 4)
    assert int(valid.sum()) == 2         # 1 row pair x 2 column pairs
    got = pairs(ia, ib, valid)
    assert got == match_patches_reference(g, l_, 2, 4)[0]
    assert [a // 2 for a, _ in got] == [1, 1] and [b // 4 for _, b in got] == [0, 0]
    # G = 1 vs L = 1 along both axes: a single patch each
    ia, ib, valid = match_patches(geo((0, 0, 10, 10, 0)), geo((0, 0, 10, 10, 1)), 1, 1)
    assert pairs(ia, ib, valid) == [(0, 0)]
    # larger grid with one row inside vs several: first of the larger is matched
    g = geo((0, 0, 80, 80, 0))
    l_ = geo((70, 0, 80, 80, 0))        # intersection rows [70, 80): global row 7, local row 0 (20 px, 10 in -> out)
    ia, ib, valid = match_patches(g, l_, 8, 4)
    assert not valid.any()
    assert match_patches_reference(g, l_, 8, 4) == [[]]


def random_geometry(n: int, gen: torch.Generator, size: int = 64) -> torch.Tensor:
    h = torch.randint(1, size + 1, (n,), generator=gen)
    w = torch.randint(1, size + 1, (n,), generator=gen)
    top = (torch.rand(n, generator=gen) * (size - h + 1)).long()
    left = (torch.rand(n, generator=gen) * (size - w + 1)).long()
    flip = torch.randint(0, 2, (n,), generator=gen)
    return torch.stack([top, left, h, w, flip], 1).int()


@pytest.mark.parametrize("grid_a,grid_b", [(8, 4), (4, 8), (8, 8), (7, 3), (1, 5)])
def test_vectorised_equals_brute_force(grid_a, grid_b):
    gen = torch.Generator().manual_seed(grid_a * 10 + grid_b)
    a, b = random_geometry(200, gen), random_geometry(200, gen)
    ia, ib, valid = match_patches(a, b, grid_a, grid_b)
    ref = match_patches_reference(a, b, grid_a, grid_b)
    assert valid.shape[1] == min(grid_a, grid_b) ** 2
    for i in range(len(ref)):
        assert pairs(ia, ib, valid, i) == ref[i], f"sample {i}: {a[i].tolist()} {b[i].tolist()}"
        n = len(ref[i])
        assert valid[i, :n].all() and not valid[i, n:].any()     # valid pairs packed first
    assert any(ref) and not all(ref)                              # the draw covers both cases
    ta, tb, tv = match_patches(a, b, grid_a, grid_b, trim=True)
    assert tv.shape[1] == max(len(r) for r in ref)
    assert torch.equal(ta, ia[:, :tv.shape[1]]) and torch.equal(tv, valid[:, :tv.shape[1]])
    assert int(ia.max()) < grid_a ** 2 and int(ib.max()) < grid_b ** 2


def test_shared_variant_broadcasts_sample_zero():
    gen = torch.Generator().manual_seed(1)
    a, b = random_geometry(5, gen), random_geometry(5, gen)
    a[0], b[0] = torch.tensor(GLOBAL, dtype=torch.int32), torch.tensor(LOCAL, dtype=torch.int32)
    ia, ib, valid = match_patches_shared(a, b, 8, 4)
    assert ia.shape == (5, 12)
    for i in range(5):
        assert pairs(ia, ib, valid, i) == expected_example()


# ------------------------------------------------------------------ patch-level augmentation

def test_patch_augment_changes_only_selected_patches():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    out, masks = patch_augment(x, 4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), return_masks=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    any_op = torch.zeros(3, 4, 4, dtype=torch.bool)
    for op in OPS:
        assert masks[op].shape == (3, 4, 4)
        any_op |= masks[op]
    assert any_op.any() and not any_op.all()
    changed = (out != x).reshape(3, 3, 4, 4, 4, 4).any(dim=(1, 3, 5))        # (B, g, g)
    assert not (changed & ~any_op).any()                                     # untouched patches are identical
    # each op alone changes exactly the patches it selects (noise on a non-constant image changes every pixel)
    for op, kw in {"noise": dict(noise_std=0.3), "jitter": dict(), "solarize": dict(solarize_threshold=0.0),
                   "blur": dict(blur_sigma=(1.0, 2.0))}.items():   # sigma 0.1 is ~identity
        probs = {f"{o}_p": (0.5 if o == op else 0.0) for o in OPS}
        img = torch.rand(2, 3, 16, 16)
        o, m = patch_augment(img, 4, return_masks=True, **probs, **kw)
        ch = (o != img).reshape(2, 3, 4, 4, 4, 4).any(dim=(1, 3, 5))
        assert torch.equal(ch, m[op]), op


def test_patch_augment_deterministic_and_disabled():
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    a = patch_augment(x, 8)
    torch.manual_seed(3)
    b = PatchAugment()(x, 8)
    assert torch.equal(a, b)
    torch.manual_seed(4)
    assert not torch.equal(a, patch_augment(x, 8))
    assert patch_augment(x, 8, enabled=False) is x
    assert PatchAugment(enabled=False)(x, 8) is x
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(patch_augment(x, 8, generator=g1), patch_augment(x, 8, generator=g2))
    with pytest.raises(ValueError, match="divisible"):
        patch_augment(x, 5)


def test_patch_blur_stays_inside_its_patch():
    # a single bright pixel at a patch corner: blurring the neighbouring patch must not pick it up
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 3] = 1.0
    o, m = patch_augment(x, 2, jitter_p=0, solarize_p=0, noise_p=0, blur_p=1.0, return_masks=True)
    assert m["blur"].all()
    assert o[0, 0, :4, :4].sum() == pytest.approx(1.0, abs=1e-5)            # mass kept in its own patch
    assert o[0, 0, 3, 3] < 1.0 and o[0, 0, :4, 4:].abs().max() == 0 and o[0, 0, 4:].abs().max() == 0


def test_hue_rotation_keeps_grey_and_luma():
    m = _hue_matrix(torch.tensor([0.0, 1.0, -2.0]))
    assert torch.allclose(m[0], torch.eye(3), atol=1e-5)
    grey = torch.full((3, 1), 0.4)
    assert torch.allclose(m @ grey, grey.expand(3, 3, 1), atol=1e-5)        # no chroma: nothing to rotate
    luma = torch.tensor([0.299, 0.587, 0.114])
    rgb = torch.tensor([[0.9], [0.2], [0.4]])
    assert torch.allclose(luma @ (m @ rgb), (luma @ rgb).expand(3, 1), atol=1e-4)
