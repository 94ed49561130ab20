"""JAX fast path: KL and reverse KL of log-space inputs in three fused passes, analytic gradients.

Registered as the ``"jax"`` *pre* hook of :mod:`kldiv._core.dispatch`: every public divergence
called with JAX arrays comes here first, eagerly or under ``jax.jit`` / ``grad`` / ``vmap``.

What it does
------------
- ``kl_div`` and ``reverse_kl`` of logits or log-probabilities (any mix, any temperature in
  ``[1e-3, 1e3]``) run :func:`kl_rows`: the core's accurate formula (the log-ratio centred by its
  p-weighted mean, ``KL = log1p(E_p[phi(d')]) + ...`` with ``phi(x) = e^x - 1 - x`` by its Taylor
  series near 0) in three passes over the data (row maxima; softmax sum and p-weighted mean of the
  log-ratio; the phi sum), written so that XLA fuses each pass. Its derivative is a
  ``jax.custom_jvp`` with the analytic rule (``dKL/da = -p (d - E_p d) / T``,
  ``dKL/db = (q - p) / T``, with d - E_p d refined by its residual E_p[d - mu], summed in the
  value's last pass, so that a peaked row's top entry keeps full relative accuracy; second
  derivatives anchored at p's mode) written in differentiable operations, so that reverse mode
  costs one elementwise pass more than the value, not the derivative of dozens of ``where``s,
  and ``jax.hessian`` stays exact.
- Every other case (JS, Jeffreys, probabilities, extreme temperatures) computes the core's rows
  (:func:`kldiv._core.divergence.divergence_rows`) on the validated arrays.
- Options that are off cost nothing: no mask, no weight, no temperature, no checks means no
  operations for them in the graph.

Invalid input under tracing
---------------------------
Value checks need values; under ``jax.jit`` (and ``grad``/``vmap`` tracing) there are none, and the
eager checks cannot run. Instead, with validation on (the default), every row that would fail a
check (nan, +inf, a row that is -inf everywhere, negative probabilities, rows not summing to 1,
log-probabilities not normalised, a negative or non-finite weight) makes its result **nan**
(``reduction="none"``: that row; "sum"/"mean": the result). A plausible finite number is never
returned for invalid input. Under :func:`checked` (``jax.experimental.checkify``) the same checks
raise errors with the eager path's messages. ``validate=False`` removes them from the graph.
"""
from __future__ import annotations

import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import checkify

from .._core import dispatch
from .._core.validation import (REDUCTIONS, check_floating, check_option,
                                normalization_tolerance, validation_enabled)
from .._core._xp import is_concrete, namespace
from .._core.divergence import _as_array, _compute_dtype, _finish, _prepare, divergence_rows
from .._core.reduction import broadcast_rows, reduce_rows

__all__ = ["kl_rows", "checked", "jax_divergence"]

# 1/n! for n = 2..17: phi(x) = sum_{n>=2} x^n / n!; float32 keeps n <= 8 (truncation below
# 2e-8 relative for |x| < 1/2), float64 all (below 1e-17)
_PHI_COEFS = [1.0 / math.factorial(n) for n in range(2, 18)]
_SMALL = 0.5  # |x| below which phi and expm1-based differences use the series / expm1 route
# above this, max_i log(zx p_i e^{d'_i}) is huge (KL in the tens or more): the row's terms are
# taken in the frame of y_top - _HUGE_G instead of mu (no overflow: they stay below e^60 times V)
_HUGE_G = 60.0
# row maxima farther apart than this: the side whose maximum is larger in magnitude is first
# shifted by the rounded difference of the maxima (exact on the entries near its maximum), so
# that the raw difference b - a is formed between sides at most ulp(mb - ma) apart; nearer rows
# take it unshifted (the error term eps^2 |mb - ma| of the two-term difference: 6e-11 in
# float32 at the bound)
_FAR = 2048.0
# the log-ratio's unit before the temperature (an exact power of 2): b - a of logits as large as
# finfo.max stays finite
_KK = 0.125
_T_RANGE = (1e-3, 1e3)  # temperatures handled by kl_rows; outside, the core's rows


# ----------------------------------------------------------------------------------------------
# the KL rows of log-space inputs


def _phi_series(x):
    coefs = _PHI_COEFS if jnp.finfo(x.dtype).bits > 32 else _PHI_COEFS[:7]
    acc = lax.add(lax.mul(x, _k(coefs[-1], x)), _k(coefs[-2], x))
    for c in reversed(coefs[:-2]):
        acc = lax.add(lax.mul(acc, x), _k(c, x))
    return lax.mul(lax.mul(acc, x), x)


def _expm1_small(x):
    """e^x - 1 for |x| <= 1/2 as x + phi(x) (the series: within 1e-7 relative in float32, a
    third of the error of XLA's expm1 on CPU, and a fraction of its time)."""
    return lax.add(x, _phi_series(x))


