"""SePP-ID semantic sampler: blockwise pair search, cap, random control, metrics, parquet round-trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.mining.io import read_pairs, read_pairs_meta, write_pairs
from pipeline.mining.pairs import mine_pairs, pair_metrics, random_pairs
from pipeline.params import DataError

LO, HI = 0.97, 0.99


def hand_built():
    """Each group lives in its own coordinates (cosine 0 across groups), so the pair set is known exactly.

    0-1   cos 0.98                        -> pair both ways
    2-5   2 with 3, 4, 5 at cos 0.98 each  -> 3 positives for anchor 2 (3, 4, 5 are at 0.98^2 = 0.9604 to each other)
    6-7   cos 0.995 (near-duplicate)      -> excluded
    8-9   cos 0.97 exactly (lower bound)  -> pair
    10-11 cos 0.99 exactly (upper bound)  -> pair
    12-13 cos 0.9699, 14-15 cos 0.9901    -> excluded (just outside)
    16-17 identical direction (cos 1)     -> excluded
    18    alone
    Rows are rescaled by arbitrary norms: only directions count.
    """
    D = 4 + 2 * 7 + 1
    x = np.zeros((19, D))

    def two(i, dim, c):
        x[i, dim] = 1.0
        x[i + 1, dim], x[i + 1, dim + 1] = c, np.sqrt(1 - c * c)

    two(0, 0, 0.98)
    x[2, 2] = 1.0
    for k, row in enumerate((3, 4, 5)):
        x[row, 2], x[row, 3 + k] = 0.98, np.sqrt(1 - 0.98 ** 2)
    for g, (i, c) in enumerate([(6, 0.995), (8, 0.97), (10, 0.99), (12, 0.9699), (14, 0.9901), (16, 1.0)]):
        two(i, 6 + 2 * g, c)
    x[18, 18] = 1.0
    x *= np.random.default_rng(0).uniform(0.5, 3.0, size=(19, 1))
    und = [(0, 1, 0.98), (2, 3, 0.98), (2, 4, 0.98), (2, 5, 0.98), (8, 9, 0.97), (10, 11, 0.99)]
    pairs = sorted([(i, j, s) for i, j, s in und] + [(j, i, s) for i, j, s in und])
    return x, pairs


def brute_force(x, lo, hi):
    """Reference: the whole K x K matrix in float64 (Algorithm 1 as printed), compared at float32 resolution."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = (xn @ xn.T).astype(np.float32)
    np.fill_diagonal(s, -2)
    a, p = np.nonzero((s >= np.float32(lo)) & (s <= np.float32(hi)))
    return a, p, s[a, p]


