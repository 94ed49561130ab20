"""``kldiv.torch.kl_div_inplace``: layouts and arguments (audit 3, findings F1, F10, F5).

F1: a ``q_logits`` whose memory overlaps itself (an expanded row, stride 0) cannot receive its
own gradient: the kernel wrote row 0's gradient over the shared row before rows 1.. read it
(forward / reverse: a silently wrong value, 0.41060 for 0.58516), or torch refused the copy-back
(JS / Jeffreys). Now a ValueError naming ``q_logits``. Layouts that do not overlap (every other
row, a size-1 dimension of stride 0) still work, against the float64 core on the same values.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from kldiv.torch import kl_div_inplace  # noqa: E402
from torch_reference import core_only  # noqa: E402

KINDS = ["forward", "reverse", "js", "jeffreys"]
CORE = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
        "jeffreys": kldiv.jeffreys_div}


def _core(kind, p, q, **kw):
    """The float64 core on the same values (independent of the fused path)."""
    with core_only():
        return float(CORE[kind](p.detach().double(), q.detach().double(), p_space="logits",
                                q_space="logits", **kw))


# ------------------------------------------------------------------------------------------------
# F1: overlapping q_logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad", [False, True])
def test_expanded_q_refused(kind, grad):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 6, generator=g)
    q = torch.randn(1, 6, generator=g)
    if grad:
        q = (q.requires_grad_() * 1.0)
    q = q.expand(4, 6)
    before = q.detach().clone()
    with pytest.raises(ValueError, match="q_logits.*overlap"):
        kl_div_inplace(p, q, kind=kind)
    assert torch.equal(q.detach(), before)  # refused before anything was written


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 1).expand(4, 6),                  # the category axis of stride 0
    lambda: torch.randn(6).expand(2, 3, 6),                  # one row for a (2, 3) batch
    lambda: torch.randn(2, 1, 6).expand(2, 3, 6),            # one row per batch entry
    lambda: torch.as_strided(torch.randn(12), (4, 6), (2, 1)),  # rows overlapping by 4
])
def test_overlapping_layouts_refused(make):
    q = make()
    p = torch.randn(q.shape)
    with pytest.raises(ValueError, match="q_logits.*overlap"):
        kl_div_inplace(p, q)


@pytest.mark.parametrize("kind", KINDS)
def test_non_overlapping_layouts_work(kind):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 6, generator=g)
    p = torch.randn(4, 6, generator=g)
    for q in (base[::2],                                            # every other row
              torch.randn(1, 6, generator=g).expand(1, 6),          # stride 0 on a size-1 dim
              torch.randn(6, 1, generator=g).expand(6, 1)[:4]):     # V = 1
        pp = p[: q.shape[0], : q.shape[-1]]
        ref = _core(kind, pp, q, reduction="mean")
        v = kl_div_inplace(pp, q, kind=kind)
        assert float(v) == pytest.approx(ref, rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------------------------
# F10: a weight that requires grad


def _naive_rows(kind, p, q, T=1.0, beta=0.5):
    """Per-row values by the textbook float64 formula (tests/torch_reference.py)."""
    from torch_reference import naive_row
    P, Q = p.detach().double().reshape(-1, p.shape[-1]), q.double().reshape(-1, p.shape[-1])
    return torch.stack([naive_row(kind, P[i], Q[i], "logits", "logits", T, beta)
                        for i in range(P.shape[0])])


def _weight_ref(kind, p, q, w, mask, reduction, upstream=1.0):
    """d loss / d w by torch.autograd on the float64 textbook rows: the weighted sum (or mean)
    over the rows that count (mask true; a row of weight 0 adds 0 * row, so d/dw = row there,
    as kldiv.kl_div: audit 3 F17)."""
    W = w.detach().double().clone().requires_grad_()
    rows = _naive_rows(kind, p, q.detach())
    Wb = torch.broadcast_to(W, p.shape[:-1]).reshape(-1)
    keep = Wb.detach() >= 0
    if mask is not None:
        keep = keep & torch.broadcast_to(mask, p.shape[:-1]).reshape(-1)
    c = torch.where(keep, Wb, torch.zeros_like(Wb))
    loss = (c * rows).sum()
    if reduction == "mean":
        loss = loss / c.sum()
    (loss * upstream).backward()
    return float(loss.detach()), W.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_weight_gradient(kind, reduction):
    g = torch.Generator().manual_seed(2)
    p = torch.randn(2, 3, 5, generator=g) * 2
    h = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    w = torch.tensor([[1.0, 2.0, 0.5], [0.0, 3.0, 0.25]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ref_v, ref_g = _weight_ref(kind, p, h, w, mask, reduction, upstream=3.0)
    v = kl_div_inplace(p, h * 1.0, kind=kind, weight=w, mask=mask, reduction=reduction)
    assert float(v.detach()) == pytest.approx(ref_v, rel=1e-5)
    (v * 3.0).backward()
    assert w.grad is not None
    torch.testing.assert_close(w.grad.double(), ref_g, rtol=1e-5, atol=1e-7)
    assert h.grad is not None  # the logits' gradient still arrives


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_weight_gradient_alone_and_broadcast(reduction):
    """Only the weight requires grad (the logits do not), and a weight broadcast over the rows:
    its gradient sums over the rows it weighs."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(2, 3, 7, generator=g)
    q = torch.randn(2, 3, 7, generator=g)
    w = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)  # broadcast to (2, 3)
    ref_v, ref_g = _weight_ref("forward", p, q, w, None, reduction)
    v = kl_div_inplace(p, q.clone(), weight=w, reduction=reduction)
    v.backward()
    assert float(v.detach()) == pytest.approx(ref_v, rel=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_g, rtol=1e-5, atol=1e-7)