# The graph is written in lax primitives: every jnp function (jnp.where, clip, max, and the
# arithmetic operators of traced arrays, which call jnp.subtract, jnp.multiply, ...) is a nested
# jit, traced and inlined in every user's compilation (the bulk of kldiv's tracing time when
# it was written with operators). XLA's CPU backend hands the plain arithmetic (sub, max, exp,
# mul, reductions) to its fast YNNPACK kernels, while a compare or select keeps a loop in LLVM
# code: the per-entry selects are kept to the few that accuracy needs (the series near 0,
# escapes), everything else is row-level.


def _sel(pred, on_true, on_false, dtype=None):
    """``where`` in lax: ``pred`` and the arrays broadcast (numpy rules) to a common shape;
    a Python float operand is a constant of the other operand's dtype (or ``dtype``)."""
    dt = dtype or next(v.dtype for v in (on_true, on_false) if not isinstance(v, float))
    shape = np.broadcast_shapes(*(np.shape(v) for v in (pred, on_true, on_false)))

    def fit(v):
        if isinstance(v, float):
            return lax.full(shape, v, dt)
        if v.shape == shape:
            return v
        return lax.broadcast_in_dim(v, shape, tuple(range(len(shape) - v.ndim, len(shape))))

    return lax.select(fit(pred), fit(on_true), fit(on_false))


def _k(value, like):
    """A constant of ``like``'s dtype (lax takes no Python scalars of another precision)."""
    return np.asarray(value, like.dtype)


def _scale(x, c):
    """x times the Python float ``c`` (a power of 2 here: exact)."""
    return x if c == 1.0 else lax.mul(x, _k(c, x))


def _clamp_finite(x):
    fmax = float(jnp.finfo(x.dtype).max)
    return lax.clamp(_k(-fmax, x), x, _k(fmax, x))


def _col(x):
    """Row values (...,) as a column (..., 1) that broadcasts against the entries."""
    return lax.expand_dims(x, (x.ndim,))


def _uncol(x):
    return lax.squeeze(x, (x.ndim - 1,))


def _rowmax(x):
    return lax.reduce_max(x, (x.ndim - 1,))  # nan propagates


def _maxima(a, b):
    """Both sides' row maxima. Small inputs: one reduction over the two stacked (one kernel
    launch instead of two, the bulk of the time there); large ones: two (no stacked copy)."""
    if a.size <= _STACK_MAX:
        m = _rowmax(lax.concatenate([lax.expand_dims(a, (0,)), lax.expand_dims(b, (0,))], 0))
        return lax.index_in_dim(m, 0, keepdims=False), lax.index_in_dim(m, 1, keepdims=False)
    return _rowmax(a), _rowmax(b)


_STACK_MAX = 1 << 16


def _rowsum(x):
    return lax.reduce_sum(x, (x.ndim - 1,))


def _rowsums(*xs):
    """Row sums of several arrays of one shape: one reduction over the stacked arrays when small
    (one kernel launch instead of several), separate ones when large (no stacked copy)."""
    if xs[0].size > _STACK_MAX:
        return tuple(_rowsum(x) for x in xs)
    m = _rowsum(lax.concatenate([lax.expand_dims(x, (0,)) for x in xs], 0))
    return tuple(lax.index_in_dim(m, i, keepdims=False) for i in range(len(xs)))


def _frame(ma_raw, mb_raw, temperature):
    """Row constants: where each side's logits are taken from, per row (last axis kept).

    Returns ``ma`` (p's maximum), ``sa``, ``sb`` (what is subtracted from ``kk a`` and
    ``kk b`` before their difference, kk = _KK = 1/8), ``c``, ``ec`` (the difference of the
    maxima as they enter the log-ratio, kk mb - sb - (kk ma - sa), and its rounding error),
    ``yc`` (q's logits are ``b - yc`` in p's frame: mb) and ``y_top`` (the largest of them,
    after the temperature: 0). The log-ratio is formed in eighths on every row, so that b - a
    cannot overflow next to an entry at -finfo.max and a log-ratio beyond the float range
    (float32 rows holding +-3e38) is carried; the scaling is exact (short of subnormal
    results, which XLA on CPU flushes: an absolute error below 8 finfo.tiny in d, where the
    KL and its derivatives are themselves at the subnormal level), and one constant for every
    row costs no row-level test. The shifts:

    - maxima within _FAR: none (sa = sb = 0; c = kk (mb - ma) with its rounding error);
    - farther apart: the side whose maximum is larger in magnitude, by the rounded difference
      of the maxima (sb = fl(kk mb - kk ma) where |mb| >= |ma|, else sa = fl(kk ma - kk mb));
      then kk mb - sb (kk ma - sa) is exact (Dekker's Fast2Sum) and so is c, at most
      ulp(mb - ma) / 2: the sides are brought together without a rounding on the entries near
      the shifted side's maximum (b - sb is exact wherever it is not larger than b), and the
      two-term difference of :func:`_entries` holds its accuracy at any offset.

    A maximum that is not finite (nan, +inf, or a row that is -inf everywhere) makes its row
    nan, as it must be.
    """
    ma = _col(ma_raw)
    mb = _col(mb_raw)
    kk = _k(_KK, ma)
    mas, mbs = lax.mul(ma, kk), lax.mul(mb, kk)
    o = lax.sub(mbs, mas)
    far = lax.gt(lax.abs(o), _k(_FAR * _KK, ma))
    shift_b = lax.ge(lax.abs(mbs), lax.abs(mas))
    zero = lax.full_like(ma, 0.0)
    sa = lax.select(far, lax.select(shift_b, zero, lax.neg(o)), zero)
    sb = lax.select(far, lax.select(shift_b, o, zero), zero)
    ta, tb = lax.sub(mas, sa), lax.sub(mbs, sb)
    c = lax.sub(tb, ta)
    ec = _two_diff_err(tb, ta, c)
    y_top = lax.sub(mb, mb)  # 0 (nan on rows that are nan anyway)
    return ma, sa, sb, (c, ec), mb, y_top


