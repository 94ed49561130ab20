"""JS in the C kernel when the other side's mass on the common support underflows.

A one-hot (or -inf masked) teacher against a student whose logit at the teacher's categories is
100 below its maximum (float32) or 1e4 (float64), or masked with -1e30 / -3e38: q's weights on
the common support round to 0 while the support itself (decided from the inputs) is not empty.
The kernel lost beta KL(p || m) there (log 2 / 2 instead of log 2; found by an outside
differential audit). References: the exact disjoint-support value
-beta log beta - (1 - beta) log(1 - beta) where q's mass on p's support is below every float, and
otherwise mpmath at 50 digits on the exact inputs (values and gradients, per row: the float64
textbook formula is no reference here, its log(p / m) near -log(beta) rounds away the 1e-26
that the gradient with respect to p is made of).
"""
from __future__ import annotations

import math

import mpmath
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from torch_reference import took_fast  # noqa: E402

L = dict(p_space="logits", q_space="logits")
NINF = float("-inf")


def _mp_js(x, y, beta):
    """JS_beta of softmax(x) against softmax(y) and its gradients, in mpmath (50 digits)."""
    with mpmath.workdps(50):
        def soft(v):
            v = [mpmath.mpf(float(t)) if t != NINF else None for t in v]
            mx = max(t for t in v if t is not None)
            e = [mpmath.exp(t - mx) if t is not None else mpmath.mpf(0) for t in v]
            z = mpmath.fsum(e)
            return [t / z for t in e]
        p, q = soft(x), soft(y)
        b = mpmath.mpf(beta)
        m = [b * a + (1 - b) * c for a, c in zip(p, q)]
        g = [mpmath.log(a / w) if a > 0 else mpmath.mpf(0) for a, w in zip(p, m)]
        h = [mpmath.log(c / w) if c > 0 else mpmath.mpf(0) for c, w in zip(q, m)]
        val = b * mpmath.fsum(a * t for a, t in zip(p, g)) + (1 - b) * mpmath.fsum(
            c * t for c, t in zip(q, h))
        eg = mpmath.fsum(a * t for a, t in zip(p, g))
        eh = mpmath.fsum(c * t for c, t in zip(q, h))
        gx = [float(b * a * (t - eg)) for a, t in zip(p, g)]
        gy = [float((1 - b) * c * (t - eh)) for c, t in zip(q, h)]
        return float(val), torch.tensor(gx, dtype=torch.float64), torch.tensor(gy, dtype=torch.float64)


def _disjoint(beta):
    return -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("dtype,gap", [(torch.float32, -100.0), (torch.float32, -3e38),
                                       (torch.float64, -1e4), (torch.float64, -1e30)])
def test_audit_rows(beta, dtype, gap):
    for p, q in ([[0.0, NINF], [gap, -1.0]], [[0.0, NINF, 0.0], [gap, 0.0, gap]]):
        x = torch.tensor([p], dtype=dtype, requires_grad=True)
        y = torch.tensor([q], dtype=dtype, requires_grad=True)
        v = kldiv.js_div(x, y, beta=beta, reduction="sum", **L)
        assert took_fast(v)
        assert v.item() == pytest.approx(_disjoint(beta), rel=1e-6)
        v.backward()
        # the true gradient is below 1e-40 (float32) / 1e-4000 (float64): 0 in the type
        assert x.grad.abs().max().item() < 1e-30 and y.grad.abs().max().item() < 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.3, 0.5])
def test_random_masked_rows(dtype, beta):
    g = torch.Generator().manual_seed(7)
    gaps = [-60.0, -200.0, -2000.0, -1e30] + ([-3e38] if dtype == torch.float32 else [-1e300])
    rows_x, rows_y = [], []
    for r in range(40):
        V = int(torch.randint(2, 40, (1,), generator=g))
        x = torch.randn(V, generator=g, dtype=torch.float64) * 2
        y = torch.randn(V, generator=g, dtype=torch.float64) * 2
        hole = torch.rand(V, generator=g) < 0.5
        hole[0] = False
        x[hole] = NINF
        low = torch.rand(V, generator=g) < 0.5
        y[low] = gaps[r % len(gaps)]
        pad = 40 - V  # same width for a batch: padded with -inf on both sides (no mass)
        rows_x.append(torch.cat([x, torch.full((pad,), NINF, dtype=torch.float64)]))
        rows_y.append(torch.cat([y, torch.full((pad,), NINF, dtype=torch.float64)]))
    X = torch.stack(rows_x).to(dtype).requires_grad_()
    Y = torch.stack(rows_y).to(dtype).requires_grad_()
    v = kldiv.js_div(X, Y, beta=beta, reduction="none", **L)
    assert took_fast(v)
    v.sum().backward()
    tol_v = 2e-6 if dtype == torch.float32 else 1e-12
    tol_g = 1e-5 if dtype == torch.float32 else 1e-10
    for i in range(X.shape[0]):
        val, gx, gy = _mp_js(X[i].tolist(), Y[i].tolist(), beta)
        assert v[i].item() == pytest.approx(val, rel=tol_v, abs=1e-30), i
        for got, want in ((X.grad[i], gx), (Y.grad[i], gy)):
            err = (got.double() - want).norm().item()
            assert err <= tol_g * want.norm().item() + 1e-37, (i, err, want.norm().item())
