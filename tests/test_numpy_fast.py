"""NumPy fast path (kldiv/backends/numpy_fast.py, kernel kldiv._ext._divrows) against independent
references: an mpmath oracle (inputs taken exactly, textbook formulas at 50 digits), and kldiv's
core with the NumPy handlers switched off (same values, same dtypes, same errors)."""
from __future__ import annotations

import contextlib
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kldiv
from kldiv._core import dispatch
from kldiv.backends import numpy_fast as NF
from kldiv.compare import kernel as K

HAVE_EXT = NF.extension() is not None
pytestmark = pytest.mark.skipif(not HAVE_EXT, reason="kldiv._ext._divrows not built")
FNS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
       "jeffreys": kldiv.jeffreys_div}


@contextlib.contextmanager
def core_only():
    """The core alone: the NumPy pre and post handlers answer NotImplemented."""
    kldiv.kl_div(np.ones(2) / 2, np.ones(2) / 2)  # make sure the backend is loaded
    saved = {k: v for k, v in dispatch._HANDLERS.items() if k[0] == "numpy"}
    for k in saved:
        dispatch._HANDLERS[k] = lambda *a, **kw: NotImplemented
    try:
        yield
    finally:
        dispatch._HANDLERS.update(saved)


def took_fast_path(kind, p, q, **kw):
    opts = dict(p_space="probs", q_space="probs", axis=-1, reduction="none", mask=None,
                weight=None, temperature=1.0, t2_scale=False, validate=None, beta=0.5)
    opts.update(kw)
    return NF.numpy_pre(kind, p, q, **opts) is not NotImplemented


# ---------------------------------------------------------------------------------- the oracle


def mp_probs(x, space, T=1.0):
    """Normalised probabilities of one row, exactly from the stored inputs (mpmath)."""
    xs = [mpmath.mpf(float(v)) for v in x]
    if space == "probs":
        s = mpmath.fsum(v for v in xs if v > 0)
        return [v / s if v > 0 else mpmath.mpf(0) for v in xs]
    ys = [v / mpmath.mpf(T) if v != -mpmath.inf else None for v in xs]
    m = max(v for v in ys if v is not None)
    z = mpmath.fsum(mpmath.exp(v - m) for v in ys if v is not None)
    return [mpmath.exp(v - m) / z if v is not None else mpmath.mpf(0) for v in ys]


def mp_div(kind, p, q, beta=0.5):
    """Textbook divergences of two rows of exact probabilities (mpmath numbers, 0 = off support)."""
    def kl(a, b):
        t = []
        for x, y in zip(a, b):
            if x == 0:
                continue
            if y == 0:
                return mpmath.inf
            t.append(x * mpmath.log(x / y))
        return mpmath.fsum(t)

    if kind == "forward":
        return kl(p, q)
    if kind == "reverse":
        return kl(q, p)
    if kind == "jeffreys":
        return kl(p, q) + kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def truth(kind, p, q, p_space="probs", q_space="probs", temperature=1.0, beta=0.5):
    with mpmath.workdps(50):
        out = []
        for a, b in zip(np.atleast_2d(p), np.atleast_2d(q)):
            v = mp_div(kind, mp_probs(a, p_space, temperature), mp_probs(b, q_space, temperature),
                       beta)
            out.append(float(v))
        return np.array(out)


def rows_close(rng, n, v, dtype, lo=-6, hi=0, zeros=False):
    """Probability rows p and q = p * exp(noise), noise scale 10**lo .. 10**hi per row."""
    p = rng.random((n, v)) ** 3
    if zeros:
        p[rng.random((n, v)) < 0.2] = 0
        p[:, 0] = 1.0
    p /= p.sum(-1, keepdims=True)
    scales = np.logspace(lo, hi, n)[:, None]
    q = p * np.exp(rng.standard_normal((n, v)) * scales)
    q /= q.sum(-1, keepdims=True)
    return p.astype(dtype), q.astype(dtype)


def rtol_for(dtype):
    return 2e-6 if dtype == np.float32 else 1e-11