def _units(temperature):
    """The log-ratio's unit, k = _KK kt (a power of 2; kt <= T below T = 1, where d / T could
    leave the float range, else 1), and 1 / k: Python floats, the same on every row."""
    kt = 2.0 ** math.floor(math.log2(temperature)) if temperature < 1.0 else 1.0
    return _KK * kt, 1.0 / (_KK * kt)


def _two_diff_err(x, y, s):
    """The exact rounding error of ``s = x - y`` (Knuth's TwoSum: x - y = s + err exactly, when
    nothing overflows; nan where s is not finite)."""
    bv = lax.sub(s, x)
    av = lax.sub(s, bv)
    return lax.sub(lax.sub(x, av), lax.add(y, bv))


def _entries(a, b, temperature, ma, sa, sb, sc, yc):
    """Per entry: x = (a - ma) / T (p's logits centred; -inf off p's support), the log-ratio
    d up to a row constant (finite everywhere: -inf entries are taken at -finfo.max, and an
    entry where p is 0 contributes nothing through it) and y = (b - yc) / T with x + d = y in
    exact arithmetic (q's logits in p's frame; -inf off q's support), so that log(p_i e^{d'_i})
    is formed from y without adding a huge log p to a huge d.

    d = (b - a) - (mb - ma) as a two-term difference: s = b - a and c = mb - ma each with its
    exact rounding error (Knuth's TwoSum), d = (s - c) + (e_s - e_c): exact to a rounding of d
    and eps^2 |mb - ma| absolute. A plain float32 b - a rounds at the ulp of an offset between
    the sides (teacher log-probs against student logits: the 1e-4 signal of a close row rounded
    at ulp(8) = 1e-6, a 3e-3 relative error in KL ~ 1e-9). Rows whose maxima are more than
    _FAR apart shift one side first (:func:`_frame`).

    d comes in units of k (:func:`_units`: d = k (b - a) / T + const, k = 1/8 at T >= 1), so
    that it stays within the float range where the true log-ratio does not (huge rows,
    finfo.min entries at T < 1)."""
    fmax = float(jnp.finfo(a.dtype).max)
    lo = _k(-fmax, a)
    c, ec = sc
    x = lax.sub(a, ma)
    y = lax.sub(b, yc)
    kk = _k(_KK, a)
    ac = lax.max(lax.sub(lax.mul(a, kk), sa), lo)
    bc = lax.max(lax.sub(lax.mul(b, kk), sb), lo)
    s = lax.sub(bc, ac)
    d = lax.add(lax.sub(s, c), lax.sub(_two_diff_err(bc, ac, s), ec))
    if temperature != 1.0:  # after the difference: (b - a) / T keeps the accuracy of b - a
        t = _k(temperature, a)
        x = lax.div(x, t)
        if temperature < 1.0:  # kt / T <= 1: within the float range (exact power of 2)
            d = lax.mul(d, _k(2.0 ** math.floor(math.log2(temperature)), a))
        d = lax.div(d, t)
        y = lax.div(y, t)
    return x, d, y


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _kl_parts(a, b, temperature, refine):
    """(KL, ma, mb, zx, mu, zq) per row: the value in three passes over the data (the row
    maxima; p's normaliser and the p-weighted sum of the log-ratio; one sum of non-negative
    terms), and the row values that the derivative uses: ``zx = sum e^x`` (p_i = e^{x_i} / zx),
    ``mu = E_p[d]`` (as computed: sum e^x d / zx) and ``zq``, q's normaliser in the frame of
    ``y - base`` (q_i = e^{y_i - base} / zq). With ``refine`` (the derivative rule's call) also
    ``res = sum e^x (d - mu)``, mu's rounding error times zx, summed in the third pass alongside
    the value's terms (one reduction over both when small). No logarithm or exponential of a
    row value before the last pass: on XLA's CPU backend each one would be a kernel launch of
    its own, the bulk of the time at small sizes."""
    fmax = float(jnp.finfo(a.dtype).max)
    # pass 1: the row maxima (nan propagates)
    ma_raw, mb_raw = _maxima(a, b)
    ma, sa, sb, sc, yc, y_top = _frame(ma_raw, mb_raw, temperature)
    x, d, y = _entries(a, b, temperature, ma, sa, sb, sc, yc)
    k, ik = _units(temperature)
    # pass 2: p's normaliser and the p-weighted sum of the log-ratio
    ex = lax.exp(x)
    zx = _rowsum(ex)
    sxd = _rowsum(lax.mul(ex, d))
    # pass 3, one sum: e^KL = E_p[e^{d'}] = 1 + E_p[phi(d')] + (q's mass off p's support)
    # e^{KL}, d' = d - mu, all terms >= 0, so KL = log1p(sum), the sum formed as zx times it
    # (terms e^{x_i} phi(d'_i), and e^{y_i - mu} where p_i = 0). Where some p_i e^{d'_i} is
    # huge (KL in the tens or more) the terms are e^{y_i - base} instead, base = mu + delta
    # (delta > 0: no term above e^_HUGE_G), and KL = delta + log(sum / zx) (mu may be ~1e30
    # there: no sum that cancels it). Both as one formula: s = 1 on ordinary rows and 0 on
    # huge ones multiplies the phi part, KL = delta + log1p(sum / zx - (1 - s)).
    mu = lax.div(_col(sxd), _col(zx))  # in units of k
    base, delta, s = _route(y_top, _scale(mu, ik))
    # (an identity: it keeps XLA from sharing e^{y - base} below with the derivative rule's
    # own, which it would otherwise store as an N x V array in a kernel of its own between the
    # two; each is computed where it is used: one kernel and one N x V array less under
    # value_and_grad, and about 10% less compile time)
    base, delta, s = lax.optimization_barrier((base, delta, s))
    dck = _clamp_finite(lax.sub(d, mu))  # d' in units of k
    dc = _scale(dck, ik)  # d' (beyond the float range on some huge rows: not used there)
    e = lax.exp(lax.sub(y, base))  # zx p_i e^{d'_i}; where p_i = 0, zx times q's mass there
    exs = lax.mul(ex, s)
    # e^{x_i} (e^{d'_i} - 1 - d'_i), the last product in units of k (finite where e^{x_i} d'_i
    # is, also where d'_i is not: a finfo.min entry of q where p holds 1e-40)
    term = _sel(lax.lt(lax.abs(dc), _k(_SMALL, dc)), lax.mul(exs, _phi_series(dc)),
                lax.sub(lax.sub(e, exs), _scale(lax.mul(exs, dck), ik)))
    # p_i > 0 = q_i (a logit of -inf in q only): the row escapes, KL = +inf
    escape = lax.bitwise_and(lax.gt(a, _k(-math.inf, a)), lax.eq(b, _k(-math.inf, b)))
    term = _sel(escape, math.inf, term)
    # a row whose maximum is not finite (a nan, a +inf, or -inf everywhere: no distribution)
    # is nan already: x = a - ma (or, for q, y = b - mb) is nan at its maximum
    if refine:
        total, res = _rowsums(term, lax.mul(ex, dck))
    else:
        total = _rowsum(term)
    s = _uncol(s)
    kl = lax.add(_uncol(delta), lax.log1p(lax.sub(lax.div(total, zx), lax.sub(_k(1.0, s), s))))
    # KL >= 0 (a rounding residue below 0 is the exact 0, a nan stays); a value that reached
    # finfo.max went through a clamp: it overflows, as IEEE arithmetic would (the core's rules)
    kl = _sel(lax.ge(kl, _k(fmax, kl)), math.inf, lax.max(kl, _k(0.0, kl)))
    zq = lax.add(total, lax.mul(zx, s))  # sum of e^{y_i - base}: q's normaliser in that frame
    if refine:
        return kl, ma_raw, mb_raw, zx, _uncol(mu), zq, res
    return kl, ma_raw, mb_raw, zx, _uncol(mu), zq


