"""Triton kernels for the fused KL family on CUDA tensors (CPU tensors in Triton's interpreter).

One program per row computes, for two rows ``x`` (p's logits or log-probabilities) and ``y``
(q's) at temperature T, the value KL(p || q) of p = softmax(x / T), q = softmax(y / T) and, in the
same launch, the gradients of ``s_r * KL_r`` (``s_r`` the row's scale: mask, weight, reduction)
with respect to x and y. The algebra is the C kernel's (``kldiv/_ext/fused.c``), which is the
core's cancellation-free algebra:

    d_i = ((y_i - x_i) + (max x - max y)) / T      both differences exact (TwoSum)
    d'_i = d_i - E_p[d]                            the centred log-ratio
    KL = log(1 + sum_i p_i phi(d'_i)) - log q(S),   phi(u) = e^u - 1 - u (series for |u| < 1/2)
    dKL/dx_i = -p_i d'_i / T
    dKL/dy_i = (q_i - p_i) / T = p_i expm1(d'_i - KL) / T     (no difference of two softmaxes)

S is p's support (entries above -inf) and q(S) q's mass on it. Each side is centred on its own
maximum before any exponential, and the log-ratio is formed from the exact difference of the raw
inputs plus the exact difference of the maxima, so a huge common offset (masking with -1e30 or
``finfo.min``, logits of 1e30) swallows nothing. The gradients' d'_i is taken against another
reference: the log-ratio minus its value at p's maximum (offset max x - y_r, y_r q's logit
there, exact), whose mean E_p[d - d_r] sums terms that vanish at p's maximum. Against q's
maximum the centring cancels where p's maximum holds nearly all the mass (d_top - E_p[d] = a
sum of the other entries' terms, 1e-6 of either), and where the mass lies far from q's maximum
(logits [2, -1, 1e37] against [0, -1, -200]: 2 - 1e37 and -1 - 1e37 are one float32 number, and
the O(1) gradient was lost). Inputs of float16, bfloat16 and float32 are
read in their own dtype and computed in float32; block sums are accumulated in float64; the
gradients are written in the input dtype.

Passes over a row (a row of up to 8192 entries is read once and kept in registers; longer rows
are loops over blocks of 4096, so any V works, odd V included): (1) one online pass for the
maxima, the normalisers, E_p[d], q's mass off S and the series sum (the value): each block is
read once, the sums so far are rescaled when a block raises a maximum (the log-ratio's offset
moves by the exact change of max x - max y) and the series' base follows the running mean of d
by an exact identity; (2) only when a gradient is wanted, the gradients.

Rows the float32 algebra cannot hold (a span of values beyond float32, an underflowed p_i
against a huge log-ratio, p's mass at a log-ratio clamped at 8.5e37: -1e30 / ``finfo.min``
masks where the other side has mass or a tiny p_i, logits near +-3e38, a V = 1 row of 3e38
against -3e38, [0, -120, 1] against [0, -1e7, 1]) are left by the float32 pass with the value
nan and nothing written to their gradients, and redone by a second launch of the same kernel,
the wide pass (``WIDE``: float64 arithmetic, no clamp: float32 inputs differ by at most 64 x 2
FLT_MAX at T >= 1/64, and a p_i that underflows float64 weighs nothing in a float32 result),
over all rows: each program reads its row's value and, where it is not nan, does nothing (no
load, no store; no host synchronisation, so ``validate=False`` and ``torch.compile`` get the
right rows too). Jeffreys' second direction accumulates into the first's gradients in both
passes. Rows that stay nan have no distribution (a nan or +inf entry, no support): the hook
hands them to the core when value checks are on (one host synchronisation, the core raises its
error); under ``torch.compile`` or ``validate=False`` they are nan, never a made-up number.
p_i > 0 = q_i somewhere gives +inf with zero gradients (the core's convention). Rows whose scale
is 0 (masked) give 0 and zero gradients whatever they hold. Probabilities (``p_space`` or
``q_space`` "probs") are read as their logarithm, taken in float64 and split into a float32 value
and its remainder, both entering the exact log-ratio. Their gradient (the core's: that of the
renormalised distribution r^(1/T) / sum r^(1/T), 0 where r_i = 0) is the one with respect to
log r divided by r, formed without the division: w_i / r_i = e^((1/T - 1) log r_i - max log r /
T) / Z in float64 (exact for an r_i whose w_i underflows in float32); p's side
-(w_i / r_i) (d_i - E_p[d]) / T, q's side (q_i / r_i)(1 - e^(KL - (d_i - E_p[d]))) / T by expm1.
With a probability side, d - E_p[d] (and JS's log m/p, log m/q and their means) are formed in
float64 from the exact log-ratio, so that a log-ratio that is a constant plus a small variation
(q's mass off p's support) keeps the variation.

The generalised Jensen-Shannon divergence (``kind="js"``, 0 < beta < 1) has its own kernel with
the core's JS algebra on top of the same first passes: log q/p on the common support T per entry
by the more accurate of two routes (the C kernel's): from the centred series
(d' + E_{p|T}[log q/p], exact near convergence) or per side ((y - max y) - (x - max x) + log Zx -
log Zy, where the first route's constants are huge: p's mass at a log-ratio of -1e37 against q's
mass elsewhere, which halved the value), y = log m/p and z = log m/q by log1p/expm1 forms, the
terms p phi(y) as m - p (1 + y) away from 0, and the gradients -beta/T p (y - E_p[y]) (and the
same for q) with y - E_p[y] taken relative to log beta where q << p, as
log1p(((1 - beta) / beta) q/p) - E_p[that] (full relative accuracy near JS's bound), and at p's
maximum (a single one) as y (1 - p_top) - sum_rest p y with 1 - p_top summed from the other
entries (where p_top is near 1 the plain difference cancels: 1e-2..6e-2 of the gradient
on saturated rows, 1e-3 at logits of std 8), and at the other entries as (y - y_top) + that
where this bounds the rounding better than y - E_p[y] (y constant on p's mass, the other side
masked at a finite logit such as finfo.min: exactly 0, where E_p[y]'s float32 rounding left
1e-9 against a row gradient of 0.05): three passes per row (statistics and series; the
value and the means for the gradients, the sums below p's and q's maxima included; the
gradients).
Jeffreys runs the KL kernel in both directions, the second accumulating into the gradients.

The op is registered with ``torch.library`` (``kldiv::triton_kl_rows``, with a fake
implementation and an autograd formula), so that ``torch.compile(fullgraph=True)`` traces
through it without graph breaks. Entry point for the torch hook: :func:`divergence`, which
answers ``NotImplemented`` for anything it does not take (the torch path then runs).

``KLDIV_BACKEND`` ("auto", the default, or "triton", or "torch") is read on every call:
"auto" takes this path for CUDA tensors when Triton imports; "triton" also sends CPU tensors
here when ``TRITON_INTERPRET=1`` is set (the testing mode); "torch" never takes it.
"""
from __future__ import annotations

import math
import os

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None

__all__ = ["available", "cpu_ready", "wanted", "wanted_device", "divergence", "kl_rows",
           "divergence_rows_with_grad"]

_KINDS = ("forward", "reverse", "jeffreys")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG_SPACES = ("logits", "log_probs")
_P_SPACES = ("logits", "log_probs", "probs")
#: temperatures this path takes (as the torch fast path); outside, the core decides
T_RANGE = (1.0 / 64.0, 64.0)

# float32 constants of the C kernel (fused.c): values beyond these leave the row to the core
_SPAN_MAX = 3.4028235677973366e38  # FLT_MAX (1 + 2^-25)
_D_CLAMP = 8.5e37  # |log-ratio| held below FLT_MAX / 4
_D_WIDE = 1e300  # the wide pass: no clamp (float32 inputs: |log-ratio| <= 64 * 2 FLT_MAX)
_D_RISK = 1048576.0  # |d| beyond this at an underflowed p_i: the row goes to the core
_EXP_FLOOR = 87.0


def available() -> bool:
    """Whether Triton imported (the kernels can run at all)."""
    return triton is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cpu_ready() -> bool:
    """Whether Triton's interpreter can run the kernels on CPU tensors in this process.

    ``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported (Triton decorates its
    own library functions then): set it at process start.
    """
    if triton is None or not _interpret():
        return False
    return type(getattr(tl, "sum", None)).__name__ == "InterpretedFunction"


def wanted(p, q) -> bool:
    """Whether the torch hook should try this path for ``p`` and ``q`` (read per call).

    ``KLDIV_BACKEND``: "auto" (default): CUDA tensors when Triton imports; "triton": also CPU
    tensors when ``TRITON_INTERPRET=1``; "torch" (or anything else): never.
    """
    if triton is None:
        return False
    mode = os.environ.get("KLDIV_BACKEND", "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton"):
        return False
    try:
        dev = p.device
        if q.device != dev:
            return False
    except AttributeError:
        return False
    if dev.type == "cuda":
        return True
    return mode == "triton" and dev.type == "cpu" and cpu_ready()


def wanted_device(device) -> bool:
    """:func:`wanted` for tensors on ``device`` (``linear_kl_div``'s chunks)."""
    if triton is None:
        return False
    mode = os.environ.get("KLDIV_BACKEND", "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton"):
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return True
    return mode == "triton" and dev.type == "cpu" and cpu_ready()


# ----------------------------------------------------------------------------------------------
# the kernel

