"""JAX fast path (kldiv.backends.jax_fast), differential tests.

- Values: against the 50-digit oracle (tests/oracle.py, inputs taken exactly) and against the
  core's rows (``kldiv._core.divergence.divergence_rows``) on edge-heavy batches: -inf entries,
  -1e30 masking, shifts of 1e30 (float64) and 1e37 (float32), support mismatch, huge KL,
  KL down to 1e-9, V = 1, temperatures, bfloat16 / float16 inputs (computed in float32).
- Gradients per row against jax.grad of the float64 textbook formula; Hessians (both
  arguments, mixed) against jax.hessian of that formula.
- Invalid input under jax.jit: nan rows (never a plausible number), and checkify errors with the
  eager path's messages.

Shapes are small and the configurations few: every new one is an XLA compilation.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.special
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kldiv
import oracle

jax = pytest.importorskip("jax")
jnp = jax.numpy
checkify = pytest.importorskip("jax.experimental.checkify")

from kldiv._core.divergence import divergence_rows  # noqa: E402
from kldiv.backends import jax_fast  # noqa: E402

FUNCS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl}
ORACLE = {"forward": "kl", "reverse": "reverse_kl"}


@pytest.fixture(autouse=True)
def _x64(restore_jax_x64):
    jax.config.update("jax_enable_x64", True)


def _core_rows(kind, a, b, temperature=1.0):
    """The core's rows on the same JAX arrays (the reference the fast path must equal)."""
    return np.asarray(_jit_core_rows(a, b, kind=kind, temperature=temperature))


@functools.partial(jax.jit, static_argnames=("kind", "temperature"))
def _jit_core_rows(a, b, *, kind, temperature):
    return divergence_rows(kind, jax_fast._xp(), a, b, "logits", "logits", temperature)


def _edge_batch(dtype):
    """Rows of logits (p side, q side) covering the edges; 16 categories."""
    rng = np.random.default_rng(12)
    v = 16
    big = 1e30 if dtype == "float64" else 1e37
    a = rng.normal(size=(11, v)) * 2
    b = a + 0.3 * rng.normal(size=(11, v))
    b[1] = a[1] + 1e-4 * rng.normal(size=v)  # KL ~ 1e-9
    a[2, 3] = -np.inf  # q has mass where p has none
    a[2, 5] = b[2, 5] = -np.inf  # neither
    a[3, 4] = -1e30  # p = 0 there (finite logit), q not
    b[3, 7] = -1e30  # q ~ 0 where p is not: KL ~ p_7 * 1e30
    a[4] += big  # both shifted (the rows collapse onto a few floats)
    b[4] += big
    b[5] += big  # only q shifted: far frames
    a[6, 2] = 40.0  # huge mass ratio: KL in the tens
    b[6, 2] = -40.0
    b[7, 9] = -np.inf  # p has mass where q has none: +inf
    a[8, :] = -np.inf  # p is a point mass...
    a[8, 6] = 3.0
    a[9] = b[9]  # identical rows: KL = 0
    a[10] = -1e30  # -1e30 masking of every category but two
    a[10, [0, 1]] = [0.5, -0.5]
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_values_against_oracle_and_core(kind, dtype):
    a, b = _edge_batch(dtype)
    got = np.asarray(FUNCS[kind](jnp.asarray(a), jnp.asarray(b), p_space="logits",
                                 q_space="logits"))
    assert got.dtype == np.dtype(dtype)
    truth = oracle.rows(ORACLE[kind], a, b, p_space="logits", q_space="logits")
    core = _core_rows(kind, jnp.asarray(a), jnp.asarray(b))
    rtol = 2e-6 if dtype == "float32" else 1e-11
    np.testing.assert_allclose(got, truth, rtol=rtol, atol=0, err_msg=kind)
    np.testing.assert_allclose(got, core, rtol=2 * rtol, atol=0, err_msg=kind)


