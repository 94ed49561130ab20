"""The C kernel (``kldiv._ext._fused``, the torch default path) far from convergence.

(1) JS gradients on far, nearly disjoint rows (issue 11): the gradient with respect to p's logits
is beta p_i (E_p y - y_i), y = log(m / p), and on far rows y sits near log(beta) wherever p lives,
so that y - E_p y is a small difference of two values near log(beta); the kernel carries
y - log(beta) = log1p(((1 - beta) / beta) e^d) (and the mirror for q) instead. Float32 rows
against float64 references per row: the textbook formula (log_softmax, logaddexp) differentiated
by torch.autograd in float64, on the same float32 inputs; mpmath on a few rows for float64.

(2) Rows whose values span more than float32 holds (logits of 3e38 against -3.4e38): each side's
shift by its own maximum rounds 2 - 3e38 and -1 - 3e38 to one float; the float32 kernel takes
such rows in double (exact widening), and the gradients are checked against mpmath on the exact
inputs, for all four kinds.

Per-row error: |g - g_ref| / |g_ref| (2-norms over the row).
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from torch_reference import naive_row, took_fast  # noqa: E402

L = dict(p_space="logits", q_space="logits")
FNS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
       "jeffreys": kldiv.jeffreys_div}


def _row_err(g, gt):
    g, gt = g.double(), gt.double()
    num = (g - gt).norm(dim=-1)
    den = gt.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), num)


def _fast(fn, a, b, **kw):
    """Values per row and both gradients through the default (kernel) path."""
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    v = fn(a1, b1, reduction="none", **kw)
    assert took_fast(v)
    ga, gb = torch.autograd.grad(v.sum(), (a1, b1))
    return v, ga, gb


def _textbook_js(a, b, space, beta, T=1.0):
    """JS_beta per row by the textbook formula in float64 (dense rows), and its gradients by
    torch.autograd."""
    a1 = a.double().clone().requires_grad_()
    b1 = b.double().clone().requires_grad_()

    def lw(x):
        return torch.log_softmax((x.log() if space == "probs" else x) / T, -1)

    lp, lq = lw(a1), lw(b1)
    lm = torch.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
    v = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    ga, gb = torch.autograd.grad(v.sum(), (a1, b1))
    return v.detach(), ga, gb


def _inputs(s, space, n=24, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, n, V, generator=g, dtype=torch.float64) * s
    if space == "log_probs":
        x, y = x.log_softmax(-1), y.log_softmax(-1)
    elif space == "probs":
        x, y = x.softmax(-1), y.softmax(-1)
    return x.float(), y.float()


@pytest.mark.parametrize("space", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_float32_js_far_rows_per_row_gradients(beta, space):
    """Logits of std 1 .. 8 (JS from near 0 up to its log 2 bound): per-row gradients within
    1e-5 of float64 (they were 2e-5 at std 3, 1e-4 at std 4, O(1) at std 8)."""
    for s in (1.0, 3.0, 4.0, 8.0):  # (std 16: mpmath below; the float64 formula loses there)
        a, b = _inputs(s, space, seed=int(s))
        kw = dict(p_space=space, q_space=space, beta=beta)
        v, ga, gb = _fast(kldiv.js_div, a, b, **kw)
        vt, gat, gbt = _textbook_js(a, b, space, beta)
        assert bool((((v.double() - vt) / vt).abs() <= 2e-6).all()), (s, v, vt)
        for g, gt in ((ga, gat), (gb, gbt)):
            e = _row_err(g, gt)
            assert float(e.max()) <= 1e-5, (s, float(e.max()))


@pytest.mark.parametrize("beta", [0.01, 0.3, 0.7, 0.99])
@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_float32_js_far_rows_at_temperatures_and_extreme_beta(beta, T):
    a, b = _inputs(6.0, "logits", n=16, V=37, seed=7)
    v, ga, gb = _fast(kldiv.js_div, a, b, beta=beta, temperature=T, **L)
    vt, gat, gbt = _textbook_js(a, b, "logits", beta, T)
    assert bool((((v.double() - vt) / vt).abs() <= 2e-6).all())
    for g, gt in ((ga, gat), (gb, gbt)):
        assert float(_row_err(g, gt).max()) <= 1e-5


def test_float32_js_peaked_q_far_from_p():
    """q peaked on one entry where the log-ratio is moderate, p elsewhere: the gradient in q's
    logits is a difference of O(1e-4) against log-ratios of O(1) (the row goes to the kernel's
    double route); per-row within 1e-5 of float64."""
    V = 50
    x = torch.linspace(-8, 8, V, dtype=torch.float64)[None].repeat(4, 1)
    y = torch.full((4, V), -12.0, dtype=torch.float64)
    for r, (j, off) in enumerate([(20, 0.0), (25, 3.0), (30, -2.0), (10, 5.0)]):
        y[r] = x[r] - 9.0 + 0.3 * torch.cos(torch.arange(V, dtype=torch.float64) * (r + 1))
        y[r, j] = x[r, j] + off + 12.0  # q's peak
    a, b = x.float(), y.float()
    for beta in (0.1, 0.5, 0.9):
        v, ga, gb = _fast(kldiv.js_div, a, b, beta=beta, **L)
        vt, gat, gbt = _textbook_js(a, b, "logits", beta)
        for g, gt in ((ga, gat), (gb, gbt)):
            assert float(_row_err(g, gt).max()) <= 1e-5, beta


def test_float32_js_far_rows_masks_strides_and_v1():
    """Far rows with -inf entries on one side or both (support mismatch), masked rows (weight 0),
    an odd row stride, and V = 1; the references per row by the textbook formula."""
    a, b = _inputs(6.0, "logits", n=8, V=41, seed=3)
    a[1, :5] = -math.inf  # p lacks some of q's support
    b[2, 3:9] = -math.inf  # q lacks some of p's support
    a[3, 0], b[3, 1] = -math.inf, -math.inf  # both
    wide_a = torch.zeros(8, 53)
    wide_b = torch.zeros(8, 53)
    wide_a[:, :41], wide_b[:, :41] = a, b
    for beta in (0.2, 0.5, 0.85):
        a1, b1 = wide_a.clone().requires_grad_(), wide_b.clone().requires_grad_()
        pa, pb = a1[:, :41], b1[:, :41]  # row stride 53
        v = kldiv.js_div(pa, pb, beta=beta, reduction="none", **L)
        assert took_fast(v)
        w = torch.ones(8)
        w[5] = 0.0
        ga, gb = torch.autograd.grad((v * w).sum(), (a1, b1))
        ga, gb = ga[:, :41], gb[:, :41]
        assert bool((ga[5] == 0).all()) and bool((gb[5] == 0).all())
        for r in range(8):
            if r == 5:
                continue
            ar = a[r].double().clone().requires_grad_()
            br = b[r].double().clone().requires_grad_()
            vt = naive_row("js", ar, br, "logits", "logits", beta=beta)
            gat, gbt = torch.autograd.grad(vt, (ar, br))
            assert abs(float(v[r]) - float(vt)) <= 2e-6 * float(vt)
            fin_a, fin_b = torch.isfinite(a[r]), torch.isfinite(b[r])
            assert float(_row_err(ga[r][fin_a], gat[fin_a])) <= 1e-5, (r, beta)
            assert float(_row_err(gb[r][fin_b], gbt[fin_b])) <= 1e-5, (r, beta)
    # V = 1: JS = 0, gradients 0
    one = torch.tensor([[3e4], [-2.0]], requires_grad=True)
    other = torch.tensor([[-5e4], [7.0]], requires_grad=True)
    v = kldiv.js_div(one, other, reduction="sum", **L)
    assert took_fast(v)
    v.backward()
    assert float(v) == 0.0 and bool((one.grad == 0).all()) and bool((other.grad == 0).all())


# -- mpmath references ---------------------------------------------------------------------

def _mp_lsm(x):
    """log_softmax of exact floats at 60 digits (None for -inf)."""
    xs = [mpmath.mpf(t) for t in x if t != -math.inf]
    top = max(xs)
    lse = top + mpmath.log(mpmath.fsum(mpmath.exp(t - top) for t in xs))
    return [None if t == -math.inf else mpmath.mpf(t) - lse for t in x]


def _mp_kl(lp, lq):
    """KL(p || q) and its gradients in p's and q's logits (mpf lists), finite supports."""
    n = len(lp)
    p = [mpmath.mpf(0) if t is None else mpmath.exp(t) for t in lp]
    q = [mpmath.mpf(0) if t is None else mpmath.exp(t) for t in lq]
    kl = mpmath.fsum(p[i] * (lp[i] - lq[i]) for i in range(n) if lp[i] is not None)
    gx = [0 if lp[i] is None else p[i] * (lp[i] - lq[i] - kl) for i in range(n)]
    gy = [q[i] - p[i] for i in range(n)]
    return kl, gx, gy


def _mp_js(lp, lq, beta):
    n = len(lp)
    beta = mpmath.mpf(beta)
    p = [mpmath.mpf(0) if t is None else mpmath.exp(t) for t in lp]
    q = [mpmath.mpf(0) if t is None else mpmath.exp(t) for t in lq]
    m = [beta * p[i] + (1 - beta) * q[i] for i in range(n)]
    y = [mpmath.log(m[i] / p[i]) if p[i] > 0 else 0 for i in range(n)]
    z = [mpmath.log(m[i] / q[i]) if q[i] > 0 else 0 for i in range(n)]
    js = -beta * mpmath.fsum(p[i] * y[i] for i in range(n)) \
        - (1 - beta) * mpmath.fsum(q[i] * z[i] for i in range(n))
    ey = mpmath.fsum(p[i] * y[i] for i in range(n))
    ez = mpmath.fsum(q[i] * z[i] for i in range(n))
    gx = [-beta * p[i] * (y[i] - ey) for i in range(n)]
    gy = [-(1 - beta) * q[i] * (z[i] - ez) for i in range(n)]
    return js, gx, gy


def mp_row(kind, x, y, beta=0.5):
    """Value and gradients (in x: p's logits, y: q's) of one row, as floats."""
    with mpmath.workdps(60):
        lp, lq = _mp_lsm(x), _mp_lsm(y)
        if kind == "forward":
            v, gx, gy = _mp_kl(lp, lq)
        elif kind == "reverse":
            v, gy, gx = _mp_kl(lq, lp)
        elif kind == "jeffreys":
            v1, gx1, gy1 = _mp_kl(lp, lq)
            v2, gy2, gx2 = _mp_kl(lq, lp)
            v, gx, gy = v1 + v2, [s + t for s, t in zip(gx1, gx2)], \
                [s + t for s, t in zip(gy1, gy2)]
        else:
            v, gx, gy = _mp_js(lp, lq, beta)
        return float(v), [float(t) for t in gx], [float(t) for t in gy]


def test_mp_reference_on_a_textbook_row():
    """The reference itself against torch.autograd on a tame row (a check of the reference)."""
    x, y = [0.5, -1.0, 2.0, 0.1], [1.0, 0.3, -0.7, 0.0]
    for kind in FNS:
        v, gx, gy = mp_row(kind, x, y, 0.3)
        a = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(y, dtype=torch.float64, requires_grad=True)
        vt = naive_row(kind, a, b, "logits", "logits", beta=0.3)
        ga, gb = torch.autograd.grad(vt, (a, b))
        assert abs(v - float(vt)) <= 1e-14
        assert np.allclose(gx, ga.numpy(), rtol=0, atol=1e-14)
        assert np.allclose(gy, gb.numpy(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_js_std16_rows_against_mpmath(dt):
    """Std-16 logits (q / p down to e^-60 where p lives: below float64's resolution next to
    log beta, so the float64 textbook formula is no reference here): float32 within 1e-5 per
    row, float64 (the double kernel carries the same far form) within 1e-10."""
    a, b = _inputs(16.0, "logits", n=4, V=20, seed=11)
    a, b = a.to(dt), b.to(dt)
    tv, tg = (2e-6, 1e-5) if dt == torch.float32 else (1e-13, 1e-10)
    for beta in (0.1, 0.5, 0.9):
        v, ga, gb = _fast(kldiv.js_div, a, b, beta=beta, **L)
        for r in range(a.shape[0]):
            vt, gx, gy = mp_row("js", a[r].double().tolist(), b[r].double().tolist(), beta)
            assert abs(float(v[r]) - vt) <= tv * vt
            assert float(_row_err(ga[r], torch.tensor(gx, dtype=torch.float64))) <= tg
            assert float(_row_err(gb[r], torch.tensor(gy, dtype=torch.float64))) <= tg


HUGE = [
    # (p's logits, q's logits): issue 11's row, and neighbours: mass far from the other side's
    # maximum at +-3e38, finfo.min masks, both signs
    ([2.0, -1.0, 3e38], [0.0, -1.0, -3.4e38]),
    ([0.0, -1.0, -3.4e38], [2.0, -1.0, 3e38]),
    ([3e38, 1.0, 0.5, -2.0], [-3e38, 0.0, 3.0, 1.0]),
    ([1.0, 0.25, -3.4028234e38, 3.0], [3.3e38, 2.0, 1.0, -0.5]),
    ([-3.3e38, 0.0, 0.7, -1.5, 2.0], [3.3e38, -3.3e38, 1.0, 0.0, -2.0]),
]


@pytest.mark.parametrize("kind", sorted(FNS))
@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_rows_spanning_more_than_float32_against_mpmath(kind, dt):
    """Values and per-row gradients of rows spanning +-3.4e38, with tame rows in the same call
    (the call stays on the kernel), for all four kinds."""
    tame = ([0.3, -1.0, 2.0, 0.0, 1.5], [1.0, 0.2, -0.5, 0.4, 0.0])
    tol = 1e-5 if dt == torch.float32 else 1e-12
    for x, y in HUGE:
        V = len(x)
        a = torch.tensor([x, tame[0][:V]], dtype=dt)
        b = torch.tensor([y, tame[1][:V]], dtype=dt)
        v, ga, gb = _fast(FNS[kind], a, b, **L)
        for r in range(2):
            vt, gx, gy = mp_row(kind, a[r].double().tolist(), b[r].double().tolist())
            if dt == torch.float32 and abs(vt) > 3.4028234e38:
                assert math.isinf(float(v[r]))  # the float32 value overflows, rightly
            else:
                assert abs(float(v[r]) - vt) <= tol * abs(vt) + 1e-300, (x, y, float(v[r]), vt)
            for g, gt in ((ga[r], gx), (gb[r], gy)):
                gt = torch.tensor(gt, dtype=torch.float64)
                if float(gt.norm()) < 1e-40:  # e^-3e38 in truth: mpmath's 60 digits of noise
                    assert float(g.double().norm()) <= 1e-30, (kind, x, y, g)
                else:
                    assert float(_row_err(g, gt)) <= tol, (kind, x, y, g, gt)
