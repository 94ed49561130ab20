"""The core's later leftovers of issue 11 (kldiv._core.divergence; the fast paths are switched
off), each against mpmath on the exact float32 inputs, per row:

(1) float32 JS gradients on far, nearly disjoint rows (logits of std 3, 4, 8: JS near log 2),
    torch (autograd through the core) and JAX (jax.grad): the derivative beta p (log(p/m) - ...)
    is formed from u = log(m / (beta p)), small where the rows are far, not from log(m/p), which
    sits at log(beta) there (1e-5 .. O(1) relative error before). Target 1e-5 per row,
    normwise over both sides' gradients. Second derivatives (torch double backward, jax.hessian)
    against torch.autograd on the float64 textbook formula.
(2) float32 rows of a huge KL (~1e38) whose mass lies far below the *other* side's maximum
    (3e38, -3e38, finfo.min masking): the gradient is O(1) and needs the exact difference of
    entries that each side's shift by its own maximum rounded to one number (reverse KL of
    a = [2, -1, 3e38], b = [0, -1, -3.4e38] gave d/db = [0.197, -0.197, 0] for [-0.393, 0.393,
    0]). Forward, reverse, JS, Jeffreys (whose derivatives on rows with |log(q/p)| > 20
    are formed from log-ratios centred by p and by q; Hessians there against torch.autograd
    on the float64 textbook formula).

The reference: value and gradient with respect to both sides' logits from mpmath at 400 bits
(dF/da = G - p sum G with G_i = p_i dF/dp_i; ``_mp_value_grad``).
"""
from __future__ import annotations

import mpmath
import numpy as np
import pytest

import kldiv

F32MAX = float(np.finfo(np.float32).max)
FUNCS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}


@pytest.fixture(autouse=True)
def core_only(monkeypatch):
    """Switch every fast path off: the tests here are of the core (kldiv._core)."""
    from kldiv._core import dispatch

    monkeypatch.setattr(dispatch, "handler", lambda *a, **k: None)


def _mp_log_softmax(x):
    m = max(x)
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in x)) + m
    return [v - lse for v in x]


def _mp_value_grad(kind, a, b, beta=0.5):
    """(value, dF/da, dF/db) for logits rows a (p) and b (q), from the exact inputs."""
    if kind == "reverse":
        v, ga, gb = _mp_value_grad("forward", b, a)
        return v, gb, ga
    with mpmath.workprec(400):
        a = [mpmath.mpf(float(v)) for v in np.asarray(a, np.float64)]
        b = [mpmath.mpf(float(v)) for v in np.asarray(b, np.float64)]
        lp, lq = _mp_log_softmax(a), _mp_log_softmax(b)
        p = [mpmath.exp(v) for v in lp]
        q = [mpmath.exp(v) for v in lq]
        n = range(len(a))
        r = [lp[i] - lq[i] for i in n]
        if kind == "forward":
            F = mpmath.fsum(p[i] * r[i] for i in n)
            Gp = [p[i] * r[i] for i in n]
            Gq = [-p[i] for i in n]
        elif kind == "jeffreys":
            F = mpmath.fsum((p[i] - q[i]) * r[i] for i in n)
            Gp = [p[i] * r[i] + p[i] - q[i] for i in n]
            Gq = [-q[i] * r[i] - p[i] + q[i] for i in n]
        else:
            lm = [mpmath.log(beta * p[i] + (1 - beta) * q[i]) for i in n]
            Gp = [beta * p[i] * (lp[i] - lm[i]) for i in n]
            Gq = [(1 - beta) * q[i] * (lq[i] - lm[i]) for i in n]
            F = mpmath.fsum(Gp) + mpmath.fsum(Gq)
        sp, sq = mpmath.fsum(Gp), mpmath.fsum(Gq)
        ga = np.array([float(Gp[i] - p[i] * sp) for i in n])
        gb = np.array([float(Gq[i] - q[i] * sq) for i in n])
        return float(F), ga, gb


