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
  ``dKL/db = (q - p) / T``) written in differentiable operations, so that reverse mode costs two
  more passes, not the derivative of dozens of ``where``s, and ``jax.hessian`` stays exact.
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
_HUGE = 20.0  # log of the largest p_i e^{d'_i} for which E_p[phi(d')] is summed directly
# row maxima farther apart than this: the log-ratio is formed from each side centred on its own
# maximum (exact for shifts up to 1e30), otherwise as the raw difference (exact for close logits)
_FAR = 64.0
_T_RANGE = (1e-3, 1e3)  # temperatures handled by kl_rows; outside, the core's rows


# ----------------------------------------------------------------------------------------------
# the KL rows of log-space inputs


def _phi_series(x):
    coefs = _PHI_COEFS if jnp.finfo(x.dtype).bits > 32 else _PHI_COEFS[:7]
    acc = coefs[-1]
    for c in reversed(coefs[:-1]):
        acc = acc * x + c
    return acc * x * x


def _row_reduce(ops, inits, combine):
    """One variadic reduction over the last axis: XLA computes all of ``ops`` in one pass."""
    ops = tuple(ops)
    inits = tuple(jnp.asarray(v, o.dtype) for v, o in zip(inits, ops))
    return lax.reduce(ops, inits, lambda u, v: tuple(combine(x, y) for x, y in zip(u, v)),
                      (ops[0].ndim - 1,))


def _entries(a, b, temperature, ma, mb):
    """Per-entry quantities of KL(p || q) for p = softmax(a / T), q = softmax(b / T).

    ``ma``, ``mb``: the row maxima (last axis kept), finite. Returns the supports, x = (a - ma) / T
    (p's logits centred on their maximum), the log-ratio d up to a row constant (finite
    everywhere: -inf entries count as 0 in it; where p_i = 0 it is multiplied by 0) and y with
    x + d = y in exact arithmetic (q's logits in the same frame), so that log(p_i e^{d'_i}) is
    formed from y without adding a huge log p to a huge d. No entry is nan or inf except x and y
    (-inf off the supports), so every derivative is finite, second order included.
    """
    ninf = -jnp.inf
    sp = a > ninf
    sq = b > ninf
    zero = jnp.zeros((), a.dtype)
    far = jnp.abs(ma - mb) > _FAR
    a0 = jnp.where(sp, a, zero)
    b0 = jnp.where(sq, b, zero)
    # the raw difference (exact for close logits), or each side centred on its own maximum (exact
    # when one side is shifted by up to 1e30); the row constant between the two drops out
    # Logits near the float limit: a centred side may overflow to -inf (probability 0, as it
    # should), and the difference is clamped at finfo.max instead of giving inf - inf
    fmax = float(jnp.finfo(a.dtype).max)
    xa = a0 - jnp.where(far, ma, zero)
    xb = b0 - jnp.where(far, mb, zero)
    d = jnp.maximum(xb, -fmax) - jnp.maximum(xa, -fmax)
    # where that overflowed the log-ratio is not representable: kl_rows gives nan there (the
    # eager path leaves such rows, logits beyond finfo.max / 8, to the core)
    overflow = jnp.isinf(xa) | jnp.isinf(xb) | jnp.isinf(d)
    x = a - ma
    y = b - jnp.where(far, mb, ma)
    if temperature != 1.0:  # after the difference: (b - a) / T keeps the accuracy of b - a
        x = x / temperature
        d = d / temperature
        y = y / temperature
    d = jnp.clip(d, -fmax, fmax)
    return sp, sq, x, d, y, far, overflow


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _kl_parts(a, b, temperature):
    """(KL, ma, mb, lse, mu, norm_q) per row: the value in three fused passes, and the row
    constants that the derivative uses (the raw maxima, p's log normaliser in the centred frame,
    mu = E_p[d], q's log normaliser in the frame of y)."""
    ninf = jnp.asarray(-jnp.inf, a.dtype)
    # pass 1: the row maxima (nan propagates) and whether p has mass where q has none
    ma_raw, mb_raw, escapes = _row_reduce(
        (a, b, (a > ninf) & (b == ninf)), (ninf, ninf, False),
        lambda x, y: lax.max(x, y) if x.dtype != jnp.bool_ else x | y,
    )
    ma = jnp.where(jnp.isfinite(ma_raw), ma_raw, 0)[..., None]
    mb = jnp.where(jnp.isfinite(mb_raw), mb_raw, 0)[..., None]
    sp, sq, x, d, y, far, overflow = _entries(a, b, temperature, ma, mb)
    # pass 2: p's normaliser and the p-weighted mean of the log-ratio (two plain sums: XLA's CPU
    # backend runs a variadic sum much slower than two sums)
    ex = jnp.exp(x)
    zx = jnp.sum(ex, axis=-1, keepdims=True)
    lse = jnp.log(zx)
    mu = jnp.sum(ex * d, axis=-1, keepdims=True) / zx
    # pass 3, one sum: e^KL = E_p[e^{d'}] + (q's mass off T) e^{KL} = 1 + E_p[phi(d')] + s_out,
    # all terms >= 0, so KL = log1p(sum); where some p_i e^{d'_i} is huge (KL in the tens or
    # more) the same sum of p_i e^{d'_i - c} over q's support gives KL = c + log(sum) instead
    zero = jnp.zeros((), a.dtype)
    y_top = jnp.where(far, zero, mb - ma) / temperature  # max of y
    top = y_top - (lse + mu)  # max of log(p_i e^{d'_i})
    huge = top > _HUGE
    c = jnp.where(huge, top, zero)
    dc = d - mu
    p = jnp.exp(x - lse)
    # p_i e^{d'_i - c} on T, q's mass likewise off T, 0 off q; when huge, y - (lse + mu + c) is
    # y - y_top (mu may be ~1e30 there: no sum that cancels it)
    e = jnp.exp(y - jnp.where(huge, y_top, lse + mu))
    # where p_i = 0 (a category of q only) the large branch gives e, q's mass there. (No safe
    # values for the branch that a where drops: this function is never differentiated.)
    small = sp & (jnp.abs(dc) < _SMALL)
    term = jnp.where(huge, e, jnp.where(small, p * _phi_series(dc), e - p * (1 + dc)))
    term = jnp.where(overflow & (p > 0), jnp.asarray(jnp.nan, a.dtype), term)
    total = jnp.sum(term, axis=-1)
    # huge rows: total >= 1 (its largest term is e^0), and KL = c + log(total)
    log_total = jnp.log1p(total - jnp.where(huge[..., 0], 1, 0).astype(a.dtype))
    kl = jnp.where(escapes, jnp.asarray(jnp.inf, a.dtype), c[..., 0] + log_total)
    # q's log normaliser in the frame of y (log q_i = y_i - norm_q), for the derivative
    norm_q = jnp.where(huge[..., 0], y_top[..., 0] + log_total, (lse + mu)[..., 0] + kl)
    return kl, ma_raw, mb_raw, lse[..., 0], mu[..., 0], norm_q


