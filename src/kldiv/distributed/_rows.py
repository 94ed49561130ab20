"""The sharded row statistics: per-row divergences of vocabulary-sharded log-space rows.

Every rank holds the same rows but only a slice of the categories; the functions here compute,
from a few all-reduced numbers per row, what the core computes on the gathered rows, and the
gradients of both sides locally (the backward pass issues no collective).
"""
from __future__ import annotations

import math

from .._core.divergence import _log1p_cexp as _core_log1p_cexp
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


def _masked_min(x, sel):
    import torch

    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], math.inf, dtype=x.dtype, device=x.device)
    return _sel(sel, x, math.inf).amin(dim=-1)


def _finite0(m):
    """Row statistics with -inf (empty selections) replaced by 0, as a column."""
    import torch

    return torch.where(torch.isfinite(m), m, 0.0)[:, None]


def _safe_exp_sum(x, sel, m, extra=None):
    """sum over ``sel`` of exp(x - m) (times ``extra``), 0 for empty selections."""
    import torch

    e = torch.exp(torch.where(sel, x - _finite0(m), -math.inf))
    if extra is not None:
        e = e * torch.where(sel, extra, 0.0)
    return e.sum(dim=-1)


def _centred(x, sel, m, temperature, u=1.0):
    """``(x - m) / T`` on ``sel``, -inf elsewhere: a side centred on its own row maximum first,
    then divided by the temperature (``x / T - m / T`` would round twice, and overflow).

    On calls in quarters (x and m are quarters of the inputs, ``u = 4``: see ``_pair_stats``)
    the value is multiplied by ``u``: the centred value itself, for exponentials (an entry
    beyond the float range below its maximum gives -inf, whose exponential is 0)."""
    c = x - _finite0(m)
    if temperature != 1.0:
        c = c / temperature
    if u != 1.0:
        c = c * u
    return _sel(sel, c, -math.inf)


def _exp_centred(x, sel, m, temperature, u=1.0):
    import torch

    return torch.exp(_centred(x, sel, m, temperature, u))


def _full(v, u):
    """A log-ratio kept in units of ``1 / u`` (quarters on calls in quarters) as itself, clamped
    to the float range: for the functions that take it whole (exp, log1p, phi), which meet it
    beyond the range only where a weight that multiplies their result is 0."""
    if u == 1.0:
        return v
    fmax = _fmax(v)
    return (v * u).clamp(-fmax, fmax)


def _fmax(v):
    import torch

    return torch.finfo(v.dtype).max


# beyond this difference of the two sides' maxima (raw logits) the log-ratio is referenced at a's
# mode (one more MAX collective: far rows keep their accuracy where a carries mass); below it the
# maxima are the reference. The difference itself is always formed exactly (TwoSum): a plain
# (b - a) - (mb - ma) rounds b - a at the ulp of the shift, and two close rows offset by 8
# (teacher log-probs against student logits) lost 2e-3 of a KL of 1e-9 that way
_TWOSUM_SHIFT = 16.0


def _delta(a, b, ma, mb, t, temperature, twosum=True, u=1.0):
    """``((b - a) - (mb - ma)) / T`` on ``t`` (0 elsewhere): the log-ratio up to a row constant,
    with the accuracy of ``b - a``. ``(ma, mb)`` is the reference: the two maxima over T on
    ordinary calls, on calls with far rows (``twosum``) an entry of T (a at its mode and b
    there, or b at its mode and a there: ``_phase_ref``), so that the log-ratio is exactly 0
    there and small wherever that side carries mass.

    ``b - a`` and ``mb - ma`` are each split into a rounded sum and its exact rounding error
    (Knuth's TwoSum). Under a huge common shift (a side's logits around 1e30, or masked with
    -1e30) the two rounded sums are within a factor 2 of each other and their difference is
    exact (Sterbenz): no shift swallows the logits, and nearly equal rows keep the accuracy of
    their raw difference, as in the core. The temperature divides last.

    On calls in quarters (``u = 4``: a, b and the reference are quarters of the inputs) the
    result is a quarter of the log-ratio, clamped to the float range (a temperature below 1/4
    can take even a quarter beyond it: the core clamps there too).
    """
    ma0 = _finite0(ma)
    mb0 = _finite0(mb)
    s = b - a
    bp = s - b
    e = (b - (s - bp)) - (a + bp)  # s + e == b - a exactly
    c = mb0 - ma0
    cp = c - mb0
    ec = (mb0 - (c - cp)) - (ma0 + cp)  # c + ec == mb0 - ma0 exactly
    d = (s - c) + (e - ec)
    if temperature != 1.0:
        d = d / temperature
    if u != 1.0:
        d = d.clamp(-_fmax(d), _fmax(d))
    return _sel(t, d, 0.0)


_GAP = 20.0  # rescaling exp(x - M) to exp(x - M_T) keeps full precision while M - M_T <= this


def _exp_on(x, t, e, m, mt, temperature, u=1.0, far=None):
    """exp((x - mt) / T) on ``t`` from ``e = exp((x - m) / T)`` (mt <= m: the maximum over the
    subset).

    Rows where the subset's maximum lies far below the row maximum (the subset's entries may
    underflow in ``e``) are recomputed; that needs a host check, skipped when no row has one.
    ``far``: that check's answer when the caller has it (``_pair_stats`` reads it with its
    flags: no synchronisation here).
    """
    import torch

    fin = torch.isfinite(mt)
    gap = torch.where(fin, (m - mt) / temperature, 0.0)
    if u != 1.0:
        gap = gap * u
    if far if far is not None else bool((gap > _GAP).any()):
        return _exp_centred(x, t, mt, temperature, u)
    scale = torch.where(fin, torch.exp(gap), 0.0)[:, None]
    return _sel(t, e * scale, 0.0)


_CHUNK_ELEMENTS = 1 << 20  # rows are processed in chunks of about this many elements

