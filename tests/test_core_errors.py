"""Bad inputs to the core: each is a ValueError or TypeError whose message names the argument.

Also the validation switches: ``validate=False``, ``kldiv.validation(False)`` and
``kldiv.set_validation(False)`` skip the value checks (signs, finiteness, normalisation) but not
the shape, dtype and option checks; and ``kldiv.normalization_tolerance`` is the documented
``min(0.05, max(1e-6, 8 * eps * sqrt(n)))``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special

import kldiv
import oracle
from conftest import to_numpy

FUNCS = [kldiv.kl_div, kldiv.reverse_kl, kldiv.js_div, kldiv.jeffreys_div, kldiv.kl_terms]
U = np.full((2, 4), 0.25)  # two uniform rows


def _fid(f):
    return f.__name__


# ----------------------------------------------------------------------------------------------
# options, shapes, dtypes (checked always)


@pytest.mark.parametrize("f", FUNCS, ids=_fid)
def test_shape_mismatch_names_p_and_q(f):
    with pytest.raises(ValueError, match=r"p and q.*categories"):
        f(U, np.full((2, 5), 0.2))
    # fewer dimensions broadcast as in NumPy (leading 1s): one p against a batch of q
    expected = (3, 2, 4) if f is kldiv.kl_terms else (3, 2)
    assert f(np.full(4, 0.25), np.full((3, 2, 4), 0.25)).shape == expected
    with pytest.raises(ValueError, match=r"p and q.*broadcast"):
        f(U, np.full((3, 4), 0.25))


@pytest.mark.parametrize("f", FUNCS, ids=_fid)
def test_unknown_space_and_reduction(f):
    with pytest.raises(ValueError, match=r"p_space.*'probs', 'log_probs', 'logits'.*'prob'"):
        f(U, U, p_space="prob")
    with pytest.raises(ValueError, match=r"q_space.*'logit'"):
        f(U, U, q_space="logit")
    if f is not kldiv.kl_terms:
        with pytest.raises(ValueError, match=r"reduction.*'batchmean'"):
            f(U, U, reduction="batchmean")
        with pytest.raises(ValueError, match=r"reduction"):
            f(U, U, reduction=None)


@pytest.mark.parametrize("f", FUNCS, ids=_fid)
def test_integer_arrays_are_rejected(f, xp):
    ints = xp.asarray(np.array([[1, 0], [0, 1]], dtype=np.int64))
    floats = xp.asarray(np.array([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(TypeError, match=r"^p: .*floating"):
        f(ints, floats)
    with pytest.raises(TypeError, match=r"^q: .*floating"):
        f(floats, ints)


def test_axis_out_of_range_and_not_an_int():
    for f in FUNCS:
        with pytest.raises(ValueError, match=r"axis: 2 is out of range"):
            f(U, U, axis=2)
        with pytest.raises(ValueError, match=r"axis: -3"):
            f(U, U, axis=-3)
        with pytest.raises(TypeError, match=r"axis"):
            f(U, U, axis=1.0)
    with pytest.raises(ValueError, match=r"p: .*scalar"):
        kldiv.kl_div(np.float64(1.0), np.float64(1.0))


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan])
def test_temperature_must_be_positive_and_finite(bad):
    for f in FUNCS:
        with pytest.raises(ValueError, match=r"temperature"):
            f(U, U, p_space="logits", q_space="logits", temperature=bad)
    with pytest.raises(TypeError, match=r"temperature"):
        kldiv.kl_div(U, U, temperature="hot")


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 2.0])
def test_js_beta_strictly_between_0_and_1(beta):
    with pytest.raises(ValueError, match=r"beta"):
        kldiv.js_div(U, U, beta=beta)


def test_mask_of_wrong_shape_or_dtype(xp):
    u = xp.asarray(U)
    with pytest.raises(ValueError, match=r"^mask: shape \(3,\)"):
        kldiv.kl_div(u, u, mask=xp.asarray(np.ones(3, dtype=bool)))
    with pytest.raises(TypeError, match=r"^mask: .*bool"):
        kldiv.kl_div(u, u, mask=xp.asarray(np.ones(2)))
    with pytest.raises(TypeError, match=r"^mask: .*bool"):
        kldiv.kl_div(u, u, mask=xp.asarray(np.ones(2, dtype=np.int64)), reduction="mean")


def test_weight_negative_nonfinite_or_wrong_shape(xp):
    u = xp.asarray(U)
    for w in ([-1.0, 1.0], [np.nan, 1.0], [np.inf, 1.0]):
        with pytest.raises(ValueError, match=r"^weight: .*>= 0"):
            kldiv.kl_div(u, u, weight=xp.asarray(np.array(w)), reduction="mean")
    with pytest.raises(ValueError, match=r"^weight: shape \(3,\)"):
        kldiv.kl_div(u, u, weight=xp.asarray(np.ones(3)))
    with pytest.raises(TypeError, match=r"^weight: .*floating"):
        kldiv.kl_div(u, u, weight=xp.asarray(np.ones(2, dtype=np.int64)))


def test_mixed_array_libraries_name_the_libraries():
    import torch

    for a, b in ((U, torch.from_numpy(U)), (torch.from_numpy(U), U)):
        with pytest.raises(TypeError, match=r"one array library.*numpy.*torch"):
            kldiv.kl_div(a, b)
    with pytest.raises(TypeError, match=r"one array library"):
        kldiv.kl_div(torch.from_numpy(U), torch.from_numpy(U),
                     mask=np.ones(2, dtype=bool))
    import jax.numpy as jnp

    with pytest.raises(TypeError, match=r"one array library"):
        kldiv.kl_div(jnp.asarray(U), torch.from_numpy(U))


def test_mixed_array_libraries_name_the_argument():
    import torch

    with pytest.raises(TypeError, match=r"\bmask\b"):
        kldiv.kl_div(torch.from_numpy(U), torch.from_numpy(U), mask=np.ones(2, dtype=bool))


# ----------------------------------------------------------------------------------------------
# value checks (on by default)


def _rows_with(value, col=1):
    x = U.copy()
    x[1, col] = value
    return x


@pytest.mark.parametrize("f", FUNCS, ids=_fid)
def test_bad_probabilities_name_the_argument(f, xp):
    u = xp.asarray(U)
    cases = [
        (_rows_with(-0.25), r"probabilities must be finite and >= 0; row 1"),
        (_rows_with(np.nan), r"contains nan at row 1"),
        (_rows_with(np.inf), r"probabilities must be finite and >= 0; row 1"),
        (_rows_with(0.35), r"each distribution must sum to 1 within .*row 1 sums to 1\.1"),
        (np.zeros((2, 4)), r"each distribution must sum to 1"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=r"^p: " + msg):
            f(xp.asarray(bad), u)
        with pytest.raises(ValueError, match=r"^q: " + msg):
            f(u, xp.asarray(bad))


@pytest.mark.parametrize("space", ["logits", "log_probs"])
def test_bad_log_space_inputs_name_the_argument(xp, space):
    lu = xp.asarray(np.log(U))
    cases = [
        (np.log(_rows_with(np.nan)), r"contains nan at row 1"),
        (_rows_with(np.inf, col=0) + np.log(U), r"contains \+inf at row 1"),
        (np.full((2, 4), -np.inf), r"row 0 .*-inf everywhere"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=r"^p: " + msg):
            kldiv.kl_div(xp.asarray(bad), lu, p_space=space, q_space=space)
        with pytest.raises(ValueError, match=r"^q: " + msg):
            kldiv.kl_div(lu, xp.asarray(bad), p_space=space, q_space=space)


def test_log_probs_not_normalised(xp):
    lu = xp.asarray(np.log(U))
    shifted = xp.asarray(np.log(U) + 0.01)  # logsumexp 0.01: fine as logits, not as log_probs
    with pytest.raises(ValueError, match=r"^q: log-probabilities .*logsumexp 0.*row 0"):
        kldiv.kl_div(lu, shifted, p_space="log_probs", q_space="log_probs")
    with pytest.raises(ValueError, match=r"^p: log-probabilities"):
        kldiv.reverse_kl(shifted, lu, p_space="log_probs", q_space="logits")
    got = kldiv.kl_div(lu, shifted, p_space="log_probs", q_space="logits")
    assert to_numpy(got) == pytest.approx(0.0, abs=1e-15)


def test_normalization_tolerance_formula_and_boundary():
    eps64, eps32 = np.finfo(np.float64).eps, np.finfo(np.float32).eps
    assert kldiv.normalization_tolerance(eps64, 4) == 1e-6
    assert kldiv.normalization_tolerance(eps32, 32000) == pytest.approx(
        8 * eps32 * math.sqrt(32000), rel=1e-12)
    assert 1.6e-4 < kldiv.normalization_tolerance(eps32, 32000) < 1.8e-4
    assert kldiv.normalization_tolerance(0.01, 10**6) == 0.05  # capped
    tol = kldiv.normalization_tolerance(eps64, 4)
    q = U[:1]
    inside = np.array([[0.25 + 0.5 * tol, 0.25, 0.25, 0.25]])
    outside = np.array([[0.25 + 2.0 * tol, 0.25, 0.25, 0.25]])
    # inside the tolerance: accepted, and renormalised before use (the oracle renormalises too)
    got = kldiv.kl_div(inside, q)
    np.testing.assert_allclose(got, oracle.rows("kl", inside, q), rtol=1e-9)
    with pytest.raises(ValueError, match=r"^p: each distribution must sum to 1 within 1\.0e-06"):
        kldiv.kl_div(outside, q)
    # float32 rows of 32000 entries: the tolerance grows with sqrt(n)
    rng = np.random.default_rng(0)
    big = rng.random(32000).astype(np.float32)
    big /= big.sum()
    tol32 = kldiv.normalization_tolerance(eps32, 32000)
    ok = big.copy()
    ok[0] += np.float32(0.5 * tol32)
    kldiv.kl_div(ok, big)
    bad = big.copy()
    bad[0] += np.float32(2.0 * tol32)
    with pytest.raises(ValueError, match=r"^p: each distribution must sum to 1"):
        kldiv.kl_div(bad, big)


# ----------------------------------------------------------------------------------------------
# switching the value checks off


def test_validate_false_skips_value_checks_only(xp):
    unnorm = np.array([[1.0, 3.0], [2.0, 2.0]])  # rows sum to 4: renormalised, not rejected
    q = np.array([[0.5, 0.5], [0.25, 0.75]])
    ref = scipy.special.rel_entr(unnorm / 4.0, q).sum(-1)
    got = kldiv.kl_div(xp.asarray(unnorm), xp.asarray(q), validate=False)
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-13)
    with pytest.raises(ValueError, match=r"^p: "):
        kldiv.kl_div(xp.asarray(unnorm), xp.asarray(q))
    with pytest.raises(ValueError, match=r"^p: "):
        kldiv.kl_div(xp.asarray(unnorm), xp.asarray(q), validate=True)
    # shape and option checks stay on
    with pytest.raises(ValueError, match=r"p and q"):
        kldiv.kl_div(xp.asarray(unnorm), xp.asarray(np.full((2, 3), 1 / 3)), validate=False)
    with pytest.raises(ValueError, match=r"p_space"):
        kldiv.kl_div(xp.asarray(unnorm), xp.asarray(q), p_space="nope", validate=False)


def test_validation_context_manager_and_global_switch():
    unnorm = np.array([1.0, 3.0])
    q = np.array([0.5, 0.5])
    ref = scipy.special.rel_entr(unnorm / 4.0, q).sum()
    with kldiv.validation(False):
        np.testing.assert_allclose(kldiv.kl_div(unnorm, q), ref, rtol=1e-13)
        with kldiv.validation(True):
            with pytest.raises(ValueError, match=r"^p: "):
                kldiv.kl_div(unnorm, q)
        np.testing.assert_allclose(kldiv.kl_div(unnorm, q), ref, rtol=1e-13)
        # an explicit validate=True wins over the context
        with pytest.raises(ValueError, match=r"^p: "):
            kldiv.kl_div(unnorm, q, validate=True)
    with pytest.raises(ValueError, match=r"^p: "):
        kldiv.kl_div(unnorm, q)
    try:
        kldiv.set_validation(False)
        np.testing.assert_allclose(kldiv.kl_div(unnorm, q), ref, rtol=1e-13)
        with pytest.raises(ValueError, match=r"^p: "):
            kldiv.kl_div(unnorm, q, validate=True)
    finally:
        kldiv.set_validation(True)
    with pytest.raises(ValueError, match=r"^p: "):
        kldiv.kl_div(unnorm, q)