def _route(y_top, mu):
    """Row constants: the frame ``base`` of e^{y - base} (mu; y_top - _HUGE_G where that is
    above mu, so that no term exceeds e^_HUGE_G), ``delta = base - mu`` (0 on ordinary rows,
    > 0 on huge ones) and ``s`` (1 on ordinary rows, 0 on huge ones)."""
    base = lax.max(mu, lax.sub(y_top, _k(_HUGE_G, mu)))
    delta = lax.sub(base, mu)
    return base, delta, _sel(lax.gt(delta, _k(0.0, mu)), 0.0, 1.0, mu.dtype)


def _is_zero(t):
    return isinstance(t, SymbolicZero)


@jax.custom_jvp
def _centred(x, d, mu, rz):
    """The centred log-ratio d' = d - E_p[d] (p = softmax(x)) as (d - mu) - rz: ``mu`` the
    p-weighted mean of ``d`` as the value computed it, ``rz = E_p[d - mu]`` its residual (a
    rounding error of mu, which at a peaked row's mode k is larger than d'_k itself; d_k - mu is
    exact there, so the refined d'_k keeps full relative accuracy)."""
    return _clamp_finite(lax.sub(_clamp_finite(lax.sub(d, mu)), rz))


@_centred.defjvp
def _centred_jvp(primals, tangents):
    """d(d'_i) = e_i - E_p[e] - E_p[dx d'], e = dd - dd_k anchored at p's mode k (mu and rz are
    functions of x and d: their tangents are not used). Anchored, the tangent at k is a sum of
    small terms p_j (dd_j - dd_k), not dd_k - E_p[dd], a difference of two numbers of order one
    that leaves 1 - p_k to rounding (second derivatives of a peaked row). Only differentiation
    of the derivative (``jax.hessian``) evaluates this."""
    x, d, mu, rz = primals
    dx, dd = tangents[0], tangents[1]
    out = _centred(x, d, mu, rz)
    m = _col(_rowmax(x))
    ex = lax.exp(lax.sub(x, m))
    p = lax.div(ex, _col(_rowsum(ex)))
    top = lax.eq(x, m)
    ddk = lax.div(_rowsum(_sel(top, dd, 0.0)), _rowsum(_sel(top, 1.0, 0.0, dd.dtype)))
    e = lax.sub(dd, _col(ddk))
    t = lax.sub(e, _col(_rowsum(lax.mul(p, lax.add(e, lax.mul(dx, out))))))
    return out, t