# float32 rows with a finite logit / T beyond this magnitude are computed in float64 (the
# difference of two centred logits could overflow float32 and turn into nan)
_F32_LIMIT = 2.0**125
# float64 rows with a row maximum beyond this are computed in quarters (see _pair_stats)
_F64_LIMIT = 2.0**1020


def _chunks(n, width):
    """Row ranges of about ``_CHUNK_ELEMENTS`` elements (reused buffers, no huge temporaries)."""
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)] or [(0, 0)]


def _is_dense(a, b):
    """True when neither side holds a -inf (the usual case: every support mask is skipped)."""
    import torch

    return not bool(torch.isneginf(a).any() | torch.isneginf(b).any())


def _supports(a, b, dense):
    """Supports of both sides and their intersection; all None on dense shards.

    A nan counts as support, so that it reaches the sums and the maxima (with ``validate=False``
    a nan in an unmasked row gives a nan, never a plausible number).
    """
    if dense:
        return None, None, None
    sa = a != -math.inf
    sb = b != -math.inf
    return sa, sb, sa & sb


def _phase_max(a, b, check, dense, limit):
    """Local row maxima (both sides, over the supports and over T), flags and minus the minima
    over the supports: (n, 10).

    The flag columns of the two sides hold 2 for nan or +inf (with ``check``) plus 1 for a
    finite logit beyond ``limit`` in magnitude (float32 only: the call then runs in float64).
    The minima bound the log-ratios (``_pair_stats``: the overflow check is needed only where
    they could leave the float range).
    """
    import torch

    f = a.dtype
    sa, sb, t = _supports(a, b, dense)
    zero = torch.zeros(a.shape[0], dtype=f, device=a.device)
    a_only = zero if t is None else (sa & ~sb).any(dim=-1).to(f)
    b_only = zero if t is None else (sb & ~sa).any(dim=-1).to(f)
    fa = fb = zero
    if check:
        fa = 2 * (torch.isnan(a) | (a == math.inf)).any(dim=-1).to(f)
        fb = 2 * (torch.isnan(b) | (b == math.inf)).any(dim=-1).to(f)
    if t is None and a.shape[-1]:  # dense: one pass gives both
        mina, ma = torch.aminmax(a, dim=-1)
        minb, mb = torch.aminmax(b, dim=-1)
    else:
        ma = _masked_max(a, sa)
        mb = _masked_max(b, sb)
        mina, minb = _masked_min(a, sa), _masked_min(b, sb)
    if limit is not None:
        fa = fa + ((ma > limit) | (mina < -limit)).to(f)
        fb = fb + ((mb > limit) | (minb < -limit)).to(f)
    maT = ma if t is None else _masked_max(a, t)
    mbT = mb if t is None else _masked_max(b, t)
    return torch.stack([ma, mb, maT, mbT, a_only, b_only, fa, fb, -mina, -minb], dim=1)


def _phase_sums(a, b, Ma, Mb, MaT, MbT, bR, temperature, dense, twosum, u=1.0, far=(None,) * 2):
    """Local exp-sums, p-weighted centred log-ratio sums and outside masses: (n, 9).

    ``bR``: b at a's mode on T (the log-ratio's reference entry, see ``_phase_ref``). The
    log-ratio sums are in units of ``1 / u`` (quarters on calls in quarters). ``far``: the
    ``_exp_on`` choices of a and b (``_gap_flags``)."""
    import torch

    sa, sb, t = _supports(a, b, dense)
    ea = _exp_centred(a, sa, Ma, temperature, u)  # exp((a - Ma) / T) on a's support, else 0
    eb = _exp_centred(b, sb, Mb, temperature, u)
    eaT = _exp_on(a, t, ea, Ma, MaT, temperature, u, far[0])  # exp((a - MaT) / T) on T
    ebT = _exp_on(b, t, eb, Mb, MbT, temperature, u, far[1])
    delta = _delta(a, b, MaT, bR, t, temperature, twosum, u)
    # the entries at a's maximum over T (weight exactly 1) apart from the rest: a saturated a
    # (one-hot to within eps) keeps the rest's small sums, which its gradient is made of
    top = _top(a, MaT, t)
    rest = torch.where(top, 0.0, eaT)
    if u == 1.0:
        # no guard: a log-ratio beyond an eighth of the float range anywhere on T (or a nan
        # from a difference that overflowed) makes the sum inf or nan (0 * inf), and
        # _pair_stats computes the call again, wider (x 8 and / 8 round nothing)
        S_rest = (rest * (delta * 8.0)).sum(-1) * 0.125
    else:  # (in quarters: where a|T underflows, delta may reach the clamp; 0 * it is 0)
        S_rest = torch.where(rest > 0, rest * delta, 0.0).sum(-1)
    D_top = torch.where(top, delta, 0.0).sum(-1)
    return torch.stack([
        ea.sum(-1), eb.sum(-1), eaT.sum(-1), ebT.sum(-1), D_top, S_rest,
        _outside_sum(t, ea), _outside_sum(t, eb), rest.sum(-1),
    ], dim=1)


def _phase_ref(a, b, MaT, MbT, dense):
    """Local (n, 2): the largest b where a attains its maximum over T, and the largest a where b
    attains its maximum over T (-inf where this shard holds no such entry).

    The log-ratio is taken relative to its value at a's mode, ``d_i = (b_i - a_i) - (bR -
    MaT)``, each difference exact by TwoSum, so that d is small wherever a carries mass: the
    difference of the two sides' maxima, ``MbT - MaT``, can round entries apart by O(1) into
    one number when b's maximum (3e38) lies far from a's mass (2 and -1), and a huge KL's O(1)
    gradient is made of them. Jeffreys' q-centred log-ratio is taken at b's mode likewise.
    """
    import torch

    _, _, t = _supports(a, b, dense)
    at_a = _top(a, MaT, t)
    at_b = _top(b, MbT, t)
    if a.shape[-1] == 0:
        return torch.full((a.shape[0], 2), -math.inf, dtype=a.dtype, device=a.device)
    return torch.stack([torch.where(at_a, b, -math.inf).amax(-1),
                        torch.where(at_b, a, -math.inf).amax(-1)], dim=1)


