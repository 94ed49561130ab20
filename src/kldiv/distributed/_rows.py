"""The sharded row statistics: per-row divergences of vocabulary-sharded log-space rows.

Every rank holds the same rows but only a slice of the categories; the functions here compute,
from a few all-reduced numbers per row, what the core computes on the gathered rows, and the
gradients of both sides locally (the backward pass issues no collective).
"""
from __future__ import annotations

import math

from .._core.divergence import _log_mix, _w_phi
from ._comm import _all_reduce

_KINDS = ("forward", "reverse", "js", "jeffreys")


def _xp():
    from array_api_compat import torch as xp_torch

    return xp_torch


def _sel(mask, x, other):
    """``where(mask, x, other)``; ``mask`` None means everywhere (dense shards skip the pass)."""
    import torch

    return x if mask is None else torch.where(mask, x, other)


def _masked_max(x, sel):
    import torch

    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=x.device)
    return _sel(sel, x, -math.inf).amax(dim=-1)


def _safe_exp_sum(x, sel, m, extra=None):
    """sum over ``sel`` of exp(x - m) (times ``extra``), 0 for empty selections."""
    import torch

    ms = torch.where(torch.isfinite(m), m, 0.0)[:, None]
    e = torch.exp(torch.where(sel, x - ms, -math.inf))
    if extra is not None:
        e = e * torch.where(sel, extra, 0.0)
    return e.sum(dim=-1)


def _exp_shift(x, sel, m):
    """exp(x - m) on ``sel`` (m: row maxima, finite where sel has entries), 0 elsewhere."""
    import torch

    ms = torch.where(torch.isfinite(m), m, 0.0)[:, None]
    return torch.exp(_sel(sel, x - ms, -math.inf))


_GAP = 20.0  # rescaling exp(x - M) to exp(x - M_T) keeps full precision while M - M_T <= this


def _exp_on(x, t, e, m, mt):
    """exp(x - mt) on ``t`` from ``e = exp(x - m)`` (mt <= m: the maximum over the subset).

    Rows where the subset's maximum lies far below the row maximum (the subset's entries may
    underflow in ``e``) are recomputed; that needs a host check, skipped when no row has one.
    """
    import torch

    fin = torch.isfinite(mt)
    gap = torch.where(fin, m - mt, 0.0)
    if bool((gap > _GAP).any()):
        return _exp_shift(x, t, mt)
    scale = torch.where(fin, torch.exp(gap), 0.0)[:, None]
    return _sel(t, e * scale, 0.0)


_CHUNK_ELEMENTS = 1 << 20  # rows are processed in chunks of about this many elements


def _chunks(n, width):
    """Row ranges of about ``_CHUNK_ELEMENTS`` elements (reused buffers, no huge temporaries)."""
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)] or [(0, 0)]


def _is_dense(a, b):
    """True when neither side holds a -inf (the usual case: every support mask is skipped)."""
    import torch

    return not bool(torch.isneginf(a).any() | torch.isneginf(b).any())


def _supports(a, b, dense):
    """Supports of both sides and their intersection; all None on dense shards."""
    if dense:
        return None, None, None
    sa = a > -math.inf
    sb = b > -math.inf
    return sa, sb, sa & sb


def _phase_max(a, b, check, dense):
    """Local row maxima (both sides, over the supports and over T) and 0/1 flags: (n, 8)."""
    import torch

    f = a.dtype
    sa, sb, t = _supports(a, b, dense)
    zero = torch.zeros(a.shape[0], dtype=f, device=a.device)
    a_only = zero if t is None else (sa & ~sb).any(dim=-1).to(f)
    b_only = zero if t is None else (sb & ~sa).any(dim=-1).to(f)
    bad_a = bad_b = zero
    if check:
        bad_a = (torch.isnan(a) | (a == math.inf)).any(dim=-1).to(f)
        bad_b = (torch.isnan(b) | (b == math.inf)).any(dim=-1).to(f)
    ma = _masked_max(a, sa)
    mb = _masked_max(b, sb)
    maT = ma if t is None else _masked_max(a, t)
    mbT = mb if t is None else _masked_max(b, t)
    return torch.stack([ma, mb, maT, mbT, a_only, b_only, bad_a, bad_b], dim=1)


