"""The torch fast path (kldiv.backends.torch_fast, the "pre" hook): every size, space and option.

References, independent of the code under test:
- the core itself with the hook switched off (the core defines the semantics: values, dtypes,
  edges and error messages must be the same);
- torch.autograd on the textbook float64 formula (log_softmax, the support selected by boolean
  indexing), row by row, for values, gradients and Hessian-vector products.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from kldiv.backends import torch_fast as tfa  # noqa: E402
from torch_reference import core_only, naive_row, took_fast  # noqa: E402

FUNCS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}
KINDS = tuple(FUNCS)
SPACE_PAIRS = [("logits", "logits"), ("probs", "log_probs"), ("probs", "probs"),
               ("log_probs", "logits"), ("logits", "probs")]


def to_space(x, space):
    if space == "probs":
        return torch.softmax(x, -1)
    if space == "log_probs":
        return torch.log_softmax(x, -1)
    return x


# ----------------------------------------------------------------------------------------------
# the textbook float64 formulas, differentiated by torch.autograd (row by row)


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


# ----------------------------------------------------------------------------------------------
# the C kernel's JS kind and its probability inputs (issue 12): differential tests over
# adversarial rows, against the core with the hook taken out and the float64 textbook formula


def _adversarial_rows(dt, ps, qs, rng):
    """(a, b): rows that stress each route of the kernel, in the given spaces and dtype."""
    V = 12
    x = torch.as_tensor(rng.standard_normal((12, V)) * 2)
    y = torch.as_tensor(rng.standard_normal((12, V)) * 2)
    y[1] = x[1] + torch.as_tensor(rng.standard_normal(V)) * 1e-4  # near convergence
    y[2] = x[2] + torch.as_tensor(rng.standard_normal(V)) * 1e-2
    a, b = to_space(x, ps).to(dt), to_space(y, qs).to(dt)
    big = 1e30 if dt == torch.float64 else 1e37
    fmin = torch.finfo(dt).min
    for side, space in ((a, ps), (b, qs)):
        tiny = 1e-310 if dt == torch.float64 else 1e-40  # subnormal
        if space == "logits":
            side[3] += big  # a huge common offset
            side[4, 2] = -math.inf
            side[5, 3] = -1e30  # masking by a huge finite logit
            side[6, 4] = fmin
            side[7, :3] = -math.inf
        elif space == "probs":
            side[4, 2] = 0.0
            side[5, 3] = tiny
            side[6, 4] = tiny * 1e6
            side[7, :3] = 0.0
        else:  # log-probabilities: -inf entries, renormalised
            side[4, 2] = -math.inf
            side[7, :3] = -math.inf
    if qs == "logits" and ps == "logits":
        b[8] = a[8] + 1e4  # the same distribution, shifted
    if ps == "probs":
        a[:] = a / a.sum(-1, keepdim=True)
    if qs == "probs":
        b[:] = b / b.sum(-1, keepdim=True)
    for side, space in ((a, ps), (b, qs)):
        if space == "log_probs":
            side[:] = torch.log_softmax(side.double(), -1).to(dt)
    return a, b


def _per_row_error(got, want):
    """Normwise relative error per row (entries where the reference is not finite left out)."""
    ok = torch.isfinite(want)
    got = torch.where(ok, got.double(), 0.0)
    want = torch.where(ok, want.double(), 0.0)
    top = want.abs().amax(-1, keepdim=True)  # scaled first: gradients of 1e30 have norms too
    top = torch.where(top > 0, top, 1.0)
    got, want = got / top, want / top
    den = want.norm(dim=-1)
    num = (got - want).norm(dim=-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), num)


def _naive_rows(kind, a, b, ps, qs, T, beta):
    vals, gas, gbs = [], [], []
    for r in range(a.shape[0]):
        x = a[r].double().clone().requires_grad_()
        y = b[r].double().clone().requires_grad_()
        v = naive_row(kind, x, y, ps, qs, T, beta)
        gx, gy = torch.autograd.grad(v, (x, y), allow_unused=True)
        vals.append(v.detach())
        gas.append(torch.zeros_like(x) if gx is None else gx)
        gbs.append(torch.zeros_like(y) if gy is None else gy)
    return torch.stack(vals), torch.stack(gas), torch.stack(gbs)


def _value_and_grads(fn, a, b, **kw):
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    v = fn(a1, b1, reduction="none", **kw)
    ga, gb = torch.autograd.grad(v.sum(), (a1, b1))
    return v, ga, gb


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,spaces,T", [
    ("js", ("logits", "logits"), 1.0), ("js", ("logits", "logits"), 0.5),
    ("js", ("logits", "log_probs"), 2.0), ("js", ("probs", "log_probs"), 1.0),
    ("js", ("probs", "probs"), 1.0), ("js", ("log_probs", "probs"), 1.0),
    ("forward", ("probs", "log_probs"), 1.0), ("forward", ("probs", "probs"), 1.0),
    ("forward", ("log_probs", "probs"), 1.0), ("forward", ("probs", "logits"), 1.0),
    ("reverse", ("probs", "log_probs"), 1.0), ("jeffreys", ("probs", "probs"), 1.0),
])
def test_kernel_js_and_probability_inputs_on_adversarial_rows(dt, kind, spaces, T):
    """Values and per-row gradients on shifted, masked (-inf, -1e30, finfo.min), subnormal,
    zero and near-convergent rows: the fast path is at least as close to the truth as the core.

    The truth: the textbook formula in float64 by torch.autograd (where it is finite), else the
    core in float64 on the same inputs. Where the two paths differ, the fast path's error must
    be within 3x the core's error or below float rounding (1e-6 / 1e-12 relative)."""
    ps, qs = spaces
    rng = np.random.default_rng([KINDS.index(kind), SPACE_PAIRS.index(spaces)
                                 if spaces in SPACE_PAIRS else 9, int(T * 10)])
    a0, b0 = _adversarial_rows(dt, ps, qs, rng)
    keep = [r for r in range(a0.shape[0]) if r != 6]
    # without row 6 (finfo.min in float32 logits) the kernel takes every row; a row it cannot
    # take sends the whole call to the core (float64 there), which is what row 6 checks
    for a, b, fast in ((a0[keep], b0[keep], True), (a0, b0, False)):
        _check_adversarial(kind, a, b, ps, qs, T, dt, fast)