def _top(a, MaT, t):
    """The entries of T where a attains its maximum over T."""
    top = a == _finite0(MaT)
    return top if t is None else top & t


def _phase_phi(a, b, MaT0, MbT0, log_saT, mu, big, temperature, dense, twosum, u=1.0):
    """Local sum over T of w * phi(d - mu), w = a's distribution restricted to T: (n,).

    ``MbT0`` is b's reference value (at a's mode on twosum calls), as in the delta of the sums;
    ``mu`` in units of ``1 / u``.

    Rows flagged ``big`` (the log of the sum is > 20, taken in closed form) contribute 0 (their
    log-ratios may lie beyond the float range: the rest is bounded where w > 0).
    """
    import torch

    _, _, t = _supports(a, b, dense)
    wn = torch.exp(_centred(a, t, MaT0, temperature, u) - log_saT[:, None])  # a | T
    dc = _full(_delta(a, b, MaT0, MbT0, t, temperature, twosum, u) - mu[:, None], u)
    # log(wn e^dc) with a cancelled exactly (from b's side alone)
    lwx = _centred(b, t, MbT0, temperature, u) - (log_saT + (mu if u == 1.0 else mu * u))[:, None]
    # entries where a | T underflows to 0 contribute wn e^dc = exp(lwx) (the "large" branch)
    x = torch.where(big[:, None], 0.0, torch.where(wn > 0, dc, 1.0))
    return _sel(t, _w_phi(_xp(), wn, x, log_w_exp=lwx), 0.0).sum(dim=-1)


def _pair_stats(a, b, temperature, group, check, names, need_direct=True):
    """Global row statistics of the pair (a, b), both (N, V_r) raw log-space values.

    Each side is centred on its own global maximum (over its support, and over the common
    support T) before anything is subtracted or divided by the temperature. Returns a dict of
    (N,) tensors: the maxima ``Ma``, ``Mb``, ``MaT0``, ``MbT0`` (0 where T is empty), the
    log-normalisers ``la``, ``lb`` relative to the maxima (``log p_i = (a_i - Ma) / T - la``),
    ``mu`` (the a|T-weighted mean of the centred log-ratio), ``a_out``, ``b_out`` (masses
    outside T), ``a_esc``, ``b_esc`` (a side has mass where the other has none), ``L``, ``kl`` =
    KL(a || b), ``mean_d`` (E_{a|T}[log b/a]), ``log_aT``, ``log_bT`` (-inf where T is empty);
    and ``T``, ``dense``, ``up`` (computed in float64); ``bR0``, ``aS0``: b at a's mode on T
    and a at b's mode on T (the log-ratio's reference entries; the maxima ``MbT0``, ``MaT0``
    on calls without a far row); ``u``: 4 on calls in quarters (``_pair_stats_at``), else 1.
    Three collectives: MAX of (N, 10) and the widest shard's width, SUM of (N, 9), SUM of
    (N, 1); calls with a row whose two maxima over T lie more than ``_TWOSUM_SHIFT`` apart add
    a MAX of (N, 2) before the first SUM (``_phase_ref``); calls whose log-ratios overflow
    repeat the sums once, wider; the passes over the data run in row chunks between them.

    Host synchronisations: one after the MAX (every flag, the checks, the chunks' rescaling
    choice of ``_exp_on`` and whether the overflow check is needed at all), and one after the
    sums only for ``need_direct`` (JS / Jeffreys: ``direct``, which depends on them) or on
    calls whose rows are wide enough to overflow (``_may_overflow``).
    """
    import torch

    n, width = a.shape
    parts = _chunks(n, width)
    dense = _is_dense(a, b)
    limit = _F32_LIMIT * temperature if a.dtype == torch.float32 else None
    mx = torch.cat([_phase_max(a[i:j], b[i:j], check, dense, limit) for i, j in parts])
    cols = mx.shape[1]
    mx = torch.cat([mx.reshape(-1), mx.new_full((1,), float(width))])
    mx = _all_reduce(mx, "max", group)
    mx, v_max = mx[:-1].view(n, cols), mx[-1]
    shift = (_finite0(mx[:, 3]) - _finite0(mx[:, 2])).abs()[:, 0]
    gaps = torch.cat([_gap_flags(mx[i:j], temperature) for i, j in parts]) if n else mx[:0, 0]
    # one host synchronisation for the flags, the largest shift between the two sides, the
    # empty rows, the bound of the log-ratios (_may_overflow) and _exp_on's choices per chunk
    f64 = torch.float64
    flags = torch.cat([mx[:, 6:8].amax(dim=0).to(f64), shift.amax()[None].to(f64),
                       _finite0(mx[:, 0:2]).amax()[None].to(f64),
                       (mx[:, 0:2] == -math.inf).any(dim=0).to(f64),
                       _ratio_bound(mx, v_max, group, temperature).amax()[None],
                       gaps.to(f64)]).tolist() if n else [0.0] * 7
    twosum = flags[2] > _TWOSUM_SHIFT
    if check:
        for k, name in enumerate(names):
            if flags[k] >= 2:
                raise ValueError(f"{name}: contains nan or +inf in some shard of the group")
        for k, (col, name) in enumerate(((mx[:, 0], names[0]), (mx[:, 1], names[1]))):
            if flags[4 + k]:
                row = int(torch.nonzero(col == -math.inf)[0, 0])
                raise ValueError(
                    f"{name}: row {row} is -inf on every shard: that is no distribution"
                )
    gaps = [(bool(ga), bool(gb)) for ga, gb in zip(flags[7::2], flags[8::2])] or [(False,) * 2]
    up = any(f % 2 == 1 for f in flags[:2])  # the same on every rank (all-reduced flags)
    if up:
        a, b, mx = a.double(), b.double(), mx.double()
    # float64 rows wider than the float64 range (logits of +1e308 against -1e308: b - a would
    # overflow, and TwoSum with it) are computed in quarters (see _pair_stats_at). Such a
    # difference needs a logit of magnitude >= finfo.max / 2 on the positive side, which the
    # maxima show; other overflows (a log-ratio beyond an eighth of the range: -1.7e308 where
    # the other side carries mass, or logits / T beyond it) show in the sums, and the call is
    # computed again: float32 in float64, float64 in quarters (extra work on such calls only).
    # The sums are checked only where the maxima and minima say a log-ratio could get there.
    quarter = a.dtype == torch.float64 and flags[3] > _F64_LIMIT
    while True:
        check_sums = flags[6] >= _fmax(a) / 128
        st = _pair_stats_at(a, b, mx, temperature, group, parts, dense, twosum, quarter, gaps,
                            check_sums, need_direct)
        if not st.pop("overflow"):
            st.update(up=up, quarter=quarter)
            return st
        if a.dtype == torch.float32:
            up = True
            a, b, mx = a.double(), b.double(), mx.double()
        else:
            quarter = True


