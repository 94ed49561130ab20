"""Per-row statistics of two logits matrices: the compiled kernel and its NumPy fallback.

Both compute, for each row of a reference ``a`` (p = softmax(a)) and another model ``b``
(q = softmax(b)), the same quantities with the same cancellation-free formula as kldiv's core:

.. math::

    \\mathrm{KL}(p \\| q) = \\log\\!\\Big(1 + \\sum_{j \\in S} p_j\\, \\varphi(x_j)\\Big) - \\log q(S),
    \\qquad x_j = d_j - \\sum_k p_k d_k,\\quad d_j = b_j - a_j,\\quad \\varphi(x) = e^x - 1 - x,

where S is the support of p (entries with finite ``a``). The compiled kernel
(``kldiv._ext._rowstats``) works in float32 with exact differences and block sums in double; the
fallback works in float64. The Jensen-Shannon divergence of float64 rows, of float32 rows with a
-inf logit and of rows with huge logits comes from :func:`js_rows` (the core's algebra: full
float64 relative accuracy at any JS, 1e-25 included, no clip). Use :func:`row_stats`;
``force_fallback=True`` (or the environment variable ``KLDIV_NO_EXT=1``) selects the NumPy code.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

# status bits, the same as in rowstats.c (HUGE is internal: row_stats clears it)
NAN_REF, PINF_REF, NAN_OTHER, PINF_OTHER, EMPTY_REF, EMPTY_OTHER, BAD_TOKEN = 1, 2, 4, 8, 16, 32, 64
HUGE = 128
#: rows with a finite logit of this magnitude get their divergences from the double kernel (the
#: same constant as in rowstats.c)
HUGE_LOGIT = 65536.0

_EXT = None
_EXT_TRIED = False


def extension():
    """The compiled ``_rowstats`` module, or ``None`` when it is not built (or KLDIV_NO_EXT=1)."""
    global _EXT, _EXT_TRIED
    if os.environ.get("KLDIV_NO_EXT", "") not in ("", "0"):
        return None
    if not _EXT_TRIED:
        _EXT_TRIED = True
        try:
            from .._ext import _rowstats

            _EXT = _rowstats if hasattr(_rowstats, "rowstats") else None
        except ImportError:
            _EXT = None
    return _EXT


@dataclass
class RowStats:
    """Per-row results for one block of rows (all arrays have one entry per row).

    ``kl`` = KL(p || q), ``rkl`` = KL(q || p) (or None), ``top_ref``/``top_other`` = first argmax,
    ``logz_ref`` = log sum exp(a - max a) (the reference's top-1 probability is exp(-logz_ref)),
    ``lp_ref_tok``/``lp_other_tok`` = log-probabilities of the given tokens (or None),
    ``status`` = bit flags (NAN_REF, PINF_REF, ...; 0 for a valid row),
    ``js`` = Jensen-Shannon divergence (beta = 1/2, nats; or None when not requested).
    """

    kl: np.ndarray
    rkl: np.ndarray | None
    top_ref: np.ndarray
    top_other: np.ndarray
    logz_ref: np.ndarray
    lp_ref_tok: np.ndarray | None
    lp_other_tok: np.ndarray | None
    status: np.ndarray
    js: np.ndarray | None = None


def row_stats(a, b, *, tokens=None, reverse=False, js=False, threads=None,
              force_fallback=False) -> RowStats:
    """Per-row KL(p||q) (and KL(q||p), JS), top-1 indices and token log-probs of two logits blocks.

    ``a`` and ``b`` are (rows, vocab) arrays of logits: float64 inputs use the float64 NumPy code
    (keeping their precision), others the compiled float32 kernel when it is built; ``tokens`` an
    optional int array with one token id per row. The compiled kernel computes the JS divergence
    of rows whose logits are all finite; other rows (a -inf logit, a logit of 2^16 or more) and
    the float64 / fallback code use :func:`js_rows`, exact to float64 rounding (about 1e-15
    relative against mpmath on the exact inputs at any JS: 1e-25 included; never clipped).
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be 2-d arrays of the same shape, got {a.shape} and {b.shape}")
    n, v = a.shape
    tok = None
    if tokens is not None:
        tok = np.ascontiguousarray(tokens, dtype=np.int32)
        if tok.shape != (n,):
            raise ValueError(f"tokens must have shape ({n},), got {tok.shape}")
    ext = None if force_fallback else extension()
    if ext is None or a.dtype == np.float64 or b.dtype == np.float64:
        r = _row_stats_numpy(a, b, tok, reverse)
        if js:
            r.js = _js_valid_rows(a, b, r.status)
        with np.errstate(invalid="ignore"):
            big = np.where(np.isfinite(a), np.abs(a), 0).max(1) >= HUGE_LOGIT
            big |= np.where(np.isfinite(b), np.abs(b), 0).max(1) >= HUGE_LOGIT
        _redo_huge(a, b, np.flatnonzero(big & (r.status == 0)), r, reverse, js)
        return r
    a32 = np.ascontiguousarray(a, dtype=np.float32)
    b32 = np.ascontiguousarray(b, dtype=np.float32)
    kl = np.empty(n, np.float64)
    rkl = np.empty(n if reverse else 0, np.float64)
    top_a = np.empty(n, np.int32)
    top_b = np.empty(n, np.int32)
    logz = np.empty(n, np.float64)
    lpa = np.empty(n if tok is not None else 0, np.float64)
    lpb = np.empty(n if tok is not None else 0, np.float64)
    status = np.empty(n, np.int32)
    jsv = np.empty(n, np.float64) if js else None
    _run_parallel(ext, a32, b32, tok, reverse, threads, kl, rkl, top_a, top_b, logz, lpa, lpb, status,
                  jsv)
    huge = np.flatnonzero(status & HUGE)
    status &= ~HUGE
    if js:
        redo = np.flatnonzero(np.isnan(jsv) & (status == 0))  # rows with -inf logits
        if redo.size:
            jsv[redo] = js_rows(a32[redo], b32[redo])
    r = RowStats(kl, rkl if reverse else None, top_a, top_b, logz,
                 lpa if tok is not None else None, lpb if tok is not None else None, status, jsv)
    _redo_huge(a32, b32, huge, r, reverse, js)
    return r


def _redo_huge(a, b, rows, r, reverse, js):
    """Divergences of the rows with logits of 2^16 or more (issue 11 item 1), in double.

    Each side is centred on its own maximum before the difference is formed (the kernel of
    kldiv's NumPy fast path, ``kldiv._ext._divrows``); without it, kldiv's core in float64.
    """
    if rows.size == 0:
        return
    sub_a, sub_b = np.ascontiguousarray(a[rows]), np.ascontiguousarray(b[rows])
    kinds = [("forward", "kl")] + ([("reverse", "rkl")] if reverse else [])
    if js:
        # the double kernel (fast; it loses digits below JS ~ 1e-16: 1e-8 relative at 1e-25)
        # where it gives more than 1e-12, js_rows (full relative accuracy at any JS) elsewhere
        vals = _divrows_logits("js", sub_a, sub_b)
        small = np.arange(rows.size) if vals is None else np.flatnonzero(~(vals >= 1e-12))
        if vals is None:
            vals = np.empty(rows.size, np.float64)
        if small.size:
            vals[small] = js_rows(sub_a[small], sub_b[small])
        r.js[rows] = vals
    for kind, field in kinds:
        vals = _divrows_logits(kind, sub_a, sub_b)
        if vals is None:  # no compiled kernel (or a row it declines): the core's rows
            from .._core.divergence import divergence_rows

            with np.errstate(all="ignore"):
                vals = np.asarray(divergence_rows(kind, np, sub_a.astype(np.float64),
                                                  sub_b.astype(np.float64), "logits", "logits"))
        getattr(r, field)[rows] = vals


_DIVROWS_KINDS = {"forward": 0, "reverse": 1, "js": 2}


def _divrows_logits(kind, a, b):
    """Per-row ``kind`` divergence (float64, JS with beta 1/2) of two C-contiguous logits blocks
    through the compiled ``kldiv._ext._divrows`` without value checks; None when the kernel is
    missing, switched off (``KLDIV_NO_EXT=1``) or declines a row. Called directly here (not
    through kldiv's NumPy backend, which imports this module: no import circle)."""
    if os.environ.get("KLDIV_NO_EXT", "") not in ("", "0") or a.shape[0] == 0:
        return None
    try:
        from .._ext import _divrows
    except ImportError:
        return None
    n_rows, n = a.shape
    out = np.empty(n_rows, np.float64)
    status = np.empty(n_rows, np.int32)
    _divrows.rows(a, b, n_rows, n, int(a.dtype == np.float64), int(b.dtype == np.float64), 2, 2,
                  1.0, 0.5, _DIVROWS_KINDS[kind], 0, 1.0, 1.0, float(np.finfo(a.dtype).eps),
                  float(np.finfo(b.dtype).eps), out, status)
    return None if status.any() else out


def _js_valid_rows(a, b, status):
    """JS of the rows with status 0 (NaN elsewhere), by :func:`js_rows`."""
    out = np.full(status.shape, np.nan)
    ok = status == 0
    if ok.any():
        out[ok] = js_rows(np.asarray(a)[ok], np.asarray(b)[ok])
    return out


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_POOL = None
_POOL_PID = None
_POOL_WORKERS = 0
_POOL_LOCK = threading.Lock()


def _pool(workers):
    """A shared thread pool; a new one after fork (a forked child has none of the threads)."""
    global _POOL, _POOL_PID, _POOL_WORKERS
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid() or _POOL_WORKERS < workers:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kldiv-rowstats")
            _POOL_PID, _POOL_WORKERS = os.getpid(), workers
        return _POOL


def _run_parallel(ext, a, b, tok, reverse, threads, kl, rkl, top_a, top_b, logz, lpa, lpb, status,
                  jsv=None):
    """Spread the rows over ``threads`` workers (default: all CPUs).

    The C kernel releases the GIL, so plain Python threads run it in parallel; each call is
    single-threaded. Unlike an OpenMP team, a worker that finishes early sleeps instead of
    spinning while it waits, which matters on a machine shared with other work. Rows are cut into
    pieces (four per worker) so that a worker slowed down by other load does not hold the others.
    """
    n, v = a.shape
    workers = cpu_count() if not threads else int(threads)
    if workers <= 1 or n < 2 * workers:
        ext.rowstats(a, b, n, v, tok, int(bool(reverse)), 1, kl, rkl, top_a, top_b, logz, lpa, lpb, status,
                     jsv)
        return
    step = max(1, -(-n // (4 * workers)))

    def piece(s):
        e = min(n, s + step)
        ext.rowstats(a[s:e], b[s:e], e - s, v, None if tok is None else tok[s:e], int(bool(reverse)), 1,
                     kl[s:e], rkl[s:e] if reverse else rkl, top_a[s:e], top_b[s:e], logz[s:e],
                     lpa[s:e] if tok is not None else lpa, lpb[s:e] if tok is not None else lpb,
                     status[s:e], None if jsv is None else jsv[s:e])

    for f in [_pool(workers).submit(piece, s) for s in range(0, n, step)]:
        f.result()


_PHI_COEF = [1.0 / float(np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(17, 1, -1)]


def _phi(x):
    """phi(x) = exp(x) - 1 - x in float64: the Taylor series to x^17 for |x| < 0.5 (truncation
    below 1e-20 relative; to x^11 it was 3e-12 at |x| = 0.5), expm1(x) - x beyond."""
    small = np.abs(x) < 0.5
    xs = np.where(small, x, 0.0)
    s = np.full_like(xs, _PHI_COEF[0])
    for c in _PHI_COEF[1:]:  # 1/16!, ..., 1/2!
        s = s * xs + c
    series = s * xs * xs
    return np.where(small, series, np.expm1(np.where(small, 0.0, x)) - np.where(small, 0.0, x))


def _kl_rows(la, lb, ma, mb, za, zb):
    """Centred-form KL(p||q) per row in float64 from logits la, lb (rows, V) with maxima/sums."""
    fin_a = np.isfinite(la)
    fin_b = np.isfinite(lb)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        qzero = np.any(fin_a & ~fin_b, axis=1)
        p = np.exp(la - ma[:, None]) / za[:, None]
        d = np.where(fin_a & fin_b, lb - la, 0.0)
        dbar = np.sum(p * d, axis=1)
        x = d - dbar[:, None]
        # p * phi(x) with the large-x branch as p e^x = exp(log p + x) so that p -> 0 never loses
        # it; log p + x = lb - (ma + log za + dbar) with la cancelled exactly (adding a huge
        # finite log p, such as a logit of -1e30, to a huge x would leave noise)
        lp = la - ma[:, None] - np.log(za)[:, None]
        lpx = lb - (ma + np.log(za) + dbar)[:, None]
        small = np.abs(x) < 0.5
        big = np.exp(np.where(small | ~fin_b, -np.inf, lpx)) - p * (1.0 + x)
        term = np.where(small, p * _phi(np.where(small, x, 0.0)), big)
        u = np.sum(np.where(fin_a, term, 0.0), axis=1)
        eb = np.exp(lb - mb[:, None])
        q_off = np.sum(np.where(fin_a, 0.0, eb), axis=1)
        q_on = np.sum(np.where(fin_a, eb, 0.0), axis=1)
        # -log q(S) = log1p(q off S / q on S): accurate also when q(S) is small
        kl = np.log1p(u) + np.log1p(q_off / q_on)
        # a divergence beyond float64's exponent range (logits ~1e30 apart) overflows the phi
        # sum: there the direct formula sum p (log p - log q) has no cancellation to fear
        over = ~qzero & ~np.isfinite(kl)
        if over.any():
            lq = lb[over] - mb[over, None] - np.log(zb[over])[:, None]
            fa = fin_a[over]
            direct = np.where(fa, p[over] * (np.where(fa, lp[over], 0.0) - np.where(fa, lq, 0.0)), 0.0)
            kl[over] = direct.sum(axis=1)
    kl = np.where(qzero, np.inf, np.maximum(kl, 0.0))
    return kl


def _row_stats_numpy(a, b, tok, reverse) -> RowStats:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n, v = a.shape
    status = np.zeros(n, np.int32)
    status |= np.where(np.isnan(a).any(1), NAN_REF, 0).astype(np.int32)
    status |= np.where((a == np.inf).any(1), PINF_REF, 0).astype(np.int32)
    status |= np.where(np.isnan(b).any(1), NAN_OTHER, 0).astype(np.int32)
    status |= np.where((b == np.inf).any(1), PINF_OTHER, 0).astype(np.int32)
    bad = status != 0
    status |= np.where(~bad & (a == -np.inf).all(1), EMPTY_REF, 0).astype(np.int32)
    status |= np.where(~bad & (b == -np.inf).all(1), EMPTY_OTHER, 0).astype(np.int32)
    ok = status == 0
    # rows that are not ok are replaced by zeros so that the arithmetic stays quiet
    a = np.where(ok[:, None], a, 0.0)
    b = np.where(ok[:, None], b, 0.0)
    ma = a.max(1)
    mb = b.max(1)
    with np.errstate(over="ignore"):  # rows spanning +-1.7e308: a - max a is -inf there (exp 0)
        za = np.exp(a - ma[:, None]).sum(1)
        zb = np.exp(b - mb[:, None]).sum(1)
    kl = _kl_rows(a, b, ma, mb, za, zb)
    rkl = _kl_rows(b, a, mb, ma, zb, za) if reverse else None
    top_a = np.where(ok, a.argmax(1), -1).astype(np.int32)
    top_b = np.where(ok, b.argmax(1), -1).astype(np.int32)
    logz = np.log(za)
    lpa = lpb = None
    if tok is not None:
        inrange = (tok >= 0) & (tok < v)
        status |= np.where(inrange, 0, BAD_TOKEN).astype(np.int32)
        t = np.where(inrange, tok, 0)
        rows = np.arange(n)
        lpa = np.where(inrange, a[rows, t] - ma - logz, np.nan)
        lpb = np.where(inrange, b[rows, t] - mb - np.log(zb), np.nan)
    return RowStats(kl, rkl, top_a, top_b, logz, lpa, lpb, status)


#: elements per block of rows in :func:`js_rows` (its temporaries: about 20 float64 arrays of a
#: block each, a few MB whatever the input size)
_JS_BLOCK = 1 << 17


def js_rows(a, b) -> np.ndarray:
    """Jensen-Shannon divergence (beta = 1/2, natural log) per row of two logits blocks, float64.

    JS = 1/2 KL(p||m) + 1/2 KL(q||m), m = (p + q)/2, in the cancellation-free algebra of kldiv's
    core (``kldiv.js_div``), so every row keeps full float64 relative accuracy down to the
    smallest JS (1e-25 and below: about 1e-15 relative against mpmath on the exact inputs, float32
    inputs taken exactly) with no clip: on the common support T of p and q, with d = log(q/p),
    y = log(m/p) = log((1 + e^d)/2) and z = log(m/q) = log((1 + e^-d)/2),

    .. math:: \\mathrm{JS} = \\tfrac12 \\sum_T \\big(p\\,\\varphi(y) + q\\,\\varphi(z)\\big)
              + \\tfrac12 \\log 2\\,\\big(p(\\bar T) + q(\\bar T)\\big),
              \\qquad \\varphi(x) = e^x - 1 - x \\ge 0,

    a sum of nonnegative terms. Per entry, ``p phi(y) + q phi(z) = p F(d)`` with
    ``F(d) = 2 e^(d/2) g(d/2)``, ``g(t) = t sinh t - cosh t log cosh t`` (a series in t^2 for
    |d| < 1/2), and ``= -(p y + q z)`` beyond (no cancellation to fear there). The log-ratio d is
    formed without rounding its small part away: the exact difference b - a (a two-sum) relative
    to a reference entry, centred by p's mean on T (d' = b - a - E_p[b - a]; constants cancel
    exactly, so offsets such as 1e30 on one side do no harm), then d = d' - log E_p[e^d'] +
    log q(T) - log p(T), with log E_p[e^d'] = log1p(E_p[phi(d')]) (a log-sum-exp of log p + d'
    when that is large). Rows with a finite logit beyond 1e300, or whose log-ratio is spread over
    more than 2^10 where p has mass (logits ~1e14 apart), are computed by kldiv's core. Edge
    cases: identical rows give exactly 0; disjoint supports give log 2; -inf logits are allowed
    (rows of nan, +inf or no finite logit are the caller's: ``row_stats`` flags them). Rows are
    done in blocks of about ``_JS_BLOCK`` elements (bounded temporaries, whatever the input size).

    >>> import numpy as np
    >>> a = np.array([[0.0, 1.0, 2.0], [0.0, -np.inf, 5.0]])
    >>> b = a + np.array([[0.0, 1e-9, 0.0], [0.0, 0.0, 0.0]])
    >>> v = js_rows(a, b)
    >>> f"{v[0]:.10e}"   # 50-digit mpmath on these inputs: 2.3104559643e-20 (textbook: ~1e-17 noise)
    '2.3104559643e-20'
    >>> float(v[1])      # identical rows, a -inf logit included
    0.0
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be 2-d arrays of the same shape, got {a.shape} and {b.shape}")
    n, v = a.shape
    out = np.empty(n, np.float64)
    step = max(1, _JS_BLOCK // max(v, 1))
    far = np.zeros(n, bool)
    with np.errstate(all="ignore"):
        for s in range(0, n, step):
            out[s:s + step], far[s:s + step] = _js_block(a[s:s + step], b[s:s + step])
        # rows with a finite logit beyond 1e300 (b - a could overflow) or far apart (see
        # _js_block): kldiv's core, which carries such log-ratios in quarters
        far |= np.where(np.isfinite(a), np.abs(a), 0).max(1, initial=0) > 1e300
        far |= np.where(np.isfinite(b), np.abs(b), 0).max(1, initial=0) > 1e300
    far = np.flatnonzero(far)
    if far.size:
        from .._core.divergence import divergence_rows

        out[far] = np.asarray(divergence_rows("js", np, a[far], b[far], "logits", "logits"))
    return out


_LOG2 = float(np.log(2.0))
#: g(t) = t sinh t - cosh t log cosh t = sum_k c_k t^(2k+2): c_10 ... c_0 (Horner order); 11
#: terms leave 6e-19 relative at |t| = 1/4 (the series converges for |t| < 1.7)
_G_COEF = [3.2738902589005246e-07, -9.805922567723855e-07, 2.998076279088023e-06,
           -9.40158597648677e-06, 3.0438460808004458e-05, -0.00010269694297472075,
           0.0003662367724867725, -0.001388888888888889, 0.006944444444444444, 0.0, 0.5]


def _w_phi(w, x, w_exp):
    """w phi(x) = w (e^x - 1 - x) with w e^x = w_exp given (no overflow, no cancellation)."""
    small = np.abs(x) < 0.5
    return np.where(small, w * _phi(np.where(small, x, 0.0)), w_exp - w * (1.0 + x))


def _js_block(a, b):
    """js_rows of one block (errors silenced by the caller), and the rows to redo in the core."""
    fmax = np.finfo(np.float64).max
    fa, fb = np.isfinite(a), np.isfinite(b)
    T = fa & fb
    rows = np.arange(a.shape[0])
    ma = np.max(np.where(fa, a, -np.inf), axis=1, keepdims=True)
    mb = np.max(np.where(fb, b, -np.inf), axis=1, keepdims=True)
    za = np.sum(np.exp(a - ma), axis=1, keepdims=True)
    zb = np.sum(np.exp(b - mb), axis=1, keepdims=True)
    p = np.exp(a - ma) / za
    q = np.exp(b - mb) / zb
    p_out = np.sum(np.where(fa & ~fb, p, 0.0), axis=1)
    q_out = np.sum(np.where(fb & ~fa, q, 0.0), axis=1)
    # b - a on T without rounding error: s + e (two-sum; rows where s could overflow are not
    # done here, see js_rows)
    a0, b0 = np.where(T, a, 0.0), np.where(T, b, 0.0)
    sd = b0 - a0
    zz = sd - b0
    e = (b0 - (sd - zz)) - (a0 + zz)
    e = np.where(np.isfinite(sd) & np.isfinite(e), e, 0.0)
    # relative to the reference entry k (p's largest on T): s - s_k is exact near k (Sterbenz)
    wT = np.where(T, p, 0.0)
    k = np.argmax(np.where(T, a, -np.inf), axis=1)
    o = sd[rows, k][:, None]
    delta = np.where(T, (sd - o) + e, 0.0)
    pT = np.sum(wT, axis=1, keepdims=True)
    empty = pT[:, 0] <= 0
    wn = wT / np.where(empty[:, None], 1.0, pT)
    wn = wn / np.where(empty[:, None], 1.0, np.sum(wn, axis=1, keepdims=True))
    mu = np.sum(wn * delta, axis=1, keepdims=True)
    # E_p|b - a - mu| beyond 2^10: mu's rounding (2^-52 of that) would reach the small
    # log-ratios; such rows (logits 1e14 and more apart where p has mass) go to the core
    far = np.sum(wn * np.abs(delta - mu), axis=1) > 1024.0
    dc = np.clip(delta - mu, -fmax, fmax)  # d' (0 off T)
    # log(wn_j e^{d'_j}) from q's side: (b_j - mb) + C, a cancelled exactly (adding a huge log p
    # of a -1e30 logit to a huge d' would leave noise)
    log_pT = np.where(p_out < 0.5, np.log1p(-p_out), np.log(pT[:, 0]))
    qT = np.sum(np.where(T, q, 0.0), axis=1)
    log_qT = np.where(q_out < 0.5, np.log1p(-q_out), np.log(qT))
    # C = mb - ma - o - mu - log za - log p(T), where mb - ma - o = (mb - b_k) - (ma - a_k) +
    # e_k exactly (o + e_k = b_k - a_k): no rounding at the logits' scale (offsets of 1e30)
    ak, bk = a[rows, k][:, None], b[rows, k][:, None]
    C = ((mb - bk) - (ma - ak) + e[rows, k][:, None]) - mu - np.log(za) - log_pT[:, None]
    lwx = np.where(T, (b - mb) + C, -np.inf)
    top = np.max(lwx, axis=1)
    huge = top > 20.0
    dsm = np.where(huge[:, None], 0.0, dc)  # (entries off T: d' = 0)
    L_small = np.log1p(np.sum(np.where(T, _w_phi(wn, dsm, np.exp(np.minimum(lwx, 30.0))), 0.0),
                              axis=1))
    topf = np.where(np.isfinite(top), top, 0.0)
    L_large = topf + np.log(np.sum(np.exp(lwx - topf[:, None]), axis=1))
    L = np.where(huge, L_large, L_small)
    d = np.clip(dc - (L + log_pT - log_qT)[:, None], -fmax, fmax)
    # per entry, 2 x its JS term = p phi(y) + q phi(z) = p F(d), F(d) = 2 e^t g(t) with t = d/2,
    # g(t) = t sinh t - cosh t log cosh t = t^2 G(t^2) (series below); where |d| >= 1/2 the
    # same is p log(p/m) + q log(q/m) = -(p y + q z), y = log(m/p), z = log(m/q) (no
    # cancellation to fear there: a factor 3 at |d| = 1/2)
    small = np.abs(d) < 0.5
    ts = np.where(small, 0.5 * d, 0.0)
    t2 = ts * ts
    G = np.full_like(t2, _G_COEF[0])
    for c in _G_COEF[1:]:
        G = G * t2 + c
    dl = np.where(small, 0.0, d)
    y = np.logaddexp(dl, 0.0) - _LOG2
    z = np.logaddexp(-dl, 0.0) - _LOG2
    term = np.where(small, p * (2.0 * np.exp(ts) * t2 * G), -(p * y + q * z))
    val = 0.5 * np.sum(np.where(T, term, 0.0), axis=1) + 0.5 * _LOG2 * (p_out + q_out)
    # p's mass on T is 0 (T empty, or p underflows there): every entry is log 2 times its mass
    # (p's off T, q's anywhere): 1/2 log 2 (p_out + q(T) + q_out)
    return np.where(empty, _LOG2 * 0.5 * (p_out + qT + q_out), val), far & ~empty
