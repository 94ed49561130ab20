"""Rows whose true divergence exceeds the float range (#11): the value is +inf, the gradient the
exact finite one (or +-inf where the derivative itself overflows), on every path.

Float32 logits of +-3e38 on both sides (KL ~ 6e38 > finfo.max) and float64 logits of +-1.7e308,
rows where only part of the sum overflows, rows whose value is finite but whose derivatives
are huge (1e38), a row whose derivative overflows at T = 0.5, and a row whose centred log-ratio
(6e38) is beyond the float range at an entry of p = 1.8e-35 (a modest derivative there). The
reference is the textbook value and derivatives in mpmath on the exact inputs (log-softmax,
r = log p - log q, dKL/dx = p (r - KL) / T, dKL/dy = (q - p) / T, and likewise for reverse KL,
Jeffreys and JS), at a precision that holds the inputs' magnitude; a probability below
e^-(prec + 2000) is taken as 0 there (its products with anything the row holds stay far below
the smallest float). Compared per row and per argument, relative to that argument's largest
derivative in the row; where the exact derivative exceeds finfo.max the answer must be +-inf
of its sign, and never nan.

Rows that are +inf for a structural reason (p_i > 0 = q_i: the value escapes) keep their zero
gradient (the documented convention), also when the row holds +-3e38 too.

Not covered here: the torch kernel's and the core's derivative with respect to q at p's mode
on rows where q_i and p_i both round to 1 (float32 [0, -80] against [3e38, -3e38]: the exact
q_0 - p_0 = 1.8e-35 comes back as 0; an absolute error of 1.8e-35 against a p-side gradient
of 1e4); JAX (its fast KL rule on these rows, eager and under jit, is checked against the
same references in tests/test_jax_overflow_grads.py; the core with JAX arrays was checked by
hand: eager JAX through the core takes minutes here).
"""
import math

import numpy as np
import pytest

mpmath = pytest.importorskip("mpmath")
torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from kldiv._core import dispatch  # noqa: E402

from oracle import value_grad_log  # noqa: E402
from torch_reference import core_only, naive_row, took_fast  # noqa: E402

KINDS = ("forward", "reverse", "js", "jeffreys")
FN = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
      "jeffreys": kldiv.jeffreys_div}
M = 1.7e308
THIRD = 1.0 / 3.0

# (p, q, dtype, temperature, p_space); q is logits
ROWS = {
    "flip32": ([3e38, -3e38], [-3e38, 3e38], "float32", 1.0, "logits"),
    "flip32_mid": ([3e38, -3e38, 0.0], [-3e38, 3e38, 0.0], "float32", 1.0, "logits"),
    "spread32": ([0.0, 0.0, 0.0], [-3e38, -3e38, 3e38], "float32", 1.0, "logits"),
    "finite_huge_grad32": ([0.0, 1.0, 2.0, 0.5], [-3e38, -3e38, 3e38, 1.0], "float32", 1.0,
                           "logits"),
    "grad_overflows32": ([0.0, 0.0], [-3e38, 3e38], "float32", 0.5, "logits"),
    "wide_entry32": ([0.0, -80.0, 1.0], [3e38, -3e38, 0.0], "float32", 1.0, "logits"),
    "wide_t3_32": ([-3e38, 3e38, 0.0], [3e38, -3e38, 2.0], "float32", 3.0, "logits"),
    "probs32": ([THIRD, THIRD, THIRD], [-3e38, -3e38, 3e38], "float32", 1.0, "probs"),
    "flip64": ([M, -M], [-M, M], "float64", 1.0, "logits"),
    "spread64": ([0.0, 0.0, 0.0], [-M, -M, M], "float64", 1.0, "logits"),
    "part64": ([M, 1.0, -M, 2.0], [-M, 3.0, M, 0.0], "float64", 1.0, "logits"),
    "t_half64": ([0.0, 0.0], [-M, M], "float64", 0.5, "logits"),
}