@pytest.mark.parametrize("temperature", [0.7, 3.0])
def test_temperature_and_log_probs(temperature):
    a, b = _edge_batch("float64")
    lb = scipy.special.log_softmax(np.where(np.isfinite(b), b, -np.inf)[:4], axis=-1)
    a = a[:4]
    for kind in ("forward", "reverse"):
        got = np.asarray(FUNCS[kind](jnp.asarray(a), jnp.asarray(lb), p_space="logits",
                                     q_space="log_probs", temperature=temperature,
                                     t2_scale=True))
        truth = oracle.rows(ORACLE[kind], a, lb, p_space="logits", q_space="logits",
                            temperature=temperature)
        np.testing.assert_allclose(got, truth * temperature**2, rtol=1e-11, err_msg=kind)
        core = _core_rows(kind, jnp.asarray(a), jnp.asarray(lb), temperature)
        np.testing.assert_allclose(got, core * temperature**2, rtol=2e-11, err_msg=kind)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inputs_compute_in_float32(dtype):
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.normal(size=(3, 40)), dtype=dtype)
    b = jnp.asarray(rng.normal(size=(3, 40)), dtype=dtype)
    got = kldiv.kl_div(a, b, p_space="logits", q_space="logits")
    assert got.dtype == jnp.float32
    exact_a, exact_b = np.asarray(a.astype(jnp.float64)), np.asarray(b.astype(jnp.float64))
    truth = oracle.rows("kl", exact_a, exact_b, p_space="logits", q_space="logits")
    np.testing.assert_allclose(np.asarray(got), truth, rtol=2e-6)


def test_one_category_axis_broadcast_and_reductions():
    one = kldiv.kl_div(jnp.zeros((4, 1)), jnp.full((4, 1), 7.0), p_space="logits",
                       q_space="logits")
    np.testing.assert_array_equal(np.asarray(one), 0.0)
    rng = np.random.default_rng(4)
    a = rng.normal(size=(5, 3, 2))  # categories on axis 0
    b = rng.normal(size=(5, 1, 2))  # broadcast along the rows
    kw = dict(p_space="logits", q_space="logits", axis=0)
    truth = oracle.rows("kl", np.moveaxis(a, 0, -1), np.moveaxis(np.broadcast_to(b, a.shape), 0,
                                                                 -1),
                        p_space="logits", q_space="logits")
    got = kldiv.kl_div(jnp.asarray(a), jnp.asarray(b), **kw)
    np.testing.assert_allclose(np.asarray(got), truth, rtol=1e-12)
    mask = np.array([[True, False], [True, True], [False, True]])
    w = np.array([[1.0, 5.0], [2.0, 0.0], [3.0, 0.5]])
    keep = mask & (w > 0)
    expect_mean = np.sum(np.where(keep, w * truth, 0)) / np.sum(np.where(keep, w, 0))
    got = kldiv.kl_div(jnp.asarray(a), jnp.asarray(b), reduction="mean", mask=jnp.asarray(mask),
                       weight=jnp.asarray(w), **kw)
    np.testing.assert_allclose(float(got), expect_mean, rtol=1e-12)
    got = jax.jit(lambda a, b, m: kldiv.reverse_kl(a, b, reduction="sum", mask=m, **kw))(
        jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask))
    rev = oracle.rows("reverse_kl", np.moveaxis(a, 0, -1),
                      np.moveaxis(np.broadcast_to(b, a.shape), 0, -1), p_space="logits",
                      q_space="logits")
    np.testing.assert_allclose(float(got), np.sum(np.where(mask, rev, 0)), rtol=1e-12)


def test_masked_rows_may_hold_anything():
    a = np.array([[0.0, 1.0, 2.0], [np.nan, np.inf, -np.inf]])
    b = np.array([[0.5, 1.0, 1.5], [-np.inf, -np.inf, -np.inf]])
    mask = jnp.asarray([True, False])
    f = jax.jit(jax.value_and_grad(
        lambda a, b: kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="mean",
                                  mask=mask), argnums=(0, 1)))
    value, (ga, gb) = f(jnp.asarray(a), jnp.asarray(b))
    truth = oracle.rows("kl", a[:1], b[:1], p_space="logits", q_space="logits")[0]
    np.testing.assert_allclose(float(value), truth, rtol=1e-12)
    assert np.all(np.isfinite(np.asarray(ga))) and np.all(np.isfinite(np.asarray(gb)))
    np.testing.assert_array_equal(np.asarray(gb)[1], 0.0)


# ----------------------------------------------------------------------------------------------
# gradients and second derivatives against autodiff of the float64 textbook formula


