"""Closed-form KLs of kldiv.distributions at extreme parameters, against mpmath (50 digits) on
the exact float inputs: no intermediate may overflow (nan from 0 * inf, or inf for a finite KL)
where the value is in range; torch gradients against mpmath derivatives.

Audit 3, F3: ``normal_kl_logvar`` gave nan for identical Gaussians with a log-variance below
-88.7 (float32) / -709.8 (float64) (``exp(-vq)`` overflowed while ``dm * dm`` was 0) and inf
for finite KLs; ``normal_kl_scale`` and Laplace-Laplace overflowed ``dz * dz`` / ``mp - mq``.
"""
import math
import warnings

import mpmath
import numpy as np
import pytest

from kldiv import distributions as D

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("restore_jax_x64")

mpmath.mp.dps = 50

F32_MAX = float(np.finfo(np.float32).max)
F64_MAX = float(np.finfo(np.float64).max)


def _as(backend, x, dtype):
    x = np.asarray(x, dtype=dtype)
    if backend == "numpy":
        return x
    if backend == "torch":
        return torch.from_numpy(x)
    import jax

    if dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    out = jnp.asarray(x)
    assert out.dtype == dtype
    return out


def _f(x):
    if hasattr(x, "detach"):
        x = x.detach().numpy()
    return float(np.asarray(x).reshape(-1)[0])


def _np(x):
    if hasattr(x, "detach"):
        x = x.detach().numpy()
    return np.asarray(x, dtype=np.float64)


def _ref_logvar(mp_, vp, mq, vq):
    mp_, vp, mq, vq = map(mpmath.mpf, (mp_, vp, mq, vq))
    d = vp - vq
    return (mpmath.exp(d) - 1 - d + (mp_ - mq) ** 2 * mpmath.exp(-vq)) / 2


def _ref_scale(mp_, sp, mq, sq):
    mp_, sp, mq, sq = map(mpmath.mpf, (mp_, sp, mq, sq))
    r = sp / sq
    return (r * r - 1) / 2 - mpmath.log(r) + (mp_ - mq) ** 2 / (2 * sq * sq)


def _ref_laplace(mp_, bp, mq, bq):
    mp_, bp, mq, bq = map(mpmath.mpf, (mp_, bp, mq, bq))
    d = abs(mp_ - mq)
    return mpmath.log(bq / bp) + d / bq + (bp / bq) * mpmath.exp(-d / bp) - 1


def _check(got, ref, dtype, rtol=None):
    """``got`` equals the mpmath value rounded to ``dtype`` (inf beyond its range)."""
    big = F32_MAX if dtype == np.float32 else F64_MAX
    if rtol is None:
        rtol = 4e-7 if dtype == np.float32 else 2e-15
    assert not math.isnan(got), (got, ref)
    if abs(ref) > big:
        assert got == (math.inf if ref > 0 else -math.inf), (got, mpmath.nstr(ref, 8))
        return
    tiny = float(np.finfo(dtype).tiny)
    assert abs(got - float(ref)) <= rtol * float(abs(ref)) + tiny, (got, mpmath.nstr(ref, 12))


# (mean_p, logvar_p, mean_q, logvar_q) and the dtypes they are meant for
LOGVAR = [
    ((0.0, -89.0, 0.0, -89.0), "32"),          # identical, e^-vq overflows in float32: was nan
    ((0.0, -100.0, 0.0, -100.0), "32"),
    ((1e-3, -88.0, 0.0, -90.0), "32"),         # finite 6.1e32: was inf
    ((1e20, 100.0, 0.0, 100.0), "32"),         # dm * dm overflows, e^-vq underflows: was inf
    ((1e10, -50.0, 0.0, -50.0), "32"),         # 2.6e41: truly beyond float32 (inf)
    ((3.0, 80.0, -2.0, 87.0), "32"),
    ((0.0, 88.0, 0.0, -0.5), "32"),            # e^d / 2 in range, e^d overflows
    ((0.0, -800.0, 0.0, -800.0), "64"),        # was nan
    ((1e-200, -1000.0, 0.0, -1000.0), "64"),   # 9.85e33: was nan
    ((1e-320, -1500.0, 0.0, -1500.0), "64"),   # subnormal dm, e^(-vq/2) overflows: 5.3e5^2 / 2
    ((1e200, 1000.0, 0.0, 1000.0), "64"),      # was nan
    ((1e150, 0.0, -1e150, 700.0), "64"),
    ((1e308, 2000.0, -1e308, 2000.0), "64"),   # mp - mq overflows: 2e308^2 e^-2000 / 2
    ((0.0, 710.0, 0.0, 0.0), "64"),            # e^710 / 2 = 1.1e308: was inf
    ((0.0, 709.0, 0.0, -0.5), "64"),
    ((0.0, -1e308, 0.0, 1e308), "64"),         # vp - vq = -inf: KL = 1e308 - 1/2
    ((0.0, 1e308, 0.0, -1e308), "64"),         # truly inf
    ((0.0, -745.0, 0.0, 0.0), "both"),
    ((0.0, 700.3, 0.0, -8.123456789), "64"),    # vp - vq rounds: its error carried (was 4e-14)
    ((0.0, 350.7, 0.0, -300.9876543), "64"),
    ((0.0, 50.3, 0.0, -37.7654321), "both"),
    ((2.0, 800.0, 0.0, 800.000001), "both"),
    ((0.5, 0.25, -0.5, 0.25 + 1e-7), "both"),
]


