"""Property test (hypothesis): adding a constant to one side's logits, or to both, up to 1e30 in
float64 and 1e37 in float32, does not change the divergence beyond the documented accuracy.

The reference is the mpmath oracle on the exact shifted inputs (a shift that rounds the logits
changes the distributions, and the oracle sees exactly what kldiv sees). Rows may hold -inf and
-1e30 / finfo.min "masked" entries. For every function: no nan, never negative, and equal to the
reference to about 1e-6 relative (float32) and 1e-12 (float64), rows wider than the float range
included (module docstring of ``kldiv._core.divergence``). The fast paths are switched off:
this is the core's property.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kldiv
import oracle

FAST = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
FUNCS = {"kl": kldiv.kl_div, "reverse_kl": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}
L = dict(p_space="logits", q_space="logits")


@pytest.fixture(autouse=True)
def core_only(monkeypatch):
    from kldiv._core import dispatch

    monkeypatch.setattr(dispatch, "handler", lambda *a, **k: None)


@st.composite
def shifted_rows(draw):
    dtype = draw(st.sampled_from(["float64", "float32"]))
    top = 30 if dtype == "float64" else 37
    v = draw(st.integers(1, 6))
    finite = st.floats(-20, 20, allow_nan=False, width=32)
    masked = float(np.finfo(dtype).min) if draw(st.booleans()) else -1e30
    elem = st.one_of(finite, finite, finite, st.just(-math.inf), st.just(masked))
    a = np.array(draw(st.lists(elem, min_size=v, max_size=v)))
    b = np.array(draw(st.lists(elem, min_size=v, max_size=v)))
    for x in (a, b):
        if not np.any(np.isfinite(x)):
            x[0] = 0.0  # at least one finite entry per row

    def shift():
        if not draw(st.booleans()):
            return 0.0
        return draw(st.sampled_from([-1.0, 1.0])) * 10.0 ** draw(st.floats(0, top))

    which = draw(st.sampled_from(["p", "q", "both"]))
    sa = shift() if which in ("p", "both") else 0.0
    sb = shift() if which in ("q", "both") else 0.0
    with np.errstate(over="ignore"):
        x = (a + sa).astype(dtype)
        y = (b + sb).astype(dtype)
    # a shift that overflows or lands on finfo.min is no longer a shift of a valid row
    for z in (x, y):
        z[~np.isfinite(z) & (z > 0)] = np.finfo(dtype).max
        if not np.any(np.isfinite(z)):
            z[0] = 0.0
    return dtype, x, y


@FAST
@given(shifted_rows(), st.sampled_from(sorted(FUNCS)))
def test_shifted_logits_match_the_oracle(rows, name):
    dtype, x, y = rows
    got = float(FUNCS[name](x, y, **L))
    ref = float(getattr(oracle, name)(x, y, **L))
    assert not math.isnan(got), (name, x, y)
    assert got >= 0, (name, x, y, got)
    fmax = float(np.finfo(dtype).max)
    if math.isinf(ref) or ref >= fmax * (1 - 1e-6):  # values at finfo.max are reported as inf
        assert got == math.inf or got >= 0.5 * fmax, (name, x, y, got, ref)
        return
    # exact across any shift (each side shifted by its own large maximum, the difference of the
    # sides formed exactly), rows wider than the float range included
    if dtype == "float64":
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-40)
    else:
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-30)


@FAST
@given(st.integers(0, 2**32 - 1), st.sampled_from(["float64", "float32"]),
       st.sampled_from(sorted(FUNCS)))
def test_exact_shifts_leave_the_value_unchanged(seed, dtype, name):
    # logits on a coarse grid and power-of-two shifts: the shifted rows are exactly the same
    # distributions, so the value must equal the oracle of the unshifted rows
    rng = np.random.default_rng(seed)
    v = int(rng.integers(1, 8))
    a = np.round(rng.standard_normal(v) * 4 * 64) / 64
    b = np.round(rng.standard_normal(v) * 4 * 64) / 64
    k = int(rng.integers(0, 14 if dtype == "float32" else 40))
    sa, sb = [float(rng.choice([-1, 0, 1])) * 2.0**k for _ in range(2)]
    x, y = (a + sa).astype(dtype), (b + sb).astype(dtype)
    assert np.array_equal(x.astype(np.float64) - sa, a) and np.array_equal(
        y.astype(np.float64) - sb, b)
    ref = float(getattr(oracle, name)(a, b, **L))
    got = float(FUNCS[name](x, y, **L))
    tol = dict(rtol=1e-10, atol=1e-14) if dtype == "float64" else dict(rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got, ref, **tol)
