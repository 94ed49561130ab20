"""JAX fast path (``jax_fast.kl_rows``'s analytic rule): float32 forward / reverse KL gradients
on peaked, nearly disjoint rows, against 50-digit mpmath analytic gradients.

The derivative with respect to the side whose log-probabilities appear twice, w_i (log(w_i /
v_i) - KL), is at a peaked row's top entry a tiny difference of two numbers of the size of KL;
[20, 0, 0, 3] against [0, 20, 0, -5] gave -0.0 instead of 6.2046e-7 (outside audit, finding 3).
Three jitted calls in all (value_and_grad over both kinds; a Hessian in p; Hessians through q)."""
import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import kldiv

mp.mp.dps = 50


def _softmax(x):
    x = [mp.mpf(float(v)) for v in x]
    z = mp.fsum(mp.exp(v) for v in x)
    return [mp.exp(v) / z for v in x]


def _kl_grads(x, y):
    """KL(softmax(x) || softmax(y)) and its gradients: d/dx_i = p_i (ell_i - KL), ell = log p/q;
    d/dy_i = q_i - p_i."""
    p, q = _softmax(x), _softmax(y)
    ell = [mp.log(a / b) for a, b in zip(p, q)]
    kl = mp.fsum(a * e for a, e in zip(p, ell))
    return p, ell, kl, [a * (e - kl) for a, e in zip(p, ell)], [b - a for a, b in zip(p, q)]


def _rows():
    rng = np.random.default_rng(20)
    P = np.zeros((8, 40), np.float32); Q = np.zeros((8, 40), np.float32)
    P[0, :4] = [20.0, 0.0, 0.0, 3.0]; Q[0, :4] = [0.0, 20.0, 0.0, -5.0]
    P[0, 4:] = Q[0, 4:] = -np.inf  # the audit's V = 4 row, padded outside both supports
    P[1:] = (20 * rng.standard_normal((7, 40))).astype(np.float32)
    Q[1:] = (20 * rng.standard_normal((7, 40))).astype(np.float32)
    return P, Q


def _loss(a, b):
    f = lambda x, y: kldiv.kl_div(x, y, p_space="logits", q_space="logits", reduction="sum")
    r = lambda x, y: kldiv.reverse_kl(x, y, p_space="logits", q_space="logits", reduction="sum")
    return jax.grad(f, (0, 1))(a, b), jax.grad(r, (0, 1))(a, b)


def test_peaked_rows_gradients():
    P, Q = _rows()
    (fp, fq), (rp, rq) = jax.jit(_loss)(jnp.asarray(P), jnp.asarray(Q))
    got = {k: np.asarray(v, np.float64) for k, v in
           dict(fp=fp, fq=fq, rp=rp, rq=rq).items()}
    assert got["fp"][0, 0] > 0 and got["rq"][0, 1] > 0  # were -0.0
    for i in range(P.shape[0]):
        sup = np.isfinite(P[i])
        x, y = P[i][sup], Q[i][sup]
        _, _, _, gx, gy = _kl_grads(x, y)      # forward: KL(p || q)
        _, _, _, hy, hx = _kl_grads(y, x)      # reverse: KL(q || p), the mirror
        for name, ref in (("fp", gx), ("fq", gy), ("rp", hx), ("rq", hy)):
            ref = np.array([float(v) for v in ref])
            g = got[name][i][sup]
            err = np.max(np.abs(g - ref)) / np.max(np.abs(ref))
            assert err <= 1e-5, (name, i, err, g, ref)
            assert np.all(got[name][i][~sup] == 0)


def test_peaked_row_hessian():
    x = np.array([20.0, 0.0, 0.0, 3.0], np.float32)
    y = np.array([0.0, 20.0, 0.0, -5.0], np.float32)
    f = lambda a: kldiv.kl_div(a, jnp.asarray(y), p_space="logits", q_space="logits",
                               reduction="sum")
    H = np.asarray(jax.jit(jax.hessian(f))(jnp.asarray(x)), np.float64)
    p, ell, kl, g, _ = _kl_grads(x, y)
    n = len(x)
    # H_ij = p_i (delta_ij - p_j) (ell_i - KL) + p_i ((delta_ij - p_j) - g_j)
    ref = np.array([[float(p[i] * ((i == j) - p[j]) * (ell[i] - kl)
                           + p[i] * (((i == j) - p[j]) - g[j]))
                     for j in range(n)] for i in range(n)])
    assert H[0, 0] < 0  # was -0.0
    assert np.max(np.abs(H - ref)) <= 1e-5 * np.max(np.abs(ref)), (H, ref)


def test_peaked_rows_hessians_wrt_q():
    """Second derivatives through q (jax.hessian in q's logits, and the mixed one, d/da of
    d/db): the softmax's tangent at a peaked row's mode left 1 - q_k to rounding (the audit
    row's d2/db1 db0 was 5x off, a std-20 row nan). H_bb = diag(q) - q q^T,
    d(q_i - p_i)/da_j = -(p_i delta_ij - p_i p_j), against 50-digit mpmath."""
    rng = np.random.default_rng(3)
    audit = (np.array([20.0, 0.0, 0.0, 3.0], np.float32),
             np.array([0.0, 20.0, 0.0, -5.0], np.float32))
    rows = [audit, ((20 * rng.standard_normal(4)).astype(np.float32),
                    (20 * rng.standard_normal(4)).astype(np.float32))]
    f = lambda a, b: kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="sum")
    both = jax.jit(lambda a, b: (jax.hessian(f, 1)(a, b), jax.jacfwd(jax.grad(f, 1), 0)(a, b)))
    for x, y in rows:
        Hbb, Hab = (np.asarray(h, np.float64) for h in both(jnp.asarray(x), jnp.asarray(y)))
        p, q = _softmax(x), _softmax(y)
        n = len(x)
        rbb = np.array([[float(q[i] * ((i == j) - q[j])) for j in range(n)] for i in range(n)])
        rab = np.array([[float(-p[i] * ((i == j) - p[j])) for j in range(n)] for i in range(n)])
        for H, ref in ((Hbb, rbb), (Hab, rab)):
            assert np.max(np.abs(H - ref)) <= 1e-5 * np.max(np.abs(ref)), (x, y, H, ref)