def _check_adversarial(kind, a, b, ps, qs, T, dt, fast):
    fn = FUNCS[kind]
    kw = dict(p_space=ps, q_space=qs, temperature=T, validate=False)
    v, ga, gb = _value_and_grads(fn, a, b, **kw)
    if fast:
        assert took_fast(v)
    with core_only():
        vc, gac, gbc = _value_and_grads(fn, a, b, **kw)
        v64, ga64, gb64 = _value_and_grads(fn, a.double(), b.double(), **kw)
    vn, gan, gbn = _naive_rows(kind, a, b, ps, qs, T, 0.5)
    use_naive = torch.isfinite(vn) & (vn.abs() < 1e25)
    truth = torch.where(use_naive, vn, v64)
    ga_t = torch.where(use_naive[:, None] & torch.isfinite(gan), gan, ga64)
    gb_t = torch.where(use_naive[:, None] & torch.isfinite(gbn), gbn, gb64)
    tol_v, tol_g = (1e-6, 1e-5) if dt == torch.float32 else (1e-12, 1e-10)

    def rel(x):
        x = x.double()
        same = x == truth  # +inf where the truth is +inf
        return torch.where(same, 0.0, (x - truth).abs() / truth.abs().clamp_min(1e-300))

    err_v, err_vc = rel(v), rel(vc)
    assert bool((err_v <= torch.clamp(3 * err_vc, min=tol_v)).all()), (err_v, err_vc)
    for g, gc, gt, x, space in ((ga, gac, ga_t, a, ps), (gb, gbc, gb_t, b, qs)):
        e, ec = _per_row_error(g, gt), _per_row_error(gc, gt)
        # (a row where both give a non-finite gradient against a finite truth: the same call,
        # the kernel having left it to the core)
        same = torch.isnan(e) & torch.isnan(ec)
        assert bool(((e <= torch.clamp(3 * ec, min=tol_g)) | same).all()), (e, ec)