@jax.custom_jvp
def _normalised(z, rzs):
    """e^z / zs given ``rzs = 1 / zs``, a softmax of ``z`` per row when ``zs = sum e^z`` (so it
    is called). (XLA forms e^z / zs as e^z times the reciprocal anyway.)"""
    return lax.mul(lax.exp(z), rzs)


@_normalised.defjvp
def _normalised_jvp(primals, tangents):
    """The softmax's tangent w (e - E_w[e]), e = dz - dz_k anchored at the row's mode k: at a
    peaked row's mode the bracket is a sum of small terms w_j (dz_j - dz_k), not dz_k - E_w[dz]
    (1 - w_k left to rounding: float32 Hessians of a peaked row were wrong in the order of the
    small entries). Only second derivatives evaluate this."""
    z, zs = primals
    dz = tangents[0]
    w = _normalised(z, zs)
    top = lax.eq(z, _col(_rowmax(z)))
    dzk = lax.div(_rowsum(_sel(top, dz, 0.0)), _rowsum(_sel(top, 1.0, 0.0, dz.dtype)))
    e = lax.sub(dz, _col(dzk))
    return w, lax.mul(w, lax.sub(e, _col(_rowsum(lax.mul(w, e)))))


def _kl_parts_jvp(temperature, refine, primals, tangents):
    """The analytic derivative, in differentiable operations (``jax.hessian`` is exact): the row
    sums come from ``_kl_parts`` itself, whose own derivative is this rule."""
    a, b = primals
    da, db = tangents
    full = _kl_parts(a, b, temperature, True)
    kl, ma_raw, mb_raw, zx, mu, zq, res = full
    out = full if refine else full[:6]
    ma, sa, sb, sc, yc, y_top = _frame(ma_raw, mb_raw, temperature)
    x, d, y = _entries(a, b, temperature, ma, sa, sb, sc, yc)
    k, ik = _units(temperature)
    zx_, kl_ = _col(zx), _col(kl)
    mu = _col(mu)  # E_p[d], in units of k as d
    base, delta, _ = _route(y_top, _scale(mu, ik))
    huge = lax.gt(delta, _k(0.0, delta))
    # the value's own expressions (XLA computes them once)
    ex = lax.exp(x)
    # the reciprocals of both normalisers in one row-level kernel (XLA gives each division of
    # a row value a kernel of its own)
    rec = lax.div(_k(1.0, zx_), lax.concatenate([zx_, _col(zq)], zx_.ndim - 1))
    rzx = lax.slice_in_dim(rec, 0, 1, axis=rec.ndim - 1)
    rzq = lax.slice_in_dim(rec, 1, 2, axis=rec.ndim - 1)
    p = _normalised(x, rzx)  # 0 off p's support
    # the centred log-ratio d' = d - E_p[d] as a coefficient: (d - mu) - E_p[d - mu]. At a
    # peaked row's mode k, d_k - mu is a tiny difference of two numbers of the size of KL, and
    # mu's own rounding (eps |mu|) exceeds d'_k (float32 [20,0,0,3] vs [0,20,0,-5]: -p_k d'_k
    # rounded to 0 instead of 6e-7); d_k - mu is exact there and the residual E_p[d - mu]
    # (res, summed with the value's terms: no pass of its own) puts back what mu lost.
    # (in units of k: the derivatives below take 1 / k where they leave the row sums)
    dc = _centred(x, d, mu, lax.mul(_col(res), rzx))
    # rows with KL = +inf because p_i > 0 = q_i (escapes: their zq is +inf, and only theirs):
    # gradient 0, as the core gives; rows whose value overflows keep their true gradient
    inf_row = lax.eq(_col(zq), _k(math.inf, kl_))
    inv = 1.0 / temperature
    zeros_row = lax.full_like(kl, 0.0)
    dkl = dzx = dmu = sqdy = zeros_row
    if not _is_zero(da):
        # dKL/da = -p d' / T
        dx = da if temperature == 1.0 else lax.mul(da, _k(inv, da))
        pdc = lax.mul(p, dc)
        dkl = lax.sub(dkl, _scale(_rowsum(lax.mul(_sel(inf_row, 0.0, pdc), dx)), ik))
        dzx = _rowsum(lax.mul(ex, dx))
        # mu = E_p[d], d = (b - a) / T up to a constant: the part through a, E_p[(d' - 1) dx]
        # (from the accurate d', not as (dsxd - mu dzx) / zx: jax.hessian differentiates it),
        # in units of k
        dmu = _rowsum(lax.mul(lax.sub(pdc, _scale(p, k)), dx))
    if not _is_zero(db):
        # dKL/db = (q - p) / T, as p expm1(log q/p) near p = q (no cancellation; not on huge
        # rows, where log q/p = d' - KL is a difference of two ~1e30) and directly elsewhere
        u = lax.sub(_scale(dc, ik), kl_)
        near = lax.lt(lax.abs(u), _sel(huge, -1.0, _SMALL, u.dtype))
        us = _sel(near, u, 0.0)
        q = _normalised(lax.sub(y, base), rzq)
        gb = _sel(near, lax.mul(p, _expm1_small(us)), lax.sub(q, p))  # |us| < 1/2
        gb = _sel(inf_row, 0.0, gb)
        dy = db if temperature == 1.0 else lax.mul(db, _k(inv, db))
        dkl = lax.add(dkl, _rowsum(lax.mul(gb, dy)))
        dmu = lax.add(dmu, _scale(_rowsum(lax.mul(p, dy)), k))
        sqdy = _rowsum(lax.mul(q, dy))
    # zq = sum e^{y - base} with base = mu (y_top - _HUGE_G, a constant, on huge rows); the
    # residual res is 0 in exact arithmetic (its tangent: 0)
    dzq = lax.mul(zq, lax.sub(sqdy, _sel(_uncol(huge), zeros_row, _scale(dmu, ik))))
    zeros = lax.full_like(ma_raw, 0.0)
    if refine:
        return out, (dkl, zeros, zeros, dzx, dmu, dzq, zeros_row)
    return out, (dkl, zeros, zeros, dzx, dmu, dzq)


