"""linear_kl_div on an empty batch (audit 3, F6): 0 rows give 0 (the empty sum; "mean" over
no rows is 0, as kldiv.kl_div and an all-masked batch give) and zero gradients of the right
shapes, never a raw torch error. Dense and top-k targets, rows shapes (0,) and (0, 3)."""
import pytest
import torch

import kldiv
from kldiv.torch import LinearKLDivLoss, linear_kl_div

H, V = 4, 6


def _target(kind_of_target, rows):
    if kind_of_target == "topk":
        return (torch.zeros(*rows, 2, dtype=torch.long), torch.zeros(*rows, 2))
    return torch.randn(*rows, V)


@pytest.mark.parametrize("target", ["logits", "topk"])
@pytest.mark.parametrize("rows", [(0,), (0, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "js"])
def test_empty_batch(target, rows, reduction, divergence):
    h = torch.randn(*rows, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    loss = linear_kl_div(h, w, _target(target, rows), bias=b, divergence=divergence,
                         reduction=reduction)
    ref = kldiv.kl_div(torch.randn(*rows, V), torch.randn(*rows, V), reduction=reduction)
    assert loss.shape == () and float(loss.detach()) == float(ref) == 0.0
    loss.backward()
    assert h.grad.shape == h.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_empty_batch_module():
    h = torch.randn(0, H, requires_grad=True)
    loss = LinearKLDivLoss()(h, torch.randn(V, H), torch.randn(0, V))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert h.grad.shape == (0, H)