@pytest.mark.parametrize("level", [1e-3, 1e-6, 1e-9])
@pytest.mark.parametrize("spaces", [("logits", "logits"), ("probs", "log_probs")])
def test_kernel_js_near_convergence_matches_mpmath(level, spaces):
    """float32 JS (beta 0.5 and 0.2) at JS ~ 1e-3 .. 1e-9: value 1e-5 relative against 40-digit
    mpmath on the same float32 inputs (logits; probabilities: within 3x the core's error);
    gradients 1e-5 per row against float64 autograd."""
    mpmath = pytest.importorskip("mpmath")
    ps, qs = spaces
    rng = np.random.default_rng(int(-math.log10(level)))
    n, V = 3, 50
    x = torch.as_tensor(rng.standard_normal((n, V)) * 2)
    y = x + torch.as_tensor(rng.standard_normal((n, V))) * math.sqrt(8 * level)
    a = to_space(x, ps).float()
    b = to_space(y, qs).float()
    for beta in (0.5, 0.2):
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        v = kldiv.js_div(a1, b1, beta=beta, p_space=ps, q_space=qs)
        assert took_fast(v)
        ga, gb = torch.autograd.grad(v.sum(), (a1, b1))
        _, gan, gbn = _naive_rows("js", a, b, ps, qs, 1.0, beta)
        with mpmath.workdps(40):
            for r in range(n):
                lp = [mpmath.mpf(float(t)) for t in a[r].double()]
                lq = [mpmath.mpf(float(t)) for t in b[r].double()]
                if ps == "probs":
                    lp = [mpmath.log(t) for t in lp]
                zp = mpmath.fsum(mpmath.exp(t) for t in lp)
                zq = mpmath.fsum(mpmath.exp(t) for t in lq)
                P = [mpmath.exp(t) / zp for t in lp]
                Q = [mpmath.exp(t) / zq for t in lq]
                js = mpmath.fsum(
                    beta * pi * mpmath.log(pi / (beta * pi + (1 - beta) * qi))
                    + (1 - beta) * qi * mpmath.log(qi / (beta * pi + (1 - beta) * qi))
                    for pi, qi in zip(P, Q))
                # logits: 1e-5; a float32 probability's logarithm carries eps |log p| of its
                # own: there within 3x the core's error (or 1e-5)
                err = abs(float(v[r].detach()) - float(js))
                lim = 1e-5 * float(js)
                if ps == "probs":
                    with core_only():
                        vc = kldiv.js_div(a, b, beta=beta, p_space=ps, q_space=qs)
                    lim = max(lim, 3 * abs(float(vc[r]) - float(js)))
                assert err <= lim, (r, beta, err, lim)
        lim = 1e-5
        if ps == "probs":
            with core_only():
                _, gac, gbc = _value_and_grads(kldiv.js_div, a, b, beta=beta, p_space=ps,
                                               q_space=qs)
            lim = max(lim, 3 * float(_per_row_error(gac, gan).max()),
                      3 * float(_per_row_error(gbc, gbn).max()))
        assert float(_per_row_error(ga, gan).max()) < lim
        assert float(_per_row_error(gb, gbn).max()) < lim


@pytest.mark.parametrize("space", ["probs", "log_probs"])
def test_kernel_value_checks_keep_the_core_border(space):
    """The kernel's own row statistics decide the normalisation check: a row off by 0.9 of the
    tolerance passes, one off by 1.1 raises the core's error (same type, same message)."""
    rng = np.random.default_rng(5)
    V = 40
    tol = kldiv.normalization_tolerance(torch.finfo(torch.float32).eps, V)
    base = torch.softmax(torch.as_tensor(rng.standard_normal((4, V))), -1)
    s = torch.randn(4, V, requires_grad=True)
    for f, ok in ((0.9, True), (1.1, False)):
        p = base.clone()
        p[2] *= 1 + f * tol  # sum 1 + f tol
        p = p.float() if space == "probs" else torch.log(p).float()
        call = dict(p_space=space, q_space="logits", reduction="mean")
        for kind in ("forward", "js"):
            fn = FUNCS[kind]
            with core_only():
                try:
                    ref, err = fn(p, s.detach(), **call), None
                except ValueError as e:
                    ref, err = None, str(e)
            assert (err is None) == ok, (f, kind, err)
            if ok:
                got = fn(p, s, **call)
                assert took_fast(got)
                torch.testing.assert_close(got.detach(), ref, rtol=1e-6, atol=0)
            else:
                with pytest.raises(ValueError) as info:
                    fn(p, s, **call)
                assert str(info.value) == err


