"""linear_kl_div checks ``hidden`` on the rows that count only (audit 3 F12): a nan / inf hidden
state in a row the mask or labels leave out (padding) is not read, as kldiv.kl_div(mask=...) does;
one in a counted row is still refused, naming ``hidden``. Reference: the float64 textbook formula
on the kept rows (tests/torch_reference.py naive_row) with torch.autograd."""
import pytest
import torch

from kldiv.torch import linear_kl_div
from torch_reference import naive_row


def _data():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, generator=g)
    W = torch.randn(6, 3, generator=g)
    t = torch.randn(5, 6, generator=g)
    return h, W, t


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("how", ["mask", "labels"])
def test_padding_rows_are_not_read(bad, how):
    h, W, t = _data()
    h[1] = bad
    h[3, 0] = bad
    kept = [0, 2, 4]
    kw = (dict(mask=torch.tensor([True, False, True, False, True])) if how == "mask" else
          dict(labels=torch.tensor([7, -100, 2, -100, 0])))
    hh = h.clone().requires_grad_()
    out = linear_kl_div(hh, W, t, **kw)
    out.backward()
    h64 = h[kept].double().requires_grad_()
    ref = torch.stack([naive_row("forward", a, b, "logits", "logits")
                       for a, b in zip(t[kept].double(), h64 @ W.double().t())]).mean()
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    for i, r in enumerate(kept):  # per row
        torch.testing.assert_close(hh.grad[r].double(), h64.grad[i], rtol=1e-4, atol=1e-6)
    assert bool((hh.grad[[1, 3]] == 0).all())


def test_a_counted_row_is_still_refused():
    h, W, t = _data()
    h[2, 1] = float("nan")
    with pytest.raises(ValueError, match="hidden: contains nan or inf"):
        linear_kl_div(h, W, t, mask=torch.tensor([True, False, True, False, True]))
    with pytest.raises(ValueError, match="hidden: contains nan or inf"):
        linear_kl_div(h, W, t)
    W[0, 0] = float("inf")
    with pytest.raises(ValueError, match="weight: contains nan or inf"):
        linear_kl_div(_data()[0], W, t, mask=torch.ones(5, dtype=torch.bool))


def test_everything_masked_with_padding():
    h, W, t = _data()
    h[:] = float("nan")
    out = linear_kl_div(h, W, t, mask=torch.zeros(5, dtype=torch.bool))
    assert float(out) == 0.0
