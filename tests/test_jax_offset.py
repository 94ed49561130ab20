"""JAX fast path, float32 close rows whose two sides differ by a constant offset (teacher logits
shifted by 0.5 .. 1000, teacher log-probabilities against student logits: the usual distillation
call): values and per-row gradients of all four kinds against 50-digit mpmath on the exact
float32 inputs.

The log-ratio was a plain float32 difference, rounded at the ulp of the offset (a 1e-4 signal
rounded at ulp(8) = 1e-6): KL ~ 1e-9 came out 3.3e-3 relative off, gradients 4.6e-3 per row
(outside audit 2, finding 1). One jitted call for the four kinds, one eager call."""
import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import kldiv

mp.mp.dps = 50
_L = dict(p_space="logits", q_space="logits")
_KINDS = ("kl", "reverse", "js", "jeffreys")
_FNS = dict(kl=kldiv.kl_div, reverse=kldiv.reverse_kl, js=kldiv.js_div,
            jeffreys=kldiv.jeffreys_div)


def _softmax(x):
    x = [mp.mpf(float(v)) for v in x]
    m = max(x)
    z = mp.fsum(mp.exp(v - m) for v in x)
    return [mp.exp(v - m) / z for v in x]


def _through_softmax(w, g):
    """d/dx_i of f(softmax(x)) from g_i = df/dw_i: w_i (g_i - sum_j w_j g_j)."""
    s = mp.fsum(a * b for a, b in zip(w, g))
    return [a * (b - s) for a, b in zip(w, g)]


def _reference(x, y):
    """{kind: (value, d/dx, d/dy)} for p = softmax(x), q = softmax(y), in mpmath."""
    p, q = _softmax(x), _softmax(y)
    ell = [mp.log(a / b) for a, b in zip(p, q)]
    kl = mp.fsum(a * e for a, e in zip(p, ell))
    rv = mp.fsum(-b * e for b, e in zip(q, ell))
    f = (kl, [a * (e - kl) for a, e in zip(p, ell)], [b - a for a, b in zip(p, q)])
    r = (rv, [a - b for a, b in zip(p, q)], [b * (-e - rv) for b, e in zip(q, ell)])
    m = [(a + b) / 2 for a, b in zip(p, q)]
    js = (mp.fsum(a * mp.log(a / c) for a, c in zip(p, m))
          + mp.fsum(b * mp.log(b / c) for b, c in zip(q, m))) / 2
    # dJS/dp_i = log(p_i / m_i) / 2, dJS/dq_i = log(q_i / m_i) / 2
    j = (js, _through_softmax(p, [mp.log(a / c) / 2 for a, c in zip(p, m)]),
         _through_softmax(q, [mp.log(b / c) / 2 for b, c in zip(q, m)]))
    jf = (kl + rv, [a + b for a, b in zip(f[1], r[1])], [a + b for a, b in zip(f[2], r[2])])
    return dict(kl=f, reverse=r, js=j, jeffreys=jf)


def _rows():
    rng = np.random.default_rng(11)
    V = 16
    z = rng.standard_normal((7, V))
    n = rng.standard_normal((7, V))
    P = np.empty((7, V)); Q = np.empty((7, V))
    for i, off in enumerate((0.0, 0.5, 2.0, 8.0, 30.0, 1000.0)):
        P[i] = z[i] + off
        Q[i] = z[i] + 1e-4 * n[i]
    # teacher log-probabilities against student logits (offset: the row's logsumexp)
    P[6] = z[6] - np.log(np.sum(np.exp(z[6])))
    Q[6] = z[6] + 1e-4 * n[6]
    return P.astype(np.float32), Q.astype(np.float32)


def _all_kinds(P, Q):
    out = {}
    for k in _KINDS:
        f = lambda a, b, k=k: _FNS[k](a, b, reduction="sum", **_L)
        vals = _FNS[k](P, Q, reduction="none", **_L)
        out[k] = (vals,) + tuple(jax.grad(f, (0, 1))(P, Q))
    return out


def _check(got, P, Q, vtol=1e-6, gtol=2e-6):
    for i in range(P.shape[0]):
        ref = _reference(P[i], Q[i])
        for k in _KINDS:
            v, gp, gq = (np.asarray(t, np.float64) for t in got[k])
            rv, rgp, rgq = ref[k]
            assert abs(v[i] - float(rv)) <= vtol * float(rv), (k, i, v[i], float(rv))
            for g, rg in ((gp[i], rgp), (gq[i], rgq)):
                rg = np.array([float(t) for t in rg])
                err = np.max(np.abs(g - rg)) / np.max(np.abs(rg))
                assert err <= gtol, (k, i, err)


def test_offset_rows_jit():
    P, Q = _rows()
    got = jax.jit(_all_kinds)(jnp.asarray(P), jnp.asarray(Q))
    _check(got, P, Q)


def test_offset_row_eager_audit():
    """The audit's row (V = 8, offset 8), eager: forward and reverse value and gradients."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal(8); n = rng.standard_normal(8)
    x = (z + 8).astype(np.float32); y = (z + 1e-4 * n).astype(np.float32)
    ref = _reference(x, y)
    for k in ("kl", "reverse"):
        f = lambda a, b, k=k: _FNS[k](a, b, reduction="sum", **_L)
        v, (gp, gq) = jax.value_and_grad(f, (0, 1))(jnp.asarray(x), jnp.asarray(y))
        rv, rgp, rgq = ref[k]
        assert abs(float(v) - float(rv)) <= 1e-6 * float(rv), (k, float(v), float(rv))
        for g, rg in ((gp, rgp), (gq, rgq)):
            rg = np.array([float(t) for t in rg])
            assert np.max(np.abs(np.asarray(g, np.float64) - rg)) <= 2e-6 * np.max(np.abs(rg))
