"""Tests of kldiv.distributions against torch.distributions, scipy, mpmath and naive formulas.

Closed forms are checked on every backend against independent float64 formulas written here
and against torch.distributions.kl_divergence where the semantics agree; the Monte-Carlo
fallback is checked against closed forms that torch has and kldiv does not register, and
against numerical integration (scipy.integrate.quad), within 5 standard errors.
"""
import math

import mpmath
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from kldiv import distributions as D

torch = pytest.importorskip("torch")
td = torch.distributions

BACKENDS = ["numpy", "torch", "jax", "array_api_strict"]


pytestmark = pytest.mark.usefixtures("restore_jax_x64")  # tests here switch JAX to float64


def _to(backend, x):
    x = np.asarray(x, dtype=np.float64)
    if backend == "numpy":
        return x
    if backend == "torch":
        return torch.from_numpy(np.ascontiguousarray(x))
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return jnp.asarray(x)
    import array_api_strict as xs

    return xs.asarray(x)


def _np(x):
    if hasattr(x, "detach"):
        return x.detach().numpy()
    if type(x).__module__.startswith("array_api_strict"):
        return np.asarray(x._array)
    return np.asarray(x)


def _naive_normal(mp, vp, mq, vq):
    """Elementwise KL of univariate normals from variances, float64, textbook form."""
    return 0.5 * (np.log(vq / vp) + (vp + (mp - mq) ** 2) / vq - 1.0)


# --------------------------------------------------------------------------- diagonal normal


@pytest.mark.parametrize("backend", BACKENDS)
def test_normal_logvar_and_scale_match_naive(backend):
    rng = np.random.default_rng(0)
    mp, mq = rng.normal(size=(2, 3, 5))
    vp, vq = rng.uniform(-1.5, 1.5, size=(2, 3, 5))
    ref = _naive_normal(mp, np.exp(vp), mq, np.exp(vq))
    X = lambda a: _to(backend, a)  # noqa: E731
    got = D.normal_kl_logvar(X(mp), X(vp), X(mq), X(vq))
    np.testing.assert_allclose(_np(got), ref.sum(-1), rtol=1e-12)
    got = D.normal_kl_scale(X(mp), X(np.exp(vp / 2)), X(mq), X(np.exp(vq / 2)), axis=())
    np.testing.assert_allclose(_np(got), ref, rtol=1e-12)
    got = D.normal_kl_logvar(X(mp), X(vp), X(mq), X(vq), axis=(0, 1))
    np.testing.assert_allclose(_np(got), ref.sum((0, 1)), rtol=1e-12)
    # VAE term against N(0, I): -1/2 sum(1 + logvar - mean^2 - exp(logvar))
    got = D.normal_kl_logvar(X(mp), X(vp), reduction="mean")
    vae = -0.5 * np.sum(1 + vp - mp**2 - np.exp(vp), axis=-1)
    np.testing.assert_allclose(float(_np(got)), vae.mean(), rtol=1e-12)
    got = D.normal_kl_scale(X(mp), X(np.exp(vp / 2)), reduction="sum")
    np.testing.assert_allclose(float(_np(got)), vae.sum(), rtol=1e-12)


