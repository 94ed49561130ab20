"""Regressions found while building kldiv, each against an independent reference."""
import numpy as np
import pytest

import kldiv

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [50.0, 1000.0])
def test_far_apart_logits_give_finite_kl_and_gradients(dtype, gap):
    # p puts (almost) all mass on category 0, q on category 1: KL = 2 * gap, not inf
    a = torch.tensor([[gap, -gap], [0.1, 0.2]], dtype=dtype, requires_grad=True)
    b = torch.tensor([[-gap, gap], [0.3, 0.1]], dtype=dtype, requires_grad=True)
    v = kldiv.kl_div(a, b, p_space="logits", q_space="logits")
    ref = F.kl_div(F.log_softmax(b.double(), -1), F.log_softmax(a.double(), -1),
                   log_target=True, reduction="none").sum(-1)
    np.testing.assert_allclose(v.detach().double().numpy(), ref.detach().numpy(), rtol=1e-5)
    v.sum().backward()
    expected_b = (F.softmax(b.double(), -1) - F.softmax(a.double(), -1)).detach()
    np.testing.assert_allclose(b.grad.double().numpy(), expected_b.numpy(), atol=1e-6)
    assert torch.isfinite(a.grad).all()
    for fn in (kldiv.reverse_kl, kldiv.js_div, kldiv.jeffreys_div):
        assert torch.isfinite(fn(a, b, p_space="logits", q_space="logits")).all()


def test_probabilities_far_apart_are_finite():
    p = np.array([0.25, 0.75], dtype=np.float32)
    q = np.array([1e-9, 1 - 1e-9], dtype=np.float32)
    qn = q.astype(np.float64) / q.astype(np.float64).sum()
    ref = np.sum(p * np.log(p / qn))
    np.testing.assert_allclose(float(kldiv.kl_div(p, q)), ref, rtol=1e-5)


def test_masked_rows_with_log_probs_are_not_validated():
    # masked rows may hold anything; the unmasked rows are log-probabilities
    lp = np.log(np.array([[0.25, 0.75], [0.5, 0.5], [0.1, 0.9]]))
    lq = np.log(np.array([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9]]))
    lp[1] = np.nan
    mask = np.array([True, False, True])
    got = kldiv.kl_div(lp, lq, p_space="log_probs", q_space="log_probs", reduction="mean",
                       mask=mask)
    p0, q0 = np.exp(lp[0]), np.exp(lq[0])
    np.testing.assert_allclose(float(got), np.sum(p0 * np.log(p0 / q0)) / 2, rtol=1e-12)


@pytest.mark.parametrize("fn", [kldiv.kl_div, kldiv.reverse_kl])
def test_numpy_float32_kernel_path_matches_float64_oracle(fn):
    # float32 NumPy logits take the compiled row kernel; compare with a float64 textbook formula
    from scipy.special import log_softmax

    rng = np.random.default_rng(7)
    a = (2 * rng.standard_normal((5, 3, 300))).astype(np.float32)
    b = (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32)
    a[0, 0, :10] = -np.inf
    b[0, 0, :10] = -np.inf
    b[1, 2, 5] = -np.inf  # forward KL +inf on this row
    mask = np.ones((5, 3), dtype=bool)
    mask[2, 1] = False
    a[2, 1, 0] = np.nan  # masked: may hold anything
    la, lb = log_softmax(a.astype(np.float64), -1), log_softmax(b.astype(np.float64), -1)
    if fn is kldiv.reverse_kl:
        la, lb = lb, la
    pa = np.exp(la)
    with np.errstate(invalid="ignore"):
        ref = np.where(pa > 0, pa * (la - lb), 0.0).sum(-1)
    ref[~mask] = 0.0
    got = fn(a, b, p_space="logits", q_space="logits", mask=mask)
    assert got.dtype == np.float32 and got.shape == (5, 3)
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(got), fin)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=2e-5, atol=1e-9)
    mean = fn(a, b, p_space="logits", q_space="logits", mask=mask & fin, reduction="mean")
    np.testing.assert_allclose(float(mean), ref[mask & fin].mean(), rtol=2e-5)


def test_errors_on_a_single_distribution_say_so():
    with pytest.raises(ValueError, match="the distribution sums to 1.1"):
        kldiv.kl_div(np.array([0.5, 0.6]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="batchmean"):
        kldiv.kl_div(np.array([0.5, 0.5]), np.array([0.5, 0.5]), reduction="batchmean")


def test_numpy_float32_js_through_the_kernel_matches_float64_oracle():
    # float32 NumPy logits: JS (beta 1/2) through the compiled row kernel, rows with -inf through
    # its NumPy formula; against scipy's Jensen-Shannon distance squared (float64)
    from scipy.spatial.distance import jensenshannon
    from scipy.special import softmax

    rng = np.random.default_rng(8)
    a = (2 * rng.standard_normal((4, 3, 3000))).astype(np.float32)
    b = (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32)
    b[3] = -a[3]  # far apart
    a[0, 0, :10] = -np.inf
    mask = np.ones((4, 3), dtype=bool)
    mask[2, 1] = False
    a[2, 1, 0] = np.nan  # masked: may hold anything
    ref = jensenshannon(softmax(a.astype(np.float64), -1), softmax(b.astype(np.float64), -1),
                        axis=-1) ** 2
    got = kldiv.js_div(a, b, p_space="logits", q_space="logits", mask=mask)
    assert got.dtype == np.float32 and got.shape == (4, 3)
    np.testing.assert_allclose(got[mask], ref[mask], rtol=2e-5)
    assert got[2, 1] == 0.0
    # beta other than 1/2 is not the kernel's: the core computes it, still right
    got_b = kldiv.js_div(a[:1], b[:1], p_space="logits", q_space="logits", beta=0.3)
    p, q = softmax(a[:1].astype(np.float64), -1), softmax(b[:1].astype(np.float64), -1)
    m = 0.3 * p + 0.7 * q
    with np.errstate(divide="ignore", invalid="ignore"):
        ref_b = (0.3 * np.where(p > 0, p * np.log(p / m), 0) + 0.7 * q * np.log(q / m)).sum(-1)
    np.testing.assert_allclose(got_b, ref_b, rtol=2e-5)
