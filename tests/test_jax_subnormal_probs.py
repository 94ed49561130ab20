"""Subnormal probabilities with JAX (#11): XLA on CPU flushes subnormal operands to 0, in
arithmetic and in comparisons, so the core read a float32 q_i = 1e-45 as 0 and reported
KL(p || q) = +inf where the true value is 50.95 (p = [0.5, 0.5], q = [1, 1e-45]), and a
subnormal on both sides gave nan. The core now reads such entries from their bits (the support,
log x, the near-ratio test), and forms the KL derivatives at a subnormal probability without a
flushed intermediate.

Reference: mpmath on the exact float32 inputs (renormalised, as kldiv does), values and
gradients with respect to the probabilities, per row; a derivative beyond float32 must be
+-inf of its sign. The default JAX path (the core, jitted by kldiv.backends.jax_fast) is what
runs. Gradients are checked for KL, reverse KL and Jeffreys (JS's were right before), not at
entries that are 0 on both sides (no derivative there). Jeffreys' at an entry subnormal on
both sides (rows 1 and 2) was ~1e-8 where the truth is O(1) (-1.837 at row 1's p_0): the
flushed q_i - p_i times 1 / p_i, and the weights' flushed derivative.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
mpmath = pytest.importorskip("mpmath")
jnp = jax.numpy

import kldiv  # noqa: E402

FN = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
      "jeffreys": kldiv.jeffreys_div}
# float32 rows, 0 on both sides as padding (4 categories each)
P = [[0.5, 0.5, 0.0, 0.0], [2e-42, 3e-42, 0.5, 0.5], [0.5, 0.5, 1e-39, 0.0],
     [0.7, 0.3, 1e-40, 0.0], [1.0, 1e-45, 2e-45, 0.0]]
Q = [[1.0, 1e-45, 0.0, 0.0], [4e-42, 1e-42, 0.25, 0.75], [0.3, 0.7, 2e-39, 0.0],
     [0.2, 0.5, 0.3, 0.0], [0.5, 0.25, 0.25, 0.0]]
X = np.array(P, np.float32)
Y = np.array(Q, np.float32)


def reference(kind, x, y, beta=0.5):
    """(value, dD/dx, dD/dy) for one row of probabilities (renormalised), nan where x = y = 0."""
    keep = [i for i in range(len(x)) if x[i] > 0 or y[i] > 0]
    with mpmath.workprec(300):
        xs = [mpmath.mpf(float(x[i])) for i in keep]
        ys = [mpmath.mpf(float(y[i])) for i in keep]
        zx, zy = mpmath.fsum(xs), mpmath.fsum(ys)
        p, q = [a / zx for a in xs], [a / zy for a in ys]
        n = len(keep)

        def kl(a, b):  # sum a log(a / b), its derivatives with respect to a and b
            val = mpmath.fsum(a[i] * mpmath.log(a[i] / b[i]) for i in range(n) if a[i] > 0)
            ga = [mpmath.log(a[i] / b[i]) + 1 if a[i] > 0 else mpmath.mpf(0) for i in range(n)]
            gb = [-a[i] / b[i] for i in range(n)]
            return val, ga, gb

        if kind == "forward":
            val, gp, gq = kl(p, q)
        elif kind == "reverse":
            val, gq, gp = kl(q, p)
        elif kind == "jeffreys":
            v1, a1, b1 = kl(p, q)
            v2, b2, a2 = kl(q, p)
            val, gp, gq = v1 + v2, [a1[i] + a2[i] for i in range(n)], [b1[i] + b2[i] for i in range(n)]
        else:
            b = mpmath.mpf(beta)
            m = [b * p[i] + (1 - b) * q[i] for i in range(n)]
            v1, a1, m1 = kl(p, m)
            v2, a2, m2 = kl(q, m)
            val = b * v1 + (1 - b) * v2
            gm = [b * m1[i] + (1 - b) * m2[i] for i in range(n)]
            gp = [b * a1[i] + b * gm[i] for i in range(n)]
            gq = [(1 - b) * a2[i] + (1 - b) * gm[i] for i in range(n)]

        def through_norm(g, z, w):  # d/dx_j of f(x / z): (g_j - sum_i w_i g_i) / z
            s = mpmath.fsum(w[i] * g[i] for i in range(n))
            return [(g[j] - s) / z for j in range(n)]

        gx_k, gy_k = through_norm(gp, zx, p), through_norm(gq, zy, q)
    gx = np.full(len(x), np.nan)
    gy = np.full(len(x), np.nan)
    for j, i in enumerate(keep):
        gx[i], gy[i] = float(gx_k[j]), float(gy_k[j])
    return float(val), gx, gy


def _check_grad(g, ref, what):
    ok = ~np.isnan(ref)
    g, ref = np.asarray(g, np.float64)[ok], ref[ok]
    fmax = float(np.finfo(np.float32).max)
    assert not np.isnan(g).any(), (what, g, ref)
    over = np.abs(ref) > fmax
    np.testing.assert_array_equal(g[over], np.sign(ref[over]) * np.inf, err_msg=what)
    fin = ~over
    scale = float(np.abs(ref[fin]).max())
    err = float(np.abs(g[fin] - ref[fin]).max())
    assert err <= 2e-5 * scale, (what, g, ref, err / scale)


def test_values_against_mpmath():
    """Every kind in one jitted call (row 0 is the reported row: 50.95, was +inf)."""
    v = jax.jit(lambda a, b: [FN[k](a, b, validate=False) for k in FN])(jnp.asarray(X),
                                                                         jnp.asarray(Y))
    for kind, got in zip(FN, v):
        for r in range(len(P)):
            val = reference(kind, X[r], Y[r])[0]
            assert abs(float(got[r]) - val) <= 2e-6 * val + 1e-30, (kind, r, float(got[r]), val)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys"])
def test_gradients_against_mpmath(kind):
    """KL, reverse KL and Jeffreys, whose derivative at a subnormal probability was 0 (O(1) in
    truth) or came from a flushed coefficient. (JS's were right already; it costs the longest
    compile.)"""
    def f(a, b):
        return jnp.sum(FN[kind](a, b, validate=False))

    gx, gy = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(X), jnp.asarray(Y))
    for r in range(len(P)):
        _, rx, ry = reference(kind, X[r], Y[r])
        _check_grad(gx[r], rx, f"{kind} row {r} d/dp")
        _check_grad(gy[r], ry, f"{kind} row {r} d/dq")