def test_normal_matches_torch_distributions():
    rng = np.random.default_rng(1)
    mp, mq = torch.tensor(rng.normal(size=(2, 4, 3)))
    sp, sq = torch.tensor(rng.uniform(0.2, 3.0, size=(2, 4, 3)))
    ref = td.kl_divergence(td.Independent(td.Normal(mp, sp), 1), td.Independent(td.Normal(mq, sq), 1))
    got = D.normal_kl_scale(mp, sp, mq, sq)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    r = D.kl(D.Normal(mp, sp, event_ndim=1), D.Normal(mq, sq, event_ndim=1))
    assert r.method == "closed_form"
    torch.testing.assert_close(r.value, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("d", [1e-12, 1e-7, -1e-4, 0.3])
def test_normal_nearly_equal_variances_accurate(d):
    """KL = 1/2 (e^d - 1 - d) for equal means: mpmath reference, no cancellation in float64."""
    got = float(D.normal_kl_logvar(np.zeros(1), np.array([d]), 0.0, 0.0))
    with mpmath.workdps(80):
        exact = float((mpmath.expm1(mpmath.mpf(d)) - mpmath.mpf(d)) / 2)
    assert got == pytest.approx(exact, rel=1e-12)
    got32 = D.normal_kl_logvar(np.zeros(1, np.float32), np.array([d], np.float32))
    assert got32.dtype == np.float32
    with mpmath.workdps(80):
        d32 = mpmath.mpf(float(np.float32(d)))
        exact32 = float((mpmath.expm1(d32) - d32) / 2)
    assert float(got32) == pytest.approx(exact32, rel=1e-5)


def test_normal_reduction_mask_weight():
    rng = np.random.default_rng(2)
    mp, vp = rng.normal(size=(2, 6, 4))
    ref = -0.5 * np.sum(1 + vp - mp**2 - np.exp(vp), axis=-1)
    mask = np.array([True, False, True, True, False, True])
    w = rng.uniform(0.1, 2.0, size=6)
    got = D.normal_kl_logvar(mp, vp, reduction="mean", mask=mask, weight=w)
    np.testing.assert_allclose(got, (ref * w * mask).sum() / (w * mask).sum(), rtol=1e-12)


def test_normal_gradients_torch_gradcheck_and_jax():
    rng = np.random.default_rng(3)
    args = [torch.tensor(rng.normal(size=(2, 3)), requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(D.normal_kl_logvar, args)
    assert torch.autograd.gradgradcheck(D.normal_kl_logvar, args)
    sargs = [args[0], args[1].detach().exp().requires_grad_(), args[2],
             args[3].detach().exp().requires_grad_()]
    assert torch.autograd.gradcheck(D.normal_kl_scale, sargs)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    mp, vp = jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.normal(size=3))
    g = jax.jit(jax.grad(lambda m, v: D.normal_kl_logvar(m, v), argnums=(0, 1)))(mp, vp)
    # d/dm = m, d/dv = (e^v - 1)/2 for the VAE term
    np.testing.assert_allclose(np.asarray(g[0]), np.asarray(mp), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g[1]), (np.exp(np.asarray(vp)) - 1) / 2, rtol=1e-12)


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: D.normal_kl_scale(np.zeros(2), np.array([1.0, 0.0])), ValueError, "scale_p"),
        (lambda: D.normal_kl_scale(np.zeros(2), np.ones(2), 0.0, -1.0), ValueError, "scale_q"),
        (lambda: D.normal_kl_logvar(np.zeros(2), np.array([0.0, np.nan])), ValueError, "logvar_p"),
        (lambda: D.normal_kl_logvar(np.zeros(2, int), np.zeros(2)), TypeError, "mean_p"),
        (lambda: D.normal_kl_logvar(np.zeros(2), np.zeros(2), reduction="avg"), ValueError,
         "reduction"),
        (lambda: D.normal_kl_logvar(np.zeros((2, 3)), np.zeros((2, 3)), mask=np.ones(3, bool)),
         ValueError, "mask"),
        (lambda: D.normal_kl_logvar(np.zeros(2), np.zeros(2), axis=3), ValueError, "axis"),
    ],
)
def test_normal_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


# --------------------------------------------------------------------------- full covariance


def _rand_tril(rng, shape, k):
    a = rng.normal(size=shape + (k, k)) * 0.5
    low = np.tril(a, -1)
    diag = np.exp(rng.uniform(-0.5, 0.5, size=shape + (k,)))
    return low + np.einsum("...i,ij->...ij", diag, np.eye(k))


