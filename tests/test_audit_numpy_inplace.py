"""Regressions from the outside audit (notes/audit.md), findings 1 and 4.

1. NumPy fast path (``kldiv._ext._divrows``): a one-category support on one side, the other side's
   logit there 1e17..1e308 (float64) / up to 3e38 (float32) below its maximum, temperature != 1:
   the kernel's log-space fallback returned 0 (an FMA contracted ``(x - c) / T - top`` into the
   product's rounding error, and exp of that was 0 or +inf). Reference: mpmath on the exact inputs.
4. ``kldiv.torch.kl_div_inplace`` checks its arguments like ``kldiv.kl_div`` (same error messages,
   taken from the core itself, not copied), and ``validate=False`` lets a nan row show as nan.
"""
from __future__ import annotations

import mpmath
import numpy as np
import pytest

import kldiv

FNS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
       "jeffreys": kldiv.jeffreys_div}
TEMPS = [0.5, 1.5, 3.0, 7.0, 100.0]


def _mp_log_probs(x, space, T):
    """Normalised log-probabilities of one row from the exact stored inputs (None: probability 0)."""
    xs = [mpmath.mpf(float(v)) if np.isfinite(v) else None for v in x]
    if space == "probs":
        ls = [mpmath.log(v) / T if v is not None and v > 0 else None for v in xs]
    else:
        ls = [v / T if v is not None else None for v in xs]
    m = max(v for v in ls if v is not None)
    z = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in ls if v is not None))
    return [v - z if v is not None else None for v in ls]


def _mp_kl(lp, lq):
    s = mpmath.mpf(0)
    for a, b in zip(lp, lq):
        if a is None:
            continue
        if b is None:
            return mpmath.inf
        s += mpmath.exp(a) * (a - b)
    return s


def mp_div(kind, p, q, p_space, q_space, T, beta=0.5):
    with mpmath.workdps(40):
        lp, lq = _mp_log_probs(p, p_space, T), _mp_log_probs(q, q_space, T)
        if kind == "forward":
            return float(_mp_kl(lp, lq))
        if kind == "reverse":
            return float(_mp_kl(lq, lp))
        if kind == "jeffreys":
            return float(_mp_kl(lp, lq) + _mp_kl(lq, lp))
        pe = [mpmath.exp(a) if a is not None else mpmath.mpf(0) for a in lp]
        qe = [mpmath.exp(b) if b is not None else mpmath.mpf(0) for b in lq]
        lm = [mpmath.log(beta * a + (1 - beta) * b) if a + b > 0 else None for a, b in zip(pe, qe)]
        return float(beta * _mp_kl(lp, lm) + (1 - beta) * _mp_kl(lq, lm))


def _one_hot_rows(dtype, gap, k, how, rng):
    """p one-hot at category k (``how``: -inf logits, log-probabilities, or probabilities), q
    logits with q_k = -gap and the others moderate."""
    v = 4
    q = rng.uniform(-3.0, 3.0, v)
    q[k] = -gap
    if how == "probs":
        p = np.zeros(v)
        p[k] = 1.0
        space = "probs"
    else:
        p = np.full(v, -np.inf)
        p[k] = 0.0 if how == "log_probs" else 2.5
        space = how
    return p.astype(dtype), q.astype(dtype), space


CASES = [(np.float64, g) for g in (1e17, 1e18, 1e20, 1e100, 1e200, 1e300, 1e308)]
CASES += [(np.float32, g) for g in (1e17, 1e20, 1e30, 1e37, 3e38)]


@pytest.mark.parametrize("dtype,gap", CASES)
@pytest.mark.parametrize("how", ["logits", "log_probs", "probs"])
def test_one_hot_against_huge_gap_matches_mpmath(dtype, gap, how):
    rng = np.random.default_rng(int(gap % 9973) + len(how))
    for i, T in enumerate(TEMPS):
        for k in (3 * (i % 2),):  # the support first or last
            p, q, p_space = _one_hot_rows(dtype, gap, k, how, rng)
            for kind, fn in FNS.items():
                for a, b, sa, sb in ((p, q, p_space, "logits"), (q, p, "logits", p_space)):
                    want = mp_div(kind, a, b, sa, sb, T)
                    got = fn(a[None], b[None], p_space=sa, q_space=sb, temperature=T)
                    assert got.dtype == dtype
                    got = float(got[0])
                    ctx = (kind, sa, sb, T, gap, k, dtype.__name__)
                    with np.errstate(over="ignore"):
                        beyond = not np.isfinite(np.asarray(want, dtype))
                    if beyond:  # beyond the dtype's range
                        assert got == np.inf, ctx
                    else:
                        assert got == pytest.approx(want, rel=2e-6 if dtype == np.float32 else 1e-12,
                                                    abs=1e-12), ctx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_audit_repro_values(dtype):
    if dtype == np.float64:
        p, q, T = np.array([[0.0, -np.inf]]), np.array([[-1e20, -1.0]]), 1.5
        want = (1e20 - 1.0) / 1.5
    else:
        p = np.array([[0.0, -np.inf]], np.float32)
        q = np.array([[-3e38, -1.0]], np.float32)
        T = 7.0
        want = (float(np.float32(-1.0)) - float(np.float32(-3e38))) / 7.0
    got = kldiv.kl_div(p, q, p_space="logits", q_space="logits", temperature=T)
    assert float(got[0]) == pytest.approx(want, rel=1e-6)
    got = kldiv.reverse_kl(q, p, p_space="logits", q_space="logits", temperature=T)
    assert float(got[0]) == pytest.approx(want, rel=1e-6)