def _log_dist(x, space, t, prec):
    """Exact normalised log-probabilities of one row (inputs converted exactly)."""
    v = [mpmath.mpf(float(a)) for a in x]
    if space == "probs":
        lz = mpmath.log(mpmath.fsum(v))
        return [mpmath.log(a) - lz for a in v]
    u = [a / t for a in v]
    m = max(u)
    cut = -(prec + 2000)
    lse = m + mpmath.log(mpmath.fsum(mpmath.exp(a - m) for a in u if a - m > cut))
    return [a - lse for a in u]


_REF = {}


def reference(kind, name, beta=0.5):
    """(value, dD/dp input, dD/dq input) of the textbook formulas, as float64 arrays (+-inf
    where beyond float64; compared against the row dtype's range below)."""
    key = (kind, name)
    if key in _REF:
        return _REF[key]
    x, y, dt, t, ps = ROWS[name]
    prec = 1400 if dt == "float64" else 600
    with mpmath.workprec(prec):
        t = mpmath.mpf(t)
        lp, lq = _log_dist(x, ps, t, prec), _log_dist(y, "logits", t, prec)
        val, gx, gy = value_grad_log(kind, lp, lq, beta, prec)
        n = len(gx)
        gx = [v / t for v in gx]
        gy = [v / t for v in gy]
        if ps == "probs":  # with respect to the probability x_i: the logit form over x_i
            gx = [gx[i] / mpmath.mpf(float(x[i])) for i in range(n)]
        out = (float(val), np.array([float(v) for v in gx]), np.array([float(v) for v in gy]))
    _REF[key] = out
    return out


def _check_value(v, ref, dt, what=""):
    fmax = float(np.finfo(dt).max)
    assert not math.isnan(v), what
    if ref > fmax:
        assert v == math.inf, (what, v, ref)
    else:
        tol = 1e-5 if dt == "float32" else 1e-12
        assert abs(v - ref) <= tol * abs(ref) + 1e-300, (what, v, ref)


def _check_grad(g, ref, dt, what):
    g = np.asarray(g, dtype=np.float64)
    fmax = float(np.finfo(dt).max)
    assert not np.isnan(g).any(), (what, g, ref)
    over = np.abs(ref) > fmax
    np.testing.assert_array_equal(g[over], np.sign(ref[over]) * np.inf, err_msg=what)
    fin = ~over
    assert np.isfinite(g[fin]).all(), (what, g, ref)
    if fin.any():
        tol = 1e-5 if dt == "float32" else 1e-12
        scale = float(np.abs(ref[fin]).max())
        err = float(np.abs(g[fin] - ref[fin]).max())
        assert err <= tol * scale + 1e-300, (what, g, ref, err / max(scale, 1e-300))


def _call(kind, a, b, fast, **kw):
    """``FN[kind](a, b, **kw)`` on the default torch path (``fast``) or the core alone."""
    if fast:
        return FN[kind](a, b, **kw)
    with core_only():
        return FN[kind](a, b, **kw)


def _torch_call(kind, name, fast):
    x, y, dt, t, ps = ROWS[name]
    tdt = getattr(torch, dt)
    a = torch.tensor([x], dtype=tdt, requires_grad=True)
    b = torch.tensor([y], dtype=tdt, requires_grad=True)
    v = _call(kind, a, b, fast, p_space=ps, q_space="logits", temperature=t, validate=False)
    ga, gb = torch.autograd.grad(v.sum(), (a, b))
    return v, ga[0], gb[0]


@pytest.mark.parametrize("name", list(ROWS))
@pytest.mark.parametrize("kind", KINDS)
def test_torch_core_value_and_gradient(kind, name):
    dt = ROWS[name][2]
    val, rx, ry = reference(kind, name)
    v, gx, gy = _torch_call(kind, name, fast=False)
    _check_value(float(v.detach()[0]), val, dt)
    _check_grad(gx, rx, dt, f"{kind} {name} d/dp")
    _check_grad(gy, ry, dt, f"{kind} {name} d/dq")


