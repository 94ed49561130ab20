"""Short rows (V = 1 .. 16) through the C kernel (float32), against the float64 textbook formula.

At small V a row's constants (the exponential of its offset, log1p of the series' sum, expm1 and
exp of -KL) weigh as much as its entries; the float kernel takes them by inline double functions
(no libm call per row). Each row here is checked on its own, value and gradients with respect to
both inputs, against ``torch_reference.naive_row`` in float64 differentiated by torch.autograd
(independent of kldiv's algebra): masks of -inf, -1e30 and finfo.min, logits of 3e38, subnormal
probabilities, temperatures 1e-3 .. 20, all four kinds, the migration row (probabilities against
log-probabilities) and logits against logits.
"""
from __future__ import annotations

import math

import pytest
import torch

import kldiv
from torch_reference import naive_row, took_fast

F32 = torch.finfo(torch.float32)
KINDS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}


def _rows(V, gen):
    """Adversarial logit rows (float32) of width V: pairs (teacher, student)."""
    out = []
    for k in range(10):
        a = torch.randn(V, generator=gen, dtype=torch.float64) * (1 + 3 * (k % 3))
        b = a + torch.randn(V, generator=gen, dtype=torch.float64) * (10.0 ** -(k % 4))
        out.append((a, b))
    a = torch.randn(V, generator=gen, dtype=torch.float64)
    out.append((a + 3e38 - 3e38 * (torch.arange(V) % 2), a.clone()))  # huge logits on one side
    if V > 1:
        for mask in (-math.inf, -1e30, F32.min):
            a = torch.randn(V, generator=gen, dtype=torch.float64)
            b = torch.randn(V, generator=gen, dtype=torch.float64)
            a2, b2 = a.clone(), b.clone()
            a2[0] = mask
            b2[0] = mask  # masked on both sides: finite
            out.append((a2, b2))
            a3 = a.clone()
            a3[V - 1] = mask  # masked on p's side only: finite
            out.append((a3, b))
        # p's entry of e^-100 against q's e^-1: a subnormal probability in float32
        a = torch.zeros(V, dtype=torch.float64)
        a[0] = 100.0
        out.append((a, -a / 100))
    return [(x.float(), y.float()) for x, y in out]


def _check(kind, x, y, ps, qs, T, beta=0.5):
    fn = KINDS[kind]
    xs = x.clone().requires_grad_(True)
    ys = y.clone().requires_grad_(True)
    kw = {"beta": beta} if kind == "js" else {}
    rows = fn(xs, ys, p_space=ps, q_space=qs, temperature=T, reduction="none", **kw)
    if 1 / 64 <= T <= 64:  # the fast path's range: the C kernel ran
        assert took_fast(rows)
    w = torch.linspace(0.5, 1.5, x.shape[0], dtype=torch.float32)
    (rows * w).sum().backward()
    for r in range(x.shape[0]):
        a = x[r].double().requires_grad_(True)
        b = y[r].double().requires_grad_(True)
        ref = naive_row(kind, a, b, ps, qs, T, beta)
        got = float(rows[r].detach())
        ref_v = float(ref.detach())
        if not math.isfinite(ref_v):
            assert got == ref_v, (kind, r, got, ref_v)
            continue
        assert abs(got - ref_v) <= 2e-5 * abs(ref_v) + 1e-6, (kind, ps, T, r, got, ref_v)
        ga, gb = torch.autograd.grad(ref * float(w[r]), (a, b), allow_unused=True)
        for g, gref, name in ((xs.grad[r], ga, "p"), (ys.grad[r], gb, "q")):
            gref = torch.zeros_like(g, dtype=torch.float64) if gref is None else gref
            gref = torch.nan_to_num(gref, nan=0.0)
            scale = float(gref.abs().max())
            if scale > F32.max / 4:  # beyond float32's range: inf is the float32 answer
                continue
            err = float((g.double() - gref).abs().max())
            assert err <= 1e-4 * scale + 1e-6, (kind, ps, T, r, name, err, scale)


@pytest.mark.parametrize("V", [1, 2, 3, 5, 8, 10, 13, 16])
def test_short_rows_logits(V):
    gen = torch.Generator().manual_seed(1000 + V)
    pairs = _rows(V, gen)
    x = torch.stack([a for a, _ in pairs])
    y = torch.stack([b for _, b in pairs])
    for kind in KINDS:
        for T in ((1e-3, 0.5, 1.0, 20.0) if kind == "forward" else (0.5, 1.0) if V % 2
                  else (1.0, 20.0)):
            keep = torch.ones(x.shape[0], dtype=torch.bool)
            if T != 1.0 or kind == "js":
                # rows of 3e38 / T overflow float64's softmax in the reference itself
                keep = (x.abs().amax(-1) < 1e37) & (y.abs().amax(-1) < 1e37)
            _check(kind, x[keep], y[keep], "logits", "logits", T)


@pytest.mark.parametrize("V", [1, 2, 7, 10, 16])
def test_short_rows_migration(V):
    """Probabilities against log-probabilities (the migration row), subnormal ones included."""
    gen = torch.Generator().manual_seed(2000 + V)
    pairs = [(a, b) for a, b in _rows(V, gen) if a.abs().max() < 1e29 and b.abs().max() < 1e29]
    a = torch.stack([p for p, _ in pairs]).double()
    b = torch.stack([q for _, q in pairs]).double()
    p = torch.softmax(a, -1).float()
    lq = torch.log_softmax(b, -1).float()
    for kind in ("forward", "reverse", "jeffreys"):
        keep = (p > 0).all(-1) if kind != "forward" else torch.ones(p.shape[0], dtype=torch.bool)
        _check(kind, p[keep], lq[keep], "probs", "log_probs", 1.0)