_kl_parts.defjvp(_kl_parts_jvp, symbolic_zeros=True)


def kl_rows(a, b, temperature=1.0):
    """KL(softmax(a / T) || softmax(b / T)) per row (last axis), for log-space ``a``, ``b``.

    .. math:: \\mathrm{KL} = \\log\\Big(1 + \\sum_{i \\in S} p_i \\varphi(d'_i)\\Big) - \\log q(S),
              \\quad d' = d - E_p[d],\\ d = (b - a) / T,\\ \\varphi(x) = e^x - 1 - x

    with S the common support. ``a`` and ``b`` are logits or log-probabilities (-inf allowed: a
    category outside a support), same shape and dtype; ``temperature`` a Python float. Edges as
    the core: +inf where p has a category that q lacks; q's mass where p is 0 enters through
    ``-log q(S)``. The derivative is analytic (``dKL/da = -p d' / T``, ``dKL/db = (q - p) / T``,
    written in differentiable operations, so that ``jax.hessian`` is exact). No value checks
    (nan in, nan out): ``kldiv.kl_div`` checks.

    >>> import jax, jax.numpy as jnp
    >>> from kldiv.backends.jax_fast import kl_rows
    >>> a = jnp.array([[0.0, 1.0, 2.0]]); b = jnp.array([[0.5, 1.0, 1.5]])
    >>> p, q = jax.nn.softmax(a), jax.nn.softmax(b)
    >>> bool(jnp.allclose(kl_rows(a, b), jnp.sum(p * jnp.log(p / q), -1)))
    True
    """
    return _kl_parts(a, b, float(temperature), False)[0]


# ----------------------------------------------------------------------------------------------
# checks under tracing: nan rows, and checkify checks carrying the eager messages


def _row_text(flags, _unused=None):
    """Format string and arguments naming the first flagged row, as the eager messages do."""
    if flags.ndim == 0:
        return "the distribution", ()
    flat = flags.reshape(-1)
    first = jnp.argmax(flat)
    idx = jnp.unravel_index(first, flags.shape)
    if flags.ndim == 1:
        return "row {}", (idx[0],)
    return "row (" + ", ".join(["{}"] * flags.ndim) + ")", tuple(idx)


#: on while :func:`checked` traces its function: the checks are then emitted as checkify checks
_MESSAGES = contextvars.ContextVar("kldiv_jax_checkify", default=False)


def _report(flags, message, value=None):
    """A checkify check per eager message: ``message`` holds ``{row}`` where the row goes and
    ``{value}`` where the first flagged row's entry of ``value`` (a row-shaped array) goes.
    Only under :func:`checked` (elsewhere the message arguments would cost compile time)."""
    if not _MESSAGES.get():
        return
    text, args = _row_text(flags, None)
    extra = ()
    if value is not None:
        extra = (value[args] if args else value,)
    if flags.ndim == 0:
        msg = message.replace("{row}", text).replace("{value}", "{:.8g}")
        checkify.debug_check(~flags, msg, *extra)
        return
    n = jnp.sum(flags)
    one = message.replace("{row}", text).replace("{value}", "{:.8g}")
    more = message.replace("{row}", text + " (and {} more)").replace("{value}", "{:.8g}")
    checkify.debug_check(n != 1, one, *args, *extra)
    checkify.debug_check(n < 2, more, *args, n - 1, *extra)


