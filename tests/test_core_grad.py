"""Gradients of the core: torch gradcheck / gradgradcheck in float64 for every function and input
space, jax.grad twice and jax.jit, closed-form gradients, and finiteness at the edges
(p = 0, q = 0 with p = 0, logits of -inf) with respect to both arguments.

Closed forms used (independent of the code), with a = p's logits, b = q's logits, P = softmax(a),
Q = softmax(b):
    d KL(P || Q) / d b = Q - P
    d KL(P || Q) / d a = P * (log P - log Q - KL)        (0 where P = 0)
    d KL(p || q) / d q_j = 1 - p_j / q_j                  (q a probability vector, renormalised)
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special

import kldiv

torch = pytest.importorskip("torch")

FUNCS = ["kl_div", "reverse_kl", "js_div", "jeffreys_div", "kl_terms"]
SPACES = ["probs", "log_probs", "logits"]


def _inputs(space, rng, shape=(2, 5)):
    P = scipy.special.softmax(rng.normal(size=shape), axis=-1)
    Q = scipy.special.softmax(rng.normal(size=shape), axis=-1)
    if space == "probs":
        return P, Q
    if space == "log_probs":
        return np.log(P), np.log(Q)
    return np.log(P) + 1.5, np.log(Q) - 0.7


def _call(fn, a, b, space, **kw):
    # validate=False: the finite differences of gradcheck leave the simplex; kldiv renormalises
    return getattr(kldiv, fn)(a, b, p_space=space, q_space=space, validate=False, **kw)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("fn", FUNCS)
def test_torch_gradcheck_and_gradgradcheck(fn, space):
    rng = np.random.default_rng(FUNCS.index(fn) * 3 + SPACES.index(space))
    a, b = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in _inputs(space, rng))
    f = lambda x, y: _call(fn, x, y, space)  # noqa: E731
    assert torch.autograd.gradcheck(f, (a, b), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(f, (a, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("fn", FUNCS[:4])
def test_torch_gradcheck_reduced_log_space(fn):
    """Reductions in log space (where a fused fast path may take over), with mask and weight."""
    rng = np.random.default_rng(5)
    a, b = (torch.tensor(x, dtype=torch.float64, requires_grad=True)
            for x in _inputs("logits", rng, shape=(3, 6)))
    w = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    m = torch.tensor([True, True, False])
    for red in ("sum", "mean"):
        f = lambda x, y: _call(fn, x, y, "logits", reduction=red, weight=w, mask=m)  # noqa: E731
        assert torch.autograd.gradcheck(f, (a, b), eps=1e-6, atol=1e-7, rtol=1e-5)
        assert torch.autograd.gradgradcheck(f, (a, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_torch_gradcheck_mixed_spaces_and_temperature():
    rng = np.random.default_rng(6)
    P, _ = _inputs("probs", rng)
    _, lq = _inputs("logits", rng)
    a = torch.tensor(P, requires_grad=True)
    b = torch.tensor(lq, requires_grad=True)
    f = lambda x, y: kldiv.kl_div(x, y, q_space="logits", temperature=2.0,  # noqa: E731
                                  t2_scale=True, validate=False)
    assert torch.autograd.gradcheck(f, (a, b), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(f, (a, b), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# closed forms


def test_torch_student_logit_gradient_is_softmax_difference():
    rng = np.random.default_rng(7)
    A = rng.normal(scale=2.0, size=(4, 9))
    A[0, :3] = -np.inf  # teacher with zeros
    B = rng.normal(scale=2.0, size=(4, 9))
    a = torch.tensor(A, requires_grad=True)
    b = torch.tensor(B, requires_grad=True)
    kl = kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="sum")
    ga, gb = torch.autograd.grad(kl, (a, b))
    P, Q = scipy.special.softmax(A, axis=-1), scipy.special.softmax(B, axis=-1)
    np.testing.assert_allclose(gb.numpy(), Q - P, rtol=1e-10, atol=1e-15)
    rows = scipy.special.rel_entr(P, Q).sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref_a = np.where(P > 0, P * (np.log(P) - np.log(Q) - rows), 0.0)
    assert torch.all(torch.isfinite(ga))
    np.testing.assert_allclose(ga.numpy(), ref_a, rtol=1e-9, atol=1e-14)


def test_torch_probability_gradient_closed_form_with_zeros():
    p = np.array([[0.0, 0.2, 0.3, 0.5], [0.0, 0.0, 0.4, 0.6]])
    q = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.3, 0.3, 0.4]])  # q = 0 where p = 0 (row 1)
    a = torch.tensor(p, requires_grad=True)
    b = torch.tensor(q, requires_grad=True)
    kl = kldiv.kl_div(a, b, reduction="sum")
    ga, gb = torch.autograd.grad(kl, (a, b))
    with np.errstate(divide="ignore", invalid="ignore"):
        ref_b = np.where(p > 0, 1.0 - p / np.where(q > 0, q, 1.0), 1.0)
    assert torch.all(torch.isfinite(ga)) and torch.all(torch.isfinite(gb))
    # at q_j = 0 = p_j the derivative is one-sided (q_j cannot go below 0): only finiteness
    inside = q > 0
    np.testing.assert_allclose(gb.numpy()[inside], ref_b[inside], rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# finite gradients at the edges, both arguments, first and second order


EDGE_PROBS = {
    # p, q: value finite for the functions listed
    "p=0, q>0": ([0.0, 0.3, 0.7], [0.2, 0.3, 0.5]),
    "p=0, q=0": ([0.0, 0.3, 0.7], [0.0, 0.4, 0.6]),
    "one-hot p": ([0.0, 1.0, 0.0], [0.2, 0.3, 0.5]),
}


def _finite_for(fn, p, q):
    p, q = np.asarray(p), np.asarray(q)
    if fn in ("kl_div", "kl_terms"):
        return not np.any((p > 0) & (q == 0))
    if fn == "reverse_kl":
        return not np.any((q > 0) & (p == 0))
    if fn == "jeffreys_div":
        return np.array_equal(p > 0, q > 0)
    return True


def _edge_cases(space):
    for name, (p, q) in EDGE_PROBS.items():
        p, q = np.array(p), np.array(q)
        if space != "probs":
            with np.errstate(divide="ignore"):
                p, q = np.log(p), np.log(q)
            if space == "logits":
                p, q = p + 2.0, q - 1.0
        yield name, p, q


def _torch_grads_finite(fn, space, p, q):
    a = torch.tensor(p, requires_grad=True)
    b = torch.tensor(q, requires_grad=True)
    out = getattr(kldiv, fn)(a, b, p_space=space, q_space=space)
    val = out.sum()
    assert torch.isfinite(val)
    ga, gb = torch.autograd.grad(val, (a, b), create_graph=True)
    assert torch.all(torch.isfinite(ga)) and torch.all(torch.isfinite(gb)), (ga, gb)
    # second order: the Hessian-vector product with a vector of ones, both arguments
    hv = torch.autograd.grad((ga.sum() + gb.sum()), (a, b), allow_unused=True)
    for h in hv:
        assert h is None or torch.all(torch.isfinite(h)), hv


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("fn", FUNCS)
def test_torch_finite_gradients_at_edges(fn, space):
    ran = 0
    for name, p, q in _edge_cases(space):
        if _finite_for(fn, *next((pp, qq) for n, pp, qq in _edge_cases("probs") if n == name)):
            _torch_grads_finite(fn, space, p, q)
            ran += 1
    assert ran


def test_torch_no_nan_gradient_where_value_is_inf_elsewhere_in_the_batch():
    """An infinite row must not poison the gradients of the finite rows under a mask."""
    p = torch.tensor([[1.0, 0.0], [0.3, 0.7]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    out = kldiv.kl_div(p, q, mask=torch.tensor([False, True]), reduction="sum")
    gp, gq = torch.autograd.grad(out, (p, q))
    assert torch.all(torch.isfinite(gp)) and torch.all(torch.isfinite(gq))
    np.testing.assert_allclose(gq[1].numpy(), 1 - np.array([0.3, 0.7]) / 0.5, rtol=1e-12)
    np.testing.assert_array_equal(gq[0].numpy(), 0.0)


# ----------------------------------------------------------------------------------------------
# JAX: grad twice, jit


@pytest.fixture(scope="module")
def jax():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return jax


def test_jax_grad_twice_and_closed_form(jax):
    jnp = jax.numpy
    rng = np.random.default_rng(8)
    A = rng.normal(size=(2, 6))
    A[0, 0] = -np.inf
    B = rng.normal(size=(2, 6))
    B[0, 0] = -np.inf  # both -inf

    def f(a, b):
        return kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="sum")

    # jitted: eager JAX compiles every primitive separately, which is slow; values are the same
    ga, gb = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(A), jnp.asarray(B))
    P, Q = scipy.special.softmax(A, axis=-1), scipy.special.softmax(B, axis=-1)
    np.testing.assert_allclose(np.asarray(gb), Q - P, rtol=1e-10, atol=1e-15)
    assert np.all(np.isfinite(np.asarray(ga)))
    # Hessian w.r.t. the student logits of row 1 equals diag(Q) - Q Q^T (softmax Jacobian)
    h = jax.jit(jax.hessian(lambda b: f(jnp.asarray(A[1:]), b)))(jnp.asarray(B[1:]))
    q = Q[1]
    np.testing.assert_allclose(np.asarray(h)[0, :, 0, :], np.diag(q) - np.outer(q, q),
                               rtol=1e-9, atol=1e-14)
    # second derivatives at the -inf edge: finite, both arguments
    g2 = jax.jit(jax.grad(lambda a, b: sum(jnp.sum(g ** 2) for g in jax.grad(f, argnums=(0, 1))(
        a, b)), argnums=(0, 1)))(jnp.asarray(A), jnp.asarray(B))
    for g in g2:
        assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("fn", FUNCS)
def test_jax_grad_at_probability_edges(jax, fn):
    """All edge rows where the value is finite, batched; gradients w.r.t. both arguments, and
    (for kl_div and js_div, the costly XLA compilations) second derivatives too."""
    jnp = jax.numpy
    cases = [(p, q) for p, q in EDGE_PROBS.values() if _finite_for(fn, p, q)]
    a = jnp.asarray(np.array([p for p, _ in cases]))
    b = jnp.asarray(np.array([q for _, q in cases]))

    def f(a, b):
        return jnp.sum(getattr(kldiv, fn)(a, b))

    grad = jax.grad(f, argnums=(0, 1))
    if fn in ("kl_div", "js_div"):
        def program(a, b):
            second = jax.grad(lambda a, b: sum(jnp.sum(g ** 2) for g in grad(a, b)),
                              argnums=(0, 1))
            return grad(a, b) + second(a, b)
    else:
        program = grad
    for g in jax.jit(program)(a, b):
        assert np.all(np.isfinite(np.asarray(g))), (fn, g)


def test_jax_jit_matches_eager_and_skips_value_checks(jax):
    jnp = jax.numpy
    rng = np.random.default_rng(9)
    A, B = rng.normal(size=(3, 12)), rng.normal(size=(3, 12))
    kw = dict(p_space="logits", q_space="logits")
    for fn in FUNCS[:4]:
        f = getattr(kldiv, fn)
        eager = np.asarray(f(jnp.asarray(A), jnp.asarray(B), **kw))
        jitted = np.asarray(jax.jit(lambda a, b: f(a, b, **kw))(jnp.asarray(A), jnp.asarray(B)))
        np.testing.assert_allclose(jitted, eager, rtol=1e-13)
    g = jax.jit(jax.grad(lambda a, b: kldiv.kl_div(a, b, reduction="mean", **kw), argnums=1))(
        jnp.asarray(A), jnp.asarray(B))
    P, Q = scipy.special.softmax(A, axis=-1), scipy.special.softmax(B, axis=-1)
    np.testing.assert_allclose(np.asarray(g), (Q - P) / 3, rtol=1e-10, atol=1e-15)