def _naive_mvn(mp, sp, mq, sq):
    """Textbook formula with explicit inverse and determinants (float64, small k)."""
    k = mp.shape[-1]
    iq = np.linalg.inv(sq)
    d = mq - mp
    return 0.5 * (np.trace(iq @ sp, axis1=-2, axis2=-1) + np.einsum("...i,...ij,...j", d, iq, d)
                  - k + np.log(np.linalg.det(sq) / np.linalg.det(sp)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mvn_matches_naive_and_broadcasts(backend):
    rng = np.random.default_rng(4)
    k = 4
    lp, lq = _rand_tril(rng, (3,), k), _rand_tril(rng, (), k)
    mp, mq = rng.normal(size=(3, k)), rng.normal(size=(k,))
    sp, sq = lp @ np.swapaxes(lp, -1, -2), lq @ lq.T
    X = lambda a: _to(backend, a)  # noqa: E731
    got = D.mvn_kl_cholesky(X(mp), X(lp), X(mq), X(lq))
    np.testing.assert_allclose(_np(got), _naive_mvn(mp, sp, mq, sq), rtol=1e-10)
    got = D.mvn_kl_cholesky(X(mp), X(lp))
    np.testing.assert_allclose(_np(got), _naive_mvn(mp, sp, np.zeros(k), np.eye(k)), rtol=1e-10)
    # the strictly upper triangle is ignored
    junk = lp + np.triu(np.ones((k, k)), 1)
    got = D.mvn_kl_cholesky(X(mp), X(junk), X(mq), X(lq + np.triu(np.ones((k, k)), 1)))
    np.testing.assert_allclose(_np(got), _naive_mvn(mp, sp, mq, sq), rtol=1e-10)


def test_mvn_matches_torch_and_gradcheck():
    rng = np.random.default_rng(5)
    k = 3
    lp, lq = (torch.tensor(_rand_tril(rng, (2,), k)) for _ in range(2))
    mp, mq = (torch.tensor(rng.normal(size=(2, k))) for _ in range(2))
    ref = td.kl_divergence(td.MultivariateNormal(mp, scale_tril=lp),
                           td.MultivariateNormal(mq, scale_tril=lq))
    torch.testing.assert_close(D.mvn_kl_cholesky(mp, lp, mq, lq), ref, rtol=1e-10, atol=1e-12)
    args = [t.clone().requires_grad_() for t in (mp, lp, mq, lq)]
    assert torch.autograd.gradcheck(D.mvn_kl_cholesky, args)
    assert torch.autograd.gradgradcheck(D.mvn_kl_cholesky, args)


def test_mvn_jax_grad_matches_torch():
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(6)
    k = 3
    lp, lq = _rand_tril(rng, (), k), _rand_tril(rng, (), k)
    mp, mq = rng.normal(size=k), rng.normal(size=k)
    gj = jax.grad(lambda a: D.mvn_kl_cholesky(jnp.asarray(mp), a, jnp.asarray(mq),
                                              jnp.asarray(lq)))(jnp.asarray(lp))
    tl = torch.tensor(lp, requires_grad=True)
    ref = td.kl_divergence(td.MultivariateNormal(torch.tensor(mp), scale_tril=tl),
                           td.MultivariateNormal(torch.tensor(mq), scale_tril=torch.tensor(lq)))
    ref.backward()
    np.testing.assert_allclose(np.tril(np.asarray(gj)), np.tril(tl.grad.numpy()), atol=1e-10)


def test_mvn_bad_input():
    with pytest.raises(ValueError, match="scale_tril_p"):
        D.mvn_kl_cholesky(np.zeros(2), np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="scale_tril_q"):
        D.mvn_kl_cholesky(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, 0.0]))
    with pytest.raises(ValueError, match="mean_p"):
        D.mvn_kl_cholesky(np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="both or neither"):
        D.mvn_kl_cholesky(np.zeros(2), np.eye(2), np.zeros(2))
    with pytest.raises(ValueError, match="square"):
        D.mvn_kl_cholesky(np.zeros(2), np.ones((2, 3)))


# --------------------------------------------------------------------------- Bernoulli


def _mp_bernoulli(a, b):
    """mpmath oracle at 100 digits: p log(p/q) + (1-p) log((1-p)/(1-q)) from the logits."""
    with mpmath.workdps(100):
        a, b = mpmath.mpf(a), mpmath.mpf(b)
        p, q = 1 / (1 + mpmath.exp(-a)), 1 / (1 + mpmath.exp(-b))
        pc, qc = 1 / (1 + mpmath.exp(a)), 1 / (1 + mpmath.exp(b))
        return float(p * mpmath.log(p / q) + pc * mpmath.log(pc / qc))


GRID = [-200.0, -100.0, -30.0, -5.0, -0.5, 0.0, 1e-8, 0.7, 4.0, 30.0, 30.5, 100.0, 200.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bernoulli_against_mpmath_grid(backend):
    a, b = np.meshgrid(GRID, GRID, indexing="ij")
    got = _np(D.bernoulli_kl(_to(backend, a), _to(backend, b)))
    ref = np.vectorize(_mp_bernoulli)(a, b)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-300)
    assert (got >= 0).all()


