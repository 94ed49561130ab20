"""linear_kl_div with the output layer in another dtype than the hidden states.

Audit finding: float32 hidden states against a bfloat16 / float16 lm_head (or float64 against
float32) gave an all-zero gradient for ``hidden`` (the mixed-dtype backprop built a fresh buffer
the caller never read). Reference: torch.autograd on the float64 textbook formula over
``hidden @ weight.T + bias`` with the weight's stored values; checked per row.
"""
import pytest
import torch

from kldiv.torch import linear_kl_div

PAIRS = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
         (torch.float64, torch.float32)]


def _ref(kind, h, W, b, t, topk):
    z = h @ W.T + (0 if b is None else b)
    lq = torch.log_softmax(z, -1)
    if topk is None:
        lp = torch.log_softmax(t, -1)
    else:  # K indexed buckets and the rest, both sides
        idx, lpk = topk
        rest_p = torch.log1p(-lpk.exp().sum(-1, keepdim=True).clamp(max=1))
        lp = torch.cat([lpk, rest_p], -1)
        lqk = lq.gather(-1, idx)
        rest_q = torch.log1p(-lqk.exp().sum(-1, keepdim=True))
        lq = torch.cat([lqk, rest_q], -1)
    kl = lambda a, c: (a.exp() * (a - c)).sum(-1)  # noqa: E731
    if kind == "forward":
        return kl(lp, lq)
    if kind == "reverse":
        return kl(lq, lp)
    lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=lp.dtype))
    return 0.5 * kl(lp, lm) + 0.5 * kl(lq, lm)


@pytest.mark.parametrize("hd,wd", PAIRS)
@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
@pytest.mark.parametrize("bias,topk", [(False, False), (True, False), (False, True)])
def test_hidden_gradient_with_mixed_dtype_weight(hd, wd, kind, bias, topk):
    g = torch.Generator().manual_seed(3)
    n, H, V = 5, 8, 12
    h = torch.randn(n, H, generator=g, dtype=torch.float64).to(hd).requires_grad_()
    W = torch.randn(V, H, generator=g, dtype=torch.float64).to(wd).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(wd).requires_grad_() if bias else None
    t = torch.randn(n, V, generator=g, dtype=torch.float64)
    if topk:
        lp = torch.log_softmax(t, -1)
        vals, idx = lp.topk(4, -1)
        target, tk = (idx, vals.to(hd)), (idx, vals.to(hd).double())
    else:
        target, tk = t.to(hd), None
    loss = linear_kl_div(h, W, target, bias=b, divergence=kind, reduction="sum")
    loss.backward()
    h64 = h.detach().double().requires_grad_()
    W64 = W.detach().double()
    b64 = None if b is None else b.detach().double()
    ref_rows = _ref(kind, h64, W64, b64, t.to(hd).double() if not topk else None, tk)
    ref_rows.sum().backward()
    tol = 1e-5 if hd == torch.float32 else 1e-12
    assert abs(loss.item() - ref_rows.sum().item()) <= tol * abs(ref_rows.sum().item()) + 1e-12
    assert torch.any(h.grad != 0)
    for r in range(n):  # per row
        gr, ref = h.grad[r].double(), h64.grad[r]
        assert (gr - ref).norm() <= tol * ref.norm() + 1e-12, (r, gr, ref)


def test_non_tensor_bias_and_bad_beta_named():
    h, W, t = torch.randn(2, 3), torch.randn(4, 3), torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"^bias: expected a torch.Tensor"):
        linear_kl_div(h, W, t, bias=False)
    with pytest.raises(TypeError, match=r"^beta:"):
        linear_kl_div(h, W, t, divergence="js", beta="half")
    with pytest.raises(ValueError, match=r"^beta:"):
        linear_kl_div(h, W, t, divergence="js", beta=1.0)