@pytest.mark.parametrize("name", list(ROWS))
@pytest.mark.parametrize("kind", KINDS)
def test_torch_default_path_value_and_gradient(kind, name):
    """The torch fast path (the fused C kernel takes the float32 rows) against the same
    reference: it must equal the core on every row."""
    x, y, dt, t, ps = ROWS[name]
    val, rx, ry = reference(kind, name)
    v, gx, gy = _torch_call(kind, name, fast=True)
    if dt == "float32":
        assert took_fast(v)
    _check_value(float(v.detach()[0]), val, dt)
    _check_grad(gx, rx, dt, f"{kind} {name} d/dp")
    _check_grad(gy, ry, dt, f"{kind} {name} d/dq")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_numpy_values_core_and_kernel(kind, monkeypatch):
    """NumPy (no gradients): the default path (the float32 row kernel) and the core alone."""
    for name, (x, y, dt, t, ps) in ROWS.items():
        val = reference(kind, name)[0]
        a, b = np.array([x], dtype=dt), np.array([y], dtype=dt)
        kw = dict(p_space=ps, q_space="logits", temperature=t, validate=False)
        _check_value(float(FN[kind](a, b, **kw)[0]), val, dt)
        with monkeypatch.context() as m:
            m.setattr(dispatch, "handler", lambda *a, **k: None)
            _check_value(float(FN[kind](a, b, **kw)[0]), val, dt)


def test_rows_in_one_batch():
    """A row with an entry beyond the float range next to ordinary rows: each row's gradient
    is its own (the wide route is chosen per row)."""
    x0, y0 = ROWS["wide_entry32"][:2]
    xs = [x0, [0.1, 0.2, 0.3], [2.0, -1.0, 0.5]]
    ys = [y0, [0.3, 0.1, 0.2], [0.0, 1.0, -3.0]]
    for kind in ("forward", "jeffreys"):
        for fast in (False, True):
            a = torch.tensor(xs, requires_grad=True)
            b = torch.tensor(ys, requires_grad=True)
            v = _call(kind, a, b, fast, p_space="logits", q_space="logits")
            ga, gb = torch.autograd.grad(v.sum(), (a, b))
            val, rx, ry = reference(kind, "wide_entry32")
            _check_grad(ga[0], rx, "float32", "row 0 d/dp")
            _check_grad(gb[0], ry, "float32", "row 0 d/dq")
            for i in (1, 2):  # ordinary rows: float64 autograd of the textbook formula
                a64 = torch.tensor(xs[i], dtype=torch.float64, requires_grad=True)
                b64 = torch.tensor(ys[i], dtype=torch.float64, requires_grad=True)
                r = naive_row(kind, a64, b64, "logits", "logits")
                ra, rb = torch.autograd.grad(r, (a64, b64))
                _check_grad(ga[i], ra.numpy(), "float32", f"row {i} d/dp")
                _check_grad(gb[i], rb.numpy(), "float32", f"row {i} d/dq")


@pytest.mark.parametrize("name", ["spread32", "finite_huge_grad32", "wide_entry32"])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys"])
def test_torch_core_hessian(kind, name):
    """Second derivatives on float32 rows with centred log-ratios beyond the float range (the
    route that leaves out the overflowing coefficient): torch.autograd's Hessian of the float64
    textbook formula on the same (upcast) inputs, which holds these magnitudes."""
    x, y, dt, t, ps = ROWS[name]
    n = len(x)

    def f(z):
        with core_only():
            return FN[kind](z[:n], z[n:], p_space="logits", q_space="logits", temperature=t)

    z = torch.tensor(x + y, dtype=torch.float32)
    H = torch.autograd.functional.hessian(f, z).double()
    R = torch.autograd.functional.hessian(
        lambda w: naive_row(kind, w[:n], w[n:], "logits", "logits", t), z.double())
    assert torch.isfinite(H).all() and torch.isfinite(R).all()
    assert float((H - R).abs().max()) <= 1e-5 * float(R.abs().max())