def test_bernoulli_agrees_with_torch_where_torch_is_fine():
    rng = np.random.default_rng(7)
    a, b = torch.tensor(rng.normal(scale=3, size=(2, 50)))
    ref = td.kl_divergence(td.Bernoulli(logits=a), td.Bernoulli(logits=b))
    torch.testing.assert_close(D.bernoulli_kl(a, b), ref, rtol=1e-9, atol=1e-12)
    got = D.kl(D.Bernoulli(a, event_ndim=1), D.Bernoulli(b, event_ndim=1))
    torch.testing.assert_close(got.value, ref.sum(-1), rtol=1e-9, atol=1e-12)


def test_bernoulli_saturation_float32_finite_value_and_gradient():
    """Logits +-100 in float32: probabilities round to 0/1. pytorch issue 15288."""
    a = torch.tensor([100.0, -100.0, 100.0, 90.0, -60.0], requires_grad=True)
    b = torch.tensor([-100.0, 100.0, 100.0, 91.0, 3.0], requires_grad=True)
    v = D.bernoulli_kl(a, b)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    ref = np.array([_mp_bernoulli(x, y) for x, y in zip(a.tolist(), b.tolist())])
    np.testing.assert_allclose(v.detach().numpy(), ref, rtol=1e-5, atol=1e-30)
    # exact gradient: dKL/da = s(a) s(-a) (a - b); dKL/db = s(b) - s(a)
    sa, sb = torch.sigmoid(a.detach().double()), torch.sigmoid(b.detach().double())
    ga = sa * (1 - sa) * (a.detach().double() - b.detach().double())
    np.testing.assert_allclose(a.grad.double().numpy(), ga.numpy(), rtol=1e-4, atol=1e-30)
    np.testing.assert_allclose(b.grad.double().numpy(), (sb - sa).numpy(), rtol=1e-4, atol=1e-7)
    # torch.distributions on the same input: not finite (value or gradient), the motivation
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    t = td.kl_divergence(td.Bernoulli(logits=a2), td.Bernoulli(logits=b2))
    t.sum().backward()
    assert not (torch.isfinite(t).all() and torch.isfinite(a2.grad).all()
                and torch.isfinite(b2.grad).all())


