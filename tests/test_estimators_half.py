"""k1 / k2 / k3 on half-precision inputs (float16, bfloat16) over more than 65504 samples.

Audit 4 F2: the count of a "mean" was made in the input dtype (70000 -> inf in float16, so the
mean was 0), half sums of mask ones / weights were rounded or overflowed, NumPy's ``axis`` path
divided by a Python int that became inf in float16, and bfloat16 results came back as bfloat16.
Half inputs are now computed in float32 (as in the core). Reference: the float64 naive formula on
the same (widened) half values, with a tolerance of a few float32 ulps of the sum of |terms|.
"""
import numpy as np
import pytest
from array_api_compat import array_namespace

from kldiv._core.reduction import reduce_rows
from kldiv.estimators import k1, k2, k3

torch = pytest.importorskip("torch")

N = 70000  # > 65504 = float16's largest finite value: the count itself overflowed
_RNG = np.random.default_rng(1)
_LS = np.log(_RNG.uniform(0.01, 0.5, (2, N)))
_LO = _LS + _RNG.standard_normal((2, N)) * 0.05
_MASK = _RNG.random((2, N)) < 0.9  # ~63000 true per row: a float16 count is rounded
_W = _RNG.uniform(0.0, 2.0, (2, N))  # float16 sum ~70000 per row: inf in float16
_FNS = {"k1": k1, "k2": k2, "k3": k3}


def _terms(name, ls, lo):
    """Per-sample values in float64 from the definitions (k3: exp(l) - 1 - l, |l| ~ 0.05 here,
    which loses < 3 of float64's digits: far below float32's)."""
    lr = lo - ls
    return {"k1": -lr, "k2": 0.5 * lr * lr, "k3": np.expm1(lr) - lr}[name]


def _reference(name, ls, lo, mask, weight, axis):
    t = _terms(name, ls, lo)
    m = np.ones_like(t) if mask is None else mask.astype(np.float64)
    w = np.ones_like(t) if weight is None else weight
    ax = None if axis is None else -1
    num = np.sum(m * w * t, axis=ax)
    den = np.sum(m * w, axis=ax)
    scale = np.sum(m * w * np.abs(t), axis=ax) / den  # what float32 rounding is relative to
    return num / den, scale


def _half(lib, x, dtype):
    if lib == "numpy":
        return x.astype(np.float16)
    return torch.from_numpy(x).to(getattr(torch, dtype))


def _widened(lib, x, dtype):
    """The half values the estimator sees, as float64 (torch rounds float64 -> float16 through
    float32, NumPy directly: the two can differ by an ulp)."""
    h = _half(lib, x, dtype)
    return h.astype(np.float64) if lib == "numpy" else h.double().numpy()


CASES = [("numpy", "float16"), ("torch", "float16"), ("torch", "bfloat16")]


@pytest.mark.parametrize("lib,dtype", CASES)
@pytest.mark.parametrize("extra", ["plain", "mask", "weight", "axis", "axis_mask", "axis_weight"])
def test_half_mean_over_many_samples(lib, dtype, extra):
    axis = -1 if extra.startswith("axis") else None
    mask = _MASK if "mask" in extra else None
    weight = _W if "weight" in extra else None
    ls64, lo64 = _widened(lib, _LS, dtype), _widened(lib, _LO, dtype)
    w64 = None if weight is None else _widened(lib, weight, dtype)
    kw = {"axis": axis}
    if mask is not None:
        kw["mask"] = mask if lib == "numpy" else torch.from_numpy(mask)
    if weight is not None:
        kw["weight"] = _half(lib, weight, dtype)
    for name, fn in _FNS.items():
        ls, lo = _half(lib, _LS, dtype), _half(lib, _LO, dtype)  # axis=None: 140000 samples
        got = fn(ls, lo, **kw)
        assert str(got.dtype).endswith("float32"), (name, got.dtype)
        got = np.asarray(got.numpy() if hasattr(got, "numpy") else got, dtype=np.float64)
        ref, scale = _reference(name, ls64, lo64, mask, w64, axis)
        err = np.abs(got - ref) / scale
        assert np.all(np.isfinite(got)) and np.all(err < 1e-5), (name, got, ref, err)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_sum_and_none_are_float32(dtype):
    ls, lo = _half("torch", _LS[0], dtype), _half("torch", _LO[0], dtype)
    ls64, lo64 = _widened("torch", _LS[0], dtype), _widened("torch", _LO[0], dtype)
    ref = _terms("k3", ls64, lo64)
    per = k3(ls, lo, reduction="none")
    assert per.dtype == torch.float32
    np.testing.assert_allclose(per.double().numpy(), ref, rtol=1e-6, atol=0)
    tot = k3(ls, lo, reduction="sum")
    assert tot.dtype == torch.float32
    assert abs(float(tot) / ref.sum() - 1) < 1e-5


def test_half_gradient_flows_to_the_half_input():
    ls = _half("torch", _LS[0, :1000], "float16").requires_grad_()
    lo = _half("torch", _LO[0, :1000], "float16")
    k3(ls, lo).backward()
    assert ls.grad.dtype == torch.float16
    l64 = lo.double().numpy() - ls.detach().double().numpy()
    ref = -np.expm1(l64) / 1000  # d/d ls of mean(exp(l) - 1 - l), l = lo - ls
    # the gradient is returned in float16: half an ulp, or half the subnormal spacing 2^-24
    np.testing.assert_allclose(ls.grad.double().numpy(), ref, rtol=2.0**-11, atol=2.0**-25)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("extra", ["plain", "mask", "weight"])
def test_reduce_rows_half_counts_in_float32(dtype, extra):
    """reduce_rows itself (the core never passes half rows, other callers may)."""
    rows64 = _widened("torch", np.abs(_LO[0]), dtype)
    rows = _half("torch", np.abs(_LO[0]), dtype)
    mask = torch.from_numpy(_MASK[0]) if extra == "mask" else None
    weight = _half("torch", _W[0], dtype) if extra == "weight" else None
    out = reduce_rows(array_namespace(rows), rows, "mean", mask, weight)
    assert out.dtype == torch.float32
    m = _MASK[0] if extra == "mask" else np.ones(N, bool)
    w = _widened("torch", _W[0], dtype) if extra == "weight" else np.ones(N)
    ref = np.sum(m * w * rows64) / np.sum(m * w)
    assert abs(float(out) / ref - 1) < 1e-5
    if extra == "plain":  # NumPy float16 too
        rows = rows64.astype(np.float16)  # (exact: already half)
        out = reduce_rows(array_namespace(rows), rows, "mean")
        assert out.dtype == np.float32 and abs(float(out) / ref - 1) < 1e-5