def _cases(table, dtype):
    tag = "32" if dtype == np.float32 else "64"
    out = []
    for c, which in table:
        if which not in (tag, "both"):
            continue
        if dtype == np.float32 and any(abs(v) > F32_MAX for v in c):
            continue
        out.append(c)
    return out


def _no_subnormals(cases, backend, dtype):
    """XLA on CPU flushes subnormal numbers to 0: those inputs are not what JAX computes on."""
    if backend != "jax":
        return cases
    tiny = float(np.finfo(dtype).tiny)
    return [c for c in cases if not any(v != 0 and abs(v) < tiny for v in c)]


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normal_kl_logvar_extreme_values(backend, dtype):
    cases = _no_subnormals(_cases(LOGVAR, dtype), backend, dtype)
    args = [_as(backend, col, dtype) for col in zip(*cases)]   # all cases in one call
    fn = lambda *a: D.normal_kl_logvar(*a, axis=())  # noqa: E731
    if backend == "jax":
        import jax

        fn = jax.jit(fn)        # one compilation instead of one per eager operation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _np(fn(*args))
    for c, g in zip(cases, got):
        _check(float(g), _ref_logvar(*[float(dtype(v)) for v in c]), dtype)


def _ref_logvar_grad(mp_, vp, mq, vq):
    mp_, vp, mq, vq = map(mpmath.mpf, (mp_, vp, mq, vq))
    e = mpmath.exp(-vq)
    g_mp = (mp_ - mq) * e
    g_vp = (mpmath.exp(vp - vq) - 1) / 2
    g_vq = -g_vp - (mp_ - mq) ** 2 * e / 2
    return [g_mp, g_vp, -g_mp, g_vq]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_kl_logvar_extreme_gradients(dtype):
    npd = np.float32 if dtype == torch.float32 else np.float64
    cases = [(0.0, -100.0, 0.0, -100.0), (1e-3, -88.0, 0.0, -90.0), (1e20, 100.0, 0.0, 100.0),
             (0.0, -89.0, 0.0, -89.0), (2.0, 3.0, -1.0, 2.5)]
    if dtype == torch.float64:
        cases += [(0.0, -800.0, 0.0, -800.0), (1e-200, -1000.0, 0.0, -1000.0),
                  (1e200, 1000.0, 0.0, 1000.0), (0.0, 700.0, 0.0, 0.0),
                  (1.0, 350.7, 0.5, -300.9876543)]
    for c in cases:
        xs = [torch.tensor([v], dtype=dtype, requires_grad=True) for v in c]
        value = D.normal_kl_logvar(*xs, axis=())
        value.sum().backward()
        exact = [float(npd(v)) for v in c]
        _check(_f(value), _ref_logvar(*exact), npd)
        for x, g in zip(xs, _ref_logvar_grad(*exact)):
            _check(_f(x.grad), g, npd, rtol=2e-6 if dtype == torch.float32 else 1e-14)


