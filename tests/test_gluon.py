"""kldiv.gluon.KLDivLoss against the real MXNet (fixtures from 1.9.1 and 1.8.0), on every backend.

The fixtures (tests/fixtures/gluon/*.npz) hold inputs, MXNet's outputs and MXNet's gradients
(``mx.autograd``, with a random head gradient); scripts/make_gluon_fixtures.py produced them
under MXNet in its own virtual environment. MXNet 1.9.1 aggregates by sum, 1.8.0 by mean: each
fixture is checked with the matching ``aggregate``. The other references are a naive float64
formula written here (scipy's log_softmax) and kldiv.kl_div for the true KL.
Tolerances: 64 eps of the fixture's dtype, relative, and absolute relative to the largest value
(MXNet accumulates float32 sums in its own order; the largest deviation seen is about 27 eps).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax

import kldiv
from conftest import BACKENDS as SELECTED_BACKENDS
from conftest import Backend, to_numpy
from kldiv.gluon import KLDivLoss

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "gluon"
FIXTURE_FILES = {"1.9.1": "mxnet_1_9_1.npz", "1.8.0": "mxnet_1_8_0.npz"}
ARRAYS = ("pred", "label", "sample_weight", "head", "out", "grad_pred", "grad_label")


def _load(filename):
    with np.load(FIXTURE_DIR / filename) as z:
        meta = json.loads(str(z["__meta__"]))
        cases = {}
        for key, params in meta["cases"].items():
            case = dict(params)
            for a in ARRAYS:
                case[a] = z[f"{key}__{a}"] if f"{key}__{a}" in z.files else None
            cases[key] = case
    return meta, cases


FIXTURES = {version: _load(name) for version, name in FIXTURE_FILES.items()}
CASE_IDS = [(v, k) for v, (_, cases) in FIXTURES.items() for k in cases]


def _loss_fn(case, aggregate):
    return KLDivLoss(from_logits=case["from_logits"], axis=case["axis"], weight=case["weight"],
                     batch_axis=case["batch_axis"], aggregate=aggregate)


def assert_matches(actual, expected, dtype, what):
    """Equal non-finite pattern (nan where nan, inf of the same sign), close finite values."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: nan pattern")
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected), err_msg=f"{what}: +inf")
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=f"{what}: -inf")
    fin = np.isfinite(expected)
    eps = float(np.finfo(dtype).eps)
    scale = max(1.0, float(np.max(np.abs(expected[fin]), initial=0.0)))
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=64 * eps, atol=64 * eps * scale,
                               err_msg=what)


# ----------------------------------------------------------------------------- backends
# Backends are those selected in tests/conftest.py (KLDIV_BACKENDS; numpy, torch, jax and
# array_api_strict by default); a selected backend that does not import fails, never skips.
# Values run on all of them, gradients on torch (autograd) and jax (jax.vjp).
# JAX compiles every new (op, shape, dtype) combination, about 60 ms of CPU each here, so JAX runs
# each fixture case in one of float32/float64: float32 against MXNet 1.9.1 (sum), float64 against
# 1.8.0 (mean); float16 (the tutorial's pairs) on both. array_api_strict has no float16.
JAX_SKIPS = {"1.9.1": "float64", "1.8.0": "float32"}


def _runs(name, version, key):
    dtype = FIXTURES[version][1][key]["dtype"]
    if name == "jax":
        return dtype != JAX_SKIPS[version]
    return not (name == "array_api_strict" and dtype == "float16")


def _params(names):
    out = []
    for name in names:
        for version, key in CASE_IDS:
            if not _runs(name, version, key):
                continue
            out.append(pytest.param(name, version, key, id=f"{name}-{version}-{key}"))
    return out


VALUE_PARAMS = _params(SELECTED_BACKENDS)
GRAD_PARAMS = _params([b for b in SELECTED_BACKENDS if b in ("torch", "jax")])
_BACKENDS: dict = {}
needs_torch = pytest.mark.skipif("torch" not in SELECTED_BACKENDS, reason="torch not in KLDIV_BACKENDS")
needs_jax = pytest.mark.skipif("jax" not in SELECTED_BACKENDS, reason="jax not in KLDIV_BACKENDS")


