"""Summary statistics of per-token values, as llama.cpp's ``llama-perplexity --kl-divergence`` prints.

Conventions (llama.cpp's ``kl_divergence`` in tools/perplexity/perplexity.cpp):

- mean with its standard error ``sqrt(var / (n - 1))``, var the population variance (n >= 2);
- quantiles by linear interpolation between order statistics at ``f * (n - 1)``
  (NumPy's default ``method="linear"``); the median is the 50% quantile;
- a share (same top token) with its binomial error ``sqrt(s (1 - s) / (n - 1))``;
- RMS of delta p with the error ``0.5 / rms * stderr(delta p ** 2)``.

``method="llamacpp"`` reproduces llama.cpp's arithmetic for the order statistics as well: the
per-token values are held as float32 and interpolated in float32 (its ``percentile`` computes
the position ``fraction * (n - 1)`` in float32, which at a few hundred thousand tokens is off
by up to 0.03 of a rank), the median is ``0.5f * (v[n/2] + v[n/2 - 1])``.
"""
from __future__ import annotations

import math

import numpy as np

KL_QUANTILES = (0.999, 0.99, 0.95, 0.90, 0.5, 0.10, 0.05, 0.01, 0.001)
DP_QUANTILES = (0.999, 0.99, 0.95, 0.90, 0.75, 0.5, 0.25, 0.10, 0.05, 0.01, 0.001)


