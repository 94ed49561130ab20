"""float32 second derivatives of the torch default path on peaked rows (audit 3 F5).

A side whose top probability rounds to 1 in float32 (logit gaps of ~17 T and more) has its largest
Hessian entries at that mode, of size p_top (1 - p_top) / T^2. Forming them from 1 - p_top gave 0
(per-block relative error 1). Reference: the Hessian in mpmath at 60 digits on the exact float32
inputs, by the chain rule through the log-softmax (independent of kldiv's algebra; checked here
against torch.autograd on the float64 textbook formula of tests/torch_reference.py on mild rows,
where float64 is exact enough). Error measure: per block (pp, pq, qp, qq), max |H - H_ref| over
the block's max |H_ref|.
"""
from __future__ import annotations

import mpmath as mp
import pytest
import torch

import kldiv
from torch_reference import naive_row

FUNCS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}
KINDS = tuple(FUNCS)
TOL = 2e-5


def _mp_hessian(kind, a, b, T, beta=0.5):
    """(2V, 2V) Hessian of the divergence w.r.t. the logits (a, b), mpmath at 60 digits.

    With l = log_softmax(x / T): dl_i/dx_j = (delta_ij - p_j) / T and
    d2 l_i / dx_j dx_k = -(p_j delta_jk - p_j p_k) / T^2 (the same for every i), so for
    F(l_p, l_q): H_aa = J_p' F_pp J_p - (sum_i dF/dl_p_i) (diag p - p p') / T^2,
    H_ab = J_p' F_pq J_q, and likewise for b. F's derivatives in l (all diagonal):
    KL(p||q) = sum e^lp (lp - lq); JS = sum beta p lp + (1 - beta) q lq - m log m.
    """
    with mp.workdps(60):
        V = len(a)
        T = mp.mpf(T)
        beta = mp.mpf(beta)

        def lsm(x):
            x = [mp.mpf(float(v)) / T for v in x]
            m = max(x)
            z = m + mp.log(mp.fsum(mp.exp(v - m) for v in x))
            return [v - z for v in x]

        lp, lq = lsm(a), lsm(b)
        p = [mp.exp(v) for v in lp]
        q = [mp.exp(v) for v in lq]
        zero = [mp.mpf(0)] * V
        # first and (diagonal) second derivatives of F in (lp, lq)
        if kind in ("forward", "reverse", "jeffreys"):
            def kl_parts(l1, l2, w1):   # KL(1 || 2): d/dl1, d/dl2, d2/dl1^2, d2/dl1dl2, d2/dl2^2
                g1 = [w * (x - y + 1) for w, x, y in zip(w1, l1, l2)]
                g2 = [-w for w in w1]
                h11 = [w * (x - y + 2) for w, x, y in zip(w1, l1, l2)]
                h12 = [-w for w in w1]
                return g1, g2, h11, h12, zero
            gp, gq, hpp, hpq, hqq = [zero] * 5
            if kind in ("forward", "jeffreys"):
                g1, g2, h11, h12, h22 = kl_parts(lp, lq, p)
                gp, gq, hpp, hpq, hqq = g1, g2, h11, h12, h22
            if kind in ("reverse", "jeffreys"):
                g1, g2, h11, h12, h22 = kl_parts(lq, lp, q)
                gp = [u + v for u, v in zip(gp, g2)]
                gq = [u + v for u, v in zip(gq, g1)]
                hpp = [u + v for u, v in zip(hpp, h22)]
                hpq = [u + v for u, v in zip(hpq, h12)]
                hqq = [u + v for u, v in zip(hqq, h11)]
        else:
            m = [beta * u + (1 - beta) * v for u, v in zip(p, q)]
            lm = [mp.log(v) for v in m]
            gp = [beta * u * (x - y) for u, x, y in zip(p, lp, lm)]
            gq = [(1 - beta) * v * (x - y) for v, x, y in zip(q, lq, lm)]
            hpp = [g + beta * u * (1 - beta * u / w) for g, u, w in zip(gp, p, m)]
            hpq = [-beta * (1 - beta) * u * v / w for u, v, w in zip(p, q, m)]
            hqq = [g + (1 - beta) * v * (1 - (1 - beta) * v / w) for g, v, w in zip(gq, q, m)]

        def jac(w):   # J[i][j] = (delta_ij - w_j) / T, with 1 - w_i as the sum of the others
            return [[(mp.fsum(w[k] for k in range(V) if k != i) if i == j else -w[j]) / T
                     for j in range(V)] for i in range(V)]

        def curv(w, g):   # -(sum g) (diag w - w w') / T^2, diag as w_i times the others' sum
            sg = mp.fsum(g)
            return [[-sg * (w[i] * mp.fsum(w[k] for k in range(V) if k != i) if i == j
                            else -w[i] * w[j]) / T ** 2 for j in range(V)] for i in range(V)]

        Jp, Jq = jac(p), jac(q)
        Cp, Cq = curv(p, gp), curv(q, gq)

        def block(J1, h, J2, C):   # J1' diag(h) J2 + C
            return [[mp.fsum(J1[k][i] * h[k] * J2[k][j] for k in range(V)) + (C[i][j] if C else 0)
                     for j in range(V)] for i in range(V)]

        Hpp = block(Jp, hpp, Jp, Cp)
        Hpq = block(Jp, hpq, Jq, None)
        Hqq = block(Jq, hqq, Jq, Cq)
        H = [[float(v) for v in Hpp[i]] + [float(v) for v in Hpq[i]] for i in range(V)]
        H += [[float(Hpq[j][i]) for j in range(V)] + [float(v) for v in Hqq[i]] for i in range(V)]
        return torch.tensor(H, dtype=torch.float64)


