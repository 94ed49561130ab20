"""Reductions at their edges (audit 3 F16, F17), against mpmath and float64 torch.autograd of the
textbook formula (tests/torch_reference.py naive_row):
- "mean" of float32 rows near finfo.max is finite whenever the mean is (the plain sum overflows);
- the derivative with respect to a weight that is exactly 0 is the row's value (sum) or
  (row - mean) / sum(w) (mean), as just above 0; an inf / nan row of weight 0 still adds 0."""
import mpmath as mp
import numpy as np
import pytest
import torch

import kldiv
from torch_reference import naive_row

L = dict(p_space="logits", q_space="logits")


def _mp_reverse(a, b):  # KL(softmax b || softmax a) at 50 digits on the exact inputs
    mp.mp.dps = 50
    a = [mp.mpf(float(x)) for x in a]
    b = [mp.mpf(float(x)) for x in b]
    la = [x - mp.log(mp.fsum(mp.exp(y - max(a)) for y in a)) - max(a) for x in a]
    lb = [x - mp.log(mp.fsum(mp.exp(y - max(b)) for y in b)) - max(b) for x in b]
    return mp.fsum(mp.exp(y) * (y - x) for x, y in zip(la, lb))


def _backends():
    out = [("numpy", np.asarray), ("torch", torch.from_numpy)]
    try:
        import jax.numpy as jnp
        out.append(("jax", jnp.asarray))
    except ImportError:  # pragma: no cover
        pass
    return out


@pytest.mark.parametrize("name,conv", _backends())
def test_mean_near_float32_max_is_finite(name, conv):
    a = np.array([[3e38, -3e38, 0.0, 1.0], [3e38, -2e38, 0.0, 1.0]], np.float32)
    b = np.array([[0.0, 1.0, 2.0, 3.0]] * 2, np.float32)
    truth = float((_mp_reverse(a[0], b[0]) + _mp_reverse(a[1], b[1])) / 2)
    assert truth < float(np.finfo(np.float32).max) < 2 * truth  # the sum overflows, the mean not
    for kw in ({}, {"mask": conv(np.array([True, True]))}, {"weight": conv(np.ones(2, np.float32))}):
        x, y = conv(a), conv(b)
        if name == "torch":
            x.requires_grad_()  # the core (autograd graph), not only the lane
        out = kldiv.reverse_kl(x, y, reduction="mean", **L, **kw)
        got = float(out.detach() if name == "torch" else out)
        assert got == pytest.approx(truth, rel=1e-6), (kw, got)
    got = float(kldiv.reverse_kl(conv(a), conv(b), reduction="sum", **L))
    assert got == float("inf")  # the true sum is beyond float32: inf is right there


def _rows64(p, q, kind="forward"):
    return torch.stack([naive_row(kind, x, y, "logits", "logits") for x, y in zip(p, q)])


@pytest.mark.parametrize("kind,f", [("forward", kldiv.kl_div), ("js", kldiv.js_div)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_weight_zero_gradient_torch(kind, f, reduction):
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.tensor([True, False, True, True])
    w = torch.tensor([1.0, 5.0, 0.0, 2.0], requires_grad=True)
    out = f(p, q, weight=w, mask=mask, reduction=reduction, **L)
    up = torch.tensor([1.0, 2.0, 3.0, 4.0]) if reduction == "none" else torch.tensor(1.0)
    (out * up).sum().backward()
    w64 = w.detach().double().requires_grad_()
    rows = torch.where(mask, _rows64(p.double(), q.double(), kind), 0.0) * w64
    ref = {"sum": rows.sum(), "none": rows,
           "mean": rows.sum() / torch.where(mask, w64, 0.0).sum()}[reduction]
    (ref * up.double()).sum().backward()
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-6, atol=1e-7)
    assert float(w.grad[2]) != 0.0


def test_weight_zero_gradient_jax():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    rows = _rows64(p.double(), q.double())
    gw = jax.grad(lambda w: kldiv.kl_div(jnp.asarray(p.numpy()), jnp.asarray(q.numpy()), weight=w,
                                         reduction="sum", **L))(jnp.array([1.0, 0.0, 2.0]))
    np.testing.assert_allclose(np.asarray(gw), rows.numpy(), rtol=1e-6)


def test_bad_rows_of_weight_zero_still_add_nothing():
    p = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[1.0, 0.0], [0.4, 0.6], [0.3, 0.7]])  # row 0: q = 0 < p, KL = +inf
    w = torch.tensor([0.0, 1.0, 1.0], requires_grad=True)
    out = kldiv.kl_div(p, q, weight=w, reduction="mean")
    out.backward()
    ref = _rows64(torch.log(p[1:].double()), torch.log(q[1:].double())).mean()
    assert float(out) == pytest.approx(float(ref), rel=1e-6)
    assert float(w.grad[0]) == 0.0 and bool(torch.isfinite(w.grad).all())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_weight_zero_gradient_inplace(reduction):
    from kldiv.torch import kl_div_inplace

    g = torch.Generator().manual_seed(2)
    p, h = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.tensor([True, False, True, True])
    w = torch.tensor([1.0, 5.0, 0.0, 2.0], requires_grad=True)
    out = kl_div_inplace(p, h.clone(), weight=w, mask=mask, reduction=reduction)
    out.backward()
    w64 = w.detach().double().requires_grad_()
    rows = torch.where(mask, _rows64(p.double(), h.double()), 0.0) * w64
    ref = rows.sum() if reduction == "sum" else rows.sum() / torch.where(mask, w64, 0.0).sum()
    ref.backward()
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-6, atol=1e-7)
    assert float(w.grad[2]) != 0.0
