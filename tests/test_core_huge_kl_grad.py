"""Gradients of rows with a huge finite divergence, in the core (fast paths off).

A logit of -1e30 (or float32's finfo.min) on q where p has mass gives KL ~ 1e29..1e37: finite.
Its derivatives are those of the plain formula sum p (log p - log q), which has no cancellation
there: the reference is torch.autograd on that formula in float64 (first derivatives per row,
and a Hessian-vector product), and jax.grad of the same formula for the JAX core.
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kldiv

F32MIN = float(np.finfo(np.float32).min)


@pytest.fixture(autouse=True)
def core_only(monkeypatch):
    from kldiv._core import dispatch

    monkeypatch.setattr(dispatch, "handler", lambda *a, **k: None)


ROWS = [
    # (p logits, q logits, dtype)
    ([0.0, 1.0, 2.0, 0.5], [0.0, -1e30, 2.0, 0.5], torch.float64),
    ([0.0, 1.0, 2.0, 0.5], [0.0, -1e300, 2.0, 0.5], torch.float64),
    ([3.0, -1.0, 2.0, 0.5], [-1e30, -1e30, 2.0, 0.5], torch.float64),
    ([0.0, 1.0, 2.0, 0.5], [0.0, F32MIN, 2.0, 0.5], torch.float32),
    # (not here: float32 finfo.min on both sides with KL ~8e37, whose p-side gradient's
    # intermediates exceed finfo.max: a documented limit, float64 is exact there)
    ([1e30, 1e30 + 1e15, 1e30, 0.0], [5.0, -1e30, 2.0, 0.5], torch.float64),
    ([0.0, 1.0, 2.0, 0.5], [0.0, -1e4, 2.0, 0.5], torch.float32),
]


def _naive(kind, t, s):
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    if kind == "reverse":
        lp, lq = lq, lp
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("row", range(len(ROWS)))
def test_torch_core_gradient_of_a_huge_kl_row(kind, row):
    pl, ql, dt = ROWS[row]
    if kind == "reverse":
        pl, ql = ql, pl
    fn = kldiv.kl_div if kind == "forward" else kldiv.reverse_kl
    # two rows: the huge one and an ordinary one (a per-row check, not normwise)
    t = torch.tensor([pl, [0.1, 0.2, 0.3, 0.4]], dtype=dt, requires_grad=True)
    s = torch.tensor([ql, [0.4, 0.1, 0.2, 0.3]], dtype=dt, requires_grad=True)
    v = fn(t, s, p_space="logits", q_space="logits")
    gt, gs = torch.autograd.grad(v.sum(), (t, s))
    t64 = t.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    ref = _naive(kind, t64, s64)
    rt, rs = torch.autograd.grad(ref.sum(), (t64, s64))
    tol = 1e-5 if dt == torch.float32 else 1e-12
    assert torch.isfinite(v).all()
    np.testing.assert_allclose(v.detach().double().numpy(), ref.detach().numpy(), rtol=tol)
    for g, r in ((gs, rs), (gt, rt)):
        assert torch.isfinite(g).all()
        for i in range(2):  # per row, relative to the row's own scale
            scale = float(r[i].abs().max())
            err = float((g[i].double() - r[i]).abs().max())
            assert err <= tol * max(scale, 1e-300), (i, g[i], r[i])


def test_torch_core_hvp_of_a_huge_kl_row():
    t = torch.tensor([[0.0, 1.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([[0.0, -1e30, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    vec = torch.tensor([[0.3, -0.2, 0.5, 0.1]], dtype=torch.float64)

    def hvp(f):
        (g,) = torch.autograd.grad(f(t, s).sum(), (s,), create_graph=True)
        (h,) = torch.autograd.grad((g * vec).sum(), (s,))
        return h

    got = hvp(lambda a, b: kldiv.kl_div(a, b, p_space="logits", q_space="logits"))
    want = hvp(lambda a, b: _naive("forward", a, b))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-15)


def test_jax_core_gradient_of_a_huge_kl_row(restore_jax_x64):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    jax.config.update("jax_enable_x64", True)
    if True:
        t = jnp.array([[0.0, 1.0, 2.0, 0.5]], dtype=jnp.float64)
        s = jnp.array([[0.0, -1e30, 2.0, 0.5]], dtype=jnp.float64)

        def f(b):
            return kldiv.kl_div(t, b, p_space="logits", q_space="logits").sum()

        g = np.asarray(jax.grad(f)(s))
    t64 = torch.tensor([[0.0, 1.0, 2.0, 0.5]], dtype=torch.float64)
    want = (torch.softmax(torch.tensor([[0.0, -1e30, 2.0, 0.5]], dtype=torch.float64), -1)
            - torch.softmax(t64, -1)).numpy()
    np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-15)
