"""The memory-bounded fused torch path (kldiv.backends.torch_fused, the C kernel kldiv._ext._fused).

References, independent of the code under test:
- torch.autograd on the textbook float64 formulas written below row by row (log_softmax, the
  support selected by boolean indexing, so that no -inf ever meets a multiplication);
- the extended-precision oracle ``oracle.kl_extended`` for float32 accuracy at V = 32000;
- the core itself (``kldiv.kl_div`` with the fused path off): the contract is agreement with
  it to 1e-6 relative in float64.

Both implementations run: the C kernel (``impl="c"``, skipped with a visible reason when the
extension is not built) and the pure-torch chunked fallback (``impl="torch"``, forced).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from kldiv.backends import torch_fused as tf  # noqa: E402
from kldiv.torch import kl_div_inplace  # noqa: E402

import oracle  # noqa: E402  (tests/oracle.py)

KINDS = ("forward", "reverse", "js", "jeffreys")
FUNCS = {
    "forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
    "jeffreys": kldiv.jeffreys_div,
}
IMPLS = ("c", "torch")


@pytest.fixture(params=IMPLS)
def impl(request):
    """Which implementation runs: the C kernel or the forced pure-torch fallback."""
    if request.param == "c":
        if tf._EXT is None:
            pytest.skip("C extension kldiv._ext._fused not built (python setup.py build_ext)")
        yield "c"
    else:
        with tf._extension(False):
            yield "torch"


@pytest.fixture(autouse=True)
def fused_post_hook_only(monkeypatch):
    """These tests are about the fused "post" hook: take the torch "pre" hook (a faster path
    for everyday sizes, tested on its own) out of the way, so that the calls reach this one."""
    from kldiv._core import dispatch

    dispatch.handler("pre", torch.zeros(1), torch.zeros(1))  # the loader registers the hooks
    monkeypatch.delitem(dispatch._HANDLERS, ("torch", "pre"), raising=False)


@pytest.fixture
def always_fused(monkeypatch):
    """Take the fused path for inputs of any size (it normally starts at 2**20 elements)."""
    monkeypatch.setattr(tf, "FUSED_MIN_ELEMENTS", 0)


# ----------------------------------------------------------------------------------------------
# independent references: textbook float64 formulas, differentiated by torch.autograd


def _kl_rows_naive(la, lb, T):
    """KL(softmax(a/T) || softmax(b/T)) for one row, on p's support only."""
    S = torch.isfinite(la)
    lp = torch.log_softmax(la[S] / T, -1)
    lq = torch.log_softmax(lb / T, -1)[S]
    return (lp.exp() * (lp - lq)).sum()


def _js_naive(la, lb, T, beta):
    lp = torch.log_softmax(la / T, -1)
    lq = torch.log_softmax(lb / T, -1)
    fa, fb = torch.isfinite(la), torch.isfinite(lb)
    lm_a = torch.logaddexp(math.log(beta) + lp[fa], math.log1p(-beta) + lq[fa])
    lm_b = torch.logaddexp(math.log(beta) + lp[fb], math.log1p(-beta) + lq[fb])
    kp = (lp[fa].exp() * (lp[fa] - lm_a)).sum()
    kq = (lq[fb].exp() * (lq[fb] - lm_b)).sum()
    return beta * kp + (1 - beta) * kq


def naive_row(kind, a, b, T=1.0, beta=0.5):
    if kind == "forward":
        return _kl_rows_naive(a, b, T)
    if kind == "reverse":
        return _kl_rows_naive(b, a, T)
    if kind == "jeffreys":
        return _kl_rows_naive(a, b, T) + _kl_rows_naive(b, a, T)
    return _js_naive(a, b, T, beta)


def naive_with_grad(kind, a, b, scale, T=1.0, beta=0.5):
    """Rows and the gradients of sum(scale * rows), float64, by autograd on the formulas above."""
    a = a.detach().double().requires_grad_(True)
    b = b.detach().double().requires_grad_(True)
    rows = torch.stack([naive_row(kind, a[i], b[i], T, beta) for i in range(a.shape[0])])
    ga, gb = torch.autograd.grad((rows * scale.double()).sum(), [a, b])
    return rows.detach(), ga, gb