def _naive(kind, temperature=1.0):
    def f(a, b):
        la = jax.nn.log_softmax(a / temperature, axis=-1)
        lb = jax.nn.log_softmax(b / temperature, axis=-1)
        if kind == "reverse":
            la, lb = lb, la
        return jnp.sum(jnp.exp(la) * (la - lb), axis=-1)
    return f


def _finite_stand_in(x):
    """-inf as -800: probability exactly 0 in float64, and autodiff of the textbook formula
    stays finite (its derivative at a true -inf is nan)."""
    return np.where(np.isneginf(x), -800.0, x)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradients_per_row_against_textbook_autodiff(kind, temperature):
    rng = np.random.default_rng(8)
    a = rng.normal(size=(5, 9)) * 2
    b = a + 0.5 * rng.normal(size=(5, 9))
    b[1] = a[1] + 1e-5 * rng.normal(size=9)  # KL ~ 1e-11
    a[2, 3] = -np.inf  # q only
    b[3, [1, 2]] = a[3, [1, 2]] = -np.inf  # neither
    a[4, 0], b[4, 0] = 30.0, -30.0
    if kind == "reverse":
        a, b = b, a  # the supports stay nested the right way for a finite value
    fn = FUNCS[kind]

    def loss(a, b):
        return fn(a, b, p_space="logits", q_space="logits", temperature=temperature,
                  reduction="sum")

    ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(a), jnp.asarray(b))
    naive = _naive(kind, temperature)
    ra, rb = jax.grad(lambda a, b: jnp.sum(naive(a, b)), argnums=(0, 1))(
        jnp.asarray(_finite_stand_in(a)), jnp.asarray(_finite_stand_in(b)))
    # per row, normwise, relative to the row's whole gradient (both arguments): in row 4 p is a
    # point mass and dKL/da is ~1e-15 while dKL/db is ~1; both routes carry ~eps |d| there. The
    # textbook reference itself is good to ~eps / sqrt(KL) only (row 1: KL ~ 1e-11)
    scale = np.hypot(np.linalg.norm(np.asarray(ra), axis=-1),
                     np.linalg.norm(np.asarray(rb), axis=-1))
    for got, ref in ((ga, ra), (gb, rb)):
        got, ref = np.asarray(got), np.asarray(ref)
        assert np.all(np.isfinite(got))
        err = np.linalg.norm(got - ref, axis=-1) / scale
        assert np.all(err < 1e-9), err


def test_float32_gradient_accuracy_near_convergence():
    """float32 inputs, KL from 1e-2 down to 1e-9: gradient within 1e-5 normwise per row of the
    float64 gradient of the same (rounded) inputs."""
    rng = np.random.default_rng(21)
    v = 200
    a = rng.normal(size=(4, v)).astype(np.float32)
    scales = np.array([1e-1, 1e-2, 1e-3, 1e-4])[:, None]
    b = (a + scales * rng.normal(size=(4, v))).astype(np.float32)
    loss = jax.jit(jax.grad(lambda a, b: kldiv.kl_div(a, b, p_space="logits", q_space="logits",
                                                      reduction="sum"), argnums=(0, 1)))
    got = loss(jnp.asarray(a), jnp.asarray(b))
    ref = jax.grad(lambda a, b: jnp.sum(_naive("forward")(a, b)), argnums=(0, 1))(
        jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64))
    for g, r in zip(got, ref):
        assert g.dtype == jnp.float32
        r = np.asarray(r)
        err = np.linalg.norm(np.asarray(g, np.float64) - r, axis=-1) / np.linalg.norm(r, axis=-1)
        assert np.all(err < 1e-5), err


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_hessian_exact(kind):
    a = np.array([[0.3, -1.2, 2.0, 0.1, -np.inf], [1.0, 1.01, 0.99, 1.0, 1.02]])
    b = np.array([[0.1, -1.0, 1.5, 0.4, 0.2], [1.0, 1.0, 1.0, 1.0, 1.0]])
    if kind == "reverse":
        a, b = b, a
    fn = FUNCS[kind]

    def f(a, b):
        return fn(a, b, p_space="logits", q_space="logits", temperature=1.3, reduction="sum")

    naive = _naive(kind, 1.3)
    h = jax.jit(jax.hessian(f, argnums=(0, 1)))(jnp.asarray(a), jnp.asarray(b))
    ref = jax.hessian(lambda a, b: jnp.sum(naive(a, b)), argnums=(0, 1))(
        jnp.asarray(_finite_stand_in(a)), jnp.asarray(_finite_stand_in(b)))
    for i in range(2):
        for j in range(2):
            got, want = np.asarray(h[i][j]), np.asarray(ref[i][j])
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"{i}{j}")


