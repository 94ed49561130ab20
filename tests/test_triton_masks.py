"""The Triton kernels on rows their float32 algebra cannot hold: -1e30 / finfo.min masks, float32
logits near +-3e38, V = 1 rows of 3e38 against -3e38, one side's entry far below the other's.

These rows are redone by the kernels' wide pass (float64, only the rows the float32 pass left
nan), so that ``validate=False`` and ``torch.compile`` (where no host synchronisation sends nan
rows to the core) give the right value and gradient, never nan for finite inputs.

References: the textbook values and gradients in mpmath (60 digits) on the exact float32 inputs
(``_mp_row`` of tests/test_triton_far_rows.py). Tiny shapes: Triton's interpreter runs ~0.1 s
per row and launch.
"""
import math
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is decorated (decorated lazily)
torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("mpmath")

import kldiv  # noqa: E402
from kldiv.backends import triton_kernels as tk  # noqa: E402

if not tk.cpu_ready():  # triton imported before TRITON_INTERPRET was set: no interpreter
    pytest.skip("Triton's interpreter is not active in this process (TRITON_INTERPRET=1 must "
                "be set before triton is imported)", allow_module_level=True)

from test_triton_far_rows import _mp_row  # noqa: E402

FNS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "jeffreys": kldiv.jeffreys_div,
       "js": kldiv.js_div}
L = dict(p_space="logits", q_space="logits")
FMIN = torch.finfo(torch.float32).min
FMAX = torch.finfo(torch.float32).max

# (p's logits, q's logits), float32, V = 3. Jeffreys and JS (beta = 1/2) are symmetric, and
# reverse KL is the forward kernel with the sides swapped: one orientation covers both sides
ROWS3 = [
    ([0.0, -200.0, 1.0], [0.0, -1e30, 1.0]),  # q masked with -1e30 where p is tiny
    ([0.0, 1.0, FMIN], [0.0, 1.0, 0.0]),  # p masked with finfo.min (reverse: 7.2e37)
    ([0.0, -120.0, 1.0], [0.0, -1e7, 1.0]),  # one side's entry far below the other's
    ([3e38, -3e38, 0.0], [0.0, 1.0, 2.0]),  # a span beyond float32
    ([3e38, 3e38, 1.0], [0.0, 1.0, 2.0]),  # reverse: 2.0e38
    ([FMIN, 0.0, 1.0], [0.0, 1.0, 2.0]),
    ([3e38, -3e38, 0.0], [0.99, 0.42, 0.0]),  # issue #11 item 3 (forward 0.449)
    ([0.3, -1.2, 2.0], [1.0, 0.5, -0.7]),  # an ordinary row: the float32 pass keeps it
]
ROWS1 = [([3e38], [-3e38]), ([-3e38], [3e38]), ([FMIN], [FMAX])]  # V = 1: 0, gradients 0


def _tensors(rows):
    x = torch.tensor([a for a, _ in rows], dtype=torch.float32)
    y = torch.tensor([b for _, b in rows], dtype=torch.float32)
    return x, y


def _check(kind, x, y, val, gx, gy, what):
    """Each row against mpmath: the value as float32 (1e-6 relative; +inf where the true value
    is beyond float32), the gradients per row normwise to 1e-5 (true gradients below float32's
    range count as 0)."""
    assert not torch.isnan(val).any(), (what, kind, val)
    for i in range(x.shape[0]):
        v, rx, ry = _mp_row(kind, x[i].tolist(), y[i].tolist())
        v32 = float(torch.tensor(v.item(), dtype=torch.float64).float())
        got = float(val[i].float())
        if math.isinf(v32):
            assert got == v32, (what, kind, i, got, v.item())
        else:
            assert abs(got - v32) <= 1e-6 * abs(v32) + 1e-44, (what, kind, i, got, v.item())
        for g, r in ((gx[i], rx), (gy[i], ry)):
            assert not torch.isnan(g).any(), (what, kind, i, g)
            err = (g.double() - r).norm().item()
            assert err <= 1e-5 * r.norm().item() + 1e-38, (what, kind, i, g, r)


