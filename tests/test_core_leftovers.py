"""The core's leftovers of issue 11 (kldiv._core.divergence; the fast paths are switched off).

(a) Hessians (torch.autograd.functional.hessian) at a float32 *subnormal* probability against
    torch.autograd on the plain formula in float64 (same inputs, where nothing overflows):
    entries that fit in float32 equal the truth, the diagonal entry of the subnormal (~1e40)
    is +inf (correctly rounded), nothing is nan. (Not JAX: XLA on CPU flushes float32
    subnormals to 0 in arithmetic, so the entry acts as 0 there; JAX's Hessians at tiny normal
    probabilities are in tests/test_core_numerics_extra.py.)
(b) float32 rows with finfo.min logits on both sides and a KL of ~1e37..3e38: per-row gradients
    (torch autograd, jax.grad) against the exact ones, from the exact inputs in mpmath
    (dKL/da = p (log p - log q - KL), dKL/db = q - p). float64 would not do as the reference:
    its ulp at 3e38 is 7e22, and some of these rows have O(1) gradients.
(c) float32, one side probabilities and the other log-probabilities or logits, KL 1e-3..1e-9,
    both orders: the value against mpmath on the exact inputs to 1e-6 relative, on every
    backend (JAX with x64 enabled, as the test suite runs it).
(d) JS gradients (float64) where one probability is 1e-20..1e-200 (or a logit 500 below the
    rest) against the gradient from mpmath: dJS/dp_i = beta log(p_i / m_i), taken through the
    normalisation (or the softmax).
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

import kldiv
import oracle
from conftest import to_numpy

F32MIN = float(np.finfo(np.float32).min)


@pytest.fixture(autouse=True)
def core_only(monkeypatch):
    """Switch every fast path off: the tests here are of the core (kldiv._core)."""
    from kldiv._core import dispatch

    monkeypatch.setattr(dispatch, "handler", lambda *a, **k: None)


def _mp(x):
    return [mpmath.mpf(float(v)) for v in np.asarray(x, dtype=np.float64)]


def _mp_log_softmax(x):
    m = max(x)
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in x)) + m
    return [v - lse for v in x]


# ----------------------------------------------------------------------------------------------
# (a) Hessians at a float32 subnormal probability

SUB_CASES = [  # (function, p, q, p_space, q_space, differentiate with respect to)
    ("kl", [0.3, 7e-41, 0.7], [0.2, 0.5, 0.3], "probs", "probs", "p"),
    ("kl", [0.5, 1e-42, 0.5], [0.4, 2e-42, 0.6], "probs", "probs", "p"),
    ("kl", [0.5, 1e-42, 0.5], [0.4, 2e-42, 0.6], "probs", "probs", "q"),
    ("kl", [0.3, 7e-41, 0.7], [0.0, 1.0, 2.0], "probs", "logits", "p"),
    ("kl", [0.3, 7e-41, 0.7], [0.0, 1.0, 2.0], "probs", "logits", "q"),
    ("reverse_kl", [-117.62, -92.45, 0.0], [0.0, 7.07e-41, 1.0], "log_probs", "probs", "q"),
    ("reverse_kl", [-117.62, -92.45, 0.0], [0.0, 7.07e-41, 1.0], "log_probs", "probs", "p"),
]


def _plain64(name, ps, qs):
    """The plain formula sum p log(p / q) in float64 (torch), on raw inputs of each space."""
    import torch

    def norm(x, space):
        if space == "probs":  # log of safe values where x = 0 (no 0 * inf in the derivative)
            pos = x > 0
            return x / x.sum(), torch.log(torch.where(pos, x, 1.0)) - torch.log(x.sum())
        lw = torch.log_softmax(x, -1)
        return lw.exp(), lw

    def f(a, b):
        (wp, lp), (wq, lq) = norm(a, ps), norm(b, qs)
        if name == "reverse_kl":
            wp, lp, lq = wq, lq, lp
        return torch.where(wp > 0, wp * (lp - lq), torch.zeros_like(wp)).sum()

    return f


def _check_hessian(got, ref, x, space):
    """Entries that fit in float32 within 1e-4 of their row's scale; the others +-inf. (A
    probability of exactly 0 is outside the support: kldiv gives it no derivative, the plain
    formula a one-sided one; those rows and columns are not compared.)"""
    if space == "probs":
        on = np.flatnonzero(np.asarray(x) > 0)
        got, ref = got[np.ix_(on, on)], ref[np.ix_(on, on)]
    fmax = float(np.finfo(np.float32).max)
    assert not np.any(np.isnan(got)), got
    over = np.abs(ref) > fmax
    assert np.all(got[over] == np.sign(ref[over]) * np.inf), (got, ref)
    scale = np.max(np.where(over, 0, np.abs(ref)), axis=1, keepdims=True)
    err = np.where(over, 0, np.abs(got - ref))
    assert np.all(err <= 1e-4 * scale + 1e-30), (got, ref)


@pytest.mark.parametrize("case", range(len(SUB_CASES)))
def test_hessian_at_a_subnormal_probability_torch(case):
    torch = pytest.importorskip("torch")
    name, p, q, ps, qs, wrt = SUB_CASES[case]
    a, b = np.float32(p), np.float32(q)
    f = {"kl": kldiv.kl_div, "reverse_kl": kldiv.reverse_kl}[name]
    ta, tb = torch.tensor(a), torch.tensor(b)
    a64, b64 = ta.double(), tb.double()
    plain = _plain64(name, ps, qs)
    if wrt == "p":
        got = torch.autograd.functional.hessian(lambda x: f(x, tb, p_space=ps, q_space=qs), ta)
        ref = torch.autograd.functional.hessian(lambda x: plain(x, b64), a64)
    else:
        got = torch.autograd.functional.hessian(lambda y: f(ta, y, p_space=ps, q_space=qs), tb)
        ref = torch.autograd.functional.hessian(lambda y: plain(a64, y), b64)
    _check_hessian(got.double().numpy(), ref.numpy(), a if wrt == "p" else b,
                   ps if wrt == "p" else qs)


# ----------------------------------------------------------------------------------------------
# (b) huge finite KL, finfo.min on both sides, float32

HUGE_ROWS = [  # (p logits, q logits), float32, V = 4
    ([F32MIN, 0.0, 1.0, 0.5], [0.0, F32MIN, 1.0, 0.5]),
    ([-1.0, 2.0, 0.0, 1.0], [F32MIN, F32MIN, F32MIN, 0.0]),
    ([2.0, F32MIN, 0.0, 0.0], [-1.0, 1.0, 1.0, F32MIN]),
    ([-1.0, 1.0, 1.0, 0.0], [-1.0, 0.9 * F32MIN, F32MIN, F32MIN]),
    # the true p-gradient is O(1) here (q is flat where p has mass): the plain formula's
    # log p - log q rounds log p away at 3e38
    ([-1.0, F32MIN / 2, F32MIN, 1.0], [0.9 * F32MIN, 0.0, 2.0, 0.9 * F32MIN]),
    ([0.0, 1.0, 2.0, 0.5], [0.0, F32MIN, 2.0, 0.5]),
]


def _exact_kl_grads(kind, a, b):
    """(value, dKL/da, dKL/db) per row of logits a, b, exact (mpmath, 100 digits)."""
    with mpmath.workdps(100):
        vals, ga, gb = [], [], []
        for x, y in zip(a, b):
            la, lb = _mp_log_softmax(_mp(x)), _mp_log_softmax(_mp(y))
            if kind == "reverse":
                la, lb = lb, la
            p, q = [mpmath.exp(v) for v in la], [mpmath.exp(v) for v in lb]
            r = [u - v for u, v in zip(la, lb)]
            k = mpmath.fsum(pi * ri for pi, ri in zip(p, r))
            g_own = [float(pi * (ri - k)) for pi, ri in zip(p, r)]
            g_other = [float(qi - pi) for pi, qi in zip(p, q)]
            vals.append(float(k))
            if kind == "reverse":
                g_own, g_other = g_other, g_own
            ga.append(g_own)
            gb.append(g_other)
    return np.array(vals), np.array(ga), np.array(gb)


def _check_rows(got, ref, tol):
    for i in range(ref.shape[0]):  # per row, relative to the row's own scale
        assert np.all(np.isfinite(got[i])), (i, got[i], ref[i])
        scale = float(np.abs(ref[i]).max())
        err = float(np.abs(got[i] - ref[i]).max())
        assert err <= tol * scale + 1e-6, (i, got[i], ref[i])


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_huge_kl_rows_float32_gradients_torch(kind):
    torch = pytest.importorskip("torch")
    a = np.array([r[0] for r in HUGE_ROWS], dtype=np.float32)
    b = np.array([r[1] for r in HUGE_ROWS], dtype=np.float32)
    fn = kldiv.kl_div if kind == "forward" else kldiv.reverse_kl
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    v = fn(ta, tb, p_space="logits", q_space="logits")
    ga, gb = torch.autograd.grad(v.sum(), (ta, tb))
    val, ra, rb = _exact_kl_grads(kind, a, b)
    assert np.all(val > 1e37) or kind == "reverse"
    np.testing.assert_allclose(v.detach().double().numpy(), val, rtol=2e-6)
    _check_rows(ga.double().numpy(), ra, 2e-6)
    _check_rows(gb.double().numpy(), rb, 2e-6)


def test_huge_kl_rows_float32_gradients_jax(restore_jax_x64):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    a = np.array([r[0] for r in HUGE_ROWS], dtype=np.float32)
    b = np.array([r[1] for r in HUGE_ROWS], dtype=np.float32)
    f = jax.jit(jax.grad(lambda x, y: kldiv.kl_div(x, y, p_space="logits",
                                                   q_space="logits").sum(), argnums=(0, 1)))
    ga, gb = f(jnp.asarray(a), jnp.asarray(b))
    _, ra, rb = _exact_kl_grads("forward", a, b)
    _check_rows(np.asarray(ga, dtype=np.float64), ra, 2e-6)
    _check_rows(np.asarray(gb, dtype=np.float64), rb, 2e-6)


# ----------------------------------------------------------------------------------------------
# (c) float32, probabilities against log-space

V = 16
KLS = [1e-3, 1e-5, 1e-7, 1e-9]


def _mixed_rows(log_space, seed=5):
    """float32 rows: probabilities P and, for the other side, ``log_space`` values W, with
    KL ~ each of KLS (two rows each)."""
    rng = np.random.default_rng(seed)
    P, W = [], []
    for kl in KLS:
        for _ in range(2):
            z = 2 * rng.standard_normal(V)
            w = z + math.sqrt(2 * kl) * rng.standard_normal(V)
            p = np.exp(z - z.max())
            P.append(p / p.sum())
            if log_space == "log_probs":
                w = w - (w.max() + np.log(np.sum(np.exp(w - w.max()))))
            W.append(w)
    return np.array(P, dtype=np.float32), np.array(W, dtype=np.float32)


_MIXED_REF = {}


def _mixed_ref(name, log_space, order):
    key = (name, log_space, order)
    if key not in _MIXED_REF:
        P, W = _mixed_rows(log_space)
        a, b = (P, W) if order == "probs_first" else (W, P)
        sp = ("probs", log_space) if order == "probs_first" else (log_space, "probs")
        _MIXED_REF[key] = (a, b, sp, oracle.rows(name, a, b, p_space=sp[0], q_space=sp[1]))
    return _MIXED_REF[key]


@pytest.mark.parametrize("order", ["probs_first", "log_first"])
@pytest.mark.parametrize("log_space", ["logits", "log_probs"])
def test_float32_probabilities_against_log_space_match_mpmath(xp, log_space, order):
    for name, f in (("kl", kldiv.kl_div), ("reverse_kl", kldiv.reverse_kl)):
        a, b, sp, ref = _mixed_ref(name, log_space, order)
        assert np.all((ref > 1e-10) & (ref < 1e-2))
        out = f(xp.asarray(a), xp.asarray(b), p_space=sp[0], q_space=sp[1])
        assert "float32" in str(out.dtype)
        got = to_numpy(out)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0, err_msg=f"{name} {sp}")


# ----------------------------------------------------------------------------------------------
# (d) JS gradients at tiny probabilities, float64

JS_CASES = [  # (p, q, space, beta)
    ([0.3, 1e-200, 0.7], [0.2, 0.5, 0.3], "probs", 0.5),
    ([0.3, 1e-20, 0.7], [0.2, 0.5, 0.3], "probs", 0.1),
    ([0.2, 0.5, 0.3], [0.3, 1e-200, 0.7], "probs", 0.3),
    ([0.3, 1e-200, 0.7], [0.2, 3e-200, 0.8], "probs", 0.9),
    ([0.0, -500.0, 1.0], [0.5, 0.0, -1.0], "logits", 0.5),
    ([0.5, 0.0, -1.0], [0.0, 1.0, -460.0], "logits", 0.2),
]


def _exact_js_grads(p, q, space, beta):
    with mpmath.workdps(60):
        x, y = _mp(p), _mp(q)
        if space == "probs":
            px = [v / mpmath.fsum(x) for v in x]
            qy = [v / mpmath.fsum(y) for v in y]
        else:
            px = [mpmath.exp(v) for v in _mp_log_softmax(x)]
            qy = [mpmath.exp(v) for v in _mp_log_softmax(y)]
        m = [beta * a + (1 - beta) * b for a, b in zip(px, qy)]
        # dJS / dp_i at fixed q (normalised coordinates): beta log(p_i / m_i); likewise for q
        gp = [beta * mpmath.log(a / c) for a, c in zip(px, m)]
        gq = [(1 - beta) * mpmath.log(b / c) for b, c in zip(qy, m)]
        out = []
        for raw, w, g in ((x, px, gp), (y, qy, gq)):
            mean = mpmath.fsum(wi * gi for wi, gi in zip(w, g))
            if space == "probs":  # through w = raw / sum(raw)
                z = mpmath.fsum(raw)
                out.append([float((gi - mean) / z) for gi in g])
            else:  # through the softmax
                out.append([float(wi * (gi - mean)) for wi, gi in zip(w, g)])
    return np.array(out[0]), np.array(out[1])


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_js_gradient_at_tiny_probabilities(lib, restore_jax_x64):
    cases = JS_CASES if lib == "torch" else [JS_CASES[0], JS_CASES[4]]  # eager JAX: CI time
    for p, q, space, beta in cases:
        rp, rq = _exact_js_grads(p, q, space, beta)
        kw = dict(p_space=space, q_space=space, beta=beta)
        if lib == "torch":
            torch = pytest.importorskip("torch")
            tp = torch.tensor(p, dtype=torch.float64, requires_grad=True)
            tq = torch.tensor(q, dtype=torch.float64, requires_grad=True)
            gp, gq = (g.numpy() for g in torch.autograd.grad(kldiv.js_div(tp, tq, **kw),
                                                              (tp, tq)))
        else:
            jax = pytest.importorskip("jax")
            jax.config.update("jax_enable_x64", True)
            import jax.numpy as jnp

            gp, gq = (np.asarray(g) for g in jax.jit(jax.grad(
                lambda a, b: kldiv.js_div(a, b, **kw), argnums=(0, 1)))(
                    jnp.asarray(p, dtype=jnp.float64), jnp.asarray(q, dtype=jnp.float64)))
        for g, r in ((gp, rp), (gq, rq)):
            scale = np.abs(r).max()
            assert np.all(np.abs(g - r) <= 1e-12 * scale), (p, q, beta, g, r)
