"""KL on torch.distributed: vocabulary-parallel divergences and data-parallel token means.

Vocabulary (tensor) parallelism, as in Megatron-LM: every rank of a process group holds the same
rows (tokens) but only its slice of the categories, for both distributions (and, for
``vocab_parallel_linear_kl_div``, its slice of the output weight). The functions here return,
on every rank of the group, exactly what ``kldiv.kl_div`` (and its family) returns for the full,
gathered tensors, in value and in gradient, without gathering anything wider than a few numbers
per row.

Communication per row, forward pass (payload elements of the compute dtype, float32 or float64):

====================  ==========================================  =========================
divergence            collectives                                 payload elements per row
====================  ==========================================  =========================
forward, reverse KL   1 MAX + 2 SUM all-reduces                   8 + 7 + 1 = 16
Jeffreys              1 MAX + 3 SUM all-reduces                   8 + 7 + 1 + 2 = 18
JS                    1 MAX + 3 SUM all-reduces                   8 + 7 + 1 + 4 = 20
====================  ==========================================  =========================

The MAX carries the row maxima of both sides over their supports and over the common support
(the global log-normalisers are then ``max + log(SUM of exp(x - max))``) and four 0/1 flags
(support escapes, invalid values); the first SUM carries the exp-sums, the p-weighted sum of the
logit difference and the masses outside the common support; the second SUM carries the sum of
``w * phi(centred difference)`` (it needs the global mean of the first); JS and Jeffreys add
one SUM of their own terms. The backward pass needs no collective at all: every gradient
(``q - p`` for forward KL w.r.t. the student, ``-p * (centred difference)`` w.r.t. the
teacher, and their analogues) is local once the row statistics are known.
``vocab_parallel_linear_kl_div`` adds one SUM all-reduce of ``grad_hidden`` (``rows x hidden``
elements), which the math requires since every rank's weight slice contributes to it.
Validation of ``"log_probs"`` inputs adds a MAX (1 element) and a SUM (2 elements) per row and
side; ``validate=False`` drops it.

The algorithm is the core's accurate one (``kldiv._core.divergence``): the logit difference is
centred by its global p-weighted mean before ``phi(x) = exp(x) - 1 - x`` is summed, so no large
normalisers are subtracted and float32 keeps its relative accuracy for nearly equal rows.

Data parallelism needs no new divergence, only the right denominator: a per-token mean over all
ranks and gradient-accumulation steps is ``sum of per-token KL / global count of tokens``.
``global_token_count`` all-reduces that count, ``data_parallel_mean`` applies it (and undoes
DDP's division of gradients by the world size).

Without an initialised process group (or with a group of one rank) the divergences are handed to
the single-process core (``kldiv.kl_div`` and family, with its fused kernels), so the same code
runs on one device at full speed. torch is imported only when these functions are called.

Host synchronisations: one check per call whether the shards hold any -inf (shards without one
skip every support mask), one per row chunk for the underflow guard of the common-support sums
and, with validation on, the all-reduced error flags; on GPUs each is a device synchronisation.
"""
from __future__ import annotations

import contextlib
import math

from ._core.validation import (REDUCTIONS, check_option, check_positive_finite,
                               normalization_tolerance, validation_enabled)
from ._core.divergence import _log_mix, _w_phi
from ._core.reduction import broadcast_rows, reduce_rows

__all__ = [
    "vocab_parallel_kl_div",
    "vocab_parallel_reverse_kl",
    "vocab_parallel_js_div",
    "vocab_parallel_jeffreys_div",
    "vocab_parallel_linear_kl_div",
    "global_token_count",
    "data_parallel_mean",
    "count_collectives",
]

_KINDS = ("forward", "reverse", "js", "jeffreys")
_LOG_SPACES = ("logits", "log_probs")

# ----------------------------------------------------------------------------------------------
# collectives


_COUNTERS: list[dict] = []


