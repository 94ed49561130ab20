"""The row kernel of `kldiv compare` (compiled and NumPy fallback) against independent references.

References: an mpmath oracle (50 digits, textbook formula, inputs taken exactly), NumPy
extended precision for large vocabularies, scipy.special.log_softmax, and kldiv's core
(kl_div / reverse_kl / js_div with logits), which the kernel must agree with.
"""
from __future__ import annotations

import math
import os

import mpmath
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

import kldiv
from kldiv.backends import numpy_fast as NUMPY_FAST
from kldiv.compare import kernel as K

HAVE_EXT = K.extension() is not None
PATHS = [pytest.param(False, id="compiled"), pytest.param(True, id="numpy-fallback")]


def mp_kl(a, b):
    """KL(softmax(a) || softmax(b)) of one row with mpmath at 50 digits (inputs exact)."""
    with mpmath.workdps(50):
        A = [mpmath.mpf(float(x)) for x in a]
        B = [mpmath.mpf(float(x)) for x in b]
        fa = [x for x in A if x != -mpmath.inf]
        fb = [x for x in B if x != -mpmath.inf]
        la = max(fa) + mpmath.log(mpmath.fsum(mpmath.exp(x - max(fa)) for x in fa))
        lb = max(fb) + mpmath.log(mpmath.fsum(mpmath.exp(x - max(fb)) for x in fb))
        terms = []
        for x, y in zip(A, B):
            if x == -mpmath.inf:
                continue
            if y == -mpmath.inf:
                return math.inf
            lp, lq = x - la, y - lb
            terms.append(mpmath.exp(lp) * (lp - lq))
        return float(mpmath.fsum(terms))


EXTENDED = np.finfo(np.longdouble).eps < 1e-18


def ld_kl(a, b):
    """KL per row in NumPy extended precision (textbook formula; fast oracle for large V).

    Checked against mpmath in test_extended_oracle; without extended precision (some platforms)
    it falls back to mpmath row by row.
    """
    if not EXTENDED:
        return np.array([mp_kl(x, y) for x, y in zip(np.atleast_2d(a), np.atleast_2d(b))])
    la, lb = ld_log_softmax(a), ld_log_softmax(b)
    return np.asarray((np.exp(la) * (la - lb)).sum(1), dtype=np.float64)


def ld_log_softmax(x):
    """Row-wise log-softmax in NumPy extended precision."""
    x = np.asarray(x, dtype=np.longdouble)
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def ld_js(a, b):
    """Jensen-Shannon divergence (beta = 1/2) per row, textbook formula in extended precision."""
    la, lb = ld_log_softmax(a), ld_log_softmax(b)
    p, q = np.exp(la), np.exp(lb)
    lm = np.log((p + q) / 2)
    return np.asarray(0.5 * (p * (la - lm)).sum(1) + 0.5 * (q * (lb - lm)).sum(1), dtype=np.float64)


def close_pairs(rng, n, v, *, shift=7.5, lo=-7, hi=0):
    """float32 logits a and b = a + shift + noise with noise scales over 10**lo .. 10**hi."""
    a = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    scales = np.logspace(lo, hi, n)[:, None]
    b = (a.astype(np.float64) + shift + rng.standard_normal((n, v)) * scales).astype(np.float32)
    return a, b


def run(a, b, fallback, **kw):
    if not fallback and not HAVE_EXT:
        if os.environ.get("KLDIV_NO_EXT", "") not in ("", "0"):
            pytest.skip("compiled kernel switched off by KLDIV_NO_EXT")
        pytest.fail("the compiled kernel kldiv._ext._rowstats is not built "
                    "(python setup.py build_ext --inplace), or set KLDIV_NO_EXT=1")
    return K.row_stats(a, b, force_fallback=fallback, **kw)