# ---------------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", list(FNS))
def test_probabilities_match_mpmath(dtype, kind):
    rng = np.random.default_rng(1)
    p, q = rows_close(rng, 8, 40, dtype, lo=-6, hi=0.3)
    assert took_fast_path(kind, p, q)
    got = np.asarray(FNS[kind](p, q), dtype=np.float64)
    ref = truth(kind, p, q)
    np.testing.assert_allclose(got, ref, rtol=rtol_for(dtype), atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zeros_in_p_and_q(dtype):
    """p = 0 entries (q anything), q = 0 where p > 0 (+inf), both zero, disjoint supports."""
    rng = np.random.default_rng(2)
    p, q = rows_close(rng, 6, 30, dtype, lo=-3, hi=0, zeros=True)
    q[1, 5] = 0  # forward inf unless p is 0 there
    p[1, 5] = 0.3
    q[2, :] = 0
    q[2, 1] = 1  # q one-hot
    p[3, :] = 0
    p[3, 2] = 1
    q[3, :] = 0
    q[3, 7] = 1  # disjoint
    for x in (p, q):
        x /= x.sum(-1, keepdims=True)
    for kind, fn in FNS.items():
        assert took_fast_path(kind, p, q)
        got = np.asarray(fn(p, q), dtype=np.float64)
        ref = truth(kind, p, q)
        fin = np.isfinite(ref)
        np.testing.assert_array_equal(np.isinf(got), ~fin)
        np.testing.assert_allclose(got[fin], ref[fin], rtol=rtol_for(dtype), atol=1e-300)
    assert float(kldiv.js_div(p[3], q[3])) == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("kind", list(FNS))
@pytest.mark.parametrize("spaces,T", [(("logits", "logits"), 1.0), (("log_probs", "logits"), 0.7),
                                      (("logits", "log_probs"), 3.0), (("probs", "logits"), 1.0),
                                      (("log_probs", "probs"), 1.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_spaces_and_temperature_match_mpmath(kind, spaces, T, dtype):
    rng = np.random.default_rng(3)
    p, q = rows_close(rng, 5, 24, np.float64, lo=-4, hi=0.3)
    conv = {"probs": lambda x: x, "log_probs": np.log,
            "logits": lambda x: np.log(x) + rng.normal(0, 30)}
    a = conv[spaces[0]](p).astype(dtype)
    b = conv[spaces[1]](q).astype(dtype)
    kw = dict(p_space=spaces[0], q_space=spaces[1], temperature=T)
    fast = dtype == np.float64 or "probs" in spaces or T != 1.0 or kind == "jeffreys"
    assert took_fast_path(kind, a, b, **kw) == fast
    got = np.asarray(FNS[kind](a, b, validate=False, **kw), dtype=np.float64)
    ref = truth(kind, a, b, spaces[0], spaces[1], T)
    np.testing.assert_allclose(got, ref, rtol=rtol_for(dtype) * 5, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_near_identical_rows_keep_relative_accuracy(dtype):
    """KL down to ~1e-12 (float32 inputs one ulp apart; float64 closer still)."""
    rng = np.random.default_rng(4)
    p, q = rows_close(rng, 6, 50, dtype, lo=-7 if dtype == np.float32 else -10, hi=-4)
    for kind in FNS:
        got = np.asarray(FNS[kind](p, q), dtype=np.float64)
        ref = truth(kind, p, q)
        np.testing.assert_allclose(got, ref, rtol=rtol_for(dtype) * 5)
    same = np.asarray(kldiv.js_div(p, p))
    assert (same == 0).all()


def test_large_vocabulary_against_extended_precision():
    rng = np.random.default_rng(5)
    p, q = rows_close(rng, 2, 100_000, np.float32, lo=-3, hi=-1)
    got = np.asarray(kldiv.kl_div(p, q), dtype=np.float64)
    P = p.astype(np.longdouble)
    Q = q.astype(np.longdouble)
    P, Q = P / P.sum(-1, keepdims=True), Q / Q.sum(-1, keepdims=True)
    ref = np.asarray((P * np.log(P / Q)).sum(-1), dtype=np.float64)
    tol = 2e-6 if np.finfo(np.longdouble).eps < 1e-18 else 1e-4
    np.testing.assert_allclose(got, ref, rtol=tol)


def test_v1_rows_and_subnormals_equal_core():
    one = np.ones((3, 1))
    assert (np.asarray(kldiv.kl_div(one, one)) == 0).all()
    assert took_fast_path("forward", one, one)
    tiny = np.array([[5e-324, 1.0 - 5e-324], [1e-310, 1 - 1e-310], [0.5, 0.5]])
    other = np.array([[0.5, 0.5], [1e-300, 1 - 1e-300], [1e-320, 1 - 1e-320]])
    for kind, fn in FNS.items():
        got = fn(tiny, other)
        with core_only():
            ref = fn(tiny, other)
        np.testing.assert_allclose(got, ref, rtol=1e-12)
        # (row 1's KL is ~1e-300, below what a 50-digit oracle resolves next to 1)
        np.testing.assert_allclose(np.asarray(got, dtype=float), truth(kind, tiny, other),
                                   rtol=1e-10, atol=1e-290)


# ----------------------------------------------------------------- equal to the core, options


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_options_equal_core(dtype):
    """axis, reduction, mask, weight, t2_scale, non-contiguous and mixed-dtype inputs."""
    rng = np.random.default_rng(6)
    p, q = rows_close(rng, 24, 30, dtype, lo=-4, hi=0.5)
    p3 = p.reshape(2, 12, 30).transpose(0, 2, 1)  # categories on axis 1, not contiguous
    q3 = q.reshape(2, 12, 30).transpose(0, 2, 1)
    mask = rng.random((2, 12)) < 0.7
    weight = rng.random((2, 12)).astype(dtype)
    cases = [dict(), dict(reduction="sum"), dict(reduction="mean", mask=mask),
             dict(reduction="mean", weight=weight), dict(reduction="none", mask=mask, weight=weight)]
    for kind, fn in FNS.items():
        for kw in cases:
            got = fn(p3, q3, axis=1, **kw)
            with core_only():
                ref = fn(p3, q3, axis=1, **kw)
            assert type(got) is type(ref) and got.dtype == ref.dtype
            np.testing.assert_allclose(got, ref, rtol=2e-5 if dtype == np.float32 else 1e-12)
        a, b = np.log(p[::2, ::3]), np.log(q[1::2, ::3])  # strided, log space, T and t2_scale
        got = fn(a, b, p_space="logits", q_space="log_probs", temperature=2.0, t2_scale=True,
                 validate=False)
        with core_only():
            ref = fn(a, b, p_space="logits", q_space="log_probs", temperature=2.0, t2_scale=True,
                     validate=False)
        np.testing.assert_allclose(got, ref, rtol=2e-5 if dtype == np.float32 else 1e-12)
    mixed = kldiv.kl_div(p.astype(np.float32), q.astype(np.float64))
    with core_only():
        ref = kldiv.kl_div(p.astype(np.float32), q.astype(np.float64))
    assert mixed.dtype == ref.dtype == np.float64
    np.testing.assert_allclose(mixed, ref, rtol=1e-12)


def _error(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except Exception as exc:  # noqa: BLE001 - the type and message are compared
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bad_values_raise_the_core_errors(dtype):
    p = np.full((4, 5), 0.2, dtype)
    bad = {
        "negative": (0, 1, -0.1),
        "nan": (1, 2, np.nan),
        "+inf": (2, 0, np.inf),
        "unnormalised": (3, 4, 0.25),
    }
    for name, (i, j, v) in bad.items():
        x = p.copy()
        x[i, j] = v
        for args in ((x, p), (p, x)):
            got = _error(kldiv.kl_div, *args)
            with core_only():
                ref = _error(kldiv.kl_div, *args)
            assert got is not None and got == ref, name
        # a masked row may hold anything
        m = np.ones(4, bool)
        m[i] = False
        assert np.isfinite(kldiv.kl_div(x, p, mask=m, reduction="sum"))
    lp = np.log(p[:2])
    for x, space in [(np.full((2, 5), -np.inf, dtype), "logits"), (lp + 0.01, "log_probs"),
                     (np.where(np.eye(2, 5) > 0, np.inf, lp), "logits")]:
        got = _error(kldiv.kl_div, x, lp, p_space=space, q_space="log_probs")
        with core_only():
            ref = _error(kldiv.kl_div, x, lp, p_space=space, q_space="log_probs")
        assert got is not None and got == ref


def test_normalisation_tolerance_border_decided_like_the_core():
    """Rows summing to 1 +- (tolerance * (1 +- 1e-3)): accepted or refused as the core does."""
    for dtype, n in [(np.float32, 8), (np.float32, 1000), (np.float64, 50)]:
        tol = kldiv.normalization_tolerance(float(np.finfo(dtype).eps), n) \
            if hasattr(kldiv, "normalization_tolerance") else None
        if tol is None:
            from kldiv._core.validation import normalization_tolerance

            tol = normalization_tolerance(float(np.finfo(dtype).eps), n)
        for f in (0.9, 0.999, 1.001, 1.1):
            p = np.full((1, n), 1.0 / n) * (1 + f * tol)
            p = p.astype(dtype)
            got = _error(kldiv.kl_div, p, p)
            with core_only():
                ref = _error(kldiv.kl_div, p, p)
            assert got == ref, (dtype, n, f)


def test_nan_without_checks_propagates():
    """Issue 11 item 6: validate=False must not turn a nan into a plausible number."""
    for dtype in (np.float32, np.float64):
        x = np.array([[np.nan, 0.0], [0.0, 0.0]], dtype)
        y = np.zeros((2, 2), dtype)
        for kind, fn in FNS.items():
            got = fn(x, y, p_space="logits", q_space="logits", validate=False)
            assert np.isnan(got[0]) and got[1] == 0, (dtype, kind)
            got = fn(y, x, p_space="logits", q_space="logits", validate=False)
            assert np.isnan(got[0]) and got[1] == 0, (dtype, kind)
        pr = np.array([[np.nan, 1.0], [0.5, 0.5]], dtype)
        got = kldiv.kl_div(pr, np.full((2, 2), 0.5, dtype), validate=False)
        assert np.isnan(got[0]) and got[1] == 0
        assert np.isnan(kldiv.kl_div(pr, np.full((2, 2), 0.5, dtype), validate=False,
                                     reduction="sum"))


# ------------------------------------------------------- large-magnitude logits (issue 11, 1)


LARGE = [
    ([1e30, 1e30, -1e30], [0.0, 5, 10]),
    ([3e38, 3e38, 1, 2], [0.0, 1, 2, 3]),
    ([0.0, 1, 2, 3], [3e38, 3e38, 1, 2]),
    ([-1.5e38] * 4, [0.0, 1, 2, 3]),
    ([3e38, -3e38], [0.99, 0.42]),
    ([-5e37, -5e37, -5e37], [-5e37, -np.inf, -5e37]),
    ([0.0, 1, 2, 3], [-1e30, -1e30, -1e30, -1e30]),
    ([0.0, -np.inf, 1.0], [-1e30, 0.0, -1e30]),  # q's mass on p's support ~ e^-1e30
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["forward", "reverse", "js", "jeffreys"])
def test_large_magnitude_logits_match_mpmath(dtype, kind):
    L = dict(p_space="logits", q_space="logits")
    for a, b in LARGE:
        x, y = np.array([a], dtype), np.array([b], dtype)
        got = float(np.asarray(FNS[kind](x, y, **L))[0])
        ref = float(truth(kind, x, y, "logits", "logits")[0])
        if math.isinf(ref) or ref > 1e30:
            assert got == pytest.approx(ref, rel=1e-6), (a, b)
        else:
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-12), (a, b)
        if dtype == np.float32 and kind in ("forward", "reverse", "js"):
            st = K.row_stats(x, y, reverse=True, js=True)
            val = {"forward": st.kl, "reverse": st.rkl, "js": st.js}[kind][0]
            assert val == pytest.approx(ref, rel=1e-5, abs=1e-12), (a, b, "row_stats")


def test_js_identical_rows_with_minus_inf_exactly_zero():
    """Issue 11 item 7: JS of identical rows with a -inf entry is exactly 0 (float32 kernel)."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((5, 33)).astype(np.float32)
    a[:, 3] = -np.inf
    a[2, 10:] = -np.inf
    assert (np.asarray(kldiv.js_div(a, a, p_space="logits", q_space="logits")) == 0).all()
    assert (K.row_stats(a, a, js=True).js == 0).all()
    assert (K.js_rows(a, a) == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_logits_grid(dtype):
    """-inf in p only, in q only, in both at the same or at different places, whole rows but one
    entry; every kind, at T = 1 and T = 0.5, against mpmath."""
    rng = np.random.default_rng(8)
    a = rng.normal(0, 2, (6, 9)).astype(dtype)
    b = (a + rng.normal(0, 0.3, (6, 9))).astype(dtype)
    a[0, 2] = -np.inf
    b[1, 3] = -np.inf
    a[2, 4] = b[2, 4] = -np.inf
    a[3, 1] = -np.inf
    b[3, 6] = -np.inf
    a[4, 1:] = -np.inf
    b[5, :-1] = -np.inf
    for T in (1.0, 0.5):
        for kind, fn in FNS.items():
            kw = dict(p_space="logits", q_space="logits", temperature=T)
            got = np.asarray(fn(a, b, **kw), dtype=np.float64)
            ref = truth(kind, a, b, "logits", "logits", T)
            fin = np.isfinite(ref)
            np.testing.assert_array_equal(np.isinf(got), ~fin, err_msg=f"{kind} {T}")
            np.testing.assert_allclose(got[fin], ref[fin], rtol=rtol_for(dtype) * 5, atol=1e-15,
                                       err_msg=f"{kind} {T}")


@pytest.mark.parametrize("dtype,big", [(np.float64, 1e30), (np.float32, 1e37)])
def test_shift_of_one_or_both_sides_keeps_the_value(dtype, big):
    """Property (issue 11): logits shifted by random constants up to 1e30 (float64) or 1e37
    (float32), on one side or both; the value is the mpmath value of the stored inputs."""
    rng = np.random.default_rng(9)
    for trial in range(12):
        a = rng.normal(0, 3, 7)
        b = a + rng.normal(0, 10.0 ** rng.uniform(-3, 0.5), 7)
        mags = 10.0 ** rng.uniform(0, np.log10(big), 2) * rng.choice([-1, 1], 2)
        which = trial % 3
        x = (a + (mags[0] if which != 1 else 0)).astype(dtype)[None]
        y = (b + (mags[1] if which != 0 else 0)).astype(dtype)[None]
        for kind, fn in FNS.items():
            got = float(np.asarray(fn(x, y, p_space="logits", q_space="logits"))[0])
            ref = float(truth(kind, x, y, "logits", "logits")[0])
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-12), (trial, kind, x, y)


def test_float32_subnormal_probabilities():
    """float32 subnormals (down to 1.4e-45) on either side, in rows with ordinary entries."""
    p = np.array([[1e-45, 3e-39, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0]],
                 np.float32)
    q = np.array([[0.25, 0.25, 0.25, 0.25], [1e-45, 1e-44, 0.5, 0.5], [0.5, 0.5, 7e-46, 0]],
                 np.float32)
    for kind, fn in FNS.items():
        assert took_fast_path(kind, p, q)
        got = np.asarray(fn(p, q), dtype=np.float64)
        ref = truth(kind, p, q)
        fin = np.isfinite(ref)
        np.testing.assert_array_equal(np.isinf(got), ~fin)
        np.testing.assert_allclose(got[fin], ref[fin], rtol=2e-6, atol=1e-44)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 5, 33]),
       st.sampled_from([np.float32, np.float64]), st.sampled_from(list(FNS)))
def test_property_equals_core_on_random_rows_with_zeros(seed, v, dtype, kind):
    rng = np.random.default_rng(seed)
    p = rng.random((4, v)) ** rng.uniform(1, 6)
    q = rng.random((4, v)) ** rng.uniform(1, 6)
    p[rng.random((4, v)) < 0.3] = 0
    q[rng.random((4, v)) < 0.3] = 0
    p[:, 0] += 0.1
    q[:, -1] += 0.1
    p = (p / p.sum(-1, keepdims=True)).astype(dtype)
    q = (q / q.sum(-1, keepdims=True)).astype(dtype)
    got = FNS[kind](p, q)
    with core_only():
        ref = FNS[kind](p, q)
    assert got.dtype == ref.dtype
    np.testing.assert_allclose(got, ref, rtol=3e-6 if dtype == np.float32 else 1e-12, atol=1e-30)
    assert (np.asarray(got) >= 0).all()


def test_rows_spread_over_threads_are_identical():
    """Above PARALLEL_MIN_ELEMENTS the rows go to a thread pool: bit-identical to one call."""
    rng = np.random.default_rng(10)
    p, q = rows_close(rng, 600, 500, np.float64, lo=-5, hi=0)
    assert p.size >= NF.PARALLEL_MIN_ELEMENTS
    args = (NF.extension(), p, q, (0, 0), 1.0, 0, 0.5, 1, (1e-6, 1e-6), (2.2e-16, 2.2e-16))
    one, st1 = NF._rows_c(*args, threads=1)
    many, st3 = NF._rows_c(*args, threads=3)
    np.testing.assert_array_equal(one, many)
    assert (st1 == 0).all() and (st3 == 0).all()
    np.testing.assert_array_equal(np.asarray(kldiv.kl_div(p, q)), one)


@pytest.mark.parametrize("T", [1e-300, 5e-324, 1e-7, 2e6, float("inf"), float("nan")])
def test_temperature_outside_range_refused_as_by_the_core(T):
    a = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    b = np.array([[1.0, 2.5, 3.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="temperature"):
        kldiv.kl_div(a, b, p_space="logits", q_space="logits", temperature=T)


# ------------------------------------------ differential: fast path, core alone, mpmath oracle
#
# Every call below runs three ways: with the NumPy handlers (the _divrows kernel, or compare's
# float32 kernel for float32 logits at T = 1), with the core alone (core_only), and through
# tests/oracle.py (inputs taken exactly, textbook formulas, digits grown with the dynamic range).
# The fast path must raise the core's error where the core raises, give the same dtype, type and
# +inf pattern, and values within the dtype's tolerance of the oracle. The core is held to its
# documented accuracy (its float32 sums and centring: see _core/divergence.py) and any place it
# strays further is reported by the assertion message, not hidden.

import oracle  # noqa: E402 (tests/oracle.py, on the path as in the core tests)

ORACLE = {"forward": oracle.kl, "reverse": oracle.reverse_kl, "js": oracle.js,
          "jeffreys": oracle.jeffreys}
F16 = np.dtype(np.float16)


def _value_or_error(fn, *a, **kw):
    try:
        with np.errstate(all="ignore"):
            return fn(*a, **kw)
    except Exception as exc:  # noqa: BLE001 - the type and message are compared
        return (type(exc), str(exc))


def oracle_rows(p, q, p_space, q_space, temperature, beta=0.5):
    """{kind: per-row exact value} for rows on the last axis, from tests/oracle.py (each row's
    two distributions computed once, at the oracle's digits for that pair of rows)."""
    p2 = np.asarray(p, np.float64).reshape(-1, p.shape[-1])
    q2 = np.asarray(q, np.float64).reshape(-1, q.shape[-1])
    out = {k: [] for k in FNS}
    for a, b in zip(p2, q2):
        with mpmath.workdps(oracle._dps_for(a, b, p_space, q_space, temperature)):
            P = oracle.distribution(a, p_space, temperature)
            Q = oracle.distribution(b, q_space, temperature)
            fw, rv = oracle._kl_dist(P, Q), oracle._kl_dist(Q, P)
            bt = mpmath.mpf(beta)
            M = [bt * x + (1 - bt) * y for x, y in zip(P, Q)]
            js = bt * oracle._kl_dist(P, M) + (1 - bt) * oracle._kl_dist(Q, M)
            for k, v in (("forward", fw), ("reverse", rv), ("js", js), ("jeffreys", fw + rv)):
                out[k].append(float(v))
    return {k: np.array(v).reshape(p.shape[:-1]) for k, v in out.items()}


def _tols(dtype, ref):
    """(rtol, atol) of a fast-path result in ``dtype`` against the exact value ``ref``: a few
    ulps, plus ~eps sqrt(KL) for the rounding of the stored inputs' logarithms or centring
    (log p_j of a probability side carries eps |log p_j|; its first-order effect on the KL is
    sum_j p_j x_j err_j with x the centred log-ratio, of size sqrt(KL))."""
    eps = float(np.finfo(np.float32 if dtype == F16 else dtype).eps)
    root = np.sqrt(np.where(np.isfinite(ref), np.abs(ref), 0.0))
    return 16 * eps, 4 * eps * eps + 32 * eps * root


def _close(got, ref, rtol, atol):
    got = np.asarray(got, np.float64)
    with np.errstate(all="ignore"):
        ok = (got == ref) | (np.abs(got - ref) <= rtol * np.abs(ref) + atol)
    return ok


def three_way(kind, p, q, *, p_space="probs", q_space="probs", temperature=1.0, axis=-1,
              validate=None, core_rtol=None, core_atol=None, refs=None):
    """Fast path vs core alone vs oracle on one call with reduction 'none' (see above); ``refs``:
    oracle_rows of the call, when the caller checks several kinds of the same inputs."""
    fn = FNS[kind]
    kw = dict(p_space=p_space, q_space=q_space, temperature=temperature, axis=axis,
              validate=validate)
    got = _value_or_error(fn, p, q, **kw)
    with core_only():
        core = _value_or_error(fn, p, q, **kw)
    if isinstance(core, tuple) or isinstance(got, tuple):
        assert got == core, (kind, kw, got, core)
        return None
    assert type(got) is type(core) and got.dtype == core.dtype, (kind, kw)
    pm, qm = np.moveaxis(p, axis, -1), np.moveaxis(q, axis, -1)
    if refs is None:
        refs = oracle_rows(pm, qm, p_space, q_space, temperature)
    ref = refs[kind]
    g, c = np.asarray(got, np.float64), np.asarray(core, np.float64)
    big = float(np.finfo(got.dtype).max)
    # a divergence beyond the dtype's range is +inf in it
    ref_d = np.where(np.abs(ref) > big, np.inf, ref)
    rtol, atol = _tols(got.dtype, ref_d)
    # The core in float32 forms log p of a probability side (or centres logits far apart) in
    # float32: an error of ~eps |log p_j| per entry, which moves the KL by ~eps sqrt(KL) at first
    # order (the centring removes the mean only). Where a handler declined the call the user
    # gets the core's value, held to the core's bound.
    eps = float(np.finfo(np.float32 if got.dtype == F16 else got.dtype).eps)
    core_bound = 256 * eps * np.sqrt(np.where(np.isfinite(ref_d), np.abs(ref_d), 0.0))
    c_rtol = rtol if core_rtol is None else core_rtol
    c_atol = atol + core_bound if core_atol is None else core_atol
    post = (p.dtype == q.dtype == np.float32 and "probs" not in (p_space, q_space)
            and temperature == 1.0 and kind in ("forward", "reverse", "js"))
    if not (post or took_fast_path(kind, p, q, **kw)):
        rtol, atol = c_rtol, c_atol
    np.testing.assert_array_equal(np.isnan(g), np.isnan(c), err_msg=f"nan {kind} {kw}")
    np.testing.assert_array_equal(np.isinf(g), np.isinf(ref_d), err_msg=f"fast inf {kind} {kw}")
    np.testing.assert_array_equal(np.isinf(c), np.isinf(ref_d), err_msg=f"core inf {kind} {kw}")
    bad = ~_close(g, ref_d, rtol, atol)
    assert not bad.any(), (f"fast path {kind} {kw}: got {g[bad]} core {c[bad]} "
                           f"oracle {ref_d[bad]}")
    bad = ~_close(c, ref_d, c_rtol, c_atol)
    assert not bad.any(), (f"core {kind} {kw}: core {c[bad]} fast {g[bad]} oracle {ref_d[bad]}")
    assert (g[~np.isnan(g)] >= 0).all()
    return g


def _base_rows(rng, n, v, lo=-5.0, hi=0.5):
    """Probability rows p (some near one-hot) and q = p e^noise, noise 10**lo .. 10**hi."""
    p = rng.random((n, v)) ** rng.uniform(1, 6, (n, 1))
    p /= p.sum(-1, keepdims=True)
    q = p * np.exp(rng.standard_normal((n, v)) * np.logspace(lo, hi, n)[:, None])
    q /= q.sum(-1, keepdims=True)
    return p, q


def _to_space(x, space, dtype, shift=0.0, T=1.0):
    with np.errstate(divide="ignore"):
        if space == "probs":
            return x.astype(dtype)
        if space == "log_probs":
            return np.log(x).astype(dtype)
        return (np.log(x) * T + shift).astype(dtype)


SPACE_PAIRS = [(a, b) for a in ("probs", "log_probs", "logits")
               for b in ("probs", "log_probs", "logits")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spaces", SPACE_PAIRS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_diff_every_kind_space_and_temperature_limit(dtype, spaces):
    """Every kind, every pair of spaces, T = 1 and (log spaces) T at both ends of its range."""
    rng = np.random.default_rng(20)
    p, q = _base_rows(rng, 4, 9, lo=-4)
    temps = (1.0,) if "probs" in spaces else (1.0, 1e-6, 1e6)
    for T in temps:
        # logits stretched by T so that the distributions stay ordinary at either end
        a = _to_space(p, spaces[0], dtype, shift=3.0, T=T)
        b = _to_space(q, spaces[1], dtype, shift=-2.0, T=T)
        if T != 1.0:
            a, b = a[::2], b[::2]
        refs = oracle_rows(a, b, spaces[0], spaces[1], T)
        for kind in FNS:
            # log_probs at T != 1 are not normalised at T: checks off there (the core's rule)
            v = None if T == 1.0 else False
            three_way(kind, a, b, p_space=spaces[0], q_space=spaces[1], temperature=T,
                      validate=v, refs=refs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_diff_shifted_logits_and_range_limits(dtype):
    """Logits shifted by up to 1e30 (float64) or near float32's maximum, on one side or both,
    entries at +-finfo.max, at T = 1 and at both ends of the temperature range."""
    rng = np.random.default_rng(21)
    big = float(np.finfo(dtype).max)
    p, q = _base_rows(rng, 3, 6, lo=-3)
    la, lb = np.log(p), np.log(q)
    top = 1e30 if dtype == np.float64 else 3e38
    rows_a, rows_b = [], []
    for s1, s2 in [(top, 0.0), (0.0, -top), (top, top), (-top, top / 3)]:
        rows_a.append(la + s1)
        rows_b.append(lb + s2)
    a = np.concatenate(rows_a).astype(dtype)
    b = np.concatenate(rows_b).astype(dtype)
    # entries at +-finfo.max or half of it, every side's range and every log-ratio within the
    # dtype (beyond it the core documents a lower bound), divergences ordinary or ~finfo.max / 2
    h = big / 2
    edge = np.array([[big, big, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [h, -h, 0.5, 0.25],
                     [-h, 0.0, 1.0, 2.0]], dtype)
    edge_q = np.array([[0.0, 1.0, 2.0, 3.0], [h, 0.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0],
                       [0.5, 0.25, 1.0, 2.0]], dtype)
    L = dict(p_space="logits", q_space="logits")
    for T in (1.0, 1e-6, 1e6):
        for x, y in ((a, b), (edge, edge_q)) if T == 1.0 else ((a, b),):
            refs = oracle_rows(x, y, "logits", "logits", T)
            for kind in FNS:
                three_way(kind, x, y, temperature=T, refs=refs, **L)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_diff_masking_with_minus_inf_and_finfo_min(dtype):
    """Masked vocabulary entries as -inf or as finfo.min (a finite mask: the probability is 0 in
    every float, the log-ratio across it is astronomically large), on p, on q, on both, whole
    rows but one entry; logits and log-probabilities; T = 1, 1e-6, 1e6."""
    rng = np.random.default_rng(22)
    p, q = _base_rows(rng, 6, 6, lo=-3)
    a, b = np.log(p), np.log(q)
    for fill in (-np.inf, float(np.finfo(dtype).min)):
        x, y = a.copy(), b.copy()
        x[0, 2] = fill
        y[1, 3] = fill
        x[2, 4] = y[2, 4] = fill
        x[3, 1] = fill
        y[3, 5] = fill
        x[4, 1:] = fill
        y[5, :-1] = fill
        x, y = x.astype(dtype), y.astype(dtype)
        # (finfo.min / 1e-6 is beyond float64, where tests/oracle.py cannot size its digits;
        # and a finite mask costs the oracle ~1000 digits a row: T = 1 only)
        for T in (1.0, 1e-6, 1e6) if fill == -np.inf else (1.0,):
            refs = oracle_rows(x, y, "logits", "logits", T)
            for kind in FNS:
                three_way(kind, x, y, p_space="logits", q_space="logits", temperature=T,
                          refs=refs)
        # log-probabilities (renormalised so that the checks pass where they should)
        lx = x - np.log(np.exp(x.astype(np.float64)).sum(-1, keepdims=True)).astype(dtype)
        refs = oracle_rows(lx, y, "log_probs", "logits", 1.0)
        for kind in FNS:
            three_way(kind, lx, y, p_space="log_probs", q_space="logits", refs=refs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_diff_subnormal_and_zero_probabilities(dtype):
    """Subnormal probabilities on either side (down to the dtype's smallest), exact zeros, q = 0
    where p > 0, disjoint supports; against the other side in each space."""
    tiny = float(np.finfo(dtype).smallest_subnormal)
    sub = float(np.finfo(dtype).smallest_normal) / 8
    p = np.array([[tiny, sub, 0.5, 0.5 - sub - tiny], [0.25, 0.25, 0.25, 0.25],
                  [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, tiny, 1.0, 0.0]])
    q = np.array([[0.25, 0.25, 0.25, 0.25], [tiny, 3 * tiny, 0.5, 0.5], [0.5, 0.5, tiny, 0.0],
                  [0.0, 0.0, 0.5, 0.5], [0.0, 0.5, 0.5, sub]])
    p, q = p.astype(dtype), q.astype(dtype)
    refs = oracle_rows(p, q, "probs", "probs", 1.0)
    for kind in FNS:
        three_way(kind, p, q, refs=refs)
    with np.errstate(divide="ignore"):
        lq = np.log(q.astype(np.float64)).astype(dtype)  # zeros become -inf
    refs = oracle_rows(p, lq, "probs", "log_probs", 1.0)
    for kind in FNS:
        three_way(kind, p, lq, q_space="log_probs", refs=refs)
        three_way(kind, lq, p, p_space="logits", validate=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_diff_single_category(dtype):
    """V = 1: every space pair, ordinary values, huge logits, -inf (no support: the core's
    error), a zero probability (the core's error)."""
    vals = {"probs": [[1.0]], "log_probs": [[0.0]], "logits": [[0.0], [1e30 if dtype ==
                                                                     np.float64 else 3e38],
                                                                    [-7.5]]}
    for ps, qs in SPACE_PAIRS:
        a = np.array(vals[ps], dtype)
        b = np.array(vals[qs], dtype)
        n = max(len(a), len(b))
        a, b = np.resize(a, (n, 1)), np.resize(b, (n, 1))
        for kind in FNS:
            got = three_way(kind, a, b, p_space=ps, q_space=qs)
            assert got is not None and (got == 0).all(), (ps, qs, kind)
    for bad_p, space in (([[-np.inf]], "logits"), ([[0.0]], "probs")):
        for kind in FNS:
            three_way(kind, np.array(bad_p, dtype), np.zeros((1, 1), dtype), p_space=space,
                      q_space="logits")


def _extended_refs(la, lb):
    """Every kind for one pair of logit rows in np.longdouble (tests/oracle.py's log-softmax;
    textbook formulas, 0 log 0 = 0, +inf where p > 0 = q)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return _extended_refs_(la, lb)


def _extended_refs_(la, lb):
    lp, lq = oracle._log_softmax_ld(la[None])[0], oracle._log_softmax_ld(lb[None])[0]
    P, Q = np.exp(lp), np.exp(lq)

    def kl(P, lp, lq):
        if ((P > 0) & np.isneginf(lq)).any():
            return math.inf
        return float(np.sum(np.where(P > 0, P * (lp - np.where(P > 0, lq, 0)), 0)))

    half = np.longdouble(0.5)
    lm = np.log(half * P + half * Q)
    js = half * np.sum(np.where(P > 0, P * (lp - lm), 0)) + half * np.sum(
        np.where(Q > 0, Q * (np.where(Q > 0, lq, 0) - lm), 0))
    fw, rv = kl(P, lp, lq), kl(Q, lq, lp)
    return {"forward": fw, "reverse": rv, "js": float(js), "jeffreys": fw + rv}


def test_diff_v200000_one_row():
    """One row of 200000 categories, each space, float32 and float64: fast path, core and an
    extended-precision textbook reference (tests/oracle.py's kl_extended / js_extended)."""
    rng = np.random.default_rng(23)
    v = 200_000
    la = rng.standard_normal(v) * 3
    lb = la + rng.standard_normal(v) * 0.05
    lb[rng.random(v) < 1e-3] = -np.inf  # q = 0 at a few places p > 0: forward KL is +inf
    lb2 = np.where(np.isinf(lb), la - 20, lb)  # the same without the zeros: all finite
    refs, refs2 = _extended_refs(la, lb), _extended_refs(la, lb2)
    assert math.isinf(refs["forward"]) and math.isfinite(refs["reverse"])
    for dtype in (np.float32, np.float64):
        for y, ref in ((lb, refs), (lb2, refs2)):
            x = la.astype(dtype)[None]
            yy = y.astype(dtype)[None]
            xs = np.exp(x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum()))
            ps = "logits" if dtype == np.float64 else "probs"
            a = x if ps == "logits" else xs.astype(dtype)
            if True:
                for kind, fn in FNS.items():
                    kw = dict(p_space=ps, q_space="logits")
                    got = float(np.asarray(fn(a, yy, **kw))[0])
                    with core_only():
                        core = float(np.asarray(fn(a, yy, **kw))[0])
                    r = ref[kind]
                    if math.isinf(r):
                        assert got == core == math.inf, (dtype, ps, kind)
                        continue
                    # the reference is of the float64 logits; float32 storage moves the value
                    # by ~eps32 relative, probabilities by ~eps32 per entry
                    tol = 1e-3 if dtype == np.float32 else 1e-9
                    assert got == pytest.approx(r, rel=tol), (dtype, ps, kind)
                    assert core == pytest.approx(got, rel=tol), (dtype, ps, kind)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_diff_odd_strides_and_layouts(dtype):
    """Negative and odd strides, Fortran order, the category axis first or in the middle, a
    broadcast (stride 0) side: the same values as the core and the oracle."""
    rng = np.random.default_rng(24)
    p, q = _base_rows(rng, 10, 15, lo=-4)
    lp, lq = np.log(p).astype(dtype), np.log(q).astype(dtype)
    P, Q = p.astype(dtype), q.astype(dtype)
    cases = [
        (P[::-3, ::-1], Q[-1::-3], "probs", "probs", -1),
        (np.asfortranarray(P), np.asfortranarray(Q), "probs", "probs", -1),
        (lp.T[::-1], lq.T[::-1], "logits", "log_probs", 0),
        (lp[:, ::2].reshape(2, 5, 8).transpose(0, 2, 1), lq[:, 1::2].reshape(2, 5, 7)[..., :1]
         .repeat(8, -1).transpose(0, 2, 1), "logits", "logits", 1),
        (np.broadcast_to(lp[0], (4, 15)), lq[:4, ::-1], "logits", "logits", -1),
    ]
    for a, b, ps, qs, axis in cases:
        refs = oracle_rows(np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1), ps, qs, 1.0)
        for kind in FNS:
            three_way(kind, a, b, p_space=ps, q_space=qs, axis=axis, refs=refs,
                      validate=False if qs == "log_probs" else None)


@pytest.mark.parametrize("space", ["probs", "logits"])
def test_diff_float16_summed_over_many_rows(space):
    """float16 inputs (the core's float32 accumulation; no NumPy kernel takes them) summed and
    averaged over 4096 rows: the handlers on, the core alone and the oracle's per-row values
    summed exactly agree to float16's resolution, with no overflow of the half-precision sum."""
    rng = np.random.default_rng(25)
    p, q = _base_rows(rng, 16, 11, lo=-2, hi=0.7)
    a, b = _to_space(p, space, np.float16, shift=4.0), _to_space(q, space, np.float16)
    if space == "probs":  # float16 rows within the float16 normalisation tolerance
        a = (a.astype(np.float64) / a.astype(np.float64).sum(-1, keepdims=True)).astype(np.float16)
        b = (b.astype(np.float64) / b.astype(np.float64).sum(-1, keepdims=True)).astype(np.float16)
    refs = oracle_rows(a, b, space, space, 1.0)
    A, B = np.tile(a, (256, 1)), np.tile(b, (256, 1))  # 4096 rows
    for kind, fn in FNS.items():
        for red in ("sum", "mean"):
            got = _value_or_error(fn, A, B, p_space=space, q_space=space, reduction=red,
                                  validate=False)
            with core_only():
                core = _value_or_error(fn, A, B, p_space=space, q_space=space, reduction=red,
                                       validate=False)
            assert not isinstance(core, tuple), core
            assert got.dtype == core.dtype and float(got) == float(core)
            exact = math.fsum(refs[kind]) * 256 / (4096 if red == "mean" else 1)
            assert np.isfinite(got) == (exact < 65504), (kind, red)
            if exact < 65504:
                assert float(got) == pytest.approx(exact, rel=4e-3), (kind, red)