def _gap_flags(mx, temperature):
    """Whether ``_exp_on`` must recompute the exponentials over T in this chunk of rows, for
    a and for b (a row whose maximum over T lies more than ``_GAP`` below its maximum): (2,),
    from the all-reduced maxima (in float64, as on calls computed in float64; in quarters the
    gap is the same, the maxima being scaled by a power of 2)."""
    import torch

    m = mx[:, 0:4].double()
    out = []
    for k in (0, 1):
        fin = torch.isfinite(m[:, 2 + k])
        gap = torch.where(fin, (m[:, k] - m[:, 2 + k]) / temperature, 0.0)
        out.append((gap > _GAP).any())
    return torch.stack(out)


def _ratio_bound(mx, v_max, group, temperature):
    """Per row, a bound on every quantity of the log-ratio's scale that the sums form (float64):
    ``(R_a + R_b) (V + 2)`` with ``R = (max - min) / T`` over a side's support and V the
    vocabulary (at most the widest shard, ``v_max``, times the ranks). On T the centred
    log-ratio is ``((b_i - bR) - (a_i - aS)) / T`` with reference entries of T, so
    ``|delta| <= R_a + R_b``; its weighted mean ``mu`` too; ``S_rest`` and ``D_top`` are sums
    of at most V of them with weights <= 1 (formed times 8); ``log_aT``, ``log_bT`` and ``L``
    are within ``R + 2 log V``.
    Below ``finfo.max / 128`` nothing overflows and ``_pair_stats_at``'s check (whose host read
    would cost a synchronisation) is skipped. Rows with a nan are 0 (the check skips them); an
    infinity (validation off) gives inf."""
    import torch

    from ._comm import _world

    m = mx.double()
    spread = (m[:, 0] + m[:, 8]) + (m[:, 1] + m[:, 9])
    v = spread / temperature * (v_max.double() * _world(group) + 2.0)
    v = torch.where(torch.isnan(v), math.inf, v)
    return torch.where(torch.isnan(m[:, 0]) | torch.isnan(m[:, 1]), 0.0, v)


def _units(temperature):
    """The power of 2 ``u`` by which calls in quarters divide the inputs: 32, and more below
    T = 1, so that a log-ratio over u, ``((b - a) - (bR - MaT)) / (u T)``, stays within an
    eighth of the float range, as on ordinary calls (a temperature far below 1 would take
    even a quarter of it beyond the range)."""
    u = 32.0
    while u * temperature < 32.0 and u < 2.0**900:
        u *= 2.0
    return u