def _check_rows(kind, a, b, value, ga, gb, tol, beta=0.5):
    """Per row: the value to 1e-5 relative (+inf where the true value reaches float32's
    maximum) and the gradient normwise, both sides together, to ``tol``. Entries that are -inf
    on both sides (padding) are left out of the reference and must get a zero gradient."""
    for i in range(a.shape[0]):
        on = ~(np.isneginf(a[i]) & np.isneginf(b[i]))
        assert not ga[i][~on].any() and not gb[i][~on].any(), i
        v_ref, ra, rb = _mp_value_grad(kind, a[i][on], b[i][on], beta)
        if v_ref >= F32MAX:  # (at the boundary, fmax + 2, the gradient is not compared)
            assert value[i] == np.inf, i
            continue
        assert abs(value[i] - v_ref) <= 1e-5 * abs(v_ref) + 1e-30, (i, value[i], v_ref)
        ref = np.r_[ra, rb]
        err = np.linalg.norm(np.r_[ga[i][on], gb[i][on]] - ref)
        assert err <= tol * np.linalg.norm(ref) + 1e-30, (i, a[i], b[i], ga[i], gb[i], ra, rb)


def _torch_grads(kind, a, b, dtype=None, **kw):
    import torch

    ta = torch.tensor(a, dtype=dtype).requires_grad_()
    tb = torch.tensor(b, dtype=dtype).requires_grad_()
    v = FUNCS[kind](ta, tb, p_space="logits", q_space="logits", **kw)
    ga, gb = torch.autograd.grad(v.sum(), (ta, tb))
    return (v.detach().double().numpy(), ga.double().numpy(), gb.double().numpy())


def _jax_grads(kind, a, b, **kw):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    f = FUNCS[kind]

    def total(x, y):
        v = f(x, y, p_space="logits", q_space="logits", **kw)
        return v.sum(), v

    # (jitted: one compilation; op by op the core takes minutes in JAX)
    (_, v), (ga, gb) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
        jnp.asarray(a), jnp.asarray(b))
    return tuple(np.asarray(t, dtype=np.float64) for t in (v, ga, gb))


# ----------------------------------------------------------------------------------------------
# (1) far JS rows


def _far_rows(std, rows=12):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    x, y = torch.randn(2, 200, 50) * std  # the issue's repro; its first rows
    return x[:rows].numpy(), y[:rows].numpy()


@pytest.mark.parametrize("std", [3, 4, 8])
def test_js_gradient_on_far_rows_float32_torch(std):
    a, b = _far_rows(std)
    beta = 0.5 if std != 4 else 0.3
    _check_rows("js", a, b, *_torch_grads("js", a, b, beta=beta), tol=1e-5, beta=beta)


def test_js_gradient_on_far_and_huge_rows_float32_jax(restore_jax_x64):
    """jax.grad through the core (jitted), the far rows of std 8 and the huge rows of (2)
    together (one compilation)."""
    fa, fb = _far_rows(8)
    ha, hb = _padded(_huge_rows())
    a, b = np.concatenate([fa, ha]), np.concatenate([fb, hb])
    _check_rows("js", a, b, *_jax_grads("js", a, b), tol=1e-5)


def test_js_gradient_on_far_rows_float64_torch():
    a, b = _far_rows(8, rows=4)
    _check_rows("js", a, b, *_torch_grads("js", np.float64(a), np.float64(b)), tol=1e-12)


@pytest.mark.parametrize("space", ["logits", "probs"])
def test_js_hessian_on_far_rows(space):
    """Second derivatives (torch's double backward in float32 and float64) on a far row,
    against torch.autograd's Hessian of the textbook formula in float64. (jax.hessian runs
    the same algebra; op by op it takes minutes here: checked by hand, 4e-17 in float64.)"""
    torch = pytest.importorskip("torch")
    from torch_reference import naive_row

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 7, generator=g, dtype=torch.float64) * 6
    if space == "probs":
        a, b = torch.softmax(a, -1), torch.softmax(b, -1)
    x = torch.cat([a, b])

    def ours(x):
        return kldiv.js_div(x[:7], x[7:], p_space=space, q_space=space, beta=0.3)

    ref = torch.autograd.functional.hessian(
        lambda x: naive_row("js", x[:7], x[7:], space, space, beta=0.3), x).numpy()
    scale = np.abs(ref).max()
    h64 = torch.autograd.functional.hessian(ours, x).numpy()
    h32 = torch.autograd.functional.hessian(ours, x.float()).double().numpy()
    assert np.abs(h64 - ref).max() <= 1e-12 * scale
    assert np.abs(h32 - ref).max() <= 2e-5 * scale


