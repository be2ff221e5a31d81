"""Intervals over training seeds and test images, paired differences, verdicts.

A run's accuracy varies with the training seed and with which test images were drawn. Each run gives a
correctness matrix C (seeds x test images; a semi-supervised protocol's entries are the share of its label
draws that got the image right). The 95 % interval is a two-level (hierarchical) percentile bootstrap:
each replicate resamples the seeds, then the test images, and recomputes the mean accuracy. The test images
are one set shared by every seed and run, so a replicate draws ONE image resample and applies it to all
seeds (and to both runs of a comparison: the difference is paired on images).

Seeds and images are crossed (every seed predicts every image), and a plain two-level bootstrap counts the
seed x image interaction twice: once in the image resample and again in the spread of the per-seed
accuracies, which include it (Owen 2007, "The pigeonhole bootstrap"). Measured on simulated pairs that made
intervals up to 1.5x too wide. So before the seeds are resampled, each seed's deviation from the seed mean is
scaled to the seed component alone: var_seed = between-seed variance - interaction variance / images (the
crossed two-way ANOVA moments), times S / (S - 1) for the bootstrap's shrinkage of S values. With 3 seeds the
seed component is estimated from 2 degrees of freedom: the interval's seed part is rough.

Seeds of two compared runs are paired by seed value when both ran the same seeds: the same seed gives the
same data order and augmentation draws (and the same backbone initialisation), so pairing removes what the
two runs share, and it stays valid if they share nothing. With different seed sets the seeds of each run are
resampled independently. With one seed the interval is over test images only, and is labelled so.

The replicates are drawn from a fixed-seed numpy Generator: the same inputs give the same interval.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
N_BOOT = 2000
CHUNK = 250  # replicates at once: CHUNK x images float32 weights in memory

BETTER, WORSE, SAME = "better", "worse", "no difference detectable at this budget"


@dataclass(frozen=True)
class Interval:
    """A mean (percent) with its 95 % interval; `over` says what was resampled."""
    mean: float
    lo: float
    hi: float
    seeds: int
    images: int

    @property
    def over(self) -> str:
        return over_label(self.seeds)


@dataclass(frozen=True)
class Difference(Interval):
    """Run minus base (percentage points), paired on test images; `paired_seeds` as described above."""
    paired_seeds: bool = True
    seeds_base: int = 1

    @property
    def verdict(self) -> str:
        return verdict(self.lo, self.hi)

    @property
    def over(self) -> str:
        return over_label(min(self.seeds, self.seeds_base))


def over_label(seeds: int) -> str:
    return "seeds and test images" if seeds > 1 else "test images only (1 seed)"


def verdict(lo: float, hi: float) -> str:
    """better / worse when the whole interval lies on one side of 0, else no difference detectable."""
    if lo > 0:
        return BETTER
    if hi < 0:
        return WORSE
    return SAME


def correct_matrix(predictions: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """(seeds, images) float32 in [0, 1]: 1 where a seed's prediction is right. A prediction may be a 2-D
    (draws, images) array (semi-supervised label draws): its entry is then the share of draws that are right."""
    labels = np.asarray(labels)
    rows = []
    for p in predictions:
        p = np.asarray(p)
        if p.shape[-1] != labels.shape[0]:
            raise ValueError(f"predictions cover {p.shape[-1]} test images, labels {labels.shape[0]}")
        rows.append((p == labels).reshape(-1, labels.shape[0]).mean(axis=0))
    return np.stack(rows).astype(np.float32)


class Bootstrap:
    """Replicate weights of the test images, drawn once and shared by every run and protocol of a report,
    so all intervals and differences rest on the same image resamples."""

    def __init__(self, n_images: int, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL):
        self.n_images, self.n_boot, self.level, self.seed = n_images, n_boot, level, seed
        rng = np.random.default_rng(seed)
        counts = np.empty((n_boot, n_images), dtype=np.uint8)  # a multinomial count above 255 has p ~ 0
        for start in range(0, n_boot, CHUNK):
            n = min(CHUNK, n_boot - start)
            flat = rng.integers(0, n_images, size=(n, n_images)) + np.arange(n)[:, None] * n_images
            counts[start:start + n] = np.bincount(flat.ravel(), minlength=n * n_images).reshape(n, n_images)
        self._counts = counts

    def per_seed(self, correct: np.ndarray) -> np.ndarray:
        """(n_boot, rows): each row's accuracy (%) on each image resample. Pass the rows of many runs at once:
        the replicate weights are then converted once for all of them."""
        correct = np.asarray(correct, dtype=np.float32)
        if correct.ndim != 2 or correct.shape[1] != self.n_images:
            raise ValueError(f"expected a (seeds, {self.n_images}) correctness matrix, got shape {correct.shape}")
        out = np.empty((self.n_boot, correct.shape[0]))
        for start in range(0, self.n_boot, CHUNK):
            w = self._counts[start:start + CHUNK].astype(np.float32)
            out[start:start + CHUNK] = (w @ correct.T.astype(np.float64)) * (100.0 / self.n_images)
        return out

    def _seed_weights(self, n_seeds: int, stream: int) -> np.ndarray:
        """(n_boot, seeds) resample counts of the seeds; a separate deterministic stream per purpose."""
        rng = np.random.default_rng([self.seed, 1 + stream])
        idx = rng.integers(0, n_seeds, size=(self.n_boot, n_seeds))
        return np.stack([(idx == s).sum(axis=1) for s in range(n_seeds)], axis=1) / n_seeds

    @staticmethod
    def _seed_scale(matrix: np.ndarray) -> float:
        """Factor on each seed's deviation so that resampling S deviations has the variance of the seed
        component alone (see the module docstring); 0 when the seeds differ by no more than the interaction."""
        m = np.asarray(matrix, dtype=np.float64)
        s, n = m.shape
        if s < 2:
            return 0.0
        seed_means = m.mean(axis=1)
        between = seed_means.var(ddof=1)
        if between == 0:
            return 0.0
        resid = m - seed_means[:, None] - m.mean(axis=0)[None, :] + m.mean()
        interaction = (resid ** 2).sum() / ((s - 1) * (n - 1)) if n > 1 else 0.0
        seed_var = max(0.0, between - interaction / n)
        return float(np.sqrt(s / (s - 1) * seed_var / between))

    def _resample_seeds(self, per_seed: np.ndarray, matrix: np.ndarray, stream: int) -> np.ndarray:
        """(n_boot,) replicates: per image resample, the seed mean plus resampled, scaled seed deviations."""
        centre = per_seed.mean(axis=1, keepdims=True)
        dev = (per_seed - centre) * self._seed_scale(matrix)
        return centre[:, 0] + (dev * self._seed_weights(per_seed.shape[1], stream)).sum(axis=1)

    def _bounds(self, reps: np.ndarray) -> tuple[float, float]:
        a = (1 - self.level) / 2
        lo, hi = np.quantile(reps, [a, 1 - a])
        return float(lo), float(hi)

    def accuracy(self, correct: np.ndarray, per_seed: np.ndarray | None = None) -> Interval:
        """Mean accuracy over seeds (%) and its interval over seeds and test images (`per_seed`: this matrix's
        `per_seed` when already computed)."""
        per_seed = self.per_seed(correct) if per_seed is None else per_seed
        reps = self._resample_seeds(per_seed, correct, 0)
        lo, hi = self._bounds(reps)
        mean = float(np.asarray(correct, dtype=np.float64).mean() * 100)
        return Interval(mean, min(lo, mean), max(hi, mean), per_seed.shape[1], self.n_images)

    def difference(self, correct: np.ndarray, base: np.ndarray, seeds: list[int] | None = None,
                   base_seeds: list[int] | None = None, per_seed: np.ndarray | None = None,
                   base_per_seed: np.ndarray | None = None) -> Difference:
        """Mean accuracy of `correct` minus that of `base` (points), with its interval. Seeds are paired when
        both lists are given and equal (rows in the same order), else resampled independently per run."""
        a = self.per_seed(correct) if per_seed is None else per_seed
        b = self.per_seed(base) if base_per_seed is None else base_per_seed
        paired = seeds is not None and base_seeds is not None and list(seeds) == list(base_seeds)
        if paired:
            reps = self._resample_seeds(a - b, np.asarray(correct, np.float64) - np.asarray(base, np.float64), 0)
        else:
            reps = self._resample_seeds(a, correct, 0) - self._resample_seeds(b, base, 1)
        lo, hi = self._bounds(reps)
        mean = float((np.asarray(correct, np.float64).mean() - np.asarray(base, np.float64).mean()) * 100)
        return Difference(mean, min(lo, mean), max(hi, mean), a.shape[1], self.n_images, paired, b.shape[1])