def _backend(name):
    if name not in _BACKENDS:
        try:
            _BACKENDS[name] = Backend(name)
        except ImportError as exc:
            pytest.fail(f"backend {name!r} was selected (KLDIV_BACKENDS) but does not import: {exc}")
    return _BACKENDS[name]


def _native_to_numpy(xp, x):
    """``x`` as NumPy in its own dtype, after checking it is the backend's array type."""
    assert xp.is_native(x), f"{xp.name}: got {type(x)}, not the caller's array type"
    out = to_numpy(x, dtype=None)  # (which widens torch's half precision to float32)
    return out.astype(str(x.dtype).split(".")[-1])


def _torch_value_and_grads(xp, fn, case):
    p = xp.asarray(case["pred"], requires_grad=True)
    lab = xp.asarray(case["label"], requires_grad=True)
    sw = None if case["sample_weight"] is None else xp.asarray(case["sample_weight"])
    out = fn(p, lab, sw)
    out.backward(xp.asarray(case["head"]))
    return _native_to_numpy(xp, out), _native_to_numpy(xp, p.grad), _native_to_numpy(xp, lab.grad)


_JAX_RESULTS: dict = {}


def _jax_fixture_results(xp, version):
    """{case key: (out, d/dpred, d/dlabel)} for the JAX cases of one fixture.

    All of them run as one ``jax.jit`` program, computed once: one compilation instead of one
    per case and op (the same code path as an eager call: the loss has no value-dependent
    branches)."""
    if version not in _JAX_RESULTS:
        import jax

        meta, cases = FIXTURES[version]

        def run_all(inputs):
            results = {}
            for key, (p, lab, sw, head) in inputs.items():
                fn = _loss_fn(cases[key], meta["aggregate"])
                out, vjp = jax.vjp(lambda p_, l_, fn=fn, sw=sw: fn(p_, l_, sw), p, lab)
                results[key] = (out, *vjp(head))
            return results

        with jax.enable_x64(True):
            inputs = {k: tuple(None if c[a] is None else xp.asarray(c[a])
                               for a in ("pred", "label", "sample_weight", "head"))
                      for k, c in cases.items() if _runs("jax", version, k)}
            results = jax.jit(run_all)(inputs)
        _JAX_RESULTS[version] = {k: tuple(_native_to_numpy(xp, x) for x in r)
                                 for k, r in results.items()}
    return _JAX_RESULTS[version]


# ----------------------------------------------------------------------------- fixture metadata
def test_fixtures_record_the_mxnet_they_came_from():
    meta19, cases19 = FIXTURES["1.9.1"]
    meta18, cases18 = FIXTURES["1.8.0"]
    assert meta19["mxnet_version"] == "1.9.1" and meta19["aggregate"] == "sum"
    assert meta18["mxnet_version"] == "1.8.0" and meta18["aggregate"] == "mean"
    assert "F.sum(loss, axis=self._batch_axis, exclude=True)" in meta19["hybrid_forward_source"]
    assert "F.mean(loss, axis=self._batch_axis, exclude=True)" in meta18["hybrid_forward_source"]
    assert cases19.keys() == cases18.keys()
    assert {c["dtype"] for c in cases19.values()} == {"float16", "float32", "float64"}
    total = sum((FIXTURE_DIR / f).stat().st_size for f in FIXTURE_FILES.values())
    assert total < 1_000_000


@pytest.mark.parametrize("key", sorted(FIXTURES["1.9.1"][1]))
def test_mxnet_18_mean_is_mxnet_191_sum_over_count(key):
    """The two real MXNets differ only by the divisor: the number of aggregated elements."""
    c19, c18 = FIXTURES["1.9.1"][1][key], FIXTURES["1.8.0"][1][key]
    np.testing.assert_array_equal(c19["pred"], c18["pred"])
    count = c19["pred"].size // c19["pred"].shape[c19["batch_axis"]]
    with np.errstate(invalid="ignore"):
        assert_matches(c19["out"] / count, c18["out"], c19["dtype"], key)