STRUCTURAL = [
    # p_i > 0 = q_i: +inf whatever else the row holds, zero gradient (the convention)
    ([0.0, 1.0], [-math.inf, 0.0], "float32"),
    ([3e38, -3e38, 0.0], [-3e38, 3e38, -math.inf], "float32"),
    ([M, -M, 0.0], [-M, M, -math.inf], "float64"),
]


@pytest.mark.parametrize("row", range(len(STRUCTURAL)))
@pytest.mark.parametrize("kind", ["forward", "jeffreys"])
@pytest.mark.parametrize("fast", [False, True])
def test_structural_inf_keeps_zero_gradient(kind, row, fast):
    x, y, dt = STRUCTURAL[row]
    tdt = getattr(torch, dt)
    a = torch.tensor([x], dtype=tdt, requires_grad=True)
    b = torch.tensor([y], dtype=tdt, requires_grad=True)
    v = _call(kind, a, b, fast, p_space="logits", q_space="logits")
    ga, gb = torch.autograd.grad(v.sum(), (a, b))
    assert float(v.detach()[0]) == math.inf
    assert torch.equal(ga, torch.zeros_like(ga)) and torch.equal(gb, torch.zeros_like(gb))


# ----------------------------------------------------------------------------------------------
# JS second derivatives at a float32 subnormal probability


TINY = float(np.float32(1e-45))  # the smallest float32 subnormal
SUBNORMAL_ROWS = [
    ([1 - 3 * TINY, TINY, 2 * TINY], [0.5, 0.25, 0.25]),  # p: 1 - tiny and subnormals
    ([0.5, 0.25, 0.25], [1.0, 1e-45, 3e-45]),  # q's side
    ([0.7, 0.3, 1e-40], [0.2, 0.5, 0.3]),
]


@pytest.mark.parametrize("beta", [0.5, 0.2])
@pytest.mark.parametrize("row", range(len(SUBNORMAL_ROWS)))
def test_js_hessian_at_a_subnormal_probability(row, beta):
    """The whole Hessian (the subnormal entry's row included, which was nan) against
    torch.autograd's Hessian of the float64 textbook formula on the same inputs: the diagonal
    entry 1/p_i (~1e44, beyond float32) is +inf, every other entry finite and within 1e-5 of
    the largest finite one; the first derivatives too."""
    x, y = SUBNORMAL_ROWS[row]
    n = len(x)

    def f(z):
        with core_only():
            return kldiv.js_div(z[:n], z[n:], beta=beta, validate=False)

    z = torch.tensor(x + y, dtype=torch.float32)
    H = torch.autograd.functional.hessian(f, z).double()
    G = torch.autograd.functional.jacobian(f, z).double()
    z64 = z.double()
    R = torch.autograd.functional.hessian(
        lambda w: naive_row("js", w[:n], w[n:], "probs", "probs", beta=beta), z64)
    RG = torch.autograd.functional.jacobian(
        lambda w: naive_row("js", w[:n], w[n:], "probs", "probs", beta=beta), z64)
    fmax = float(np.finfo(np.float32).max)
    assert not torch.isnan(H).any()
    over = R.abs() > fmax
    assert over.any()  # the diagonal entry of the subnormal probability
    assert torch.equal(H[over], torch.sign(R[over]) * math.inf)
    fin = ~over
    assert torch.isfinite(H[fin]).all()
    assert float((H - R).abs()[fin].max()) <= 1e-5 * float(R[fin].abs().max())
    assert float((G - RG).abs().max()) <= 1e-5 * float(RG.abs().max())


# ----------------------------------------------------------------------------------------------
# Second derivatives on a row whose centred log-ratios are beyond the float range at T < 1

_HREF = {}


