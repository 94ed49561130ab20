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