# ----------------------------------------------------------------------------- against MXNet
@pytest.mark.parametrize(("name", "version", "key"), VALUE_PARAMS)
def test_value_matches_mxnet(name, version, key):
    xp = _backend(name)
    meta, cases = FIXTURES[version]
    case = cases[key]
    if xp.name == "jax":
        out = _jax_fixture_results(xp, version)[key][0]
    else:
        fn = _loss_fn(case, meta["aggregate"])
        args = [None if case[a] is None else xp.asarray(case[a])
                for a in ("pred", "label", "sample_weight")]
        with np.errstate(invalid="ignore", divide="ignore"):  # MXNet's nan/inf, warned by NumPy
            out = _native_to_numpy(xp, fn(*args))
    assert out.dtype == np.dtype(case["dtype"])
    assert_matches(out, case["out"], case["dtype"], f"{xp.name} {version} {key}")


@pytest.mark.parametrize(("name", "version", "key"), GRAD_PARAMS)
def test_gradients_match_mxnet_autograd(name, version, key):
    ad_xp = _backend(name)
    meta, cases = FIXTURES[version]
    case = cases[key]
    if ad_xp.name == "jax":
        out, gpred, glabel = _jax_fixture_results(ad_xp, version)[key]
    else:
        out, gpred, glabel = _torch_value_and_grads(ad_xp, _loss_fn(case, meta["aggregate"]), case)
    what = f"{ad_xp.name} {version} {key}"
    assert_matches(out, case["out"], case["dtype"], what + " value")
    assert_matches(gpred, case["grad_pred"], case["dtype"], what + " d/dpred")
    assert_matches(glabel, case["grad_label"], case["dtype"], what + " d/dlabel")


def test_tutorial_common_support_values():
    """What MXNet really returns for the tutorial's dist_4 (no epsilon rescues pred = log 0)."""
    cases = FIXTURES["1.9.1"][1]
    for dtype in ("float32", "float64"):
        assert np.isposinf(cases[f"tutorial_dist_4_vs_dist_1__{dtype}"]["out"]).all()
        assert np.isnan(cases[f"tutorial_dist_4_vs_dist_4__{dtype}"]["out"]).all()
        c = cases[f"tutorial_dist_4_vs_dist_1__{dtype}"]
        loss = KLDivLoss(aggregate="sum")(c["pred"], c["label"])
        assert np.isposinf(loss).all()
    # The true KL of the same pair is +inf as well, and finite for the reverse direction.
    d1, d4 = np.array([0.2, 0.5, 0.2, 0.1]), np.array([0.0, 0.9, 0.0, 0.1])
    assert np.isposinf(kldiv.kl_div(d1, d4))
    ref = 0.9 * math.log(0.9 / 0.5)  # 0.1 * log(0.1 / 0.1) = 0
    assert float(kldiv.kl_div(d4, d1)) == pytest.approx(ref, rel=1e-12)
    with np.errstate(divide="ignore"):
        got = KLDivLoss(aggregate="sum")(np.log(d1)[None], d4[None])
    # the 1e-12 added to the label shifts the value by about sum(label * 1e-12 / label) = 2e-12
    assert float(got[0]) == pytest.approx(ref, abs=1e-11)


# ----------------------------------------------------------------------------- naive reference
def naive(pred, label, sw, *, from_logits, axis, weight, batch_axis, aggregate):
    """A float64 transcription of MXNet's formula, with scipy's log_softmax."""
    pred = np.asarray(pred, np.float64)
    label = np.asarray(label, np.float64)
    logq = pred if from_logits else log_softmax(pred, axis=axis)
    terms = label * (np.log(label + 1e-12) - logq)
    if sw is not None:
        terms = terms * sw
    if weight is not None:
        terms = terms * weight
    moved = np.moveaxis(terms, batch_axis, 0).reshape(terms.shape[batch_axis], -1)
    return moved.sum(axis=1) if aggregate == "sum" else moved.mean(axis=1)


