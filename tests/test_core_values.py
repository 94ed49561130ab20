"""Values of the core (kl_div, reverse_kl, js_div, jeffreys_div, kl_terms) on every backend.

References, all independent of kldiv: scipy.special.rel_entr (float64), the mpmath oracle of
tests/oracle.py (50 digits, inputs taken exactly, float32 and float64), torch.nn.functional.kl_div
with log_target=True (argument order reversed: input = log q, target = log p), and naive float64
formulas written here for reductions, masks and weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special

import kldiv
import oracle
from conftest import to_numpy

SPACES = ("probs", "log_probs", "logits")


def rand_probs(rng, shape, zero_frac=0.0):
    """Random probability rows (last axis), float64, some exact zeros when zero_frac > 0."""
    x = rng.gamma(1.0, size=shape)
    if zero_frac:
        x = np.where(rng.random(shape) < zero_frac, 0.0, x)
        x[..., 0] = np.maximum(x[..., 0], 0.5)  # no empty row
    return x / x.sum(axis=-1, keepdims=True)


def in_space(rng, probs, space):
    """The same distributions written in ``space`` (logits get a random shift per row)."""
    if space == "probs":
        return probs.copy()
    with np.errstate(divide="ignore"):
        lp = np.log(probs)
    if space == "log_probs":
        return lp
    return lp + rng.normal(scale=3.0, size=probs.shape[:-1] + (1,))


def close_pair(rng, shape, scale=0.3):
    """Two probability rows a moderate KL apart (0.01 .. 1), float64."""
    a = rng.normal(size=shape)
    b = a + scale * rng.normal(size=shape)
    return scipy.special.softmax(a, axis=-1), scipy.special.softmax(b, axis=-1)


def cast(x, dtype):
    """``x`` rounded once to ``dtype`` and returned as float64 NumPy: the exact input values."""
    return np.asarray(x, dtype=dtype).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# scipy.special.rel_entr


def test_kl_matches_scipy_rel_entr(xp):
    rng = np.random.default_rng(0)
    p = rand_probs(rng, (3, 12), zero_frac=0.3)
    q = rand_probs(rng, (3, 12))
    q[0, :] = np.where(p[0] == 0, 0.0, q[0])  # q = 0 where p = 0: still finite
    q[0] /= q[0].sum()
    got = kldiv.kl_div(xp.asarray(p), xp.asarray(q))
    assert xp.is_native(got)
    ref = scipy.special.rel_entr(p, q).sum(axis=-1)
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-12, atol=1e-15)


def test_kl_terms_match_scipy_rel_entr(xp):
    rng = np.random.default_rng(1)
    p = rand_probs(rng, (3, 12), zero_frac=0.3)
    q = rand_probs(rng, (3, 12), zero_frac=0.3)
    q[:, 0] = 0.0  # p[:, 0] > 0 here: +inf terms
    q /= q.sum(axis=-1, keepdims=True)
    got = kldiv.kl_terms(xp.asarray(p), xp.asarray(q))
    assert xp.is_native(got) and tuple(got.shape) == p.shape
    np.testing.assert_allclose(to_numpy(got), scipy.special.rel_entr(p, q), rtol=1e-12, atol=1e-15)


def test_kl_sums_kl_terms_and_matches_entropy_definition(xp):
    """KL = cross-entropy - entropy (scipy.stats.entropy) on rows without zeros."""
    import scipy.stats

    rng = np.random.default_rng(2)
    p = rand_probs(rng, (3, 12))
    q = rand_probs(rng, (3, 12))
    got = to_numpy(kldiv.kl_div(xp.asarray(p), xp.asarray(q)))
    np.testing.assert_allclose(got, scipy.stats.entropy(p, q, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(
        got, to_numpy(kldiv.kl_terms(xp.asarray(p), xp.asarray(q))).sum(-1), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# the mpmath oracle, every pair of input spaces, float32 and float64


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("q_space", SPACES)
@pytest.mark.parametrize("p_space", SPACES)
def test_kl_against_oracle(xp, p_space, q_space, dtype):
    rng = np.random.default_rng(10 + SPACES.index(p_space) * 3 + SPACES.index(q_space))
    P, Q = close_pair(rng, (3, 12))
    p = cast(in_space(rng, P, p_space), dtype)
    q = cast(in_space(rng, Q, q_space), dtype)
    got = kldiv.kl_div(xp.asarray(p, dtype), xp.asarray(q, dtype), p_space=p_space,
                       q_space=q_space)
    assert str(got.dtype).endswith(dtype)
    ref = oracle.rows("kl", p, q, p_space=p_space, q_space=q_space)
    rtol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(to_numpy(got), ref, rtol=rtol)


@pytest.mark.parametrize("space", SPACES)
def test_kl_against_oracle_with_zeros(xp, space):
    """Zeros in p (and -inf log-probabilities / logits): exact values from the oracle."""
    rng = np.random.default_rng(20 + SPACES.index(space))
    P = rand_probs(rng, (3, 12), zero_frac=0.4)
    Q = rand_probs(rng, (3, 12))
    p, q = in_space(rng, P, space), in_space(rng, Q, space)
    got = kldiv.kl_div(xp.asarray(p), xp.asarray(q), p_space=space, q_space=space)
    ref = oracle.rows("kl", p, q, p_space=space, q_space=space)
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_computes_in_float32(xp, dtype):
    rng = np.random.default_rng(3)
    P, Q = close_pair(rng, (3, 12))
    a = xp.asarray(np.log(P), dtype)
    b = xp.asarray(np.log(Q), dtype)
    got = kldiv.kl_div(a, b, p_space="logits", q_space="logits")
    assert str(got.dtype).endswith("float32")
    ref = oracle.rows("kl", to_numpy(a), to_numpy(b), p_space="logits", q_space="logits")
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# torch.nn.functional.kl_div (log_target=True; its input is log q, its target is log p)


@pytest.mark.parametrize("q_space", ["log_probs", "logits"])
def test_kl_against_torch_functional(xp, q_space):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(4)
    P, Q = close_pair(rng, (2, 3, 12), scale=1.0)
    lp = np.log(P)
    q = in_space(rng, Q, q_space)
    ref_rows = F.kl_div(torch.log_softmax(torch.from_numpy(q), -1), torch.from_numpy(lp),
                        log_target=True, reduction="none").sum(-1).numpy()
    got = kldiv.kl_div(xp.asarray(lp), xp.asarray(q), p_space="log_probs", q_space=q_space)
    np.testing.assert_allclose(to_numpy(got), ref_rows, rtol=1e-10)
    # torch's "batchmean" on 2-D input is the per-row mean, which is kldiv's "mean"
    ref_bm = F.kl_div(torch.log_softmax(torch.from_numpy(q[0]), -1), torch.from_numpy(lp[0]),
                      log_target=True, reduction="batchmean").item()
    got_mean = kldiv.kl_div(xp.asarray(lp[0]), xp.asarray(q[0]), p_space="log_probs",
                            q_space=q_space, reduction="mean")
    np.testing.assert_allclose(to_numpy(got_mean), ref_bm, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# axis, temperature, t2_scale


@pytest.mark.parametrize("axis", [0, 1, -2])
@pytest.mark.parametrize("space", ["probs", "logits"])
def test_axis_other_than_last(xp, axis, space):
    rng = np.random.default_rng(5)
    P, Q = close_pair(rng, (2, 3, 12))
    ax = axis % 3
    P, Q = np.moveaxis(P, -1, ax), np.moveaxis(Q, -1, ax)  # categories now on `axis`
    p, q = in_space(rng, np.moveaxis(P, ax, -1), space), in_space(rng, np.moveaxis(Q, ax, -1), space)
    ref = oracle.rows("kl", p, q, p_space=space, q_space=space)  # rows in the moved layout
    p, q = np.moveaxis(p, -1, ax), np.moveaxis(q, -1, ax)
    got = kldiv.kl_div(xp.asarray(p), xp.asarray(q), p_space=space, q_space=space, axis=axis)
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-12)
    terms = kldiv.kl_terms(xp.asarray(p), xp.asarray(q), p_space=space, q_space=space, axis=axis)
    assert tuple(terms.shape) == p.shape
    np.testing.assert_allclose(to_numpy(terms).sum(axis=ax), ref, rtol=1e-10)


@pytest.mark.parametrize("p_space,q_space", [("logits", "logits"), ("log_probs", "logits"),
                                             ("probs", "probs"), ("probs", "logits")])
@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_temperature_and_t2_scale(xp, p_space, q_space, temperature):
    rng = np.random.default_rng(6)
    P, Q = close_pair(rng, (3, 12), scale=1.0)
    p, q = in_space(rng, P, p_space), in_space(rng, Q, q_space)
    ref = oracle.rows("kl", p, q, p_space=p_space, q_space=q_space, temperature=temperature)
    kw = dict(p_space=p_space, q_space=q_space, temperature=temperature)
    got = kldiv.kl_div(xp.asarray(p), xp.asarray(q), **kw)
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-11)
    scaled = kldiv.kl_div(xp.asarray(p), xp.asarray(q), t2_scale=True, **kw)
    np.testing.assert_allclose(to_numpy(scaled), temperature**2 * ref, rtol=1e-11)
    summed = kldiv.kl_div(xp.asarray(p), xp.asarray(q), t2_scale=True, reduction="sum", **kw)
    np.testing.assert_allclose(to_numpy(summed), temperature**2 * ref.sum(), rtol=1e-11)


# ----------------------------------------------------------------------------------------------
# reductions, masks, weights


def _rows_ref(P, Q):
    return scipy.special.rel_entr(P, Q).sum(-1)


@pytest.mark.parametrize("space", SPACES)
def test_reductions_masks_weights(xp, space):
    rng = np.random.default_rng(7)
    P, Q = close_pair(rng, (2, 3, 12), scale=1.0)
    kl = _rows_ref(P, Q)
    p, q = in_space(rng, P, space), in_space(rng, Q, space)
    mask = rng.random((2, 3)) < 0.6
    mask[0, 0] = True
    w = rng.uniform(0.1, 2.0, size=(2, 3))
    w[1, 1] = 0.0
    # masked rows may hold anything, nan included: they are neither used nor checked
    p[~mask] = np.nan
    q[~mask] = np.nan
    kw = dict(p_space=space, q_space=space)
    a, b = xp.asarray(p), xp.asarray(q)
    m, ww = xp.asarray(mask), xp.asarray(w)

    def f(**k):
        return to_numpy(kldiv.kl_div(a, b, **kw, **k))

    km = np.where(mask, kl, 0.0)
    np.testing.assert_allclose(f(mask=m), km, rtol=1e-12)
    np.testing.assert_allclose(f(mask=m, reduction="sum"), km.sum(), rtol=1e-12)
    np.testing.assert_allclose(f(mask=m, reduction="mean"), km.sum() / mask.sum(), rtol=1e-12)
    np.testing.assert_allclose(f(mask=m, weight=ww), w * km, rtol=1e-12)
    np.testing.assert_allclose(f(mask=m, weight=ww, reduction="sum"), (w * km).sum(), rtol=1e-12)
    np.testing.assert_allclose(f(mask=m, weight=ww, reduction="mean"),
                               (w * km).sum() / (w * mask).sum(), rtol=1e-12)
    # no mask: plain mean over all 12 rows (never over categories), weighted mean
    a2, b2 = xp.asarray(in_space(rng, P, space)), xp.asarray(in_space(rng, Q, space))
    np.testing.assert_allclose(to_numpy(kldiv.kl_div(a2, b2, **kw, reduction="mean")),
                               kl.mean(), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(kldiv.kl_div(a2, b2, **kw, reduction="sum")),
                               kl.sum(), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(kldiv.kl_div(a2, b2, **kw, weight=ww, reduction="mean")),
                               (w * kl).sum() / w.sum(), rtol=1e-12)
    # a weight broadcast along the rows: one weight per position t of (B, T)
    wt = rng.uniform(0.5, 1.5, size=(3,))
    np.testing.assert_allclose(
        to_numpy(kldiv.kl_div(a2, b2, **kw, weight=xp.asarray(wt), reduction="mean")),
        (wt * kl).sum() / (wt * np.ones((2, 1))).sum(), rtol=1e-12)


def test_mean_with_nothing_counted_is_zero_and_inf_rows_with_weight_zero_vanish(xp):
    # (3, 12) like most tests here: JAX compiles each primitive once per shape
    p = np.zeros((3, 12))
    q = np.zeros((3, 12))
    p[0, :2], q[0, :2] = [1.0, 0.0], [0.0, 1.0]  # row 0: +inf
    p[1, :2], q[1, :2] = [0.5, 0.5], [0.25, 0.75]
    p[2], q[2] = 1 / 12, 1 / 12  # row 2: 0
    a, b = xp.asarray(p), xp.asarray(q)
    none = to_numpy(kldiv.kl_div(a, b, mask=xp.asarray(np.zeros(3, dtype=bool)), reduction="mean"))
    assert none == 0.0
    r1 = scipy.special.rel_entr(p[1], q[1]).sum()
    got = to_numpy(kldiv.kl_div(a, b, weight=xp.asarray(np.array([0.0, 2.0, 1.0])),
                                reduction="mean"))
    np.testing.assert_allclose(got, 2 * r1 / 3, rtol=1e-12)
    got = to_numpy(kldiv.kl_div(a, b, mask=xp.asarray(np.array([False, True, True])),
                                reduction="sum"))
    np.testing.assert_allclose(got, r1, rtol=1e-12)
    assert to_numpy(kldiv.kl_div(a, b, reduction="sum")) == np.inf


# ----------------------------------------------------------------------------------------------
# broadcasting


@pytest.mark.parametrize("shapes", [((1, 12), (3, 12)), ((3, 12), (1, 12)), ((2, 1, 12), (1, 3, 12))])
def test_broadcasting_p_against_q(xp, shapes):
    rng = np.random.default_rng(8)
    p = in_space(rng, rand_probs(rng, shapes[0]), "logits")
    q = rand_probs(rng, shapes[1])
    got = kldiv.kl_div(xp.asarray(p), xp.asarray(q), p_space="logits")
    ref = oracle.rows("kl", p, q, p_space="logits")
    assert tuple(got.shape) == ref.shape
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-12)
    got_sum = kldiv.kl_div(xp.asarray(p), xp.asarray(q), p_space="logits", reduction="mean")
    np.testing.assert_allclose(to_numpy(got_sum), ref.mean(), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# reverse KL, JS, Jeffreys


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p_space,q_space", [("probs", "probs"), ("logits", "logits"),
                                             ("log_probs", "probs"), ("probs", "logits")])
def test_family_against_oracle(xp, p_space, q_space, dtype):
    rng = np.random.default_rng(9)
    P, Q = close_pair(rng, (3, 12), scale=0.8)
    p = cast(in_space(rng, P, p_space), dtype)
    q = cast(in_space(rng, Q, q_space), dtype)
    a, b = xp.asarray(p, dtype), xp.asarray(q, dtype)
    kw = dict(p_space=p_space, q_space=q_space)
    rtol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(to_numpy(kldiv.reverse_kl(a, b, **kw)),
                               oracle.rows("reverse_kl", p, q, **kw), rtol=rtol)
    np.testing.assert_allclose(to_numpy(kldiv.jeffreys_div(a, b, **kw)),
                               oracle.rows("jeffreys", p, q, **kw), rtol=rtol)
    for beta in (0.1, 0.5, 0.9):
        np.testing.assert_allclose(to_numpy(kldiv.js_div(a, b, beta=beta, **kw)),
                                   oracle.rows("js", p, q, beta=beta, **kw), rtol=rtol)


@pytest.mark.parametrize("space", ["probs", "logits"])
def test_family_with_support_mismatch(xp, space):
    rng = np.random.default_rng(11)
    P = rand_probs(rng, (3, 12), zero_frac=0.4)
    Q = rand_probs(rng, (3, 12), zero_frac=0.4)
    p, q = in_space(rng, P, space), in_space(rng, Q, space)
    a, b = xp.asarray(p), xp.asarray(q)
    kw = dict(p_space=space, q_space=space)
    for beta in (0.2, 0.5, 0.7):
        got = to_numpy(kldiv.js_div(a, b, beta=beta, **kw))
        ref = oracle.rows("js", p, q, beta=beta, **kw)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    fwd = oracle.rows("kl", p, q, **kw)
    rev = oracle.rows("reverse_kl", p, q, **kw)
    np.testing.assert_allclose(to_numpy(kldiv.kl_div(a, b, **kw)), fwd, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(kldiv.reverse_kl(a, b, **kw)), rev, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(kldiv.jeffreys_div(a, b, **kw)), fwd + rev, rtol=1e-12)


def test_js_disjoint_supports_is_entropy_of_beta(xp):
    """Disjoint supports: JS_beta = -beta log beta - (1 - beta) log(1 - beta) (a closed form)."""
    p = np.tile(np.concatenate([[0.3, 0.7], np.zeros(10)]), (3, 1))
    q = np.tile(np.concatenate([np.zeros(2), np.full(10, 0.1)]), (3, 1))
    for beta in (0.1, 0.5, 0.8):
        got = to_numpy(kldiv.js_div(xp.asarray(p), xp.asarray(q), beta=beta))
        np.testing.assert_allclose(got, -beta * np.log(beta) - (1 - beta) * np.log1p(-beta),
                                   rtol=1e-13)


def test_kl_terms_against_oracle_in_log_space(xp):
    rng = np.random.default_rng(12)
    P = rand_probs(rng, (3, 12), zero_frac=0.3)
    Q = rand_probs(rng, (3, 12))
    p, q = in_space(rng, P, "logits"), in_space(rng, Q, "log_probs")
    got = to_numpy(kldiv.kl_terms(xp.asarray(p), xp.asarray(q), p_space="logits",
                                  q_space="log_probs", temperature=1.5))
    ref = np.array([[float(t) for t in oracle.terms(p[i], q[i], "logits", "log_probs", 1.5)]
                    for i in range(3)])
    np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("fn", ["kl_div", "reverse_kl", "js_div", "jeffreys_div"])
def test_reduced_log_space_matches_rows(xp, fn):
    """reduction sum/mean in log spaces (where fast paths may take over) equals the row reference."""
    rng = np.random.default_rng(13)
    P, Q = close_pair(rng, (2, 3, 12), scale=0.5)
    p, q = in_space(rng, P, "logits"), in_space(rng, Q, "logits")
    name = {"kl_div": "kl", "reverse_kl": "reverse_kl", "js_div": "js", "jeffreys_div": "jeffreys"}
    ref = oracle.rows(name[fn], p, q, p_space="logits", q_space="logits")
    f = getattr(kldiv, fn)
    a, b = xp.asarray(p), xp.asarray(q)
    kw = dict(p_space="logits", q_space="logits")
    np.testing.assert_allclose(to_numpy(f(a, b, reduction="sum", **kw)), ref.sum(), rtol=1e-11)
    np.testing.assert_allclose(to_numpy(f(a, b, reduction="mean", **kw)), ref.mean(), rtol=1e-11)
    w = rng.uniform(0, 1, size=(2, 3))
    mask = np.array([[True, False, True], [True, True, False]])
    np.testing.assert_allclose(
        to_numpy(f(a, b, reduction="mean", weight=xp.asarray(w), mask=xp.asarray(mask), **kw)),
        (w * mask * ref).sum() / (w * mask).sum(), rtol=1e-11)


# ----------------------------------------------------------------------------------------------
# accuracy of near-identical distributions (float32 logits, V = 32000, KL from 1e-2 to 1e-9)

KL_LEVELS = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]


def near_pairs(V, levels, dtype, seed=0, scale=2.0):
    """Rows of logits ``a`` and ``b = a + eps * z`` rounded to ``dtype``, with eps chosen so that
    KL(softmax(a) || softmax(b)) is about each level (second order: eps^2 Var_p(z) / 2). Returns
    the exact rounded values as float64 arrays; the true KL comes from the oracle."""
    rng = np.random.default_rng(seed)
    a = np.asarray(rng.standard_normal((len(levels), V)) * scale, dtype=dtype).astype(np.float64)
    z = rng.standard_normal((len(levels), V))
    P = scipy.special.softmax(a, axis=-1)
    var = np.sum(P * z * z, -1) - np.sum(P * z, -1) ** 2
    eps = np.sqrt(2 * np.asarray(levels) / var)[:, None]
    b = np.asarray(a + eps * z, dtype=dtype).astype(np.float64)
    return a, b


def test_extended_precision_reference_against_mpmath():
    """The fast reference used below (np.longdouble textbook formula) agrees with the 50-digit
    oracle to 1e-8 relative, down to KL = 1e-9 (V = 2000; float32 inputs taken exactly)."""
    a, b = near_pairs(2000, [1e-2, 1e-5, 1e-7, 1e-9], np.float32, seed=1)
    ref = oracle.rows("kl", a, b, p_space="logits", q_space="logits")
    np.testing.assert_allclose(oracle.kl_extended(a, b), ref, rtol=1e-8)
    ref_js = oracle.rows("js", a, b, beta=0.3, p_space="logits", q_space="logits")
    np.testing.assert_allclose(oracle.js_extended(a, b, 0.3), ref_js, rtol=1e-8)


@pytest.fixture(scope="module")
def float32_pairs_32000():
    a, b = near_pairs(32000, KL_LEVELS, np.float32)
    return a, b, oracle.kl_extended(a, b)


def test_float32_logits_relative_error_1e4_down_to_kl_1e9(xp, float32_pairs_32000):
    a, b, ref = float32_pairs_32000
    assert np.all((ref > 0.5 * np.array(KL_LEVELS)) & (ref < 2 * np.array(KL_LEVELS)))
    got = to_numpy(kldiv.kl_div(xp.asarray(a, "float32"), xp.asarray(b, "float32"),
                                p_space="logits", q_space="logits"))
    rel = np.abs(got - ref) / ref
    assert np.all(rel <= 1e-4), dict(zip(KL_LEVELS, rel))


@pytest.fixture(scope="module")
def family_refs_32000(float32_pairs_32000):
    a, b, kl = float32_pairs_32000
    rev = oracle.kl_extended(b, a)
    return {"reverse_kl": rev, "jeffreys_div": kl + rev, "js_div": oracle.js_extended(a, b, 0.3)}


@pytest.mark.parametrize("fn", ["reverse_kl", "jeffreys_div", "js_div"])
def test_float32_family_relative_error_1e4(xp, float32_pairs_32000, family_refs_32000, fn):
    """The family keeps the accuracy too, row by row, and on torch through the reduced (fused)
    path, one row at a time so that each level is checked on its own."""
    a, b, _ = float32_pairs_32000
    ref = family_refs_32000[fn]
    kw = dict(p_space="logits", q_space="logits", **(dict(beta=0.3) if fn == "js_div" else {}))
    f = getattr(kldiv, fn)
    A, B = xp.asarray(a, "float32"), xp.asarray(b, "float32")
    got = to_numpy(f(A, B, **kw))
    rel = np.abs(got - ref) / ref
    assert np.all(rel <= 1e-4), dict(zip(KL_LEVELS, rel))
    if xp.name == "torch":
        got = np.array([float(f(A[i:i + 1], B[i:i + 1], reduction="sum", **kw))
                        for i in range(len(KL_LEVELS))])
        rel = np.abs(got - ref) / ref
        assert np.all(rel <= 1e-4), dict(zip(KL_LEVELS, rel))


def test_float32_probs_relative_error_1e4_down_to_kl_1e9(xp, float32_pairs_32000):
    """float32 softmax outputs as inputs: the exact float32 rows (renormalised) are the truth."""
    a, b, _ = float32_pairs_32000
    P = scipy.special.softmax(a, axis=-1).astype(np.float32)
    Q = scipy.special.softmax(b, axis=-1).astype(np.float32)
    # log of the exact float32 probabilities as logits: the same distributions, renormalised
    ref = oracle.kl_extended(np.log(P.astype(np.longdouble)), np.log(Q.astype(np.longdouble)))
    got = to_numpy(kldiv.kl_div(xp.asarray(P), xp.asarray(Q)))
    rel = np.abs(got - ref) / ref
    assert np.all(rel <= 1e-4), dict(zip(KL_LEVELS, rel))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_accurate_in_float32(xp, dtype):
    """Half-precision logits are exact inputs; computed in float32 they keep <= 1e-4 relative
    error (levels where rounding to the half type leaves the rows different)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")  # ships with jax; NumPy has no bfloat16

    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    xp.dtype(dtype)  # skips the backends without this dtype
    a, b = near_pairs(4096, [1e-2, 1e-3, 1e-4, 1e-5, 1e-6], np_dtype, seed=2)
    ref = oracle.kl_extended(a, b)
    keep = ref > 0
    got = kldiv.kl_div(xp.asarray(a, dtype), xp.asarray(b, dtype), p_space="logits",
                       q_space="logits")
    assert str(got.dtype).endswith("float32")
    rel = np.abs(to_numpy(got)[keep] - ref[keep]) / ref[keep]
    assert keep.sum() >= 3 and np.all(rel <= 1e-4), rel