@_kl_parts.defjvp
def _kl_parts_jvp(temperature, primals, tangents):
    a, b = primals
    da, db = tangents
    kl, ma_raw, mb_raw, lse, mu, norm_q = out = _kl_parts(a, b, temperature)
    ma = jnp.where(jnp.isfinite(ma_raw), ma_raw, 0)[..., None]
    mb = jnp.where(jnp.isfinite(mb_raw), mb_raw, 0)[..., None]
    sp, sq, x, d, y, far, _ = _entries(a, b, temperature, ma, mb)
    zero = jnp.zeros((), a.dtype)
    lse_, mu_ = lse[..., None], mu[..., None]
    p = jnp.exp(x - lse_)  # 0 off p's support
    dc = d - mu_
    escapes = jnp.isinf(kl)[..., None] & (kl > 0)[..., None]
    k = jnp.where(escapes, zero, kl[..., None])
    huge = jnp.where(far, zero, mb - ma) / temperature - (lse_ + mu_) > _HUGE
    # dKL/da = -p d' / T;  dKL/db = (q - p) / T, as p * expm1(log q/p) near p = q (no
    # cancellation) and directly elsewhere (q_i = exp(y_i - lse - mu - KL))
    ga = jnp.where(escapes, zero, -p * dc)
    u = dc - k
    near = sp & ~huge & (jnp.abs(u) < _SMALL)
    us = jnp.where(near, u, zero)
    log_q = jnp.where(sq & ~escapes, y - norm_q[..., None], -jnp.inf)
    gb = jnp.where(near, p * jnp.expm1(us), jnp.exp(log_q) - p)
    gb = jnp.where(escapes, zero, gb)
    dx = da
    dd = jnp.where(sq, db, zero) - jnp.where(sp, da, zero)
    if temperature != 1.0:
        ga, gb = ga / temperature, gb / temperature
        dx, dd = dx / temperature, dd / temperature
    dkl = jnp.sum(ga * da, axis=-1) + jnp.sum(gb * db, axis=-1)
    dlse = jnp.sum(p * dx, axis=-1)  # d log sum exp(x)
    dmu = jnp.sum(p * dd, axis=-1) + jnp.sum(p * dc * dx, axis=-1)  # d E_p[d]
    dy = jnp.where(sq, db, zero)
    if temperature != 1.0:
        dy = dy / temperature
    dnorm_q = jnp.sum(jnp.exp(log_q) * dy, axis=-1)  # d log sum exp(y)
    zeros = jnp.zeros_like(ma_raw)
    return out, (dkl, zeros, zeros, dlse, dmu, dnorm_q)


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
    return _kl_parts(a, b, float(temperature))[0]


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
        rows, m1, m2, lse1, _, _ = _kl_parts(first, second, temperature)
        if mask is None:  # the checks reuse the row maxima (and the normaliser at T = 1)
            names = ("p", "q") if kind == "forward" else ("q", "p")
            stats[names[0]] = dict(top=m1)
            stats[names[1]] = dict(top=m2)
            if temperature == 1.0:
                stats[names[0]]["lse"] = jnp.where(jnp.isfinite(m1), m1, 0) + lse1
    else:
        rows = divergence_rows(kind, xp, p, q, p_space, q_space, temperature, beta)
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
    out = reduce_rows(xp, rows, reduction, mask, weight)
    return out * scale if scale != 1.0 else out


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
    fn = _compiled(kind, p_space, q_space, reduction, float(temperature), float(beta),
                   float(scale), bool(enabled and traced), _MESSAGES.get())
    return fn(P, Q, mask, weight)


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
