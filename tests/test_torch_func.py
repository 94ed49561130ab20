"""torch.func transforms through kldiv's torch fast path (backends/torch_fast.py): the kernel
cannot read the transforms' wrapped tensors (they have no storage), so the hook hands such
calls to the core, whose torch operations go through the transform. torch.func.grad of the
everyday call (its signature already seen by the fast lane) against torch.autograd on the
float64 textbook formula."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from torch_reference import naive_row  # noqa: E402


@pytest.mark.parametrize("spaces", [("probs", "log_probs"), ("logits", "logits")])
def test_func_grad_through_the_everyday_call(spaces):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 11, generator=g)
    b = torch.randn(5, 11, generator=g)
    if spaces[0] == "probs":
        a, b = torch.softmax(a, -1), torch.log_softmax(b, -1)

    def f(y):
        return kldiv.kl_div(a, y, p_space=spaces[0], q_space=spaces[1], reduction="mean")

    f(b)
    f(b)  # the signature is now on the fast lane
    got = torch.func.grad(f)(b)
    y64 = b.double().requires_grad_(True)
    ref = sum(naive_row("forward", a[i].double(), y64[i], *spaces) for i in range(5)) / 5
    ref.backward()
    torch.testing.assert_close(got.double(), y64.grad, rtol=1e-5, atol=1e-7)
