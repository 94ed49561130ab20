"""Paired bootstrap over chunks: is candidate A really closer to the reference than candidate B?

Tokens within one chunk of text are correlated (they share the context), so the resampling
units are whole chunks: both candidates are scored on the same chunks, and each resample draws
chunk indices with replacement and recomputes the difference of the two pooled statistics.
"""
from __future__ import annotations

import math

import numpy as np


def paired_bootstrap(a_sums, b_sums, counts, *, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Percentile-bootstrap confidence interval of ``sum(a) / sum(n) - sum(b) / sum(n)``.

    .. math::

        \\Delta = \\frac{\\sum_c a_c}{\\sum_c n_c} - \\frac{\\sum_c b_c}{\\sum_c n_c}

    with ``a_c``, ``b_c`` the per-chunk sums of a per-token quantity (KL, flips) of candidates A
    and B on chunk c and ``n_c`` its token count. Each of ``n_resamples`` resamples draws the
    chunks with replacement (the same draw for A and B: paired); the interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled differences.

    Returns ``{"diff", "ci_low", "ci_high", "se", "confidence", "n_chunks", "n_resamples",
    "share_a_lower"}`` (``se`` the bootstrap standard deviation; ``share_a_lower`` the share of
    resamples where A's statistic is below B's). Fewer than two chunks: the interval is nan.
    Infinite sums (an infinite KL somewhere) give an infinite or nan difference and a nan interval.

    >>> r = paired_bootstrap([1.0, 2.0, 1.5, 1.2], [2.0, 2.5, 2.5, 2.0], [10, 10, 10, 10], seed=1)
    >>> round(r["diff"], 4), r["ci_high"] < 0    # A's mean is lower: the interval excludes 0
    (-0.0825, True)
    """
    a = np.asarray(a_sums, dtype=np.float64).reshape(-1)
    b = np.asarray(b_sums, dtype=np.float64).reshape(-1)
    n = np.asarray(counts, dtype=np.float64).reshape(-1)
    if not (a.shape == b.shape == n.shape):
        raise ValueError(f"a_sums, b_sums and counts need one entry per chunk, got shapes {a.shape}, "
                         f"{b.shape}, {n.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    c = a.size
    total = n.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = float((a.sum() - b.sum()) / total) if total > 0 else math.nan
    out = {"diff": diff, "ci_low": math.nan, "ci_high": math.nan, "se": math.nan,
           "confidence": confidence, "n_chunks": int(c), "n_resamples": int(n_resamples),
           "share_a_lower": math.nan}
    if c < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()) or total <= 0:
        return out
    rng = np.random.default_rng(seed)
    d = a - b
    stats = np.empty(n_resamples)
    step = max(1, (1 << 22) // c)  # bounded memory for the index matrix
    for s in range(0, n_resamples, step):
        e = min(n_resamples, s + step)
        idx = rng.integers(0, c, size=(e - s, c))
        nn = n[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats[s:e] = d[idx].sum(axis=1) / nn
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return out
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    out.update(ci_low=float(lo), ci_high=float(hi), se=float(stats.std(ddof=1)) if stats.size > 1 else math.nan,
               share_a_lower=float((stats < 0).mean()))
    return out