def planted(K, D, seed):
    """Random directions plus points planted at cosines in [0.5, 1] to a random other point."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(K, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(K // 2, K):
        j = rng.integers(0, K // 2)
        w = rng.normal(size=D)
        w -= (w @ x[j]) * x[j]
        t = rng.uniform(0.5, 1.0)
        x[i] = t * x[j] + np.sqrt(1 - t * t) * w / np.linalg.norm(w)
    return x * rng.uniform(0.1, 10, size=(K, 1))


def test_hand_built_exact_pairs():
    x, want = hand_built()
    a, p, s = mine_pairs(x, LO, HI)
    assert [(int(i), int(j)) for i, j in zip(a, p)] == [(i, j) for i, j, _ in want]
    np.testing.assert_allclose(s, [v for *_, v in want], atol=1e-6)
    assert s.dtype == np.float32 and a.dtype == p.dtype == np.int64
    assert not np.any(a == p)
    # boundaries inclusive: exactly lo and exactly hi are kept
    assert {(8, 9), (10, 11)} <= set(zip(a.tolist(), p.tolist()))
    assert np.all((s >= LO) & (s <= HI))


@pytest.mark.parametrize("cap", [0, 2])
def test_independent_of_block_size(cap):
    for x in (hand_built()[0], planted(97, 8, 1)):
        lo, hi = (LO, HI) if len(x) == 19 else (0.8, 0.95)
        ref = mine_pairs(x, lo, hi, block=len(x), max_per_anchor=cap)
        assert len(ref[0]) > 0
        for b in (1, 3, 7, 10_000):
            got = mine_pairs(x, lo, hi, block=b, max_per_anchor=cap)
            for r, g in zip(ref, got):
                np.testing.assert_array_equal(r, g)


def test_matches_brute_force_and_accepts_torch():
    x = planted(300, 16, 2)
    a, p, s = mine_pairs(x, 0.6, 0.95, block=64)
    ra, rp, rs = brute_force(x, 0.6, 0.95)
    assert len(a) > 200  # several positives per anchor on average
    np.testing.assert_array_equal(a, ra)
    np.testing.assert_array_equal(p, rp)
    np.testing.assert_allclose(s, rs, atol=1e-6)
    t = mine_pairs(torch.from_numpy(x).float(), 0.6, 0.95, block=50)
    np.testing.assert_array_equal(t[0], a)
    np.testing.assert_array_equal(t[1], p)


def test_matmul_precision_is_full_fp32_and_restored():
    """The block matmul runs at full float32 (no TF32: the candidate slack assumes a 24-bit mantissa),
    and the caller's precision setting comes back afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        x, want = hand_built()
        a, p, _ = mine_pairs(x, LO, HI, device="cpu")
        assert [(int(i), int(j)) for i, j in zip(a, p)] == [(i, j) for i, j, _ in want]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cap", [0, 3])
def test_gpu_mines_exactly_the_cpu_pairs(cap):
    """Candidates found on the GPU, re-scored on the CPU: identical pairs and similarities to a CPU run,
    for any block size (planted points put many cosines right at the bounds' neighbourhood)."""
    for x, lo, hi in ((hand_built()[0], LO, HI), (planted(3000, 64, 5), 0.8, 0.95), (planted(2000, 512, 6), 0.7, 0.9)):
        ref = mine_pairs(x, lo, hi, block=256, max_per_anchor=cap, device="cpu")
        assert len(ref[0]) > 0
        for b in (97, 1024):
            got = mine_pairs(x, lo, hi, block=b, max_per_anchor=cap, device="cuda")
            for r, g in zip(ref, got):
                np.testing.assert_array_equal(r, g)


def test_cap_keeps_top_m_with_index_ties():
    x = planted(200, 12, 3)
    a, p, s = mine_pairs(x, 0.55, 0.98)
    m = 3
    ca, cp, cs = mine_pairs(x, 0.55, 0.98, block=17, max_per_anchor=m)
    want = []
    for anc in np.unique(a):
        sel = np.nonzero(a == anc)[0]
        top = sorted(sel, key=lambda k: (-s[k], p[k]))[:m]
        want += sorted((anc, p[k]) for k in top)
    assert list(zip(ca.tolist(), cp.tolist())) == [(int(i), int(j)) for i, j in want]
    assert np.bincount(ca).max() == m
    # anchor 2 has three positives at an identical 0.98: the cap keeps the lower indices
    ha, hp, _ = mine_pairs(hand_built()[0], LO, HI, max_per_anchor=2)
    assert hp[ha == 2].tolist() == [3, 4]


def test_pair_metrics_accuracy_and_histogram():
    x, _ = hand_built()
    labels = np.zeros(19, int)
    labels[[4, 5, 9]] = 1  # pairs 2-4, 2-5, 8-9 cross labels (both directions: 6 of 12)
    a, p, s = mine_pairs(x, LO, HI)
    m = pair_metrics(a, p, labels, K=19, sims=s, bins=np.linspace(LO, HI, 5))
    assert m["pairs"] == 12 and m["anchors_covered"] == 10 and m["K"] == 19
    assert m["pair_accuracy"] == pytest.approx(6 / 12)
    assert m["anchors_covered_frac"] == pytest.approx(10 / 19)
    assert m["mean_positives_per_anchor"] == pytest.approx(12 / 10) and m["max_positives_per_anchor"] == 3
    assert sum(m["similarity_hist"]["counts"]) == 12 and m["warning"] is None
    dense = pair_metrics(np.zeros(60, int), np.arange(1, 61), None, K=61)
    assert dense["pair_accuracy"] is None and "cap" in dense["warning"]
    empty = pair_metrics(np.empty(0, int), np.empty(0, int), labels, K=19)
    assert empty["pairs"] == 0 and empty["pair_accuracy"] is None