def _phase_sums(a, b, Ma, Mb, MaT, MbT, dense):
    """Local exp-sums, p-weighted logit-difference sum and outside masses: (n, 7)."""
    import torch

    sa, sb, t = _supports(a, b, dense)
    delta = _sel(t, b - a, 0.0)
    ea = _exp_shift(a, sa, Ma)  # exp(a - Ma) on a's support, 0 elsewhere
    eb = _exp_shift(b, sb, Mb)
    eaT = _exp_on(a, t, ea, Ma, MaT)  # exp(a - MaT) on T, 0 elsewhere
    ebT = _exp_on(b, t, eb, Mb, MbT)
    return torch.stack([
        ea.sum(-1), eb.sum(-1), eaT.sum(-1), ebT.sum(-1), (eaT * delta).sum(-1),
        _outside_sum(t, ea), _outside_sum(t, eb),
    ], dim=1)


def _phase_phi(a, b, MaT0, log_saT, mu, dense):
    """Local sum over T of w * phi(d - mu), w = a's distribution restricted to T: (n,)."""
    _, _, t = _supports(a, b, dense)
    wn = _sel(t, _exp_shift(a, t, MaT0 + log_saT), 0.0)  # a | T, normalised
    dc = _sel(t, b - a - mu[:, None], 0.0)
    # log(wn e^dc) with a cancelled exactly (a finite -1e30 logit would make a + (b - a) noise)
    lwx = _sel(t, b - (MaT0 + log_saT + mu)[:, None], 0.0)
    return _sel(t, _w_phi(_xp(), wn, dc, log_w_exp=lwx), 0.0).sum(dim=-1)


def _pair_stats(a, b, group, check, names):
    """Global row statistics of the pair (a, b), both (N, V_local) in log space.

    Returns a dict of (N,) tensors: ``lse_a``, ``lse_b`` (global log-normalisers), ``mu`` (the
    a-weighted mean of ``b - a`` on the common support T), ``a_out``, ``b_out`` (masses outside
    T), ``a_esc``, ``b_esc`` (bool: a side has mass where the other has none), ``L`` and
    ``kl`` = KL(a || b), ``mean_d`` (E_{a|T}[log b/a]), ``log_aT``, ``log_bT``. Three
    collectives: MAX of (N, 8), SUM of (N, 7), SUM of (N, 1); the passes over the data run in
    row chunks between them.
    """
    import torch

    n, width = a.shape
    parts = _chunks(n, width)
    dense = _is_dense(a, b)
    mx = torch.cat([_phase_max(a[i:j], b[i:j], check, dense) for i, j in parts])
    mx = _all_reduce(mx, "max", group)
    Ma, Mb, MaT, MbT = mx[:, 0], mx[:, 1], mx[:, 2], mx[:, 3]
    if check:
        for k, name in ((6, names[0]), (7, names[1])):
            if bool((mx[:, k] > 0).any()):
                raise ValueError(f"{name}: contains nan or +inf in some shard of the group")
        for col, name in ((Ma, names[0]), (Mb, names[1])):
            empty = col == -math.inf
            if bool(empty.any()):
                row = int(torch.nonzero(empty)[0, 0])
                raise ValueError(
                    f"{name}: row {row} is -inf on every shard: that is no distribution"
                )
    sm = torch.cat([_phase_sums(a[i:j], b[i:j], Ma[i:j], Mb[i:j], MaT[i:j], MbT[i:j], dense)
                    for i, j in parts])
    sm = _all_reduce(sm, "sum", group)
    s_a, s_b, s_aT, s_bT, S_ad, s_aout, s_bout = sm.unbind(dim=1)
    lse_a = Ma + torch.log(s_a)
    lse_b = Mb + torch.log(s_b)
    empty_t = s_aT <= 0
    s_aT1 = torch.where(empty_t, 1.0, s_aT)
    s_bT1 = torch.where(s_bT <= 0, 1.0, s_bT)
    MaT0 = torch.where(empty_t, 0.0, MaT)
    MbT0 = torch.where(s_bT <= 0, 0.0, MbT)
    mu = S_ad / s_aT1
    a_out = s_aout / s_a
    b_out = s_bout / s_b
    # the core's _log_of_mass: log1p of the outside mass when small, else a log-sum-exp over T
    log_aT = torch.where(a_out < 0.5, torch.log1p(-torch.clamp(a_out, max=0.5)),
                         MaT0 + torch.log(s_aT1) - lse_a)
    log_bT = torch.where(b_out < 0.5, torch.log1p(-torch.clamp(b_out, max=0.5)),
                         MbT0 + torch.log(s_bT1) - lse_b)
    log_saT = torch.log(s_aT1)
    phi = torch.cat([_phase_phi(a[i:j], b[i:j], MaT0[i:j], log_saT[i:j], mu[i:j], dense)
                     for i, j in parts])
    phi = _all_reduce(phi[:, None], "sum", group)[:, 0]
    L = torch.log1p(phi)
    a_esc = mx[:, 4] > 0
    b_esc = mx[:, 5] > 0
    kl = torch.where(a_esc, math.inf, L - torch.where(a_esc, 0.0, log_bT))
    mean_d = log_bT - log_aT - L
    return dict(lse_a=lse_a, lse_b=lse_b, mu=mu, a_out=a_out, b_out=b_out, a_esc=a_esc,
                b_esc=b_esc, L=L, kl=kl, mean_d=mean_d, log_aT=log_aT, log_bT=log_bT,
                dense=dense)


