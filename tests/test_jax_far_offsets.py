"""JAX fast path, close rows whose two sides differ by a large constant (|offset| > 2048):
forward and reverse KL, values and per-row gradients against 50-digit mpmath on the exact
inputs (float32 at offsets 3000, 1e5, 1e6 and 1e37; float64 at 3000, 1e6 and 1e30).

Rows whose maxima were more than 2048 apart took each side centred on its own maximum, and
b - max(b) rounded at the ulp of the row's spread: float32 teacher logits against student
logits shifted by 3000 came out 1e-4 relative off at KL 1e-9 (1e-6 at 1e6). Both kinds in one
jitted value_and_grad per dtype, and one eager call."""
import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
import kldiv

mp.mp.dps = 60
_L = dict(p_space="logits", q_space="logits")
_FNS = dict(kl=kldiv.kl_div, reverse=kldiv.reverse_kl)


def _log_softmax(x):
    x = [mp.mpf(float(v)) for v in x]
    m = max(x)
    lz = m + mp.log(mp.fsum(mp.exp(v - m) for v in x))
    return [v - lz for v in x]


def _reference(x, y):
    """{kind: (value, d/dx, d/dy)} for p = softmax(x), q = softmax(y), in mpmath."""
    lp, lq = _log_softmax(x), _log_softmax(y)
    p, q = [mp.exp(v) for v in lp], [mp.exp(v) for v in lq]
    ell = [a - b for a, b in zip(lp, lq)]
    kl = mp.fsum(a * e for a, e in zip(p, ell))
    rv = mp.fsum(-b * e for b, e in zip(q, ell))
    return dict(kl=(kl, [a * (e - kl) for a, e in zip(p, ell)], [b - a for a, b in zip(p, q)]),
                reverse=(rv, [a - b for a, b in zip(p, q)],
                         [b * (-e - rv) for b, e in zip(q, ell)]))


def _rows(dtype, offsets, signal):
    """Per offset three rows: teacher logits shifted (p's side), student logits shifted (q's
    side, down), and teacher log-probabilities against shifted student logits."""
    rng = np.random.default_rng(5)
    V = 12
    P, Q = [], []
    for off in offsets:
        z = rng.standard_normal((3, V))
        n = rng.standard_normal((3, V))
        P.append(z[0] + off); Q.append(z[0] + signal * n[0])
        P.append(z[1]); Q.append(z[1] + signal * n[1] - off)
        lp = z[2] - np.log(np.sum(np.exp(z[2])))
        P.append(lp); Q.append(z[2] + signal * n[2] + off)
    return np.array(P, dtype), np.array(Q, dtype)


def _check(vals, grads, P, Q, vtol, gtol):
    for k in _FNS:
        v = np.asarray(vals[k], np.float64)
        gp, gq = (np.asarray(g, np.float64) for g in grads[k])
        for i in range(P.shape[0]):
            rv, rgp, rgq = _reference(P[i], Q[i])[k]
            assert abs(v[i] - float(rv)) <= vtol * float(rv), (k, i, v[i], float(rv))
            for g, rg in ((gp[i], rgp), (gq[i], rgq)):
                rg = np.array([float(t) for t in rg])
                err = np.max(np.abs(g - rg)) / np.max(np.abs(rg))
                assert err <= gtol, (k, i, err)


def _run(P, Q):
    vals, grads = {}, {}
    for k, fn in _FNS.items():
        vals[k] = fn(P, Q, reduction="none", **_L)
        grads[k] = jax.grad(lambda a, b, fn=fn: fn(a, b, reduction="sum", **_L), (0, 1))(P, Q)
    return vals, grads


def test_far_offsets_float32():
    P, Q = _rows(np.float32, (3000.0, 1e5, 1e6, 1e37), 1e-4)
    vals, grads = jax.jit(_run)(jnp.asarray(P), jnp.asarray(Q))
    _check(vals, grads, P, Q, 1e-6, 2e-6)


@pytest.mark.usefixtures("restore_jax_x64")
def test_far_offsets_float64():
    jax.config.update("jax_enable_x64", True)
    P, Q = _rows(np.float64, (3000.0, 1e6, 1e30), 1e-7)
    vals, grads = jax.jit(_run)(jnp.asarray(P), jnp.asarray(Q))
    _check(vals, grads, P, Q, 1e-13, 1e-13)


def test_far_offset_eager():
    """Eagerly (the pre hook's host checks), float32 at offset 3000."""
    P, Q = _rows(np.float32, (3000.0,), 1e-4)
    vals, grads = _run(jnp.asarray(P), jnp.asarray(Q))
    _check(vals, grads, P, Q, 1e-6, 2e-6)