def test_random_pairs():
    a, p = random_pairs(500, 40, seed=7)
    assert len(a) == 500 and not np.any(a == p)
    assert a.min() >= 0 and max(a.max(), p.max()) < 40
    assert len(np.unique(a * 40 + p)) == 500  # no repeated pair
    b, q = random_pairs(500, 40, seed=7)
    np.testing.assert_array_equal(a, b), np.testing.assert_array_equal(p, q)
    assert not np.array_equal(random_pairs(500, 40, seed=8)[0], a)
    full = random_pairs(40 * 39, 40, seed=0)
    assert len(full[0]) == 40 * 39 and not np.any(full[0] == full[1])
    sa, sp = random_pairs(30, 40, seed=1, same_image=True)  # the paper's Table 9: copies of one image
    np.testing.assert_array_equal(sa, sp)
    assert len(np.unique(sa)) == 30


def test_invalid_inputs():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="lo"):
        mine_pairs(x, 0.99, 0.97)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        mine_pairs(x, 0.5, 0.9)
    assert len(mine_pairs(np.ones((1, 3)), 0.5, 0.9)[0]) == 0


def test_parquet_round_trip_and_errors(tmp_path):
    x, _ = hand_built()
    a, p, s = mine_pairs(x, LO, HI)
    keys = [f"train/{i:06d}" for i in range(19)]
    path = write_pairs(tmp_path / "mine" / "pairs.parquet", a, p, s, keys=keys, meta={"lo": LO, "hi": HI, "K": 19})
    df = read_pairs(path)
    np.testing.assert_array_equal(df.anchor.to_numpy(), a)
    np.testing.assert_array_equal(df.positive.to_numpy(), p)
    np.testing.assert_array_equal(df.similarity.to_numpy(), s)
    assert df.anchor_key.tolist() == [keys[i] for i in a]
    assert read_pairs_meta(path) == {"lo": LO, "hi": HI, "K": 19}
    assert not list(path.parent.glob("*.tmp"))  # written via a temp file that was renamed
    plain = write_pairs(tmp_path / "plain.parquet", a, p, s)
    assert list(read_pairs(plain).columns) == ["anchor", "positive", "similarity"] and read_pairs_meta(plain) == {}

    for bad, why in [(tmp_path / "absent.parquet", "missing"), (tmp_path / "junk.parquet", "corrupt")]:
        if why == "corrupt":
            bad.write_bytes(b"PAR1 not really parquet\n\n")
        with pytest.raises(DataError) as e:
            read_pairs(bad)
        assert str(bad) in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


def test_memory_bounded_by_block(monkeypatch):
    """Design §3.2: the K x K matrix is never formed; every similarity block is at most block x K."""
    import pipeline.mining.pairs as pairs_mod

    shapes, real_mm = [], torch.mm

    def spy(a, b, out=None):
        shapes.append((a.shape[0], b.shape[1]))
        return real_mm(a, b, out=out)

    monkeypatch.setattr(pairs_mod.torch, "mm", spy)
    x = planted(120, 8, 4)
    got = mine_pairs(x, 0.8, 0.95, block=16)
    assert len(shapes) == 8 and max(r * c for r, c in shapes) <= 16 * 120
    monkeypatch.undo()
    for r, g in zip(mine_pairs(x, 0.8, 0.95, block=120), got):
        np.testing.assert_array_equal(r, g)
