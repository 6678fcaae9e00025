"""loopfm.stats: the user bootstrap resamples the reported quantity (the mean over seeds of the
per-seed ΔAUC), the same one the seed t-test is about; with one seed it is the plain ΔAUC."""
from __future__ import annotations

import numpy as np
import pytest

from loopfm import metrics as M
from loopfm.stats import paired_bootstrap_auc, weighted_auc


def _seeds(n=1500, users=200, seeds=3, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    y = (rng.random(n) < 0.25).astype(np.int64)
    y[:2] = [0, 1]
    a = np.stack([1 / (1 + np.exp(-(1.0 * y + rng.standard_normal(n) - 1))) for _ in range(seeds)])
    b = np.stack([1 / (1 + np.exp(-(0.5 * y + rng.standard_normal(n) - 1))) for _ in range(seeds)])
    return y, u, a, b


def test_one_resample_is_the_mean_over_seeds_of_the_per_seed_delta():
    y, u, a, b = _seeds()
    lo, hi, mean = paired_bootstrap_auc(y, a, b, u, n_boot=1, seed=9)
    assert lo == hi == mean
    # the same draw, by hand: users with replacement -> a weight per row
    uniq, gid = np.unique(u, return_inverse=True)
    draws = np.random.default_rng(9).integers(0, uniq.size, size=(1, uniq.size))
    w = np.bincount(draws.ravel(), minlength=uniq.size)[gid]
    by_hand = np.mean([weighted_auc(y, a[s], w) - weighted_auc(y, b[s], w) for s in range(3)])
    assert mean == pytest.approx(by_hand, abs=1e-12)
    # ... which is not the ΔAUC of the seed-averaged predictions (an ensemble)
    ensemble = weighted_auc(y, a.mean(0), w) - weighted_auc(y, b.mean(0), w)
    assert abs(mean - ensemble) > 1e-4


def test_interval_covers_the_reported_delta_and_one_seed_is_the_plain_delta():
    y, u, a, b = _seeds()
    reported = np.mean([M.auc(y, a[s]) - M.auc(y, b[s]) for s in range(3)])
    lo, hi, mean = paired_bootstrap_auc(y, a, b, u, n_boot=300)
    assert lo < reported < hi and abs(mean - reported) < (hi - lo) / 4
    assert paired_bootstrap_auc(y, a[:1], b[:1], u, n_boot=50) == paired_bootstrap_auc(y, a[0], b[0], u, n_boot=50)
    with pytest.raises(ValueError, match="pair up seed by seed"):
        paired_bootstrap_auc(y, a, b[:2], u, n_boot=5)