def _slice(st, i, j):
    return {k: v[i:j] if k != "dense" else v for k, v in st.items()}


def _outside_sum(t, e):
    import torch

    if t is None:
        return torch.zeros(e.shape[0], dtype=e.dtype, device=e.device)
    return torch.where(t, 0.0, e).sum(-1)


def _elementwise(a, b, st):
    """Supports (None: everywhere) and centred difference of the pair (a, b), locally."""
    sa, sb, t = _supports(a, b, st["dense"])
    dc = _sel(t, b - a - st["mu"][:, None], 0.0)
    return dict(t=t, sa=sa, sb=sb, dc=dc)


def _probs(x, sel, lse):
    import torch

    return torch.exp(_sel(sel, x - lse[:, None], -math.inf))


def _js_local(x, y, st, el, beta):
    """Elementwise JS pieces on T: log(q/p), log(m/p), log(m/q) and the probabilities of both."""
    xp = _xp()
    t = el["t"]
    d = _sel(t, el["dc"] + st["mean_d"][:, None], 0.0)  # log(q/p), accurate
    lm_p = _log_mix(xp, 1.0 - beta, d)  # log(m / p) on T
    lm_q = _log_mix(xp, beta, -d)  # log(m / q) on T
    pw = _probs(x, el["sa"], st["lse_a"])
    qw = _probs(y, el["sb"], st["lse_b"])
    return d, lm_p, lm_q, pw, qw


def _phase_family(kind, x, y, st, beta):
    """Local sums of the JS (n, 4) or Jeffreys (n, 2) terms, once the pair's stats are known."""
    import torch

    el = _elementwise(x, y, st)
    t = el["t"]
    d, lm_p, lm_q, pw, qw = _js_local(x, y, st, el, beta)
    if kind == "jeffreys":
        small = d.abs() < 0.5
        ds = torch.where(small, d, 0.0)
        dl = torch.where(small, 0.0, d)
        # p e^d = q on T (d = log q/p): no exponential of log p + d
        term = torch.where(small, pw * ds * torch.expm1(ds), dl * (qw - pw))
        return torch.stack([_sel(t, term, 0.0).sum(-1),
                            _sel(t, qw * el["dc"], 0.0).sum(-1)], dim=1)
    m = beta * pw + (1 - beta) * qw  # p e^{log m/p} = q e^{log m/q} = m, exactly
    tp = _sel(t, _w_phi(_xp(), pw, lm_p, w_exp=m), 0.0)
    tq = _sel(t, _w_phi(_xp(), qw, lm_q, w_exp=m), 0.0)
    return torch.stack([tp.sum(-1), tq.sum(-1), _sel(t, pw * lm_p, 0.0).sum(-1),
                        _sel(t, qw * lm_q, 0.0).sum(-1)], dim=1)


def _rows_and_stats(kind, x, y, beta, group, check, names=("p_shard", "q_shard")):
    """Per-row divergence of ``kind`` between x (p) and y (q), and the row statistics.

    Only (N,)-shaped statistics are returned (the backward recomputes the elementwise ones).
    """
    import torch

    if kind == "reverse":
        st = _pair_stats(y, x, group, check, names[::-1])
        return st["kl"], st
    st = _pair_stats(x, y, group, check, names)
    if kind == "forward":
        return st["kl"], st
    sums = torch.cat([_phase_family(kind, x[i:j], y[i:j], _slice(st, i, j), beta)
                      for i, j in _chunks(*x.shape)])
    sums = _all_reduce(sums, "sum", group)
    if kind == "jeffreys":
        st["Eq_dc"] = sums[:, 1]
        rows = torch.where(st["a_esc"] | st["b_esc"], math.inf, sums[:, 0])
        return rows, st
    st["S_plm"] = sums[:, 2]  # sum_T p log(m/p)
    st["S_qlm"] = sums[:, 3]  # sum_T q log(m/q)
    rows = (beta * sums[:, 0] + (1 - beta) * sums[:, 1]
            - beta * math.log(beta) * st["a_out"] - (1 - beta) * math.log1p(-beta) * st["b_out"])
    return rows, st