@contextlib.contextmanager
def count_collectives():
    """Count the collectives issued by this module inside the ``with`` block.

    Yields a dict with ``"calls"`` (number of all-reduces) and ``"bytes"`` (their payload in
    bytes, summed; a ring all-reduce moves about ``2 (W - 1) / W`` times that per rank). Local
    runs (one rank) issue no collective and count nothing.

    >>> import torch, kldiv.distributed as kd
    >>> with kd.count_collectives() as c:
    ...     _ = kd.vocab_parallel_kl_div(torch.zeros(2, 3), torch.zeros(2, 3))
    >>> c["calls"], c["bytes"]
    (0, 0)
    """
    counter = {"calls": 0, "bytes": 0}
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _world(group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_reduce(t, op, group):
    """In-place all-reduce of a contiguous tensor over ``group`` (no-op on one rank)."""
    if _world(group) == 1:
        return t
    import torch.distributed as dist

    t = t.contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    for c in _COUNTERS:
        c["calls"] += 1
        c["bytes"] += t.numel() * t.element_size()
    return t


# ----------------------------------------------------------------------------------------------
# the row statistics of one pair (a = the reference of the KL, b = the other side)


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


# ----------------------------------------------------------------------------------------------
# input handling


def _check_tensor(name, x):
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name}: expected at least one dimension (the categories), got a scalar")


def _compute_dtype(*ts):
    import torch

    dt = torch.promote_types(ts[0].dtype, ts[1].dtype)
    if torch.finfo(dt).bits < 32:
        dt = torch.float32
    return dt


def _prepare_shards(p, q, p_space, q_space, mask, weight, names=("p_shard", "q_shard")):
    """Checks, compute dtype, masked rows made safe; returns (N, V_r) views and row arrays."""
    import torch

    check_option("p_space", p_space, _LOG_SPACES)
    check_option("q_space", q_space, _LOG_SPACES)
    _check_tensor(names[0], p)
    _check_tensor(names[1], q)
    if p.shape != q.shape:
        raise ValueError(
            f"{names[0]} and {names[1]}: shapes {tuple(p.shape)} and {tuple(q.shape)} differ; "
            "both shards must hold the same rows and the same slice of the categories (last axis)"
        )
    dt = _compute_dtype(p, q)
    rows_shape = tuple(p.shape[:-1])
    x = p.to(dt)
    y = q.to(dt)
    if mask is not None:
        mask = _check_mask(mask, rows_shape, x.device)
        # masked rows may hold anything: both sides become the same (uniform) row, KL = 0
        x = torch.where(mask[..., None], x, 0.0)
        y = torch.where(mask[..., None], y, 0.0)
    if weight is not None:
        weight = broadcast_rows(torch, torch.as_tensor(weight, dtype=dt, device=x.device),
                                rows_shape, "weight")
    n = 1
    for s in rows_shape:
        n *= s
    return x.reshape(n, p.shape[-1]), y.reshape(n, q.shape[-1]), rows_shape, mask, weight


def _check_mask(mask, rows_shape, device):
    import torch

    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise TypeError(f"mask: expected a boolean tensor, got {got}")
    return broadcast_rows(torch, mask.to(device), rows_shape, "mask")


def _check_weight_values(weight):
    if weight is not None and bool((~weight.isfinite() | (weight < 0)).any()):
        raise ValueError("weight: must be finite and >= 0")


def _check_log_probs(raw, name, group, keep=None):
    """Rows of log-probabilities must have a global logsumexp of 0 (the core's tolerance).

    ``raw``: (N, V_r) before the temperature; ``keep``: (N,) rows to check (masked rows are
    exempt). Costs a MAX and a SUM all-reduce; runs only with validation on.
    """
    import torch

    with torch.no_grad():
        m = _all_reduce(_masked_max(raw, raw > -math.inf)[:, None], "max", group)[:, 0]
        s = torch.cat([_safe_exp_sum(raw, raw > -math.inf, m)[:, None],
                       torch.full((raw.shape[0], 1), float(raw.shape[-1]), dtype=raw.dtype,
                                  device=raw.device)], dim=1)
        s = _all_reduce(s, "sum", group)
        width = int(s[0, 1]) if raw.shape[0] else raw.shape[-1]
        tol = normalization_tolerance(torch.finfo(raw.dtype).eps, width)
        lse = m + torch.log(s[:, 0])
        off = (lse.abs() > tol) | (m > tol)
        if keep is not None:
            off = off & keep
        if bool(off.any()):
            row = int(torch.nonzero(off)[0, 0])
            raise ValueError(
                f"{name}: log-probabilities must be <= 0 with logsumexp 0 within {tol:.1e} over "
                f"the full vocabulary (all shards); row {row} has logsumexp "
                f"{float(lse[row]):.6g} (pass the logits with space 'logits' instead)"
            )