def logits(rng, n, V, *, spread=2.0, dtype=torch.float64):
    return torch.as_tensor(rng.standard_normal((n, V)) * spread, dtype=dtype)


def with_infinities(kind, a, b):
    """-inf entries that keep every kind finite: common ones, and for the KL kinds extra -inf on
    the side whose zeros are allowed (p = 0 < q for forward, q = 0 < p for reverse)."""
    a, b = a.clone(), b.clone()
    a[0, :3] = -math.inf
    b[0, :3] = -math.inf
    a[1, 5:9] = -math.inf
    b[1, 5:9] = -math.inf
    if kind in ("forward", "js"):
        a[2, 10:14] = -math.inf  # p = 0 < q: finite KL(p || q)
    if kind in ("reverse", "js"):
        b[3, 1:4] = -math.inf  # q = 0 < p: finite KL(q || p)
    return a, b


def took_fused(v):
    """Whether the autograd graph of ``v`` goes through the fused Function."""
    seen, todo = set(), [v.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if "Fused" in type(f).__name__:
            return True
        todo.extend(g for g, _ in f.next_functions)
    return False


def assert_grad_close(got, want, rtol, floor=0.0):
    """Close in the max norm: |got - want| <= rtol * max|want| + floor, elementwise.

    ``floor`` is the absolute rounding error of a gradient that cancels (q_i - p_i, or
    p_i (d_i - E_p d)): a few eps of the log-ratios' size, whatever the method."""
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * scale + floor)


# ----------------------------------------------------------------------------------------------
# the row function against the naive references