def _local_grads(kind, x, y, rows, st, beta, scale=None, need=(True, True)):
    """d rows / d x and d rows / d y (times ``scale`` per row), by row chunks, no collective.

    forward: d/dy = q - p, d/dx = -p * dc (dc: log(q/p) centred by its p-mean);
    reverse: the same with the roles of p and q swapped;
    Jeffreys: d/dx = p - q - p * dc, d/dy = q - p + q * (dc - E_q[dc]);
    JS: d/dx = beta p (log(p/m) - KL(p||m)), d/dy = (1-beta) q (log(q/m) - KL(q||m)).
    Rows whose value is infinite get 0.
    """
    import torch

    gx = torch.empty_like(x)
    gy = torch.empty_like(y)
    for i, j in _chunks(*x.shape):
        s = None if scale is None else scale[i:j]
        gx[i:j], gy[i:j] = _local_grads_chunk(kind, x[i:j], y[i:j], rows[i:j],
                                              _slice(st, i, j), beta, s, need)
    return gx, gy


def _local_grads_chunk(kind, x, y, rows, st, beta, scale, need):
    import torch

    if kind in ("forward", "reverse"):
        a, b = (x, y) if kind == "forward" else (y, x)
        need_a = need[0] if kind == "forward" else need[1]
        sa, sb, t = _supports(a, b, st["dense"])
        pa = _probs(a, sa, st["lse_a"])
        pb = _probs(b, sb, st["lse_b"])
        gb = pb - pa
        if need_a:  # (the teacher's side, often detached)
            dc = _sel(t, b - a - st["mu"][:, None], 0.0)
            ga = _sel(t, -pa * dc, 0.0)
        else:
            ga = torch.zeros_like(gb)
        gx, gy = (ga, gb) if kind == "forward" else (gb, ga)
    elif kind == "jeffreys":
        el = _elementwise(x, y, st)
        t, dc = el["t"], el["dc"]
        pw = _probs(x, el["sa"], st["lse_a"])
        qw = _probs(y, el["sb"], st["lse_b"])
        gx = _sel(t, -pw * dc, 0.0) + pw - qw
        gy = qw - pw + _sel(t, qw * (dc - st["Eq_dc"][:, None]), 0.0)
    else:
        el = _elementwise(x, y, st)
        t = el["t"]
        _, lm_p, lm_q, pw, qw = _js_local(x, y, st, el, beta)
        # log(p/m) - KL(p||m) with KL(p||m) = c_p p_out - S_plm, c_p = -log(beta) = log(p/m)
        # off T; off T the difference is c_p (1 - p_out) + S_plm, with 1 - p_out = p(T) taken
        # from its accurate logarithm (no cancellation when p(T) is tiny)
        cp, cq = -math.log(beta), -math.log1p(-beta)
        on_p = -lm_p - (cp * st["a_out"] - st["S_plm"])[:, None]
        on_q = -lm_q - (cq * st["b_out"] - st["S_qlm"])[:, None]
        off_p = (cp * torch.exp(st["log_aT"]) + st["S_plm"])[:, None]
        off_q = (cq * torch.exp(st["log_bT"]) + st["S_qlm"])[:, None]
        gx = beta * pw * _sel(t, on_p, off_p)
        gy = (1 - beta) * qw * _sel(t, on_q, off_q)
    fin = torch.isfinite(rows)
    if scale is not None:
        scale = torch.where(fin, scale, 0.0)[:, None]
        return gx * scale, gy * scale
    if not bool(fin.all()):
        gx = torch.where(fin[:, None], gx, 0.0)
        gy = torch.where(fin[:, None], gy, 0.0)
    return gx, gy


def _function_class():
    import torch

    class _VocabParallelRows(torch.autograd.Function):
        """Per-row divergence of sharded log-space rows; the backward is local (no collective)."""

        @staticmethod
        def forward(ctx, x, y, kind, beta, group, check):
            with torch.no_grad():
                rows, st = _rows_and_stats(kind, x, y, beta, group, check)
            ctx.kind, ctx.beta, ctx.st = kind, beta, st  # (N,) row statistics only
            ctx.save_for_backward(x, y, rows)
            return rows

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            x, y, rows = ctx.saved_tensors
            gx, gy = _local_grads(ctx.kind, x, y, rows, ctx.st, ctx.beta, scale=g,
                                  need=tuple(ctx.needs_input_grad[:2]))
            gx = gx if ctx.needs_input_grad[0] else None
            gy = gy if ctx.needs_input_grad[1] else None
            return gx, gy, None, None, None, None

    return _VocabParallelRows


_FN = None


def _rows_fn():
    global _FN
    if _FN is None:
        _FN = _function_class()
    return _FN