def test_bernoulli_gradcheck_and_jax_grad():
    a = torch.tensor([-40.0, -2.0, 0.0, 0.5, 35.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([38.0, 1.0, 0.0, -0.5, 36.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(D.bernoulli_kl, (a, b))
    assert torch.autograd.gradgradcheck(D.bernoulli_kl, (a, b))
    import jax
    import jax.numpy as jnp

    ga, gb = jax.grad(lambda x, y: jnp.sum(D.bernoulli_kl(x, y)), argnums=(0, 1))(
        jnp.asarray([200.0, -200.0, 0.0], dtype=jnp.float32),
        jnp.asarray([-200.0, 150.0, 1.0], dtype=jnp.float32))
    assert np.isfinite(np.asarray(ga)).all() and np.isfinite(np.asarray(gb)).all()


def test_bernoulli_infinite_logits_edge_table():
    inf = np.inf
    a = np.array([inf, inf, inf, -inf, -inf, 0.0, 0.0, 2.0])
    b = np.array([inf, -inf, 1.0, -inf, 1.0, inf, -inf, 2.0])
    got = D.bernoulli_kl(a, b)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = [0.0, inf, sp(-1.0), 0.0, sp(1.0), inf, inf, 0.0]
    np.testing.assert_allclose(got, expected, rtol=1e-15)
    at = torch.tensor(a, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    D.bernoulli_kl(at, bt)[[0, 2, 3, 4, 7]].sum().backward()
    assert torch.isfinite(at.grad).all() and torch.isfinite(bt.grad).all()
    with pytest.raises(ValueError, match="logits_q"):
        D.bernoulli_kl(np.zeros(2), np.array([0.0, np.nan]))


# --------------------------------------------------------------------------- categorical


@pytest.mark.parametrize("backend", BACKENDS)
def test_categorical_matches_torch_and_scipy(backend):
    rng = np.random.default_rng(8)
    a, b = rng.normal(scale=2, size=(2, 4, 7))
    got = _np(D.categorical_kl(_to(backend, a), _to(backend, b)))
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, scipy.stats.entropy(p, q, axis=-1), rtol=1e-10)
    ref = td.kl_divergence(td.Categorical(logits=torch.tensor(a)),
                           td.Categorical(logits=torch.tensor(b))).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10)


# --------------------------------------------------------------------------- kl() and MC


def test_laplace_closed_form_matches_torch():
    rng = np.random.default_rng(9)
    mp, mq = torch.tensor(rng.normal(size=(2, 5)))
    sp, sq = torch.tensor(rng.uniform(0.3, 2.0, size=(2, 5)))
    r = D.kl(D.Laplace(mp, sp), D.Laplace(mq, sq))
    assert r.method == "closed_form" and r.n_samples == 0
    ref = td.kl_divergence(td.Laplace(mp, sp), td.Laplace(mq, sq))
    torch.testing.assert_close(r.value, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_monte_carlo_normal_laplace_vs_torch_closed_form(backend):
    """kldiv has no Normal-Laplace closed form; torch does: the MC estimate is within 5 se."""
    loc, scale = np.array([0.0, 1.0, -0.5]), np.array([1.0, 0.5, 2.0])
    lq, sq = np.array([0.3, 0.0, 0.0]), np.array([1.0, 2.0, 0.7])
    ref = td.kl_divergence(td.Normal(torch.tensor(loc), torch.tensor(scale)),
                           td.Laplace(torch.tensor(lq), torch.tensor(sq))).numpy()
    X = lambda a: _to(backend, a)  # noqa: E731
    r = D.kl(D.Normal(X(loc), X(scale)), D.Laplace(X(lq), X(sq)), seed=3)
    assert r.method == "monte_carlo" and r.n_samples == D.DEFAULT_N_SAMPLES
    value, se = _np(r.value), _np(r.stderr)
    assert (se > 0).all() and (se < 0.05).all()
    assert (np.abs(value - ref) < 5 * se).all()
    # k3 needs q/p to have finite variance under p: true for Laplace -> Normal (lighter tails
    # of q), not for Normal -> Laplace, where k3's variance is infinite
    ref = td.kl_divergence(td.Laplace(torch.tensor(loc), torch.tensor(scale)),
                           td.Normal(torch.tensor(lq), torch.tensor(sq))).numpy()
    for est in ("k1", "k3"):
        r = D.monte_carlo_kl(D.Laplace(X(loc), X(scale)), D.Normal(X(lq), X(sq)), seed=4,
                             estimator=est)
        assert (np.abs(_np(r.value) - ref) < 5 * _np(r.stderr)).all()


def test_monte_carlo_logistic_normal_vs_quadrature():
    """No closed form anywhere: reference by numerical integration with scipy.stats densities."""
    loc, scale, mq, sq = 0.4, 0.8, 0.0, 1.5
    p, q = scipy.stats.logistic(loc, scale), scipy.stats.norm(mq, sq)
    ref, _ = scipy.integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -60, 60,
                                  limit=200)
    r = D.kl(D.Logistic(np.array([loc]), np.array([scale])), D.Normal(np.array([mq]), np.array([sq])))
    assert r.method == "monte_carlo"
    assert abs(r.value[0] - ref) < 5 * r.stderr[0]
    # Logistic log_prob itself agrees with scipy
    x = np.linspace(-5, 5, 11)
    np.testing.assert_allclose(D.Logistic(np.array(loc), np.array(scale)).log_prob(x),
                               p.logpdf(x), rtol=1e-12)


def test_monte_carlo_agrees_with_closed_forms():
    rng = np.random.default_rng(10)
    k = 3
    lp, lq = _rand_tril(rng, (2,), k), _rand_tril(rng, (2,), k)
    mp, mq = rng.normal(size=(2, k)), rng.normal(size=(2, k))
    p, q = D.MultivariateNormal(mp, lp), D.MultivariateNormal(mq, lq)
    exact = D.kl(p, q).value
    mc = D.monte_carlo_kl(p, q, seed=1)
    assert (np.abs(mc.value - exact) < 5 * mc.stderr).all()
    # sample moments of the MVN sampler match loc and L L^T
    x = p.sample(20000, seed=2)
    np.testing.assert_allclose(x.mean(0), mp, atol=0.06)
    np.testing.assert_allclose(np.cov(x[:, 0].T), lp[0] @ lp[0].T, atol=0.1)
    for dp, dq in [(D.Bernoulli(rng.normal(size=4)), D.Bernoulli(rng.normal(size=4))),
                   (D.Categorical(rng.normal(size=(2, 5))), D.Categorical(rng.normal(size=5))),
                   (D.Laplace(rng.normal(size=3), np.ones(3)), D.Laplace(np.zeros(3), np.full(3, 2.0)))]:
        exact = D.kl(dp, dq).value
        mc = D.monte_carlo_kl(dp, dq, seed=5)
        assert (np.abs(mc.value - exact) < 5 * mc.stderr).all(), type(dp).__name__


def test_monte_carlo_gradient_is_unbiased_pathwise():
    """Across 30 seeds, d/dloc of the MC KL(Normal(loc, s) || Laplace(0, 1)) matches torch's
    closed-form gradient within 5 standard errors of the seed mean."""
    loc0, s0 = 0.7, 0.9

    def exact_grad():
        loc = torch.tensor(loc0, dtype=torch.float64, requires_grad=True)
        v = td.kl_divergence(td.Normal(loc, torch.tensor(s0, dtype=torch.float64)),
                             td.Laplace(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64)))
        v.backward()
        return loc.grad.item()

    grads = []
    for seed in range(30):
        loc = torch.tensor([loc0], dtype=torch.float64, requires_grad=True)
        r = D.monte_carlo_kl(D.Normal(loc, torch.tensor([s0], dtype=torch.float64)),
                             D.Laplace(torch.zeros(1, dtype=torch.float64),
                                       torch.ones(1, dtype=torch.float64)),
                             n_samples=2048, seed=seed)
        r.value.sum().backward()
        grads.append(loc.grad.item())
    grads = np.array(grads)
    se = grads.std(ddof=1) / math.sqrt(len(grads))
    assert abs(grads.mean() - exact_grad()) < 5 * se


def test_same_seed_same_samples_across_backends():
    import jax.numpy as jnp

    a = D.Normal(np.zeros(3), np.ones(3)).sample(5, seed=7)
    b = D.Normal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)).sample(5, seed=7)
    c = D.Normal(jnp.zeros(3), jnp.ones(3)).sample(5, seed=7)
    np.testing.assert_array_equal(a, b.numpy())
    np.testing.assert_allclose(a, np.asarray(c), rtol=1e-6)


