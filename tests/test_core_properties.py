"""Hypothesis property tests of the core: invariants that hold for every input.

KL >= 0; zero exactly for identical inputs and positive for different distributions; logits are
invariant to a constant shift per row; the three input spaces agree; the backends agree;
JS_0.5 is symmetric and at most log 2; Jeffreys = KL + reverse KL; and the values agree with
scipy.special.rel_entr where float64 cancellation does not matter. Examples are few and shapes
small so that the file stays fast (seeded through hypothesis' database-free derandomize).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kldiv
from conftest import to_numpy

FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
FUNCS = ("kl_div", "reverse_kl", "js_div", "jeffreys_div")


@st.composite
def logit_pairs(draw, max_rows=3, max_v=12, allow_neg_inf=True, shape=None):
    """Two float64 logit arrays of one shape; entries may be -inf (never a whole row)."""
    if shape is None:
        shape = (draw(st.integers(1, max_rows)), draw(st.integers(2, max_v)))
    finite = st.floats(-25, 25, allow_nan=False, width=64)
    elem = st.one_of(finite, st.just(-math.inf)) if allow_neg_inf else finite
    a = draw(hnp.arrays(np.float64, shape, elements=elem))
    b = draw(hnp.arrays(np.float64, shape, elements=elem))
    for x in (a, b):
        dead = np.all(x == -np.inf, axis=-1)
        x[dead, 0] = 0.0
    return a, b


def softmax(x):
    return scipy.special.softmax(x, axis=-1)


@FAST
@given(logit_pairs())
def test_nonnegative_and_never_nan(ab):
    a, b = ab
    for fn in FUNCS:
        for space in ("logits", "probs"):
            x, y = (a, b) if space == "logits" else (softmax(a), softmax(b))
            got = getattr(kldiv, fn)(x, y, p_space=space, q_space=space)
            assert not np.any(np.isnan(got)), (fn, space)
            assert np.all(got >= 0), (fn, space, got)


@FAST
@given(logit_pairs(allow_neg_inf=False))
def test_matches_rel_entr_and_definitions(ab):
    a, b = ab
    P, Q = softmax(a), softmax(b)
    kl = scipy.special.rel_entr(P, Q).sum(-1)
    rev = scipy.special.rel_entr(Q, P).sum(-1)
    kw = dict(p_space="logits", q_space="logits")
    atol = 1e-12  # float64 cancellation in the rel_entr sum (the reference, not kldiv)
    np.testing.assert_allclose(kldiv.kl_div(a, b, **kw), kl, rtol=1e-9, atol=atol)
    np.testing.assert_allclose(kldiv.reverse_kl(a, b, **kw), rev, rtol=1e-9, atol=atol)
    np.testing.assert_allclose(kldiv.jeffreys_div(a, b, **kw), kl + rev, rtol=1e-9, atol=atol)
    M = 0.5 * (P + Q)
    js = 0.5 * scipy.special.rel_entr(P, M).sum(-1) + 0.5 * scipy.special.rel_entr(Q, M).sum(-1)
    np.testing.assert_allclose(kldiv.js_div(a, b, **kw), js, rtol=1e-9, atol=atol)


@FAST
@given(logit_pairs())
def test_zero_for_identical_inputs_positive_otherwise(ab):
    a, b = ab
    for fn in FUNCS:
        for space in ("logits", "probs"):
            x = a if space == "logits" else softmax(a)
            assert np.all(getattr(kldiv, fn)(x, x, p_space=space, q_space=space) == 0.0)
    # distributions that differ by at least 1e-3 in total variation: strictly positive
    P, Q = softmax(a), softmax(b)
    differ = 0.5 * np.abs(P - Q).sum(-1) > 1e-3
    for fn in FUNCS:
        got = getattr(kldiv, fn)(a, b, p_space="logits", q_space="logits")
        assert np.all(got[differ] > 0), (fn, got)


@FAST
@given(logit_pairs(), st.floats(-1e3, 1e3), st.floats(-1e3, 1e3))
def test_logits_invariant_to_a_shift_per_row(ab, c, d):
    a, b = ab
    kw = dict(p_space="logits", q_space="logits")
    rows = np.arange(a.shape[0])[:, None]
    for fn in FUNCS:
        f = getattr(kldiv, fn)
        base = f(a, b, **kw)
        # shifts of different size per row; adding them rounds the logits (relative 1e-16 of
        # the shift), so the tolerance is absolute and scales with the shift
        shifted = f(a + c * (1 + rows), b + d * (rows - 1), **kw)
        atol = 1e-12 * (1 + abs(c) + abs(d)) * a.shape[0]
        np.testing.assert_allclose(shifted, base, rtol=1e-9, atol=atol, err_msg=fn)


@FAST
@given(logit_pairs(), st.sampled_from(FUNCS))
def test_three_input_spaces_agree(ab, fn):
    a, b = ab
    P, Q = softmax(a), softmax(b)
    with np.errstate(divide="ignore"):
        lP, lQ = np.log(P), np.log(Q)
    f = getattr(kldiv, fn)
    ref = f(a, b, p_space="logits", q_space="logits")
    fin = np.isfinite(ref)
    for (x, sx), (y, sy) in [((P, "probs"), (Q, "probs")), ((lP, "log_probs"), (lQ, "log_probs")),
                             ((P, "probs"), (b, "logits")), ((lP, "log_probs"), (Q, "probs"))]:
        got = f(x, y, p_space=sx, q_space=sy)
        np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=f"{fn} {sx} {sy}")
        np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-9, atol=1e-12,
                                   err_msg=f"{fn} {sx} {sy}")


@FAST
@given(logit_pairs(allow_neg_inf=False), st.floats(0.05, 0.95))
def test_js_bounded_and_symmetric(ab, beta):
    a, b = ab
    kw = dict(p_space="logits", q_space="logits")
    js = kldiv.js_div(a, b, **kw)
    assert np.all(js <= math.log(2) * (1 + 1e-12))
    np.testing.assert_allclose(kldiv.js_div(b, a, **kw), js, rtol=1e-10, atol=1e-15)
    # general beta: JS_beta(p, q) = JS_{1-beta}(q, p), bounded by the entropy of (beta, 1-beta)
    jb = kldiv.js_div(a, b, beta=beta, **kw)
    np.testing.assert_allclose(kldiv.js_div(b, a, beta=1 - beta, **kw), jb, rtol=1e-9,
                               atol=1e-15)
    h = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
    assert np.all(jb <= h * (1 + 1e-12))


@FAST
@given(logit_pairs())
def test_jeffreys_is_kl_plus_reverse(ab):
    a, b = ab
    kw = dict(p_space="logits", q_space="logits")
    j = kldiv.jeffreys_div(a, b, **kw)
    s = kldiv.kl_div(a, b, **kw) + kldiv.reverse_kl(a, b, **kw)
    np.testing.assert_array_equal(np.isinf(j), np.isinf(s))
    fin = np.isfinite(s)
    np.testing.assert_allclose(j[fin], s[fin], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(kldiv.reverse_kl(a, b, **kw), kldiv.kl_div(b, a, **kw),
                               rtol=1e-13, atol=0)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ab=logit_pairs(shape=(3, 12)))
def test_backends_agree_with_numpy(xp, ab):
    """The same inputs on every backend give NumPy's values (float64 and float32)."""
    a, b = ab
    kw = dict(p_space="logits", q_space="logits")
    for fn in FUNCS:
        f = getattr(kldiv, fn)
        ref = f(a, b, **kw)
        got = to_numpy(f(xp.asarray(a), xp.asarray(b), **kw))
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15, err_msg=fn)
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        ref32 = f(a32, b32, **kw)
        got32 = to_numpy(f(xp.asarray(a32), xp.asarray(b32), **kw))
        np.testing.assert_allclose(got32, ref32, rtol=1e-5, atol=1e-7, err_msg=fn)
    P, Q = softmax(a), softmax(b)
    np.testing.assert_allclose(to_numpy(kldiv.kl_div(xp.asarray(P), xp.asarray(Q))),
                               kldiv.kl_div(P, Q), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fn", FUNCS)
def test_monotone_in_mixing_toward_q(fn):
    """KL(p || (1-t) p + t q) grows with t (convexity): a check on many points of one path."""
    rng = np.random.default_rng(0)
    P, Q = softmax(rng.normal(size=8)), softmax(rng.normal(size=8))
    ts = np.linspace(0, 1, 41)
    Qt = (1 - ts)[:, None] * P + ts[:, None] * Q
    vals = getattr(kldiv, fn)(np.broadcast_to(P, Qt.shape), Qt)
    assert vals[0] == 0.0
    assert np.all(np.diff(vals) > 0)