def _hessian(kind, a, b, T):
    """Hessian of the summed divergence of one (1, V) row pair, by torch.autograd: (2V, 2V)."""
    f = lambda x, y: FUNCS[kind](x, y, p_space="logits", q_space="logits", temperature=T,
                                 reduction="sum")
    H = torch.autograd.functional.hessian(f, (a, b))
    V = a.shape[-1]
    return torch.cat([torch.cat([H[i][j].reshape(V, V) for j in range(2)], 1)
                      for i in range(2)], 0).double()


def _block_errors(H, R):
    V = H.shape[0] // 2
    out = []
    for i in range(2):
        for j in range(2):
            h = H[i * V:(i + 1) * V, j * V:(j + 1) * V]
            r = R[i * V:(i + 1) * V, j * V:(j + 1) * V]
            out.append(((h - r).abs().max() / r.abs().max()).item())
    return out


def _peaked_rows():
    """The audit's row and random peaked float32 rows (V = 4..8, logits of std 5..30)."""
    rows = [([20.0, 0.0, 0.0, 3.0], [0.0, 20.0, 0.0, -5.0], 1.0),
            ([20.0, 0.0, 0.0, 3.0], [0.0, 20.0, 0.0, -5.0], 0.5),
            ([20.0, 0.0, 0.0, 3.0], [0.0, 20.0, 0.0, -5.0], 2.0)]
    g = torch.Generator().manual_seed(5)
    for k in range(6):
        V = 4 + k % 5
        std = (5.0, 12.0, 20.0, 30.0, 16.0, 25.0)[k]
        T = (0.5, 1.0, 2.0)[k % 3]
        a = torch.randn(V, generator=g, dtype=torch.float64) * std
        b = torch.randn(V, generator=g, dtype=torch.float64) * std
        if k % 2:   # overlapping peaks: the same mode on both sides
            b = a + torch.randn(V, generator=g, dtype=torch.float64) * 2
        rows.append((a.float().tolist(), b.float().tolist(), T))
    return rows


ROWS = _peaked_rows()


def test_reference_matches_float64_autograd():
    """The mpmath Hessian equals float64 autograd of the textbook formula on mild rows."""
    a = [1.5, -0.5, 0.25, 2.0, -1.0]
    b = [0.5, 1.0, -2.0, 0.75, 0.0]
    A = torch.tensor([a], dtype=torch.float64)
    B = torch.tensor([b], dtype=torch.float64)
    for kind in KINDS:
        for T in (0.7, 1.0):
            H = torch.autograd.functional.hessian(
                lambda x, y: naive_row(kind, x[0], y[0], "logits", "logits", T), (A, B))
            H = torch.cat([torch.cat([H[i][j].reshape(5, 5) for j in range(2)], 1)
                           for i in range(2)], 0)
            assert max(_block_errors(H, _mp_hessian(kind, a, b, T))) < 1e-12, (kind, T)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_hessian_peaked_rows(kind):
    bad = []
    for a, b, T in ROWS:
        A = torch.tensor([a], dtype=torch.float32)
        B = torch.tensor([b], dtype=torch.float32)
        errs = _block_errors(_hessian(kind, A, B, T), _mp_hessian(kind, a, b, T))
        if max(errs) > TOL:
            bad.append((a, b, T, ["%.1e" % e for e in errs]))
    assert not bad, bad


@pytest.mark.parametrize("kind", KINDS)
def test_float32_hvp_create_graph(kind):
    """A Hessian-vector product by double backward (create_graph), as TRPO / natural-gradient
    code forms it, on the audit's row: per side against the mpmath Hessian times the vector."""
    a, b = [20.0, 0.0, 0.0, 3.0], [0.0, 20.0, 0.0, -5.0]
    R = _mp_hessian(kind, a, b, 1.0)
    v = torch.tensor([[0.5, -1.0, 0.25, 2.0]])
    w = torch.tensor([[1.0, 0.5, -0.75, -1.5]])
    A = torch.tensor([a], requires_grad=True)
    B = torch.tensor([b], requires_grad=True)
    val = FUNCS[kind](A, B, p_space="logits", q_space="logits", reduction="sum")
    ga, gb = torch.autograd.grad(val, (A, B), create_graph=True)
    hv = torch.autograd.grad((ga * v).sum() + (gb * w).sum(), (A, B))
    ref = R @ torch.cat([v[0], w[0]]).double()
    for got, r in ((hv[0][0], ref[:4]), (hv[1][0], ref[4:])):
        assert ((got.double() - r).abs().max() / r.abs().max()).item() < TOL, (kind, got, r)