#: with one rank, hand the call to the single-process core (set False to test the sharded path)
_DELEGATE_LOCAL = True


def _local_core(kind, p, q, *, beta, **kw):
    from ._core import divergence as D

    _check_tensor("p_shard", p)
    _check_tensor("q_shard", q)
    if p.shape != q.shape:
        raise ValueError(
            f"p_shard and q_shard: shapes {tuple(p.shape)} and {tuple(q.shape)} differ; "
            "both shards must hold the same rows and the same slice of the categories (last axis)"
        )
    if kw["mask"] is not None:
        _check_mask(kw["mask"], tuple(p.shape[:-1]), p.device)
    if kind == "js":
        return D.js_div(p, q, beta=beta, **kw)
    f = {"forward": D.kl_div, "reverse": D.reverse_kl, "jeffreys": D.jeffreys_div}[kind]
    return f(p, q, **kw)


def _vocab_parallel(kind, p_shard, q_shard, *, p_space, q_space, reduction, mask, weight,
                    temperature, t2_scale, group, beta, validate):
    check_option("reduction", reduction, REDUCTIONS)
    check_option("kind", kind, _KINDS)
    check_option("p_space", p_space, _LOG_SPACES)
    check_option("q_space", q_space, _LOG_SPACES)
    temperature = check_positive_finite("temperature", temperature)
    if kind == "js" and not 0.0 < float(beta) < 1.0:
        raise ValueError(f"beta: must lie strictly between 0 and 1, got {beta!r}")
    if (_DELEGATE_LOCAL and _world(group) == 1
            and not (mask is not None and "log_probs" in (p_space, q_space))):
        # one rank holds the whole vocabulary: the core (and its fused kernels) computes it
        return _local_core(kind, p_shard, q_shard, p_space=p_space, q_space=q_space,
                           reduction=reduction, mask=mask, weight=weight,
                           temperature=temperature, t2_scale=t2_scale, beta=beta,
                           validate=validate)
    x, y, rows_shape, mask, weight = _prepare_shards(p_shard, q_shard, p_space, q_space, mask,
                                                     weight)
    check = validation_enabled(validate)
    if check:
        _check_weight_values(weight)
        keep = None if mask is None else mask.reshape(-1)
        for raw, space, name in ((x, p_space, "p_shard"), (y, q_space, "q_shard")):
            if space == "log_probs":
                _check_log_probs(raw.detach(), name, group, keep)
    if temperature != 1.0:
        x = x / temperature
        y = y / temperature
    rows = _rows_fn().apply(x, y, kind, float(beta), group, check)
    rows = rows.reshape(rows_shape)
    out = reduce_rows(_xp(), rows, reduction, mask, weight)
    if t2_scale:
        out = out * temperature**2
    return out