def test_kl_rows_vmap_and_jit_equal_eager():
    a, b = _edge_batch("float64")
    eager = np.asarray(kldiv.kl_div(jnp.asarray(a), jnp.asarray(b), p_space="logits",
                                    q_space="logits"))
    mapped = jax.jit(jax.vmap(jax_fast.kl_rows))(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(mapped), eager, rtol=1e-14)


def _extreme_batch(dtype):
    """The edge batch plus rows at the float limit: finfo.min masking in q where p has mass
    (KL ~ 1e37 in float32), in both, logits of +-3e38 / +-1e38, an escape (p > 0 = q)."""
    a, b = _edge_batch(dtype)
    lo = float(np.finfo(dtype).min)
    top = 3e38 if dtype == "float32" else 1e307
    ea = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [top, top, 1, 2], [0, 1, lo, 2], [lo, 0, 1, 2],
                   [top / 3, -top / 3, 0, 5], [0, 1, 2, 3]])
    eb = np.array([[0, 1, lo, 3], [0, 1, -top / 3, 3], [0, 1, 2, 3], [0, 1, 2, 3],
                   [lo, 0, 1, 2.5], [0, 1, 2, 3], [0, 1, 2, -np.inf]])
    pad = np.full((ea.shape[0], a.shape[1] - 4), -np.inf)
    a = np.concatenate([a, np.concatenate([ea, pad], 1)]).astype(dtype)
    b = np.concatenate([b, np.concatenate([eb, pad], 1)]).astype(dtype)
    return a, b


def _rownorm(x):
    """Euclidean norm per row without overflow (rows of gradients ~1e307)."""
    m = np.max(np.abs(x), axis=-1, keepdims=True)
    m = np.where(m > 0, m, 1.0)
    return m[..., 0] * np.linalg.norm(x / m, axis=-1)