def _pair_stats_at(a, b, mx, temperature, group, parts, dense, twosum, quarter, gaps,
                   check_sums, need_direct):
    """``_pair_stats`` after the maxima ``mx``: the two SUM collectives (and the MAX of the
    reference entries on ``twosum`` calls), and ``overflow``: whether a log-ratio on the
    common support exceeded an eighth of the float range (the caller then computes the call
    again, wider; never on calls in quarters; checked only with ``check_sums``, else False).
    ``gaps``: per chunk of ``parts``, ``_exp_on``'s choices; ``need_direct``: compute
    ``direct`` (read on the host; else True).

    In quarters (``quarter``: a, b and their maxima are taken as quarters, exact; ``u = 4``) the
    log-ratios and everything of their scale (``mu``, ``L``, ``mean_d``, ``log_aT``, ``log_bT``,
    ``D_top``, ``S_rest``) are kept as quarters, so that a log-ratio up to 4 finfo.max (1.7e308
    against -1.7e308, or such logits divided by T < 1) stays finite; the centred values that
    exponentials take are multiplied back (``_centred``), and weights multiply a quarter by 4
    (``(4 w) r / 4``: finite wherever the product is). ``kl`` is the value itself (+inf beyond
    finfo.max), ``kl_u`` in quarters.
    """
    import torch

    T = temperature
    u = _units(T) if quarter else 1.0
    if quarter:
        a, b = a * (1.0 / u), b * (1.0 / u)
        mx = torch.cat([mx[:, :4] * (1.0 / u), mx[:, 4:]], dim=1)
    Ma, Mb, MaT, MbT = mx[:, 0], mx[:, 1], mx[:, 2], mx[:, 3]
    if twosum:
        # some row's two maxima lie far apart: the log-ratio is referenced at a's mode (b's
        # mode for Jeffreys' q side), one more MAX collective of (N, 2), on such calls only
        rf = torch.cat([_phase_ref(a[i:j], b[i:j], MaT[i:j], MbT[i:j], dense)
                        for i, j in parts])
        rf = _all_reduce(rf, "max", group)
        bR = torch.where(torch.isfinite(rf[:, 0]), rf[:, 0], MbT)
        aS = torch.where(torch.isfinite(rf[:, 1]), rf[:, 1], MaT)
    else:  # (b - a) - (MbT - MaT) is accurate: the maxima are the reference
        bR, aS = MbT, MaT
    sm = torch.cat([_phase_sums(a[i:j], b[i:j], Ma[i:j], Mb[i:j], MaT[i:j], MbT[i:j], bR[i:j],
                                T, dense, twosum, u, far) for (i, j), far in zip(parts, gaps)])
    sm = _all_reduce(sm, "sum", group)
    s_a, s_b, s_aT, s_bT, D_top, S_rest, s_aout, s_bout, s_rest = sm.unbind(dim=1)
    n_top = torch.round(s_aT - s_rest)  # the number of entries at the maximum (usually 1)
    la = torch.log(s_a)
    lb = torch.log(s_b)
    empty_t = ~(s_aT > 0)  # (T holds the maximum of a over T: s_aT >= 1 unless T is empty)
    s_aT1 = torch.where(empty_t, 1.0, s_aT)
    s_bT1 = torch.where(empty_t, 1.0, s_bT)
    MaT0 = torch.where(empty_t, 0.0, MaT)
    MbT0 = torch.where(empty_t, 0.0, MbT)
    bR0 = torch.where(empty_t, 0.0, bR)
    aS0 = torch.where(empty_t, 0.0, aS)
    mu = (D_top + S_rest) / s_aT1
    a_out = s_aout / s_a
    b_out = s_bout / s_b
    log_saT = torch.log(s_aT1)
    log_sbT = torch.log(s_bT1)
    ninf = torch.full_like(la, -math.inf)

    def units(v):  # a log of moderate size (sums of at most V terms) in units of 1 / u
        return v if u == 1.0 else v / u

    # the core's _log_of_mass: log1p of the outside mass when small, else a log-sum-exp over T;
    # -inf when T is empty (the JS gradient off T is proportional to exp of it)
    if u == 1.0:
        far_a = torch.where(empty_t, 0.0, (MaT0 - Ma) / T) + log_saT - la
        far_b = torch.where(empty_t, 0.0, (MbT0 - Mb) / T) + log_sbT - lb
    else:
        far_a = torch.where(empty_t, 0.0, (MaT0 - Ma) / T) + units(log_saT - la)
        far_b = torch.where(empty_t, 0.0, (MbT0 - Mb) / T) + units(log_sbT - lb)
    log_aT = torch.where(empty_t, ninf, torch.where(
        a_out < 0.5, units(torch.log1p(-torch.clamp(a_out, max=0.5))), far_a))
    log_bT = torch.where(empty_t, ninf, torch.where(
        b_out < 0.5, units(torch.log1p(-torch.clamp(b_out, max=0.5))), far_b))
    # L = log E_{a|T}[exp(d - mu)] is, exactly, log(s_bT / s_aT) - mu. Near 0 that cancels, so
    # L is summed from non-negative phi terms; far from 0 (> 20) the closed form has no
    # cancellation to fear and the phi sum could overflow: it is taken instead.
    # (exp(delta_i) is (s_bT-terms / s_aT-terms) times exp((MbT - bR) / T): 1 unless twosum)
    L_closed = units(log_sbT - log_saT) - mu
    if twosum:
        L_closed = L_closed + (MbT0 - bR0) / T
    big = (L_closed > 20.0 / u) & ~empty_t
    phi = torch.cat([_phase_phi(a[i:j], b[i:j], MaT0[i:j], bR0[i:j], log_saT[i:j], mu[i:j],
                                big[i:j], T, dense, twosum, u) for i, j in parts])
    phi = _all_reduce(phi[:, None], "sum", group)[:, 0]
    L = torch.where(big, L_closed, units(torch.log1p(phi)))
    L = torch.where(empty_t, 0.0, L)
    a_esc = mx[:, 4] > 0
    b_esc = mx[:, 5] > 0
    kl_u = torch.where(a_esc, math.inf, L - torch.where(a_esc, 0.0, log_bT))
    kl = kl_u if u == 1.0 else kl_u * u  # (+inf beyond the float range)
    mean_d = torch.where(empty_t, 0.0, log_bT - log_aT - L)
    # JS / Jeffreys need _log_ratio's direct route only on rows centred far from 0; read with
    # the overflow flag in one host synchronisation (none for forward / reverse on calls whose
    # rows cannot overflow: _ratio_bound)
    direct = ((mu.abs() + mean_d.abs()) * u >= 64.0).any()
    overflow = torch.zeros_like(direct)
    check_sums = check_sums and not quarter
    if check_sums:
        # everything of the log-ratio's scale within an eighth of the float range (so that no
        # difference or sum of a few of them formed later overflows), on rows without a nan
        lim = _fmax(mu) / 8
        bad = (~torch.isfinite(S_rest) | (mu.abs() > lim) | ~torch.isfinite(L)
               | (~empty_t & ((log_aT.abs() > lim) | (log_bT.abs() > lim))))
        bad = bad & ~(torch.isnan(Ma) | torch.isnan(Mb))
        overflow = bad.any()
    if check_sums or need_direct:
        overflow, direct = torch.stack([overflow, direct]).tolist()
    else:
        overflow, direct = False, True
    return dict(Ma=Ma, Mb=Mb, MaT0=MaT0, MbT0=MbT0, bR0=bR0, aS0=aS0, la=la, lb=lb, mu=mu,
                a_out=a_out,
                n_top=n_top, D_top=D_top, S_rest=S_rest, s_rest=s_rest, s_aT=s_aT1,
                b_out=b_out, a_esc=a_esc, b_esc=b_esc, L=L, kl=kl, kl_u=kl_u, mean_d=mean_d,
                log_aT=log_aT, log_bT=log_bT, T=T, u=u, dense=dense, twosum=twosum,
                overflow=overflow, direct=direct)


def _slice(st, i, j):
    return {k: v[i:j] if hasattr(v, "shape") else v for k, v in st.items()}


def _outside_sum(t, e):
    import torch

    if t is None:
        return torch.zeros(e.shape[0], dtype=e.dtype, device=e.device)
    return torch.where(t, 0.0, e).sum(-1)


