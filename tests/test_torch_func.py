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


@pytest.mark.parametrize("fn", [kldiv.kl_div, kldiv.reverse_kl, kldiv.js_div, kldiv.jeffreys_div])
def test_vmap_refused_with_a_clear_error(fn):
    """vmap (alone or around grad) names the function and the way out, not an internal error."""
    X, Y = torch.randn(3, 5), torch.randn(3, 5)
    f = lambda a, b: fn(a, b, p_space="logits", q_space="logits")  # noqa: E731
    with pytest.raises(NotImplementedError, match=rf"^kldiv.{fn.__name__}: torch.func.vmap"):
        torch.func.vmap(f)(X, Y)
    with pytest.raises(NotImplementedError, match=r"torch.func.vmap is not supported"):
        torch.func.vmap(torch.func.grad(f, argnums=1))(X, Y)