@st.composite
def gluon_inputs(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    batch_axis = draw(st.integers(-ndim, ndim - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    from_logits = draw(st.booleans())
    logits = rng.normal(scale=3.0, size=shape)
    pred = log_softmax(logits, axis=axis) if from_logits else logits
    label = np.exp(log_softmax(rng.normal(scale=2.0, size=shape), axis=axis))
    label = np.where(rng.random(shape) < 0.2, 0.0, label)
    sw = None
    if draw(st.booleans()):
        sw_shape = tuple(s if draw(st.booleans()) else 1 for s in shape)
        sw = rng.uniform(0.0, 2.0, size=sw_shape)
    weight = draw(st.one_of(st.none(), st.floats(-3, 3, allow_nan=False)))
    opts = dict(from_logits=from_logits, axis=axis, weight=weight, batch_axis=batch_axis,
                aggregate=draw(st.sampled_from(["mean", "sum"])))
    return pred, label, sw, opts


@settings(max_examples=60, deadline=None)
@given(gluon_inputs())
def test_matches_naive_formula(inputs):
    pred, label, sw, opts = inputs
    got = KLDivLoss(**opts)(pred, label, sw)
    want = naive(pred, label, sw, **opts)
    assert got.shape == (pred.shape[opts["batch_axis"]],)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(gluon_inputs())
def test_sum_is_true_kl_and_mean_divides_by_count(inputs):
    """aggregate='sum' is kldiv.kl_div summed per sample (up to the 1e-12 label epsilon);
    aggregate='mean' is that divided by the number of aggregated elements."""
    pred, label, _, opts = inputs
    axis, batch_axis = opts["axis"] % pred.ndim, opts["batch_axis"] % pred.ndim
    label = np.exp(log_softmax(np.log(label + 0.05), axis=axis))  # strictly positive rows
    space = "log_probs" if opts["from_logits"] else "logits"
    true_kl = kldiv.kl_div(label, pred, q_space=space, axis=axis)  # shape without `axis`
    if axis == batch_axis:
        # each sample is a slice of the categories: the per-sample value is the per-category term
        terms = kldiv.kl_terms(label, pred, q_space=space, axis=axis)
        per_sample = np.moveaxis(terms, batch_axis, 0).reshape(pred.shape[batch_axis], -1).sum(1)
    else:
        b = batch_axis if batch_axis < axis else batch_axis - 1
        per_sample = np.moveaxis(np.asarray(true_kl), b, 0).reshape(pred.shape[batch_axis], -1).sum(1)
    got = KLDivLoss(from_logits=opts["from_logits"], axis=axis, batch_axis=batch_axis,
                    aggregate="sum")(pred, label)
    eps_bound = 1e-12 * pred.size / pred.shape[batch_axis] + 1e-12
    np.testing.assert_allclose(got, per_sample, rtol=1e-9, atol=eps_bound + 1e-10)
    count = pred.size // pred.shape[batch_axis]
    got_mean = KLDivLoss(from_logits=opts["from_logits"], axis=axis, batch_axis=batch_axis)(pred, label)
    np.testing.assert_allclose(got_mean * count, got, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- autodiff
@needs_torch
def test_torch_gradcheck_and_gradgradcheck():
    import torch

    g = torch.Generator().manual_seed(3)
    pred = torch.randn(3, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    label = torch.softmax(torch.randn(3, 2, 4, dtype=torch.float64, generator=g), -1)
    label.requires_grad_(True)
    sw = torch.rand(3, 1, 1, dtype=torch.float64, generator=g)
    for opts in (dict(from_logits=False, weight=0.7), dict(from_logits=False, axis=1, batch_axis=1),
                 dict(from_logits=True, aggregate="sum")):
        fn = KLDivLoss(**opts)
        assert torch.autograd.gradcheck(lambda p, lab: fn(p, lab, sw), (pred, label))
        assert torch.autograd.gradgradcheck(lambda p, lab: fn(p, lab, sw), (pred, label))


@needs_jax
def test_jax_grad_eager_and_jit():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    pred = rng.normal(size=(4, 6)).astype(np.float32)
    label = np.exp(log_softmax(rng.normal(size=(4, 6)), axis=-1)).astype(np.float32)
    fn = KLDivLoss(from_logits=False, aggregate="sum")
    total = lambda p: jnp.sum(fn(p, jnp.asarray(label)))  # noqa: E731
    g = jax.grad(total)(jnp.asarray(pred))
    # d/dz of sum_j y_j (log y_j - log_softmax(z)_j) = softmax(z) * sum(y) - y
    want = np.exp(log_softmax(pred.astype(np.float64), axis=-1)) - label
    np.testing.assert_allclose(np.asarray(g), want, atol=1e-6)
    assert jax.jit(fn)(jnp.asarray(pred), jnp.asarray(label)).shape == (4,)


def test_returns_callers_type_and_dtype(xp):
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 3)).astype(np.float32)
    label = np.full((2, 3), 1 / 3, dtype=np.float32)
    out = KLDivLoss(from_logits=False)(xp.asarray(pred), xp.asarray(label))
    out_np = _native_to_numpy(xp, out)
    assert out_np.dtype == np.float32 and out_np.shape == (2,)
    want = naive(pred, label, None, from_logits=False, axis=-1, weight=None, batch_axis=0,
                 aggregate="mean")
    np.testing.assert_allclose(out_np, want, rtol=1e-5)


def test_mixed_float_dtypes_promote():
    pred = np.log(np.full((2, 4), 0.25, dtype=np.float32))
    label = np.full((2, 4), 0.25)
    assert KLDivLoss()(pred, label).dtype == np.float64
    assert KLDivLoss()(pred, label.astype(np.float32), 2.0).dtype == np.float32
    assert KLDivLoss()(pred, label.astype(np.float32), np.float64(2.0)).dtype == np.float32


# ----------------------------------------------------------------------------- errors
GOOD_PRED = np.log(np.full((2, 4), 0.25))
GOOD_LABEL = np.full((2, 4), 0.25)


@pytest.mark.parametrize(("kwargs", "exc", "name"), [
    (dict(aggregate="batchmean"), ValueError, "aggregate"),
    (dict(aggregate=None), ValueError, "aggregate"),
    (dict(from_logits="yes"), TypeError, "from_logits"),
    (dict(from_logits=1), TypeError, "from_logits"),
    (dict(axis=1.0), TypeError, "axis"),
    (dict(batch_axis="0"), TypeError, "batch_axis"),
    (dict(weight=np.array([2.0])), TypeError, "weight"),
    (dict(weight="2"), TypeError, "weight"),
    (dict(weight=True), TypeError, "weight"),
])
def test_bad_options(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        KLDivLoss(**kwargs)


@pytest.mark.parametrize(("args", "opts", "exc", "name"), [
    ((GOOD_PRED, GOOD_LABEL[:, :3]), {}, ValueError, "label: shape"),
    ((GOOD_PRED, GOOD_LABEL[:1]), {}, ValueError, "label: shape"),
    ((GOOD_PRED, GOOD_LABEL.reshape(4, 2)), {}, ValueError, "label: shape"),
    ((GOOD_PRED, GOOD_LABEL, np.ones((3, 1))), {}, ValueError, "sample_weight: shape"),
    ((GOOD_PRED, GOOD_LABEL, np.ones((5, 2, 4))), {}, ValueError, "sample_weight: shape"),
    ((GOOD_PRED.astype(int), GOOD_LABEL), {}, TypeError, "pred: expected a real floating"),
    ((GOOD_PRED, (GOOD_LABEL > 0).astype(np.int32)), {}, TypeError, "label: expected a real float"),
    ((GOOD_PRED, GOOD_LABEL, np.ones((2, 1), dtype=bool)), {}, TypeError, "sample_weight"),
    ((GOOD_PRED, GOOD_LABEL, True), {}, TypeError, "sample_weight"),
    ((GOOD_PRED.tolist(), GOOD_LABEL), {}, TypeError, "pred: expected a NumPy"),
    ((GOOD_PRED, GOOD_LABEL.tolist()), {}, TypeError, "label: expected a NumPy"),
    ((np.float64(0.1), np.float64(0.2)), {}, ValueError, "pred: expected at least one dimension"),
    ((GOOD_PRED, GOOD_LABEL), dict(axis=2), ValueError, "axis: 2 is out of range"),
    ((GOOD_PRED, GOOD_LABEL), dict(batch_axis=-3), ValueError, "batch_axis: -3 is out of range"),
])
def test_bad_inputs(args, opts, exc, name):
    with pytest.raises(exc, match=name):
        KLDivLoss(**opts)(*args)


@needs_torch
def test_mixed_libraries_rejected():
    import torch

    with pytest.raises(TypeError, match="one array library"):
        KLDivLoss()(torch.tensor(GOOD_PRED), GOOD_LABEL)


def test_repr():
    assert repr(KLDivLoss(from_logits=False, weight=2, aggregate="sum")) == (
        "KLDivLoss(from_logits=False, axis=-1, weight=2.0, batch_axis=0, aggregate='sum')"
    )
