"""The core at the edges of the float range (issue 11): large-magnitude logits and shifts,
float32 inputs near +-3e38, the temperature range, nan paths, dtypes of the reductions, second
derivatives, and API messages.

Every value is asserted against the mpmath oracle (``tests/oracle.py``) computed from the exact
inputs, on NumPy, torch and JAX (the ``xp`` fixture), with the fast paths switched off: these
are the core's own answers, the reference every fast path is compared with.
"""
from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import pytest

import kldiv
import oracle
from conftest import to_numpy

L = dict(p_space="logits", q_space="logits")
FUNCS = {"kl": kldiv.kl_div, "reverse_kl": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}
INF = math.inf


@pytest.fixture(autouse=True)
def core_only(monkeypatch):
    """Switch every fast path off: the tests here are of the core (kldiv._core)."""
    from kldiv._core import dispatch

    monkeypatch.setattr(dispatch, "handler", lambda *a, **k: None)


def _truth(name, p, q, **kw):
    return float(getattr(oracle, name if name != "kl" else "kl")(p, q, **kw))


def _check(xp, name, p, q, dtype, rtol, **kw):
    """kldiv's value of ``name`` on the backend equals the oracle's on the exact inputs."""
    p = np.asarray(p, dtype=dtype)
    q = np.asarray(q, dtype=dtype)
    spaces = {k: kw[k] for k in ("p_space", "q_space") if k in kw}
    t = kw.get("temperature", 1.0)
    ref = _truth(name, p, q, temperature=t, **spaces)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid warnings from the core either
        got = FUNCS[name](xp.asarray(p), xp.asarray(q), **kw)
    got = float(to_numpy(got))
    assert not math.isnan(got), (name, p, q)
    fmax = float(np.finfo(dtype).max)
    # rows wider than the float range (float32 +-3e38, x / T beyond it) are exact too
    if math.isinf(ref) or abs(ref) >= fmax * (1 - 1e-6):
        assert got == INF, (name, got, ref)
    else:
        assert got >= 0
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=float(np.finfo(dtype).tiny))
    return got


# ----------------------------------------------------------------------------------------------
# item 1: shift invariance at large magnitude


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("p,q", [
    (np.full(4, -1e30), [0.0, 1, 2, 3]),            # a masked-looking row: uniform p
    ([1e30, 1e30, -1e30], [0.0, 5, 10]),            # p = [.5, .5, 0]
    ([0.0, 5, 10], [1e30, 1e30, -1e30]),
    (np.full(4, -1e4), [0.0, 1, 2, 3]),             # moderate offsets cost accuracy before
    ([-1e30, 1, 2, 3], [0.5, 1.1, 2, 3]),           # -1e30 masking, same maxima
    ([-5e37, -5e37, -5e37], [-5e37, -INF, -5e37]),
], ids=["const-1e30", "1e30-rows", "1e30-rows-flipped", "const-1e4", "mask-1e30", "5e37-inf"])
def test_large_offsets_between_the_sides(xp, name, dtype, p, q):
    _check(xp, name, p, q, dtype, rtol=1e-12 if dtype == "float64" else 2e-6, **L)


@pytest.mark.parametrize("name", list(FUNCS))
def test_reverse_kl_of_5e37_rows_is_not_negative(xp, name):
    # issue 11: -0.693 (a negative KL) before; the truth is log 1.5 for the reverse KL
    got = _check(xp, name, [-5e37] * 3, [-5e37, -INF, -5e37], "float32", 2e-6, **L)
    if name == "reverse_kl":
        np.testing.assert_allclose(got, math.log(1.5), rtol=1e-6)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "js", "jeffreys"])