# ----------------------------------------------------------------------------------------------
# huge finite negative logits (masking by -1e30 or finfo.min instead of -inf)


def _textbook(lp, lq, kind):
    """float64 textbook divergences from log-probabilities (p = exp(lp) may be exactly 0)."""
    p, q = np.exp(lp), np.exp(lq)
    kl_pq = np.where(p > 0, p * (lp - lq), 0.0).sum(-1)
    kl_qp = np.where(q > 0, q * (lq - lp), 0.0).sum(-1)
    if kind == "forward":
        return kl_pq
    if kind == "reverse":
        return kl_qp
    if kind == "jeffreys":
        return kl_pq + kl_qp
    m = 0.5 * (p + q)
    lm = np.log(np.where(m > 0, m, 1.0))
    tp = np.where(p > 0, p * (lp - lm), 0.0)
    tq = np.where(q > 0, q * (lq - lm), 0.0)
    return 0.5 * tp.sum(-1) + 0.5 * tq.sum(-1)


@pytest.mark.parametrize("kind", ["forward", "reverse", "js", "jeffreys"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_huge_negative_finite_logits(xp, kind, temperature):
    """A logit of -1e30 is probability 0, not noise: the large branch must not add log p = -1e30
    to a log-ratio of +1e30 (their float sum is off by ~1e14 and the KL came out wrong)."""
    fn = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
          "jeffreys": kldiv.jeffreys_div}[kind]
    rng = np.random.default_rng(5)
    a = rng.standard_normal((4, 40))
    b = a + 0.01 * rng.standard_normal((4, 40))
    a[0, 3] = -1e30  # p = 0 there, q not
    b[0, 5] -= 60.0
    a[1, [2, 9]] = -1e30
    b[1, [2, 9]] = 30.0  # and q puts most of its mass there
    a[2, 4] = b[2, 4] = -1e30  # both zero
    b[3, 6] = -3e38  # q = 0 where p > 0: forward KL and Jeffreys are huge but finite
    for dtype in ("float32", "float64"):
        a_in = np.asarray(a, dtype=dtype)
        b_in = np.asarray(b, dtype=dtype)
        lp = scipy.special.log_softmax(a_in.astype(np.float64) / temperature, axis=-1)
        lq = scipy.special.log_softmax(b_in.astype(np.float64) / temperature, axis=-1)
        ref = _textbook(lp, lq, kind)
        got = to_numpy(fn(xp.asarray(a_in, dtype=dtype), xp.asarray(b_in, dtype=dtype),
                          p_space="logits", q_space="logits", temperature=temperature))
        rtol = 1e-5 if dtype == "float32" else 1e-10
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-12, err_msg=f"{kind} {dtype}")