def _dc_grad(a, b, st, t):
    """The centred log-ratio ``delta - mu`` for the gradients, exact in spirit at a's maximum:
    there it is ``((n delta - D_top) + delta s_rest - S_rest) / s_aT``, small sums only, where
    ``delta - mu`` would cancel for a saturated a (one-hot to within eps); formed as
    ``(delta - D_top / n) (n / s_aT) + delta (s_rest / s_aT) - S_rest / s_aT`` (row constants
    of at most 1 times log-ratios: no product overflows where n or s_rest is large). In units of
    ``1 / st["u"]``."""
    import torch

    delta = _delta(a, b, st["MaT0"], st["bR0"], t, st["T"], st["twosum"], st["u"])
    dc = delta - st["mu"][:, None]
    top = _top(a, st["MaT0"], t)
    n, s_aT = st["n_top"], st["s_aT"]
    n1 = torch.where(n > 0, n, 1.0)
    c_d, c_n = (st["D_top"] / n1)[:, None], (n / s_aT)[:, None]
    c_r, c_s = (st["s_rest"] / s_aT)[:, None], (st["S_rest"] / s_aT)[:, None]
    dtop = (delta - c_d) * c_n + delta * c_r - c_s
    return _sel(t, torch.where(top, dtop, dc), 0.0)


def _probs(x, sel, m, lse, temperature, u=1.0):
    """exp((x - m) / T - lse) on ``sel``, 0 elsewhere: normalised probabilities."""
    import torch

    return torch.exp(_centred(x, sel, m, temperature, u) - lse[:, None])


def _log_ratio(a, b, st, t):
    """log(b_i / a_i) on ``t`` (0 elsewhere) and the centred difference ``d - E_{a|T}[d]``.

    As the core's ``_log_ratio``, entry by entry the more accurate of two routes: the centred
    difference plus its mean, with rounding errors of the size of |delta| + |mu| + |mean_d|, or
    the difference of the two normalised log-probabilities, of the size of their magnitudes
    plus the rounding of the normalisers (a row where b is astronomically small somewhere a
    is not drags mu far from 0). In units of ``1 / st["u"]`` (quarters on calls in quarters).
    """
    import torch

    T, u = st["T"], st["u"]
    delta = _delta(a, b, st["MaT0"], st["bR0"], t, T, st["twosum"], u)
    mu = st["mu"][:, None]
    mean_d = st["mean_d"][:, None]
    dc = _sel(t, delta - mu, 0.0)
    if not st.get("direct", True):  # no row is centred far from 0: the centred route is good
        return _sel(t, dc + mean_d, 0.0), dc
    la, lb = st["la"][:, None], st["lb"][:, None]
    if u != 1.0:
        la, lb = la / u, lb / u
    ca = _centred(a, t, st["Ma"], T) - la
    cb = _centred(b, t, st["Mb"], T) - lb
    # (errors in units of eps; the direct route also carries the rounding of the two
    # normalisers' sums, about 1 each even where their logarithms are tiny)
    err_direct = torch.abs(ca) + torch.abs(cb) + 2.0 / u
    direct = err_direct < (torch.abs(delta) + torch.abs(mu) + torch.abs(mean_d))
    if t is not None:
        direct = direct & t
    d = torch.where(direct, cb - torch.where(direct, ca, 0.0), dc + mean_d)
    return _sel(t, d, 0.0), dc


def _js_local(x, y, st, beta):
    """Elementwise JS pieces on T: log(q/p) (itself, clamped to the float range, and in units
    of ``1 / st["u"]``), log(m/p), log(m/q) and the probabilities of both."""
    import torch

    xp = _xp()
    sa, sb, t = _supports(x, y, st["dense"])
    u = st["u"]
    d_u, _ = _log_ratio(x, y, st, t)
    d = _full(d_u, u)
    pw = _probs(x, sa, st["Ma"], st["la"], st["T"], u)
    qw = _probs(y, sb, st["Mb"], st["lb"], st["T"], u)
    # log(m / p) and log(m / q) on T; where a side underflows to 0 (its log-ratio may overflow)
    # the value 1 is a safe stand-in: every use multiplies it by that side's 0
    lm_p = torch.where(pw > 0, _log_mix(xp, 1.0 - beta, d, beta), 1.0)
    lm_q = torch.where(qw > 0, _log_mix(xp, beta, -d), 1.0)
    return t, d, d_u, lm_p, lm_q, pw, qw


def _phase_family(kind, x, y, st, beta):
    """Local sums of the JS (n, 4) or Jeffreys (n, 2) terms, once the pair's stats are known."""
    import torch

    t, d, d_u, lm_p, lm_q, pw, qw = _js_local(x, y, st, beta)
    if kind == "jeffreys":
        u = st["u"]
        small = d.abs() < 0.5
        ds = torch.where(small, d, 0.0)
        # p e^d = q on T (d = log q/p): no exponential of log p + d. (In units of 1 / u: the
        # large terms from the quarter d_u, which may be beyond the float range as a whole)
        if u == 1.0:
            dl = torch.where(small, 0.0, d)
            term = torch.where(small, pw * ds * torch.expm1(ds), dl * (qw - pw))
        else:
            dl = torch.where(small, 0.0, d_u)
            term = torch.where(small, pw * ds * torch.expm1(ds) / u, dl * (qw - pw))
        # E_q of the log-ratio (centred on the maxima, not on E_p: a -1e30 logit of q drags
        # E_p far from the values q weighs)
        delta = _delta(x, y, st["aS0"], st["MbT0"], t, st["T"], st["twosum"], u)
        # ... with the entries at q's maximum apart (a saturated q, as for p in _phase_sums)
        top = _top(y, st["MbT0"], t)
        rest = _sel(t, torch.where(top, 0.0, qw), 0.0)
        qtop = torch.where(top, qw, 0.0)
        return torch.stack([_sel(t, term, 0.0).sum(-1),
                            torch.where(qtop > 0, qtop * delta, 0.0).sum(-1),
                            torch.where(rest > 0, rest * delta, 0.0).sum(-1),
                            rest.sum(-1), qtop.sum(-1)], dim=1)
    m = beta * pw + (1 - beta) * qw  # p e^{log m/p} = q e^{log m/q} = m, exactly
    tp = _sel(t, _w_phi(_xp(), pw, lm_p, w_exp=m), 0.0)
    tq = _sel(t, _w_phi(_xp(), qw, lm_q, w_exp=m), 0.0)
    wp, wq = _js_w(d, pw, qw, beta)
    return torch.stack([tp.sum(-1), tq.sum(-1), _sel(t, pw * lm_p, 0.0).sum(-1),
                        _sel(t, qw * lm_q, 0.0).sum(-1), _sel(t, pw * wp, 0.0).sum(-1),
                        _sel(t, qw * wq, 0.0).sum(-1)], dim=1)