def _invalid_rows(x, name, space, eps, mask, top=None, lse=None):
    """Row flags of the eager value checks of one input (categories last), as an array.

    ``top`` and ``lse`` (the row maximum and log-sum-exp of ``x``) are reused when the caller
    has them; otherwise computed here.
    """
    n = x.shape[-1]
    tol = normalization_tolerance(eps, n)

    def flagged(f):
        return f if mask is None else (f & mask)

    if space == "probs":
        nan_rows = flagged(jnp.any(jnp.isnan(x), axis=-1))
        neg = flagged(~(jnp.min(x, axis=-1) >= 0) | ~(jnp.max(x, axis=-1) < jnp.inf)) & ~nan_rows
        s = jnp.sum(x, axis=-1)
        off = flagged(jnp.abs(s - 1) > tol) & ~nan_rows & ~neg
        _report(nan_rows, f"{name}: contains nan at {{row}}")
        _report(neg, f"{name}: probabilities must be finite and >= 0; {{row}} is not "
                     f"(pass {name}_space='logits' for unnormalised scores)")
        _report(off, f"{name}: each distribution must sum to 1 within {tol:.1e}; {{row}} sums to "
                     f"{{value}} (normalise it, or pass {name}_space='logits')", s)
        return nan_rows | neg | off
    if top is None:
        top = jnp.max(x, axis=-1)  # nan propagates
    not_finite = flagged(~(top < jnp.inf))
    empty = flagged(top == -jnp.inf)
    if _MESSAGES.get():  # the nan / +inf distinction only feeds the checkify messages
        nan_rows = flagged(jnp.any(jnp.isnan(x), axis=-1))
        _report(nan_rows, f"{name}: contains nan at {{row}}")
        _report(not_finite & ~nan_rows,
                f"{name}: contains +inf at {{row}} ({name}_space={space!r})")
        _report(empty, f"{name}: {{row}} is -inf everywhere: that is no distribution")
    bad = not_finite | empty
    if space == "log_probs":
        if lse is None:
            lse = jax.nn.logsumexp(x, axis=-1)
        off = flagged((jnp.abs(lse) > tol) | (top > tol)) & ~bad
        _report(off, f"{name}: log-probabilities must be <= 0 with logsumexp 0 within {tol:.1e}; "
                     f"{{row}} is not (pass {name}_space='logits' for unnormalised scores)")
        bad = bad | off
    return bad


# ----------------------------------------------------------------------------------------------
# the whole computation for one configuration (jit-compiled, cached)

_XP = None


def _xp():
    global _XP
    if _XP is None:
        _XP = namespace(jnp.zeros(1))
    return _XP


def _compute(p, q, mask, weight, *, kind, p_space, q_space, reduction, temperature, beta, scale,
             check):
    xp = _xp()
    raw = (p, q)
    p, q = _finish(xp, p, q, mask, p_space, q_space)
    lo, hi = _T_RANGE
    fast = (kind in ("forward", "reverse") and p_space != "probs" and q_space != "probs"
            and lo <= temperature <= hi)
    stats = {}
    if fast:
        first, second = (p, q) if kind == "forward" else (q, p)
        rows, m1, m2, zx, _, _ = _kl_parts(first, second, temperature, False)
        if mask is None:  # the checks reuse the row maxima (and the normaliser at T = 1)
            names = ("p", "q") if kind == "forward" else ("q", "p")
            stats[names[0]] = dict(top=m1)
            stats[names[1]] = dict(top=m2)
            if temperature == 1.0 and (p_space if kind == "forward" else q_space) == "log_probs":
                stats[names[0]]["lse"] = jnp.where(jnp.isfinite(m1), m1, 0) + jnp.log(zx)
    else:
        rows = divergence_rows(kind, xp, p, q, p_space, q_space, temperature, beta)
    if (check and fast and p_space == "logits" and q_space == "logits" and mask is None
            and weight is None and not _MESSAGES.get()):
        # the checks of logits fail exactly where a row maximum is not finite, and those rows
        # are nan already (kl_rows)
        check = False
    if check:  # the eager checks as nan rows (and checkify checks); tolerance of the input dtype
        bad = None
        for name, x, space in (("p", raw[0], p_space), ("q", raw[1], q_space)):
            b = _invalid_rows(x.astype(_compute_dtype(xp, x)), name, space,
                              float(jnp.finfo(x.dtype).eps), mask, **stats.get(name, {}))
            bad = b if bad is None else bad | b
        if weight is not None:
            wbad = ~jnp.isfinite(weight) | (weight < 0)
            if _MESSAGES.get():
                checkify.debug_check(~jnp.any(wbad), "weight: must be finite and >= 0")
            bad = bad | wbad
        nan = jnp.asarray(jnp.nan, rows.dtype)
        if mask is None and weight is None:  # nan rows propagate through the sum by themselves
            rows = jnp.where(bad, nan, rows)
        else:  # a bad row of weight 0 must still spoil the sum
            out = reduce_rows(xp, rows, reduction, mask, weight)
            out = jnp.where(bad if reduction == "none" else jnp.any(bad), nan, out)
            return out * scale if scale != 1.0 else out
    if reduction == "mean" and mask is None and weight is None and rows.size:
        out = _plain_mean(rows)
    else:
        out = reduce_rows(xp, rows, reduction, mask, weight)
    return out * scale if scale != 1.0 else out