def test_user_distribution_duck_typing():
    class Shifted:
        """A user's own distribution: Normal(1, 1) written by hand."""

        def sample(self, n, seed=0):
            return 1.0 + np.random.default_rng(seed).standard_normal((n, 1))

        def log_prob(self, x):
            return -0.5 * (x[..., 0] - 1.0) ** 2 - 0.5 * math.log(2 * math.pi)

    r = D.kl(Shifted(), D.Normal(np.zeros(1), np.ones(1), event_ndim=1), seed=0)
    assert r.method == "monte_carlo"
    assert abs(r.value - 0.5) < 5 * r.stderr


def test_kl_bad_input():
    p = D.Normal(np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="n_samples"):
        D.monte_carlo_kl(p, D.Laplace(np.zeros(2), np.ones(2)), n_samples=1)
    with pytest.raises(ValueError, match="estimator"):
        D.monte_carlo_kl(p, p, estimator="k2")
    with pytest.raises(TypeError, match="q"):
        D.kl(p, object())
    with pytest.raises(ValueError, match="scale"):
        D.Normal(np.zeros(2), np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="event_ndim"):
        D.Normal(np.zeros(2), np.ones(2), event_ndim=2)


# --------------------------------------------------------------------------- issue 11 item 10:
# cancellation, negative values, dispatch and edges of the closed forms (mpmath references)


def _mp(x):
    return mpmath.mpf(float(x))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_normal_scale_nearly_equal_scales_away_from_one_vs_mpmath(backend):
    """log(s_p) - log(s_q) cancels for nearly equal scales away from 1 (0.01 and 0.01 + 1e-14
    gave 13 % relative error): the ratio's log is taken through log1p."""
    scales, deltas = [1e-3, 0.01, 7.0, 1e4], [1e-14, -3e-12, 1e-9, 1e-5, 0.3, 3.0]
    sp = np.array([s for s in scales for _ in deltas])
    sq = np.array([s * (1 + d) for s in scales for d in deltas])
    sq[1] = 0.01 + 1e-14  # the case of the report, exactly
    sp[1] = 0.01
    mq = np.linspace(-1e-9, 1e-9, sp.size)
    got = _np(D.normal_kl_scale(_to(backend, np.zeros_like(sp)), _to(backend, sp),
                                _to(backend, mq), _to(backend, sq), axis=()))
    with mpmath.workdps(60):
        want = []
        for a, b, m in zip(sp, sq, mq):
            rho = _mp(a) / _mp(b)
            z = _mp(m) / _mp(b)
            want.append(float((rho**2 - 1) / 2 - mpmath.log(rho) + z * z / 2))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