def _log1p_cexp(c, d):
    """log(1 + c e^d) for a constant c > 0: the core's, accurate for every c and d (log c + d
    + log1p(e^-d / c) cancelled to eps |log c| where c e^d << 1, beta near 0 or 1)."""
    return _core_log1p_cexp(_xp(), c, d)


def _js_w(d, pw, qw, beta):
    """log(m / (beta p)) = log1p((1-beta)/beta e^d) and log(m / ((1-beta) q)) on T.

    They differ from log(m/p) and log(m/q) by constants; where the supports barely overlap
    (JS near its bound) they are small where log(m/p) is near log(beta), so the gradient's
    centred differences taken from them do not cancel (see _local_grads_chunk)."""
    import torch

    wp = torch.where(pw > 0, _log1p_cexp((1 - beta) / beta, d), 0.0)
    wq = torch.where(qw > 0, _log1p_cexp(beta / (1 - beta), -d), 0.0)
    return wp, wq


def _rows_and_stats(kind, x, y, beta, temperature, group, check, names=("p_shard", "q_shard")):
    """Per-row divergence of ``kind`` between x (p) and y (q), raw log-space values divided by
    ``temperature`` inside, and the row statistics.

    Only (N,)-shaped statistics are returned (the backward recomputes the elementwise ones).
    The rows have the dtype of ``x`` (float32 rows near the float32 limit are computed in
    float64 and rounded once at the end).
    """
    import torch

    dt = x.dtype
    if kind == "reverse":
        st = _pair_stats(y, x, temperature, group, check, names[::-1], need_direct=False)
        return _finish(st["kl"], st, dt, torch.isfinite(st["kl_u"]))
    st = _pair_stats(x, y, temperature, group, check, names, need_direct=kind != "forward")
    if kind == "forward":
        return _finish(st["kl"], st, dt, torch.isfinite(st["kl_u"]))
    if st["up"]:
        x, y = x.double(), y.double()
    if st["quarter"]:
        x, y = x * (1.0 / st["u"]), y * (1.0 / st["u"])
    sums = torch.cat([_phase_family(kind, x[i:j], y[i:j], _slice(st, i, j), beta)
                      for i, j in _chunks(*x.shape)])
    sums = _all_reduce(sums, "sum", group)
    if kind == "jeffreys":
        st["q_Stop"], st["q_Srest"], st["q_rest"], st["q_top"] = sums[:, 1:5].unbind(dim=1)
        rows_u = torch.where(st["a_esc"] | st["b_esc"], math.inf, sums[:, 0])
        rows = rows_u if st["u"] == 1.0 else rows_u * st["u"]  # (+inf beyond the float range)
        return _finish(rows, st, dt, torch.isfinite(rows_u))
    st["S_plm"] = sums[:, 2]  # sum_T p log(m/p)
    st["S_qlm"] = sums[:, 3]  # sum_T q log(m/q)
    st["S_pw"] = sums[:, 4]  # sum_T p log(m / (beta p))
    st["S_qw"] = sums[:, 5]  # sum_T q log(m / ((1-beta) q))
    rows = (beta * sums[:, 0] + (1 - beta) * sums[:, 1]
            - beta * math.log(beta) * st["a_out"] - (1 - beta) * math.log1p(-beta) * st["b_out"])
    return _finish(rows, st, dt)


def _finish(rows, st, dt, fin=None):
    """The rows in ``dt`` and ``st["fin"]``: where the row is finite before that rounding, or
    ``fin`` (finite in quarters). A row whose true value exceeds the float range (float32 rows
    computed in float64, float64 rows computed in quarters) is +inf, with the finite gradient
    of the exact value; rows of infinite true value (a side escapes) get 0."""
    import torch

    rows = _nan_rows(rows, st)
    st["fin"] = torch.isfinite(rows) if fin is None else fin & ~torch.isnan(rows)
    return rows.to(dt), st


def _nan_rows(rows, st):
    """nan where either side's maximum is nan (a nan in the row, validation off)."""
    import torch

    return torch.where(torch.isnan(st["Ma"]) | torch.isnan(st["Mb"]), math.nan, rows)


