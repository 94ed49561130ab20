"""JAX fast path (forward and reverse KL under ``jax.jit``, where the eager host check that
sends logits near the float limit to the core cannot run): rows whose log-ratio or value lies
beyond the float range give the core's answer, the true finite gradient (or +-inf where the
derivative itself overflows), never nan and never a clamped value.

The rows and the 1400-bit mpmath reference are tests/test_core_overflow_rows.py's (float32
[3e38, -3e38] against its flip, float64 +-1.7e308, rows of spread beyond the float range, T =
0.5 and 3); the fast path gave 0 gradients where the value overflowed, and clamped values
(1.38e38 instead of 2.14e38) where only the log-ratio did. Also a finfo.min-masked float32
row at T = 0.5 (q's mask where p holds 2.4e-10: the value was half the true 1.637e29), and
the structural +inf row (p_i > 0 = q_i), whose gradient stays 0. One jitted call per
(dtype, temperature), rows padded with -inf on both sides."""
import math

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest

pytest.importorskip("torch")  # (the reference module's own import)
from test_core_overflow_rows import ROWS, _check_grad, _check_value, reference  # noqa: E402

import kldiv  # noqa: E402

FN = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl}


def _groups():
    out = {}
    for name, (x, y, dt, t, ps) in ROWS.items():
        if ps == "logits":
            out.setdefault((dt, t), []).append(name)
    return sorted(out.items())


def _padded(names):
    n = max(len(ROWS[k][0]) for k in names)
    P = np.full((len(names), n), -np.inf)
    Q = np.full((len(names), n), -np.inf)
    for i, k in enumerate(names):
        x, y = ROWS[k][:2]
        P[i, :len(x)] = x
        Q[i, :len(y)] = y
    return P, Q


def _value_and_grad(kind, P, Q, t):
    f = lambda a, b: FN[kind](a, b, p_space="logits", q_space="logits", temperature=t,
                              reduction="none", validate=False)
    g = lambda a, b: (f(a, b), jax.grad(lambda u, v: f(u, v).sum(), (0, 1))(a, b))
    v, (ga, gb) = jax.jit(g)(jnp.asarray(P), jnp.asarray(Q))
    return np.asarray(v, np.float64), np.asarray(ga), np.asarray(gb)


@pytest.mark.usefixtures("restore_jax_x64")
@pytest.mark.parametrize("kind", sorted(FN))
@pytest.mark.parametrize("group", _groups(), ids=lambda g: f"{g[0][0]}-T{g[0][1]}")
def test_overflow_rows_under_jit(kind, group):
    (dt, t), names = group
    jax.config.update("jax_enable_x64", True)
    P, Q = _padded(names)
    v, ga, gb = _value_and_grad(kind, P.astype(dt), Q.astype(dt), t)
    for i, name in enumerate(names):
        n = len(ROWS[name][0])
        val, rx, ry = reference(kind, name)
        _check_value(float(v[i]), val, dt)
        _check_grad(ga[i, :n], rx, dt, f"{kind} {name} d/dp")
        _check_grad(gb[i, :n], ry, dt, f"{kind} {name} d/dq")
        assert not ga[i, n:].any() and not gb[i, n:].any()


def _row_reference(x, y, t):
    """(KL, d/dx, d/dy) of KL(softmax(x / t) || softmax(y / t)) in mpmath (-inf: 0 there)."""
    with mp.workprec(400):
        t = mp.mpf(t)

        def log_softmax(v):
            u = [mp.mpf(float(a)) / t if np.isfinite(a) else None for a in v]
            m = max(a for a in u if a is not None)
            lz = m + mp.log(mp.fsum(mp.exp(a - m) for a in u if a is not None))
            return [a - lz if a is not None else None for a in u]

        lp, lq = log_softmax(x), log_softmax(y)
        p = [mp.exp(a) if a is not None else mp.mpf(0) for a in lp]
        q = [mp.exp(a) if a is not None else mp.mpf(0) for a in lq]
        ell = [a - b if a is not None else mp.mpf(0) for a, b in zip(lp, lq)]
        kl = mp.fsum(a * e for a, e in zip(p, ell))
        gx = [a * (e - kl) / t for a, e in zip(p, ell)]
        gy = [(b - a) / t for a, b in zip(p, q)]
        return float(kl), np.array([float(a) for a in gx]), np.array([float(a) for a in gy])


