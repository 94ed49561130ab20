"""``set_fused(False)`` / ``with fused(False):`` send every torch call through the core (the
documented escape hatch): no kldiv autograd Function in the graph, and the values and gradients
those of the float64 textbook formula (tests/torch_reference.py naive_row)."""
import pytest
import torch

import kldiv
from kldiv.torch import fused, fused_enabled, set_fused
from torch_reference import naive_row

L = dict(p_space="logits", q_space="logits")
KINDS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}


def _graph_names(t):
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo.extend(g for g, _ in f.next_functions)
    return names


@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_false_goes_through_the_core(kind):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, generator=g, requires_grad=True)
    b = torch.randn(4, 5, generator=g)
    f = KINDS[kind]
    f(a, b, **L), f(a, b, **L)  # the second call of a signature takes the fast lane
    with fused(False):
        assert not fused_enabled()
        out = f(a, b, **L)
    assert fused_enabled()
    names = _graph_names(out)
    assert not any("Lane" in n or "Divergence" in n or "Fused" in n for n in names), names
    ref = torch.stack([naive_row(kind, x, y, "logits", "logits") for x, y in zip(a.detach().double(), b.double())])
    torch.testing.assert_close(out.detach().double(), ref, rtol=2e-6, atol=1e-7)
    out.sum().backward()
    a64 = a.detach().double().requires_grad_()
    torch.stack([naive_row(kind, x, y, "logits", "logits") for x, y in zip(a64, b.double())]).sum().backward()
    for r in range(4):  # per row
        torch.testing.assert_close(a.grad[r].double(), a64.grad[r], rtol=1e-5, atol=1e-6)


def test_set_fused_false_then_back():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    try:
        set_fused(False)
        x = kldiv.kl_div(a.requires_grad_(), b, **L)
        assert not any("Lane" in n for n in _graph_names(x))
    finally:
        set_fused(True)
    assert fused_enabled()
