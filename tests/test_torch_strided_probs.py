"""Probabilities in column-major / vocab-first layouts at a temperature, on the torch default
path (audit 4, F1: the lane passed a column-major log(p) to the C kernel, which reads rows with
unit stride: values 0.3-6.7 relative off, gradients far off; temperature 1 was right).

Reference: torch.autograd on the float64 naive formula of a contiguous copy (softmax of
log(p) / T and of the other side's logits / T), per row."""
import pytest
import torch

import kldiv

T = 0.5
KINDS = {
    "kl": kldiv.kl_div,
    "reverse": kldiv.reverse_kl,
    "js": kldiv.js_div,
    "jeffreys": kldiv.jeffreys_div,
}


def _naive(kind, lp, lq):
    """Row values from the two sides' float64 log-probabilities."""
    p, q = lp.exp(), lq.exp()
    kl_pq = (p * (lp - lq)).sum(-1)
    kl_qp = (q * (lq - lp)).sum(-1)
    if kind == "kl":
        return kl_pq
    if kind == "reverse":
        return kl_qp
    if kind == "jeffreys":
        return kl_pq + kl_qp
    lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=lp.dtype))
    return 0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1)


def _layouts(V):
    g = torch.Generator().manual_seed(3)
    yield "col-major", torch.softmax(torch.randn(V, 5, generator=g, dtype=torch.float64), 0).t()
    # a (B, T, V) view of a vocab-first (V, B, T) buffer
    x = torch.softmax(torch.randn(V, 2, 3, generator=g, dtype=torch.float64), 0)
    yield "vocab-first", x.permute(1, 2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("side", ["p", "q"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_strided_probs_at_temperature(kind, side, dtype):
    V = 37
    for name, probs in _layouts(V):
        probs = probs.to(dtype)
        g = torch.Generator().manual_seed(7)
        logits = torch.randn(probs.shape, generator=g, dtype=dtype) * 2
        a = probs.detach().requires_grad_(True)
        b = logits.detach().requires_grad_(True)
        if side == "p":
            args, spaces = (a, b), dict(p_space="probs", q_space="logits")
        else:
            args, spaces = (b, a), dict(p_space="logits", q_space="probs")
        val = KINDS[kind](*args, temperature=T, **spaces)
        w = torch.linspace(0.5, 1.5, val.numel(), dtype=val.dtype).reshape(val.shape)
        (val * w).sum().backward()

        a64 = probs.detach().to(torch.float64).contiguous().requires_grad_(True)
        b64 = logits.detach().to(torch.float64).contiguous().requires_grad_(True)
        la = torch.log_softmax(torch.log(a64) / T, -1)
        lb = torch.log_softmax(b64 / T, -1)
        ref = _naive(kind, la, lb) if side == "p" else _naive(kind, lb, la)
        (ref * w.to(torch.float64)).sum().backward()

        tol = 2e-5 if dtype == torch.float32 else 1e-11
        err = ((val.double() - ref.detach()).abs() / ref.detach().abs()).max()
        assert err < tol, (name, float(err))
        for got, want in ((a.grad, a64.grad), (b.grad, b64.grad)):
            d = (got.double() - want).abs().flatten(0, -2).amax(-1)
            s = want.abs().flatten(0, -2).amax(-1)
            assert (d / s).max() < tol * 5, (name, float((d / s).max()))