def _masked_rows():
    """Float32 rows at T = 0.5 with a finfo.min entry on the second side where the first holds
    mass (log-ratio ~ -6.8e38, beyond the float range): 0.3 there (KL ~ 1e38), and 2.7e-38
    (a contribution of 18 to KL ~ 18: the ordinary route)."""
    fmin = float(np.finfo(np.float32).min)
    rng = np.random.default_rng(3)
    w = (2 * rng.standard_normal(8)).astype(np.float32)
    v = (w + rng.standard_normal(8) - 1e6).astype(np.float32)
    v[int(np.argsort(w)[-2])] = fmin
    w2 = np.array([0.0, 1.5, -3.0, 2.0, 2.0 - 43.25, 0.5, -1.0, 1.0], np.float32)
    v2 = (w2 + np.float32(0.25) * rng.standard_normal(8).astype(np.float32)).astype(np.float32)
    v2[4] = fmin
    return [(w, v), (w2, v2)]


@pytest.mark.parametrize("kind", sorted(FN))
def test_finfo_min_mask_at_low_temperature(kind):
    """KL(softmax(w / T) || softmax(v / T)) (forward: kl_div(w, v); reverse: reverse_kl(v, w))
    on the rows of ``_masked_rows``: the value was half the true one (the log-ratio clamped)."""
    for w, v in _masked_rows():
        val, rw, rv = _row_reference(w, v, 0.5)
        if kind == "forward":
            out, gw, gv = _value_and_grad(kind, w[None], v[None], 0.5)
        else:
            out, gv, gw = _value_and_grad(kind, v[None], w[None], 0.5)
        _check_value(float(out[0]), val, "float32")
        _check_grad(gw[0], rw, "float32", f"{kind} d/dw")
        if val < 1e30:
            _check_grad(gv[0], rv, "float32", f"{kind} d/dv")
        else:
            # (q - p) / T on a row of KL 1e36, p and q ~0.3 apart by 3e-3: 6.6e-5 of the largest,
            # as the core gives (both form q - p directly where KL is huge)
            assert np.isfinite(gv).all()
            assert np.max(np.abs(gv[0] - rv)) <= 1e-4 * np.max(np.abs(rv))


@pytest.mark.parametrize("kind", sorted(FN))
def test_structural_inf_keeps_zero_gradient_under_jit(kind):
    x = np.array([[3e38, -3e38, 0.0], [0.0, 1.0, 2.0]], np.float32)
    y = np.array([[-3e38, 3e38, -np.inf], [0.0, 1.0, -np.inf]], np.float32)
    a, b = (x, y) if kind == "forward" else (y, x)
    v, ga, gb = _value_and_grad(kind, a, b, 1.0)
    assert (v == math.inf).all()
    assert not ga.any() and not gb.any() and not np.isnan(ga).any()


@pytest.mark.usefixtures("restore_jax_x64")
@pytest.mark.parametrize("kind", sorted(FN))
def test_hessian_of_a_wide_row_under_jit(kind):
    """jax.hessian on a float32 row whose log-ratio spans beyond the float range (forward KL
    was 0.48 off): float64 autodiff of the textbook formula on the same inputs (which holds
    these magnitudes) is the reference."""
    jax.config.update("jax_enable_x64", True)
    x, y = ROWS["finite_huge_grad32"][:2]
    n = len(x)

    def naive(w):
        lp, lq = jax.nn.log_softmax(w[:n]), jax.nn.log_softmax(w[n:])
        if kind == "forward":
            return jnp.sum(jnp.exp(lp) * (lp - lq))
        return jnp.sum(jnp.exp(lq) * (lq - lp))

    z = jnp.asarray(np.array(x + y, np.float32))
    H = jax.jit(jax.hessian(lambda w: FN[kind](w[:n], w[n:], p_space="logits",
                                               q_space="logits", validate=False)))(z)
    R = np.asarray(jax.hessian(naive)(z.astype(jnp.float64)))
    H = np.asarray(H, np.float64)
    assert np.isfinite(H).all() and np.isfinite(R).all()
    assert np.max(np.abs(H - R)) <= 1e-5 * np.max(np.abs(R))
