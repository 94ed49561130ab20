"""kl_bounds' default tail mass reads a top-k teacher as linear_kl_div does: a residue within the
storage dtype's rounding (a teacher renormalised over its top-k in float32) is no tail, so both
bounds are the renormalised teacher's KL; a real tail keeps the bounds around the full KL.
References: the float64 formula on the exactly renormalised stored values."""
import torch

from kldiv.cache.bounds import kl_bounds


def _rows(n=60, V=50, K=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    s = torch.randn(n, V, generator=g, dtype=torch.float64)
    return t, s, torch.topk(t, K)


def test_float32_renormalised_teacher_has_no_tail():
    t, s, (a, ids) = _rows()
    lp = torch.log_softmax(a.float(), -1)  # residues of either sign, ~1e-7
    x = lp.double() - torch.logsumexp(lp.double(), -1, keepdim=True)
    lq = torch.log_softmax(s, -1).gather(-1, ids)
    full = (x.exp() * (x - lq)).sum(-1)
    lo, hi = kl_bounds(s, ids, lp)
    resid = 1 - lp.double().exp().sum(-1)
    assert (resid > 0).any() and (resid < 0).any()
    tol = 1e-6 * full.abs() + 1e-12
    assert ((lo - full).abs() <= tol).all() and ((hi - full).abs() <= tol).all()


def test_real_tail_brackets_full_kl():
    t, s, (a, ids) = _rows(seed=1)
    lpt = torch.log_softmax(t, -1)
    full = (lpt.exp() * (lpt - torch.log_softmax(s, -1))).sum(-1)
    for dt in (torch.float64, torch.float32):
        lo, hi = kl_bounds(s, ids, lpt.gather(-1, ids).to(dt))
        slack = 1e-5 if dt == torch.float32 else 1e-12
        assert (lo <= full + slack).all() and (full <= hi + slack).all() and (lo < hi).all()
