"""The C kernel (``kldiv._ext._fused``) at tiny probabilities and at a peaked row's top entry
(issue 11 leftovers), per row against mpmath (200 bits) on the exact float inputs.

(1) Tiny probabilities as a side. The gradient with respect to a probability y_i of the side
whose probabilities are divided by (q for KL, p for reverse KL, both for Jeffreys) holds
-p_i / q_i, up to 1e33 at a subnormal y_i = 6e-45 against p_i = 1e-12. The kernel formed it
from y_i / max y and p_i / max p (or e^{a_i}), which round to the subnormal grid (or to 0 below
float32's exponential range): 1e-3 .. 6e-2 per row. Such entries now take it in double from the
raw inputs (fused.c ``tiny_q``). Covered: all four kinds (JS divides by no probability and was
right; checked alike), probabilities against probabilities, log-probabilities and logits in
both orders, zeros in the rows, float32 and float64 (subnormal doubles), bfloat16 inputs with
float32-subnormal values and float16 inputs with float16-subnormal ones (those are normal
float32 numbers once widened: coverage only), temperature 0.5 (float64 logarithms there).

(2) The reference entry r (p's top) on peaked rows whose two tops nearly agree while KL is not
small: its gradient (q_r - p_r) g came from a cancelling form (4e-6 .. 8e-6 per row for
Jeffreys at float32 logits of std 20, 4e-6 for forward and reverse KL); now from the masses off
r summed in double (fused.c ``kl_row``, fixr). Checked at 2e-6 per row.

A row's error: max |g - ref| / max |ref| over the row.
"""
from __future__ import annotations

import mpmath
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from kldiv.backends import torch_fast  # noqa: E402
from torch_reference import took_fast  # noqa: E402

pytestmark = pytest.mark.skipif(torch_fast._EXT is None, reason="C extension not built")

FNS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
       "jeffreys": kldiv.jeffreys_div}
PAIRS = [("probs", "probs"), ("probs", "logits"), ("probs", "log_probs"), ("logits", "probs"),
         ("log_probs", "probs")]


# ------------------------------------------------------------------------------------------------
# the reference


def _log_weights(v, space, T):
    """Normalised log-probabilities (mpf; None off the support) of one row of raw values."""
    v = [mpmath.mpf(float(t)) for t in v]
    if space == "probs":
        lv = [mpmath.log(t) if t > 0 else None for t in v]
    else:
        lv = [None if t == mpmath.ninf else t for t in v]
    a = [None if u is None else u / T for u in lv]
    z = mpmath.log(mpmath.fsum(mpmath.exp(u) for u in a if u is not None))
    return [None if u is None else u - z for u in a]


def _to_input(lw, g, raw, space, T):
    """The gradient with respect to the raw inputs from dF/dw (w free): through the softmax,
    w_i (g_i - E_w g) / T per log-space input; / x_i for a probability (0 off the support)."""
    w = [0 if u is None else mpmath.exp(u) for u in lw]
    eg = mpmath.fsum(wi * gi for wi, gi in zip(w, g) if wi != 0)
    out = []
    for wi, gi, r in zip(w, g, raw):
        v = 0 if wi == 0 else wi * (gi - eg) / T
        if wi != 0 and space == "probs":
            v = v / mpmath.mpf(float(r))
        out.append(float(v))
    return out


def mp_row(kind, x, y, ps, qs, T=1.0, beta=0.5):
    """The divergence of one row and its gradients with respect to x and y, from the partial
    derivatives in the normalised weights (KL(a || b): d/da_i = log(a_i / b_i) + 1,
    d/db_i = -a_i / b_i; JS: d/dp_i = beta log(p_i / m_i), its mirror for q)."""
    with mpmath.workprec(200):
        T = mpmath.mpf(T)
        lp, lq = _log_weights(x, ps, T), _log_weights(y, qs, T)
        P = [0 if u is None else mpmath.exp(u) for u in lp]
        Q = [0 if u is None else mpmath.exp(u) for u in lq]

        def kl(la, lb, A, B):
            val = mpmath.fsum(a * (u - w) for a, u, w in zip(A, la, lb) if a != 0)
            ga = [u - w if a != 0 else 0 for a, u, w in zip(A, la, lb)]
            gb = [-a / b if a != 0 else 0 for a, b in zip(A, B)]
            return val, ga, gb

        if kind == "forward":
            val, gp, gq = kl(lp, lq, P, Q)
        elif kind == "reverse":
            val, gq, gp = kl(lq, lp, Q, P)
        elif kind == "jeffreys":
            v1, a1, b1 = kl(lp, lq, P, Q)
            v2, b2, a2 = kl(lq, lp, Q, P)
            val = v1 + v2
            gp = [u + w for u, w in zip(a1, a2)]
            gq = [u + w for u, w in zip(b1, b2)]
        else:
            b = mpmath.mpf(beta)
            lm = [mpmath.log(b * p + (1 - b) * q) if p + q != 0 else None for p, q in zip(P, Q)]
            val = (b * mpmath.fsum(p * (u - m) for p, u, m in zip(P, lp, lm) if p != 0)
                   + (1 - b) * mpmath.fsum(q * (u - m) for q, u, m in zip(Q, lq, lm) if q != 0))
            gp = [b * (u - m) if p != 0 else 0 for p, u, m in zip(P, lp, lm)]
            gq = [(1 - b) * (u - m) if q != 0 else 0 for q, u, m in zip(Q, lq, lm)]
        return float(val), _to_input(lp, gp, x, ps, T), _to_input(lq, gq, y, qs, T)