def _analytic_grads(a, b, temperature):
    """dKL/da = -p (d - E_p[d]) / T and dKL/db = (q - p) / T per row, d = log q - log p, from
    the float64 (extended precision) log-softmax of the exact inputs; rows with p > 0 = q
    somewhere (KL = +inf) are nan."""
    with np.errstate(invalid="ignore"):  # the escape rows, made nan below
        a = np.asarray(a, np.longdouble) / temperature
        b = np.asarray(b, np.longdouble) / temperature
        la = a - np.max(a, -1, keepdims=True)
        la = la - np.log(np.sum(np.exp(la), -1, keepdims=True))
        lb = b - np.max(b, -1, keepdims=True)
        lb = lb - np.log(np.sum(np.exp(lb), -1, keepdims=True))
        p, q = np.exp(la), np.exp(lb)
        supp = np.isfinite(la)
        d = np.where(supp, lb - np.where(supp, la, 0), 0)
        mu = np.sum(np.where(supp, p * d, 0), -1, keepdims=True)
        ga = np.where(supp, -p * (d - mu), 0) / temperature
        gb = (q - p) / temperature
        inf = np.any(supp & ~np.isfinite(lb), -1)
        ga[inf], gb[inf] = np.nan, np.nan
        return ga.astype(np.float64), gb.astype(np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_extreme_rows_values_equal_core_and_gradients_analytic_per_row(dtype):
    """Under jit (no eager detour to the core): values equal the core's rows (+inf where the
    core says +inf); gradients per row equal the analytic gradient of the exact inputs, and are
    0 on rows with KL = +inf. Against the core's autodiff gradient where that is exact (rows of
    ordinary magnitude; at finfo.min masking the core's clamp makes its autodiff inexact)."""
    a, b = _extreme_batch(dtype)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    T = 1.0
    fast = np.asarray(_jit_rows(ja, jb))
    core = _core_rows("forward", ja, jb)
    np.testing.assert_array_equal(np.isinf(fast), np.isinf(core))
    fin = np.isfinite(core)
    rtol = 2e-6 if dtype == "float32" else 1e-11
    np.testing.assert_allclose(fast[fin], core[fin], rtol=rtol, atol=0)
    ga, gb = _jit_grads(ja, jb)
    ga, gb = np.asarray(ga, np.float64), np.asarray(gb, np.float64)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    np.testing.assert_array_equal(ga[~fin], 0.0)
    np.testing.assert_array_equal(gb[~fin], 0.0)
    ra, rb = _analytic_grads(a, b, T)
    scale = np.hypot(_rownorm(ra[fin]), _rownorm(rb[fin]))
    scale = np.maximum(scale, 1e-300)  # rows that collapse to identical inputs: gradient 0
    tol = 2e-6 if dtype == "float32" else 1e-12
    for got, ref in ((ga[fin], ra[fin]), (gb[fin], rb[fin])):
        err = _rownorm(got - ref) / scale
        assert np.all(err < tol), err
    # the core's autodiff on the rows of ordinary magnitude (the edge batch's finite rows)
    n = _edge_batch(dtype)[0].shape[0]
    ca, cb = _jit_core_grads(ja[:n], jb[:n])
    f = fin[:n]
    for got, ref in ((ga[:n][f], ca), (gb[:n][f], cb)):
        ref = np.asarray(ref, np.float64)[f]
        err = _rownorm(got - ref) / scale[:f.sum()]
        assert np.all(err < 2 * tol), err


_jit_grads = jax.jit(jax.grad(lambda a, b: jnp.sum(jax_fast.kl_rows(a, b)), argnums=(0, 1)))
_jit_core_grads = jax.jit(jax.grad(
    lambda a, b: jnp.sum(divergence_rows("forward", jax_fast._xp(), a, b, "logits", "logits")),
    argnums=(0, 1)))


# ----------------------------------------------------------------------------------------------
# property: the fast path equals the core


_logit = st.one_of(st.floats(-30, 30), st.sampled_from([-np.inf, -1e30, 1e30, 0.0]))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(np.float64, (2, 6), elements=_logit),
       hnp.arrays(np.float64, (2, 6), elements=_logit))
def test_property_fast_equals_core_and_oracle(a, b):
    a[:, 0] = np.where(np.isneginf(a[:, 0]), 0.0, a[:, 0])  # no empty rows
    b[:, 0] = np.where(np.isneginf(b[:, 0]), 0.0, b[:, 0])
    fast = np.asarray(_jit_rows(jnp.asarray(a), jnp.asarray(b)))
    truth = oracle.rows("kl", a, b, p_space="logits", q_space="logits")
    core = _core_rows("forward", jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(fast, truth, rtol=1e-9, atol=1e-30)  # oracle residue ~1e-54 at 0
    # (the core may return a rounding residue of 1e-54 where the truth is 0)
    np.testing.assert_allclose(fast, core, rtol=1e-9, atol=1e-30)


_jit_rows = jax.jit(jax_fast.kl_rows)


# ----------------------------------------------------------------------------------------------
# the other kinds and spaces under jit: the core's rows


@pytest.mark.parametrize("fn", [kldiv.js_div, kldiv.jeffreys_div, kldiv.kl_div])
def test_other_kinds_and_probabilities_under_jit(fn):
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(7), size=3)
    q = rng.dirichlet(np.ones(7), size=3)
    p[0, 2] = 0.0
    p[0] /= p[0].sum()
    name = {kldiv.js_div: "js", kldiv.jeffreys_div: "jeffreys", kldiv.kl_div: "kl"}[fn]
    truth = oracle.rows(name, p, q)
    got = jax.jit(lambda p, q: fn(p, q))(jnp.asarray(p), jnp.asarray(q))
    np.testing.assert_allclose(np.asarray(got), truth, rtol=1e-11)


# ----------------------------------------------------------------------------------------------
# invalid input under tracing: nan rows, checkify errors with the eager messages