def _plain_mean(rows):
    """The mean of every row, as the sum of the rows times 1/n: one reduction, finite whenever
    the mean is (rows near finfo.max are scaled before they are added; the core's reduce_rows
    gets the same property with a second reduction selected where the plain sum overflows, five
    kernels against two under value_and_grad). Within an ulp of sum / n: exact where n is a
    power of 2, one rounding of 1/n more elsewhere."""
    return lax.reduce_sum(lax.mul(rows, _k(1.0 / rows.size, rows)), tuple(range(rows.ndim)))


def _under_jit():
    """Whether a ``jax.jit`` trace is under way (JAX's own test, a private function: if it is
    missing, False, and the nested jit is used as before)."""
    try:
        from jax._src.core import unsafe_am_i_under_a_jit
        return bool(unsafe_am_i_under_a_jit())
    except Exception:  # pragma: no cover - another JAX version
        return False


@functools.lru_cache(maxsize=256)
def _compiled(kind, p_space, q_space, reduction, temperature, beta, scale, check, messages):
    del messages  # a key only: _MESSAGES changes the traced graph
    fn = functools.partial(_compute, kind=kind, p_space=p_space, q_space=q_space,
                           reduction=reduction, temperature=temperature, beta=beta, scale=scale,
                           check=check)
    return jax.jit(fn)


def jax_divergence(kind, p, q, *, p_space, q_space, axis, reduction, mask, weight, temperature,
                   t2_scale, validate, beta=0.5):
    """The ``"jax"`` pre hook: the public divergences' arguments, checked as the core does."""
    check_option("reduction", reduction, REDUCTIONS)
    if weight is not None:
        namespace(p=p, q=q, mask=mask, weight=weight)  # the core's mixed-library error
    xp, P, Q, mask, _, temperature = _prepare(
        p, q, p_space, q_space, axis, temperature, mask, None, validate
    )
    if P.shape[-1] == 0 or P.size == 0:
        return NotImplemented
    enabled = validation_enabled(validate)
    traced = not all(is_concrete(a) for a in (P, Q, mask, weight) if a is not None)
    if weight is not None:
        weight = _as_array(weight, "weight")
        check_floating(xp, "weight", weight)
        weight = broadcast_rows(xp, jnp.asarray(weight, dtype=_compute_dtype(xp, P, Q)),
                                tuple(P.shape[:-1]), "weight")
        if enabled and not traced and bool(jnp.any(~jnp.isfinite(weight) | (weight < 0))):
            raise ValueError("weight: must be finite and >= 0")
    scale = temperature**2 if t2_scale else 1.0
    if not traced and p_space != "probs" and q_space != "probs":
        # logits near the float limit (their differences may overflow): the core's rows
        limit = float(jnp.finfo(_compute_dtype(xp, P, Q)).max) / 8
        if any(float(jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0))) > limit for x in (P, Q)):
            return NotImplemented
    options = dict(kind=kind, p_space=p_space, q_space=q_space, reduction=reduction,
                   temperature=float(temperature), beta=float(beta), scale=float(scale),
                   check=bool(enabled and traced))
    if traced and _under_jit():
        # inside the caller's jit: the operations inline into its trace (a nested jit would be
        # traced and lowered as a function of its own on every compile: half of kldiv's
        # tracing time); eagerly, and under eager grad / vmap, the nested jit keeps the call
        # compiled
        return _compute(P, Q, mask, weight, **options)
    return _compiled(**options, messages=_MESSAGES.get())(P, Q, mask, weight)


dispatch.register("jax", "pre", jax_divergence)


# ----------------------------------------------------------------------------------------------
# errors instead of nan: checkify


def checked(fn):
    """``fn`` with kldiv's value checks turned into errors under ``jax.jit``, via checkify.

    Returns ``checkify.checkify`` of ``fn`` (user checks), with kldiv's value checks emitted as
    checkify checks while ``fn`` is traced: a function returning ``(err, out)``;
    ``err.throw()`` raises ``checkify.JaxRuntimeError`` with the eager path's message (for
    example ``"p: probabilities must be finite and >= 0; row 1 is not ..."``) when an input row
    is invalid, and does nothing otherwise. Jit the result, not ``fn``. (Without ``checked``,
    invalid rows give nan and no checkify checks are emitted: they would cost compile time.)

    >>> import jax, jax.numpy as jnp, kldiv
    >>> from kldiv.backends.jax_fast import checked
    >>> loss = lambda p, q: kldiv.kl_div(p, q, reduction="mean")
    >>> err, value = jax.jit(checked(loss))(jnp.array([[0.5, 0.5]]), jnp.array([[-0.5, 1.5]]))
    >>> print(err.get())  # doctest: +ELLIPSIS
    q: probabilities must be finite and >= 0; row 0 is not ...
    """
    @functools.wraps(fn)
    def with_messages(*args, **kwargs):
        token = _MESSAGES.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _MESSAGES.reset(token)

    return checkify.checkify(with_messages, errors=checkify.user_checks)