# ----------------------------------------------------------------------------------------------
# (2) huge-KL rows with mass far below the other side's maximum


def _huge_rows():
    """(a, b) float32 rows: the issue's row, its mirror images, and V = 5 / 17 / 50 rows of
    small random logits with one huge entry (+-3e38, 1e30, 300, finfo.min) on one side and
    sometimes its opposite on the other."""
    fmax = F32MAX
    fixed = [([2, -1, 3e38], [0, -1, -3.4e38]), ([0, -1, -3.4e38], [2, -1, 3e38]),
             ([2, -1, -3e38], [0, -1, 3.4e38]), ([2, -1, 3e38], [0, -1, -3e38]),
             ([2, -1, 1e38], [0, -1, -1e38]), ([2, -1, 100.0], [0, -1, -100.0]),
             ([2, -1, -fmax], [0, -1, 3e38])]
    out = [(np.float32(a), np.float32(b)) for a, b in fixed]
    rng = np.random.default_rng(0)
    for V in (5, 17, 50):
        for big in (3e38, -3e38, 1e30, 300.0, -fmax):
            for side in (0, 1):
                a = rng.normal(size=V) * 2
                b = rng.normal(size=V) * 2
                (a if side == 0 else b)[rng.integers(V)] = big
                if rng.random() < 0.5:
                    (b if side == 0 else a)[rng.integers(V)] = -big if abs(big) < 1e38 else -fmax
                out.append((np.float32(a), np.float32(b)))
    return out


def _padded(rows, width=50):
    """The rows stacked, each padded to ``width`` with -inf on both sides (outside both
    supports: the divergence does not change): one call for all."""
    a = np.full((len(rows), width), -np.inf, np.float32)
    b = a.copy()
    for i, (x, y) in enumerate(rows):
        a[i, :len(x)], b[i, :len(y)] = x, y
    return a, b


@pytest.mark.parametrize("kind, lib", [("forward", "torch"), ("reverse", "torch"),
                                       ("js", "torch"), ("jeffreys", "torch"),
                                       ("reverse", "jax")])
def test_huge_kl_far_from_the_other_maximum(kind, lib, restore_jax_x64):
    grads = _torch_grads if lib == "torch" else _jax_grads
    a, b = _padded(_huge_rows())
    _check_rows(kind, a, b, *grads(kind, a, b), tol=1e-5)


@pytest.mark.parametrize("kind", ["forward", "reverse", "js", "jeffreys"])
def test_hessians_on_far_float64_rows(kind):
    """Rows whose log-ratios reach 20..100 (the large-KL derivative routes), float64: the
    Hessian (torch double backward) against the textbook formula's."""
    torch = pytest.importorskip("torch")
    from torch_reference import naive_row

    g = torch.Generator().manual_seed(3)
    for std in (8.0, 30.0):
        a, b = torch.randn(2, 6, generator=g, dtype=torch.float64) * std
        x = torch.cat([a, b])
        got = torch.autograd.functional.hessian(
            lambda x: FUNCS[kind](x[:6], x[6:], p_space="logits", q_space="logits"), x)
        ref = torch.autograd.functional.hessian(
            lambda x: naive_row(kind, x[:6], x[6:], "logits", "logits"), x)
        assert (got - ref).abs().max() <= 1e-11 * ref.abs().max(), (kind, std)


def test_issue_row_reverse_kl():
    """The issue's row: d/db = q0 q1 ((lq0 - a0) - (lq1 - a1)) (1, -1, 0) = 0.3932 (-1, 1, 0)."""
    a = np.float32([[2, -1, 3e38]])
    b = np.float32([[0, -1, -3.4e38]])
    v, ga, gb = _torch_grads("reverse", a, b)
    q0 = 1 / (1 + np.exp(-1.0))
    want = q0 * (1 - q0) * -2.0
    np.testing.assert_allclose(gb[0], [want, -want, 0.0], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(ga[0], [-q0, -(1 - q0), 1.0], rtol=1e-6)
