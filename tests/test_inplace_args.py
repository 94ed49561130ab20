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