@pytest.mark.parametrize("offset", [-1300.0, -1e4, 3e5])
def test_close_rows_with_an_offset_on_one_side_float32(xp, name, offset):
    # q = p + small noise, then offset by a constant: the value is the unshifted one to float32
    # accuracy (the offset is removed by centring each side on its own maximum)
    rng = np.random.default_rng(11)
    a = (2 * rng.standard_normal((4, 50))).astype(np.float32)
    b = (a + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
    b = (b + np.float32(offset)).astype(np.float32)
    ref = oracle.rows(name, a, b, **L)
    got = to_numpy(FUNCS[name](xp.asarray(a), xp.asarray(b), **L))
    np.testing.assert_allclose(got, ref, rtol=5e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_limit_rows(xp, dtype):
    big = float(np.finfo(dtype).max) * 0.9
    for p, q in [([big, big, 1, 2], [0.0, 1, 2, 3]), (np.full(4, -big / 2), [0.0, 1, 2, 3]),
                 ([big, -big], [0.99, 0.42])]:
        for name in FUNCS:
            _check(xp, name, p, q, dtype, rtol=1e-12 if dtype == "float64" else 2e-6, **L)


# ----------------------------------------------------------------------------------------------
# item 3: no nan from finite inputs near the float32 limit


def test_near_float32_limit_cases(xp):
    f32 = "float32"
    _check(xp, "kl", [3e38, -3e38], [0.99, 0.42], f32, 2e-6, **L)  # truth 0.448
    for name in FUNCS:
        _check(xp, name, [-3e38], [3e38], f32, 0, **L)  # V = 1: 0
    _check(xp, "jeffreys", [3e38, -3e38], [-3e38, 3e38], f32, 0, **L)  # truth 1.2e39: inf
    p = np.float32([0, -3e38, -3e38])
    q = np.float32([0.6, 3e38, -3e38])
    got = to_numpy(kldiv.kl_terms(xp.asarray(p), xp.asarray(q), **L))
    ref = np.array([float(t) for t in oracle.terms(p, q, **L)])
    assert not np.any(np.isnan(got))
    np.testing.assert_allclose(got, np.clip(ref, -3.5e38, 3.5e38), rtol=2e-6, atol=1e-30)


# ----------------------------------------------------------------------------------------------
# item 4: the temperature range


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("t", [1e-6, 1e-3, 0.1, 1e3, 1e6])
def test_temperatures_across_the_range(xp, dtype, t):
    # the last row spans 2a / t: within the float range, as documented (wider rows are clamped)
    a = min(3e37, 0.4 * float(np.finfo(dtype).max) * t)
    for p, q in [([1.0, 2, 3], [1, 2.5, 3]), ([1.0, 2, 3], [3, 2.5, 1]), ([5e37], [5e37]),
                 ([a, -a, 0], [0.0, 1, 2])]:
        for name in FUNCS:
            got = _check(xp, name, p, q, dtype, rtol=1e-11 if dtype == "float64" else 5e-6,
                         temperature=t, **L)
            assert got >= 0


def test_rows_wider_than_the_float_range_give_no_nan(xp):
    # float32 logits spanning more than finfo.max within a row (3e37 and -3e37 at T = 0.1):
    # exact (the log-ratio is carried in quarters), +inf beyond finfo.max
    for name in FUNCS:
        for t in (0.1, 1e-6):
            _check(xp, name, [3e37, -3e37, 0], [0, 1, 2], "float32", 1e-6, temperature=t, **L)


@pytest.mark.parametrize("bad", [1e-300, 5e-324, 9.9e-7, 1.01e6, 1e300])
def test_temperatures_outside_the_range_are_refused(bad):
    u = np.array([1.0, 2.0, 3.0])
    for f in FUNCS.values():
        with pytest.raises(ValueError, match=r"^temperature: .*range"):
            f(u, u, temperature=bad, **L)
    with pytest.raises(ValueError, match=r"^temperature"):
        kldiv.kl_terms(u, u, temperature=bad, **L)


@pytest.mark.parametrize("bad", ["2", b"2", True, False, np.bool_(True), None, [1.0]])
def test_temperature_of_the_wrong_type(bad):
    u = np.array([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match=r"^temperature"):
        kldiv.kl_div(u, u, temperature=bad, **L)


@pytest.mark.parametrize("bad", ["half", "0.5", True, None])
def test_beta_of_the_wrong_type_names_beta(bad):
    u = np.array([0.5, 0.5])
    with pytest.raises(TypeError, match=r"^beta"):
        kldiv.js_div(u, u, beta=bad)


# ----------------------------------------------------------------------------------------------
# item 6: validate=False never turns a nan into a number


@pytest.mark.parametrize("space", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("name", list(FUNCS))
def test_nan_propagates_without_validation(xp, space, name):
    p = np.array([[np.nan, 0.0], [0.0, 0.0], [0.5, 0.5]])
    q = np.array([[0.0, 0.0], [0.0, np.nan], [0.5, 0.5]])
    if space == "log_probs":
        p[1:], q[:1], q[2] = np.log(0.5), np.log(0.5), np.log(0.5)
    elif space == "probs":
        p[1:], q[:1] = 0.5, 0.5
    got = to_numpy(FUNCS[name](xp.asarray(p), xp.asarray(q), p_space=space, q_space=space,
                               validate=False))
    assert np.isnan(got[0]) and np.isnan(got[1]) and got[2] == 0.0
    # a masked row may hold anything: no nan comes out of it
    mask = xp.asarray(np.array([False, False, True]))
    got = FUNCS[name](xp.asarray(p), xp.asarray(q), p_space=space, q_space=space,
                      validate=False, mask=mask, reduction="sum")
    assert float(to_numpy(got)) == 0.0


# ----------------------------------------------------------------------------------------------
# item 7: identical rows give exactly 0; an empty category axis is refused


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_identical_rows_with_neg_inf_give_exactly_zero(xp, name, dtype):
    rng = np.random.default_rng(12)
    a = (3 * rng.standard_normal((20, 7))).astype(dtype)
    a[:, 2] = -np.inf
    a[5, :5] = -np.inf
    a[6] += np.asarray(1e30, dtype=dtype)
    got = to_numpy(FUNCS[name](xp.asarray(a), xp.asarray(a.copy()), **L))
    assert np.all(got == 0.0), got


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_empty_category_axis_names_p(xp, shape):
    z = xp.asarray(np.zeros(shape))
    for f in FUNCS.values():
        with pytest.raises(ValueError, match=r"^p: the category axis .* is empty"):
            f(z, z, **L)


# ----------------------------------------------------------------------------------------------
# item 2: dtypes of the reductions


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_inputs_reduce_in_float32(xp, reduction, half):
    if xp.name in ("numpy", "array_api_strict"):
        pytest.skip("no bfloat16 / half-precision arrays with a fast path to compare here")
    rng = np.random.default_rng(13)
    a = rng.standard_normal((40000, 8))
    b = rng.standard_normal((40000, 8))
    x, y = xp.asarray(a, half), xp.asarray(b, half)
    got = kldiv.kl_div(x, y, reduction=reduction, **L)
    assert got.dtype == xp.float32
    if reduction != "none":
        rows = oracle.kl_extended(to_numpy(x), to_numpy(y))
        ref = rows.sum() if reduction == "sum" else rows.mean()
        np.testing.assert_allclose(float(to_numpy(got)), ref, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_mixed_float32_float64_promote_to_float64(xp, reduction):
    rng = np.random.default_rng(14)
    a = rng.standard_normal((3, 5))
    b = rng.standard_normal((3, 5))
    got = kldiv.kl_div(xp.asarray(a, "float32"), xp.asarray(b, "float64"), reduction=reduction,
                       **L)
    assert got.dtype == xp.float64


# ----------------------------------------------------------------------------------------------
# item 5: second derivatives are finite where the value is finite (torch and JAX)

HESS_CASES = [
    # (function, p, q, p_space, q_space, temperature)
    ("reverse_kl", [-117.62, -92.45, 0.0], [0.0, 7.07e-41, 1.0], "log_probs", "probs", 1.0),
    ("kl", [-5e37] * 3, [-math.log(3)] * 3, "logits", "log_probs", 1.0),
    ("reverse_kl", [0.0, -2e38, -1e38], [-1e38, -2e38, 0.0], "log_probs", "log_probs", 0.5),
    ("kl", [3e38, -3e38], [0.99, 0.42], "logits", "logits", 1.0),
    ("js", [1e30, 1e30, -1e30], [0.0, 5, 10], "logits", "logits", 1.0),
    ("jeffreys", [-1e30, 1, 2, 3], [0.5, 1.1, 2, 3], "logits", "logits", 0.7),
    ("kl", [3e38, 3e38, 1, 2], [0.0, 1, 2, 3], "logits", "logits", 1.0),
]


def _hessians(lib, f, a, b):
    if lib == "torch":
        import torch

        ta, tb = torch.tensor(a), torch.tensor(b)
        ha = torch.autograd.functional.hessian(lambda x: f(x, tb), ta)
        hb = torch.autograd.functional.hessian(lambda y: f(ta, y), tb)
        ga = torch.autograd.functional.jacobian(lambda x: f(x, tb), ta)
        return ga.numpy(), ha.numpy(), hb.numpy()
    import jax
    import jax.numpy as jnp

    ja, jb = jnp.asarray(a), jnp.asarray(b)
    # under jit: one compilation instead of thousands of eager dispatches (the test's cost);
    # the gradient comes out of the Hessian's compilation (jax.hessian is jacfwd of the
    # gradient; has_aux returns that gradient itself): two compilations instead of three
    def grad_twice(x):
        g = jax.grad(lambda x: f(x, jb))(x)
        return g, g

    ha, ga = jax.jit(jax.jacfwd(grad_twice, has_aux=True))(ja)
    hb = jax.jit(jax.hessian(lambda y: f(ja, y)))(jb)
    return np.asarray(ga), np.asarray(ha), np.asarray(hb)


@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize("case", range(len(HESS_CASES)))
def test_second_derivatives_are_not_nan(lib, case):
    pytest.importorskip(lib)
    name, p, q, ps, qs, t = HESS_CASES[case]
    dtype = np.float32 if max(abs(v) for v in p + q) > 1e30 or case == 0 else np.float64
    a, b = np.asarray(p, dtype=dtype), np.asarray(q, dtype=dtype)
    fn = FUNCS[name]

    def f(x, y):
        return fn(x, y, p_space=ps, q_space=qs, temperature=t)

    ga, ha, hb = _hessians(lib, f, a, b)
    assert not np.any(np.isnan(ga))
    assert not np.any(np.isnan(ha)), ha
    if case != 0:  # the float32 subnormal probability: d2/dq2 ~ 1/q overflows float32
        assert not np.any(np.isnan(hb)), hb


def test_gradient_and_hessian_against_float64_naive_formula():
    # moderate rows, where the textbook formula in float64 is exact enough: the core's first and
    # second derivatives (torch autograd) equal those of the naive formula at every entry
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(15)
    for shift_a, shift_b in [(0.0, 0.0), (-1e4, 0.0), (50.0, -30.0)]:
        a = rng.standard_normal(6) + shift_a
        b = rng.standard_normal(6) + shift_b
        ta, tb = torch.tensor(a), torch.tensor(b)

        def naive(x, y):
            lx, ly = F.log_softmax(x - x.max().detach(), -1), F.log_softmax(y - y.max().detach(), -1)
            return (lx.exp() * (lx - ly)).sum()

        def core(x, y):
            return kldiv.kl_div(x, y, **L)

        for f_args in [(lambda x: core(x, tb), lambda x: naive(x, tb), ta),
                       (lambda y: core(ta, y), lambda y: naive(ta, y), tb)]:
            fc, fn, at = f_args
            gc = torch.autograd.functional.jacobian(fc, at)
            gn = torch.autograd.functional.jacobian(fn, at)
            np.testing.assert_allclose(gc.numpy(), gn.numpy(), rtol=1e-9, atol=1e-12)
            hc = torch.autograd.functional.hessian(fc, at)
            hn = torch.autograd.functional.hessian(fn, at)
            np.testing.assert_allclose(hc.numpy(), hn.numpy(), rtol=1e-8, atol=1e-11)


# ----------------------------------------------------------------------------------------------
# issue 13, item 7: API messages and promises


def test_torch_integer_tensor_gets_torch_spelling():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"x\.float\(\)"):
        kldiv.kl_div(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"x\.astype\(float\)"):
        kldiv.kl_div(np.array([1, 2]), np.array([1.0, 2.0]))


def test_set_validation_is_process_wide_and_the_context_manager_local():
    bad = np.array([0.5, 0.6])
    seen = {}

    def worker():
        try:
            kldiv.kl_div(bad, bad)
            seen["raised"] = False
        except ValueError:
            seen["raised"] = True

    try:
        kldiv.set_validation(False)
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen["raised"] is False  # another thread follows set_validation
        with kldiv.validation(True):
            with pytest.raises(ValueError):
                kldiv.kl_div(bad, bad)
            t = threading.Thread(target=worker)
            t.start()
            t.join()
            assert seen["raised"] is False  # the block applies to this thread only
    finally:
        kldiv.set_validation(True)
    with pytest.raises(ValueError):
        kldiv.kl_div(bad, bad)


def test_shapes_broadcast_as_documented(xp):
    rng = np.random.default_rng(16)
    p = rng.dirichlet(np.ones(4), size=3)
    q = rng.dirichlet(np.ones(4))
    got = to_numpy(kldiv.kl_div(xp.asarray(p), xp.asarray(q)))
    ref = oracle.rows("kl", p, np.broadcast_to(q, p.shape))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    got = to_numpy(kldiv.kl_div(xp.asarray(q), xp.asarray(p)))
    np.testing.assert_allclose(got, oracle.rows("kl", np.broadcast_to(q, p.shape), p),
                               rtol=1e-12)
    with pytest.raises(ValueError, match=r"p and q: 4 and 3 categories"):
        kldiv.kl_div(xp.asarray(p), xp.asarray(q[:3]))


def test_torch_argument_order_gets_a_swap_hint():
    torch = pytest.importorskip("torch")
    log_probs = torch.log(torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
    probs = torch.tensor([[0.5, 0.5], [0.3, 0.7]])
    with pytest.raises(ValueError, match=r"p_space.*the arguments may be swapped: kldiv takes "
                                         r"the reference p first"):
        kldiv.kl_div(log_probs, probs)
