"""The torch default path's second derivatives (create_graph) on float32 rows whose log-space
differences leave the float range (#11): logits of +-3e38, and finfo.min masks at T < 1.

The lane's differentiable gradient formulas anchor each side at its mode and difference the
sides there; on these rows that met inf - inf, and the whole Hessian came back nan (the core
was right). Such batches now take the core's derivatives under create_graph
(``torch_fast._core_grads``); the first-order backward is unchanged. Reference: torch.autograd's
Hessian of the float64 textbook formula (tests/torch_reference.py) on the same inputs, which
holds these magnitudes, as tests/test_core_overflow_rows.py's core Hessian test does. JS's
textbook formula is nan in float64 on the +-3e38 rows: there the Hessian must be finite and
equal the core's.
"""
from __future__ import annotations

import pytest
import torch

import kldiv
from test_core_overflow_rows import ROWS
from torch_reference import core_only, naive_row, took_fast

FN = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
      "jeffreys": kldiv.jeffreys_div}
FMIN = float(torch.finfo(torch.float32).min)

CASES = {name: ROWS[name][:2] + (ROWS[name][3],)
         for name in ("spread32", "finite_huge_grad32", "wide_entry32")}
# a masked entry at finfo.min on both sides: (x - max) / T overflows at T = 0.5
CASES["fmin_mask_t05"] = ([0.0, 1.0, FMIN, -0.5], [0.5, 2.0, FMIN, 0.25], 0.5)


def _hessian(kind, x, y, t, fast):
    n = len(x)

    def f(z):
        return FN[kind](z[:n], z[n:], p_space="logits", q_space="logits", temperature=t)

    z = torch.tensor(x + y, dtype=torch.float32)
    if fast:
        v = FN[kind](torch.tensor([x], requires_grad=True), torch.tensor([y]),
                     p_space="logits", q_space="logits", temperature=t)
        assert took_fast(v)
        return torch.autograd.functional.hessian(f, z).double()
    with core_only():
        return torch.autograd.functional.hessian(f, z).double()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", list(FN))
def test_lane_hessian_on_wide_rows(kind, name):
    x, y, t = CASES[name]
    n = len(x)
    H = _hessian(kind, x, y, t, fast=True)
    assert torch.isfinite(H).all(), H
    z = torch.tensor(x + y, dtype=torch.float64)
    R = torch.autograd.functional.hessian(
        lambda w: naive_row(kind, w[:n], w[n:], "logits", "logits", t), z)
    if torch.isfinite(R).all():
        assert float((H - R).abs().max()) <= 1e-5 * float(R.abs().max()), (H, R)
    else:  # (JS on the +-3e38 rows) the core's answer, itself finite
        assert torch.equal(H, _hessian(kind, x, y, t, fast=False))


def test_wide_row_among_ordinary_rows_hvp():
    """A batch holding one wide row and a peaked ordinary row: a Hessian-vector product by
    double backward, per row against float64 autograd of the textbook formula (the ordinary
    row keeps the lane's accuracy through the core)."""
    x0, y0, _ = CASES["wide_entry32"]
    x1, y1 = [20.0, 0.0, 0.0], [0.0, 20.0, -5.0]
    a = torch.tensor([x0, x1], requires_grad=True)
    b = torch.tensor([y0, y1], requires_grad=True)
    v = torch.tensor([[0.5, -1.0, 0.25], [1.0, 0.5, -0.75]])
    w = torch.tensor([[1.0, 0.5, -1.5], [-0.25, 2.0, 0.5]])
    val = kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="sum")
    assert took_fast(val)
    ga, gb = torch.autograd.grad(val, (a, b), create_graph=True)
    ha, hb = torch.autograd.grad((ga * v).sum() + (gb * w).sum(), (a, b))
    for r, (x, y) in enumerate(((x0, y0), (x1, y1))):
        z = torch.tensor(x + y, dtype=torch.float64)
        R = torch.autograd.functional.hessian(
            lambda u: naive_row("forward", u[:3], u[3:], "logits", "logits", 1.0), z)
        ref = R @ torch.cat([v[r], w[r]]).double()
        got = torch.cat([ha[r], hb[r]]).double()
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), (r, got, ref)


@pytest.mark.parametrize("kind", ["forward", "jeffreys"])
def test_lane_hessian_grad_overflows32(kind):
    """float32 [0, 0] against [-3e38, 3e38] at T = 0.5 (the core's derivatives under
    create_graph): the p-p block was nan (the core's wide-row second-order term met inf - inf;
    the float64 textbook formula is not accurate enough here: its Hessian forms 1.2e39 - 1.2e39).
    Against the mpmath Hessian (test_core_overflow_rows.hessian_reference)."""
    from test_core_overflow_rows import _check_hessian, hessian_reference

    x, y, dt, t, ps = ROWS["grad_overflows32"]
    H = _hessian(kind, x, y, t, fast=True)
    _check_hessian(H.numpy(), hessian_reference(kind, "grad_overflows32"), kind)