_SHARD_DOC = """
    Args:
      p_shard: this rank's slice of the reference (teacher) along the last axis, shape
        ``(..., V_r)``; rows (the leading axes) are the same on every rank of ``group``.
      q_shard: the same slice of the model (student), same shape. Slice widths ``V_r`` may
        differ between ranks (uneven splits, even 0); the full vocabulary is their union.
      p_space, q_space: ``"logits"`` or ``"log_probs"`` (log-probabilities of the full
        vocabulary; renormalised like logits). Probabilities are not accepted: a
        vocabulary-parallel layer produces logits.
      reduction: ``"none"`` (one value per row, shape ``p_shard.shape[:-1]``), ``"sum"`` or
        ``"mean"`` (over rows where ``mask`` is true, weighted by ``weight``), as ``kldiv.kl_div``.
      mask, weight: per-row boolean mask and non-negative weights (same on every rank); masked
        rows may hold anything and contribute 0.
      temperature: divides both sides; ``t2_scale`` multiplies the result by ``temperature**2``.
      group: the vocabulary-parallel process group (default: the world). Without an
        initialised process group the call runs locally.
      validate: value checks (nan/+inf in any shard, rows -inf on every shard, log-probability
        normalisation); None follows ``kldiv.set_validation``. The checks are decided from
        all-reduced flags, so every rank raises the same ValueError (no rank is left waiting).

    Returns:
      The same value on every rank of the group, equal to the single-process function on the
      gathered tensors; gradients flow to both shards, with no collective in the backward.
"""


def vocab_parallel_kl_div(p_shard, q_shard, *, p_space="logits", q_space="logits",
                          reduction="mean", mask=None, weight=None, temperature=1.0,
                          t2_scale=False, group=None, kind="forward", beta=0.5, validate=None):
    return _vocab_parallel(kind, p_shard, q_shard, p_space=p_space, q_space=q_space,
                           reduction=reduction, mask=mask, weight=weight,
                           temperature=temperature, t2_scale=t2_scale, group=group, beta=beta,
                           validate=validate)


vocab_parallel_kl_div.__doc__ = r"""Vocab-parallel KL(p || q); equals ``kldiv.kl_div`` unsharded.

    .. math:: \mathrm{KL}(p \,\|\, q) = \sum_{r} \sum_{i \in \mathrm{shard}_r}
              p_i \log \frac{p_i}{q_i},
              \quad p = \mathrm{softmax}(x / T) \text{ over all shards}

    Edges as ``kldiv.kl_div``: categories with p_i = 0 (logit -inf) contribute 0, also when a
    whole shard holds no support of p; p_i > 0 = q_i gives +inf (gradient 0 on that row). The
    gradient w.r.t. the student logits is ``(q - p) / T``, w.r.t. the teacher logits
    ``-p * (log(q/p) - E_p[log(q/p)]) / T``, both computed locally.

    ``kind`` selects the family member with the same arguments: ``"forward"`` (this function's
    default), ``"reverse"`` (KL(q || p)), ``"js"`` (with ``beta``), ``"jeffreys"``; the functions
    ``vocab_parallel_reverse_kl``, ``vocab_parallel_js_div`` and ``vocab_parallel_jeffreys_div``
    are the same call with ``kind`` fixed.
""" + _SHARD_DOC + """
    One process (no process group): the shard is the whole vocabulary.

    >>> import math, torch, kldiv.distributed as kd
    >>> p = torch.tensor([[0.0, math.log(3.0)]])      # softmax: (1/4, 3/4)
    >>> q = torch.tensor([[0.0, 0.0]])                 # (1/2, 1/2)
    >>> by_hand = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    >>> abs(float(kd.vocab_parallel_kl_div(p, q)) - by_hand) < 1e-7
    True

    Launched with ``torchrun --nproc-per-node 2``, rank r passes ``p[..., lo_r:hi_r]`` and
    ``q[..., lo_r:hi_r]`` and gets the same number on both ranks (see docs/distributed.md).
"""