def hessian_reference(kind, name):
    """The Hessian in (p's logits, q's logits) of the textbook value (``value_grad_log``) on the
    row's exact inputs (rounded to its dtype), by mpmath differentiation at 150 digits (the value
    is ~6e38: second differences of it need ~40 digits beyond the Hessian's own)."""
    key = (kind, name)
    if key in _HREF:
        return _HREF[key]
    x, y, dt, t, ps = ROWS[name]
    assert ps == "logits"
    n = len(x)
    with mpmath.workdps(150):
        tt = mpmath.mpf(t)

        def lsm(v):
            u = [a / tt for a in v]
            m = max(u)
            return [a - m - mpmath.log(mpmath.fsum(mpmath.exp(b - m) for b in u)) for a in u]

        def f(*z):
            return value_grad_log(kind, lsm(z[:n]), lsm(z[n:]), prec=500)[0]

        z0 = tuple(mpmath.mpf(float(np.array(v, dtype=dt))) for v in x + y)
        H = np.zeros((2 * n, 2 * n))
        for a in range(2 * n):
            for b in range(a, 2 * n):
                order = tuple(int(a == i) + int(b == i) for i in range(2 * n))
                H[a, b] = H[b, a] = float(mpmath.diff(f, z0, order))
    _HREF[key] = H
    return H


def _check_hessian(H, R, what):
    """No nan, and within 1e-5 of the largest entry (float32) entry by entry; the p-p block
    (where the nan was) also within 1e-5 of its own largest entry."""
    H = np.asarray(H, dtype=np.float64)
    n = R.shape[0] // 2
    assert not np.isnan(H).any(), (what, H)
    assert np.abs(H - R).max() <= 1e-5 * np.abs(R).max(), (what, H, R)
    assert np.abs(H - R)[:n, :n].max() <= 1e-5 * np.abs(R[:n, :n]).max(), (what, H, R)


@pytest.mark.parametrize("kind", ["forward", "jeffreys"])
def test_torch_core_hessian_grad_overflows32(kind):
    """float32 [0, 0] against [-3e38, 3e38] at T = 0.5: the centred log-ratios (+-6e38) and the
    first derivatives (+-6e38) overflow, the Hessian is finite (p-p block [[1, -1], [-1, 1]] for
    KL, twice that for Jeffreys). Its term sum_i p_i c_i (dlog p_i)^2 has weight factor
    1 - 2 p_0 = 0 exactly against p_0 c_0 / T^2 = 1.2e39; its double backward met inf - inf
    (the p-p block was nan). The torch core against the mpmath Hessian."""
    x, y, dt, t, ps = ROWS["grad_overflows32"]
    n = len(x)

    def f(z):
        with core_only():
            return FN[kind](z[:n], z[n:], p_space="logits", q_space="logits", temperature=t,
                            validate=False)

    H = torch.autograd.functional.hessian(f, torch.tensor(x + y, dtype=torch.float32))
    _check_hessian(H.numpy(), hessian_reference(kind, "grad_overflows32"), kind)


def test_jax_core_hessian_grad_overflows32():
    """The same row through the JAX core (``divergence_rows``), forward KL and Jeffreys under one
    jit (one compile, ~4 CPU-s)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from kldiv._core.divergence import divergence_rows
    from kldiv.backends import jax_fast

    x, y, dt, t, ps = ROWS["grad_overflows32"]
    kinds = ("forward", "jeffreys")

    def hessians(a, b):
        return [jax.hessian(lambda a, b, k=k: jnp.sum(divergence_rows(
            k, jax_fast._xp(), a, b, "logits", "logits", t)), argnums=(0, 1))(a, b)
            for k in kinds]

    A = jnp.asarray(np.array([x], dtype=dt))
    B = jnp.asarray(np.array([y], dtype=dt))
    for kind, H in zip(kinds, jax.jit(hessians)(A, B)):
        blk = np.block([[np.asarray(H[r][c])[0, :, 0, :] for c in range(2)] for r in range(2)])
        _check_hessian(blk, hessian_reference(kind, "grad_overflows32"), kind)