def _local_grads(kind, x, y, rows, st, beta, scale=None, need=(True, True)):
    """d rows / d x and d rows / d y (raw logits: the 1/T included, times ``scale`` per row),
    by row chunks, no collective.

    forward: d/dy = q - p, d/dx = -p * dc (dc: log(q/p) centred by its p-mean);
    reverse: the same with the roles of p and q swapped;
    Jeffreys: d/dx = p - q - p * dc, d/dy = q - p + q * (delta - E_q[delta]);
    JS: d/dx = beta p (log(p/m) - KL(p||m)), d/dy = (1-beta) q (log(q/m) - KL(q||m)).
    ``q - p`` is formed as ``p * expm1(log(q/p))`` where q and p are close (no cancellation).
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


def _diff(pa, pb, d, t):
    """pb - pa from the log-ratio d = log(pb / pa) on t, without cancellation."""
    import torch

    near = d.abs() < 1.0
    if t is not None:
        near = near & t
    return torch.where(near, pa * torch.expm1(torch.where(near, d, 0.0)), pb - pa)


def _local_grads_chunk(kind, x, y, rows, st, beta, scale, need):
    import torch

    dt = x.dtype
    if st["up"]:
        x, y = x.double(), y.double()
    if st["quarter"]:  # (the log-ratios in quarters, u = 4 or more: see _pair_stats_at)
        x, y = x * (1.0 / st["u"]), y * (1.0 / st["u"])
    T, u = st["T"], st["u"]

    def w4(w):  # a weight times u, to multiply a log-ratio kept in units of 1 / u
        return w if u == 1.0 else w * u

    if kind in ("forward", "reverse"):
        a, b = (x, y) if kind == "forward" else (y, x)
        need_a = need[0] if kind == "forward" else need[1]
        sa, sb, t = _supports(a, b, st["dense"])
        pa = _probs(a, sa, st["Ma"], st["la"], T, u)
        pb = _probs(b, sb, st["Mb"], st["lb"], T, u)
        dc = _dc_grad(a, b, st, t)
        # log(pb / pa) = dc + mean_d, good to eps (|dc| + |mu| + |mean_d|): used for pb - pa
        # where |log(pb / pa)| < 1 on rows whose centring is moderate (else pb - pa directly)
        ok = ((st["mu"].abs() + st["mean_d"].abs()) * u < 64.0)[:, None]
        d = torch.where(ok, _full(dc + st["mean_d"][:, None], u), math.inf)
        gb = _diff(pa, pb, d, t)
        if need_a:  # (the teacher's side, often detached)
            ga = _sel(t, -w4(pa) * torch.where(pa > 0, dc, 0.0), 0.0)
        else:
            ga = torch.zeros_like(gb)
        gx, gy = (ga, gb) if kind == "forward" else (gb, ga)
    elif kind == "jeffreys":
        t, d, _, _, _, pw, qw = _js_local(x, y, st, beta)
        dc = _dc_grad(x, y, st, t)
        qmp = _diff(pw, qw, d, t)
        delta = _delta(x, y, st["aS0"], st["MbT0"], t, T, st["twosum"], u)
        # delta - E_q[delta]; at q's maximum from the small sums over the other entries:
        # (q_top delta - S_top) + delta q_rest - S_rest (q_top, S_top: q's mass at its maximum
        # and its delta-weighted sum; q_top delta - S_top is exactly 0 for a single maximum)
        S_top, S_rest = st["q_Stop"][:, None], st["q_Srest"][:, None]
        q_rest, q_top = st["q_rest"][:, None], st["q_top"][:, None]
        centred = delta - (S_top + S_rest)
        at_top = (q_top * delta - S_top) + delta * q_rest - S_rest
        centred = torch.where(_top(y, st["MbT0"], t), at_top, centred)
        gx = _sel(t, -w4(pw) * torch.where(pw > 0, dc, 0.0), 0.0) - qmp
        gy = qmp + _sel(t, w4(qw) * torch.where(qw > 0, centred, 0.0), 0.0)
    else:
        t, d, _, lm_p, lm_q, pw, qw = _js_local(x, y, st, beta)
        # log(p/m) - KL(p||m) with KL(p||m) = c_p p_out - S_plm, c_p = -log(beta) = log(p/m)
        # off T; off T the difference is c_p (1 - p_out) + S_plm, with 1 - p_out = p(T) taken
        # from its accurate logarithm (no cancellation when p(T) is tiny; 0 when T is empty)
        cp, cq = -math.log(beta), -math.log1p(-beta)
        E_lm_p = (st["S_plm"] - cp * st["a_out"])[:, None]  # E_p[log(m/p)] = -KL(p||m)
        E_lm_q = (st["S_qlm"] - cq * st["b_out"])[:, None]
        on_p = -lm_p + E_lm_p
        on_q = -lm_q + E_lm_q
        off_p = (cp * torch.exp(st["log_aT"] * u) + st["S_plm"])[:, None]
        off_q = (cq * torch.exp(st["log_bT"] * u) + st["S_qlm"])[:, None]
        # the same differences from w = log(m / (beta p)) (w = 0 off T): S_w - w on T and S_w
        # off T; per row, the form whose mean is the smaller (no cancellation near JS's bound)
        wp, wq = _js_w(d, pw, qw, beta)
        S_pw, S_qw = st["S_pw"][:, None], st["S_qw"][:, None]
        use_p = S_pw.abs() < E_lm_p.abs()
        use_q = S_qw.abs() < E_lm_q.abs()
        on_p = torch.where(use_p, S_pw - wp, on_p)
        on_q = torch.where(use_q, S_qw - wq, on_q)
        off_p = torch.where(use_p, S_pw, off_p)
        off_q = torch.where(use_q, S_qw, off_q)
        gx = beta * pw * _sel(t, on_p, off_p)
        gy = (1 - beta) * qw * _sel(t, on_q, off_q)
    fin = st["fin"] if "fin" in st else torch.isfinite(rows)
    s = torch.full_like(st["L"], 1.0 / T) if scale is None else scale.to(gx.dtype) / T
    fin = fin[:, None]  # (where, not a product: an infinite row's entries may be inf)
    return (torch.where(fin, gx * s[:, None], 0.0).to(dt),
            torch.where(fin, gy * s[:, None], 0.0).to(dt))


def _function_class():
    import torch

    class _VocabParallelRows(torch.autograd.Function):
        """Per-row divergence of sharded log-space rows; the backward is local (no collective)."""

        @staticmethod
        def forward(ctx, x, y, kind, beta, temperature, group, check):
            with torch.no_grad():
                rows, st = _rows_and_stats(kind, x, y, beta, temperature, group, check)
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
            return gx, gy, None, None, None, None, None

    return _VocabParallelRows


_FN = None


def _rows_fn():
    global _FN
    if _FN is None:
        _FN = _function_class()
    return _FN
