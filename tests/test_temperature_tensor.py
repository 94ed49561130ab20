"""A temperature (or beta) tensor that records a gradient is refused, naming the argument.

kldiv takes both as constants; accepting a ``requires_grad`` tensor used to drop its gradient
without a word (a learnable distillation temperature that silently never learns). The error's
recipe (divide the logits by T yourself, temperature=1) is checked here against torch.autograd
on the float64 textbook formula.
"""
import pytest
import torch

import kldiv
from kldiv.torch import kl_div_inplace, linear_kl_div

L = dict(p_space="logits", q_space="logits")


def _T():
    return torch.tensor(2.0, requires_grad=True)


@pytest.mark.parametrize("call", [
    lambda p, q: kldiv.kl_div(p, q, temperature=_T(), **L),
    lambda p, q: kldiv.reverse_kl(p, q, temperature=_T(), reduction="sum", **L),
    lambda p, q: kldiv.jeffreys_div(p, q, temperature=_T(), **L),
    lambda p, q: kldiv.kl_terms(p, q, temperature=_T(), **L),
    lambda p, q: kldiv.torch.KLDivLoss(temperature=_T(), **L)(p, q),
    lambda p, q: kl_div_inplace(p, q.detach().clone(), temperature=_T(), **L),
    lambda p, q: linear_kl_div(q, torch.eye(5), p, temperature=_T()),
])
def test_temperature_requiring_grad_is_refused(call):
    p = torch.randn(3, 5)
    q = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(TypeError, match=r"^temperature: a tensor that requires grad"):
        call(p, q)


def test_beta_requiring_grad_is_refused():
    p, q = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(TypeError, match=r"^beta: a tensor that requires grad"):
        kldiv.js_div(p, q, beta=torch.tensor(0.3, requires_grad=True), **L)


def test_detached_tensor_temperature_still_accepted():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    a = kldiv.kl_div(p, q, temperature=torch.tensor(2.0), **L)
    ref = (torch.softmax(p.double() / 2, -1) * (torch.log_softmax(p.double() / 2, -1)
                                                - torch.log_softmax(q.double() / 2, -1))).sum(-1)
    torch.testing.assert_close(a.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fn", [kldiv.kl_div, kldiv.reverse_kl, kldiv.js_div, kldiv.jeffreys_div])
def test_learnable_temperature_recipe(fn):
    """logits / T with temperature=1 gives d loss / d T (float64 textbook autograd)."""
    g = torch.Generator().manual_seed(2)
    p = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3
    q = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3
    T = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    (gT,) = torch.autograd.grad(fn(p / T, q / T, reduction="sum", **L), T)

    def naive(T):
        lp, lq = torch.log_softmax(p / T, -1), torch.log_softmax(q / T, -1)
        kl = lambda a, b: (a.exp() * (a - b)).sum()  # noqa: E731
        if fn is kldiv.kl_div:
            return kl(lp, lq)
        if fn is kldiv.reverse_kl:
            return kl(lq, lp)
        if fn is kldiv.jeffreys_div:
            return kl(lp, lq) + kl(lq, lp)
        lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
        return 0.5 * kl(lp, lm) + 0.5 * kl(lq, lm)

    T2 = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(naive(T2), T2)
    torch.testing.assert_close(gT, ref, rtol=1e-10, atol=0)