@pytest.mark.parametrize("kind", ["js", "forward"])
def test_kernel_js_and_probabilities_other_layouts_and_sizes(kind):
    """V = 1, a large V, odd strides, the category axis first and half-precision inputs: the
    same values and gradients as the core."""
    rng = np.random.default_rng(8)
    fn = FUNCS[kind]
    big = torch.as_tensor(rng.standard_normal((2, 3 * 20000)), dtype=torch.float32)
    cases = [
        (torch.ones(3, 1), torch.zeros(3, 1), "probs", "log_probs", {}),  # V = 1
        (torch.softmax(big[:, ::3] * 3, -1), torch.log_softmax(big[:, 1::3] * 3, -1),
         "probs", "log_probs", {}),  # large V, stride 3
        (torch.softmax(big[:, :50].t() * 2, 0), big[:, 50:100].t(), "probs", "logits",
         dict(axis=0)),
        (torch.softmax(big[:, :64], -1).half(), torch.log_softmax(big[:, 64:128], -1).bfloat16(),
         "probs", "log_probs", {}),
        (big[:, :300].half(), big[:, 300:600].half(), "logits", "logits", dict(temperature=2.0)),
    ]
    for a, b, ps, qs, kw in cases:
        call = dict(p_space=ps, q_space=qs, **kw)
        v, ga, gb = _value_and_grads(fn, a, b, **call)
        assert took_fast(v)
        with core_only():
            vc, gac, gbc = _value_and_grads(fn, a, b, **call)
            # the truth: the core in float64 on the same inputs
            v64, ga64, gb64 = _value_and_grads(fn, a.double(), b.double(), validate=False,
                                               **call)
        assert v.dtype == vc.dtype and v.shape == vc.shape
        torch.testing.assert_close(v, vc, rtol=2e-6, atol=1e-9)
        for g, gc, gt in ((ga, gac, ga64), (gb, gbc, gb64)):
            assert g.dtype == gc.dtype
            if kw.get("axis") == 0:
                g, gc, gt = g.t(), gc.t(), gt.t()
            e, ec = _per_row_error(g.double(), gt), _per_row_error(gc.double(), gt)
            assert bool((e <= torch.clamp(3 * ec, min=1e-5)).all()), (ps, qs, kw, e, ec)


def test_kernel_js_gradient_at_a_tiny_probability_matches_mpmath():
    """d JS / d p_i at p_i = 1e-200 (probabilities, renormalised) against a central difference
    in 320-digit mpmath: 1e-9 relative."""
    mpmath = pytest.importorskip("mpmath")
    p = torch.tensor([[0.3, 0.2, 0.4, 1e-200]], dtype=torch.float64, requires_grad=True)
    lq = torch.log(torch.full((1, 4), 0.25, dtype=torch.float64))
    v = kldiv.js_div(p, lq, p_space="probs", q_space="log_probs", reduction="sum",
                     validate=False)  # (p sums to 0.9: renormalised)
    assert took_fast(v)
    (g,) = torch.autograd.grad(v, p)
    with mpmath.workdps(320):
        def js(pp):
            z = mpmath.fsum(pp)
            out = 0
            for pi, qi in zip(pp, [mpmath.mpf(0.25)] * 4):
                pi = pi / z
                m = (pi + qi) / 2
                out += (pi * mpmath.log(pi / m) + qi * mpmath.log(qi / m)) / 2
            return out
        base = [mpmath.mpf(t) for t in ("0.3", "0.2", "0.4", "1e-200")]
        h = mpmath.mpf("1e-204")
        for i, step in ((3, h), (0, mpmath.mpf("1e-60"))):
            up, dn = list(base), list(base)
            up[i] += step
            dn[i] -= step
            fd = float((js(up) - js(dn)) / (2 * step))
            assert abs(float(g[0, i]) - fd) <= 1e-9 * abs(fd), (i, float(g[0, i]), fd)


