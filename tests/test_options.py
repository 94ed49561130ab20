"""The model-side options (issue 15): softcap, logit_scale, vocab_size, labels + ignore_index.

References are independent of kldiv: the textbook formulas on float64 logits written out here
with torch (``cap * tanh(scale * x / cap)`` as Gemma-2's forward writes it, log-softmax, the
sums), torch.autograd on them for gradients (per row, and double backward), mpmath
(``tests/oracle.py``) where the inputs are extreme, and the plain ``mask=`` for labels.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kldiv
from conftest import to_numpy

import oracle

torch = pytest.importorskip("torch")

KINDS = ("forward", "reverse", "js", "jeffreys")
FN = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
      "jeffreys": kldiv.jeffreys_div}
LOGITS = dict(p_space="logits", q_space="logits")


def gemma(x, cap=None, scale=None):
    """The model's forward, as Gemma-2 / TRL write it (the reference, not kldiv's code)."""
    if scale is not None:
        x = x * scale
    if cap is not None:
        x = torch.tanh(x / cap) * cap
    return x


def naive_rows(kind, a, b, temperature=1.0, beta=0.5):
    """Per-row divergence of float64 logits by the textbook formula (no -inf allowed)."""
    lp = torch.log_softmax(a / temperature, -1)
    lq = torch.log_softmax(b / temperature, -1)
    p, q = lp.exp(), lq.exp()
    if kind == "forward":
        return (p * (lp - lq)).sum(-1)
    if kind == "reverse":
        return (q * (lq - lp)).sum(-1)
    if kind == "jeffreys":
        return ((p - q) * (lp - lq)).sum(-1)
    lm = torch.log(beta * p + (1 - beta) * q)
    return beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)


def call(kind, p, q, **kw):
    if kind == "js":
        kw.setdefault("beta", 0.3)
    return FN[kind](p, q, **kw)


def data(n=4, v=9, seed=0, scale=6.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    y = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    return x, y


def assert_rows(got, want, rtol, what, atol=1e-13):
    """Row by row: |got - want| <= rtol * max|want row| + atol (atol: the float64 rounding of
    the naive reference itself, which forms log-ratios of size ~10 to get gradients of ~1e-7)."""
    got = np.atleast_2d(to_numpy(got))
    want = np.atleast_2d(to_numpy(want))
    assert got.shape == want.shape, what
    for i, (g, w) in enumerate(zip(got, want)):
        tol = rtol * np.max(np.abs(w)) + atol
        assert np.max(np.abs(g - w)) <= tol, f"{what}: row {i}: {g} vs {w}"


# ----------------------------------------------------------------------------------------------
# softcap and logit_scale: values and gradients against torch.autograd on the naive formula


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cap,scale,temperature", [(5.0, None, 1.0), (3.0, 0.7, 2.0),
                                                   (None, 1.3, 0.5), ((4.0, None), None, 1.0),
                                                   ((None, 2.5), (2.0, 0.5), 1.5)])
def test_softcap_values_and_row_gradients(kind, cap, scale, temperature):
    x, y = data(seed=1)
    cot = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
    pc, qc = (cap if isinstance(cap, tuple) else (cap, cap))
    ps, qs = (scale if isinstance(scale, tuple) else (scale, scale))
    want = naive_rows(kind, gemma(a, pc, ps), gemma(b, qc, qs), temperature, 0.3)
    want_ga, want_gb = torch.autograd.grad((want * cot).sum(), (a, b))
    a2, b2 = x.clone().requires_grad_(), y.clone().requires_grad_()
    got = call(kind, a2, b2, softcap=cap, logit_scale=scale, temperature=temperature, **LOGITS)
    ga, gb = torch.autograd.grad((got * cot).sum(), (a2, b2))
    assert_rows(got[None], want.detach()[None], 1e-12, "value")
    assert_rows(ga, want_ga, 1e-10, "grad p")
    assert_rows(gb, want_gb, 1e-10, "grad q")


@pytest.mark.parametrize("kind", KINDS)
def test_softcap_second_order(kind):
    x, y = data(n=2, v=5, seed=2, scale=4.0)
    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
    f = lambda a, b: call(kind, a, b, softcap=3.0, logit_scale=(0.8, 1.2), temperature=1.5,
                          reduction="sum", **LOGITS)
    if kind == "forward":  # (numerical second derivatives: the slow part; once is enough)
        assert torch.autograd.gradgradcheck(f, (a, b))
    # and the Hessian-vector product equals the naive formula's
    v = torch.randn_like(x)
    def hvp(fun):
        aa = x.clone().requires_grad_()
        g, = torch.autograd.grad(fun(aa, y), aa, create_graph=True)
        return torch.autograd.grad((g * v).sum(), aa)[0]
    naive = lambda a, b: naive_rows(kind, gemma(a, 3.0, 0.8), gemma(b, 3.0, 1.2), 1.5, 0.3).sum()
    assert_rows(hvp(f), hvp(naive), 1e-9, "hvp")


def test_softcap_is_softcap_then_temperature():
    x, y = data(seed=3)
    got = kldiv.kl_div(x, y, softcap=2.0, temperature=4.0, **LOGITS)
    want = naive_rows("forward", gemma(x, 2.0) / 4.0, gemma(y, 2.0) / 4.0)
    wrong = naive_rows("forward", gemma(x / 4.0, 2.0), gemma(y / 4.0, 2.0))
    assert_rows(got[None], want[None], 1e-12, "order")
    assert float((got - wrong).abs().max()) > 1e-3  # the other order is a different number


def test_softcap_backends(xp):
    """NumPy, torch, JAX and array_api_strict agree with the float64 reference."""
    x, y = data(seed=4)
    want = naive_rows("forward", gemma(x, 5.0, 0.5), gemma(y, 5.0, 0.5), 2.0)
    got = kldiv.kl_div(xp.asarray(x.numpy()), xp.asarray(y.numpy()), softcap=5.0,
                       logit_scale=0.5, temperature=2.0, **LOGITS)
    assert xp.is_native(got)
    assert_rows(to_numpy(got)[None], want.numpy()[None], 1e-12, xp.name)


def test_softcap_float32_and_half():
    x, y = data(seed=6, scale=30.0)
    want = naive_rows("js", gemma(x.float().double(), 10.0), gemma(y.float().double(), 10.0))
    got = kldiv.js_div(x.float(), y.float(), softcap=10.0, **LOGITS)
    assert got.dtype == torch.float32
    assert_rows(got[None], want[None], 1e-5, "float32")
    xb, yb = x.to(torch.bfloat16), y.to(torch.bfloat16)
    want = naive_rows("forward", gemma(xb.double(), 10.0), gemma(yb.double(), 10.0))
    got = kldiv.kl_div(xb, yb, softcap=10.0, **LOGITS)
    assert got.dtype == torch.float32  # capped in float32, not in bfloat16
    assert_rows(got[None], want[None], 1e-5, "bfloat16")


def test_jax_gradients_first_and_second_order():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x, y = data(n=3, v=6, seed=7)
    cot = torch.randn(3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    v = torch.randn(3, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    opts = dict(softcap=(2.5, 4.0), logit_scale=1.5, temperature=0.7, **LOGITS)

    def f(a):
        return jnp.sum(kldiv.kl_div(a, jnp.asarray(y.numpy()), **opts) * jnp.asarray(cot.numpy()))

    # under jit: one compilation instead of hundreds of eager dispatches
    g, hv = jax.jit(lambda a, t: jax.jvp(jax.grad(f), (a,), (t,)))(jnp.asarray(x.numpy()),
                                                                   jnp.asarray(v.numpy()))
    a = x.clone().requires_grad_()
    ref = (naive_rows("forward", gemma(a, 2.5, 1.5), gemma(y, 4.0, 1.5), 0.7) * cot).sum()
    rg, = torch.autograd.grad(ref, a, create_graph=True)
    rhv, = torch.autograd.grad((rg * v).sum(), a)
    assert_rows(np.asarray(g), rg.detach(), 1e-10, "jax grad")
    assert_rows(np.asarray(hv), rhv, 1e-9, "jax hvp")


# ----------------------------------------------------------------------------------------------
# adversarial inputs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_logits_are_bounded_by_the_cap(dtype):
    """Logits of +-1e30 (float64) / +-3e38 (float32): the cap bounds them, the value is the
    mpmath KL of the capped logits (computed from the exact tanh limits)."""
    big = 1e30 if dtype == torch.float64 else 3e38
    x = torch.tensor([[big, 0.0, -big, 1.0], [-big, -big, 2.0, big]], dtype=dtype)
    y = torch.tensor([[0.5, big, 3.0, -big], [1.0, -1.0, -big, 0.0]], dtype=dtype)
    got = kldiv.kl_div(x, y, softcap=4.0, reduction="none", **LOGITS)
    assert torch.isfinite(got).all()
    capped = lambda t: (4.0 * np.tanh(t.double().numpy() / 4.0))
    want = oracle.rows(oracle.kl, capped(x), capped(y), p_space="logits", q_space="logits")
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6 if dtype == torch.float32
                               else 1e-13)
    a = x.clone().requires_grad_()
    kldiv.kl_div(a, y, softcap=4.0, reduction="sum", **LOGITS).backward()
    assert torch.isfinite(a.grad).all()


def test_minus_inf_stays_masked():
    """A -inf logit is a masked category: the cap does not unmask it (no mass at -cap)."""
    inf = math.inf
    x = torch.tensor([[0.0, 1.0, -inf, 2.0], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([[0.5, -1.0, 3.0, 0.0], [0.0, -inf, 1.0, 1.0]], dtype=torch.float64)
    a = x.clone().requires_grad_()
    b = y.clone().requires_grad_()
    got = kldiv.kl_div(a, b, softcap=2.0, logit_scale=-1.5, **LOGITS)
    # row 0: p is 0 at the masked column, whatever q is: the KL over the other three columns
    capped = lambda t: 2.0 * np.tanh(-1.5 * t / 2.0)
    xs = x[0].numpy().copy()
    xs[[0, 1, 3]] = capped(xs[[0, 1, 3]])
    want0 = oracle.kl(xs, np.r_[capped(y[0].numpy())], p_space="logits", q_space="logits")
    np.testing.assert_allclose(float(got[0].detach()), float(want0), rtol=1e-13)
    assert float(got[1].detach()) == inf  # p > 0 = q at the masked column of q
    got[0].backward()  # (row 1 is +inf: its gradient is 0, as the core's convention)
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert float(a.grad[0, 2]) == 0.0 and float(b.grad[0, 2]) != 0.0
    # the same convention with logit_scale alone (a negative scale must not make -inf +inf)
    v = kldiv.kl_div(x[:1], y[:1], logit_scale=-2.0, **LOGITS)
    xs = x[0].numpy() * -2.0
    xs[2] = -inf
    np.testing.assert_allclose(float(v[0]), float(oracle.kl(xs, y[0].numpy() * -2.0,
                                                             p_space="logits",
                                                             q_space="logits")), rtol=1e-13)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(rows=hnp.arrays(np.float64, (2, 2, 6), elements=st.floats(-1e300, 1e300)),
       cap=st.floats(0.01, 1e3), temperature=st.floats(1e-3, 1e3),
       kind=st.sampled_from(KINDS))
def test_softcap_bounds_any_logits(rows, cap, temperature, kind):
    """Invariants on any finite logits (up to 1e300): the value is finite, >= 0 and at most
    4 cap / T (every capped log-ratio lies within 4 cap / T: each side's logits span at most
    2 cap), and JS stays below log 2."""
    v = call(kind, rows[0], rows[1], softcap=cap, temperature=temperature, **LOGITS)
    assert np.all(np.isfinite(v)) and np.all(v >= 0)
    bound = 4 * cap / temperature * (2 if kind == "jeffreys" else 1)
    assert np.all(v <= bound * (1 + 1e-12) + 1e-300)
    if kind == "js":
        assert np.all(v <= math.log(2) * (1 + 1e-12))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(rows=hnp.arrays(np.float64, (2, 2, 5), elements=st.floats(-50, 50)),
       kind=st.sampled_from(KINDS))
def test_large_cap_tends_to_no_cap(rows, kind):
    """cap -> infinity: cap * tanh(x / cap) = x - x^3 / (3 cap^2) + ..., so a cap 1e6 times the
    largest |logit| moves every value by about 1e-12 of its scale."""
    cap = 1e6 * max(float(np.max(np.abs(rows))), 1.0)
    a = call(kind, rows[0], rows[1], softcap=cap, **LOGITS)
    b = call(kind, rows[0], rows[1], **LOGITS)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# vocab_size


def test_vocab_size_mismatched_widths_and_the_padding_mistake(xp):
    """Qwen-style: student 13 columns, teacher 16 (padded); vocab_size = 12 keeps the real
    vocabulary of both. Padding the student with zero logits (Liger) is a different number."""
    g = np.random.default_rng(10)
    t = g.normal(size=(3, 16)) * 3
    s = g.normal(size=(3, 13)) * 3
    want = oracle.rows(oracle.kl, t[:, :12], s[:, :12], p_space="logits", q_space="logits")
    got = kldiv.kl_div(xp.asarray(t), xp.asarray(s), vocab_size=12, **LOGITS)
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12)
    # the padding mistake: the student padded to 16 with zero logits, no cut
    padded = np.concatenate([s, np.zeros((3, 3))], axis=1)
    wrong = oracle.rows(oracle.kl, t, padded, p_space="logits", q_space="logits")
    assert np.all(np.abs(wrong - want) > 1e-3)
    # whatever the padded columns hold (huge, -inf, nan-free garbage) does not matter
    t2 = t.copy()
    t2[:, 12:] = [1e30, -np.inf, 50.0, 7.0][:4][:t2.shape[1] - 12]
    got2 = kldiv.kl_div(xp.asarray(t2), xp.asarray(s), vocab_size=12, **LOGITS)
    np.testing.assert_allclose(to_numpy(got2), want, rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_size_gradients_and_spaces(kind):
    x, y = data(n=3, v=10, seed=11)
    cot = torch.randn(3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    a, b = x.clone().requires_grad_(), y[:, :8].clone().requires_grad_()
    got = call(kind, torch.log_softmax(a, -1), b, p_space="log_probs", q_space="logits",
               vocab_size=7, softcap=(None, 3.0), temperature=1.3)
    ga, gb = torch.autograd.grad((got * cot).sum(), (a, b))
    a2, b2 = x.clone().requires_grad_(), y[:, :8].clone().requires_grad_()
    want = naive_rows(kind, a2[:, :7], gemma(b2[:, :7], 3.0), 1.3, 0.3)
    wa, wb = torch.autograd.grad((want * cot).sum(), (a2, b2))
    assert_rows(got[None], want.detach()[None], 1e-12, "value")
    assert_rows(ga, wa, 1e-10, "grad p")
    assert_rows(gb, wb, 1e-10, "grad q")
    assert float(gb[:, 7:].abs().max()) == 0.0  # (p's cut columns: zero up to rounding, via
    # the log_softmax taken before the cut, checked against the reference above)


def test_vocab_size_probabilities():
    g = np.random.default_rng(13)
    p = np.concatenate([g.dirichlet(np.ones(6), size=2), np.zeros((2, 2))], axis=1)
    q = g.dirichlet(np.ones(6), size=2)
    got = kldiv.kl_div(p, q, vocab_size=6)
    np.testing.assert_allclose(got, oracle.rows(oracle.kl, p[:, :6], q), rtol=1e-12)
    p[1, 7] = 0.1
    p[1] /= p[1].sum()
    with pytest.raises(ValueError, match=r"vocab_size: p \(probabilities\) holds mass .* row 1"):
        kldiv.kl_div(p, q, vocab_size=6)
    # a masked row may hold anything
    assert kldiv.kl_div(p, q, vocab_size=6, mask=np.array([True, False]))[1] == 0.0


def test_vocab_size_other_axis():
    g = np.random.default_rng(14)
    t = g.normal(size=(9, 2, 3))
    s = g.normal(size=(7, 2, 3))
    got = kldiv.reverse_kl(t, s, axis=0, vocab_size=6, **LOGITS)
    want = oracle.rows(oracle.reverse_kl, np.moveaxis(t[:6], 0, -1).reshape(-1, 6),
                       np.moveaxis(s[:6], 0, -1).reshape(-1, 6), p_space="logits",
                       q_space="logits").reshape(2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# labels and ignore_index


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_labels_equal_mask(xp, reduction):
    if xp.name == "jax" and reduction == "none":
        pytest.skip("JAX eager is slow on CI's 2 cores: one reduction covers it")
    g = np.random.default_rng(15)
    x = g.normal(size=(2, 3, 5))
    y = g.normal(size=(2, 3, 5))
    labels = np.array([[3, -100, 0], [-100, 4, 1]])
    mask = labels != -100
    x[0, 1] = np.nan  # an ignored row may hold anything, as a masked one
    w = g.uniform(size=(2, 3))
    want = kldiv.kl_div(xp.asarray(x), xp.asarray(y), mask=xp.asarray(mask), weight=xp.asarray(w),
                        reduction=reduction, **LOGITS)
    got = kldiv.kl_div(xp.asarray(x), xp.asarray(y), labels=xp.asarray(labels),
                       weight=xp.asarray(w), reduction=reduction, **LOGITS)
    np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    if xp.name == "jax":  # (each new option set compiles on JAX: the rest is backend-agnostic)
        return
    # another ignore_index, and together with mask
    labels2 = np.where(mask, labels, 7)
    m2 = np.array([True, True, False])
    got = kldiv.js_div(xp.asarray(x), xp.asarray(y), labels=xp.asarray(labels2), ignore_index=7,
                       mask=xp.asarray(m2), reduction=reduction, **LOGITS)
    want = kldiv.js_div(xp.asarray(x), xp.asarray(y), mask=xp.asarray(mask & m2),
                        reduction=reduction, **LOGITS)
    np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


def test_labels_mean_by_hand():
    x, y = data(n=5, seed=16)
    labels = torch.tensor([-100, 2, 1, -100, 0])
    got = kldiv.kl_div(x, y, labels=labels, reduction="mean", **LOGITS)
    want = naive_rows("forward", x, y)[labels != -100].mean()
    assert abs(float(got - want)) <= 1e-14 * float(want)


# ----------------------------------------------------------------------------------------------
# bad input: errors naming the argument


def _err(exc, match, **kw):
    x, y = data(n=2, v=4)
    kw.setdefault("p_space", "logits")
    kw.setdefault("q_space", "logits")
    with pytest.raises(exc, match=match):
        kldiv.kl_div(x, y, **kw)


@pytest.mark.parametrize("value,exc", [(0.0, ValueError), (-1.0, ValueError),
                                       (math.inf, ValueError), (math.nan, ValueError),
                                       (True, TypeError), ("30", TypeError)])
def test_bad_softcap(value, exc):
    _err(exc, "softcap", softcap=value)
    _err(exc, r"softcap \(q side\)", softcap=(None, value))


@pytest.mark.parametrize("value,exc", [(0.0, ValueError), (math.inf, ValueError),
                                       (math.nan, ValueError), (False, TypeError),
                                       ("2", TypeError)])
def test_bad_logit_scale(value, exc):
    _err(exc, "logit_scale", logit_scale=value)
    _err(exc, r"logit_scale \(p side\)", logit_scale=(value, 1.0))


def test_bad_options():
    _err(ValueError, r"softcap: applies to logits .* p_space='log_probs'", softcap=(2.0, None),
         p_space="log_probs")
    _err(ValueError, "softcap: applies to logits-space inputs, and neither", softcap=2.0,
         p_space="log_probs", q_space="log_probs")
    _err(ValueError, "logit_scale: expected a number or a pair", logit_scale=(1.0, 2.0, 3.0))
    _err(ValueError, "vocab_size: expected a positive int", vocab_size=0)
    _err(TypeError, "vocab_size: expected a positive int", vocab_size=3.0)
    _err(TypeError, "vocab_size: expected a positive int", vocab_size=True)
    _err(ValueError, "vocab_size: 5 is more than the 4 categories of p", vocab_size=5)
    _err(ValueError, "ignore_index: given without labels", ignore_index=-1)
    _err(TypeError, "ignore_index: expected an int", ignore_index=1.5, labels=torch.tensor([1, 2]))
    _err(TypeError, "labels: expected an integer array", labels=torch.tensor([1.0, 2.0]))
    _err(ValueError, "labels: shape", labels=torch.tensor([1, 2, 3]))
    _err(TypeError, "labels: numpy", labels=np.array([1, 2]))
    _err(TypeError, "labels: expected an integer array of the row shape, got list", labels=[1, 2])
    _err(TypeError, "logit_scale: a tensor that requires grad",
         logit_scale=torch.tensor(2.0, requires_grad=True))
    # a scalar option applies to the logits side only: no error with a probabilities side
    x, y = data(n=2, v=4)
    p = torch.softmax(x, -1)
    got = kldiv.kl_div(p, y, q_space="logits", softcap=2.0)
    want = naive_rows("forward", torch.log(p), gemma(y, 2.0))
    assert_rows(got[None], want[None], 1e-12, "probs side untouched")
    # mismatched widths without vocab_size: the divergence's own error
    with pytest.raises(ValueError, match="same number of categories"):
        kldiv.kl_div(x, y[:, :3], **LOGITS)


def test_no_options_no_change():
    """Without options the call is the plain one (bit for bit)."""
    x, y = data(seed=17)
    a = kldiv.kl_div(x, y, **LOGITS)
    b = kldiv.kl_div(x, y, softcap=None, logit_scale=None, vocab_size=None, labels=None, **LOGITS)
    assert torch.equal(a, b)
    # vocab_size equal to the width changes nothing either
    assert torch.equal(a, kldiv.kl_div(x, y, vocab_size=x.shape[-1], **LOGITS))


# ----------------------------------------------------------------------------------------------
# the nn.Module losses take the options as constructor keywords


def test_modules():
    import kldiv.torch as kt

    x, y = data(n=4, v=9, seed=18)
    labels = torch.tensor([1, -100, 3, 4])
    loss = kt.KLDivLoss(p_space="logits", q_space="logits", softcap=3.0, vocab_size=8,
                        temperature=2.0)
    got = loss(x, y[:, :8], labels=labels)
    keep = labels != -100
    want = naive_rows("forward", gemma(x[:, :8], 3.0), gemma(y[:, :8], 3.0), 2.0)[keep].mean()
    assert abs(float(got - want)) <= 1e-13
    js = kt.JSDivLoss(beta=0.3, p_space="logits", q_space="logits", logit_scale=(None, 0.5),
                      ignore_index=3)
    got = js(x, y, labels=labels)
    keep = labels != 3
    want = naive_rows("js", x, gemma(y, None, 0.5), 1.0, 0.3)[keep].mean()
    assert abs(float(got - want)) <= 1e-13
    with pytest.raises(ValueError, match="softcap"):
        kt.ReverseKLLoss(softcap=-1.0, p_space="logits", q_space="logits")
    with pytest.raises(ValueError, match="softcap: applies to logits-space"):
        kt.KLDivLoss(softcap=2.0)  # both sides probabilities
    assert "softcap=3.0" in repr(loss)
    # the fused output layer: the student's cap inside, vocabulary cut on the weight
    h = torch.randn(4, 3, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    W = torch.randn(10, 3, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    lin = kt.LinearKLDivLoss(softcap=(None, 2.0), logit_scale=1.5, vocab_size=8)
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    got = lin(hh, WW, x, labels=labels)
    gh, gw = torch.autograd.grad(got, (hh, WW))
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    keep = labels != -100
    want = naive_rows("forward", gemma(x[:, :8], None, 1.5),
                      gemma(hh @ WW[:8].T, 2.0, 1.5))[keep].mean()
    wh, ww = torch.autograd.grad(want, (hh, WW))
    assert abs(float((got - want).detach())) <= 1e-12
    assert_rows(gh, wh, 1e-10, "grad hidden")
    assert_rows(gw, ww, 1e-10, "grad weight")
    with pytest.raises(ValueError, match=r"softcap: applies to logits .* target_space"):
        kt.LinearKLDivLoss(target_space="log_probs", softcap=(2.0, None))


# ----------------------------------------------------------------------------------------------
# the distributed family on 2 gloo ranks (one launch, forked workers; see test_distributed.py)

DV = 11
DCUT = 6  # rank 0 holds columns 0..5, rank 1 columns 6..10


def _dist_data():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(4, DV, generator=g, dtype=torch.float64) * 5
    y = torch.randn(4, DV, generator=g, dtype=torch.float64) * 5
    x[0, 2] = y[0, 2] = -math.inf  # a masked category on both sides: every kind is finite
    y[3, 8] = 1e30  # in the cut-off padding of case "in1": must not matter
    labels = torch.tensor([5, -100, 2, 7])
    h = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w = torch.randn(DV, 3, generator=g, dtype=torch.float64)
    cot = torch.randn(4, generator=g, dtype=torch.float64)
    return x, y, labels, h, w, cot


# (vocab_size, vocab_start given?) per case: the cut inside rank 1's shard, inside rank 0's
# (rank 1 keeps nothing), and the explicit Megatron start index
_DCASES = {"in1": (9, False), "in0": (4, False), "start": (8, True)}
_DOPTS = dict(softcap=(4.0, 3.0), logit_scale=(None, 0.8), temperature=1.7)


def _dist_worker(rank, world, init_file, out_dir):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        import kldiv.distributed as kd

        x, y, labels, h, w, cot = _dist_data()
        lo, hi = (0, DCUT) if rank == 0 else (DCUT, DV)
        out = {}
        for name, (vs, give_start) in _DCASES.items():
            for kind in KINDS:
                a = x[:, lo:hi].clone().requires_grad_()
                b = y[:, lo:hi].clone().requires_grad_()
                rows = kd.vocab_parallel_kl_div(
                    a, b, kind=kind, beta=0.3, reduction="none", vocab_size=vs,
                    vocab_start=lo if give_start else None, labels=labels, **_DOPTS)
                ga, gb = torch.autograd.grad((rows * cot).sum(), (a, b))
                out[name, kind] = (rows.detach(), ga, gb)
        hh, ww = h.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
        t = x[:, lo:hi].clone().requires_grad_()
        loss = kd.vocab_parallel_linear_kl_div(hh, ww, t, reduction="sum", vocab_size=9,
                                               labels=labels, chunk_size=3, **_DOPTS)
        out["linear"] = (loss.detach(), *torch.autograd.grad(loss, (hh, ww, t)))
        try:
            kd.vocab_parallel_kl_div(x[:, lo:hi], y[:, lo:hi], vocab_size=DV + 1)
        except ValueError as exc:
            out["error"] = str(exc)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    tmp = os.path.join(out_dir, f".rank{rank}.pt.tmp")
    torch.save(out, tmp)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def dist_results():
    from forked_ranks import run_forked

    return run_forked(_dist_worker, 2)


def _masked_naive(kind, a, b, vs, labels, cot):
    """The reference: cut, capped, naive rows (the -inf entry: p_i = 0, handled by hand)."""
    masked = torch.isneginf(a[:, :vs])  # a masked category stays masked under the cap
    pa = torch.where(masked, a[:, :vs], gemma(a[:, :vs], 4.0))
    qb = torch.where(torch.isneginf(b[:, :vs]), b[:, :vs], gemma(b[:, :vs], 3.0, 0.8))
    lp = torch.log_softmax(pa / 1.7, -1)
    lq = torch.log_softmax(qb / 1.7, -1)
    p, q = lp.exp(), lq.exp()
    z = torch.zeros_like(p)
    xlogy = lambda u, lu, lv: torch.where(u > 0, u * (torch.where(u > 0, lu - lv, z)), z)
    if kind == "forward":
        r = xlogy(p, lp, lq).sum(-1)
    elif kind == "reverse":
        r = xlogy(q, lq, lp).sum(-1)
    elif kind == "jeffreys":
        r = xlogy(p, lp, lq).sum(-1) + xlogy(q, lq, lp).sum(-1)
    else:
        m = 0.3 * p + 0.7 * q
        lm = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
        r = 0.3 * xlogy(p, lp, lm).sum(-1) + 0.7 * xlogy(q, lq, lm).sum(-1)
    return torch.where(labels != -100, r, torch.zeros_like(r))


@pytest.mark.parametrize("case", list(_DCASES))
def test_distributed_options(dist_results, case):
    x, y, labels, h, w, cot = _dist_data()
    vs = _DCASES[case][0]
    for kind in KINDS:
        a = x.clone().requires_grad_()
        b = y.clone().requires_grad_()
        want = _masked_naive(kind, a, b, vs, labels, cot)
        wa, wb = torch.autograd.grad((want * cot).sum(), (a, b))
        for rank, res in enumerate(dist_results):
            rows, ga, gb = res[case, kind]
            lo, hi = (0, DCUT) if rank == 0 else (DCUT, DV)
            assert_rows(rows[None], want.detach()[None], 1e-12, f"{case} {kind} rank {rank}")
            assert_rows(ga, wa[:, lo:hi], 1e-10, f"{case} {kind} grad p rank {rank}")
            assert_rows(gb, wb[:, lo:hi], 1e-10, f"{case} {kind} grad q rank {rank}")


def test_distributed_one_process_and_errors():
    """Without a process group: the same values as the core; the shard checks name the
    argument."""
    import kldiv.distributed as kd

    x, y, labels, h, w, cot = _dist_data()
    for kind in KINDS:
        got = kd.vocab_parallel_kl_div(x, y, kind=kind, beta=0.3, vocab_size=9, labels=labels,
                                       reduction="none", **_DOPTS)
        want = _masked_naive(kind, x, y, 9, labels, cot)
        assert_rows(got[None], want[None], 1e-12, kind)
    with pytest.raises(ValueError, match="vocab_start: given without vocab_size"):
        kd.vocab_parallel_kl_div(x, y, vocab_start=3)
    with pytest.raises(ValueError, match="vocab_start: expected an int >= 0"):
        kd.vocab_parallel_kl_div(x, y, vocab_size=4, vocab_start=-1)
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        kd.vocab_parallel_kl_div(x, y, labels=labels.double())
    with pytest.raises(ValueError, match="shard both at the larger"):
        kd.vocab_parallel_kl_div(x, y[:, :9], vocab_size=9)
    with pytest.raises(ValueError, match=r"softcap \(p side\)"):
        kd.vocab_parallel_js_div(x, y, softcap=(-1.0, None))
    with pytest.raises(ValueError, match="vocab_size: 12 is more than the 11 categories"):
        kd.vocab_parallel_reverse_kl(x, y, vocab_size=12)
    with pytest.raises(ValueError, match="softcap: applies to logits"):
        kd.vocab_parallel_linear_kl_div(h, w, torch.log_softmax(x, -1), target_space="log_probs",
                                        softcap=(2.0, 3.0))


def test_distributed_linear_and_errors(dist_results):
    x, y, labels, h, w, cot = _dist_data()
    hh, ww, t = (v.clone().requires_grad_() for v in (h, w, x))
    want = _masked_naive("forward", t, hh @ ww.T, 9, labels, cot).sum()
    wh, wwt, wt = torch.autograd.grad(want, (hh, ww, t))
    for rank, res in enumerate(dist_results):
        loss, gh, gw, gt = res["linear"]
        lo, hi = (0, DCUT) if rank == 0 else (DCUT, DV)
        assert abs(float(loss - want.detach())) <= 1e-12 * abs(float(want.detach()))
        assert_rows(gh, wh, 1e-10, "grad hidden")
        assert_rows(gw, wwt[lo:hi], 1e-10, "grad weight shard")
        assert_rows(gt, wt[:, lo:hi], 1e-10, "grad target shard")
        assert "vocab_size: 12 is more than the 11 categories of the full vocabulary" in \
            res["error"]


# ----------------------------------------------------------------------------------------------
# TRL's distillation loss with soft-capped models (both sides), against TRL's own code


def test_trl_chunked_loss_with_softcaps():
    dt = pytest.importorskip("trl.trainer.distillation_trainer")
    from kldiv.integrations.trl import chunked_divergence_loss

    g = torch.Generator().manual_seed(22)
    hs = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    ht = torch.randn(2, 5, 7, generator=g)
    Ws = (torch.randn(17, 6, generator=g) * 3).requires_grad_()
    Wt = torch.randn(17, 7, generator=g) * 3
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    kw = dict(student_logit_scale=0.7, teacher_logit_scale=1.3,
              student_final_logit_softcapping=4.0, teacher_final_logit_softcapping=5.0,
              temperature=2.0)
    for beta in (0.0, 0.4, 1.0):
        ref, ref_ent, _ = dt._chunked_divergence_loss(hs, ht, Ws, Wt, mask, beta, **kw)
        got, ent, _ = chunked_divergence_loss(hs, ht, Ws, Wt, mask, beta, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(got, (hs, Ws)), torch.autograd.grad(ref, (hs, Ws))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