def test_reference_on_a_textbook_row():
    """The reference against torch.autograd on the float64 textbook formula (a tame row)."""
    from torch_reference import naive_row

    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    b = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)
    for kind, nk in (("forward", "forward"), ("reverse", "reverse"), ("jeffreys", "jeffreys"),
                     ("js", "js")):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        v = naive_row(nk, x, y, "probs", "logits", 0.7)
        gx, gy = torch.autograd.grad(v, (x, y))
        val, rx, ry = mp_row(kind, a.tolist(), b.tolist(), "probs", "logits", 0.7)
        assert abs(val - float(v.detach())) <= 1e-13
        assert torch.allclose(gx, torch.tensor(rx, dtype=torch.float64), rtol=1e-12, atol=1e-14)
        assert torch.allclose(gy, torch.tensor(ry, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def _row_err(g, ref):
    ref = torch.tensor(ref, dtype=torch.float64)
    return float((g.double() - ref).abs().max() / max(float(ref.abs().max()), 1e-300))


def _check(kind, a, b, ps, qs, T=1.0, tol=1e-5, vtol=2e-6):
    """Values and both gradients per row through the kernel, against mp_row."""
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    v = FNS[kind](x, y, p_space=ps, q_space=qs, temperature=T, reduction="none")
    assert took_fast(v), (kind, ps, qs)
    v.sum().backward()
    worst = 0.0
    for r in range(a.shape[0]):
        val, gx, gy = mp_row(kind, a[r].tolist(), b[r].tolist(), ps, qs, T)
        assert abs(float(v[r]) - val) <= vtol * abs(val), (kind, ps, qs, r, float(v[r]), val)
        ex, ey = _row_err(x.grad[r], gx), _row_err(y.grad[r], gy)
        assert ex <= tol and ey <= tol, (kind, ps, qs, T, r, ex, ey)
        worst = max(worst, ex, ey)
    return worst


# ------------------------------------------------------------------------------------------------
# (1) tiny probabilities

# per row: (entry, p there, q there); gradients up to ~1e33 (float32), within each type's range
TINY = {
    torch.float32: [[(1, 6e-45, 1e-20), (5, 2e-12, 3e-44)],
                    [(2, 1e-40, 1e-15), (6, 1e-25, 8e-42)],
                    [(3, 1.4e-45, 1e-14), (0, 4e-44, 5e-44)],
                    [(0, 3e-39, 7e-30), (4, 1e-36, 2.5e-39)]],
    torch.bfloat16: [[(1, 1e-39, 1e-20), (5, 2e-12, 3e-40)],
                     [(2, 1e-40, 1e-15), (6, 1e-25, 8e-41)],
                     [(3, 9.2e-41, 1e-14), (0, 4e-40, 5e-40)],
                     [(0, 3e-39, 7e-30), (4, 1e-36, 2.5e-39)]],
    torch.float16: [[(1, 6e-8, 1e-4), (5, 2e-4, 3e-7)],
                    [(2, 1e-7, 1e-5), (6, 1e-5, 8e-8)],
                    [(3, 6e-8, 4e-5), (0, 4e-7, 5e-7)],
                    [(0, 3e-6, 7e-6), (4, 1e-6, 2.5e-7)]],
    torch.float64: [[(1, 5e-324, 1e-200), (5, 2e-12, 3e-320)],
                    [(2, 1e-310, 1e-15), (6, 1e-25, 8e-312)],
                    [(3, 1e-315, 1e-300), (0, 4e-322, 5e-322)],
                    [(0, 3e-309, 7e-300), (4, 1e-306, 2.5e-309)]],
}


def _tiny_pair(dt, seed=1, V=8):
    """Four rows of p and q (float64) with the tiny entries above, a common zero in rows 0 and
    2 (their log-space form: -inf), each renormalised on its largest entry."""
    g = torch.Generator().manual_seed(seed)
    std = 1.0 if dt == torch.float16 else 3.0  # float16: gradients within its 65504
    P, Q = torch.randn(2, 4, V, dtype=torch.float64, generator=g).mul(std).softmax(-1)
    for r, row in enumerate(TINY[dt]):
        for j, pv, qv in row:
            P[r, j], Q[r, j] = pv, qv
    P[0, 7] = Q[0, 7] = P[2, 6] = Q[2, 6] = 0.0
    for M in (P, Q):
        M[torch.arange(4), M.argmax(-1)] += 1 - M.sum(-1)
    return P, Q


def _side(M, space, dt):
    if space == "probs":
        return M.to(dt)
    lm = M.log()
    return (lm + 2.0 if space == "logits" else lm).to(dt)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys", "js"])
@pytest.mark.parametrize("ps,qs", PAIRS)
def test_tiny_probabilities_float32(kind, ps, qs):
    P, Q = _tiny_pair(torch.float32)
    a, b = _side(P, ps, torch.float32), _side(Q, qs, torch.float32)
    if ps == "probs":
        assert bool(((a > 0) & (a < 1.2e-38)).any())  # float32 subnormals really in the input
    _check(kind, a, b, ps, qs)


@pytest.mark.parametrize("dt", [torch.float64, torch.bfloat16, torch.float16])
def test_tiny_probabilities_other_dtypes(dt):
    """float64 (the double kernel: subnormal doubles) to 1e-12 per row; bfloat16 (float32
    subnormals after widening) and float16 inputs to the rounding of their gradient's dtype
    (the kernel runs in float32 and returns the input's dtype)."""
    tol = 1e-12 if dt == torch.float64 else 0.55 * torch.finfo(dt).eps + 1e-5
    P, Q = _tiny_pair(dt)
    for kind in FNS:
        for ps, qs in PAIRS:
            _check(kind, _side(P, ps, dt), _side(Q, qs, dt), ps, qs, tol=tol,
                   vtol=2e-6 if dt != torch.float64 else 1e-12)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys"])
def test_tiny_probabilities_at_a_temperature(kind):
    P, Q = _tiny_pair(torch.float32, seed=2)
    for ps, qs in (("probs", "logits"), ("logits", "probs")):
        _check(kind, _side(P, ps, torch.float32), _side(Q, qs, torch.float32), ps, qs, T=0.5)


def test_tiny_probabilities_many_rows_threads():
    """A batch large enough for the kernel's threads (n V >= 2^15), tiny entries in some rows
    (four of them checked)."""
    g = torch.Generator().manual_seed(7)
    n, V = 128, 260
    P, Q = torch.randn(2, n, V, dtype=torch.float64, generator=g).mul(2.0).softmax(-1)
    for r in range(0, n, 5):
        j = (r * 37) % V
        P[r, j], Q[r, j] = 1e-20 * (1 + r), 3e-44 * (1 + r % 7)
    for M in (P, Q):
        M[torch.arange(n), M.argmax(-1)] += 1 - M.sum(-1)
    a, b = P.float(), Q.float()
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    v = kldiv.jeffreys_div(x, y, p_space="probs", q_space="probs", reduction="sum")
    assert took_fast(v)
    v.backward()
    for r in (0, 45, 80, 125):
        _, gx, gy = mp_row("jeffreys", a[r].tolist(), b[r].tolist(), "probs", "probs")
        assert _row_err(x.grad[r], gx) <= 1e-5 and _row_err(y.grad[r], gy) <= 1e-5, r


# ------------------------------------------------------------------------------------------------
# (2) the reference entry on peaked rows


def _std20(ps, seed=0, n=300, V=40, std=20.0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, n, V, dtype=torch.float64, generator=g) * std
    if ps == "log_probs":
        a = a.log_softmax(-1)
    return a.float(), b.float()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys"])
def test_peaked_rows_top_entry(kind):
    """log-probabilities against logits of std 20 (the audit's rows): rows 250 and 285 of this
    seed were 4.1e-6 / 3.7e-6 per row (reference entry), with a few ordinary rows."""
    a, b = _std20("log_probs")
    idx = [250, 285, 288, 36, 0, 1]
    worst = _check(kind, a[idx], b[idx], "log_probs", "logits", tol=2e-6)
    assert worst <= 2e-6


@pytest.mark.parametrize("ps,qs", [("logits", "logits"), ("probs", "logits"),
                                   ("log_probs", "probs"), ("probs", "probs")])
def test_peaked_rows_jeffreys_spaces(ps, qs):
    """Jeffreys at std 20 in other spaces (probabilities kept within float32's normal range).
    Probabilities on both sides: 1e-5 (2.6e-6 measured: the log-ratio of two float32
    probabilities more than a factor 2 apart comes from float32 logarithms, an ulp of |log p|,
    which a gradient -p_i / q_i of 4e27 carries in full)."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(2, 12, 40, dtype=torch.float64, generator=g) * 20).clamp(-38, 38)

    def side(z, sp):
        return (z.softmax(-1) if sp == "probs" else z.log_softmax(-1) if sp == "log_probs"
                else z).float()

    _check("jeffreys", side(a, ps), side(b, qs), ps, qs,
           tol=1e-5 if ps == qs == "probs" else 2e-6)