def _mp_mvn_kl(mp_, lp, mq, lq):
    with mpmath.workdps(60):
        Lp, Lq = mpmath.matrix(lp.tolist()), mpmath.matrix(lq.tolist())
        Sp, Sq = Lp * Lp.T, Lq * Lq.T
        k = lp.shape[-1]
        Sqi = mpmath.inverse(Sq)
        dm = mpmath.matrix((mq - mp_).tolist())
        tr = sum((Sqi * Sp)[i, i] for i in range(k))
        maha = (dm.T * Sqi * dm)[0, 0]
        logdet = mpmath.log(mpmath.det(Sq)) - mpmath.log(mpmath.det(Sp))
        return float((tr + maha - k + logdet) / 2)


@pytest.mark.parametrize("backend", ["numpy", "torch"])  # (JAX: the same xp code, slow here)
def test_mvn_never_negative_and_exact_zero_for_identical(backend):
    """mvn_kl_cholesky(m, L, m, L) gave values down to -8.9e-16; summed from non-negative
    terms it is >= 0 by construction (and 0 here), and nearly equal pairs match mpmath."""
    rng = np.random.default_rng(3)
    for k in (1, 3, 6):
        L = np.tril(rng.standard_normal((20, k, k))) * 3
        L[:, np.arange(k), np.arange(k)] = np.abs(L[:, np.arange(k), np.arange(k)]) + 0.05
        m = rng.standard_normal((20, k)) * 100
        same = _np(D.mvn_kl_cholesky(_to(backend, m), _to(backend, L), _to(backend, m),
                                     _to(backend, L)))
        assert (same >= 0).all() and (same < 1e-25).all(), same
        # nearly equal pairs: relative perturbations of 1e-6 (KL ~ 1e-12), against mpmath
        L2 = L * (1 + 1e-6 * np.tril(rng.standard_normal((20, k, k))))
        m2 = m + 1e-6 * rng.standard_normal((20, k))
        got = _np(D.mvn_kl_cholesky(_to(backend, m), _to(backend, L), _to(backend, m2),
                                    _to(backend, L2)))
        want = np.array([_mp_mvn_kl(m[i], L[i], m2[i], L2[i]) for i in range(5)])
        assert (got >= 0).all()
        np.testing.assert_allclose(got[:5], want, rtol=1e-6)


def test_mvn_far_pairs_match_torch_distributions():
    rng = np.random.default_rng(4)
    k = 4
    L = [np.tril(rng.standard_normal((k, k))) + 3 * np.eye(k) for _ in range(2)]
    m = [rng.standard_normal(k) for _ in range(2)]
    got = float(D.mvn_kl_cholesky(m[0], L[0], m[1], L[1]))
    tp = td.MultivariateNormal(torch.tensor(m[0]), scale_tril=torch.tensor(L[0]))
    tq = td.MultivariateNormal(torch.tensor(m[1]), scale_tril=torch.tensor(L[1]))
    assert abs(got - float(td.kl_divergence(tp, tq))) <= 1e-12 * abs(got)
    assert abs(got - _mp_mvn_kl(m[0], L[0], m[1], L[1])) <= 1e-13 * abs(got)


def test_kl_dispatches_on_the_class_hierarchy():
    class MyNormal(D.Normal):
        """A user's subclass: it is a Normal, so the closed form applies."""

    class MyLaplace(D.Laplace):
        pass

    p = MyNormal(np.array([0.3]), np.array([1.5]))
    q = D.Normal(np.array([0.0]), np.array([1.0]))
    r = D.kl(p, q)
    assert r.method == "closed_form" and r.n_samples == 0
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    want = float(td.kl_divergence(td.Normal(f64(0.3), f64(1.5)), td.Normal(f64(0.0), f64(1.0))))
    assert abs(float(r.value[0]) - want) < 1e-14
    assert D.kl(q, p).method == "closed_form"
    assert D.kl(MyLaplace(np.zeros(2), np.ones(2)), MyLaplace(np.ones(2), np.ones(2))).method \
        == "closed_form"