def test_without_the_kernel_large_calls_take_the_chunked_path():
    """No kernel (no C extension, another device, or ``torch_fused._extension(False)``) at
    2**20 elements and up: the memory-bounded chunked path of torch_fused answers, not the
    whole-tensor torch operations (which held ~15 N x V temporaries at 4096 x 32000). Values
    and per-row gradients against torch.autograd on the float64 textbook formula."""
    from kldiv.backends import torch_fused as tf

    g = torch.Generator().manual_seed(5)
    n, V = 33, 32000  # just over 2**20 elements
    t = torch.randn(n, V, generator=g) * 2
    s = t + torch.randn(n, V, generator=g) * 0.1
    t[0, :5] = -math.inf  # masked on both sides: finite both ways
    s[0, :5] = -math.inf
    s.requires_grad_()
    for kind in ("forward", "reverse"):
        with tf._extension(False):
            v = FUNCS[kind](t, s, p_space="logits", q_space="logits", reduction="sum")
        assert "Fused" in type(v.grad_fn).__name__, type(v.grad_fn).__name__
        (gs,) = torch.autograd.grad(v, s)
        rows, grads = [], []
        for r in range(n):
            sr = s[r].detach().double().requires_grad_()
            val = naive_row(kind, t[r].double(), sr, "logits", "logits")
            rows.append(val.detach())
            grads.append(torch.autograd.grad(val, sr)[0])
        ref = torch.stack(rows).sum()
        assert abs(float(v) - float(ref)) <= 1e-5 * abs(float(ref))
        gref = torch.stack(grads)
        err = (gs.double() - gref).norm(dim=-1) / gref.norm(dim=-1)
        assert float(err.max()) < 1e-5, err.max()


def test_everyday_lane_backward_scales_retains_and_reuses_mid_size_buffers():
    """The lane's first-order backward (gradients handed over as they are) against the float64
    textbook formula differentiated by torch.autograd: an upstream factor other than 1, both
    inputs at once, a 3-d shape, a second backward (retain_graph), create_graph; from 1 MiB up
    the gradient's memory is reused across steps once dropped, never while held."""
    import torch.nn.functional as F

    from kldiv.backends import torch_fused

    torch.manual_seed(11)
    for shape in ((5, 7), (2, 3, 7)):
        n = math.prod(shape[:-1])
        t = torch.randn(shape)
        s = torch.randn(shape)
        td, sd = t.double().requires_grad_(), s.double().requires_grad_()
        ref = naive_row("forward", F.softmax(td, -1), sd, "probs", "logits").sum() / n
        rp, rq = torch.autograd.grad(ref, (td, sd))
        for _ in range(3):  # first call records the signature, the others take the lane
            a = t.clone().requires_grad_()
            b = s.clone().requires_grad_()
            v = kldiv.kl_div(F.softmax(a, -1), F.log_softmax(b, -1), q_space="log_probs",
                             reduction="mean")
            assert took_fast(v)
            torch.testing.assert_close(v.double(), ref.detach(), rtol=1e-6, atol=1e-9)
            (3.0 * v).backward(retain_graph=True)
            torch.testing.assert_close(a.grad.double(), 3 * rp, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(b.grad.double(), 3 * rq, rtol=1e-5, atol=1e-8)
            ga, gb = torch.autograd.grad(v, (a, b))  # the second backward: recomputed
            torch.testing.assert_close(ga.double(), rp, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(gb.double(), rq, rtol=1e-5, atol=1e-8)
        v = kldiv.kl_div(t, b, p_space="logits", q_space="logits", reduction="sum")
        (g,) = torch.autograd.grad(v, b, create_graph=True)
        assert g.requires_grad  # differentiable operations, not the handed-over buffer
    # from 1 MiB (the cache's range since issue 12's 32 x 32000 swings)
    t = torch.randn(8, 32768)
    s = torch.randn(8, 32768, requires_grad=True)
    assert t.numel() * 4 >= torch_fused.GRAD_CACHE_MIN_BYTES
    want = (F.softmax(s.detach().double(), -1) - F.softmax(t.double(), -1)) / 8
    ptrs = []
    for _ in range(3):
        s.grad = None
        kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean").backward()
        ptrs.append(s.grad.data_ptr())
        torch.testing.assert_close(s.grad.double(), want, rtol=1e-5, atol=1e-10)
    assert len(set(ptrs)) == 1
    held = s.grad
    s.grad = None
    kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean").backward()
    assert s.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held.double(), want, rtol=1e-5, atol=1e-10)
