"""The torch fast path (kldiv.backends.torch_fast, the "pre" hook): every size, space and option.

References, independent of the code under test:
- the core itself with the hook switched off (the core defines the semantics: values, dtypes,
  edges and error messages must be the same);
- torch.autograd on the textbook float64 formula (log_softmax, the support selected by boolean
  indexing), row by row, for values, gradients and Hessian-vector products.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from kldiv._core import dispatch  # noqa: E402
from kldiv.backends import torch_fast as tfa  # noqa: E402

FUNCS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}
KINDS = tuple(FUNCS)
SPACE_PAIRS = [("logits", "logits"), ("probs", "log_probs"), ("probs", "probs"),
               ("log_probs", "logits"), ("logits", "probs")]


@contextlib.contextmanager
def core_only():
    """The core alone: the torch pre hook taken out for the duration."""
    h = dispatch._HANDLERS.pop(("torch", "pre"), None)
    try:
        yield
    finally:
        if h is not None:
            dispatch._HANDLERS[("torch", "pre")] = h


def took_fast(v):
    return v.grad_fn is not None and "_Divergence" in type(v.grad_fn).__name__


def to_space(x, space):
    if space == "probs":
        return torch.softmax(x, -1)
    if space == "log_probs":
        return torch.log_softmax(x, -1)
    return x


# ----------------------------------------------------------------------------------------------
# the textbook float64 formulas, differentiated by torch.autograd (row by row)


def _lw(x, space, T):
    """Normalised log-probabilities of one row at temperature T (float64)."""
    if space == "probs":
        x = torch.log(x)
    return torch.log_softmax(x / T, -1)


def _kl(lp, lq):
    S = torch.isfinite(lp)
    return (lp[S].exp() * (lp[S] - lq[S])).sum()


def naive_row(kind, a, b, ps, qs, T=1.0, beta=0.5):
    lp, lq = _lw(a, ps, T), _lw(b, qs, T)
    if kind == "forward":
        return _kl(lp, lq)
    if kind == "reverse":
        return _kl(lq, lp)
    if kind == "jeffreys":
        return _kl(lp, lq) + _kl(lq, lp)
    U = torch.isfinite(lp) | torch.isfinite(lq)  # the mixture's support only (no -inf - -inf)
    lp, lq = lp[U], lq[U]
    lm = torch.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
    return beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)


# ----------------------------------------------------------------------------------------------
# agreement with the core


@pytest.fixture(params=["kernel", "torch"])
def impl(request, monkeypatch):
    """The C kernel where it applies, or torch operations only (the path of other devices)."""
    if request.param == "kernel" and tfa._EXT is None:
        pytest.skip("C extension kldiv._ext._fused not built (python setup.py build_ext)")
    if request.param == "torch":
        monkeypatch.setattr(tfa, "_EXT", None)
        monkeypatch.setattr(tfa, "_LANE", {})
    return request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spaces", SPACE_PAIRS)
def test_values_and_gradients_equal_the_core(kind, spaces, impl):
    ps, qs = spaces
    rng = np.random.default_rng(KINDS.index(kind) * 10 + SPACE_PAIRS.index(spaces))
    fn = FUNCS[kind]
    cases = [
        dict(reduction="none"),
        dict(reduction="sum", temperature=1.7, t2_scale=True),
        dict(reduction="mean", mask=torch.tensor([True, False, True, True, False, True])),
        dict(reduction="mean", weight=torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25, 1.0],
                                                   dtype=torch.float64)),
        dict(reduction="none", mask=torch.tensor([True, True, False, True, True, True]),
             weight=torch.tensor([1.0, 2.0, 3.0, 0.0, 1.0, 1.0], dtype=torch.float64),
             validate=False),  # (with checks on, a zero weight sends the call to the core)
    ]
    if kind == "js":
        cases.append(dict(reduction="sum", beta=0.3))
    for kw in cases:
        a = to_space(torch.as_tensor(rng.standard_normal((6, 9)) * 2), ps)
        b = to_space(torch.as_tensor(rng.standard_normal((6, 9)) * 2), qs)
        if "mask" in kw:  # masked rows may hold anything, nan included
            a[~kw["mask"]] = math.nan
        call = dict(p_space=ps, q_space=qs, **kw)
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        v = fn(a1, b1, **call)
        assert took_fast(v), kw
        up = torch.as_tensor(rng.uniform(0.5, 2.0, v.shape))
        g = torch.autograd.grad((v * up).sum(), (a1, b1))
        with core_only():
            a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
            ref = fn(a2, b2, **call)
            gr = torch.autograd.grad((ref * up).sum(), (a2, b2))
        assert v.dtype == ref.dtype and v.shape == ref.shape
        torch.testing.assert_close(v, ref, rtol=1e-10, atol=1e-14)
        for x, y in zip(g, gr):
            x, y = torch.nan_to_num(x), torch.nan_to_num(y)
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_no_gradient_and_other_layouts_equal_the_core(kind):
    """No gradient recorded; the category axis first; transposed (odd-stride) inputs."""
    rng = np.random.default_rng(3)
    fn = FUNCS[kind]
    a = torch.as_tensor(rng.standard_normal((7, 3, 5)), dtype=torch.float32)
    b = torch.as_tensor(rng.standard_normal((7, 3, 5)), dtype=torch.float32)
    for call in (dict(axis=0, reduction="none"), dict(axis=1, reduction="sum"),
                 dict(axis=-1, reduction="mean")):
        got = fn(a, b, p_space="logits", q_space="logits", **call)
        with core_only():
            ref = fn(a, b, p_space="logits", q_space="logits", **call)
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-7)
    at, bt = a[:, 0, :].t(), b[:, 0, :].t()  # (5, 7), stride 1 along the rows
    got = fn(at, bt, p_space="logits", q_space="logits")
    with core_only():
        ref = fn(at, bt, p_space="logits", q_space="logits")
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# against the float64 textbook formula, per row: values, gradients, second derivatives


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spaces", [("logits", "logits"), ("probs", "log_probs"),
                                    ("probs", "probs")])
def test_first_and_second_derivatives_per_row_match_naive(kind, spaces, impl):
    ps, qs = spaces
    rng = np.random.default_rng(11)
    n, V, T = 4, 7, (1.3 if ps == "logits" else 1.0)
    a = to_space(torch.as_tensor(rng.standard_normal((n, V)) * 2), ps)
    b = to_space(torch.as_tensor(rng.standard_normal((n, V)) * 2), qs)
    va, vb = torch.as_tensor(rng.standard_normal((n, V))), torch.as_tensor(
        rng.standard_normal((n, V)))
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    rows = FUNCS[kind](a1, b1, p_space=ps, q_space=qs, temperature=T, validate=False)
    assert took_fast(rows)
    for r in range(n):
        ga, gb = torch.autograd.grad(rows[r], (a1, b1), create_graph=True)
        hv = torch.autograd.grad((ga * va).sum() + (gb * vb).sum(), (a1, b1))
        x = a[r].clone().requires_grad_()
        y = b[r].clone().requires_grad_()
        ref = naive_row(kind, x, y, ps, qs, T)
        rga, rgb = torch.autograd.grad(ref, (x, y), create_graph=True)
        rhv = torch.autograd.grad((rga * va[r]).sum() + (rgb * vb[r]).sum(), (x, y))
        torch.testing.assert_close(rows[r], ref, rtol=1e-10, atol=1e-15)
        if ps == "probs" or qs == "probs":
            # kldiv renormalises probabilities: gradients agree in directions inside the simplex
            proj = lambda g: g - g.mean()  # noqa: E731
        else:
            proj = lambda g: g  # noqa: E731
        for got, want in ((ga[r], rga), (gb[r], rgb), (hv[0][r], rhv[0]), (hv[1][r], rhv[1])):
            if (ps == "probs" and got is not gb[r]) or (qs == "probs" and got is not ga[r]):
                got, want = proj(got), proj(want)
            scale = float(want.detach().abs().max()) + 1e-300
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * scale)


def test_hessian_vector_product_at_a_large_size():
    """No size threshold changes which derivatives exist: Fisher-vector products at 2^20+."""
    torch.manual_seed(0)
    n, V = 1100, 1000
    t = torch.randn(n, V, dtype=torch.float64)
    s = (t + 0.3 * torch.randn(n, V, dtype=torch.float64)).requires_grad_()
    v = torch.randn(n, V, dtype=torch.float64)
    kl = kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean")
    assert took_fast(kl)
    (g,) = torch.autograd.grad(kl, s, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), s)
    s2 = s.detach().clone().requires_grad_()
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s2, -1)
    ref = (lp.exp() * (lp - lq)).sum() / n
    (g2,) = torch.autograd.grad(ref, s2, create_graph=True)
    (hv2,) = torch.autograd.grad((g2 * v).sum(), s2)
    torch.testing.assert_close(g, g2, rtol=1e-9, atol=1e-15)
    err = ((hv - hv2).norm(dim=-1) / hv2.norm(dim=-1)).max()  # per row
    assert float(err) < 1e-10


def test_backward_twice_agrees_to_the_bit():
    torch.manual_seed(1)
    t = torch.randn(5, 300)
    s = torch.randn(5, 300, requires_grad=True)
    loss = kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean")
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s)
    assert torch.equal(g1, g2)


# ----------------------------------------------------------------------------------------------
# edges


@pytest.mark.parametrize("kind", KINDS)
def test_infinities_and_escapes_equal_the_core(kind, impl):
    """-inf entries (p = 0, q = 0, both), rows that are +inf (zero gradient), V = 1."""
    rng = np.random.default_rng(4)
    a = torch.as_tensor(rng.standard_normal((5, 8)) * 2)
    b = torch.as_tensor(rng.standard_normal((5, 8)) * 2)
    a[0, :3] = b[0, :3] = -math.inf  # both zero
    a[1, 4] = -math.inf  # p = 0 < q
    b[2, 6] = -math.inf  # q = 0 < p
    a[3, 1] = -1e30  # masked by a huge finite logit
    b[3, 2] = -1e30
    fn = FUNCS[kind]
    for x, y in ((a, b), (a[1:, :1], b[1:, :1])):
        a1, b1 = x.clone().requires_grad_(), y.clone().requires_grad_()
        v = fn(a1, b1, p_space="logits", q_space="logits")
        with core_only():
            ref = fn(x, y, p_space="logits", q_space="logits")
        torch.testing.assert_close(v, ref, rtol=1e-10, atol=1e-14)
        for r in range(x.shape[0]):
            ga, gb = torch.autograd.grad(v[r], (a1, b1), retain_graph=True)
            assert torch.all(torch.isfinite(ga)) and torch.all(torch.isfinite(gb))
            if math.isinf(v[r].item()):  # the core's convention: +inf with a zero gradient
                assert not ga.any() and not gb.any()
                continue
            xr, yr = x[r].clone().requires_grad_(), y[r].clone().requires_grad_()
            want = torch.autograd.grad(naive_row(kind, xr, yr, "logits", "logits"), (xr, yr))
            for got, w in zip((ga[r], gb[r]), want):
                w = torch.where(torch.isfinite(xr.detach()) | torch.isfinite(yr.detach()), w, 0)
                torch.testing.assert_close(got, w, rtol=1e-8, atol=1e-12 * float(w.abs().max()))


def test_probability_zeros_and_subnormals_equal_the_core():
    p = torch.tensor([[0.0, 0.3, 0.7], [1e-310, 0.5, 0.5 - 1e-310], [0.2, 0.0, 0.8]],
                     dtype=torch.float64)
    q = torch.tensor([[0.1, 0.3, 0.6], [0.25, 0.25, 0.5], [0.2, 0.0, 0.8]], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        for fn in FUNCS.values():
            x, y = p.to(dtype), q.to(dtype)
            got = fn(x, y)
            with core_only():
                ref = fn(x, y)
            torch.testing.assert_close(got, ref, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                                       atol=0)


def test_half_precision_sum_over_many_rows_is_float32():
    torch.manual_seed(2)
    t = torch.randn(40000, 8)
    s = torch.randn(40000, 8)
    got = kldiv.kl_div(t.half(), s.half(), p_space="logits", q_space="logits", reduction="sum")
    assert got.dtype == torch.float32
    lp = torch.log_softmax(t.half().double(), -1)
    lq = torch.log_softmax(s.half().double(), -1)
    ref = (lp.exp() * (lp - lq)).sum()
    assert abs(float(got) - float(ref)) < 1e-5 * float(ref)


def test_temperatures_at_and_beyond_the_fast_range():
    torch.manual_seed(3)
    a, b = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    for T in (tfa.T_RANGE[0], tfa.T_RANGE[1], 1e-3, 1e3):
        got = kldiv.kl_div(a, b, p_space="logits", q_space="logits", temperature=T)
        with core_only():
            ref = kldiv.kl_div(a, b, p_space="logits", q_space="logits", temperature=T)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# value checks: the core's errors, word for word


def _bad_inputs():
    good = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    logits = torch.randn(3, 5, dtype=torch.float64)
    out = []
    x = logits.clone(); x[1, 2] = math.nan; out.append((x, "logits"))  # noqa: E702
    x = logits.clone(); x[2, 0] = math.inf; out.append((x, "logits"))  # noqa: E702
    x = logits.clone(); x[0] = -math.inf; out.append((x, "logits"))  # noqa: E702
    x = good.clone(); x[1, 1] = -0.1; out.append((x, "probs"))  # noqa: E702
    x = good.clone(); x[2] *= 1.01; out.append((x, "probs"))  # noqa: E702
    x = good.clone(); x[0, 0] = math.nan; out.append((x, "probs"))  # noqa: E702
    x = torch.log(good); x[1] += 0.01; out.append((x, "log_probs"))  # noqa: E702
    return good, out


@pytest.mark.parametrize("kind", ["forward", "js"])
@pytest.mark.parametrize("grad", [False, True])
def test_value_checks_raise_the_core_error(kind, grad):
    good, bad = _bad_inputs()
    fn = FUNCS[kind]
    for x, space in bad:
        for args, kw in (((x, good), dict(p_space=space)), ((good, x), dict(q_space=space))):
            args = tuple(a.clone().requires_grad_(grad) for a in args)
            with core_only(), pytest.raises(ValueError) as ref:
                fn(*args, reduction="mean", **kw)
            with pytest.raises(ValueError) as got:
                fn(*args, reduction="mean", **kw)
            assert str(got.value) == str(ref.value)
            # masked rows are not checked
            mask = torch.ones(3, dtype=torch.bool)
            bad_rows = ~torch.isclose(args[0].detach(), good).all(-1) | ~torch.isclose(
                args[1].detach(), good).all(-1)
            mask[bad_rows] = False
            v = fn(*args, reduction="mean", mask=mask, **kw)
            assert torch.isfinite(v)


def test_validate_false_gives_what_the_core_gives():
    x = torch.tensor([[math.nan, 0.0], [0.5, 1.0]], dtype=torch.float64)
    y = torch.zeros(2, 2, dtype=torch.float64)
    got = kldiv.kl_div(x, y, p_space="logits", q_space="logits", validate=False)
    with core_only():
        ref = kldiv.kl_div(x, y, p_space="logits", q_space="logits", validate=False)
    torch.testing.assert_close(got, ref, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# torch.compile


def test_compiles_with_fullgraph_without_warnings():
    pytest.importorskip("torch._dynamo")

    def loss(t, s):
        return kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean")

    torch.manual_seed(4)
    t = torch.randn(4, 6)
    s = torch.randn(4, 6, requires_grad=True)
    loss(t, s)  # the backend module is loaded on kldiv's first eager call
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = torch.compile(loss, fullgraph=True, backend="eager")
        v = compiled(t, s)
        (g,) = torch.autograd.grad(v, s)
    s2 = s.detach().double().requires_grad_()
    lp, lq = torch.log_softmax(t.double(), -1), torch.log_softmax(s2, -1)
    ref = (lp.exp() * (lp - lq)).sum(-1).mean()
    (g2,) = torch.autograd.grad(ref, s2)
    torch.testing.assert_close(v.double(), ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g.double(), g2, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys"])
def test_repeated_calls_take_the_everyday_lane_and_still_equal_the_core(kind):
    """A signature seen before skips option parsing (the lane): same values, gradients, errors."""
    torch.manual_seed(5)
    fn = FUNCS[kind]
    for shape, red, qs in (((6, 9), "mean", "logits"), ((2, 3, 9), "none", "log_probs"),
                           ((6, 9), "sum", "log_probs")):
        for dtype in (torch.float32, torch.float64):
            for _ in range(3):  # the first call records the signature, the others use it
                a = torch.randn(shape, dtype=dtype)
                b = to_space(torch.randn(shape, dtype=dtype), qs).requires_grad_()
                v = fn(a, b, p_space="logits", q_space=qs, reduction=red, t2_scale=True,
                       temperature=2.0)
                (g,) = torch.autograd.grad(v.sum(), b)
                with core_only():
                    b2 = b.detach().clone().requires_grad_()
                    ref = fn(a, b2, p_space="logits", q_space=qs, reduction=red, t2_scale=True,
                             temperature=2.0)
                    (g2,) = torch.autograd.grad(ref.sum(), b2)
                tol = dict(rtol=2e-5, atol=1e-7) if dtype == torch.float32 else {}
                assert v.dtype == ref.dtype and v.shape == ref.shape
                torch.testing.assert_close(v, ref, **tol)
                torch.testing.assert_close(g, g2, **tol)
            bad = b.detach().clone()
            bad.view(-1)[4] = math.nan
            with core_only(), pytest.raises(ValueError) as want:
                fn(a, bad, p_space="logits", q_space=qs, reduction=red)
            with pytest.raises(ValueError) as got:
                fn(a, bad, p_space="logits", q_space=qs, reduction=red)
            assert str(got.value) == str(want.value)
            if qs == "log_probs":
                off = b.detach() + 0.01
                with pytest.raises(ValueError, match="log-probabilities"):
                    fn(a, off, p_space="logits", q_space=qs, reduction=red)


def test_float32_probabilities_below_the_float32_exponential_equal_the_core():
    """The migration row with subnormal probabilities (the float32 kernel's exp stops at e^-87)."""
    p = torch.tensor([[1e-40, 0.3, 0.7 - 1e-40], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    lq = torch.log_softmax(torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, 2.0], [0.5, 0.5, 0.0]]), -1)
    for fn in (kldiv.kl_div, kldiv.reverse_kl):
        a, b = p.clone().requires_grad_(), lq.clone().requires_grad_()
        v = fn(a, b, q_space="log_probs", reduction="sum")
        g = torch.autograd.grad(v, (a, b))
        with core_only():
            a2, b2 = p.clone().requires_grad_(), lq.clone().requires_grad_()
            ref = fn(a2, b2, q_space="log_probs", reduction="sum")
            gr = torch.autograd.grad(ref, (a2, b2))
        torch.testing.assert_close(v, ref, rtol=2e-6, atol=0)
        for x, y in zip(g, gr):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_large_shifts_of_either_side_match_the_textbook_formula(kind, impl):
    """Logits shifted by up to 1e12 (float64; 1e3 in float32), one side up and the other down:
    the log-ratio is formed without the shift swallowing the digits that matter."""
    rng = np.random.default_rng(9)
    for dtype, shift, rtol in ((torch.float64, 1e12, 1e-9), (torch.float32, 1e3, 1e-5)):
        a = torch.as_tensor(rng.standard_normal((3, 12)), dtype=dtype)
        b = torch.as_tensor(rng.standard_normal((3, 12)), dtype=dtype) + 0.5
        a, b = a + shift, b - shift  # the inputs as given (rounded), and the truth from them
        got = FUNCS[kind](a, b, p_space="logits", q_space="logits")
        ref = torch.stack([naive_row(kind, a[r].double(), b[r].double(), "logits", "logits")
                           for r in range(3)])
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=1e-12)
