"""The float32 kernel's JS passes (fused.c: passjt, log_mix3) and its one-call Jeffreys kind.

JS in float32 runs in float on tame rows: split at the mean log-ratio near it (|E d| <= 1, beta
in [0.2, 0.8]; one logarithm per entry where both mixture weights are >= 1/4), and farther out
(any beta, any support) the log-ratios to the mixture less their values off the support,
y - log(beta) and z - log(1 - beta) (one logarithm per entry); double elsewhere (risky rows,
near rows with beta outside [0.2, 0.8], rows whose centred differences would lose more than ~5
bits in float). Each route against the float64 core on the same float32 inputs (the truth here): values within 3x the float32 core's own error (or below float
rounding), per-row gradients within 1e-5 on every row, far ones included.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from torch_reference import core_only, took_fast  # noqa: E402


def _value_and_grads(fn, a, b, **kw):
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    v = fn(a1, b1, reduction="none", **kw)
    ga, gb = torch.autograd.grad(v.sum(), (a1, b1))
    return v, ga, gb


def _row_err(g, gt):
    g, gt = g.double(), gt.double()
    top = gt.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    num = ((g - gt) / top).norm(dim=-1)
    den = (gt / top).norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), num)


def _rows(rng, V=50):
    """Logits rows: near convergence at several levels, far apart, and with support mismatch
    (-inf entries on one side or both) near and far from convergence."""
    x = rng.standard_normal((10, V)) * 2
    y = x.copy()
    for r, eps in enumerate((1e-1, 1e-2, 1e-4, 1e-6)):
        y[r] = x[r] + rng.standard_normal(V) * eps
    y[4] = rng.standard_normal(V) * 3  # far
    y[5] = x[5] + 4.0 * rng.standard_normal(V)  # far, a large mean log-ratio
    y[6] = x[6] + rng.standard_normal(V) * 1e-4
    y[6, :3] = -math.inf  # q lacks some of p's support, otherwise close
    y[7] = x[7] + rng.standard_normal(V) * 1e-3
    x[7, 5:8] = -math.inf  # p lacks some of q's support
    y[8] = x[8] + rng.standard_normal(V) * 1e-5
    x[8, 0] = -math.inf
    y[8, 1] = -math.inf  # both
    y[9] = x[9] - 30.0 * (np.arange(V) % 2) + rng.standard_normal(V) * 0.1  # half 30 nats off
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


@pytest.mark.parametrize("beta", [0.5, 0.3, 0.2, 0.8, 0.01, 0.99, 1e-5])
@pytest.mark.parametrize("T", [1.0, 0.5])
def test_float32_js_routes_match_the_float64_core(beta, T):
    a, b = _rows(np.random.default_rng([int(beta * 1e5), int(T * 10)]))
    kw = dict(p_space="logits", q_space="logits", beta=beta, temperature=T)
    v, ga, gb = _value_and_grads(kldiv.js_div, a, b, **kw)
    assert took_fast(v)
    with core_only():
        vc, _, _ = _value_and_grads(kldiv.js_div, a, b, **kw)
        vt, gat, gbt = _value_and_grads(kldiv.js_div, a.double(), b.double(), **kw)
    err = ((v.double() - vt) / vt).abs()
    err_c = ((vc.double() - vt) / vt).abs()
    assert bool((err <= torch.clamp(3 * err_c, min=2e-6)).all()), (err, err_c)
    # gradients: within 1e-5 per row of the float64 reference on every row, far ones included
    # (JS near its log 2 bound: the kernel carries y - log(beta) and z - log(1 - beta) there,
    # whose centred differences do not cancel; see tests/test_fused_far.py)
    for g, gt in ((ga, gat), (gb, gbt)):
        e = _row_err(g, gt)
        assert float(e.max()) <= 1e-5, e


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_jeffreys_one_call_rows_with_an_infinite_direction(dt):
    """One kernel call for both directions: a row where only one direction is +inf is +inf with
    zero gradients (the core's convention); the other rows equal the core's."""
    rng = np.random.default_rng(3)
    a = torch.tensor(rng.standard_normal((6, 20)), dtype=dt)
    b = a + torch.tensor(rng.standard_normal((6, 20)) * 0.3, dtype=dt)
    b[1, 4] = -math.inf  # p > 0 = q: KL(p || q) = inf, KL(q || p) finite
    a[3, 7] = -math.inf  # the mirror
    for red in ("none", "sum"):
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        v = kldiv.jeffreys_div(a1, b1, p_space="logits", q_space="logits", reduction=red)
        assert took_fast(v)
        ga, gb = torch.autograd.grad(v.sum(), (a1, b1))
        with core_only():
            vc, gac, gbc = _value_and_grads(kldiv.jeffreys_div, a, b, p_space="logits",
                                            q_space="logits")
        if red == "none":
            assert torch.isinf(v[1]) and torch.isinf(v[3])
            fin = torch.isfinite(vc)
            torch.testing.assert_close(v[fin], vc[fin], rtol=1e-5 if dt == torch.float32
                                       else 1e-12, atol=0)
        else:
            assert math.isinf(float(v))
        for g, gc in ((ga, gac), (gb, gbc)):
            assert bool((g[1] == 0).all()) and bool((g[3] == 0).all())
            torch.testing.assert_close(g, gc, rtol=1e-4 if dt == torch.float32 else 1e-10,
                                       atol=1e-6 if dt == torch.float32 else 1e-12)