def test_mismatched_event_ndim_names_event_ndim():
    p = D.Normal(np.zeros(3), np.ones(3), event_ndim=1)
    q = D.Normal(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="event_ndim"):
        D.kl(p, q)
    with pytest.raises(ValueError, match="event_ndim"):
        D.kl(p, D.Laplace(np.zeros(3), np.ones(3)))  # (no closed form: Monte Carlo)
    with pytest.raises(ValueError, match="event_ndim"):
        D.monte_carlo_kl(q, p, n_samples=8)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bernoulli_log_prob_certain_outcome_at_infinite_logits(backend):
    inf = math.inf
    b = D.Bernoulli(_to(backend, [inf, -inf, inf, -inf, 2.0, -3.0]))
    got = _np(b.log_prob(_to(backend, [1.0, 0.0, 0.0, 1.0, 1.0, 0.0])))
    assert not np.isnan(got).any()
    want_finite = td.Bernoulli(logits=torch.tensor([2.0, -3.0], dtype=torch.float64)).log_prob(
        torch.tensor([1.0, 0.0], dtype=torch.float64)).numpy()
    np.testing.assert_array_equal(got[:4], [0.0, 0.0, -inf, -inf])
    np.testing.assert_allclose(got[4:], want_finite, rtol=1e-15)


def test_bernoulli_log_prob_gradient_finite_torch():
    logits = torch.tensor([30.0, -30.0, 0.5], dtype=torch.float64, requires_grad=True)
    D.Bernoulli(logits).log_prob(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)).sum() \
        .backward()
    # d/da log sigmoid(a) = sigmoid(-a), d/da log sigmoid(-a) = -sigmoid(a), by hand
    # (torch.distributions is 1e-3 off at a = 30: 1 - sigmoid(30) cancels there)
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    want = torch.tensor([sig(-30.0), -sig(-30.0), sig(-0.5)], dtype=torch.float64)
    torch.testing.assert_close(logits.grad, want, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("event_ndim, exc", [(2, ValueError), (-1, ValueError),
                                             ("1", TypeError), (True, TypeError)])
def test_bernoulli_validates_event_ndim(event_ndim, exc):
    with pytest.raises(exc, match="event_ndim"):
        D.Bernoulli(np.zeros(3), event_ndim=event_ndim)
    with pytest.raises(exc, match="event_ndim"):
        D.Normal(np.zeros(3), np.ones(3), event_ndim=event_ndim)


def test_bernoulli_refuses_nan_logits():
    with pytest.raises(ValueError, match="logits"):
        D.Bernoulli(np.array([0.0, math.nan]))


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_laplace_nearly_identical_pairs_vs_mpmath(backend):
    """The textbook Laplace-Laplace sum cancels for nearly identical pairs; kldiv's form is
    summed from non-negative pieces there."""
    rows = []
    for b in (1e-3, 1.0, 50.0):
        for ds in (0.0, 1e-12, -1e-8, 1e-4, 0.7, 4.0):
            for dl in (0.0, 1e-12, 1e-8, 1e-4, 0.3, 5.0):
                rows.append((0.25, b, 0.25 + dl * b, b * (1 + ds)))
    lp, sp, lq, sq = (np.array(c) for c in zip(*rows))
    got = _np(D.kl(D.Laplace(_to(backend, lp), _to(backend, sp)),
                   D.Laplace(_to(backend, lq), _to(backend, sq))).value)
    with mpmath.workdps(80):
        want = []
        for a, b, c, e in rows:
            d = abs(_mp(a) - _mp(c))
            bp, bq = _mp(b), _mp(e)
            want.append(float(mpmath.log(bq / bp) + d / bq + bp / bq * mpmath.exp(-d / bp) - 1))
    want = np.array(want)
    assert (got >= 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
    far = want > 1e-3  # and torch.distributions where its textbook sum is fine
    tp = td.Laplace(torch.tensor(lp), torch.tensor(sp))
    tq = td.Laplace(torch.tensor(lq), torch.tensor(sq))
    np.testing.assert_allclose(got[far], td.kl_divergence(tp, tq).numpy()[far], rtol=1e-12)