@pytest.mark.parametrize("kind", KINDS)
def test_rows_with_grad_match_naive_float64(kind, impl):
    rng = np.random.default_rng(1)
    a, b = with_infinities(kind, logits(rng, 6, 40), logits(rng, 6, 40))
    scale = torch.as_tensor(rng.uniform(0.5, 2.0, 6))
    scale[4] = 0.0  # skipped row: value 0, gradient 0
    T, beta = 1.7, 0.3
    rows, gp, gq = tf.divergence_rows_with_grad(
        kind, a, b, p_space="logits", q_space="log_probs", temperature=T, beta=beta,
        need_grad_p=True, need_grad_q=True, grad_scale=scale,
    )
    ref, ga, gb = naive_with_grad(kind, a, b, scale, T, beta)
    ref[4] = 0.0
    torch.testing.assert_close(rows, ref, rtol=1e-10, atol=1e-13)
    assert_grad_close(gp, ga, 1e-9)
    assert_grad_close(gq, gb, 1e-9)
    assert torch.all(gp[4] == 0) and torch.all(gq[4] == 0)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_escape_rows_are_inf_with_zero_gradient(kind, impl):
    """p_i > 0 = q_i (forward) or q_i > 0 = p_i (reverse): +inf, and a zero gradient there."""
    rng = np.random.default_rng(2)
    a, b = logits(rng, 3, 30), logits(rng, 3, 30)
    if kind == "forward":
        b[1, 7] = -math.inf
    else:
        a[1, 7] = -math.inf
    rows, gp, gq = tf.divergence_rows_with_grad(
        kind, a, b, p_space="logits", q_space="logits", need_grad_p=True, need_grad_q=True,
    )
    assert math.isinf(rows[1]) and rows[1] > 0
    assert torch.all(gp[1] == 0) and torch.all(gq[1] == 0)
    keep = torch.tensor([True, False, True])
    ref, ga, gb = naive_with_grad(kind, a[keep], b[keep], torch.ones(2))
    torch.testing.assert_close(rows[keep], ref, rtol=1e-10, atol=0)
    assert_grad_close(gq[keep], gb, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_divergence_is_finite(dtype, impl):
    """KL of about 104 and 804: beyond exp's range in float32/float64 for p_i e^{d_i}."""
    V = 50
    a = torch.zeros(2, V, dtype=torch.float64)
    b = torch.zeros(2, V, dtype=torch.float64)
    a[:, 0] = 50.0  # p almost all on category 0 ...
    b[0, 0] = -100.0  # ... where q is tiny (float32 case) ...
    b[1, 0] = -800.0  # ... or tinier than any float32 (float64 case)
    a, b = a.to(dtype), b.to(dtype)
    rows, _, gq = tf.divergence_rows_with_grad("forward", a, b, p_space="logits",
                                               q_space="logits")
    ref, _, gb = naive_with_grad("forward", a, b, torch.ones(2))
    torch.testing.assert_close(rows.double(), ref, rtol=1e-5 if dtype == torch.float32 else 1e-10,
                               atol=0)
    assert_grad_close(gq, gb, 1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_float32_accuracy_large_vocabulary(kind, impl):
    """V = 32000, from far apart to nearly equal (KL down to ~1e-9): 1e-5 relative in float32."""
    rng = np.random.default_rng(3)
    n, V = 6, 32000
    a = rng.standard_normal((n, V)) * 2
    noise = np.logspace(-4.5, 0, n)[:, None]
    b = a + noise * rng.standard_normal((n, V))
    a32, b32 = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    rows, _, gq = tf.divergence_rows_with_grad(kind, a32, b32, p_space="logits",
                                               q_space="logits")
    x, y = (a32.numpy(), b32.numpy()) if kind == "forward" else (b32.numpy(), a32.numpy())
    ref = oracle.kl_extended(x, y)  # exact float32 inputs, extended precision
    np.testing.assert_allclose(rows.double().numpy(), ref, rtol=1e-5)
    _, _, gb = naive_with_grad(kind, a32, b32, torch.ones(n))
    assert gq.dtype == torch.float32
    assert_grad_close(gq, gb, 1e-5)


def test_half_inputs_are_upcast_per_call(impl):
    """bfloat16 in, float32 arithmetic; gradients come back in the input dtype."""
    rng = np.random.default_rng(4)
    a = logits(rng, 5, 64, dtype=torch.bfloat16)
    b = logits(rng, 5, 64, dtype=torch.bfloat16)
    rows, gp, gq = tf.divergence_rows_with_grad("forward", a, b, p_space="logits",
                                                q_space="logits", need_grad_p=True)
    assert rows.dtype == torch.float32
    assert gp.dtype == gq.dtype == torch.bfloat16
    ref, ga, gb = naive_with_grad("forward", a, b, torch.ones(5))  # the bf16 values, exactly
    torch.testing.assert_close(rows.double(), ref, rtol=1e-5, atol=1e-7)
    assert_grad_close(gq, gb, 1e-2)  # bfloat16 keeps 8 bits


def test_skipped_rows_may_hold_anything(impl):
    """A row with zero scale is never read: nan there changes nothing."""
    rng = np.random.default_rng(5)
    a, b = logits(rng, 4, 20), logits(rng, 4, 20)
    a[2] = math.nan
    b[2, 3] = math.inf
    scale = torch.tensor([1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    rows, gp, gq = tf.divergence_rows_with_grad("reverse", a, b, p_space="log_probs",
                                                q_space="logits", need_grad_p=True,
                                                grad_scale=scale)
    assert rows[2] == 0 and torch.all(gp[2] == 0) and torch.all(gq[2] == 0)
    keep = torch.tensor([True, True, False, True])
    ref, ga, gb = naive_with_grad("reverse", a[keep], b[keep], scale[keep])
    torch.testing.assert_close(rows[keep], ref, rtol=1e-10, atol=0)
    assert_grad_close(gp[keep], ga, 1e-9)


def test_rows_the_fast_algebra_declines_go_to_the_core(impl):
    """nan input (value checks off) gives nan, value and gradient (issue 11 item 6: a diverged
    model is never hidden); an all -inf row is recomputed by the core's own row function."""
    rng = np.random.default_rng(13)
    a, b = logits(rng, 3, 8), logits(rng, 3, 8)
    a[0, 2] = math.nan
    b[2] = -math.inf
    rows, _, gq = tf.divergence_rows_with_grad("forward", a, b, p_space="logits",
                                               q_space="logits")
    assert math.isnan(rows[0]) and bool(torch.isnan(gq[0]).all())
    with tf.fused(False):
        core = kldiv.kl_div(a[2:], b[2:], p_space="logits", q_space="logits", validate=False)
    torch.testing.assert_close(rows[2:], core, rtol=1e-12, atol=0, equal_nan=True)
    ref, _, gb = naive_with_grad("forward", a[1:2], b[1:2], torch.ones(1))
    torch.testing.assert_close(rows[1:2], ref, rtol=1e-10, atol=0)
    assert_grad_close(gq[1:2], gb, 1e-9)


def test_row_function_rejects_bad_arguments():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind"):
        tf.divergence_rows_with_grad("kl", a, a, p_space="logits", q_space="logits")
    with pytest.raises(ValueError, match="p_space"):
        tf.divergence_rows_with_grad("forward", a, a, p_space="probs", q_space="logits")
    with pytest.raises(ValueError, match="2-D"):
        tf.divergence_rows_with_grad("forward", a[0], a[0], p_space="logits", q_space="logits")
    with pytest.raises(ValueError, match="grad_scale"):
        tf.divergence_rows_with_grad("forward", a, a, p_space="logits", q_space="logits",
                                     grad_scale=torch.ones(3))


# ----------------------------------------------------------------------------------------------
# kldiv.kl_div & co. through the core's hook: fused against the core


def _run(fn, a, b, *, fused, **kw):
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    with tf.fused(fused):
        v = fn(a, b, **kw)
    ga, gb = torch.autograd.grad(v, [a, b])
    return v, ga, gb


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_equals_core_float64(kind, reduction, impl, always_fused):
    rng = np.random.default_rng(6)
    a, b = with_infinities(kind, logits(rng, 12, 33), logits(rng, 12, 33))
    a, b = a.reshape(3, 4, 33), b.reshape(3, 4, 33)
    mask = torch.as_tensor(rng.uniform(size=(3, 4)) > 0.25)
    weight = torch.as_tensor(rng.uniform(0.0, 2.0, size=(1, 4)))  # broadcast over rows
    kw = dict(p_space="logits", q_space="log_probs", reduction=reduction, mask=mask,
              weight=weight, temperature=0.8, t2_scale=True, validate=False)
    if kind == "js":
        kw["beta"] = 0.7
    fn = FUNCS[kind]
    v, ga, gb = _run(fn, a, b, fused=True, **kw)
    assert took_fused(v)  # the fused path was taken
    v0, ga0, gb0 = _run(fn, a, b, fused=False, **kw)
    assert not took_fused(v0)
    torch.testing.assert_close(v, v0, rtol=1e-6, atol=0)
    assert_grad_close(ga, ga0, 1e-6)
    assert_grad_close(gb, gb0, 1e-6)
    # and the naive formula: value = T^2 * sum(mask * w * rows) [/ sum(mask * w)]
    c = (mask * weight).reshape(-1).double()
    if reduction == "mean":
        c = c / c.sum()
    ref, ra, rb = naive_with_grad(kind, a.reshape(-1, 33), b.reshape(-1, 33), c, 0.8,
                                  kw.get("beta", 0.5))
    torch.testing.assert_close(v, 0.64 * (ref * c).sum(), rtol=1e-9, atol=0)
    assert_grad_close(gb.reshape(-1, 33), 0.64 * rb, 1e-9)


def test_all_rows_masked_mean_is_zero(impl, always_fused):
    a = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    b = a.flip(-1).clone().requires_grad_(True)
    v = kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="mean",
                     mask=torch.zeros(3, dtype=torch.bool))
    assert took_fused(v)
    assert float(v.detach()) == 0.0
    (g,) = torch.autograd.grad(v, [b])
    assert torch.all(g == 0)


def test_inf_row_with_zero_weight_counts_nothing(impl, always_fused):
    a = torch.zeros(2, 4, dtype=torch.float64)
    b = torch.zeros(2, 4, dtype=torch.float64)
    b[0, 1] = -math.inf  # KL(p || q) = +inf in row 0
    b.requires_grad_(True)
    kw = dict(p_space="logits", q_space="logits", reduction="mean")
    v = kldiv.kl_div(a, b, weight=torch.tensor([0.0, 1.0], dtype=torch.float64), **kw)
    assert float(v.detach()) == 0.0
    v = kldiv.kl_div(a, b, **kw)
    assert math.isinf(float(v.detach()))


def test_noncontiguous_and_axis(impl, always_fused):
    """Categories on axis 0: the core moves them last (a strided view); still the same values."""
    rng = np.random.default_rng(8)
    a, b = logits(rng, 25, 6), logits(rng, 25, 6)
    kw = dict(p_space="logits", q_space="logits", axis=0, reduction="mean")
    v, ga, gb = _run(kldiv.kl_div, a, b, fused=True, **kw)
    assert took_fused(v)
    ref, ra, rb = naive_with_grad("forward", a.T, b.T, torch.full((6,), 1 / 6, dtype=torch.float64))
    torch.testing.assert_close(v, ref.mean(), rtol=1e-10, atol=0)
    assert_grad_close(gb, rb.T, 1e-9)
    assert_grad_close(ga, ra.T, 1e-9)


def test_float32_through_kl_div(impl, always_fused):
    rng = np.random.default_rng(9)
    a = logits(rng, 8, 500, dtype=torch.float32)
    b = (a + 0.1 * logits(rng, 8, 500, dtype=torch.float32)).requires_grad_(True)
    v = kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="mean")
    assert v.dtype == torch.float32 and took_fused(v)
    v.backward()
    ref = oracle.kl_extended(a.numpy(), b.detach().numpy()).mean()
    assert abs(float(v.detach()) - ref) <= 1e-5 * ref
    _, _, rb = naive_with_grad("forward", a, b, torch.full((8,), 1 / 8))
    assert_grad_close(b.grad, rb, 1e-5)


def test_no_grad_uses_fused_forward_at_any_size(impl):
    rng = np.random.default_rng(10)
    a, b = logits(rng, 4, 7), logits(rng, 4, 7)
    with torch.no_grad():
        v = kldiv.reverse_kl(a, b, p_space="logits", q_space="logits", reduction="sum")
        with tf.fused(False):
            v0 = kldiv.reverse_kl(a, b, p_space="logits", q_space="logits", reduction="sum")
    torch.testing.assert_close(v, v0, rtol=1e-12, atol=0)


def test_small_inputs_keep_second_derivatives():
    """Below FUSED_MIN_ELEMENTS with gradients recorded, the core computes (Hessian-vector
    products, as TRPO needs): the Hessian of KL(p || softmax(b)) in b is diag(q) - q q^T."""
    a = torch.tensor([[0.2, -0.4, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.1, 0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    v = kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="mean")
    assert not took_fused(v)
    (g,) = torch.autograd.grad(v, [b], create_graph=True)
    u = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    (hv,) = torch.autograd.grad((g * u).sum(), [b])
    q = torch.softmax(b.detach(), -1)[0]
    H = torch.diag(q) - torch.outer(q, q)
    torch.testing.assert_close(hv[0], H @ u[0], rtol=1e-10, atol=1e-14)


def test_fused_first_derivatives_only(always_fused):
    a = torch.zeros(2, 3, dtype=torch.float64)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    v = kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="sum")
    with pytest.raises(RuntimeError, match="first derivatives only.*set_fused"):
        torch.autograd.grad(v, [b], create_graph=True)


def test_fused_backward_once(always_fused):
    a = torch.zeros(2, 3, dtype=torch.float64)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    v = kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="sum")
    v.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run once"):
        v.backward()


def test_upstream_gradient_scales(impl, always_fused):
    rng = np.random.default_rng(11)
    a, b = logits(rng, 3, 9), logits(rng, 3, 9).requires_grad_(True)
    v = kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="sum")
    (3.5 * v).backward()
    _, _, rb = naive_with_grad("forward", a, b, torch.ones(3))
    assert_grad_close(b.grad, 3.5 * rb, 1e-10)


def test_set_fused_switch():
    a = torch.zeros(1, 1 << 20)
    b = torch.zeros(1, 1 << 20, requires_grad=True)
    kw = dict(p_space="logits", q_space="logits", reduction="sum", validate=False)
    assert tf.fused_enabled()
    assert took_fused(kldiv.kl_div(a, b, **kw))
    tf.set_fused(False)
    try:
        assert not tf.fused_enabled()
        assert not took_fused(kldiv.kl_div(a[:, :4], b[:, :4], **kw))
    finally:
        tf.set_fused(True)


# ----------------------------------------------------------------------------------------------
# kl_div_inplace


@pytest.mark.parametrize("kind", ["forward", "js"])
def test_inplace_value_gradient_and_overwrite(kind, impl):
    rng = np.random.default_rng(12)
    t = logits(rng, 2 * 3, 17).reshape(2, 3, 17)
    h = logits(rng, 2 * 3, 17).reshape(2, 3, 17).requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    s = h * 1.0  # the student's logits: a non-leaf made for this loss only
    before = s.detach().clone()
    ptr = s.data_ptr()
    loss = kl_div_inplace(t, s, kind=kind, mask=mask, temperature=1.5, beta=0.25)
    c = mask.reshape(-1).double() / mask.sum()
    ref, _, rb = naive_with_grad(kind, t.reshape(-1, 17), before.reshape(-1, 17), c, 1.5, 0.25)
    torch.testing.assert_close(loss.detach(), (ref * c).sum(), rtol=1e-10, atol=0)
    assert s.data_ptr() == ptr and not torch.equal(s.detach(), before)  # overwritten
    loss.backward()
    assert_grad_close(h.grad.reshape(-1, 17), rb, 1e-9)


def test_inplace_rejects_what_it_cannot_overwrite():
    t = torch.zeros(2, 3)
    leaf = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="q_logits: a leaf"):
        kl_div_inplace(t, leaf)
    with pytest.raises(ValueError, match="reduction"):
        kl_div_inplace(t, torch.zeros(2, 3), reduction="none")
    with pytest.raises(ValueError, match="shapes"):
        kl_div_inplace(t, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        kl_div_inplace(t, torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="viewed as"):
        kl_div_inplace(torch.zeros(3, 2, 4), torch.zeros(2, 3, 4).transpose(0, 1))


# ----------------------------------------------------------------------------------------------
# properties


def test_property_fused_equals_core():
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=25, deadline=None, derandomize=True)
    @hyp.given(
        kind=st.sampled_from(KINDS), n=st.integers(1, 5), V=st.integers(1, 40),
        T=st.floats(0.25, 4.0), seed=st.integers(0, 2**31), c_kernel=st.booleans(),
    )
    def check(kind, n, V, T, seed, c_kernel):
        rng = np.random.default_rng(seed)
        a, b = logits(rng, n, V, spread=3.0), logits(rng, n, V, spread=3.0)
        scale = torch.as_tensor(rng.uniform(0.0, 1.0, n))
        with tf._extension(c_kernel):
            rows, gp, gq = tf.divergence_rows_with_grad(
                kind, a, b, p_space="logits", q_space="logits", temperature=T,
                need_grad_p=True, grad_scale=scale)
        ref, ga, gb = naive_with_grad(kind, a, b, scale, T)
        torch.testing.assert_close(rows, torch.where(scale > 0, ref, 0 * ref), rtol=1e-9,
                                   atol=1e-14)
        assert torch.all(rows >= 0)
        floor = 8 * 2.0**-52 * (1 + float(torch.cat([a, b]).abs().max()) / T) / T
        assert_grad_close(gp, ga, 1e-8, floor * float(scale.max()))
        assert_grad_close(gq, gb, 1e-8, floor * float(scale.max()))

    check()