SCALE = [
    ((2e19, 1.0, 0.0, 1.0), "both"),           # float32 dz * dz overflowed: 2e38
    ((1e308, 1e300, -1e308, 1e300), "64"),     # mp - mq overflowed: 2e16
    ((1.5e154, 1.0, 0.0, 1.0), "64"),          # 1.125e308
    ((0.0, 1.6e154, 0.0, 1.0), "64"),          # rho^2 overflows, rho^2 / 2 does not
    ((0.0, 1.8e19, 0.0, 1.0), "32"),
    ((0.0, 1e-300, 0.0, 1e300), "64"),
    ((0.0, 1e300, 0.0, 1e-300), "64"),         # truly inf
    ((1e-300, 1e-300, 0.0, 1e-300), "64"),
    ((0.0, 1e-320, 0.0, 3e-320), "64"),        # subnormal scales: log(a / b), not log a - log b
    ((0.0, 1.0, 0.0, 3.0 - 1e-15), "both"),
    ((1.0, 0.01, 1.0 + 1e-12, 0.01 + 1e-14), "both"),
]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normal_kl_scale_extreme_values(backend, dtype):
    cases = _no_subnormals(_cases(SCALE, dtype), backend, dtype)
    args = [_as(backend, col, dtype) for col in zip(*cases)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _np(D.normal_kl_scale(*args, axis=()))
    for c, g in zip(cases, got):
        _check(float(g), _ref_scale(*[float(dtype(v)) for v in c]), dtype)


LAPLACE = [
    (1e308, 1.0, -1e308, 1e300),               # |loc_p - loc_q| overflowed: 2.0e8
    (-1e308, 1e-300, 1e308, 1e300),
    (0.0, 1e300, 1e308, 1e-10),                # b_p / b_q overflows, e^-t = 0: truly inf
    (0.0, 1e-320, 0.0, 3e-320),
    (0.0, 1.0, 1e-8, 1.0),
    (0.0, 1.0, 0.5, 0.6),
    (0.0, 1.0, 1e-300, 1.0 + 1e-15),
    (1e300, 1e-10, 0.0, 1.0),
]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_laplace_kl_extreme_values(backend):
    a = [_as(backend, col, np.float64) for col in zip(*LAPLACE)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _np(D.kl(D.Laplace(a[0], a[1]), D.Laplace(a[2], a[3])).value)
    for c, g in zip(LAPLACE, got):
        _check(float(g), _ref_laplace(*c), np.float64, rtol=4e-15)


# --------------------------------------------------------------------------- full-covariance
# Audit 3, F7: mvn_kl_cholesky's relative error grew as 1/difference for nearly identical
# factors (5.6e-5 at a 1e-12 difference): M = L_q^-1 L_p by a triangular solve leaves ulp(|L|)
# of noise in its strict lower part, next to entries of the size of the difference.


def _mp_mat(a):
    return mpmath.matrix([[mpmath.mpf(float(v)) for v in row] for row in np.atleast_2d(a)])


def _ref_mvn(m1, L1, m2, L2):
    """KL and its gradients w.r.t. mean_p and L_p (lower triangle), mpmath on exact inputs."""
    k = len(m1)
    A, B = _mp_mat(L1), _mp_mat(L2)
    d = _mp_mat(np.asarray(m2)[:, None]) - _mp_mat(np.asarray(m1)[:, None])
    Sq_inv = (B * B.T) ** -1
    tr = sum((Sq_inv * A * A.T)[i, i] for i in range(k))
    maha = (d.T * Sq_inv * d)[0, 0]
    ld = 2 * sum(mpmath.log(B[i, i]) - mpmath.log(A[i, i]) for i in range(k))
    value = (tr + maha - k + ld) / 2
    g_m = -(Sq_inv * d)
    G = Sq_inv * A
    g_L = [[G[i, j] - (1 / A[i, i] if i == j else 0) if j <= i else mpmath.mpf(0)
            for j in range(k)] for i in range(k)]
    return value, [g_m[i, 0] for i in range(k)], g_L


def _mvn_pairs():
    rng = np.random.default_rng(7)
    out = []
    for it in range(12):
        k = 1 + it % 5
        A = np.tril(rng.standard_normal((k, k)))
        np.fill_diagonal(A, np.abs(np.diag(A)) + 0.2)
        sc = [1.0, 1e-100, 1e100][it % 3]
        eps = [1e-8, 1e-12, 1e-14, 1e-15][it % 4]
        A = A * sc
        m1 = rng.standard_normal(k) * sc
        B = A * (1 + eps * np.tril(rng.standard_normal((k, k))))
        if it % 2:                       # one off-diagonal entry only, equal means
            B = A.copy()
            B[-1, 0] += eps * sc if k > 1 else 0.0
            m2 = m1.copy()
        else:
            m2 = m1 + eps * sc * rng.standard_normal(k)
        out.append((m1, A, m2, B))
    return out


@pytest.mark.parametrize("backend", ["numpy", "torch", "objects"])
def test_mvn_kl_close_factors_against_mpmath(backend):
    for m1, A, m2, B in _mvn_pairs():
        ref = float(_ref_mvn(m1, A, m2, B)[0])
        if backend == "objects":
            t = [torch.from_numpy(x) for x in (m1, A, m2, B)]
            got = _f(D.kl(D.MultivariateNormal(t[0], t[1]), D.MultivariateNormal(t[2], t[3])).value)
        else:
            args = [_as(backend, x, np.float64) for x in (m1, A, m2, B)]
            got = _f(D.mvn_kl_cholesky(*args))
        assert got >= 0
        assert abs(got - ref) <= 1e-13 * ref + 1e-300, (len(m1), got, ref)


def test_mvn_kl_close_factors_gradients():
    """Gradients w.r.t. all four arguments, per pair: error / largest entry <= 1e-12."""
    for m1, A, m2, B in _mvn_pairs()[:8]:
        k = len(m1)
        xs = [torch.tensor(x, requires_grad=True) for x in (m1, A, m2, B)]
        D.mvn_kl_cholesky(*xs).backward()
        _, g_m, g_L = _ref_mvn(m1, A, m2, B)
        Lp, Lq = _mp_mat(A), _mp_mat(B)
        d = _mp_mat(np.asarray(m2)[:, None]) - _mp_mat(np.asarray(m1)[:, None])
        Sq_inv = (Lq * Lq.T) ** -1
        G = -(Sq_inv * (Lp * Lp.T + d * d.T) * Sq_inv * Lq)
        g_Lq = [[G[i, j] + (1 / Lq[i, i] if i == j else 0) if j <= i else 0 for j in range(k)]
                for i in range(k)]
        want = np.array([float(v) for v in g_m] + [float(v) for row in g_L for v in row]
                        + [-float(v) for v in g_m] + [float(v) for row in g_Lq for v in row])
        got = np.concatenate([xs[0].grad.numpy(), np.tril(xs[1].grad.numpy()).reshape(-1),
                              xs[2].grad.numpy(), np.tril(xs[3].grad.numpy()).reshape(-1)])
        scale = np.max(np.abs(want))
        assert np.max(np.abs(got - want)) <= 1e-12 * scale, (k, got, want)


def _ref_laplace_grad(mp_, bp, mq, bq):
    mp_, bp, mq, bq = map(mpmath.mpf, (mp_, bp, mq, bq))
    d = abs(mp_ - mq)
    sgn = mpmath.sign(mp_ - mq)
    t = d / bp
    e = mpmath.exp(-t)
    g_m = sgn * (1 - e) / bq
    return [g_m, -1 / bp + e * (1 + t) / bq, -g_m, 1 / bq - d / bq ** 2 - bp * e / bq ** 2]


def test_laplace_kl_extreme_gradients():
    """Finite and right where the gradient is in range (d / b_p^2 and b_p / b_q^2 may overflow
    in a branch whose factor is 0: was nan)."""
    cases = [(1e308, 1.0, -1e308, 1e300), (-1e308, 1e-300, 1e308, 1e300), (1e300, 1e-10, 0.0, 1.0),
             (0.0, 1.0, 0.5, 0.6), (0.0, 1.0, 1e-8, 1.0), (3.0, 1e-300, 0.0, 1e-290)]
    xs = [torch.tensor(col, dtype=torch.float64, requires_grad=True) for col in zip(*cases)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        D.kl(D.Laplace(xs[0], xs[1]), D.Laplace(xs[2], xs[3])).value.sum().backward()
    for i, c in enumerate(cases):
        want = _ref_laplace_grad(*c)
        row = max(abs(float(g)) for g in want)      # per distribution: error / its largest entry
        for x, g in zip(xs, want):
            got = float(x.grad[i])
            if row > F64_MAX:
                _check(got, g, np.float64)
            else:
                assert abs(got - float(g)) <= 1e-14 * row, (c, got, mpmath.nstr(g, 12))


# Bernoulli from logits: b - a overflowed (a = 1e308, b = -1e308: 0 * inf, nan)
BERNOULLI = [(1e308, -1e308), (-1e308, 1e308), (1e300, -1e300), (800.0, -800.0), (50.0, -1e308),
             (0.0, 1e308), (0.0, -1e308), (40.0, 40.000001), (100.0, 99.0), (30.0, 1e30),
             (-3.0, 2.5), (1e20, -1e20)]


def _sp(x):
    return mpmath.log1p(mpmath.exp(x)) if x < 0 else x + mpmath.log1p(mpmath.exp(-x))


def _ref_bernoulli(a, b):
    a, b = mpmath.mpf(a), mpmath.mpf(b)
    lp, l1p, lq, l1q = -_sp(-a), -_sp(a), -_sp(-b), -_sp(b)
    value = mpmath.exp(lp) * (lp - lq) + mpmath.exp(l1p) * (l1p - l1q)
    p, q = mpmath.exp(lp), mpmath.exp(lq)
    return value, [p * mpmath.exp(l1p) * (a - b), mpmath.exp(l1p) - mpmath.exp(l1q)]  # q - p


def test_bernoulli_kl_extreme_values_and_gradients():
    xs = [torch.tensor(col, dtype=torch.float64, requires_grad=True) for col in zip(*BERNOULLI)]
    value = D.bernoulli_kl(*xs)
    value.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # NumPy's overflow warnings of the safe-guarded branches
        got_np = D.bernoulli_kl(*[np.array(col) for col in zip(*BERNOULLI)])
    for i, c in enumerate(BERNOULLI):
        ref, grads = _ref_bernoulli(*c)
        _check(float(value[i].detach()), ref, np.float64, rtol=4e-15)
        _check(float(got_np[i]), ref, np.float64, rtol=4e-15)
        for x, g in zip(xs, grads):
            _check(float(x.grad[i]), g, np.float64, rtol=1e-14)


def _ref_scale_grad(m1, s1, m2, s2):
    m1, s1, m2, s2 = map(mpmath.mpf, (m1, s1, m2, s2))
    g_m = (m1 - m2) / s2 ** 2
    return [g_m, s1 / s2 ** 2 - 1 / s1, -g_m, -s1 ** 2 / s2 ** 3 + 1 / s2 - (m1 - m2) ** 2 / s2 ** 3]


def test_normal_kl_scale_extreme_gradients():
    cases = [(2e19, 1.0, 0.0, 1.0), (1e308, 1e300, -1e308, 1e300), (0.0, 1e-300, 0.0, 1e300),
             (1e-300, 1e-300, 0.0, 1e-300), (1.0, 0.01, 1.0 + 1e-12, 0.01 + 1e-14),
             (0.0, 1e10, 0.0, 3.0), (0.0, 3e-200, 0.0, 1e-200)]
    xs = [torch.tensor(col, dtype=torch.float64, requires_grad=True) for col in zip(*cases)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        D.normal_kl_scale(*xs, axis=()).sum().backward()
    for i, c in enumerate(cases):
        want = _ref_scale_grad(*c)
        row = max(abs(float(g)) for g in want)
        for x, g in zip(xs, want):
            assert abs(float(x.grad[i]) - float(g)) <= 1e-14 * row, (c, float(x.grad[i]), g)


def _ref_mvn_solve(m1, L1, m2, L2):
    """KL by forward substitution in mpmath (for pairs whose covariance mpmath cannot invert)."""
    k = len(m1)
    A, B = _mp_mat(L1), _mp_mat(L2)
    M = mpmath.matrix(k, k)
    for j in range(k):
        for i in range(k):
            M[i, j] = (A[i, j] - mpmath.fsum(B[i, s] * M[s, j] for s in range(i))) / B[i, i]
    d = [mpmath.mpf(float(b)) - mpmath.mpf(float(a)) for a, b in zip(m1, m2)]
    y = []
    for i in range(k):
        y.append((d[i] - mpmath.fsum(B[i, s] * y[s] for s in range(i))) / B[i, i])
    fro = mpmath.fsum(M[i, j] ** 2 for i in range(k) for j in range(k))
    ld = mpmath.fsum(mpmath.log(B[i, i]) - mpmath.log(A[i, i]) for i in range(k))
    return (fro + mpmath.fsum(v * v for v in y) - k) / 2 + ld


def test_mvn_kl_factor_difference_overflows():
    """L_p - L_q (and mu_q - mu_p) overflow in one entry: differences from halves, 4x at the end
    (was inf for a finite KL)."""
    A = np.array([[1.0, 0, 0], [1e308, 1.0, 0], [0.5, 0.25, 2.0]])
    B = np.array([[1.0, 0, 0], [-1e308, 1e300, 0], [0.3, 0.1, 1.5]])
    m1, m2 = np.array([1e308, 0.0, 1.0]), np.array([-1e308, 0.0, 0.0])
    for args in ((np.zeros(3), A, np.zeros(3), B), (m1, np.eye(3), m2, 1e300 * np.eye(3)),
                 (m1, A, m2, B)):
        ref = _ref_mvn_solve(*args)
        for backend in ("numpy", "torch"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = _f(D.mvn_kl_cholesky(*[_as(backend, x, np.float64) for x in args]))
            _check(got, ref, np.float64, rtol=1e-14)
