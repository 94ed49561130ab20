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