# The kernel functions are decorated on first use (_build), not at import: Triton decides
# between compiling and interpreting (TRITON_INTERPRET) when it decorates, and a test session
# may import this module (doctest collection) before it sets the variable.
if True:

    def _phi_series_fn(u):
        # e^u - 1 - u = u^2 (1/2! + u/3! + ... + u^8/10!): below 3e-9 relative for |u| < 1/2
        acc = 2.755731922398589e-07
        acc = acc * u + 2.48015873015873e-05
        acc = acc * u + 1.984126984126984e-04
        acc = acc * u + 1.388888888888889e-03
        acc = acc * u + 8.333333333333333e-03
        acc = acc * u + 4.1666666666666664e-02
        acc = acc * u + 0.16666666666666666
        acc = acc * u + 0.5
        return acc * u * u

    def _ld1_fn(P, offs, V, PROB: tl.constexpr, FT: tl.constexpr):
        # one side of a block in float32 (-inf past V) and, for probabilities, the low part of
        # its logarithm: log p = hi + lo (hi the float32 rounding of the float64 log, lo the
        # rest), so that the exact log-ratio below sees log p to float64 accuracy
        inb = offs < V
        if PROB:
            raw = tl.load(P + offs, mask=inb, other=0.0).to(tl.float64)
            l64 = tl.log(raw)  # log 0 = -inf: no support
            hi = l64.to(FT)
            lo = tl.where(hi > float("-inf"), (l64 - hi.to(tl.float64)).to(FT), 0.0)
        else:
            hi = tl.load(P + offs, mask=inb, other=float("-inf")).to(FT)
            lo = 0.0  # a scalar: no second block of registers held across the passes
        return hi, lo

    def _ld_fn(X, Y, offs, V, x0, y0, xl0, yl0, SINGLE: tl.constexpr, XP: tl.constexpr,
               YP: tl.constexpr, FT: tl.constexpr):
        # a block of both inputs; SINGLE: the row was read once, whole (x0, y0, xl0, yl0)
        if SINGLE:
            x = x0
            y = y0
            xl = xl0
            yl = yl0
        else:
            x, xl = _ld1(X, offs, V, XP, FT)
            y, yl = _ld1(Y, offs, V, YP, FT)
        return x, y, xl, yl

    def _ld0_fn(X, Y, V, BLOCK: tl.constexpr, SINGLE: tl.constexpr, XP: tl.constexpr,
                YP: tl.constexpr, FT: tl.constexpr):
        # the whole row, read once, when it fits one block (every pass then works from it)
        if SINGLE:
            offs = tl.arange(0, BLOCK)
            x0, xl0 = _ld1(X, offs, V, XP, FT)
            y0, yl0 = _ld1(Y, offs, V, YP, FT)
        else:
            x0 = 0.0
            y0 = 0.0
            xl0 = 0.0
            yl0 = 0.0
        return x0, y0, xl0, yl0

    def _entry_fn(x, y, xl, yl, mx, my, Ch, Cl, it, DC: tl.constexpr):
        """A loaded block's exponentials and the exact log-ratio d (relative to mx, my)."""
        px = x > float("-inf")
        py = y > float("-inf")
        both = px & py
        a = (x - mx) * it
        ep = tl.exp(tl.where(px, a, float("-inf")))
        eq = tl.exp(tl.where(py, (y - my) * it, float("-inf")))
        # y - x = sv + er exactly (TwoSum), then + (max x - max y) = Ch + Cl
        xs = tl.where(both, x, 0.0)
        ys = tl.where(both, y, 0.0)
        sv = ys - xs
        bb = sv - ys
        er = (ys - (sv - bb)) + (-xs - bb)
        er = er + tl.where(both, yl - xl, 0.0)  # the low parts of logs of probabilities
        dd = ((sv + Ch) + (er + Cl)) * it
        dd = tl.minimum(tl.maximum(dd, -DC), DC)
        d = tl.where(both, dd, 0.0)
        return px, py, both, a, ep, eq, d

    def _lrr_fn(x, y, xl, yl, both, Rh, Rl, it, DC: tl.constexpr):
        """The exact log-ratio of _entry against another offset pair (Rh + Rl = max x - y_r,
        y_r q's logit at p's maximum), in float32: 0 at p's maximum (its low parts aside)."""
        xs = tl.where(both, x, 0.0)
        ys = tl.where(both, y, 0.0)
        sv = ys - xs
        bb = sv - ys
        er = (ys - (sv - bb)) + (-xs - bb)
        er = er + tl.where(both, yl - xl, 0.0)
        dd = ((sv + Rh) + (er + Rl)) * it
        dd = tl.minimum(tl.maximum(dd, -DC), DC)
        return tl.where(both, dd, 0.0)

    def _phi64_fn(u):
        # e^u - 1 - u in float64: series to u^17 for |u| < 1/2 (below 1e-19 relative)
        small = tl.abs(u) < 0.5
        us = tl.where(small, u, 0.0)
        acc = 1.0 / 355687428096000.0
        acc = acc * us + 1.0 / 20922789888000.0
        acc = acc * us + 1.0 / 1307674368000.0
        acc = acc * us + 1.0 / 87178291200.0
        acc = acc * us + 1.0 / 6227020800.0
        acc = acc * us + 1.0 / 479001600.0
        acc = acc * us + 1.0 / 39916800.0
        acc = acc * us + 1.0 / 3628800.0
        acc = acc * us + 1.0 / 362880.0
        acc = acc * us + 1.0 / 40320.0
        acc = acc * us + 1.0 / 5040.0
        acc = acc * us + 1.0 / 720.0
        acc = acc * us + 1.0 / 120.0
        acc = acc * us + 1.0 / 24.0
        acc = acc * us + 1.0 / 6.0
        acc = acc * us + 0.5
        ul = tl.where(small, 0.0, u)
        return tl.where(small, acc * us * us, tl.exp(ul) - 1.0 - ul)

    def _expm1_64_fn(u):
        # e^u - 1 in float64: u + phi(u) by the series for |u| < 1/2, else exp(u) - 1
        small = tl.abs(u) < 0.5
        return tl.where(small, u + _phi64(tl.where(small, u, 0.0)),
                        tl.exp(tl.where(small, 0.0, u)) - 1.0)

    def _d64_fn(x, y, xl, yl, both, Ch, Cl, it, DC: tl.constexpr):
        """d of _entry in float64, not rounded to float32: the centred log-ratio d - E_p[d] of
        the probability gradients keeps its small variation when d is a constant plus it (a
        constant from q's mass off p's support, or from maxima outside the common support)."""
        # y - x = sv + er exactly in float32 (TwoSum, as _entry), then each part added in
        # float64: sv + Ch is exact there (a huge common offset, logits of 1e30 against the
        # other side's maximum, cancels exactly), as is er + Cl
        xs = tl.where(both, x, 0.0)
        ys = tl.where(both, y, 0.0)
        sv = ys - xs
        bb = sv - ys
        er = (ys - (sv - bb)) + (-xs - bb)
        lo = tl.where(both, yl - xl, 0.0).to(tl.float64)
        d = ((sv.to(tl.float64) + Ch.to(tl.float64)) + (er.to(tl.float64) + Cl.to(tl.float64))
             + lo) * it.to(tl.float64)
        d = tl.minimum(tl.maximum(d, -DC), DC)
        return tl.where(both, d, 0.0)

    def _prob_factor_fn(v, vl, pv, mv, it, c):
        """c * w_i / r_i for a side read as probabilities r (log r = v + vl): w = r^(1/T),
        normalised, and w_i / r_i = e^((1/T - 1) log r_i - max log r / T) / Z (Z the side's
        normaliser, folded into c) in float64; 0 where r_i = 0. The gradient with respect to
        r_i is the one with respect to log r_i divided by r_i, formed without the division."""
        it64 = it.to(tl.float64)
        lv = tl.where(pv, v.to(tl.float64) + vl, 0.0)
        e = tl.exp((it64 - 1.0) * lv - mv.to(tl.float64) * it64)
        return tl.where(pv, c * e, 0.0)

    def _log_mass_fn(off, on_sum, total):
        # log of the mass on a support, 1 - off (off: the mass off it): log1p(-off) in float64
        # without libdevice, log(u) - ((u - 1) + off) / u with u = 1 - off, for off < 1/2;
        # else log(on_sum / total)
        small = off < 0.5
        o = tl.where(small, off, 0.0)
        u = 1.0 - o
        l1p = tl.where(u == 1.0, -o, tl.log(u) - ((u - 1.0) + o) / u)
        return tl.where(small, l1p, tl.log(tl.where(small, 1.0, on_sum / total)))

    def _stats_fn(X, Y, V, it, x0, y0, xl0, yl0, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
                  XP: tl.constexpr, YP: tl.constexpr, JSM: tl.constexpr, FT: tl.constexpr,
                  DC: tl.constexpr, WIDE: tl.constexpr):
        """One pass over a row: maxima, exact offset of the maxima, normalisers, sums, and the
        series A = sum_S e^a phi(d - m) around the mean m of d (the value's sum).

        Online: each block is read once; the sums so far are relative to the maxima and the
        mean seen so far. When a block raises the maxima the sums are rescaled (those of p's
        side by exp(old - new), those of q's side likewise; d moves with max x - max y, so
        S1 += shift * Zs and m += shift, which leaves u = d - m as it was). Before the block's
        series terms are added, m moves to the running mean including the block: entries added
        near the base (|u| < 1/2) keep A_s = sum e^a phi(u) through the exact identity
        sum w phi(u - delta) = e^-delta sum w phi(u) + phi(-delta) sum w + expm1(-delta) sum w u
        (float64) while |delta| <= 1, and become "far" entries beyond; far entries are kept as
        e^-m sum e^b - sum e^a (1 + u) (their terms are not near 0: no cancellation), with
        e^-m applied once at the end (its q-side sum scales with q's maximum, so a p-side
        maximum that jumps by 1e30 loses none of q's mass). Near convergence delta is tiny.
        With one block (rows up to the block size) m is the final mean from the start and this
        is the multi-pass algorithm. JSM: the mean is over
        p restricted to the common support (JS), else over p (KL); KL also sums
        S1r = sum e^a (d - d_r), the log-ratio against its value at p's maximum (offset
        Rh + Rl = max x - y_r, exact; moved like S1 when a block raises p's maximum), for the
        gradients' centring."""
        base = tl.arange(0, BLOCK)
        ninf = float("-inf")
        pinf = float("inf")
        it64 = it.to(tl.float64)
        mx = tl.full([1], ninf, FT)
        my = tl.full([1], ninf, FT)
        mxs = tl.zeros([1], FT)  # finite stand-ins of the maxima, used in the sums
        mys = tl.zeros([1], FT)
        Ch = tl.zeros([1], FT)
        Cl = tl.zeros([1], FT)
        # the gradients' reference (KL): the log-ratio against q's logit y_r at p's maximum,
        # Rh + Rl = max x - y_r exactly, and S1r = sum e^a (d - d_r)
        yr = tl.full([1], ninf, FT)
        Rh = tl.zeros([1], FT)
        Rl = tl.zeros([1], FT)
        S1r = tl.zeros([1], tl.float64)
        lx = tl.full([1], pinf, FT)
        ly = tl.full([1], pinf, FT)
        Zx = tl.zeros([1], tl.float64)
        Zy = tl.zeros([1], tl.float64)
        S1 = tl.zeros([1], tl.float64)
        ZqS = tl.zeros([1], tl.float64)
        Zqo = tl.zeros([1], tl.float64)
        ZpS = tl.zeros([1], tl.float64)
        Zpo = tl.zeros([1], tl.float64)
        # A = As - Lin + e^-m B. "Small" entries (|d - m| < 1/2 when added): As = sum e^a
        # phi(u), with Ls = sum e^a, Us = sum e^a u, Bs = sum e^b kept to move them; "large"
        # entries: Lin = sum e^a (1 + u), PL = sum e^a, B = sum e^b (u = d - m)
        As = tl.zeros([1], tl.float64)
        Ls = tl.zeros([1], tl.float64)
        Us = tl.zeros([1], tl.float64)
        Bs = tl.zeros([1], tl.float64)
        Lin = tl.zeros([1], tl.float64)
        PL = tl.zeros([1], tl.float64)
        B = tl.zeros([1], tl.float64)
        m = tl.zeros([1], tl.float64)  # the series' base (a float32 value, or one shifted)
        esc = tl.zeros([BLOCK], tl.int32)
        nans = tl.zeros([BLOCK], tl.int32)
        risk = tl.zeros([BLOCK], tl.int32)
        for b0 in range(0, V, BLOCK):
            offs = b0 + base
            x, y, xl, yl = _ld(X, Y, offs, V, x0, y0, xl0, yl0, SINGLE, XP, YP, FT)
            bmx = tl.max(x, 0)
            nmx = tl.maximum(mx, bmx)
            nmy = tl.maximum(my, tl.max(y, 0))
            lx = tl.minimum(lx, tl.min(tl.where(x > ninf, x, pinf), 0))
            ly = tl.minimum(ly, tl.min(tl.where(y > ninf, y, pinf), 0))
            # stand-ins keep every operation finite (no finite entry yet: the sums are 0;
            # +inf or nan: the row is nan anyway)
            nmxs = tl.where((nmx > ninf) & (nmx < pinf), nmx, 0.0)
            nmys = tl.where((nmy > ninf) & (nmy < pinf), nmy, 0.0)
            nCh = nmxs - nmys
            Cb = nCh - nmxs
            nCl = (nmxs - (nCh - Cb)) + (-nmys - Cb)
            # rescale the sums so far to the new maxima (exponents <= 0 for finite maxima)
            fx = tl.exp(tl.minimum((mxs.to(tl.float64) - nmxs.to(tl.float64)) * it64, 0.0))
            fy = tl.exp(tl.minimum((mys.to(tl.float64) - nmys.to(tl.float64)) * it64, 0.0))
            shift = ((nCh.to(tl.float64) - Ch.to(tl.float64))
                     + (nCl.to(tl.float64) - Cl.to(tl.float64))) * it64
            if JSM == 0:
                # a block that raises p's maximum brings the new reference y_r (the largest
                # y among its entries at that maximum; q's maximum stands in where y_r is not
                # finite: p_i > 0 = q_i, the row is +inf with zero gradients)
                ybr = tl.max(tl.where(x == nmx, y, ninf), 0)
                yr = tl.where(bmx > mx, ybr, yr)
                yrs = tl.where((yr > ninf) & (yr < pinf), yr, nmys)
                nRh = nmxs - yrs
                Rb = nRh - nmxs
                nRl = (nmxs - (nRh - Rb)) + (-yrs - Rb)
                rshift = ((nRh.to(tl.float64) - Rh.to(tl.float64))
                          + (nRl.to(tl.float64) - Rl.to(tl.float64))) * it64
                S1r = (S1r + rshift * ZpS) * fx
                Rh = nRh
                Rl = nRl
            S1 = (S1 + shift * ZpS) * fx
            m = m + shift  # e^-m B: B scales with q's side, e^-shift fy = fx
            As = As * fx
            Ls = Ls * fx
            Us = Us * fx
            Lin = Lin * fx
            PL = PL * fx
            Bs = Bs * fy
            B = B * fy
            Zx = Zx * fx
            ZpS = ZpS * fx
            Zpo = Zpo * fx
            Zy = Zy * fy
            ZqS = ZqS * fy
            Zqo = Zqo * fy
            mx = nmx
            my = nmy
            mxs = nmxs
            mys = nmys
            Ch = nCh
            Cl = nCl
            px, py, both, a, ep, eq, d = _entry(x, y, xl, yl, mxs, mys, Ch, Cl, it, DC)
            if XP or YP:
                # a probability side (its log to float64 accuracy): E_p[d] and the normalisers
                # summed in float64 within the block too, from the float64 log-ratio. Where the
                # log-ratio is a constant plus a small variation (q's mass off p's support,
                # renormalised probabilities), a float32 block sum would round the constant to
                # a visible error in the gradients' d - E_p[d]
                ep64 = ep.to(tl.float64)
                bZx = tl.sum(ep64, 0)
                bS1 = tl.sum(ep64 * _d64(x, y, xl, yl, both, Ch, Cl, it, DC), 0)
                bZpS = tl.sum(tl.where(both, ep64, 0.0), 0)
                if JSM == 0:
                    S1r += tl.sum(ep64 * _d64(x, y, xl, yl, both, Rh, Rl, it, DC), 0)
            else:
                bZx = tl.sum(ep, 0).to(tl.float64)
                bS1 = tl.sum(ep * d, 0).to(tl.float64)
                bZpS = tl.sum(tl.where(both, ep, 0.0), 0).to(tl.float64)
                if JSM == 0:
                    S1r += tl.sum(ep * _lrr(x, y, xl, yl, both, Rh, Rl, it, DC), 0).to(tl.float64)
            # the running mean with this block (rounded to float32: the base the terms use)
            if JSM:
                Zn = ZpS + bZpS
            else:
                Zn = Zx + bZx
            mn = ((S1 + bS1) / tl.where(Zn > 0.0, Zn, 1.0)).to(FT)
            mn64 = tl.where(Zn > 0.0, mn.to(tl.float64), m)
            dl = mn64 - m
            # move the base: u -> u - dl. Large entries: Lin -= dl PL (e^-m B is unchanged:
            # e^-dl e^-m = e^-m_new). Small ones, for |dl| <= 1: the identity above; further,
            # they become large ones (their terms no longer near 0: no cancellation)
            far = tl.abs(dl) > 1.0
            dls = tl.where(far, 0.0, dl)
            ph = _phi64(-dls)
            As_r = tl.exp(-dls) * As + ph * Ls + (ph - dls) * Us
            Lin = Lin - dl * PL + tl.where(far, Ls * (1.0 - dl) + Us, 0.0)
            PL = PL + tl.where(far, Ls, 0.0)
            B = B + tl.where(far, Bs, 0.0)
            Us = tl.where(far, 0.0, Us - dl * Ls)
            As = tl.where(far, 0.0, As_r)
            Ls = tl.where(far, 0.0, Ls)
            Bs = tl.where(far, 0.0, Bs)
            m = mn64
            mT = m.to(FT)
            # the block's series terms: e^a phi(d - m), as e^b e^-m - e^a (1 + d - m) away
            # from 0 (e^a e^(d - m) = e^b e^-m; e^-m applied once, at the end)
            dc = d - mT
            small = tl.abs(dc) < 0.5
            ser = _phi_series(tl.where(small, dc, 0.0))
            sm = both & small
            lg = both & (small == 0)
            As += tl.sum(tl.where(sm, ep * ser, 0.0), 0).to(tl.float64)
            Ls += tl.sum(tl.where(sm, ep, 0.0), 0).to(tl.float64)
            Us += tl.sum(tl.where(sm, ep * dc, 0.0), 0).to(tl.float64)
            Bs += tl.sum(tl.where(sm, eq, 0.0), 0).to(tl.float64)
            Lin += tl.sum(tl.where(lg, ep * (1.0 + dc), 0.0), 0).to(tl.float64)
            PL += tl.sum(tl.where(lg, ep, 0.0), 0).to(tl.float64)
            B += tl.sum(tl.where(lg, eq, 0.0), 0).to(tl.float64)
            if WIDE == 0:
                # float32: an underflowed p_i (or one at a clamped log-ratio) whose term may
                # matter; the wide pass (float64: p_i down to e^-745 against a log-ratio of at
                # most ~4e40) has no such entry that reaches a float32 result
                ad = tl.abs(d)
                rk = both & (ad > 1048576.0) & (a > -(87.0 + 250.0)) & ((a < -87.0) | (ad >= DC))
                risk = risk | rk.to(tl.int32)
            Zx += bZx
            S1 += bS1
            ZpS += bZpS
            if XP or YP:
                eq64 = eq.to(tl.float64)
                Zy += tl.sum(eq64, 0)
                ZqS += tl.sum(tl.where(both, eq64, 0.0), 0)
                Zqo += tl.sum(tl.where(px, 0.0, eq64), 0)
                Zpo += tl.sum(tl.where(py, 0.0, ep.to(tl.float64)), 0)
            else:
                Zy += tl.sum(eq, 0).to(tl.float64)
                ZqS += tl.sum(tl.where(both, eq, 0.0), 0).to(tl.float64)
                Zqo += tl.sum(tl.where(px, 0.0, eq), 0).to(tl.float64)
                Zpo += tl.sum(tl.where(py, 0.0, ep), 0).to(tl.float64)
            esc = esc | (px & (py == 0)).to(tl.int32)
            nans = nans | ((x != x) | (y != y)).to(tl.int32)
        escaped = tl.max(esc, 0) > 0
        rmax = tl.max(risk, 0)
        bad = (mx == ninf) | (my == ninf) | (mx == pinf) | (my == pinf) | (mx != mx) | (
            my != my) | (tl.max(nans, 0) > 0)
        hi = tl.maximum(mx, my).to(tl.float64)
        lo = tl.minimum(lx, ly).to(tl.float64)
        if WIDE == 0:  # a span beyond float32 (the wide pass holds any span of float32 inputs)
            bad = bad | ((hi - lo <= 3.4028235677973366e38) == 0)
        fin = (Zx == Zx) & (Zy == Zy) & (S1 == S1) & (Zx < pinf) & (Zy < pinf) & (
            tl.abs(S1) < pinf)
        bad = (bad.to(tl.int32) + (fin == 0).to(tl.int32)) > 0
        risky = rmax > 0  # an underflowed p_i against a huge log-ratio
        # e^-m overflows only where KL is beyond ~700: those rows take the direct formula
        A = (As - Lin) + tl.where(B > 0.0, tl.exp(tl.minimum(-m, 700.0)) * B, 0.0)
        return (bad, escaped, mxs, mys, Ch, Cl, Zx, Zy, S1, ZqS, Zqo, ZpS, Zpo, A, m, risky, Rh,
                Rl, S1r)

    def _kl_rows_kernel_fn(X, Y, S, ROWS, PREV, GX, GY, V, sx, sy, sgx, sgy, inv_t,
                           WANT_X: tl.constexpr, WANT_Y: tl.constexpr, ACC: tl.constexpr,
                           BLOCK: tl.constexpr, SINGLE: tl.constexpr, XP: tl.constexpr,
                           YP: tl.constexpr, FT: tl.constexpr, DC: tl.constexpr,
                           WIDE: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        X = X + r * sx
        Y = Y + r * sy
        if WIDE:
            # the wide pass: only the rows the float32 pass left nan (its value in ROWS); on
            # the others every loop is empty and nothing is read or written
            redo = tl.load(ROWS + r + tl.arange(0, 1))
            redo = redo != redo
            V = tl.sum(tl.where(redo, V, 0), 0)
        x0, y0, xl0, yl0 = _ld0(X, Y, V, BLOCK, SINGLE, XP, YP, FT)
        it = tl.cast(inv_t, FT)
        s = tl.load(S + r).to(tl.float64)
        # pass 1: statistics and the series
        st = _stats(X, Y, V, it, x0, y0, xl0, yl0, BLOCK, SINGLE, XP, YP, False, FT, DC, WIDE)
        bad, escaped, mx, my, Ch, Cl, Zx, Zy, S1, ZqS, Zqo, ZpS, Zpo, A, mb, risky, Rh, Rl, S1r = st
        base = tl.arange(0, BLOCK)
        Zx = tl.where(bad, 1.0, Zx)
        Zy = tl.where(bad, 1.0, Zy)
        S1 = tl.where(bad, 0.0, S1)
        ZqS = tl.where(bad, 1.0, ZqS)
        mu = S1 / Zx
        # the gradients' centred log-ratio d - E_p[d] is taken against the reference at p's
        # maximum (d_r = 0 there): E_p[d - d_r] = S1r / Zx has no cancellation where p's
        # maximum holds nearly all the mass, nor where max x - max y is huge against the
        # log-ratio's variation (see the module docstring)
        mur = tl.where(bad, 0.0, S1r) / Zx
        qo = Zqo / Zy
        log_qS = _log_mass(qo, ZqS, Zy)
        lc = -tl.log(Zx) - mu  # KL beyond ~57: the direct formula (no cancellation there)
        huge = lc > 57.0
        murT = mur.to(FT)
        bad = bad | risky
        acc = tl.where(bad | huge, 0.0, A / Zx)
        a1 = acc
        u1 = 1.0 + a1
        l1 = tl.log(u1) - ((u1 - 1.0) - a1) / u1
        l1 = tl.where(u1 == 1.0, a1, l1)
        kl = tl.where(huge, lc + tl.log(Zy), l1 - log_qS)
        kl = tl.maximum(kl, 0.0)
        zero_row = s == 0.0
        val = tl.where(escaped, float("inf"), kl)
        val = tl.where(bad, float("nan"), val)
        val = tl.where(zero_row, 0.0, val)
        if WIDE:
            tl.store(ROWS + r + tl.arange(0, 1), val, mask=redo)
        else:
            tl.store(ROWS + r + tl.arange(0, 1), val)
        if WANT_X or WANT_Y:
            # pass 3: the gradients of s KL (q - p from the series where it is used)
            E = tl.exp(-kl)
            km = -kl
            M = tl.where(kl < 1e-3, km * (1.0 + km * (0.5 + km * (1.0 / 6.0 + km / 24.0))),
                         E - 1.0)
            Ef = E.to(FT)
            Mf = M.to(FT)
            rq = (Zx / Zy).to(FT)
            ipg = (s * inv_t / Zx).to(FT)
            sx64 = s * it.to(tl.float64) / Zx  # probability sides: their gradients' row factors
            sy64 = s * it.to(tl.float64) / Zy
            zg = escaped | zero_row
            if ACC:
                # Jeffreys' second direction: a row already +inf (p escapes) has gradient 0
                zg = zg | (tl.load(PREV + r + tl.arange(0, 1)) == float("inf"))
            ng = bad & (zero_row == 0)
            GXr = GX + r * sgx
            GYr = GY + r * sgy
            if WIDE:
                Vg = V
            else:
                # a row left to the wide pass: nothing written (its inputs may be the gradient
                # buffer itself, and Jeffreys' first direction's gradients stay for it to add to)
                Vg = tl.sum(tl.where(ng, 0, V), 0)
            for b0 in range(0, Vg, BLOCK):
                offs = b0 + base
                inb = offs < V
                x, y, xl, yl = _ld(X, Y, offs, V, x0, y0, xl0, yl0, SINGLE, XP, YP, FT)
                px, py, both, a, ep, eq, d = _entry(x, y, xl, yl, mx, my, Ch, Cl, it, DC)
                if XP or YP:
                    # in float64, as its mean (at a side that holds all the mass the two agree
                    # exactly: its gradient is 0, not the rounding of a log-ratio)
                    dm = _d64(x, y, xl, yl, both, Rh, Rl, it, DC) - mur
                    dc = dm.to(FT)
                else:
                    dc = _lrr(x, y, xl, yl, both, Rh, Rl, it, DC) - murT
                small = tl.abs(dc) < 0.5
                ser = _phi_series(tl.where(small, dc, 0.0))
                pg = ep * ipg
                if WANT_Y:
                    if YP:
                        # with respect to q's probabilities r: (q_i - p_i) / (T r_i) =
                        # (q_i / r_i) (1 - p_i / q_i) / T, p_i / q_i = e^(KL - (d_i - E_p[d]))
                        # (expm1 in float64: no cancellation near convergence); 0 where r_i = 0
                        ry = _prob_factor(y, yl, py, my, it, sy64)
                        u = tl.minimum(kl - dm, 700.0)
                        h = tl.where(both, -_expm1_64(u), tl.where(py, 1.0, 0.0))
                        gy = (ry * h).to(FT)
                    else:
                        gy = tl.where(both & small, pg * ((dc + ser) * Ef + Mf),
                                      (eq * rq - ep) * ipg)
                    if ACC:
                        gy += tl.load(GYr + offs, mask=inb, other=0.0).to(FT)
                    gy = tl.where(zg, 0.0, gy)
                    gy = tl.where(ng, float("nan"), gy)
                    tl.store(GYr + offs, gy.to(GY.dtype.element_ty), mask=inb)
                if WANT_X:
                    if XP:
                        # with respect to p's probabilities r: -p_i (d_i - E_p[d]) / (T r_i),
                        # p_i / r_i = r_i^(1/T - 1) / sum_j r_j^(1/T) (no division by r_i)
                        rx = _prob_factor(x, xl, px, mx, it, sx64)
                        gx = tl.where(both, -rx * dm, 0.0).to(FT)
                    else:
                        gx = tl.where(both, -pg * dc, 0.0)
                    if ACC:
                        gx += tl.load(GXr + offs, mask=inb, other=0.0).to(FT)
                    gx = tl.where(zg, 0.0, gx)
                    gx = tl.where(ng, float("nan"), gx)
                    tl.store(GXr + offs, gx.to(GX.dtype.element_ty), mask=inb)


    # --- the generalised Jensen-Shannon divergence (the core's _rows "js" algebra)

    def _expm1_fn(u):
        # e^u - 1: u + phi(u) by the series for |u| < 1/2 (no cancellation), else exp(u) - 1
        small = tl.abs(u) < 0.5
        return tl.where(small, u + _phi_series(tl.where(small, u, 0.0)), tl.exp(u) - 1.0)

    def _log1p_fn(v):
        # log(1 + v), v > -1: 2 atanh(v / (2 + v)) by its series for |v| <= 1/2 (full relative
        # accuracy near 0 without relying on an accurate log near 1), else log(1 + v)
        small = tl.abs(v) <= 0.5
        vs = tl.where(small, v, 0.0)
        t = vs / (2.0 + vs)
        t2 = t * t
        acc = 1.0 / 17.0
        acc = acc * t2 + 1.0 / 15.0
        acc = acc * t2 + 1.0 / 13.0
        acc = acc * t2 + 1.0 / 11.0
        acc = acc * t2 + 1.0 / 9.0
        acc = acc * t2 + 1.0 / 7.0
        acc = acc * t2 + 1.0 / 5.0
        acc = acc * t2 + 1.0 / 3.0
        acc = acc * t2 + 1.0
        return tl.where(small, 2.0 * t * acc, tl.log(1.0 + tl.where(small, 0.0, v)))

    def _log_mix_fn(c, d, b):
        # log(b + c e^d), b = 1 - c passed (formed from beta: 1 - c has lost a tiny beta), for
        # every c in (0, 1) and d (the core's _log_mix): log1p(x), x = c (e^d - 1), while
        # x >= -1/2; below, the positive sum b + c e^d (1 + x lost b where e^d << b); where
        # c e^d > e, log(c e^d) + log1p(b e^-(d + log c)) (log c + d + log1p(...) cancelled
        # where c e^d << 1). c below 2^-60: c e^d as e^(d + log c) (e^d alone may overflow)
        lc = tl.log(c)
        big = d >= 1.0 - lc
        dn = tl.where(big, 0.0, d)
        neg = dn < -0.5
        pos = dn > 0.5
        x_mid = c * _expm1(tl.where(neg | pos, 0.0, dn))
        x_neg = c * (tl.exp(tl.where(neg, dn, 0.0)) - 1.0)
        dp = tl.where(pos, dn, 0.0)
        x_pos = tl.where(c >= 8.67361737988403547e-19, c * tl.exp(dp), tl.exp(dp + lc)) - c
        x = tl.where(neg, x_neg, tl.where(pos, x_pos, x_mid))
        m1 = x < -0.5
        small = _log1p(tl.where(m1, 0.0, x))
        summed = tl.log(b + c * tl.exp(tl.where(m1, dn, 0.0)))
        s = tl.where(big, d, 1.0 - lc) + lc
        large = s + _log1p(b * tl.exp(-s))
        return tl.where(big, large, tl.where(m1, summed, small))

    def _y_hat_fn(yv, lr, ry, lc):
        # log(m/p) - log c (lc = log c, formed by the caller: log(1 - beta) from beta itself):
        # log1p(ry e^lr) where lr <= -1 (exact), else the difference
        reg = lr <= -1.0
        return tl.where(reg, _log1p(ry * tl.exp(tl.where(reg, lr, 0.0))), yv - lc)

    def _js_lr_fn(x, y, xl, yl, both, d, a, mx, my, Ch, Cl, it, mu, muT, mean_d, lZx, lZy,
                  amu, XP: tl.constexpr, YP: tl.constexpr, DC: tl.constexpr):
        # log q/p on the common support by the more accurate of two routes (the C kernel's and
        # the core's): centred, (d - E_{p on T}[d]) + E_{p on T}[log q/p], exact near
        # convergence; or per side, (b - a) + (log Zx - log Zy) with each side against its own
        # maximum, where the first one's constants are huge (p's mass at a log-ratio of -3e38,
        # clamped, drags E[d] and the centred value of every other entry to noise). In float64
        # from the exact log-ratio when a side holds probabilities (mean_d is float64 then)
        if XP or YP:
            it64 = it.to(tl.float64)
            d64 = _d64(x, y, xl, yl, both, Ch, Cl, it, DC)
            lc = (d64 - mu) + mean_d
            xs = tl.where(both, x, mx).to(tl.float64)
            ys = tl.where(both, y, my).to(tl.float64)
            a64 = ((xs - mx.to(tl.float64)) + tl.where(both, xl, 0.0)) * it64
            b64 = ((ys - my.to(tl.float64)) + tl.where(both, yl, 0.0)) * it64
            ls = (b64 - a64) + (lZx - lZy)
            cen = (tl.abs(a64 - lZx) + tl.abs(b64 - lZy)) < (tl.abs(d64) + amu)
            lr = tl.where(cen, ls, lc)
        else:
            lc = (d - muT) + mean_d
            ac = tl.maximum(tl.where(both, a, 0.0), -DC * 1.1764705882352942)  # -1e38 (float32)
            bc = tl.maximum(tl.where(both, (y - my) * it, 0.0), -DC * 1.1764705882352942)
            ls = (bc - ac) + (lZx - lZy)
            cen = (tl.abs(ac - lZx) + tl.abs(bc - lZy)) < (tl.abs(d) + amu)
            lr = tl.where(cen, ls, lc)
        lr = tl.minimum(tl.maximum(lr, -DC), DC)
        return tl.where(both, lr, 0.0)

    def _js_rows_kernel_fn(X, Y, S, ROWS, GX, GY, V, sx, sy, sgx, sgy, inv_t, beta,
                           WANT_X: tl.constexpr, WANT_Y: tl.constexpr, BLOCK: tl.constexpr,
                           SINGLE: tl.constexpr, XP: tl.constexpr, YP: tl.constexpr,
                           FT: tl.constexpr, DC: tl.constexpr, WIDE: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        X = X + r * sx
        Y = Y + r * sy
        if WIDE:
            # the wide pass: only the rows the float32 pass left nan (its value in ROWS); on
            # the others every loop is empty and nothing is read or written
            redo = tl.load(ROWS + r + tl.arange(0, 1))
            redo = redo != redo
            V = tl.sum(tl.where(redo, V, 0), 0)
        x0, y0, xl0, yl0 = _ld0(X, Y, V, BLOCK, SINGLE, XP, YP, FT)
        it = tl.cast(inv_t, FT)
        bt = tl.cast(beta, FT)
        b64 = tl.cast(beta, tl.float64)
        s = tl.load(S + r).to(tl.float64)
        # pass 1: statistics and the series (the mean over p restricted to T)
        st = _stats(X, Y, V, it, x0, y0, xl0, yl0, BLOCK, SINGLE, XP, YP, True, FT, DC, WIDE)
        bad, escaped, mx, my, Ch, Cl, Zx, Zy, S1, ZqS, Zqo, ZpS, Zpo, A, mb, _, _, _, _ = st
        base = tl.arange(0, BLOCK)
        Zx = tl.where(bad, 1.0, Zx)
        Zy = tl.where(bad, 1.0, Zy)
        empty = ZpS == 0.0  # no common support: JS = its maximum
        S1 = tl.where(bad | empty, 0.0, S1)
        ZpS = tl.where(bad | empty, 1.0, ZpS)
        ZqS = tl.where(bad | empty, 1.0, ZqS)
        # masses off the common support T, and the logs of the masses on it
        pout = Zpo / Zx
        qout = Zqo / Zy
        log_pT = _log_mass(pout, ZpS, Zx)
        log_qT = _log_mass(qout, ZqS, Zy)
        # p restricted to T: its mean log-ratio, and L = log E[e^{d'}] by the series
        mu = S1 / ZpS
        lc = -tl.log(ZpS) - mu
        huge = lc > 57.0
        muT = tl.where(bad | empty, 0.0, mb).to(FT)  # the series' base (mu in float32)
        acc = tl.where(bad | huge | empty, 0.0, A / ZpS)
        u1 = 1.0 + acc
        L = tl.where(u1 == 1.0, acc, tl.log(u1) - ((u1 - 1.0) - acc) / u1)
        L = tl.where(huge, lc + tl.log(ZqS), L)
        # E_{p on T}[log q/p]. Probability sides (their logs to float64 accuracy): the log-ratio
        # and y, z below in float64, so that a log-ratio that is a constant (q's mass off p's
        # support, or p's off q's) plus a small variation keeps that variation in y - E_p[y]
        if XP or YP:
            mean_d = log_qT - log_pT - L
            bq = b64
        else:
            mean_d = (log_qT - log_pT - L).to(FT)
            bq = bt
        # the value, and E_p[log m/p], E_q[log m/q] for the gradients
        if XP or YP:  # (p and q in float64 too: their means' weights sum to 1 exactly)
            ip = 1.0 / Zx
            iq = 1.0 / Zy
        else:
            ip = (1.0 / Zx).to(FT)
            iq = (1.0 / Zy).to(FT)
        # the per-side route's constants (see _js_lr)
        if XP or YP:
            lZx = tl.log(Zx)
            lZy = tl.log(Zy)
            amu = tl.abs(mu) + tl.abs(mean_d)
        else:
            lZx = tl.log(Zx).to(FT)
            lZy = tl.log(Zy).to(FT)
            amu = (tl.abs(mu) + tl.abs(mean_d)).to(FT)
        cb = 1.0 - bq
        tp_s = tl.zeros([1], tl.float64)
        tq_s = tl.zeros([1], tl.float64)
        ey_s = tl.zeros([1], tl.float64)
        ez_s = tl.zeros([1], tl.float64)
        eyh_s = tl.zeros([1], tl.float64)
        ezh_s = tl.zeros([1], tl.float64)
        ry = cb / bq  # log m/p = log beta + log1p(ry q/p)
        rz = bq / cb  # log m/q = log(1 - beta) + log1p(rz p/q)
        lbq = tl.log(bq)
        # log(1 - beta) from beta (float32's 1 - beta is 1 for beta below 6e-8, and float64's
        # 1 - beta has lost a tiny beta's digits): z sits within beta of it
        l1b = _log1p(-b64)
        if XP or YP:
            l1bq = l1b
        else:
            l1bq = l1b.to(FT)
        # p's maximum: the number of entries there, and below it the mass and the sums of p y,
        # p (y - log beta) (likewise for q). At a single maximum, y - E_p[y] is taken as
        # y (1 - p_top) - sum_rest p y with 1 - p_top from the rest's own sum: where p_top is
        # near 1 the plain difference cancels (far rows: 1e-3 of the gradient at std-8 logits)
        ntx = tl.zeros([1], tl.int32)
        nty = tl.zeros([1], tl.int32)
        rp_s = tl.zeros([1], tl.float64)
        rq_s = tl.zeros([1], tl.float64)
        rpy_s = tl.zeros([1], tl.float64)
        rqz_s = tl.zeros([1], tl.float64)
        rph_s = tl.zeros([1], tl.float64)
        rqh_s = tl.zeros([1], tl.float64)
        # y and y - log beta at p's maximum (z, z - log(1 - beta) at q's), for the gradients
        ytv = tl.full([1], float("-inf"), tl.float64)
        yth = tl.full([1], float("-inf"), tl.float64)
        ztv = tl.full([1], float("-inf"), tl.float64)
        zth = tl.full([1], float("-inf"), tl.float64)
        for b0 in range(0, V, BLOCK):
            offs = b0 + base
            x, y, xl, yl = _ld(X, Y, offs, V, x0, y0, xl0, yl0, SINGLE, XP, YP, FT)
            px, py, both, a, ep, eq, d = _entry(x, y, xl, yl, mx, my, Ch, Cl, it, DC)
            lr = _js_lr(x, y, xl, yl, both, d, a, mx, my, Ch, Cl, it, mu, muT, mean_d, lZx, lZy,
                        amu, XP, YP, DC)  # log q/p
            p = ep * ip
            q = eq * iq
            m = bq * p + cb * q
            yv = _log_mix(cb, lr, bq)  # log m/p
            zv = _log_mix(bq, -lr, cb)  # log m/q
            sy_ = tl.abs(yv) < 0.5
            sz_ = tl.abs(zv) < 0.5
            tp = tl.where(sy_, p * _phi_series(tl.where(sy_, yv, 0.0)), m - p * (1.0 + yv))
            tq = tl.where(sz_, q * _phi_series(tl.where(sz_, zv, 0.0)), m - q * (1.0 + zv))
            tp_s += tl.sum(tl.where(both, tp, 0.0), 0).to(tl.float64)
            tq_s += tl.sum(tl.where(both, tq, 0.0), 0).to(tl.float64)
            ey_s += tl.sum(tl.where(both, p * yv, 0.0), 0).to(tl.float64)
            ez_s += tl.sum(tl.where(both, q * zv, 0.0), 0).to(tl.float64)
            # the same means relative to log beta (log(1 - beta)): exact where q << p (p << q)
            yh = _y_hat(yv, lr, ry, lbq)
            zh = _y_hat(zv, -lr, rz, l1bq)
            eyh_s += tl.sum(tl.where(both, p * yh, 0.0), 0).to(tl.float64)
            ezh_s += tl.sum(tl.where(both, q * zh, 0.0), 0).to(tl.float64)
            if WANT_X:
                xt = px & (x == mx)
                xr = px & (xt == 0)
                ntx += tl.sum(xt.to(tl.int32), 0)
                rp_s += tl.sum(tl.where(xr, p, 0.0), 0).to(tl.float64)
                rpy_s += tl.sum(tl.where(xr, p * tl.where(both, yv, lbq), 0.0), 0).to(tl.float64)
                rph_s += tl.sum(tl.where(xr & both, p * yh, 0.0), 0).to(tl.float64)
                ytv = tl.maximum(ytv, tl.max(tl.where(xt, tl.where(both, yv, lbq), float("-inf")),
                                             0).to(tl.float64))
                yth = tl.maximum(yth, tl.max(tl.where(xt, tl.where(both, yh, 0.0), float("-inf")),
                                             0).to(tl.float64))
            if WANT_Y:
                yt = py & (y == my)
                yr_ = py & (yt == 0)
                nty += tl.sum(yt.to(tl.int32), 0)
                rq_s += tl.sum(tl.where(yr_, q, 0.0), 0).to(tl.float64)
                rqz_s += tl.sum(tl.where(yr_, q * tl.where(both, zv, l1bq), 0.0), 0).to(tl.float64)
                rqh_s += tl.sum(tl.where(yr_ & both, q * zh, 0.0), 0).to(tl.float64)
                ztv = tl.maximum(ztv, tl.max(tl.where(yt, tl.where(both, zv, l1bq), float("-inf")),
                                             0).to(tl.float64))
                zth = tl.maximum(zth, tl.max(tl.where(yt, tl.where(both, zh, 0.0), float("-inf")),
                                             0).to(tl.float64))
        lb = tl.log(b64)
        js = b64 * tp_s + (1.0 - b64) * tq_s - b64 * lb * pout - (1.0 - b64) * l1b * qout
        js = tl.maximum(js, 0.0)
        zero_row = s == 0.0
        val = tl.where(bad, float("nan"), js)
        val = tl.where(zero_row, 0.0, val)
        if WIDE:
            tl.store(ROWS + r + tl.arange(0, 1), val, mask=redo)
        else:
            tl.store(ROWS + r + tl.arange(0, 1), val)
        if WANT_X or WANT_Y:
            # y - E_p[y] in two forms: directly, or as (y - log beta) - (E_p[y] - log beta)
            # where y is near log beta (q_i << p_i): no cancellation in either
            if XP or YP:
                Ey = ey_s + pout * lb
                Ez = ez_s + qout * l1b
                EyH = eyh_s
                EzH = ezh_s
                Rp = rp_s
                Rq = rq_s
                RPy = rpy_s
                RQz = rqz_s
                RPh = rph_s
                RQh = rqh_s
                Yt = ytv
                Yth = yth
                Zt = ztv
                Zth = zth
            else:
                Ey = (ey_s + pout * lb).to(FT)
                Ez = (ez_s + qout * l1b).to(FT)
                EyH = eyh_s.to(FT)
                EzH = ezh_s.to(FT)
                Rp = rp_s.to(FT)
                Rq = rq_s.to(FT)
                RPy = rpy_s.to(FT)
                RQz = rqz_s.to(FT)
                RPh = rph_s.to(FT)
                RQh = rqh_s.to(FT)
                Yt = ytv.to(FT)
                Yth = yth.to(FT)
                Zt = ztv.to(FT)
                Zth = zth.to(FT)
            # at a single maximum, y - E_p[y] also as (y - y_top) + (y_top - E_p[y]), the
            # latter y_top (1 - p_top) - sum_rest p y: taken per entry where it bounds the
            # rounding better (y constant on p's mass, as where q is masked at a finite logit:
            # exactly 0, not the rounding of E_p[y])
            Cy = Yt * Rp - RPy
            Cyh = Yth * Rp - RPh
            Cz = Zt * Rq - RQz
            Czh = Zth * Rq - RQh
            gpx64 = s * b64 * it.to(tl.float64)
            gpy64 = s * (1.0 - b64) * it.to(tl.float64)
            gpx = gpx64.to(FT)
            gpy = gpy64.to(FT)
            ng = bad & (zero_row == 0)
            GXr = GX + r * sgx
            GYr = GY + r * sgy
            if WIDE:
                Vg = V
            else:  # a row left to the wide pass: nothing written (see the KL kernel)
                Vg = tl.sum(tl.where(ng, 0, V), 0)
            for b0 in range(0, Vg, BLOCK):
                offs = b0 + base
                inb = offs < V
                x, y, xl, yl = _ld(X, Y, offs, V, x0, y0, xl0, yl0, SINGLE, XP, YP, FT)
                px, py, both, a, ep, eq, d = _entry(x, y, xl, yl, mx, my, Ch, Cl, it, DC)
                lr = _js_lr(x, y, xl, yl, both, d, a, mx, my, Ch, Cl, it, mu, muT, mean_d, lZx,
                            lZy, amu, XP, YP, DC)
                if WANT_X:
                    p = ep * ip
                    yv = _log_mix(cb, lr, bq)
                    yh = _y_hat(yv, lr, ry, lbq)
                    hf = lr <= -1.0
                    yc = tl.where(hf, yh - EyH, yv - Ey)
                    yn = tl.where(hf, (yh - Yth) + Cyh, (yv - Yt) + Cy)
                    eo = tl.where(hf, tl.abs(yh) + tl.abs(EyH), tl.abs(yv) + tl.abs(Ey))
                    en = tl.where(hf, tl.abs(yh - Yth) + tl.abs(Cyh), tl.abs(yv - Yt) + tl.abs(Cy))
                    yc = tl.where((ntx == 1) & (en < eo), yn, yc)
                    yc = tl.where(both, yc, -EyH)  # p_i > 0 = q_i: y = log beta
                    # at p's maximum (a single one): y (1 - p_top) - sum_rest p y
                    ycm = tl.where(hf, yh * Rp - RPh, yv * Rp - RPy)
                    ycm = tl.where(both, ycm, -RPh)
                    yc = tl.where((x == mx) & (ntx == 1), ycm, yc)
                    if XP:  # with respect to the probabilities: p_i / r_i in place of p_i
                        fx = _prob_factor(x, xl, px, mx, it, gpx64 / Zx)
                        gx = (-fx * yc.to(tl.float64)).to(FT)
                    else:
                        gx = tl.where(px, -gpx * p * yc, 0.0)
                    gx = tl.where(zero_row, 0.0, gx)
                    gx = tl.where(ng, float("nan"), gx)
                    tl.store(GXr + offs, gx.to(GX.dtype.element_ty), mask=inb)
                if WANT_Y:
                    q = eq * iq
                    zv = _log_mix(bq, -lr, cb)
                    zh = _y_hat(zv, -lr, rz, l1bq)
                    hf = lr >= 1.0
                    zc = tl.where(hf, zh - EzH, zv - Ez)
                    zn = tl.where(hf, (zh - Zth) + Czh, (zv - Zt) + Cz)
                    eo = tl.where(hf, tl.abs(zh) + tl.abs(EzH), tl.abs(zv) + tl.abs(Ez))
                    en = tl.where(hf, tl.abs(zh - Zth) + tl.abs(Czh), tl.abs(zv - Zt) + tl.abs(Cz))
                    zc = tl.where((nty == 1) & (en < eo), zn, zc)
                    zc = tl.where(both, zc, -EzH)
                    zcm = tl.where(hf, zh * Rq - RQh, zv * Rq - RQz)
                    zcm = tl.where(both, zcm, -RQh)
                    zc = tl.where((y == my) & (nty == 1), zcm, zc)
                    if YP:
                        fy = _prob_factor(y, yl, py, my, it, gpy64 / Zy)
                        gy = (-fy * zc.to(tl.float64)).to(FT)
                    else:
                        gy = tl.where(py, -gpy * q * zc, 0.0)
                    gy = tl.where(zero_row, 0.0, gy)
                    gy = tl.where(ng, float("nan"), gy)
                    tl.store(GYr + offs, gy.to(GY.dtype.element_ty), mask=inb)


_BUILT = None  # the interpreter setting the kernels were decorated under


def _build():
    """Decorate the kernel functions with triton.jit (again if TRITON_INTERPRET changed)."""
    global _BUILT, _phi_series, _entry, _stats, _kl_rows_kernel, _expm1, _log1p, _log_mix
    global _js_rows_kernel, _y_hat, _ld, _ld0, _ld1, _phi64, _log_mass, _expm1_64, _prob_factor
    global _d64, _js_lr, _lrr
    mode = _interpret()
    if _BUILT is not mode:
        _phi_series = triton.jit(_phi_series_fn)
        _expm1 = triton.jit(_expm1_fn)
        _log1p = triton.jit(_log1p_fn)
        _log_mix = triton.jit(_log_mix_fn)
        _y_hat = triton.jit(_y_hat_fn)
        _entry = triton.jit(_entry_fn)
        _ld = triton.jit(_ld_fn)
        _ld0 = triton.jit(_ld0_fn)
        _ld1 = triton.jit(_ld1_fn)
        _phi64 = triton.jit(_phi64_fn)
        _log_mass = triton.jit(_log_mass_fn)
        _expm1_64 = triton.jit(_expm1_64_fn)
        _prob_factor = triton.jit(_prob_factor_fn)
        _d64 = triton.jit(_d64_fn)
        _lrr = triton.jit(_lrr_fn)
        _js_lr = triton.jit(_js_lr_fn)
        _stats = triton.jit(_stats_fn)
        _js_rows_kernel = triton.jit(_js_rows_kernel_fn)
        _kl_rows_kernel = triton.jit(_kl_rows_kernel_fn)
        _BUILT = mode


def _passes(V):
    """The two passes' settings: the float32 pass, then the wide one (float64, rows the first
    left nan only; its blocks at most 1024 entries: float64 registers)."""
    b = _block(V)
    w = min(b, 1024)
    return (dict(BLOCK=b, SINGLE=V <= b, FT=tl.float32, DC=_D_CLAMP, WIDE=False,
                 num_warps=4 if b <= 2048 else 8),
            dict(BLOCK=w, SINGLE=V <= w, FT=tl.float64, DC=_D_WIDE, WIDE=True, num_warps=4))


def _launch_js(x, y, scale, inv_t, beta, rows, gx, gy, x_prob=False, y_prob=False):
    n, V = x.shape
    _build()
    for kw in _passes(V):
        _js_rows_kernel[(n,)](
            x, y, scale, rows, rows if gx is None else gx, rows if gy is None else gy, V,
            x.stride(0), y.stride(0), 0 if gx is None else gx.stride(0),
            0 if gy is None else gy.stride(0), float(inv_t), float(beta),
            WANT_X=gx is not None, WANT_Y=gy is not None, XP=bool(x_prob), YP=bool(y_prob),
            **kw)


def _block(V):
    """Block size: the whole row (read once) up to 8192 entries, else loops of 4096 (1024 in
    the interpreter, so that its tests exercise both the single-block and the looping code)."""
    b = 1 << max(4, (int(V) - 1).bit_length())
    if _interpret():
        return min(b, 1024)
    return b if b <= 8192 else 4096


def _launch(x, y, scale, inv_t, rows, gx, gy, acc, prev=None, x_prob=False, y_prob=False):
    """One launch over the rows of (n, V) x, y (unit stride along V); acc: add the gradients
    to gx, gy (zero on rows where ``prev``, the first direction's rows, is +inf)."""
    n, V = x.shape
    _build()
    dummy = rows
    for kw in _passes(V):
        _kl_rows_kernel[(n,)](
            x, y, scale, rows, rows if prev is None else prev, dummy if gx is None else gx,
            dummy if gy is None else gy, V,
            x.stride(0), y.stride(0), 0 if gx is None else gx.stride(0),
            0 if gy is None else gy.stride(0), float(inv_t),
            WANT_X=gx is not None, WANT_Y=gy is not None, ACC=bool(acc), XP=bool(x_prob),
            YP=bool(y_prob), **kw)


# ----------------------------------------------------------------------------------------------
# the op (torch.library): scaled rows and, in the same launch, their gradients

_MODES = {"forward": 0, "reverse": 1, "jeffreys": 2, "js": 3}
_MODE_KIND = ("forward", "reverse", "jeffreys", "js")


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rows_impl(x, y, scale, inv_t, mode, beta, need_x, need_y):
    # mode: the kind (0-3) + 4 * (x holds probabilities) + 8 * (y holds probabilities)
    xp_, yp_ = bool(mode & 4), bool(mode & 8)
    mode = mode & 3
    """Rows s_r KL_r (float64, (n,)) of (n, V) inputs and the gradients of their sum."""
    n, V = x.shape
    dev = x.device
    rows = torch.empty(n, dtype=torch.float64, device=dev)
    gx = torch.empty((n, V), dtype=x.dtype, device=dev) if need_x else None
    gy = torch.empty((n, V), dtype=y.dtype, device=dev) if need_y else None
    if n:
        # Triton launches on the current CUDA device: make it the inputs' one
        guard = torch.cuda.device(dev) if dev.type == "cuda" else _NullContext()
        with guard:
            if mode == 3:
                _launch_js(x, y, scale, inv_t, beta, rows, gx, gy, x_prob=xp_, y_prob=yp_)
            elif mode == 1:
                _launch(y, x, scale, inv_t, rows, gy, gx, False, x_prob=yp_, y_prob=xp_)
            else:
                _launch(x, y, scale, inv_t, rows, gx, gy, False, x_prob=xp_, y_prob=yp_)
                if mode == 2:
                    rows2 = torch.empty_like(rows)
                    _launch(y, x, scale, inv_t, rows2, gy, gx, True, rows, x_prob=yp_,
                            y_prob=xp_)
                    rows = rows + rows2
    rows = rows * scale  # 0 on masked rows (the kernel wrote 0 there)
    return rows, (gx if need_x else x.new_empty((0,))), (gy if need_y else y.new_empty((0,)))


def divergence_rows_with_grad(kind, p, q, *, p_space, q_space, temperature=1.0, beta=0.5,
                              need_grad_p=False, need_grad_q=True, grad_scale=None, out_q=None,
                              **kw):
    """``torch_fused.divergence_rows_with_grad``'s contract through the kernel (one launch).

    For ``linear_kl_div``'s chunks on the Triton path: rows (unscaled, 0 where ``grad_scale``
    is 0) in float32 and the gradient of ``sum_r grad_scale[r] * rows[r]`` with respect to
    ``q``, written into ``out_q`` when given (which may be ``q`` itself: each block is read
    before its gradient is written). What the kernel does not take (float64, a gradient with
    respect to ``p``, a temperature outside ``T_RANGE``, kind "jeffreys") goes to
    ``torch_fused``. Rows float32 cannot hold are redone by the wide pass (the float32 pass
    writes nothing there, so ``q`` is intact for it); rows without a distribution (a nan or
    +inf entry, no support) come back nan, gradients included: the caller recomputes them
    (``linear_kl_div`` does when value checks are on).
    """
    T = float(temperature)
    ok = (triton is not None and kind in ("forward", "reverse", "js") and not need_grad_p
          and p.dtype in _DTYPES and q.dtype in _DTYPES and p_space in _P_SPACES
          and q_space in _LOG_SPACES and T_RANGE[0] <= T <= T_RANGE[1] and p.dim() == 2
          and p.shape == q.shape and p.device == q.device
          and (kind != "js" or 0.0 < float(beta) < 1.0))
    if not ok:
        from . import torch_fused

        return torch_fused.divergence_rows_with_grad(
            kind, p, q, p_space=p_space, q_space=q_space, temperature=temperature, beta=beta,
            need_grad_p=need_grad_p, need_grad_q=need_grad_q, grad_scale=grad_scale,
            out_q=out_q, **kw)
    n, V = q.shape
    dev = q.device
    x = p if p.stride(-1) == 1 else p.contiguous()
    y = q if q.stride(-1) == 1 else q.contiguous()
    if grad_scale is None:
        scale = torch.ones(n, dtype=torch.float64, device=dev)
    else:
        scale = grad_scale.to(torch.float64)
    rows = torch.empty(n, dtype=torch.float64, device=dev)
    g = None
    if need_grad_q:
        direct = (out_q is not None and out_q.dtype == q.dtype and out_q.shape == q.shape
                  and out_q.stride(-1) == 1)
        g = out_q if direct else torch.empty((n, V), dtype=q.dtype, device=dev)
    prob = p_space == "probs"
    if n:
        guard = torch.cuda.device(dev) if dev.type == "cuda" else _NullContext()
        with guard:
            if kind == "js":
                _launch_js(x, y, scale, 1.0 / T, float(beta), rows, None, g, x_prob=prob)
            elif kind == "reverse":
                _launch(y, x, scale, 1.0 / T, rows, g, None, False, y_prob=prob)
            else:
                _launch(x, y, scale, 1.0 / T, rows, None, g, False, x_prob=prob)
    if g is not None and out_q is not None and g is not out_q:
        out_q.copy_(g)
        g = out_q
    return rows.to(torch.float32), None, g


_OP = None


def _register():
    """Register ``kldiv::triton_kl_rows`` (once): the kernel, its fake and its autograd."""
    global _OP
    if _OP is not None:
        return _OP

    @torch.library.custom_op("kldiv::triton_kl_rows", mutates_args=())
    def triton_kl_rows(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, inv_t: float,
                       mode: int, beta: float, need_x: bool, need_y: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _rows_impl(x, y, scale, inv_t, mode, beta, need_x, need_y)

    @triton_kl_rows.register_fake
    def _(x, y, scale, inv_t, mode, beta, need_x, need_y):
        n, V = x.shape
        rows = x.new_empty((n,), dtype=torch.float64)
        gx = x.new_empty((n, V)) if need_x else x.new_empty((0,))
        gy = y.new_empty((n, V)) if need_y else y.new_empty((0,))
        return rows, gx, gy

    def setup_context(ctx, inputs, output):
        x, y, scale, inv_t, mode, beta, need_x, need_y = inputs
        _, gx, gy = output
        ctx.inv_t = inv_t
        ctx.mode = mode
        ctx.beta = beta
        ctx.need = (need_x, need_y)
        ctx.save_for_backward(x, y, scale)
        ctx.grads = [gx, gy]  # handed over (scaled in place) by the first backward

    def backward(ctx, g_rows, _g_gx, _g_gy):
        x, y, scale = ctx.saved_tensors
        gx, gy = ctx.grads
        need_x = ctx.needs_input_grad[0]
        need_y = ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            # create_graph: the gradient itself is differentiated; recompute it from the
            # core's differentiable rows (exact higher derivatives, at the core's cost)
            return _backward_graph(x, y, scale, ctx.inv_t, ctx.mode, ctx.beta, g_rows, need_x,
                                   need_y)
        if getattr(ctx, "consumed", False):
            # a second backward (retain_graph): the saved gradients were scaled in place by
            # the first one; launch the kernel again for fresh ones
            _, gx, gy = _rows_impl(x, y, scale, ctx.inv_t, ctx.mode, ctx.beta, ctx.need[0],
                                   ctx.need[1])
        ctx.consumed = True
        ctx.grads = [None, None]
        # scaled in place (float32 arithmetic, one rounding to the input dtype): no N x V
        # temporary, and no host synchronisation to test whether g is 1
        g = g_rows.to(torch.float32)[:, None]
        dx = torch.mul(gx, g, out=gx) if (need_x and ctx.need[0]) else None
        dy = torch.mul(gy, g, out=gy) if (need_y and ctx.need[1]) else None
        return dx, dy, None, None, None, None, None, None

    triton_kl_rows.register_autograd(backward, setup_context=setup_context)
    _OP = triton_kl_rows
    return _OP


def _backward_graph(x, y, scale, inv_t, mode, beta, g_rows, need_x, need_y):
    """Gradients in differentiable torch operations (the core's rows), for create_graph."""
    from array_api_compat import torch as xp

    from .._core.divergence import divergence_rows

    keep = (scale != 0)[:, None]
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    xs = torch.where(keep, x.to(torch.float32), zero)
    ys = torch.where(keep, y.to(torch.float32), zero)
    sp = ("probs" if mode & 4 else "logits", "probs" if mode & 8 else "logits")
    if mode & 4:  # masked rows: a uniform stand-in that is a valid distribution
        xs = torch.where(keep, xs, torch.ones((), dtype=torch.float32, device=x.device))
    if mode & 8:
        ys = torch.where(keep, ys, torch.ones((), dtype=torch.float32, device=x.device))
    rows = divergence_rows(_MODE_KIND[mode & 3], xp, xs, ys, sp[0], sp[1], 1.0 / inv_t, beta)
    rows = torch.where(keep[:, 0], rows.to(scale.dtype) * scale, scale * 0)
    ins = [t for t, w in ((x, need_x), (y, need_y)) if w]
    gs = torch.autograd.grad(rows, ins, g_rows, create_graph=True, allow_unused=True)
    it = iter(gs)
    dx = next(it) if need_x else None
    dy = next(it) if need_y else None
    return dx, dy, None, None, None, None, None, None


def kl_rows(x, y, scale, temperature=1.0, kind="forward", beta=0.5, x_space="logits",
            y_space="logits"):
    """Scaled rows ``scale_r * D_r`` (float64) of two (n, V) log-space tensors, differentiable.

    ``D`` is KL(p || q) ("forward"), KL(q || p) ("reverse"), their sum ("jeffreys") or the
    generalised Jensen-Shannon divergence ``beta KL(p || m) + (1 - beta) KL(q || m)``,
    ``m = beta p + (1 - beta) q`` ("js", 0 < beta < 1) of p = softmax(x / T),
    q = softmax(y / T); the gradients are formed in the same launch as the
    value (and a wide pass redoes the rows float32 cannot hold). Rows without a distribution
    (a nan or +inf entry, no support) are nan (see the module docstring).

    On CPU tensors this runs in Triton's interpreter (``TRITON_INTERPRET=1``):

    >>> import os, torch, kldiv
    >>> from kldiv.backends import triton_kernels as tk
    >>> old = os.environ.get("TRITON_INTERPRET", "0"); os.environ["TRITON_INTERPRET"] = "1"
    >>> x = torch.tensor([[0.0, 1.0, 2.0]]); y = torch.tensor([[0.0, 1.0, 3.0]])
    >>> one = torch.ones(1, dtype=torch.float64)
    >>> kl = tk.kl_rows(x, y, one) if tk.cpu_ready() else kldiv.kl_div(  # without triton
    ...     x.double(), y.double(), p_space="logits", q_space="logits")
    >>> print(f"{float(kl[0]):.7f}")
    0.0969991
    >>> os.environ["TRITON_INTERPRET"] = old
    """
    if triton is None:
        raise RuntimeError("kldiv.backends.triton_kernels: triton is not installed "
                           "(pip install 'kldiv[gpu]')")
    op = _register()
    grad_on = torch.is_grad_enabled()
    need_x = grad_on and x.requires_grad
    need_y = grad_on and y.requires_grad
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    y2 = y if y.stride(-1) == 1 else y.contiguous()
    mode = _MODES[kind] + (4 if x_space == "probs" else 0) + (8 if y_space == "probs" else 0)
    rows, _, _ = op(x2, y2, scale, 1.0 / float(temperature), mode, float(beta), need_x, need_y)
    return rows


# ----------------------------------------------------------------------------------------------
# the hook's entry point


def _is_compiling():
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def divergence(kind, p, q, *, p_space, q_space, axis, reduction, mask, weight, temperature,
               t2_scale, validate, beta=0.5):
    """``kldiv.<kind>`` through the Triton kernel, or NotImplemented (the torch path runs).

    Taken: kinds "forward", "reverse", "jeffreys", "js" (0 < beta < 1); inputs in any space
    ("logits", "log_probs", "probs"; gradients with respect to any of them) of
    float16, bfloat16 or float32 on one device, same shape; any axis and reduction; a boolean
    mask and a weight without gradient (per-row scale); temperature in ``T_RANGE``. With value
    checks on (the default) one host synchronisation decides whether every row was taken (rows
    with nan, +inf, no support or unnormalised log-probabilities go to the core, which raises
    its error or computes them); under ``torch.compile`` or ``validate=False`` there is none.
    """
    if triton is None or kind not in _MODES:
        return NotImplemented
    if kind == "js":
        if type(beta) not in (int, float) or not 0.0 < float(beta) < 1.0:
            return NotImplemented
    if not (isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor)):
        return NotImplemented
    if type(p) not in (torch.Tensor, torch.nn.Parameter) or type(q) not in (
            torch.Tensor, torch.nn.Parameter):
        return NotImplemented
    if p_space not in _P_SPACES or q_space not in _P_SPACES:
        return NotImplemented
    if reduction not in ("none", "sum", "mean"):
        return NotImplemented
    if p.dtype not in _DTYPES or q.dtype not in _DTYPES:
        return NotImplemented
    if type(temperature) not in (int, float):
        return NotImplemented
    T = float(temperature)
    if not T_RANGE[0] <= T <= T_RANGE[1]:
        return NotImplemented
    shape = p.shape
    nd = len(shape)
    if q.shape != shape or nd == 0 or type(axis) is not int or not -nd <= axis < nd:
        return NotImplemented
    dev = p.device
    if q.device != dev or p.is_complex() or q.is_complex():
        return NotImplemented
    ax = axis % nd
    V = shape[ax]
    rows_shape = shape[:ax] + shape[ax + 1:]
    n = math.prod(rows_shape)
    if V == 0 or n == 0:
        return NotImplemented
    from .._core.validation import normalization_tolerance, validation_enabled

    compiling = _is_compiling()
    check = (not compiling) and validation_enabled(validate)
    keep = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.device != dev:
            return NotImplemented
        try:
            keep = torch.broadcast_to(mask, rows_shape).reshape(n)
        except RuntimeError:
            return NotImplemented
    w = None
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            return NotImplemented
        if weight.device != dev or (weight.requires_grad and torch.is_grad_enabled()):
            return NotImplemented
        try:
            w = torch.broadcast_to(weight.detach(), rows_shape).reshape(n).to(torch.float64)
        except RuntimeError:
            return NotImplemented
    # per-row scale: mask, weight, reduction, T^2
    f64 = torch.float64
    if w is not None:
        c = torch.where(w > 0, w, torch.zeros((), dtype=f64, device=dev))
        if keep is not None:
            c = torch.where(keep, c, torch.zeros((), dtype=f64, device=dev))
    elif keep is not None:
        c = keep.to(f64)
    else:
        c = None
    const = T * T if t2_scale else 1.0
    if reduction == "mean":
        if c is None:
            const = const / n
        else:
            den = c.sum()
            c = torch.where(den > 0, c / torch.where(den > 0, den, torch.ones_like(den)),
                            torch.zeros_like(c))
    if c is None:
        scale = torch.full((n,), const, dtype=f64, device=dev)
    else:
        scale = c * const if const != 1.0 else c
    pm = torch.movedim(p, ax, -1) if ax != nd - 1 else p
    qm = torch.movedim(q, ax, -1) if ax != nd - 1 else q
    x = pm.reshape(n, V)
    y = qm.reshape(n, V)
    rows = kl_rows(x, y, scale, T, kind, beta if kind == "js" else 0.5, p_space, q_space)
    out_dtype = torch.promote_types(torch.promote_types(p.dtype, q.dtype), torch.float32)
    if check:
        flags = [torch.isnan(rows)]
        if w is not None:
            wb = ~(w > 0) | (w == math.inf)
            flags.append(wb if keep is None else wb & keep)
        step = max(1, (1 << 22) // V)  # rows per chunk: no temporary beyond ~16 MB
        for side, space in ((x, p_space), (y, q_space)):
            if space == "log_probs":
                tol = normalization_tolerance(torch.finfo(side.dtype).eps, V)
                sd = side.detach()
                lse = torch.cat([torch.logsumexp(sd[i:i + step], -1).float()
                                 for i in range(0, n, step)])
                off = lse.abs() > tol
                flags.append(off if keep is None else off & keep)
            elif space == "probs":
                # non-negative, rows summing to 1 within the tolerance (the kernel renormalises,
                # as the core does); anything else goes to the core, which names the problem
                tol = normalization_tolerance(torch.finfo(side.dtype).eps, V)
                sd = side.detach()
                off = torch.cat([((sd[i:i + step].float().sum(-1) - 1.0).abs() > tol)
                                 | (sd[i:i + step] < 0).any(-1) for i in range(0, n, step)])
                flags.append(off if keep is None else off & keep)
        if bool(torch.stack([f.any() for f in flags]).any()):  # the one host synchronisation
            return NotImplemented
    if reduction == "none":
        return rows.reshape(rows_shape).to(out_dtype)
    return rows.sum().to(out_dtype)


if triton is not None:
    # registered at import, not on first use: a first call inside torch.compile must find the
    # op (Dynamo does not trace torch.library's registration)
    _register()
