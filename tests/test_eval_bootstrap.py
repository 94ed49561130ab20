"""kldiv.eval.paired_bootstrap: coverage at the nominal rate in a simulation, and its edge cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kldiv.eval import paired_bootstrap


def test_coverage_at_nominal_rate():
    """Chunks with a shared (paired) effect, skewed token noise and unequal lengths: the 95%
    interval covers the true difference of the pooled means in about 95% of the repetitions."""
    rng = np.random.default_rng(12345)
    reps, chunks = 300, 40
    true_a, true_b = 0.020, 0.017
    covered = 0
    for r in range(reps):
        n = rng.integers(30, 90, chunks).astype(float)
        shared = rng.lognormal(-5.0, 0.8, chunks)           # chunk difficulty, both candidates
        a = n * (true_a + shared - np.exp(-5.0 + 0.32) + rng.gamma(2.0, 0.002, chunks) - 0.004)
        b = n * (true_b + shared - np.exp(-5.0 + 0.32) + rng.gamma(2.0, 0.002, chunks) - 0.004)
        res = paired_bootstrap(a, b, n, n_resamples=400, seed=r)
        covered += res["ci_low"] <= true_a - true_b <= res["ci_high"]
    rate = covered / reps
    # binomial sd at 300 repetitions is 0.0126; the percentile bootstrap with 40 chunks runs a
    # little below nominal
    assert 0.90 <= rate <= 0.985, rate


def test_point_estimate_and_pairing():
    a = np.array([1.0, 5.0, 2.0, 8.0])
    b = a + 0.5  # B is worse by exactly 0.5 per chunk: the paired interval is a point
    n = np.array([10.0, 10.0, 10.0, 10.0])
    r = paired_bootstrap(a, b, n, n_resamples=500)
    assert r["diff"] == pytest.approx(-0.05)
    assert r["ci_low"] == pytest.approx(-0.05) and r["ci_high"] == pytest.approx(-0.05)
    assert r["share_a_lower"] == 1.0


def test_bootstrap_matches_direct_resampling():
    """The resampled statistic equals an independent loop over the same index draws."""
    rng = np.random.default_rng(1)
    a, b, n = rng.random(7), rng.random(7), rng.integers(1, 5, 7).astype(float)
    r = paired_bootstrap(a, b, n, n_resamples=300, seed=7, confidence=0.8)
    gen = np.random.default_rng(7)
    idx = gen.integers(0, 7, size=(300, 7))
    stats = [(a[i].sum() - b[i].sum()) / n[i].sum() for i in idx]
    lo, hi = np.quantile(stats, [0.1, 0.9])
    assert r["ci_low"] == pytest.approx(lo, rel=1e-12) and r["ci_high"] == pytest.approx(hi, rel=1e-12)
    assert r["se"] == pytest.approx(np.std(stats, ddof=1), rel=1e-12)


def test_edges():
    r = paired_bootstrap([1.0], [2.0], [3.0])
    assert r["diff"] == pytest.approx(-1 / 3) and math.isnan(r["ci_low"])
    r = paired_bootstrap([1.0, np.inf], [2.0, 1.0], [3.0, 3.0])
    assert r["diff"] == math.inf and math.isnan(r["ci_high"])
    with pytest.raises(ValueError, match="one entry per chunk"):
        paired_bootstrap([1.0, 2.0], [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], [1.0, 1.0], confidence=1.5)
