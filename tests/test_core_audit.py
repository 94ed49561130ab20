"""The core against 50-digit mpmath on the exact float32 inputs (outside audit, findings 2 and 3).

Finding 2: float32 probabilities at temperature != 1 (log p was taken in float32 before the
temperature divided it: 6e-5..5e-4 relative at KL ~1e-8, gradients 1e-3 per row).
Finding 3: forward / reverse KL gradients on peaked, nearly disjoint float32 rows (the
derivative with respect to the side whose log-probabilities appear twice cancelled at its
largest entry: 15% off there, O(1) per row at logits of std 20).

The reference values and derivatives are formed in mpmath from the float32 inputs themselves;
the derivatives from the analytic formulas (s = each side's log-space input divided by T;
probabilities: s = log x / T, ds/dx = 1 / (T x)):
  KL(p || q):  d/ds_p = p (log(p/q) - KL),   d/ds_q = q - p
  JS_beta:     d/ds_p = beta p (log(p/m) - KL(p || m)), d/ds_q likewise with 1 - beta
  Jeffreys:    KL(p || q) + KL(q || p), summed from the two.
"""
import sys
from pathlib import Path

import mpmath as mp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))
from torch_reference import core_only  # noqa: E402

import kldiv  # noqa: E402

FUNCS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}
CTX = mp.mp.clone()
CTX.dps = 50


def _lw(row, space, T):
    s = [(CTX.log(CTX.mpf(float(v))) if space == "probs" else CTX.mpf(float(v))) / T
         for v in row]
    z = CTX.log(CTX.fsum(CTX.exp(v) for v in s))
    return [v - z for v in s]


def _kl_grads(lp, lq):
    """KL(p || q) and its derivatives with respect to s_p and s_q (mpmath lists)."""
    p = [CTX.exp(v) for v in lp]
    q = [CTX.exp(v) for v in lq]
    kl = CTX.fsum(a * (x - y) for a, x, y in zip(p, lp, lq))
    gp = [a * (x - y - kl) for a, x, y in zip(p, lp, lq)]
    gq = [b - a for a, b in zip(p, q)]
    return kl, gp, gq


def _ref(kind, prow, qrow, ps, qs, T, beta=0.5):
    """(value, d/dp input, d/dq input) in mpmath."""
    lp, lq = _lw(prow, ps, T), _lw(qrow, qs, T)
    if kind == "forward":
        v, gp, gq = _kl_grads(lp, lq)
    elif kind == "reverse":
        v, gq, gp = _kl_grads(lq, lp)
    elif kind == "jeffreys":
        v1, a1, b1 = _kl_grads(lp, lq)
        v2, b2, a2 = _kl_grads(lq, lp)
        v, gp, gq = v1 + v2, [x + y for x, y in zip(a1, a2)], [x + y for x, y in zip(b1, b2)]
    else:
        b = CTX.mpf(beta)
        lm = [CTX.log(b * CTX.exp(x) + (1 - b) * CTX.exp(y)) for x, y in zip(lp, lq)]
        v1, a1, _ = _kl_grads(lp, lm)
        v2, a2, _ = _kl_grads(lq, lm)
        v, gp, gq = b * v1 + (1 - b) * v2, [b * x for x in a1], [(1 - b) * x for x in a2]

    def chain(g, row, space):
        if space == "probs":
            return [float(x / (T * CTX.mpf(float(r)))) for x, r in zip(g, row)]
        return [float(x / T) for x in g]

    return float(v), chain(gp, prow, ps), chain(gq, qrow, qs)


def _row_err(g, r):
    g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
    return float(np.max(np.abs(g - r)) / np.max(np.abs(r)))


def _check(kind, P, Q, ps, qs, T, vtol, gtol, numpy_too=True):
    x = torch.tensor(P).requires_grad_()
    y = torch.tensor(Q).requires_grad_()
    with core_only():
        v = FUNCS[kind](x, y, p_space=ps, q_space=qs, temperature=T)
    v.sum().backward()
    vn = FUNCS[kind](P, Q, p_space=ps, q_space=qs, temperature=T) if numpy_too else None
    for i in range(P.shape[0]):
        rv, rgp, rgq = _ref(kind, P[i], Q[i], ps, qs, T)
        assert abs(float(v[i]) - rv) <= vtol * rv, (kind, T, i, float(v[i]), rv)
        if vn is not None:
            assert abs(float(vn[i]) - rv) <= vtol * rv, (kind, T, i, float(vn[i]), rv)
        assert _row_err(x.grad[i], rgp) <= gtol, (kind, T, i, "p", _row_err(x.grad[i], rgp))
        assert _row_err(y.grad[i], rgq) <= gtol, (kind, T, i, "q", _row_err(y.grad[i], rgq))


def _close_probs(seed, n=4, V=7, rel=1e-3):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(V), size=n)
    q = p * (1 + rel * rng.standard_normal(p.shape))
    q = q / q.sum(-1, keepdims=True)
    return p.astype(np.float32), q.astype(np.float32)


# --- finding 2: float32 probabilities at T != 1 -------------------------------------------


@pytest.mark.parametrize("kind", ["forward", "reverse", "js", "jeffreys"])
@pytest.mark.parametrize("T", [2.0, 0.5])
def test_probs_vs_probs_temperature(kind, T):
    # close rows, KL ~1e-8..1e-7: log p rounded to float32 cost 6e-5..5e-4 relative (values)
    # and 1e-3 per row (gradients)
    P, Q = _close_probs(1)
    _check(kind, P, Q, "probs", "probs", T, vtol=2e-6, gtol=1e-5)


@pytest.mark.parametrize("kind", ["forward", "reverse", "js", "jeffreys"])
@pytest.mark.parametrize("qs", ["logits", "log_probs"])
def test_probs_vs_log_space_temperature(kind, qs):
    P, Q = _close_probs(2)
    Ql = np.log(Q.astype(np.float64))
    if qs == "logits":
        Ql = Ql + 3.0
    Ql = Ql.astype(np.float32)
    for T in (2.0, 0.5):
        _check(kind, P, Ql, "probs", qs, T, vtol=2e-6, gtol=1e-5)
        if kind in ("forward", "js"):  # and the probabilities on q's side
            _check(kind, Ql, P, qs, "probs", T, vtol=2e-6, gtol=1e-5)


# --- finding 3: forward / reverse KL gradients on peaked, nearly disjoint float32 rows -------


def test_peaked_row_example():
    # the audit's row: d/dp[0] of forward KL was 7.15e-7 (truth 6.2046e-7), d/dq[1] of reverse
    # KL 1.19e-7 (truth 1.24058e-7)
    P = np.array([[20.0, 0, 0, 3]], np.float32)
    Q = np.array([[0.0, 20, 0, -5]], np.float32)
    for kind in ("forward", "reverse"):
        _check(kind, P, Q, "logits", "logits", 1.0, vtol=1e-6, gtol=1e-5, numpy_too=False)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("std,T", [(5.0, 1.0), (20.0, 1.0), (40.0, 1.0), (1.0, 0.05)])
def test_peaked_rows(kind, std, T):
    # p log-probabilities, q logits, both of std `std` (O(1) per-row errors at std 20 before)
    g = torch.Generator().manual_seed(int(std * 10 + T * 100))
    a = torch.log_softmax(torch.randn(6, 40, dtype=torch.float64, generator=g) * std, -1)
    b = torch.randn(6, 40, dtype=torch.float64, generator=g) * std
    P, Q = a.float().numpy(), b.float().numpy()
    _check(kind, P, Q, "log_probs", "logits", T, vtol=2e-6, gtol=1e-5, numpy_too=False)