@pytest.mark.parametrize("kind", ["jeffreys", "js"])
def test_op_rows_and_gradients(kind):
    # kl_rows is the op torch.compile traces (the hook calls it with no host synchronisation);
    # Jeffreys runs both directions (the second accumulating into the first's gradients, each
    # direction's rows redone by its own wide pass)
    for rows in (ROWS3, ROWS1):
        x, y = _tensors(rows)
        xa = x.clone().requires_grad_(True)
        ya = y.clone().requires_grad_(True)
        out = tk.kl_rows(xa, ya, torch.ones(x.shape[0], dtype=torch.float64), 1.0, kind)
        out.sum().backward()
        _check(kind, x, y, out.detach(), xa.grad, ya.grad, "op")


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_validate_false_through_the_public_functions(kind, monkeypatch):
    monkeypatch.setenv("KLDIV_BACKEND", "triton")
    calls = []
    real = tk.kl_rows

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tk, "kl_rows", counting)
    x, y = _tensors(ROWS3)
    xa = x.clone().requires_grad_(True)
    ya = y.clone().requires_grad_(True)
    v = FNS[kind](xa, ya, reduction="none", validate=False, **L)
    v.sum().backward()
    assert calls  # the Triton path, not the core
    _check(kind, x, y, v.detach(), xa.grad, ya.grad, "validate=False")


def test_torch_compile_fullgraph_masked_rows(monkeypatch):
    # the usual training setup: compiled, -1e30 / finfo.min masks, no check and no fallback
    monkeypatch.setenv("KLDIV_BACKEND", "triton")
    x, y = _tensors(ROWS3[:3])

    def f(a, b):
        return kldiv.kl_div(a, b, reduction="none", **L)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xa = x.clone().requires_grad_(True)
    ya = y.clone().requires_grad_(True)
    v = cf(xa, ya)
    v.sum().backward()
    _check("forward", x, y, v.detach(), xa.grad, ya.grad, "compiled")


def test_nan_input_stays_nan_and_masked_rows_stay_zero():
    # the wide pass redoes the rows it can hold; a nan input stays nan (never a made-up number)
    # and a masked row (scale 0) stays 0 with zero gradients, beside redone rows
    x = torch.tensor([[0.0, math.nan, 1.0], [3e38, -3e38, 0.0], [3e38, -3e38, 0.0]])
    y = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    s = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    for kind in ("jeffreys",):
        xa = x.clone().requires_grad_(True)
        ya = y.clone().requires_grad_(True)
        out = tk.kl_rows(xa, ya, s, 1.0, kind)
        out.sum().backward()
        assert math.isnan(out[0].item()) and torch.isnan(xa.grad[0]).all(), kind
        assert out[2] == 0 and (xa.grad[2] == 0).all() and (ya.grad[2] == 0).all(), kind
        _check(kind, x[1:2], y[1:2], out[1:2].detach(), xa.grad[1:2], ya.grad[1:2], "mixed")


@pytest.mark.parametrize("kind", ["reverse", "js"])
def test_linear_kl_div_rows_in_place(kind):
    # divergence_rows_with_grad (linear_kl_div's chunks with validate=False): the gradient
    # overwrites q itself; a row the float32 pass leaves must keep its inputs for the wide pass
    x, y = _tensors(ROWS3[:4] + ROWS3[5:6])
    q = y.clone()
    rows, _, g = tk.divergence_rows_with_grad(kind, x, q, p_space="logits", q_space="logits",
                                              out_q=q)
    assert g is q
    for i in range(x.shape[0]):
        v, _, ry = _mp_row(kind, x[i].tolist(), y[i].tolist())
        v32 = float(torch.tensor(v.item(), dtype=torch.float64).float())
        got = float(rows[i])
        assert got == v32 if math.isinf(v32) else abs(got - v32) <= 1e-6 * abs(v32) + 1e-44, (
            kind, i, got, v.item())
        err = (g[i].double() - ry).norm().item()
        assert err <= 1e-5 * ry.norm().item() + 1e-38, (kind, i, g[i], ry)


def test_js_masked_side_gradient_is_zero():
    # JS's gradient with respect to a side masked at finfo.min (mass 0 at a finite logit) is
    # 0 (1e-62): log m/q is one constant on q's mass, and its centring against E_q[log m/q]
    # left that mean's float32 rounding (1e-9 against a row gradient of 0.05) until the
    # centring at q's maximum
    x = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([[0.0, 1.0, FMIN], [FMIN, 0.0, 1.0]])
    xa = x.clone().requires_grad_(True)
    ya = y.clone().requires_grad_(True)
    out = tk.kl_rows(xa, ya, torch.ones(2, dtype=torch.float64), 1.0, "js")
    out.sum().backward()
    _check("js", x, y, out.detach(), xa.grad, ya.grad, "masked q")