def vocab_parallel_reverse_kl(p_shard, q_shard, *, p_space="logits", q_space="logits",
                              reduction="mean", mask=None, weight=None, temperature=1.0,
                              t2_scale=False, group=None, validate=None):
    """Reverse KL, KL(q || p), of vocabulary-sharded rows, equal to ``kldiv.reverse_kl`` unsharded.

    Same arguments and conventions as ``vocab_parallel_kl_div`` (p the teacher first, q the
    student second); +inf where q has mass on a category where p has none.

    >>> import math, torch, kldiv.distributed as kd
    >>> p = torch.tensor([[0.0, math.log(3.0)]]); q = torch.tensor([[0.0, 0.0]])
    >>> by_hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    >>> abs(float(kd.vocab_parallel_reverse_kl(p, q)) - by_hand) < 1e-7
    True
    """
    return _vocab_parallel("reverse", p_shard, q_shard, p_space=p_space, q_space=q_space,
                           reduction=reduction, mask=mask, weight=weight,
                           temperature=temperature, t2_scale=t2_scale, group=group, beta=0.5,
                           validate=validate)


def vocab_parallel_js_div(p_shard, q_shard, *, beta=0.5, p_space="logits", q_space="logits",
                          reduction="mean", mask=None, weight=None, temperature=1.0,
                          t2_scale=False, group=None, validate=None):
    """Jensen-Shannon divergence of sharded rows: ``kldiv.js_div`` on the gathered rows.

    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta p + (1 - beta) q``; always
    finite. Costs one SUM all-reduce (4 elements per row) more than ``vocab_parallel_kl_div``.

    >>> import math, torch, kldiv.distributed as kd
    >>> inf = math.inf
    >>> p = torch.tensor([[0.0, -inf]]); q = torch.tensor([[-inf, 0.0]])   # disjoint supports
    >>> abs(float(kd.vocab_parallel_js_div(p, q)) - math.log(2)) < 1e-7
    True
    """
    return _vocab_parallel("js", p_shard, q_shard, p_space=p_space, q_space=q_space,
                           reduction=reduction, mask=mask, weight=weight,
                           temperature=temperature, t2_scale=t2_scale, group=group, beta=beta,
                           validate=validate)


def vocab_parallel_jeffreys_div(p_shard, q_shard, *, p_space="logits", q_space="logits",
                                reduction="mean", mask=None, weight=None, temperature=1.0,
                                t2_scale=False, group=None, validate=None):
    """Jeffreys divergence KL(p || q) + KL(q || p) of sharded rows: ``kldiv.jeffreys_div``.

    +inf unless both sides have the same support. One SUM all-reduce (2 elements per row) more
    than ``vocab_parallel_kl_div``.

    >>> import math, torch, kldiv.distributed as kd
    >>> p = torch.tensor([[0.0, math.log(3.0)]]); q = torch.tensor([[0.0, 0.0]])
    >>> by_hand = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    >>> abs(float(kd.vocab_parallel_jeffreys_div(p, q)) - by_hand) < 1e-7
    True
    """
    return _vocab_parallel("jeffreys", p_shard, q_shard, p_space=p_space, q_space=q_space,
                           reduction=reduction, mask=mask, weight=weight,
                           temperature=temperature, t2_scale=t2_scale, group=group, beta=0.5,
                           validate=validate)


# ----------------------------------------------------------------------------------------------
# the output layer fused with the loss