def mean_and_error(x) -> tuple[float, float]:
    """Mean and its standard error sqrt(var/(n-1)) (nan for n < 2; +inf if any value is inf).

    >>> mean_and_error([1.0, 2.0, 3.0, 4.0])   # var = 1.25, sqrt(1.25 / 3)
    (2.5, 0.6454972243679028)
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n == 0:
        return math.nan, math.nan
    m = float(np.mean(x))
    if n < 2 or not math.isfinite(m):
        return m, math.nan
    return m, float(math.sqrt(np.var(x) / (n - 1)))


def quantiles(x, fractions, method="linear") -> dict[str, float]:
    """``{"99.9%": value, ...}`` by linear interpolation (llama.cpp's ``percentile``).

    ``method="llamacpp"``: in float32, as llama.cpp computes it (see the module docstring).

    >>> quantiles([0.0, 1.0, 2.0, 3.0, 4.0], (0.9, 0.5))
    {'90.0%': 3.6, '50.0%': 2.0}
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {_label(f): math.nan for f in fractions}
    if method == "llamacpp":
        s = np.sort(x.reshape(-1).astype(np.float32))
        return {_label(f): float(_percentile_f32(s, f)) for f in fractions}
    s = np.sort(x.reshape(-1))
    pos = np.asarray(fractions, dtype=np.float64) * (s.size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, s.size - 1)
    frac = pos - lo
    with np.errstate(invalid="ignore"):
        vals = (1 - frac) * s[lo] + frac * s[hi]
    # equal neighbours (infinite ones included) need no interpolation
    vals = np.where((s[lo] == s[hi]) | (frac == 0), s[lo], vals)
    return {_label(f): float(v) for f, v in zip(fractions, vals)}


def _percentile_f32(s, fraction):
    """llama.cpp's ``percentile`` of sorted float32 values, in float32 arithmetic."""
    f = np.float32(fraction)
    if f <= 0:
        return s[0]
    if f >= 1:
        return s[-1]
    p = np.float32(f * np.float32(s.size - 1))
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    a, b = s[ip], s[min(ip + 1, s.size - 1)]
    with np.errstate(invalid="ignore", over="ignore"):
        if a == b:
            return a
        return np.float32(np.float32(np.float32(1) - p) * a + np.float32(p * b))


def _median_f32(s):
    """llama.cpp's median of sorted float32 values."""
    n = s.size
    if n % 2:
        return s[n // 2]
    with np.errstate(over="ignore"):
        return np.float32(np.float32(0.5) * np.float32(s[n // 2] + s[n // 2 - 1]))


def _label(f: float) -> str:
    return f"{100 * f:.1f}%"


def share_and_error(flags) -> tuple[float, float]:
    """Share of true values and its binomial error sqrt(s (1 - s) / (n - 1)).

    >>> share_and_error([True, True, False, True, True])   # s = 0.8, sqrt(0.16 / 4)
    (0.8, 0.2)
    """
    f = np.asarray(flags, dtype=bool)
    n = f.size
    if n == 0:
        return math.nan, math.nan
    s = float(f.mean())
    return s, (math.sqrt(s * (1 - s) / (n - 1)) if n > 1 else math.nan)


def distribution_summary(x, fractions=KL_QUANTILES, method="linear") -> dict:
    """Mean +- error, min, max and quantiles of a vector (``method``: see :func:`quantiles`)."""
    x = np.asarray(x, dtype=np.float64)
    m, e = mean_and_error(x)
    if method == "llamacpp" and x.size:
        s32 = np.sort(x.reshape(-1).astype(np.float32))
        out = {"mean": m, "mean_err": e, "max": float(s32[-1]), "min": float(s32[0]),
               "median": float(_median_f32(s32))}
    else:
        out = {"mean": m, "mean_err": e,
               "max": float(x.max()) if x.size else math.nan,
               "min": float(x.min()) if x.size else math.nan,
               "median": float(np.median(x)) if x.size else math.nan}
    out["quantiles"] = quantiles(x, fractions, method)
    if method == "llamacpp" and x.size and "50.0%" in out["quantiles"]:
        out["quantiles"]["50.0%"] = out["median"]
    return out


def rms_and_error(x) -> tuple[float, float]:
    """RMS of ``x`` and llama.cpp's error estimate 0.5 / rms * stderr(x**2).

    >>> rms_and_error([3.0, -3.0, 3.0, -3.0])   # x**2 is constant: error 0
    (3.0, 0.0)
    """
    x = np.asarray(x, dtype=np.float64)
    m2, e2 = mean_and_error(x * x)
    rms = math.sqrt(m2) if m2 == m2 else math.nan
    err = 0.5 / rms * e2 if rms > 0 else math.nan
    return rms, err


def log_ppl_summary(nll_other, nll_ref) -> dict:
    """Perplexities of both models from per-token negative log-likelihoods, and their ratio.

    ``ln(PPL(other)/PPL(ref))`` has the error sqrt(e_o^2 + e_r^2 - 2 cov) with the covariance of
    the two means, as llama.cpp reports.
    """
    a = np.asarray(nll_other, dtype=np.float64)
    b = np.asarray(nll_ref, dtype=np.float64)
    n = a.size
    ma, ea = mean_and_error(a)
    mb, eb = mean_and_error(b)
    with np.errstate(invalid="ignore", over="ignore"):
        cov = float(np.mean(a * b) - ma * mb) / (n - 1) if n > 1 else math.nan
    ratio_err = math.sqrt(max(ea * ea + eb * eb - 2 * cov, 0.0)) if n > 1 else math.nan
    with np.errstate(over="ignore", invalid="ignore"):
        po, pr = math.exp(min(ma, 709.0)), math.exp(min(mb, 709.0))
        ratio = math.exp(min(ma - mb, 709.0)) if ma == ma and mb == mb and math.isfinite(ma - mb) else math.nan
        diff_err = (math.sqrt(max((po * ea) ** 2 + (pr * eb) ** 2 - 2 * po * pr * cov, 0.0))
                    if n > 1 and math.isfinite(po * pr * cov) else math.nan)
    return {
        "ppl_other": math.exp(ma) if ma < 709 else math.inf, "ppl_other_err": po * ea,
        "ppl_ref": math.exp(mb) if mb < 709 else math.inf, "ppl_ref_err": pr * eb,
        "ln_ppl_ratio": ma - mb, "ln_ppl_ratio_err": ratio_err,
        "ppl_ratio": ratio, "ppl_ratio_err": ratio * ratio_err if n > 1 else math.nan,
        "ppl_diff": po - pr, "ppl_diff_err": diff_err,
        "correlation": cov / (ea * eb) if n > 1 and ea > 0 and eb > 0 else math.nan,
    }
