"""The report's intervals: hand-checked cases and coverage on simulated pairs with a known true difference."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.report import stats


def test_correct_matrix_by_hand():
    labels = np.array([0, 1, 2, 3])
    c = stats.correct_matrix([np.array([0, 1, 0, 0]), np.array([0, 0, 2, 3])], labels)
    assert c.tolist() == [[1, 1, 0, 0], [1, 0, 1, 1]]
    # semi-supervised label draws: the share of draws that got each image right
    draws = np.array([[0, 1, 2, 0], [0, 0, 2, 0]])
    assert stats.correct_matrix([draws], labels).tolist() == [[1, 0.5, 1, 0]]
    with pytest.raises(ValueError, match="3 test images, labels 4"):
        stats.correct_matrix([np.zeros(3)], labels)


def test_identical_predictions_give_zero_and_a_degenerate_interval():
    rng = np.random.default_rng(1)
    c = (rng.random((3, 500)) < 0.6).astype(np.float32)
    d = stats.Bootstrap(500, n_boot=300).difference(c, c.copy(), [0, 1, 2], [0, 1, 2])
    assert (d.mean, d.lo, d.hi) == (0.0, 0.0, 0.0)
    assert d.verdict == stats.SAME and d.paired_seeds


def test_accuracy_mean_and_interval_by_hand():
    # every seed right on the same 3 of 4 images: no seed spread, so the interval is the image bootstrap's
    c = np.array([[1, 1, 1, 0]] * 3, dtype=np.float32)
    iv = stats.Bootstrap(4, n_boot=4000).accuracy(c)
    assert iv.mean == 75.0 and iv.seeds == 3 and iv.over == "seeds and test images"
    # right images in a resample ~ Binomial(4, 3/4): P(0) = 0.4 %, P(<= 1) = 5.1 %, P(4) = 31.6 %, so the
    # 2.5 % and 97.5 % quantiles are 1 and 4 right images
    assert iv.lo == pytest.approx(25.0) and iv.hi == pytest.approx(100.0)
    # a constant matrix has nothing to resample
    assert stats.Bootstrap(4, n_boot=100).accuracy(np.ones((2, 4))) == stats.Interval(100.0, 100.0, 100.0, 2, 4)


def test_interval_matches_the_binomial_half_width_for_one_seed():
    # one seed, 10,000 images at 37 %: the 95 % half-width is 1.96 * sqrt(p(1-p)/n) = 0.946 points
    n = 10_000
    c = np.zeros((1, n), dtype=np.float32)
    c[0, :3700] = 1
    iv = stats.Bootstrap(n, n_boot=2000).accuracy(c)
    assert iv.over == "test images only (1 seed)"
    assert iv.mean == pytest.approx(37.0)
    assert (iv.hi - iv.lo) / 2 == pytest.approx(0.946, abs=0.06)


def test_clear_differences_are_better_and_worse():
    rng = np.random.default_rng(2)
    n = 2000
    u = rng.random(n)
    base = np.stack([(u < 0.50 + e) for e in (0.0, 0.01, -0.01)]).astype(np.float32)
    ours = np.stack([(u < 0.60 + e) for e in (0.0, 0.01, -0.01)]).astype(np.float32)
    boot = stats.Bootstrap(n, n_boot=500)
    up = boot.difference(ours, base, [0, 1, 2], [0, 1, 2])
    assert up.mean == pytest.approx(10.0, abs=0.5) and up.lo > 5 and up.verdict == stats.BETTER
    down = boot.difference(base, ours, [0, 1, 2], [0, 1, 2])
    assert down.mean == -up.mean and down.verdict == stats.WORSE


def test_single_seed_runs_and_unequal_seeds():
    rng = np.random.default_rng(3)
    a = (rng.random((1, 800)) < 0.55).astype(np.float32)
    b = (rng.random((3, 800)) < 0.5).astype(np.float32)
    boot = stats.Bootstrap(800, n_boot=400)
    d = boot.difference(a, b, [0], [0, 1, 2])
    assert not d.paired_seeds and d.over == "test images only (1 seed)"
    assert d.mean == pytest.approx(100 * (a.mean() - b.mean()), abs=1e-4) and d.lo < d.mean < d.hi
    one = boot.difference(a, b[:1], [0], [0])
    assert one.paired_seeds and one.seeds == 1


def test_deterministic():
    c = (np.random.default_rng(4).random((3, 300)) < 0.4).astype(np.float32)
    assert stats.Bootstrap(300, n_boot=200).accuracy(c) == stats.Bootstrap(300, n_boot=200).accuracy(c)


def _simulated_pair(rng, n, seeds, true_a, true_b, seed_sd, noise):
    """Correctness of two runs on n fresh test images: an image is right for a seed when its difficulty u
    (uniform) plus per-seed noise (uniform +-noise) is below the run's threshold, shifted per seed. With the
    thresholds inside [noise, 1 - noise] a seed's expected accuracy is exactly its threshold."""
    u = rng.random(n)

    def run(t):
        shift = rng.normal(0, seed_sd, seeds)
        return np.stack([(u + rng.uniform(-noise, noise, n) < t + s) for s in shift]).astype(np.float32)
    return run(true_a), run(true_b)


def test_seed_scale_removes_the_interaction():
    # seeds that differ only by a constant shift: no interaction, all between-seed spread is the seed
    # component, scaled by sqrt(S / (S - 1)) for the bootstrap's shrinkage of S values
    m = np.array([[0.5, 0.0, 0.5, 0.0], [1.0, 0.5, 1.0, 0.5]])  # e.g. semi-supervised shares of draws
    assert stats.Bootstrap._seed_scale(m) == pytest.approx(np.sqrt(2))
    # seeds with the same accuracy that disagree image by image: pure interaction, nothing to resample
    assert stats.Bootstrap._seed_scale(np.array([[1.0, 0.0], [0.0, 1.0]])) == 0.0
    assert stats.Bootstrap._seed_scale(np.ones((1, 5))) == 0.0


# the seed x image interaction (noise) dominates as on real runs; without the scaling of the seed
# deviations the 3-seed case covered 99.7 % with intervals 1.5x too wide
@pytest.mark.parametrize("seeds,seed_sd", [(1, 0.0), (3, 0.003)])
def test_coverage_on_simulated_pairs(seeds, seed_sd):
    # true difference 2 points; 300 simulated experiments; the 95 % interval should cover it ~95 % of the
    # time (binomial sd of the rate over 300 trials: 1.3 points, so 0.90-0.99 is a 4-sd band)
    rng = np.random.default_rng(5)
    n, trials, covered = 1000, 300, 0
    ids = list(range(seeds))
    for t in range(trials):
        a, b = _simulated_pair(rng, n, seeds, 0.45, 0.43, seed_sd, noise=0.2)
        d = stats.Bootstrap(n, n_boot=400, seed=t).difference(a, b, ids, ids)
        covered += d.lo <= 2.0 <= d.hi
    assert 0.90 <= covered / trials <= 0.99