def _linear_function_class():
    import torch

    class _VocabParallelLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight_shard, bias_shard, target, row_mask, row_weight, kind,
                    beta, temperature, reduction, chunk_size, group, check, target_space):
            n, h = hidden.shape
            dt = _compute_dtype(hidden, target)
            need_h = ctx.needs_input_grad[0]
            need_w = ctx.needs_input_grad[1]
            need_b = bias_shard is not None and ctx.needs_input_grad[2]
            need_t = ctx.needs_input_grad[3]
            keep = row_mask
            if row_weight is not None:
                pos = row_weight > 0
                keep = pos if keep is None else keep & pos
            scale = torch.ones(n, dtype=dt, device=hidden.device)
            if row_weight is not None:
                scale = row_weight.to(dt)
            if keep is not None:
                scale = torch.where(keep, scale, 0.0)
            if reduction == "mean":
                den = scale.sum() if keep is not None else torch.tensor(float(max(n, 1)), dtype=dt)
                inv = torch.where(den > 0, 1.0 / torch.where(den > 0, den, 1.0), 0.0)
                scale = scale * inv.to(scale.device)
            dev = hidden.device
            gh = torch.zeros(n, h, dtype=dt, device=dev) if need_h else None
            gw = torch.zeros(weight_shard.shape, dtype=dt, device=dev) if need_w else None
            gb = torch.zeros(weight_shard.shape[0], dtype=dt, device=dev) if need_b else None
            gt = torch.zeros(target.shape, dtype=dt, device=dev) if need_t else None
            w_dt = weight_shard.to(dt)
            rows_all = torch.zeros(n, dtype=dt, device=dev)
            names = ("target_shard", "student logits")
            with torch.no_grad():
                for lo in range(0, n, chunk_size):
                    hi = min(n, lo + chunk_size)
                    hc = hidden[lo:hi]
                    logits = hc @ weight_shard.T
                    if bias_shard is not None:
                        logits = logits + bias_shard
                    y = logits.to(dt)
                    x = target[lo:hi].to(dt)
                    if row_mask is not None:
                        m = row_mask[lo:hi, None]
                        x = torch.where(m, x, 0.0)
                        y = torch.where(m, y, 0.0)
                    if target_space == "log_probs" and check:
                        _check_log_probs(x, "target_shard", group,
                                         None if row_mask is None else row_mask[lo:hi])
                    x = x / temperature
                    y = y / temperature
                    rows, st = _rows_and_stats(kind, x, y, beta, group, check, names)
                    rows_all[lo:hi] = rows
                    if need_h or need_w or need_b or need_t:
                        gx, gy = _local_grads(kind, x, y, rows, st, beta,
                                              scale=scale[lo:hi] / temperature,
                                              need=(need_t, True))
                        if need_h:
                            gh[lo:hi] = gy @ w_dt
                        if need_w:
                            gw += gy.T @ hc.to(dt)
                        if need_b:
                            gb += gy.sum(dim=0)
                        if need_t:
                            gt[lo:hi] = gx
                if need_h:
                    gh = _all_reduce(gh, "sum", group)
                kept = rows_all if keep is None else torch.where(keep, rows_all, 0.0)
                if row_weight is not None:
                    kept = kept * row_weight.to(dt)
                total = kept.sum()
                if reduction == "mean":
                    total = total * inv.to(total.device)
            empty = torch.empty(0)
            ctx.save_for_backward(*(empty if g is None else g for g in (gh, gw, gb, gt)))
            ctx.dtypes = (hidden.dtype, weight_shard.dtype,
                          None if bias_shard is None else bias_shard.dtype, target.dtype)
            return total

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            grads = []
            for i, (t, dt) in enumerate(zip(ctx.saved_tensors, ctx.dtypes)):
                grads.append((t * g).to(dt) if ctx.needs_input_grad[i] else None)
            return (*grads, None, None, None, None, None, None, None, None, None, None)

    return _VocabParallelLinear


_LFN = None