def test_extended_oracle():
    """The extended-precision oracle agrees with mpmath (so it may stand in for it)."""
    rng = np.random.default_rng(0)
    a, b = close_pairs(rng, 4, 48, lo=-5, hi=0)
    ref = np.array([mp_kl(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(ld_kl(a, b), ref, rtol=1e-7)


@pytest.mark.parametrize("fallback", PATHS)
def test_kl_matches_mpmath_small_vocab(fallback):
    rng = np.random.default_rng(1)
    a, b = close_pairs(rng, 6, 64, lo=-4.5, hi=0)
    r = run(a, b, fallback, reverse=True)
    ref = np.array([mp_kl(x, y) for x, y in zip(a, b)])
    rev = np.array([mp_kl(y, x) for x, y in zip(a, b)])
    big = ref >= 1e-9
    assert big.sum() >= 5
    np.testing.assert_allclose(r.kl[big], ref[big], rtol=1e-4)
    np.testing.assert_allclose(r.rkl[rev >= 1e-9], rev[rev >= 1e-9], rtol=1e-4)
    # below 1e-9 the error stays tiny in absolute terms
    np.testing.assert_allclose(r.kl, ref, rtol=1e-4, atol=1e-13)


@pytest.mark.parametrize("fallback", PATHS)
def test_kl_large_vocab_shifted_logits(fallback):
    """32000 categories, the other side shifted by a constant (common in practice)."""
    rng = np.random.default_rng(2)
    a, b = close_pairs(rng, 12 if EXTENDED else 2, 32000, shift=-13.25, lo=-5, hi=0)
    ref = ld_kl(a, b)
    r = run(a, b, fallback)
    big = ref >= 1e-9
    np.testing.assert_allclose(r.kl[big], ref[big], rtol=1e-4)


@pytest.mark.parametrize("fallback", PATHS)
def test_kl_equals_core(fallback):
    """Same values as kldiv.kl_div / reverse_kl with p_space = q_space = "logits"."""
    rng = np.random.default_rng(3)
    a, b = close_pairs(rng, 40, 300, lo=-4, hi=0.5)
    r = run(a, b, fallback, reverse=True)
    core = np.asarray(kldiv.kl_div(a, b, p_space="logits", q_space="logits"), dtype=np.float64)
    core_r = np.asarray(kldiv.reverse_kl(a, b, p_space="logits", q_space="logits"), dtype=np.float64)
    ref = ld_kl(a, b)
    big = ref >= 1e-9
    np.testing.assert_allclose(r.kl[big], ref[big], rtol=1e-4)
    np.testing.assert_allclose(r.kl[big], core[big], rtol=2e-4)
    np.testing.assert_allclose(r.rkl[big], core_r[big], rtol=2e-4)


def test_js_rows_equal_core_and_mpmath():
    rng = np.random.default_rng(4)
    a, b = close_pairs(rng, 4, 40, lo=-3, hi=0.5)
    js = K.js_rows(a, b)
    core = np.asarray(kldiv.js_div(a, b, p_space="logits", q_space="logits"), dtype=np.float64)
    with mpmath.workdps(50):
        ref = []
        for x, y in zip(a, b):
            P = [mpmath.exp(mpmath.mpf(float(t))) for t in x]
            Q = [mpmath.exp(mpmath.mpf(float(t))) for t in y]
            sp, sq = mpmath.fsum(P), mpmath.fsum(Q)
            P = [t / sp for t in P]
            Q = [t / sq for t in Q]
            M = [(s + t) / 2 for s, t in zip(P, Q)]
            ref.append(float(mpmath.fsum(s * mpmath.log(s / m) + t * mpmath.log(t / m)
                                         for s, t, m in zip(P, Q, M)) / 2))
    np.testing.assert_allclose(js, ref, rtol=1e-4)
    np.testing.assert_allclose(js, core, rtol=1e-4)


@pytest.mark.parametrize("fallback", PATHS)
def test_top1_tokens_and_partition(fallback):
    rng = np.random.default_rng(5)
    a, b = close_pairs(rng, 30, 257, lo=-1, hi=0.7)
    a[0, 5] = a[0, 9] = a[0].max() + 1  # ties: the first index wins (as llama.cpp)
    tok = rng.integers(0, 257, 30)
    r = run(a, b, fallback, tokens=tok)
    assert r.top_ref[0] == 5
    np.testing.assert_array_equal(r.top_ref, np.argmax(a, 1))
    np.testing.assert_array_equal(r.top_other, np.argmax(b, 1))
    lsa = scipy.special.log_softmax(a.astype(np.float64), axis=1)
    lsb = scipy.special.log_softmax(b.astype(np.float64), axis=1)
    rows = np.arange(30)
    np.testing.assert_allclose(r.lp_ref_tok, lsa[rows, tok], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r.lp_other_tok, lsb[rows, tok], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.exp(-r.logz_ref), np.exp(lsa.max(1)), rtol=1e-6)
    assert (r.status == 0).all()


@pytest.mark.parametrize("fallback", PATHS)
def test_edges_support_and_bad_values(fallback):
    v = 6
    a = np.zeros((8, v), np.float32)
    b = np.zeros((8, v), np.float32)
    a[0, 2] = -np.inf  # p = 0 where q > 0: finite, the -log q(S) term
    b[1, 2] = -np.inf  # q = 0 where p > 0: +inf
    a[2, 1] = b[2, 1] = -np.inf  # both zero there: same as a 5-category row
    a[3, 0] = np.nan
    b[4, 3] = np.inf
    a[5] = -np.inf  # reference row with no finite entry
    b[6, 1] = 2.0
    r = run(a, b, fallback, reverse=True, tokens=np.array([0, 0, 0, 0, 0, 0, 0, v]))
    assert r.kl[0] == pytest.approx(math.log(6 / 5), rel=1e-6)   # p uniform on 5, q uniform on 6
    assert r.rkl[0] == math.inf
    assert r.kl[1] == math.inf and r.rkl[1] == pytest.approx(math.log(6 / 5), rel=1e-6)
    assert r.kl[2] == pytest.approx(0.0, abs=1e-12)
    assert r.kl[6] == pytest.approx(mp_kl(a[6], b[6]), rel=1e-5)
    assert r.status[3] & K.NAN_REF and not r.status[3] & K.NAN_OTHER
    assert r.status[4] & K.PINF_OTHER
    assert r.status[5] & K.EMPTY_REF
    assert r.status[7] & K.BAD_TOKEN
    assert (r.status[[0, 1, 2, 6]] == 0).all()


@pytest.mark.parametrize("fallback", PATHS)
def test_q_mass_mostly_off_the_support_of_p(fallback):
    """-log q(S) without cancellation when q(S) is tiny: p uniform on 2 of 4, q puts e^10 on the
    other two. KL = log(1 + e^10); reverse is infinite (q > 0 = p)."""
    a = np.array([[0.0, 0.0, -np.inf, -np.inf]], np.float32)
    b = np.array([[0.0, 0.0, 10.0, 10.0]], np.float32)
    r = run(a, b, fallback, reverse=True)
    assert r.kl[0] == pytest.approx(math.log1p(math.exp(10.0)), rel=1e-6)
    assert r.rkl[0] == math.inf


@pytest.mark.skipif(not HAVE_EXT, reason="compiled kernel not built")
def test_compiled_and_fallback_agree_and_env_forces_fallback(monkeypatch):
    rng = np.random.default_rng(6)
    a, b = close_pairs(rng, 50, 1000, lo=-4, hi=1)
    b[7, :500] -= 40  # a row with a large divergence (KL of several nats)
    tok = rng.integers(0, 1000, 50)
    fast = K.row_stats(a, b, tokens=tok, reverse=True)
    slow = K.row_stats(a, b, tokens=tok, reverse=True, force_fallback=True)
    np.testing.assert_allclose(fast.kl, slow.kl, rtol=1e-4, atol=1e-14)
    np.testing.assert_allclose(fast.rkl, slow.rkl, rtol=1e-4, atol=1e-14)
    np.testing.assert_array_equal(fast.top_ref, slow.top_ref)
    np.testing.assert_allclose(fast.lp_other_tok, slow.lp_other_tok, rtol=1e-6, atol=1e-6)
    # the rows spread over worker threads give bit-identical results to one thread
    for th in (1, 3):
        split = K.row_stats(a, b, tokens=tok, reverse=True, threads=th)
        np.testing.assert_array_equal(split.kl, fast.kl)
        np.testing.assert_array_equal(split.rkl, fast.rkl)
        np.testing.assert_array_equal(split.lp_ref_tok, fast.lp_ref_tok)
        np.testing.assert_array_equal(split.status, fast.status)
    monkeypatch.setenv("KLDIV_NO_EXT", "1")
    assert K.extension() is None


@pytest.mark.parametrize("fallback", PATHS)
def test_huge_divergence_does_not_overflow(fallback):
    """Disjoint-ish rows: KL of ~200 nats stays finite and right (overflow-safe branch)."""
    a = np.array([[0.0, -200.0, -200.0], [0.0, 0.0, -300.0]], np.float32)
    b = np.array([[-200.0, 0.0, 0.0], [-300.0, 0.0, 0.0]], np.float32)
    r = run(a, b, fallback, reverse=True)
    for i in range(2):
        assert r.kl[i] == pytest.approx(mp_kl(a[i], b[i]), rel=1e-5)
        assert r.rkl[i] == pytest.approx(mp_kl(b[i], a[i]), rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(2, 70), scale=st.floats(1e-3, 5.0),
       shift=st.floats(-50, 50))
def test_properties(seed, v, scale, shift):
    """KL >= 0; KL(p, p) = 0; invariance to adding a constant to either side's logits."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((3, v)) * 3).astype(np.float32)
    b = (a + rng.standard_normal((3, v)) * scale).astype(np.float32)
    for fb in ([False, True] if HAVE_EXT else [True]):
        r = K.row_stats(a, b, force_fallback=fb)
        assert (r.kl >= 0).all()
        same = K.row_stats(a, a, force_fallback=fb)
        np.testing.assert_array_equal(same.kl, 0.0)
        shifted = K.row_stats(a, (b.astype(np.float64) + shift).astype(np.float32), force_fallback=fb)
        ref = ld_kl(a, (b.astype(np.float64) + shift).astype(np.float32))
        np.testing.assert_allclose(shifted.kl, ref, rtol=1e-4, atol=1e-10)


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        K.row_stats(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="tokens must have shape"):
        K.row_stats(np.zeros((2, 3)), np.zeros((2, 3)), tokens=[1, 2, 3])


def ld_kl_supports(a, b):
    """KL per row in extended precision with -inf logits (p_i = 0 terms dropped, q_i = 0 < p_i
    gives inf): the textbook definition, row by row."""
    out = []
    for x, y in zip(np.asarray(a, np.longdouble), np.asarray(b, np.longdouble)):
        fx, fy = np.isfinite(x), np.isfinite(y)
        if np.any(fx & ~fy):
            out.append(math.inf)
            continue
        lp = x[fx] - x[fx].max()
        lp = lp - np.log(np.exp(lp).sum())
        lq = y - y[fy].max()
        lq = lq - np.log(np.exp(lq[fy]).sum())
        out.append(float((np.exp(lp) * (lp - lq[fx])).sum()))
    return np.array(out)


@pytest.mark.skipif(not EXTENDED, reason="no extended precision for the oracle")
@pytest.mark.parametrize("fallback", PATHS)
def test_random_rows_with_zero_probabilities(fallback):
    """Rows with -inf logits on either or both sides, shifted and scaled: against the oracle."""
    rng = np.random.default_rng(7)
    for _ in range(12):
        n, v = int(rng.integers(1, 8)), int(rng.integers(2, 600))
        a = (rng.standard_normal((n, v)) * rng.uniform(0.1, 8)).astype(np.float32)
        b = (a * rng.uniform(0.7, 1.3) + rng.standard_normal((n, v)) * 10 ** rng.uniform(-5, 0.5)
             + rng.uniform(-40, 40)).astype(np.float32)
        a[rng.random((n, v)) < 0.15] = -np.inf
        both = rng.random((n, v)) < 0.1
        a[both] = b[both] = -np.inf
        a[:, 0] = 0.0  # keep every row non-empty
        b[:, 0] = 0.0
        if rng.random() < 0.5:
            b[rng.random((n, v)) < 0.02] = -np.inf
        r = run(a, b, fallback, reverse=True)
        for got, ref in ((r.kl, ld_kl_supports(a, b)), (r.rkl, ld_kl_supports(b, a))):
            np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
            fin = np.isfinite(ref)
            np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-4, atol=1e-12)


def _child_kl(q, a, b):
    q.put(K.row_stats(a, b).kl.tolist())


@pytest.mark.skipif(not HAVE_EXT, reason="compiled kernel not built")
def test_thread_pool_survives_fork():
    """After the pool has run in the parent, a forked child gets its own pool (no hang)."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    rng = np.random.default_rng(8)
    a, b = close_pairs(rng, 32, 50, lo=-2, hi=0)
    parent = K.row_stats(a, b, threads=2).kl
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_kl, args=(q, a, b))
    p.start()
    try:
        child = q.get(timeout=60)
    finally:
        p.join(timeout=60)
    np.testing.assert_array_equal(child, parent)


@pytest.mark.skipif(not EXTENDED, reason="no extended precision for the oracle")
@pytest.mark.parametrize("fallback", PATHS)
def test_forward_only_rows_across_blocks(fallback):
    """Forward KL without reverse (the kernel's one-exponential path), V spanning several blocks.

    Rows mix blocks where the other model agrees closely (|log-ratio| < 0.5 everywhere: Taylor
    series only) with blocks holding large log-ratios, entries the reference gives ~e^-100 (its
    weight underflows in float32) while the other gives them weight, a last partial block, and
    very negative but finite logits; KL, the token log-probabilities of both sides and the
    reference's top-1 probability are checked against extended precision / scipy.
    """
    rng = np.random.default_rng(11)
    n, v = 24, 2048 * 4 + 123
    a = (rng.standard_normal((n, v)) * 2.5).astype(np.float64)
    b = a + 3.0 + rng.standard_normal((n, v)) * np.logspace(-6, -1, n)[:, None]
    for i in range(n):
        blk = rng.integers(0, 5)
        lo, hi = blk * 2048, min(v, blk * 2048 + 2048)
        if i % 3 == 0:  # one block with large log-ratios
            b[i, lo:hi] += rng.standard_normal(hi - lo) * 2.0
        if i % 3 == 1:  # reference ~ e^-100 below its mode there, the other model not
            k = rng.integers(lo, hi, 5)
            a[i, k] = a[i].max() - 100.0
            b[i, k] = b[i].max() + 0.5
        if i % 4 == 2:
            a[i, rng.integers(0, v, 3)] = -1e30  # finite, far below: probability 0 in float32
            b[i, rng.integers(0, v, 3)] -= 60.0
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    tok = rng.integers(0, v, n)
    r = run(a, b, fallback, tokens=tok)
    ref = ld_kl(a, b)
    assert (r.status == 0).all()
    np.testing.assert_allclose(r.kl, ref, rtol=1e-4, atol=1e-13)
    lsa = scipy.special.log_softmax(a.astype(np.float64), axis=1)
    lsb = scipy.special.log_softmax(b.astype(np.float64), axis=1)
    rows = np.arange(n)
    np.testing.assert_allclose(r.lp_ref_tok, lsa[rows, tok], rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(r.lp_other_tok, lsb[rows, tok], rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(np.exp(-r.logz_ref), np.exp(lsa.max(1)), rtol=1e-6)
    np.testing.assert_array_equal(r.top_ref, np.argmax(a, 1))
    np.testing.assert_array_equal(r.top_other, np.argmax(b, 1))
    # the same rows with the reverse KL and JS (the kernel's fourth pass)
    r2 = run(a, b, fallback, tokens=tok, reverse=True, js=True)
    np.testing.assert_allclose(r2.kl, ref, rtol=1e-4, atol=1e-13)
    np.testing.assert_allclose(r2.rkl, ld_kl(b, a), rtol=1e-4, atol=1e-13)
    np.testing.assert_allclose(r2.js, ld_js(a, b), rtol=1e-4, atol=1e-13)


@pytest.mark.skipif(not EXTENDED, reason="no extended precision for the oracle")
@pytest.mark.parametrize("fallback", PATHS)
def test_reverse_and_js_of_close_and_far_rows(fallback):
    """Reverse KL and JS from 1e-12 to ~ln 2 (float32 logits, shifted), against extended precision;
    JS of rows with -inf logits comes from the NumPy formula, NaN rows stay NaN."""
    rng = np.random.default_rng(12)
    a, b = close_pairs(rng, 16, 5000, shift=4.25, lo=-6, hi=1)
    b[-1] = a[-1] * -3.0  # far apart: JS near ln 2
    a[3, :7] = -np.inf  # a row with zero probabilities (not all-finite)
    b[3, :7] = -np.inf
    r = run(a, b, fallback, reverse=True, js=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # row 3 redone below without -inf
        js_ref, rkl_ref = ld_js(a, b), ld_kl(b, a)
    js_ref[3], rkl_ref[3] = ld_js(a[3:4, 7:], b[3:4, 7:])[0], ld_kl(b[3:4, 7:], a[3:4, 7:])[0]
    # float32 kernel: ~1e-7 relative typically; docs/compare.md quotes this bound
    for got, want in ((r.js, js_ref), (r.rkl, rkl_ref)):
        np.testing.assert_allclose(got, want, rtol=3e-6, atol=1e-16)
    assert js_ref.min() < 1e-9 and js_ref.max() > 0.5
    a[5, 10] = np.nan
    r = run(a, b, fallback, js=True)
    assert np.isnan(r.js[5]) and np.isfinite(np.delete(r.js, 5)).all()


@pytest.mark.parametrize("fallback", PATHS)
def test_forward_only_huge_divergence_and_tokens(fallback):
    """The one-exponential path overflows to the double fallback for ~200-nat rows, tokens too."""
    a = np.full((2, 5000), -200.0, np.float32)
    b = np.full((2, 5000), -200.0, np.float32)
    a[:, 7] = 0.0
    b[:, 4000] = 0.0
    b[1, 7] = -150.0
    tok = np.array([4000, 7])
    r = run(a, b, fallback, tokens=tok)
    lsa = scipy.special.log_softmax(a.astype(np.float64), axis=1)
    lsb = scipy.special.log_softmax(b.astype(np.float64), axis=1)
    # ~200 nats: no cancellation to fear, extended precision (checked against mpmath above) suffices
    np.testing.assert_allclose(r.kl, ld_kl(a, b), rtol=1e-6)
    assert r.kl.min() >= 149
    np.testing.assert_allclose(r.lp_ref_tok, lsa[[0, 1], tok], rtol=1e-6)
    np.testing.assert_allclose(r.lp_other_tok, lsb[[0, 1], tok], rtol=1e-6)


@pytest.mark.skipif(NUMPY_FAST.extension() is None,
                    reason="rows with huge logits take the double kernel kldiv._ext._divrows")
@pytest.mark.parametrize("fallback", PATHS)
def test_large_magnitude_logits_issue_11(fallback):
    """Issue 11 item 1: each side centred on its own before differencing. Logits of 1e30 next to
    ordinary ones, a side constant at -1.5e38 or -1e30, float32 3e38: KL, reverse KL and JS
    against mpmath (inputs exact), tokens and top-1 unchanged."""
    rows = [
        ([1e30, 1e30, -1e30, 0.0], [0.0, 5, 10, 1]),
        ([3e38, 3e38, 1, 2], [0.0, 1, 2, 3]),
        ([0.0, 1, 2, 3], [3e38, 3e38, 1, 2]),
        ([-1.5e38] * 4, [0.0, 1, 2, 3]),
        ([0.0, 1, 2, 3], [-1e30] * 4),
        ([3e38, -3e38, 0, 0], [0.99, 0.42, 0, 0]),
        ([1e5 + 0.5, 1e5, 1e5 - 3, 0.0], [1.0, 2, 3, 4]),
    ]
    a = np.array([r[0] for r in rows], np.float32)
    b = np.array([r[1] for r in rows], np.float32)
    r = run(a, b, fallback, reverse=True, js=True, tokens=np.zeros(len(rows), np.int32))
    for i in range(len(rows)):
        kl, rkl = mp_kl(a[i], b[i]), mp_kl(b[i], a[i])
        assert r.kl[i] == pytest.approx(kl, rel=1e-6), i
        assert r.rkl[i] == pytest.approx(rkl, rel=1e-6), i
        with mpmath.workdps(50):
            A = [mpmath.mpf(float(x)) for x in a[i]]
            B = [mpmath.mpf(float(x)) for x in b[i]]
            la = max(A) + mpmath.log(mpmath.fsum(mpmath.exp(x - max(A)) for x in A))
            lb = max(B) + mpmath.log(mpmath.fsum(mpmath.exp(x - max(B)) for x in B))
            p = [mpmath.exp(x - la) for x in A]
            q = [mpmath.exp(y - lb) for y in B]
            m = [(x + y) / 2 for x, y in zip(p, q)]
            js = float(mpmath.fsum(
                (x * mpmath.log(x / z) if x else 0) / 2 + (y * mpmath.log(y / z) if y else 0) / 2
                for x, y, z in zip(p, q, m)))
        assert r.js[i] == pytest.approx(js, rel=1e-6, abs=1e-15), i
    assert (r.status == 0).all()
    np.testing.assert_array_equal(r.top_ref, np.argmax(a, 1))


@pytest.mark.parametrize("fallback", PATHS)
def test_js_of_identical_rows_with_minus_inf_is_zero(fallback):
    """Issue 11 item 7: exactly 0, not ~1e-17."""
    rng = np.random.default_rng(13)
    a = rng.standard_normal((4, 300)).astype(np.float32)
    a[:, ::7] = -np.inf
    r = run(a, a.copy(), fallback, reverse=True, js=True)
    assert (r.js == 0).all() and (r.kl == 0).all() and (r.rkl == 0).all()
