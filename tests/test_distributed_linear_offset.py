"""The fused output layer on close rows offset by a constant: both paths exact on their logits.

``kd.vocab_parallel_linear_kl_div`` and the single-process ``linear_kl_div`` differ by 1e-5 to
1e-4 relative on a close float32 row (KL 5e-9, teacher = student logits + offset + 1e-4 noise):
each rank's matmul ``h @ W_r.T`` rounds the logits differently from the full ``h @ W.T``, and
at KL 5e-9 a logit's rounding (1e-7 against log-ratios of 1e-4) moves the value by ~1e-3
relative: both paths are that far from the value on the exact logits. What each path adds must
be rounding of its own: value and gradient with respect to ``hidden`` per row against 40-digit
mpmath on the logits that path formed (float32 within 1e-6 and 5e-6, float64 1e-13 and 5e-13).
The sharded path runs in one process on simulated ranks (threads, see test_distributed_huge).
"""
from __future__ import annotations

import mpmath
import pytest
import torch

import kldiv.distributed as kd
from kldiv.distributed import _rows, layer
from kldiv.torch import linear_kl_div
from test_distributed_huge import KINDS, _Ranks

H, V, CUT = 48, 30, 13
TOL = {torch.float32: 1e-6, torch.float64: 1e-13}


def close_rows(dtype, offset, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) / 8).to(dtype)
    z = h.double() @ W.double().T
    t = (z + offset + 1e-4 * torch.randn(n, V, generator=g, dtype=torch.float64)).to(dtype)
    return h, W, t


def mp_ref(kind, a, b, beta=0.5):
    """(value, d value / d b) of ``kind`` between logits a (p) and b (q), 40 digits (the
    logits here are moderate: no extra precision needed)."""
    with mpmath.workdps(40):
        def lsm(x):
            x = [mpmath.mpf(float(v)) for v in x]
            m = max(x)
            lse = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in x))
            return [v - lse for v in x]

        lp, lq = lsm(a), lsm(b)
        p, q = [mpmath.exp(v) for v in lp], [mpmath.exp(v) for v in lq]
        r = [x - y for x, y in zip(lp, lq)]  # log p / q
        n = len(p)
        if kind == "forward":
            F, G = mpmath.fsum(p[i] * r[i] for i in range(n)), [-p[i] for i in range(n)]
        elif kind == "reverse":
            F = -mpmath.fsum(q[i] * r[i] for i in range(n))
            G = [-q[i] * r[i] for i in range(n)]
        elif kind == "jeffreys":
            F = mpmath.fsum((p[i] - q[i]) * r[i] for i in range(n))
            G = [-q[i] * r[i] - p[i] + q[i] for i in range(n)]
        else:
            lm = [mpmath.log(beta * p[i] + (1 - beta) * q[i]) for i in range(n)]
            F = mpmath.fsum(beta * p[i] * (lp[i] - lm[i]) + (1 - beta) * q[i] * (lq[i] - lm[i])
                            for i in range(n))
            G = [(1 - beta) * q[i] * (lq[i] - lm[i]) for i in range(n)]
        sg = mpmath.fsum(G)  # d/db_j of a function of q = softmax(b): G_j - q_j sum(G)
        return float(F), [float(G[j] - q[j] * sg) for j in range(n)]


def check_values(kind, t, z, vals, tol):
    """Each row's value against mpmath on the logits ``z`` the path formed."""
    for r in range(t.shape[0]):
        vr = mp_ref(kind, t[r].tolist(), z[r].tolist())[0]
        assert abs(float(vals[r]) - vr) <= tol * vr, (kind, r, float(vals[r]), vr)


def check_grads(kind, t, z, gh, W, tol):
    """Each row's d/d hidden against mpmath's d/d logits (on the logits ``z``) times W."""
    for r in range(t.shape[0]):
        gz = mp_ref(kind, t[r].tolist(), z[r].tolist())[1]
        ref = torch.tensor(gz, dtype=torch.float64) @ W.double()
        err = float((gh[r].double() - ref).norm() / ref.norm())
        assert err <= 5 * tol, (kind, r, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sharded_layer_exact_on_its_logits(dtype, monkeypatch):
    h, W, t = close_rows(dtype, 8.0)
    ranks = _Ranks(2)
    monkeypatch.setattr(kd.vocab_parallel, "_DELEGATE_LOCAL", False)
    monkeypatch.setattr(_rows, "_all_reduce", ranks.all_reduce)
    monkeypatch.setattr(layer, "_all_reduce", ranks.all_reduce)
    cuts = [slice(0, CUT), slice(CUT, V)]

    def one(rank, kind):
        Ws, ts = W[cuts[rank]], t[:, cuts[rank]]
        with torch.no_grad():  # per row (a chunk of one row: the logits h_r @ Ws.T)
            vals = [kd.vocab_parallel_linear_kl_div(h[r:r + 1], Ws, ts[r:r + 1], kind=kind,
                                                    reduction="sum") for r in range(len(h))]
        hh = h.clone().requires_grad_()  # all rows in one chunk: the logits h @ Ws.T
        gh, = torch.autograd.grad(kd.vocab_parallel_linear_kl_div(hh, Ws, ts, kind=kind,
                                                                  reduction="sum"), hh)
        return torch.stack(vals), gh

    for kind in KINDS:
        out = ranks.run(one, [(kind,), (kind,)])
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
        z_rows = torch.cat([torch.cat([h[r:r + 1] @ W[c].T for c in cuts], 1)
                            for r in range(len(h))])
        check_values(kind, t, z_rows, out[0][0], TOL[dtype])
        check_grads(kind, t, torch.cat([h @ W[c].T for c in cuts], 1), out[0][1], W,
                    TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_process_layer_exact_on_its_logits(dtype):
    h, W, t = close_rows(dtype, 8.0, seed=2)
    for kind in ("forward", "reverse", "js"):
        with torch.no_grad():
            vals = [linear_kl_div(h[r:r + 1], W, t[r:r + 1], divergence=kind, reduction="sum")
                    for r in range(len(h))]
        hh = h.clone().requires_grad_()
        gh, = torch.autograd.grad(linear_kl_div(hh, W, t, divergence=kind, reduction="sum"), hh)
        check_values(kind, t, torch.cat([h[r:r + 1] @ W.T for r in range(len(h))]), vals,
                     TOL[dtype])
        check_grads(kind, t, h @ W.T, gh, W, TOL[dtype])