def vocab_parallel_linear_kl_div(hidden, weight_shard, target_shard, *, bias_shard=None,
                                 target_space="logits", reduction="mean", mask=None,
                                 weight=None, temperature=1.0, t2_scale=False, kind="forward",
                                 beta=0.5, chunk_size=1024, group=None, validate=None):
    r"""Divergence between teacher logits and a vocabulary-parallel output layer, fused.

    The student's logits slice is ``hidden @ weight_shard.T (+ bias_shard)``, computed
    ``chunk_size`` rows at a time, so that no rank holds more than ``chunk_size x V_r`` logits
    (plus the gradients of its parameters). The value is ``kldiv.kl_div(target, hidden @ W.T,
    p_space=target_space, q_space="logits", ...)`` on the gathered weight ``W`` and target
    (``kind`` picks reverse KL, JS or Jeffreys instead, with the teacher first as always).

    Gradients are computed during the forward pass (the backward only scales them by the
    incoming gradient): ``grad_weight_shard`` and ``grad_bias_shard`` are local;
    ``grad_hidden`` is summed over the group by one all-reduce of ``rows x hidden`` elements,
    because every rank's slice of the weight contributes to it. A gradient w.r.t. the target
    is given if it requires one.

    Args:
      hidden: ``(N, H)`` or ``(..., H)`` student features, the same on every rank.
      weight_shard: ``(V_r, H)``, this rank's rows of the output weight.
      target_shard: ``(..., V_r)`` teacher logits (or log-probabilities) for the same slice.
      bias_shard: optional ``(V_r,)``.
      reduction: ``"sum"`` or ``"mean"`` (``"none"`` is not available in the fused form).
      chunk_size: rows per chunk (each chunk costs the collectives of one
        ``vocab_parallel_kl_div`` call on that many rows).
      Other arguments as ``vocab_parallel_kl_div``.

    >>> import torch, kldiv, kldiv.distributed as kd
    >>> g = torch.Generator().manual_seed(0)
    >>> h = torch.randn(4, 3, generator=g); w = torch.randn(5, 3, generator=g)
    >>> t = torch.randn(4, 5, generator=g)
    >>> fused = kd.vocab_parallel_linear_kl_div(h, w, t, chunk_size=3)
    >>> plain = kldiv.kl_div(t, h @ w.T, p_space="logits", q_space="logits", reduction="mean")
    >>> bool(torch.isclose(fused, plain, rtol=1e-5))
    True
    """
    import torch

    global _LFN
    check_option("reduction", reduction, ("sum", "mean"))
    check_option("kind", kind, _KINDS)
    check_option("target_space", target_space, _LOG_SPACES)
    temperature = check_positive_finite("temperature", temperature)
    if kind == "js" and not 0.0 < float(beta) < 1.0:
        raise ValueError(f"beta: must lie strictly between 0 and 1, got {beta!r}")
    for name, t in (("hidden", hidden), ("weight_shard", weight_shard),
                    ("target_shard", target_shard)):
        _check_tensor(name, t)
    if weight_shard.ndim != 2 or weight_shard.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight_shard: expected shape (V_r, {hidden.shape[-1]}) for hidden of shape "
            f"{tuple(hidden.shape)}, got {tuple(weight_shard.shape)}"
        )
    if target_shard.shape != (*hidden.shape[:-1], weight_shard.shape[0]):
        raise ValueError(
            f"target_shard: expected shape {(*hidden.shape[:-1], weight_shard.shape[0])} "
            f"(hidden's rows, weight_shard's slice), got {tuple(target_shard.shape)}"
        )
    if bias_shard is not None and tuple(bias_shard.shape) != (weight_shard.shape[0],):
        raise ValueError(f"bias_shard: expected shape ({weight_shard.shape[0]},), got "
                         f"{tuple(bias_shard.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    rows_shape = tuple(hidden.shape[:-1])
    n = 1
    for s in rows_shape:
        n *= s
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = getattr(mask, "dtype", type(mask).__name__)
            raise TypeError(f"mask: expected a boolean tensor, got {got}")
        mask = broadcast_rows(torch, mask, rows_shape, "mask").reshape(n)
    if weight is not None:
        weight = broadcast_rows(torch, weight, rows_shape, "weight").reshape(n)
    check = validation_enabled(validate)
    if check:
        _check_weight_values(weight)
    if _LFN is None:
        _LFN = _linear_function_class()
    out = _LFN.apply(hidden.reshape(n, hidden.shape[-1]), weight_shard, bias_shard,
                     target_shard.reshape(n, weight_shard.shape[0]), mask, weight, kind,
                     float(beta), temperature, reduction, chunk_size, group, check, target_space)
    if t2_scale:
        out = out * temperature**2
    return out


# ----------------------------------------------------------------------------------------------
# data parallelism


def global_token_count(mask, *, weight=None, group=None):
    """The number of counted rows (tokens) over all ranks of ``group`` and all given micro-batches.

    ``mask`` is a boolean tensor (true = counted), an int (a count of rows already made), or a
    list of either, one per gradient-accumulation micro-batch of this optimiser step;
    ``weight`` (optional, the same structure) counts ``sum(mask * weight)`` instead. The local
    sum is all-reduced (one SUM of one float64) over the data-parallel ``group``; every rank
    gets the same count. Call it once per optimiser step, before the micro-batches' backward
    passes (the masks are known up front: they come from the batch, not from the model).

    >>> import torch, kldiv.distributed as kd
    >>> float(kd.global_token_count([torch.tensor([True, False, True]), torch.tensor([True])]))
    3.0
    """
    import torch

    masks = mask if isinstance(mask, (list, tuple)) else [mask]
    weights = weight if isinstance(weight, (list, tuple)) else [weight] * len(masks)
    if len(weights) != len(masks):
        raise ValueError(f"weight: {len(weights)} entries for {len(masks)} masks")
    device = None
    total = 0.0
    for m, w in zip(masks, weights):
        if isinstance(m, torch.Tensor):
            device = m.device
            if m.dtype != torch.bool:
                raise TypeError(f"mask: expected boolean tensors or ints, got dtype {m.dtype}")
            mm = m.to(torch.float64)
            if w is not None:
                mm = mm * torch.as_tensor(w, dtype=torch.float64, device=m.device)
            total = total + mm.sum()
        elif isinstance(m, int) and not isinstance(m, bool) and m >= 0:
            if w is not None:
                raise ValueError("weight: give masks (tensors), not counts, when weighting")
            total = total + m
        else:
            raise TypeError(f"mask: expected a boolean tensor or a count, got {m!r}")
    if device is None and _world(group) > 1:  # counts only: nccl needs a tensor on the GPU
        import torch.distributed as dist

        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
    out = torch.as_tensor(total, dtype=torch.float64, device=device).detach().clone().reshape(1)
    return _all_reduce(out, "sum", group)[0]


def data_parallel_mean(local_sum, global_count, *, group=None, gradients_averaged=True):
    """This rank's share of a per-token mean over the whole data-parallel batch.

    ``local_sum`` is ``kldiv.kl_div(..., reduction="sum")`` (or any sum over rows) of this
    rank's micro-batch, ``global_count`` the value of ``global_token_count`` for the optimiser
    step. The result is ``local_sum / global_count``, times the world size of ``group`` when
    ``gradients_averaged`` (the default: DDP and FSDP divide the summed gradients by the world
    size). Back-propagating it on every rank and micro-batch gives exactly the gradient of the
    global mean ``sum over all tokens / count``, the gradient one process holding the whole
    batch gets; for logging, all-reduce the ``local_sum`` values (SUM) and divide by the count.
    An empty batch (count 0) gives 0, as ``reduction="mean"`` does. The result has the dtype of
    ``local_sum``, at least float32.

    Why not ``reduction="mean"`` per rank: with 3 counted tokens on rank 0 and 1 on rank 1, the
    mean of the two per-rank means weighs the lone token of rank 1 three times as much as each
    token of rank 0. The same happens across accumulation steps of unequal length.

    >>> import torch, kldiv.distributed as kd
    >>> float(kd.data_parallel_mean(torch.tensor(6.0), torch.tensor(4.0)))   # one process
    1.5
    """
    import torch

    if not isinstance(local_sum, torch.Tensor) or not local_sum.dtype.is_floating_point:
        raise TypeError(f"local_sum: expected a floating-point tensor, got {local_sum!r}")
    scale = float(_world(group)) if gradients_averaged else 1.0
    count = torch.as_tensor(global_count, dtype=torch.float64, device=local_sum.device)
    if bool((count < 0).any()) if count.device.type == "cpu" else False:
        raise ValueError(f"global_count: must be >= 0, got {float(count)}")
    # the factor is formed in float64 and applied in at least float32 (a bf16 count of a few
    # thousand tokens would be off by a fraction of a percent)
    dt = torch.promote_types(local_sum.dtype, torch.float32)
    factor = torch.where(count > 0, scale / torch.where(count > 0, count, 1.0), 0.0)
    return local_sum.to(dt) * factor.to(dt)