def test_weight_all_zero_mean():
    """No row counts: the mean is 0, and so is its derivative (kldiv.kl_div's convention)."""
    p, q = torch.randn(3, 4), torch.randn(3, 4)
    w = torch.zeros(3, requires_grad=True)
    v = kl_div_inplace(p, q, weight=w, reduction="mean")
    v.backward()
    assert float(v.detach()) == 0.0 and torch.equal(w.grad, torch.zeros(3))


# ------------------------------------------------------------------------------------------------
# F5: q_logits a view of the student's logits


def _grad_ref(kind, p, hq, reduction):
    """d loss / d (student logits) by torch.autograd on the float64 textbook rows."""
    H = hq.detach().double().clone().requires_grad_()
    rows = _naive_rows(kind, p, H)
    loss = rows.sum() if reduction == "sum" else rows.mean()
    loss.backward()
    return float(loss.detach()), H.grad


VIEWS = {
    "view": lambda s, V: s.view(-1, V),
    "reshape": lambda s, V: s.reshape(-1, V),
    "flatten": lambda s, V: s.flatten(0, 1),
    "index": lambda s, V: s[0],
    "slice": lambda s, V: s[1:],
    "rows": lambda s, V: s.view(-1, V)[::2],
}


@pytest.mark.parametrize("kind", ["forward", "js"])
@pytest.mark.parametrize("how", list(VIEWS))
def test_view_of_student_logits(kind, how):
    g = torch.Generator().manual_seed(4)
    V = 6
    h = torch.randn(2, 3, V, generator=g, requires_grad=True)
    t = torch.randn(2, 3, V, generator=g)
    s = h * 1.0  # the student's logits (a non-leaf)
    q = VIEWS[how](s, V)
    p = VIEWS[how](t, V)
    ref_v, ref_g = _grad_ref(kind, p, VIEWS[how](h, V), "mean")
    v = kl_div_inplace(p, q, kind=kind)
    assert float(v.detach()) == pytest.approx(ref_v, rel=1e-5)
    v.backward()
    # the gradient reaches h through the view; rows outside the view get 0
    expect = torch.zeros(2, 3, V, dtype=torch.float64)
    VIEWS[how](expect, V).copy_(ref_g)
    err = (h.grad.double() - expect).abs().amax(-1) / expect.abs().amax(-1).clamp_min(1e-30)
    assert float(err.max()) <= 1e-5


def test_view_not_as_rows_refused():
    """A view whose rows cannot be laid out as (rows, V) without a copy: a clear ValueError
    (as before), q_logits untouched."""
    h = torch.randn(2, 3, 5, requires_grad=True)
    s = h * 1.0
    with pytest.raises(ValueError, match="q_logits"):
        kl_div_inplace(torch.randn(3, 2, 5), s.transpose(0, 1))
    assert torch.equal(s.detach(), h.detach())


def test_view_of_leaf_refused():
    """A view of a leaf that requires grad (a parameter) is not overwritten."""
    h = torch.randn(3, 5, requires_grad=True)
    before = h.detach().clone()
    with pytest.raises(ValueError, match="q_logits"):
        kl_div_inplace(torch.randn(15), h.view(-1))
    assert torch.equal(h.detach(), before)


def test_saved_output_still_detected():
    """q_logits saved by its producer (tanh keeps its output): backward still reports the
    overwrite (torch's in-place check), view or not."""
    for view in (False, True):
        h = torch.randn(2, 3, 5, requires_grad=True)
        s = torch.tanh(h)
        v = kl_div_inplace(torch.randn(6, 5) if view else torch.randn(2, 3, 5),
                           s.view(-1, 5) if view else s)
        with pytest.raises(RuntimeError, match="inplace"):
            v.backward()
