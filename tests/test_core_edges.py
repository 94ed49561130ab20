"""Edge conventions of the core on explicit grids (scipy.special.rel_entr's table, per category):

    p_i > 0, q_i > 0:  p_i log(p_i / q_i)
    p_i = 0, q_i >= 0: 0            (also when both logits are -inf)
    p_i > 0 = q_i:     +inf

and never nan. References: the mpmath oracle (which renormalises probability rows, as kldiv
does), scipy.special.rel_entr, and closed forms written here. Gradients at the edges are in
test_core_grad.py.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.special

import kldiv
import oracle
from conftest import to_numpy

FUNCS = {"kl_div": "kl", "reverse_kl": "reverse_kl", "jeffreys_div": "jeffreys", "js_div": "js"}

# first-category probabilities of 2-category rows [x, 1 - x]: zero, subnormal, tiny, moderate, one
GRID64 = [0.0, 5e-324, 1e-310, 1e-200, 1e-17, 0.25, 0.5, 1.0]
GRID32 = [0.0, 1e-45, 1e-40, 1e-30, 1e-9, 0.25, 0.5, 1.0]


def _tol(dtype):
    """Relative tolerance; results in the subnormal range (below the dtype's ``tiny``) are held
    to 1e-5 * tiny absolute: their intermediates have few significant bits left."""
    if dtype == "float64":
        return dict(rtol=1e-12, atol=1e-5 * np.finfo(np.float64).tiny)
    return dict(rtol=1e-5, atol=1e-5 * np.finfo(np.float32).tiny)


def _grid(vals, dtype):
    pairs = list(itertools.product(vals, vals))
    p = np.array([[x, 1 - x] for x, _ in pairs], dtype=dtype)
    q = np.array([[y, 1 - y] for _, y in pairs], dtype=dtype)
    return p, q


def _grid_rows(dtype, backend="numpy"):
    p, q = _grid(GRID64 if dtype == "float64" else GRID32, dtype)
    if backend == "jax":
        keep = ~(_has_subnormal(p) | _has_subnormal(q))
        p, q = p[keep], q[keep]
    return p, q


def _has_subnormal(x):
    """XLA on CPU flushes subnormals to zero (a JAX platform property, not kldiv's): rows with
    subnormal entries are left out on the jax backend."""
    return np.any((x != 0) & (np.abs(x) < np.finfo(x.dtype).tiny), axis=-1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("fn", list(FUNCS))
def test_probability_grid_against_oracle(xp, fn, dtype):
    p, q = _grid_rows(dtype, backend=xp.name)
    got = to_numpy(getattr(kldiv, fn)(xp.asarray(p), xp.asarray(q)))
    ref = oracle.rows(FUNCS[fn], p.astype(np.float64), q.astype(np.float64))
    assert not np.any(np.isnan(got))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], **_tol(dtype))


def test_float32_small_q_where_p_is_moderate(xp):
    """Regression: q_i / p_i below float32 eps made (q - p) / p round to -1 and gave nan."""
    p = np.array([[0.25, 0.75], [0.75, 0.25]], dtype=np.float32)
    q = np.array([[1e-9, 1 - 1e-9], [1 - 1e-9, 1e-9]], dtype=np.float32)
    ref = oracle.rows("kl", p.astype(np.float64), q.astype(np.float64))
    for fn in ("kl_div", "jeffreys_div"):
        got = to_numpy(getattr(kldiv, fn)(xp.asarray(p), xp.asarray(q)))
        assert np.all(np.isfinite(got))
    np.testing.assert_allclose(to_numpy(kldiv.kl_div(xp.asarray(p), xp.asarray(q))), ref,
                               rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kl_terms_grid_matches_rel_entr(xp, dtype):
    vals = GRID64 if dtype == "float64" else GRID32
    p, q = _grid(vals, dtype)
    if xp.name == "jax":
        keep = ~(_has_subnormal(p) | _has_subnormal(q))
        p, q = p[keep], q[keep]
    got = to_numpy(kldiv.kl_terms(xp.asarray(p), xp.asarray(q)))
    ref = scipy.special.rel_entr(p.astype(np.float64), q.astype(np.float64))
    assert not np.any(np.isnan(got))
    np.testing.assert_array_equal(got == np.inf, ref == np.inf)
    np.testing.assert_array_equal(got[p == 0], 0.0)
    fin = np.isfinite(ref)
    tol = _tol(dtype)
    np.testing.assert_allclose(got[fin], ref[fin], **tol)


# ----------------------------------------------------------------------------------------------
# -inf in log space


NEG = -np.inf
LOG_CASES = {
    # name: (p logits, q logits)
    "both -inf": ([NEG, 0.0, 1.0, 2.0], [NEG, 2.0, 0.0, 1.0]),
    "p -inf only": ([NEG, 0.0, 1.0, 2.0], [3.0, 2.0, 0.0, 1.0]),
    "q -inf only": ([0.5, 0.0, 1.0, 2.0], [NEG, 2.0, 0.0, 1.0]),
    "p one-hot": ([NEG, NEG, 4.0, NEG], [0.3, -1.0, 2.0, 0.0]),
    "both one-hot, same": ([NEG, 7.0, NEG, NEG], [NEG, -3.0, NEG, NEG]),
    "both one-hot, different": ([NEG, 7.0, NEG, NEG], [NEG, NEG, 1.0, NEG]),
    "disjoint": ([0.0, 1.0, NEG, NEG], [NEG, NEG, 0.0, 2.0]),
    "large magnitude": ([1e4, 1e4 + 1.0, 1e4 - 3.0, NEG], [-1e4, -1e4 + 0.5, -1e4 - 2.0, -1e4]),
}


@pytest.mark.parametrize("space", ["logits", "log_probs"])
@pytest.mark.parametrize("fn", list(FUNCS))
def test_log_space_infinities_against_oracle(xp, fn, space):
    names = list(LOG_CASES)
    p = np.array([LOG_CASES[k][0] for k in names])
    q = np.array([LOG_CASES[k][1] for k in names])
    if space == "log_probs":
        p = p - scipy.special.logsumexp(p, axis=-1, keepdims=True)
        q = q - scipy.special.logsumexp(q, axis=-1, keepdims=True)
    got = to_numpy(getattr(kldiv, fn)(xp.asarray(p), xp.asarray(q), p_space=space,
                                       q_space=space))
    ref = oracle.rows(FUNCS[fn], p, q, p_space=space, q_space=space)
    assert not np.any(np.isnan(got)), dict(zip(names, got))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref), err_msg=str(names))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-12, atol=1e-15)


def test_log_space_infinity_closed_forms(xp):
    """The same cases against values written from the definitions."""
    names = list(LOG_CASES)
    p = np.array([LOG_CASES[k][0] for k in names])
    q = np.array([LOG_CASES[k][1] for k in names])
    got = dict(zip(names, to_numpy(kldiv.kl_div(xp.asarray(p), xp.asarray(q), p_space="logits",
                                                q_space="logits"))))
    qs = scipy.special.softmax([0.3, -1.0, 2.0, 0.0])
    np.testing.assert_allclose(got["p one-hot"], -np.log(qs[2]), rtol=1e-13)
    assert got["both one-hot, same"] == 0.0
    assert got["both one-hot, different"] == np.inf
    assert got["q -inf only"] == np.inf
    assert got["disjoint"] == np.inf
    ps = scipy.special.softmax([0.0, 1.0, 2.0])
    qs = scipy.special.softmax([3.0, 2.0, 0.0, 1.0])
    ref = np.sum(ps * (np.log(ps) - np.log(qs[1:])))
    np.testing.assert_allclose(got["p -inf only"], ref, rtol=1e-13)
    js = to_numpy(kldiv.js_div(xp.asarray(p), xp.asarray(q), p_space="logits", q_space="logits"))
    np.testing.assert_allclose(js[names.index("disjoint")], np.log(2), rtol=1e-14)
    np.testing.assert_allclose(js[names.index("both one-hot, different")], np.log(2), rtol=1e-14)


@pytest.mark.parametrize("space", ["probs", "logits"])
def test_one_hot_rows(xp, space):
    """p one-hot at k: KL(p || q) = -log q_k; KL(q || p) = +inf unless q is that one-hot too."""
    rng = np.random.default_rng(0)
    q = scipy.special.softmax(rng.normal(size=(3, 6)), axis=-1)
    p = np.zeros((3, 6))
    p[np.arange(3), [0, 2, 5]] = 1.0
    with np.errstate(divide="ignore"):
        pin = p if space == "probs" else np.log(p)
        qin = q if space == "probs" else np.log(q) + 1.0
    kw = dict(p_space=space, q_space=space)
    got = to_numpy(kldiv.kl_div(xp.asarray(pin), xp.asarray(qin), **kw))
    np.testing.assert_allclose(got, -np.log(q[np.arange(3), [0, 2, 5]]), rtol=1e-13)
    rev = to_numpy(kldiv.reverse_kl(xp.asarray(pin), xp.asarray(qin), **kw))
    assert np.all(rev == np.inf)
    same = to_numpy(kldiv.kl_div(xp.asarray(pin), xp.asarray(pin), **kw))
    np.testing.assert_array_equal(same, 0.0)
    np.testing.assert_array_equal(to_numpy(kldiv.jeffreys_div(xp.asarray(pin), xp.asarray(pin),
                                                              **kw)), 0.0)


def test_subnormal_probabilities_float32_and_float64(xp):
    """Subnormal entries on both sides with moderate ratios: exact values from the oracle."""
    for dtype, tiny in (("float64", 4e-320), ("float32", 2e-42)):
        p = np.array([[tiny, 3 * tiny, 0.5, 0.5], [tiny, 0.0, 0.25, 0.75]], dtype=dtype)
        q = np.array([[2 * tiny, tiny, 0.25, 0.75], [3 * tiny, tiny, 0.5, 0.5]], dtype=dtype)
        got = to_numpy(kldiv.kl_div(xp.asarray(p), xp.asarray(q)))
        ref = oracle.rows("kl", p.astype(np.float64), q.astype(np.float64))
        np.testing.assert_allclose(got, ref, rtol=1e-12 if dtype == "float64" else 1e-6)
        if xp.name == "jax":
            continue  # below, the divergence itself is a subnormal: XLA on CPU flushes it to 0
        # only the subnormal entries differ: a tiny positive value, not 0 and not nan
        p2 = np.array([[tiny, 0.5, 0.5]], dtype=dtype)
        q2 = np.array([[2 * tiny, 0.5, 0.5]], dtype=dtype)
        got2 = to_numpy(kldiv.kl_div(xp.asarray(p2), xp.asarray(q2)))
        ref2 = oracle.rows("kl", p2.astype(np.float64), q2.astype(np.float64))
        assert np.all(np.isfinite(got2)) and np.all(got2 >= 0)
        np.testing.assert_allclose(got2, ref2, rtol=1e-3, atol=1e-300 if dtype == "float64"
                                   else 1e-44)


def test_identical_inputs_give_exactly_zero(xp):
    rng = np.random.default_rng(1)
    for space in ("probs", "log_probs", "logits"):
        P = scipy.special.softmax(rng.normal(scale=4, size=(3, 12)), axis=-1)
        P[0, :4] = 0.0
        P /= P.sum(-1, keepdims=True)
        with np.errstate(divide="ignore"):
            x = P if space == "probs" else np.log(P) + (space == "logits") * 5.0
        for fn in FUNCS:
            got = to_numpy(getattr(kldiv, fn)(xp.asarray(x), xp.asarray(x), p_space=space,
                                               q_space=space))
            np.testing.assert_array_equal(got, 0.0, err_msg=f"{fn} {space}")


# ----------------------------------------------------------------------------------------------
# masses that underflow: finite log-probabilities whose exp is 0 in the dtype

UNDERFLOW = {
    # p's mass on q's support is exp(-750) (float64) or exp(-110) (float32): 0 after exp
    "float64": ([-800.0, -750.0, 0.0], [-5.0, 0.0, -np.inf]),
    "float32": ([-120.0, -110.0, 0.0], [-5.0, 0.0, -np.inf]),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("fn", ["kl_div", "reverse_kl", "jeffreys_div"])
def test_underflowing_masses_against_oracle(xp, fn, dtype):
    p, q = (np.array([x], dtype=dtype) for x in UNDERFLOW[dtype])
    for space in ("logits", "log_probs"):
        got = to_numpy(getattr(kldiv, fn)(xp.asarray(p), xp.asarray(q), p_space=space,
                                          q_space=space, validate=False))
        ref = oracle.rows(FUNCS[fn], p.astype(np.float64), q.astype(np.float64), p_space=space,
                          q_space=space)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
        fin = np.isfinite(ref)
        np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-12 if dtype == "float64" else 1e-5)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_js_with_underflowing_mass_is_finite(xp, dtype):
    """Regression: JS was +inf when p's mass on the common support underflowed to 0."""
    p, q = (np.array([x], dtype=dtype) for x in UNDERFLOW[dtype])
    for space in ("logits", "log_probs"):
        for beta in (0.5, 0.2):
            got = to_numpy(kldiv.js_div(xp.asarray(p), xp.asarray(q), beta=beta, p_space=space,
                                        q_space=space, validate=False))
            ref = oracle.rows("js", p.astype(np.float64), q.astype(np.float64), beta=beta,
                              p_space=space, q_space=space)
            np.testing.assert_allclose(got, ref, rtol=1e-12 if dtype == "float64" else 1e-6)