BAD = {  # spaces -> cases (p, q): row 1 of p or q is invalid, row 0 valid; one compilation each
    "probs": [
        ([[0.5, 0.5], [1.5, -0.5]], [[0.3, 0.7], [0.5, 0.5]]),  # negative: once -1.0986
        ([[0.5, 0.5], [np.nan, 1.0]], [[0.3, 0.7], [0.5, 0.5]]),
        ([[0.5, 0.5], [0.7, 0.7]], [[0.3, 0.7], [0.5, 0.5]]),  # does not sum to 1
    ],
    "logits": [
        ([[0.1, 2.0], [0.0, 1.0]], [[0.3, 0.7], [np.inf, 0.5]]),
        ([[0.1, 2.0], [np.nan, 1.0]], [[0.3, 0.7], [0.2, 0.5]]),
        ([[0.1, 2.0], [-np.inf, -np.inf]], [[0.3, 0.7], [0.2, 0.5]]),
    ],
    "log_probs": [  # q's second row is not normalised
        ([[0.1, 2.0], [0.0, 1.0]], [[np.log(0.3), np.log(0.7)], [0.0, 0.0]]),
    ],
}


@pytest.mark.parametrize("space", list(BAD))
def test_invalid_rows_are_nan_under_jit_and_checkify_raises_the_eager_message(space):
    kw = {} if space == "probs" else dict(p_space="logits", q_space=space)

    def rows(p, q):
        return kldiv.kl_div(p, q, **kw)

    f_rows = jax.jit(rows)
    f_mean = jax.jit(lambda p, q: kldiv.kl_div(p, q, reduction="mean", **kw))
    f_checked = jax.jit(jax_fast.checked(rows))
    for p, q in BAD[space]:
        p, q = jnp.asarray(p), jnp.asarray(q)
        with pytest.raises(ValueError) as eager:
            rows(p, q)
        out = f_rows(p, q)
        assert np.isfinite(float(out[0])) and np.isnan(float(out[1])), (p, q, out)
        assert np.isnan(float(f_mean(p, q)))
        err, out = f_checked(p, q)
        assert err.get() is not None and err.get().startswith(str(eager.value)), (
            err.get(), str(eager.value))
        with pytest.raises(checkify.JaxRuntimeError, match="row 1"):
            err.throw()


def test_checkify_row_index_and_count_and_weight():
    p = jnp.asarray(np.full((2, 3, 2), 0.5))
    bad = np.full((2, 3, 2), 0.5)
    bad[1, 2] = [-0.5, 1.5]
    bad[0, 1] = [-0.5, 1.5]
    with pytest.raises(ValueError) as eager:
        kldiv.kl_div(jnp.asarray(bad), p)
    assert "row (0, 1) (and 1 more)" in str(eager.value)
    err, out = jax.jit(jax_fast.checked(lambda a, b: kldiv.kl_div(a, b)))(jnp.asarray(bad), p)
    assert err.get().startswith(str(eager.value))
    assert np.isnan(np.asarray(out)[[0, 1], [1, 2]]).all()
    assert np.isfinite(np.asarray(out)[0, 0])
    # a negative weight: nan, even where the row would otherwise be dropped
    w = jnp.asarray([[1.0, -1.0, 0.0], [1.0, 1.0, 1.0]])
    out = jax.jit(lambda a, b, w: kldiv.kl_div(a, b, weight=w, reduction="sum"))(p, p, w)
    assert np.isnan(float(out))
    err, _ = jax.jit(jax_fast.checked(lambda a, b, w: kldiv.kl_div(a, b, weight=w)))(p, p, w)
    assert err.get().startswith("weight: must be finite and >= 0")


def test_valid_input_passes_checkify_and_validate_false_drops_the_checks():
    a, b = _edge_batch("float64")
    a, b = jnp.asarray(a[:4]), jnp.asarray(b[:4])
    f = lambda a, b: kldiv.kl_div(a, b, p_space="logits", q_space="logits")  # noqa: E731
    err, out = jax.jit(jax_fast.checked(f))(a, b)
    assert err.get() is None
    np.testing.assert_allclose(np.asarray(out), np.asarray(f(a, b)), rtol=1e-14)
    p = jnp.asarray([[0.5, 0.5]])
    on = str(jax.make_jaxpr(lambda p, q: kldiv.kl_div(p, q))(p, p))
    off = str(jax.make_jaxpr(lambda p, q: kldiv.kl_div(p, q, validate=False))(p, p))
    assert "check[" not in on and "check[" not in off  # checkify checks: only under checked()
    assert "reduce_min" in on and "reduce_min" not in off  # no pass for the checks
