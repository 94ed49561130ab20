"""The semantics of kldiv, defined once for every array library: KL and its family.

All functions take the reference ``p`` first and the approximation ``q`` second, as in the math
KL(p || q). Inputs may be probabilities, log-probabilities or logits, independently for each side.

Accuracy. The textbook sum ``p * (log p - log q)`` adds terms of both signs; when p and q are
close it cancels to noise in float32. kldiv instead works with the log-ratio
``d = log q - log p`` on the common support T, taken as the difference of the raw inputs (logit
minus logit, or ``log1p((q - p) / p)`` for probabilities) and centred by its p-weighted mean, so
that the normalisers never enter as a large difference. With ``phi(x) = exp(x) - 1 - x >= 0``::

    KL(p || q) = log(1 + sum_T p_i phi(d'_i)) - log q(T),   d' = d - E_p[d]

where ``q(T)`` is q's mass on p's support (``-log q(T) >= 0`` is the mass that q puts where
p is zero). Every term is non-negative, phi is evaluated by its Taylor series near 0, and float32
inputs give about 1e-6 relative error down to KL = 1e-9 (``benchmarks/accuracy.py``).

Mixed spaces. With one side probabilities and the other log-probabilities or logits in
float32, the log-ratio is formed in float64 where the array library has it (NumPy, torch except
MPS, JAX with ``jax_enable_x64``): log p rounded to float32 would cost eps * |log p| per entry,
3e-4 relative at KL = 1e-9. So is probabilities' log p at a temperature != 1 (there both sides
are log-space, p^(1/T) renormalised; against probabilities too): 6e-5..5e-4 relative at KL 1e-8
before (``tests/test_core_audit.py``). JAX without x64 keeps float32 there: ~2e-3 relative
at KL = 1e-9, 1e-4 at 1e-7, 5e-6 at 1e-5 (``tests/test_core_leftovers.py``'s rows).
Below T = 1/2 a probability side is centred on its largest probability before the division
by T (``_centred_log_probs``: log1p((p_i - p_max) / p_max) within a factor 2 of the maximum):
the plain float32 log p put eps |log p_i| / T into every tempered logit (up to 8e-2 at
T = 1e-6); now ~1e-7 down to T = 1e-6 (``tests/test_probs_small_temperature.py``).

Large magnitudes. The value does not change when a constant is added to one side's logits,
however large (a row of -1e30 or finfo.min, a whole row offset by 1e4, logits of 3e38): each
side is normalised after a shift by its row maximum where that is 64 or more in magnitude
(exact, by Sterbenz' lemma, for every entry within 32 nats of the maximum, the only ones that
carry that side's mass), and the log-ratio is the difference of the two sides' raw inputs,
formed exactly (TwoSum) and taken relative to its value at p's mode, so that neither an offset
of one side nor a constant between the two (logits that differ by 0.3 or by 1e30) rounds it:
float32 keeps about 1e-6 relative accuracy down to KL = 1e-9 across any offset, float64 about
1e-13 (``tests/test_core_numerics_extra.py``). Being unshifted, the log-ratio is exact also
where one side holds mass far below the other side's maximum (2 and -1 against a logit of 3e38
on the other side: a shift by 3e38 would round both to one number), which a huge KL's O(1)
gradient needs (``tests/test_core_leftovers2.py``). The log-ratio, its p-weighted mean and
L = log E_p[e^d'] are carried in units of min(T, 1) / 4 of a nat (``_to_true``: below T = 1
the raw difference of the inputs before the division by T), so rows wider than the float range
(float32 rows holding both +-3e38, or x / T beyond it: float64 logits of +-1.7e308 at T = 0.5
or 1e-3) are exact too (``tests/test_core_huge_temperature.py``); a value beyond finfo.max is
+inf. Only entries more than
finfo.max below their own row maximum are clamped there within a side (their probability is 0
either way). A row whose true value exceeds the float range (float32 logits [3e38, -3e38]
against their flip: KL = 6e38) is +inf with the exact derivatives of the true value, which are
finite there ([-1, 1] with respect to q's logits), +-inf only where a derivative itself
exceeds finfo.max; a row that is +inf because p_i > 0 = q_i keeps a zero gradient
(``tests/test_core_overflow_rows.py``, against mpmath on the exact inputs).
Derivatives. They are those of the accurate value, formed so that autodiff meets no
cancellation the value avoided: float32 gradients are within 1e-5 per row (normwise; 1e-6
or better measured) of the exact ones on every row the tests draw. Three arrangements.
JS on far, nearly disjoint rows (JS near its bound): its derivative beta log(p_i / m_i) sits
near -beta log(beta), and the part that matters, u_i = log(m_i / (beta p_i)) =
log1p(((1 - beta) / beta) e^(d_i)), is below the rounding of log(beta); the derivatives are
taken from u (and its mirror for q) with full relative accuracy, centred per row
(``_js_surrogate``: float32 logits of std 3, 4, 8 went from 2e-5, 7e-5, O(1) to 1e-6); its
first derivative leaves out the two sides' terms through the log-ratio, which cancel in math
(close float32 rows: 1e-4 per row before). KL and reverse KL, every row when differentiating
(``_kl_derivatives``): the derivative with respect to the side whose log-probabilities appear
twice, p_i (r_i - KL), is at a peaked row's top entry a tiny difference of two numbers of the
size of KL (float32 logits of std 20: O(1) per row before); it is formed from the exact
centred log-ratio (0 at p's mode) as a constant coefficient, and q - p likewise, so that
autodiff subtracts nothing large (1e-6 per row at logits of std 5..40, or T = 0.05); huge-KL
rows (log-ratios up to 1e38 in float32) included. Jeffreys, every row: the derivatives of
the plain formula, assembled from the exact log-ratios centred by p and by q
(``_jeffreys_derivatives``), so that a row constant of 3e38 (log-ratios beyond 20) never
rounds an O(1) gradient.
Rows where a centred log-ratio c_i itself lies beyond finfo.max (inputs within a few times the
float limit, or |x / T| beyond it: 6e38 at p_i = 1e-35, whose derivative p_i c_i is 6e3):
reverse mode through the weights would carry c_i as a cotangent (inf, then inf times p_i);
there p_i c_i / T reaches the raw inputs directly (``_wide_p_terms``, chosen per row from a
sum the derivative route forms anyway: no extra pass on other rows).
Second derivatives: those of the value (torch double backward, jax.hessian; Hessian-vector
products), the routes above included (they are arranged so that their derivatives are the plain
formula's). On peaked rows (float32: a mode whose probability rounds to 1) the largest entries,
of the size of 1 - w_mode, would come from the weights' derivative at the mode, w(1-w) with 1-w
rounded to 0: every product of differences that carries a second derivative is taken relative to
each side's mode instead (``_anchored_sum``, and JS's log-ratio differential
``_dlog_anchored``): 2e-6 per Hessian block against mpmath for every kind
(``tests/test_core_hessian_peaked.py``; up to 6e-6 on a Jeffreys block 1/300 the size of the
Hessian's largest entry; 1.0 before for forward KL d2/dq2, reverse KL d2/dp2, all of Jeffreys,
JS's mixed blocks on far rows). With respect to probabilities down to about 1e-30 (float32;
1e-290 in float64) they are finite and accurate (the logarithm of a tiny probability is taken at
a scaled value, so that autodiff never squares it into 0). Below 16 / finfo.max (float32
subnormals), where 1/p overflows, KL and reverse KL take their derivatives on that row from the
plain formula assembled so that autodiff never multiplies 1/p into p's graph: the Hessian's
diagonal entry there is +inf (the true ~1e40, correctly rounded) and every other entry finite
and right
(torch; not under tracing: jax.jit, torch.compile, where the rows cannot be known). JS likewise
(``_js_subnormal_second``: the surrogate's first derivatives, the second derivatives of the
entropy form from x log x; right where the mixture beta p_i + (1 - beta) q_i is a normal
number, i.e. a subnormal probability against a normal one). Where this falls short (Hessian
rows, the derivative of the gradient entry dD/dz_i, taken last; ``tests/test_core_hessian_
subnormal.py``): Jeffreys' row of a subnormal entry z_i (either side) is nan; that row holds
finite entries (~1e2) next to entries beyond the float32 range (q_i / p_i^2 ~ 1e89, 1 / p_i
~ 1e44) that autodiff sums with opposite signs. KL(a || b) (forward: b = q; reverse: b = p)
where 1 / b_i overflows (b_i < 2.9e-39 in float32): in the row of b_i the mixed entry
d2 / da_i db_i (true value about -1 / b_i, beyond the range) is nan, and an entry whose true
value is 1 / b_i times a tiny factor may be +-inf (-2.5 at p_i = 2e-39, q_i = 5e-39 comes out
+inf): reverse-mode autodiff meets 1 / b_i as a factor, inf, before the factor that brings
it back into range, and an inf cotangent split by the normalisation x / sum(x) gives
inf - inf. The columns of those entries, and every other entry, are right. Exact entries there
would need custom derivative rules per array library (the core has none); use float64 for
second derivatives at such probabilities.
JAX: XLA on CPU reads subnormal operands as 0 (float32 and float64, in arithmetic and in
comparisons). Probabilities are read from their bits there (``_xp.nonpositive``, ``_xp.
scaled_unflushed``: the support, log x, the near-ratio test), so a subnormal q_i against a
normal p_i is the finite KL it is (50.95 for p = [0.5, 0.5], q = [1, 1e-45]; was +inf), and
KL's, reverse KL's and Jeffreys' first derivatives at a subnormal probability are formed
without a flushed intermediate (Jeffreys: the weights' derivative from x / z, and (p_i - q_i)
d log(p_i / q_i) at an entry subnormal on both sides from -expm1(+-d_i) / z per side;
``tests/test_jax_subnormal_probs.py``). Left on JAX: a result or a derivative that is itself
subnormal is 0; Hessians at a subnormal entry are not covered there.
No finite input gives a nan or a negative value. A nan in an unmasked row (``validate=False``)
makes that row's value nan.

Edges (scipy.special.rel_entr's table, per category): p_i = 0 contributes 0 whatever q_i is
(q_i = 0 and both logits -inf included); p_i > 0 = q_i makes KL(p || q) = +inf. Gradients are
finite wherever the value is finite: every branch that a ``where`` discards is first fed safe
values ("double where"), so no nan leaks into the backward pass, second derivatives included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from . import dispatch as _dispatch
from . import options as _options
from . import validation as V
from ._xp import (as_array, const, device, is_concrete, is_jax_array, logsumexp, namespace,
                  nonpositive, quiet, scaled_unflushed, stop_gradient, subnormal, wide_float,
                  xlogx)
from .reduction import broadcast_rows, reduce_rows

# 1/n! for n = 2..17: phi(x) = sum_{n>=2} x^n / n!, truncation < 1e-20 relative for |x| < 0.5
_PHI_COEFS = [1.0 / math.factorial(n) for n in range(2, 18)]
_SMALL = 0.5


# ----------------------------------------------------------------------------------------------
# input handling


@dataclass
class _Side:
    """One distribution per row, categories on the last axis, in a form the core can use."""

    x: object  # the input (compute dtype)
    space: str  # "probs" or "log" (log_probs and logits are the same to the math)
    support: object  # bool: p_i > 0 (decided from the input itself, never from a rounded value)
    lw: object  # normalised log-probabilities; finite everywhere (>= -finfo.max off the support)
    w: object  # normalised probabilities, exactly 0 off the support
    raw: object  # the log-space input before the temperature (log p for probabilities;
    #             log(p / p_max) below T = 1/2: ``_centred_log_probs``)
    c: object  # raw centred on the row maximum m and clamped to [-finfo.max, 0]: raw - m
    ct: object  # c / temperature (clamped likewise): lw = ct - norm
    m: object  # the row maximum of raw (last axis kept, a constant for autodiff); None: 0
    norm: object  # per-row log normaliser (last axis kept)
    temperature: float = 1.0
    px: object = None  # probabilities taken to log space (T != 1): the input p itself


_as_array = as_array


def _compute_dtype(xp, *arrays):
    dt = xp.result_type(*[a.dtype for a in arrays])
    if xp.finfo(dt).bits < 32:
        dt = xp.float32  # half and bfloat16 inputs accumulate in float32
    return dt


def _tiny_scale(xp, x):
    """(scale, small) for ``x`` (> 0): a power of 2 for the entries below 2^-50 (float32; 2^-500
    in float64), 1 elsewhere, so that ``x * scale`` and its square are normal numbers; None when
    no entry is that small (known without tracing: the usual case costs one comparison).
    Autodiff of ``log x`` or ``1 / x`` then divides by the scaled value, and the second
    derivative (-1/x^2, finite for x = 1e-30 in float32) never forms x^2 = 0 (then inf, and
    inf - inf = nan in the entries next to it; JAX's forward-over-reverse Hessian meets it).
    """
    from ._xp import is_concrete

    e = 600 if xp.finfo(x.dtype).bits > 32 else 100
    small = x < 2.0 ** -(e // 2)
    if is_concrete(x) and not bool(xp.any(small)):
        return None
    return xp.where(small, const(xp, 2.0**e, x), const(xp, 1.0, x)), small, e


def _log_pos(xp, x):
    """log x for x > 0 (>= -finfo.max), with finite first and second derivatives wherever the
    true ones are finite (``_tiny_scale``); the value is log x to within an ulp or so."""
    tiny = _tiny_scale(xp, x)
    if tiny is None:
        return xp.log(x)
    import struct

    sc, small, e = tiny
    c = e * math.log(2.0)
    c_hi = c if xp.finfo(x.dtype).bits > 32 else struct.unpack("f", struct.pack("f", c))[0]
    c_lo = c - c_hi  # e ln 2 as a pair: the offset adds no rounding
    zero = xp.zeros_like(x)
    xs = scaled_unflushed(x, x * sc, e)  # (JAX: a subnormal x from its bits, not flushed)
    r = (xp.log(xs) - xp.where(small, const(xp, c_hi, x), zero)) - xp.where(
        small, const(xp, c_lo, x), zero)
    # (>= -finfo.max: XLA on CPU flushes a subnormal to 0 in arithmetic, after a comparison that
    # kept it in the support; the log-ratio must not meet -inf there, nor inf - inf)
    return xp.maximum(r, const(xp, -xp.finfo(x.dtype).max, x))


def _unflushed_pair(xp, ps, qs):
    """(ps, qs) both times 2^e where either is below 2^-(e/2) (``_tiny_scale``'s e), subnormals
    from their bits (``scaled_unflushed``): exact, and normal numbers, so that XLA, which reads
    a subnormal operand as 0 in comparisons and arithmetic, compares and divides them right."""
    e = 600 if xp.finfo(ps.dtype).bits > 32 else 100
    lim = const(xp, 2.0 ** -(e // 2), ps)
    small = (ps < lim) | (qs < lim)
    sc = xp.where(small, const(xp, 2.0**e, ps), const(xp, 1.0, ps))
    return scaled_unflushed(ps, ps * sc, e), scaled_unflushed(qs, qs * sc, e)


#: below this temperature a probability side enters log space centred on its largest entry
#: (``_centred_log_probs``); from it on, the plain log p costs at most ~2e-8 / T relative, at
#: the level of float32's own rounding, and the everyday T = 1 pays nothing
_CENTRE_BELOW = 0.5


def _centred_log_probs(xp, p, nonpos, lp):
    """log(p_i / p_max) for a probability row (-inf where p_i = 0), with an error of about eps
    in p_i's own scale of the tempered logits: log p rounded to the input's precision is off by
    eps |log p_i|, and divided by a small T that error reaches every entry that carries weight
    (up to 8e-2 relative at T = 1e-6 in float32); centred, the entries with weight have |d_i| of
    the order of T, and their error is eps |d_i| / T.

    Within a factor 2 of the maximum, d_i = log1p((p_i - p_max) / p_max): the difference is
    exact (Sterbenz). Below it, d_i = log p_i - log p_max from ``lp`` (``_log_pos``, which keeps
    subnormals and their derivatives): there exp(d_i / T) <= 2^(-1/T), which carries the
    eps |log p_i| / T rounding at most eps-sized into the result (T < ``_CENTRE_BELOW``).
    p_max is a constant to autodiff (a row constant in log space, which the normalisation
    cancels): the derivative of d_i is 1 / p_i, as that of log p_i. A nan in the row makes
    every entry nan (its maximum is nan); a row whose largest entry is below 2^-100 keeps the
    plain difference (no quotient of subnormals, which XLA would read as 0 / 0)."""
    zero = xp.zeros_like(p)
    one = const(xp, 1.0, p)
    pm = stop_gradient(xp.max(xp.where(nonpos, zero, p), axis=-1, keepdims=True))
    lm = stop_gradient(xp.max(lp, axis=-1, keepdims=True))
    ok = pm >= const(xp, 2.0**-100, p)
    near = ~nonpos & (p >= 0.5 * pm) & ok
    pmn = xp.where(ok, pm, xp.ones_like(pm))
    pn = xp.where(near, p, one * pmn)  # safe values off ``near`` (double where)
    dn = xp.log1p((pn - pmn) / pmn)
    return xp.where(near, dn, lp - lm)


def _make_side(xp, x, space, temperature):
    """Normalise one side; ``space`` is the user's p_space/q_space.

    Log-space inputs are centred on their own row maximum before anything else (a logit row of
    constant -1e30 is the uniform distribution, and its difference with the other side must not
    be formed at 1e30). An entry more than finfo.max below its row maximum (float32 logits of
    +-3e38) is clamped to -finfo.max: its probability is 0 either way, and it stays in the
    support, which is decided from the input. A nan anywhere in a row makes the row's maximum
    nan and so the row's result nan (with ``validate=False``; never a plausible number).
    """
    zero = xp.zeros_like(x)
    one = const(xp, 1.0, x)
    if space == "probs" and temperature == 1.0:
        # not `x > 0`: a nan stays in the support and the row sum, and propagates
        nonpos = nonpositive(x)
        support = ~nonpos
        x_safe = xp.where(nonpos, one, x)
        z = xp.sum(xp.where(nonpos, zero, x), axis=-1, keepdims=True)
        w = xp.where(support, x_safe / z, zero)
        raw = xp.where(support, _log_pos(xp, x_safe), zero)
        log_z = xp.log(z)
        lw = xp.where(support, raw - log_z, zero)
        return _Side(x, "probs", support, lw, w, raw, raw, raw, None, log_z)
    px = None
    if space == "probs":  # probabilities with a temperature: p^(1/T), renormalised
        px = x  # (the log-ratio takes log p anew in float64 where it can: ``_wide_side``)
        nonpos = nonpositive(x)
        x = xp.where(nonpos, const(xp, -math.inf, x), _log_pos(xp, xp.where(nonpos, one, x)))
        if temperature < _CENTRE_BELOW:
            x = _centred_log_probs(xp, px, nonpos, x)
    big = const(xp, -xp.finfo(x.dtype).max, x)
    support = x != -math.inf  # a nan counts (and propagates): validate=False never hides one
    m = stop_gradient(xp.max(x, axis=-1, keepdims=True))
    # -inf entries become -finfo.max: exp gives 0, no inf - inf. (A select, not maximum: an
    # entry landing exactly on -finfo.max, float32 finfo.min logits, keeps its whole derivative;
    # maximum's would be split in half at the tie.)
    c = x - m
    c = xp.where(c < big, big, c)
    ct = c
    if temperature != 1.0:
        ct = c / temperature
        if temperature < 1.0:
            ct = xp.where(ct < big, big, ct)
    e = xp.exp(ct)  # the row maximum gives exp(0) = 1: no overflow, the sum is in [1, V]
    s = xp.sum(e, axis=-1, keepdims=True)
    norm = xp.log(s)
    return _Side(x, "log", support, ct - norm, e / s, x, c, ct, m, norm, temperature, px)


def _prepare(p, q, p_space, q_space, axis, temperature, mask, weight, validate, names=("p", "q")):
    """Check options, shapes and values; move the category axis last (dtypes untouched)."""
    V.check_option(f"{names[0]}_space", p_space, V.SPACES)
    V.check_option(f"{names[1]}_space", q_space, V.SPACES)
    temperature = V.check_positive_finite("temperature", temperature)
    p = _as_array(p, names[0])
    q = _as_array(q, names[1])
    xp = namespace(p=p, q=q, mask=mask, weight=weight)
    V.check_floating(xp, names[0], p)
    V.check_floating(xp, names[1], q)
    ndim = max(p.ndim, q.ndim)
    ax = V.check_axis(axis, ndim)
    if p.ndim != q.ndim:  # NumPy broadcasting: the shorter shape gets leading 1s
        p = xp.reshape(p, (1,) * (ndim - p.ndim) + tuple(p.shape))
        q = xp.reshape(q, (1,) * (ndim - q.ndim) + tuple(q.shape))
    if p.shape[ax] != q.shape[ax]:
        raise ValueError(
            f"{names[0]} and {names[1]}: {p.shape[ax]} and {q.shape[ax]} categories along axis "
            f"{axis}; both distributions must have the same number of categories"
        )
    if p.shape[ax] == 0:
        raise ValueError(
            f"{names[0]}: the category axis (axis {axis}) is empty: a distribution needs at "
            "least one category"
        )
    if tuple(p.shape) != tuple(q.shape):
        try:
            p, q = xp.broadcast_arrays(p, q)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(
                f"{names[0]} and {names[1]}: shapes {tuple(p.shape)} and {tuple(q.shape)} do "
                "not broadcast"
            ) from exc
    eps = (xp.finfo(p.dtype).eps, xp.finfo(q.dtype).eps)
    p = xp.moveaxis(p, ax, -1)
    q = xp.moveaxis(q, ax, -1)
    rows_shape = tuple(p.shape[:-1])
    if mask is not None:
        if xp.isdtype(mask.dtype, "bool") is False:
            raise TypeError(f"mask: expected a boolean array, got dtype {mask.dtype}")
        mask = broadcast_rows(xp, mask, rows_shape, "mask")
    if weight is not None:
        weight = _as_array(weight, "weight")
        V.check_floating(xp, "weight", weight)
        weight = broadcast_rows(xp, xp.astype(weight, _compute_dtype(xp, p, q)), rows_shape,
                                "weight")
    if V.validation_enabled(validate):
        V.check_values(xp, names[0], p, p_space, eps[0], logsumexp, rows=mask)
        V.check_values(xp, names[1], q, q_space, eps[1], logsumexp, rows=mask)
        if weight is not None and bool(xp.any(~xp.isfinite(weight) | (weight < 0))):
            raise ValueError("weight: must be finite and >= 0")
    return xp, p, q, mask, weight, temperature


def _finish(xp, p, q, mask, p_space, q_space):
    """Promote to the compute dtype and replace masked rows by a safe (uniform) row."""
    dt = _compute_dtype(xp, p, q)
    if p.dtype != dt:
        p = xp.astype(p, dt)
    if q.dtype != dt:
        q = xp.astype(q, dt)
    if mask is not None:
        # masked rows may hold anything; both sides get the same safe row, so KL = 0 there
        m = mask[..., None]
        p = xp.where(m, p, _safe_row(xp, p, p_space))
        q = xp.where(m, q, _safe_row(xp, q, q_space))
    return p, q


def _safe_row(xp, x, space):
    """A uniform distribution in ``space``: what masked rows are replaced with."""
    n = x.shape[-1]
    if space == "probs":
        return const(xp, 1.0 / n, x)
    if space == "log_probs":
        return const(xp, -math.log(n), x)
    return xp.zeros_like(x[..., :1])


# ----------------------------------------------------------------------------------------------
# the numerics


def _phi_series(xp, x):
    """exp(x) - 1 - x by its Taylor series; accurate to the last digit for |x| < 0.5.

    Terms up to x^17 in float64, up to x^10 in float32 (truncation below 3e-9 relative).
    """
    coefs = _PHI_COEFS if xp.finfo(x.dtype).bits > 32 else _PHI_COEFS[:9]
    acc = const(xp, coefs[-1], x)
    for c in reversed(coefs[:-1]):
        acc = acc * x + c
    return acc * x * x


def _w_phi(xp, w, x, *, log_w_exp=None, w_exp=None):
    """w * phi(x) without overflow and without cancellation.

    ``w * exp(x)`` is ``exp(log_w_exp)``, its logarithm formed by the caller without adding a
    huge log w to a huge x (a finite logit of -1e30 makes both ~1e30 and their sum noise), or
    ``w_exp`` itself when the caller knows it exactly (the JS mixture: p * m/p = m).
    """
    small = xp.abs(x) < _SMALL
    zero = xp.zeros_like(x)
    xs = xp.where(small, x, zero)
    xl = xp.where(small, zero, x)
    if w_exp is None:
        w_exp = xp.exp(xp.where(small, zero, log_w_exp))
    big = w_exp - w * (1 + xl)
    return xp.where(small, w * _phi_series(xp, xs), big)


def _log_of_mass(xp, outside, lw, inside, empty):
    """log of a side's mass on ``inside``, given its mass ``outside`` (accurate at both ends)."""
    neg_inf = const(xp, -math.inf, lw)
    use_log1p = outside < 0.5
    o = xp.where(use_log1p, outside, xp.zeros_like(outside))
    via_log1p = xp.log1p(-o)
    # log-sum-exp of the normalised log-probabilities over `inside`; rows with nothing inside,
    # and rows that take the log1p route, are fed zeros (double where: no nan gradient comes
    # back from an all -inf row or from a branch that is not used)
    sel = xp.where(inside, lw, neg_inf)
    sel = xp.where(empty | use_log1p[..., None], xp.zeros_like(sel), sel)
    via_lse = logsumexp(xp, sel, axis=-1)[..., 0]
    return xp.where(use_log1p, via_log1p, via_lse)


@dataclass
class _Pair:
    common: object  # T: both p_i > 0 and q_i > 0
    d: object  # log(q_i / p_i) on T (normalised sides), 0 elsewhere; None unless asked for
    p_out: object  # p's mass outside T (where q = 0)
    q_out: object  # q's mass outside T (where p = 0)
    p_escapes: object  # row has p_i > 0 = q_i
    q_escapes: object  # row has q_i > 0 = p_i
    kl: object  # KL(p || q), +inf where p escapes
    nan_rows: object  # 0, or nan on rows with a nan input
    dq: object = None  # d in units (``_to_true``), not clamped (d beyond finfo.max: wide rows)
    dcq: object = None  # d - E_p[d] in units on T, from the exact log-ratio (with d)


# A side whose row maximum is at least this large in magnitude is shifted by it before the two
# sides are compared: x - max x is then exact (Sterbenz) for every entry within 32 nats of the
# maximum, the only ones with mass e^-32 or more; smaller maxima keep the raw input (exact).
_SHIFT_FROM = 64.0


def _two_diff(a, b):
    """a - b as an unevaluated sum hi + lo, exactly (TwoSum; no overflow for |a|, |b| below
    finfo.max / 2). The rounding error lo is a constant to autodiff (its derivative is 0; left
    to autodiff, its terms would cancel as g - g, and as inf - inf = nan in a Hessian where g
    overflows): d(hi + lo) = da - db."""
    hi = a - b
    bb = hi - a
    lo = (a - (hi - bb)) + (-b - bb)
    return hi, stop_gradient(lo)


def _to_true(v, t):
    """A log-ratio quantity carried in units (``_pair``: min(T, 1) / 4 of a nat) back in nats:
    ``v * 4 / T`` below T = 1, ``v * 4`` otherwise (+-inf where the true value is beyond the
    float range)."""
    v = v * 4
    return v / t if t < 1.0 else v


def _to_units(v, t):
    """A quantity in nats in the units of ``_to_true`` (the inverse)."""
    return (v * t) * 0.25 if t < 1.0 else v * 0.25


def _quarter_shifted(xp, S: _Side, big):
    """The side's log-space input shifted by its row maximum where that is large and quartered:
    ``(raw - a) / 4`` with a = max (|max| >= _SHIFT_FROM) or 0; and a. In quarters the exact
    difference of two such sides, and of two such differences, never overflows, even for
    float32 rows holding both +-3e38 (a row wider than finfo.max is taken exactly)."""
    if S.m is None:  # probabilities: raw = log p in [-745, 0], nothing to shift
        return S.raw * 0.25, xp.zeros_like(S.raw[..., :1])
    m = S.m
    a = xp.where(xp.abs(m) >= _SHIFT_FROM, m, xp.zeros_like(m))
    a = xp.where(xp.abs(a) <= big, a, xp.zeros_like(a))  # a nan or +-inf maximum stays in
    return S.raw * 0.25 - a * 0.25, a


def _log_delta(xp, P: _Side, Q: _Side, T):
    """log(q_i / p_i) on T up to a row constant, in units, exact to the last bit of the inputs.

    Each side is shifted by its own row maximum when that is large (``_quarter_shifted``: a row of
    -1e30, logits 1e4 apart, exact for every entry that carries mass), and the difference of the
    two is formed exactly as a TwoSum pair ``hi + lo`` (the raw difference of two close rows
    that differ by a constant, 0.3 or 1e30, rounds to eps * |constant| per entry, which costs
    relative accuracy at small KL). The pair is then taken relative to its value at an anchor
    entry r (p's largest logit on T; ties: q's largest there): ``t_i = (hi_i - hi_r) + (lo_i -
    lo_r)``, where ``hi_i - hi_r`` is exact for close rows, so that t carries the row-constant
    offset of neither side. Returns ``t / T`` (0 off T), ``k``, by which log(p_i) + t_i / T
    exceeds the centred log q_i: ``P.ct_r - Q.ct_r`` (0 for rows that agree at p's mode), and
    q's centred values ``Q.ct``, each in units of min(T, 1) / 4 (``_to_true``): a quarter at
    T >= 1; below T = 1 the raw quarters before the division by T, so that a log-ratio x / T
    beyond the float range (float64 logits of +-1.7e308 at T = 0.5) is carried exactly.
    """
    zero = xp.zeros_like(P.c)
    t = P.temperature
    dt = P.c.dtype
    big = xp.finfo(dt).max
    neg_inf = const(xp, -math.inf, zero)
    # the difference of the two sides is taken from the raw inputs, neither side shifted: the
    # TwoSum pair is exact whatever the offset, while a side's shift by its own maximum rounded
    # the entries far below it (2 - 3e38 and -1 - 3e38 are the same float32), and those can
    # carry the other side's mass (a huge KL whose gradient is O(1))
    yh, b = _quarter_shifted(xp, Q, big)  # (q's shifted values: ctq below)
    # the anchor: the largest p logit on T (exact ties only), q's largest value among those
    xT = xp.where(T, P.raw, neg_inf)
    xr = stop_gradient(xp.max(xT, axis=-1, keepdims=True))
    yr = stop_gradient(xp.max(xp.where(T & (xT == xr), Q.raw, neg_inf), axis=-1, keepdims=True))
    ok = xp.isfinite(xr) & xp.isfinite(yr)  # rows with an empty T (or a nan) get a safe anchor
    fzero = xp.zeros_like(xr)
    xr = xp.where(ok, xr, fzero)
    yr = xp.where(ok, yr, fzero)
    hr, lr = _two_diff(yr * 0.25, xr * 0.25)
    hi, lo = _two_diff(Q.raw * 0.25, P.raw * 0.25)
    d = (hi - hr) + (lo - lr)
    # k = P.ct_r - Q.ct_r, each side's centred value at the anchor, and q's centred values
    # Q.ct, in quarters and not clamped: c / 4 = raw / 4 - m / 4 (= the shifted quarter itself
    # where the side was shifted by its maximum; a probability side is not centred: ct = raw)
    ctp = xr * 0.25 - (P.m * 0.25 if P.m is not None else fzero)
    ctq_r = yr * 0.25 - (Q.m * 0.25 if Q.m is not None else fzero)
    ctq = Q.ct * 0.25
    if Q.m is not None:
        shifted = b != 0
        ctq = xp.where(shifted, yh, Q.c * 0.25)
    k = ctp - ctq_r
    if t > 1.0:  # (below T = 1 the units are T / 4: the raw quarters as they are)
        k = k / t
        d = d / t  # the difference first, then the temperature: keeps its accuracy
        ctq = ctq / t
    return xp.where(T, d, zero), xp.where(ok, k, fzero), ctq


def _wide_side(xp, S: _Side, dt):
    """The fields of ``S`` that ``_log_delta`` reads, in the wider dtype ``dt``; a probability
    side takes its logarithm there (log p rounded to float32 costs eps * |log p| per entry,
    which is all of a KL of 1e-9's accuracy)."""
    if S.m is None:  # probabilities: raw = log p, taken anew from the wider p
        x = xp.astype(S.x, dt)
        raw = xp.where(S.support, _log_pos(xp, xp.where(S.support, x, xp.ones_like(x))),
                       xp.zeros_like(x))
        return replace(S, raw=raw, c=raw, ct=raw)
    if S.px is not None:  # probabilities at T != 1: log p in the wider dtype, centred there
        x = xp.astype(S.px, dt)
        raw = xp.where(S.support, _log_pos(xp, xp.where(S.support, x, xp.ones_like(x))),
                       const(xp, -math.inf, x))
        m = stop_gradient(xp.max(raw, axis=-1, keepdims=True))
        big = const(xp, -xp.finfo(dt).max, x)
        c = raw - m
        c = xp.where(c < big, big, c)
        ct = c / S.temperature
        ct = xp.where(ct < big, big, ct)
        return replace(S, raw=raw, c=c, ct=ct, m=m)
    return replace(S, raw=xp.astype(S.raw, dt), c=xp.astype(S.c, dt), ct=xp.astype(S.ct, dt),
                   m=xp.astype(S.m, dt))


def _log_delta_mixed(xp, P: _Side, Q: _Side, T):
    """``_log_delta``; with one side probabilities and the other log-space in float32, the
    log-ratio is formed in float64 where the namespace has it (NumPy, torch on CPU and CUDA,
    JAX with x64 enabled) and rounded once: ~1e-6 relative at KL = 1e-9, as logits against
    logits (log p in float32 gave 3e-4). Elsewhere (JAX without x64) it stays float32."""
    if (P.m is None and Q.m is None) or P.raw.dtype != xp.float32:
        return _log_delta(xp, P, Q, T)
    if P.m is not None and Q.m is not None and P.px is None and Q.px is None:
        return _log_delta(xp, P, Q, T)  # log-space on both sides: exact in float32
    dt = wide_float(xp, P.raw)
    if dt is None:
        return _log_delta(xp, P, Q, T)
    delta, k, ctq = _log_delta(xp, _wide_side(xp, P, dt), _wide_side(xp, Q, dt), T)
    fmax = float(xp.finfo(P.raw.dtype).max)
    return tuple(xp.astype(xp.clip(v, -fmax, fmax), P.raw.dtype) for v in (delta, k, ctq))


def _pair(xp, P: _Side, Q: _Side, need_d: bool = False) -> _Pair:
    """Accurate log-ratio and masses of two sides; see the module docstring for the algebra.

    The per-entry log-ratio ``d`` is formed only when asked (JS and Jeffreys need it; the KL
    itself does not), so that the KL's hot path carries no elementwise work it does not use.
    """
    sub = None if need_d else _subnormal_rows(xp, P, Q)
    if sub is not None:  # derivatives from the plain formula on these rows (see there)
        P0, Q0 = P, Q
        P, Q = _freeze_rows(xp, P, sub), _freeze_rows(xp, Q, sub)
    T = P.support & Q.support
    zero = xp.zeros_like(P.w)
    if P.space == "probs" and Q.space == "probs":
        one = const(xp, 1.0, P.w)
        ps = xp.where(T, P.x, one)
        qs = xp.where(T, Q.x, one)
        # within a factor 2 the difference q - p is exact (Sterbenz) and log1p of the quotient
        # keeps full relative accuracy; farther apart, log q - log p has no cancellation to fear
        # (and a quotient could round to -1 or overflow for tiny or subnormal p)
        if is_jax_array(ps):  # XLA on CPU reads subnormal operands as 0: scale them first
            ps, qs = _unflushed_pair(xp, ps, qs)
        near = (qs >= 0.5 * ps) & (qs <= 2 * ps)
        pn = xp.where(near, ps, one)
        qn = xp.where(near, qs, one)
        tiny = _tiny_scale(xp, pn)  # (q - p) / p of tiny p: a finite second derivative
        if tiny is not None:
            pn = pn * tiny[0]
            qn = qn * tiny[0]
        delta = xp.where(near, xp.log1p((qn - pn) / pn), Q.raw - P.raw) * 0.25
        k = None
    else:
        delta, k, ctq_side = _log_delta_mixed(xp, P, Q, T)
    p_out = xp.sum(xp.where(T, zero, P.w), axis=-1)
    q_out = xp.sum(xp.where(T, zero, Q.w), axis=-1)
    empty = ~xp.any(T, axis=-1, keepdims=True)
    log_pT = _log_of_mass(xp, p_out, P.lw, T, empty)
    log_qT = _log_of_mass(xp, q_out, Q.lw, T, empty)
    # p restricted to T and renormalised, in log space: p's mass on T may underflow to 0 while
    # its log-probabilities there are finite
    lpT = xp.where(empty, xp.zeros_like(log_pT[..., None]), log_pT[..., None])
    # (selected again after the exponential: an entry whose weight underflows to 0 passes no
    # gradient back, as its product with a huge log-ratio would overflow there: inf * 0)
    u = xp.where(T, P.lw - lpT, const(xp, -math.inf, zero))  # log p_i restricted to T
    e = xp.exp(u)
    wn = xp.where(e > 0, e, zero)
    # one more exact-in-spirit renormalisation: the weights must sum to 1 to the last bit for the
    # centring below to cancel a common offset of the log-ratio
    s = xp.sum(wn, axis=-1, keepdims=True)
    s = xp.where(empty, xp.ones_like(s), s)
    wn = wn / s
    # delta is the log-ratio in units of min(T, 1) / 4 (``_to_true``: no overflow for float32
    # rows spanning +-3e38, nor for x / T beyond the float range): so is mu. Entries of weight
    # 0 take no part (their delta, up to finfo.max, would send an inf gradient into the
    # weights, and inf * 0 through the renormalisation: a nan)
    mu = xp.sum(wn * xp.where(wn > 0, delta, zero), axis=-1, keepdims=True)
    # centred log-ratio d' (on T). Clamped to the float range: |delta - mu| can exceed it only
    # where p_i or q_i is 0 numerically, and an inf there would meet a zero weight (0 * inf)
    fmax = xp.finfo(delta.dtype).max
    t = P.temperature
    dcq = delta - mu
    dc = xp.clip(_to_true(dcq, t), -fmax, fmax)
    deltaq, muq = delta, mu
    # log(wn_i e^{d'_i}) = lwn + d', formed from q's side: lwn + delta = Q.ct + k - P.norm - lpT
    # - log s exactly, and p cancels. Adding lwn to d' numerically would not do where p has a
    # huge finite negative logit (-1e30: both terms ~1e30, their sum noise).
    # In units, as delta (q's centred value ctq and k included): the sum is in range where
    # its parts are not (float32 rows holding both +-3e38); scaling by 4 rounds nothing.
    offset = _to_units(P.norm + lpT + xp.log(s), t) + muq
    if k is not None:
        offset = offset - k
        ctq = ctq_side
    else:
        ctq = Q.ct * 0.25
    lwu = ctq - offset
    lwx = xp.where(T, xp.clip(_to_true(lwu, t), -fmax, fmax), zero)
    # L = log E_p[exp(d')] = log1p(E_p[phi(d')]). When some p_i exp(d'_i) is huge (logits far
    # apart: KL in the tens), E_p[phi] would overflow although L is modest: such rows take the
    # log-sum-exp of log p_i + d'_i instead (no cancellation to fear there, L > 20).
    neg_inf = const(xp, -math.inf, dc)
    top = xp.max(xp.where(T, lwx, neg_inf), axis=-1, keepdims=True)
    huge = top > 20.0
    dc_small = xp.where(huge, zero, dc)
    L_small = xp.log1p(xp.sum(xp.where(T, _w_phi(xp, wn, dc_small, log_w_exp=lwx), zero), axis=-1))
    # (in units: L and E_p[d] may lie beyond the float range where the row is that wide, and
    # the centred log-ratio d' + E_p[d] must not meet a clamped mean: a sign-flipped log-ratio)
    lt = xp.where(T & huge, lwu, neg_inf)
    lt = xp.where(huge, lt, zero)
    top_u = stop_gradient(xp.max(lt, axis=-1, keepdims=True))
    Lu_large = top_u[..., 0] + _to_units(logsumexp(xp, _to_true(lt - top_u, t), axis=-1)[..., 0], t)
    Lu = xp.where(huge[..., 0], Lu_large, _to_units(L_small, t))
    L = xp.where(huge[..., 0], _to_true(Lu_large, t), L_small)
    mean_du = _to_units(log_qT - log_pT, t) - Lu  # E_{p restricted to T}[log q/p], in units
    mean_d = xp.clip(_to_true(mean_du, t), -fmax, fmax)
    d = dq = None
    if need_d:
        dq = _log_ratio_quarter(xp, P, Q, T, deltaq, muq, dcq, mean_du)
        d = xp.clip(_to_true(dq, t), -fmax, fmax)
    p_escapes = xp.any(P.support & ~Q.support, axis=-1)
    q_escapes = xp.any(Q.support & ~P.support, axis=-1)
    inf = const(xp, math.inf, L)
    # a value that reached finfo.max went through a clamp (log-ratios beyond the float range):
    # the true value is at least that large, so it overflows, as IEEE arithmetic would
    kl = L - xp.where(p_escapes, xp.zeros_like(log_qT), log_qT)
    kl = xp.where(p_escapes | (kl >= xp.finfo(L.dtype).max), inf, kl)
    # KL >= 0: a rounding residue below 0 (1e-54 for shifted identical rows) is the exact 0
    kl = xp.where(kl < 0, xp.zeros_like(kl), kl)
    if not need_d and (_may_differentiate(P.x) or _may_differentiate(Q.x)):
        # (JS and Jeffreys, need_d, do not use this KL)
        kl = _kl_derivatives(xp, P, Q, T, wn, dcq, dc, mean_d, kl, p_escapes)
    if sub is not None:
        kl = _subnormal_weight_derivatives(xp, P0, Q0, T, dc, kl, sub)
    # 0 on every row, nan on a row with a nan (its normaliser is nan): an escape's +inf must
    # not hide it
    nan_rows = 0 * (P.norm + Q.norm)[..., 0]
    return _Pair(T, d, p_out, q_out, p_escapes, q_escapes, kl + nan_rows, nan_rows, dq,
                 dcq if need_d else None)


def _kl_derivatives(xp, P: _Side, Q: _Side, T, wn, dcq, dc, mean_d, kl, escapes):
    """``kl`` (finite rows) with the derivatives (first and second) of the plain formula
    F = sum_T p_i r_i, r = log p - log q, each first derivative formed with no cancellation.

    Autodiff of the accurate value, or of F, forms the derivative with respect to p's input at
    p's largest entry k (p_k ~ 1 on a peaked row) as p_k (r_k - F): a tiny difference of two
    numbers of the size of KL (float32 logits of std 20: O(1) per row; 15% at [20, 0, 0, 3]
    against [0, 20, 0, -5]), and rows with a large KL carry a row constant of up to ~1e30 in
    every log-ratio. Here, with x and y the two sides' raw log-space inputs (log p for
    probabilities), the first differential
        dF = sum_i dp_i c_i + sum_j (q_j - p_j) dy_j / T,   c = r - F = -d' (the centred
    log-ratio, exact at p's mode, where it is 0 in ``_log_delta``'s anchoring)
    is taken with c and q - p as constants (q - p as p expm1(d) where |d| < 1): dp_i c_i reaches
    x_k as p_k c_k / T - p_k (sum p c) / T, and sum p c is 0 to the rounding of its terms. The
    terms that cancel in math (sum p_i d log p_i = 0) are left out. Second derivatives
        d2F = sum d2p_i c_i + sum dp_i (dlog p_i - dlog q_i) + sum (dq_j - dp_j) dy_j / T
              + sum (q_j - p_j) d2y_j / T
    come from products of two zero-valued differences (``0.5 * dp * dl``: first derivative
    exactly 0, second derivative dp dl), so the first derivative meets no extra rounding."""
    zero = xp.zeros_like(wn)
    pos = T & (wn > 0)
    jax_probs = P.m is None and is_jax_array(wn)
    # (JAX probabilities: a subnormal p_i reads as wn_i = 0 in comparisons, yet has weight)
    c4 = stop_gradient(xp.where(T if jax_probs else pos, -dcq, zero))  # r - F in units
    dw = wn - stop_gradient(wn)
    if jax_probs:
        # probabilities on JAX: the weights' derivative from x / z, 1 / z per entry. XLA on CPU
        # flushes a subnormal weight e^u (and its cotangent) to 0, which lost the whole
        # derivative at a subnormal p_i (O(1): (r_i - F) / z)
        xt = xp.where(T, P.x, zero)
        zt = xp.sum(xt, axis=-1, keepdims=True)
        wx = xt / xp.where(zt > 0, zt, xp.ones_like(zt))
        dw = wx - stop_gradient(wx)
    # sum dw_i c_i: 0 in value (a row whose KL overflows keeps +inf), and nan in value exactly
    # on the rows where some c_i (c4_i in nats) is beyond the float range (0 * inf): see
    # _wide_p_terms
    c = _to_true(c4, P.temperature)
    g = xp.sum(dw * c, axis=-1)
    wide = xp.isnan(g)
    if not is_concrete(g) or bool(xp.any(wide)):
        g = _wide_p_terms(xp, P, pos, wn, c4, c, dw, wide)
    # log(q_i / p_i) = d' + E_p[d]; where the mean is large (a KL of 1e38) the sum is noise,
    # and such rows have |q - p| of order 1 somewhere: q - p as the difference there
    d = xp.where(T, dc + mean_d[..., None], zero)
    near = T & (xp.abs(d) < 1) & (xp.abs(mean_d) < 1)[..., None]
    qmp = xp.where(near, wn * xp.expm1(xp.where(near, d, zero)), Q.w - wn)
    sq = Q.support
    rq = xp.where(sq, Q.raw, zero)
    dy = rq - stop_gradient(rq)
    if Q.temperature != 1.0:
        dy = dy / Q.temperature
    coef = stop_gradient(qmp)
    if Q.m is None and is_jax_array(wn):
        # probabilities on JAX, at a subnormal q_j: the coefficient q_j - p_j of d log q_j is
        # itself flushed to 0 by XLA (and so was the derivative, whose true value
        # (q_j - p_j) / x_j = (1 - e^-d_j) / z is O(1) or overflows): formed per x_j instead
        sub = sq & subnormal(Q.x)
        xq = xp.where(sq, Q.x, zero)
        zq = stop_gradient(xp.sum(xq, axis=-1, keepdims=True))
        # (where e^-d_j overflows, as h * h with h = e^(-d_j / 2): the product forms in the
        # derivative only, +-inf there, and the value stays 0 * finite)
        zq = xp.where(zq > 0, zq, xp.ones_like(zq))
        big = T & sub & (d < -40.0)
        h = stop_gradient(xp.exp(xp.where(big, -0.5 * d, zero)))
        rho = xp.where(T, -xp.expm1(-xp.where(T & sub & ~big, d, zero)), xp.ones_like(d))
        rho = stop_gradient(xp.where(big, -h, rho) / zq)
        g = g + xp.sum(xp.where(sub, (rho * (xq - stop_gradient(xq))) * h,
                                zero), axis=-1)
        coef = xp.where(sub, zero, coef)
    g = g + xp.sum(xp.where(sq, coef * dy, zero), axis=-1)
    dl = _dlog(xp, P, pos) - _dlog(xp, Q, pos)
    dq = Q.w - stop_gradient(Q.w)
    # sum dw_i (dl_i - dy_i) + sum dq_j dy_j, each anchored at its side's mode (_anchored_sum:
    # the weights' derivative there, 1 - w_top, is not formed)
    wsup = T if jax_probs else pos
    g = g + 0.5 * (_anchored_sum(xp, dw, dl - xp.where(T, dy, zero), wn, wsup)
                   + _anchored_sum(xp, dq, xp.where(sq, dy, zero), Q.w, sq))
    # g is 0 in value: the value is kl itself, +inf on a row whose true KL exceeds the float
    # range (its derivatives are still the finite, exact ones); a row where p escapes (p_i > 0
    # = q_i: +inf for a structural reason) or that holds a nan keeps a zero derivative. The
    # value's own graph is cut (a zero cotangent through it would meet 0 * inf = nan).
    kl0 = stop_gradient(kl)
    ok = ~escapes & ~xp.isnan(kl0)
    return xp.where(ok, kl0 + g, kl0)


def _wide_p_terms(xp, P: _Side, pos, wn, c4, c, dw, wide):
    """sum dw_i c_i (``_kl_derivatives``), with rows ``wide`` (some |c_i| beyond finfo.max:
    logits within a factor of a few of the float limit, or |x / T| that large) taken without
    c: reverse-mode autodiff through w would carry the cotangent c_i itself (inf) and multiply
    it by p_i (a tiny p_i times an inf: inf where p_i c_i is a modest number).

    There, with k_i = p_i c_i in units (``_to_true``; a constant; sum k = 0 in math, so the
    normalisers' first derivatives drop out), the first differential is sum k_i d raw_i / T: its
    cotangents are the exact derivatives themselves, +-inf only where those overflow. Second
    derivatives: sum p_i c_i (dlog p_i)^2 / 2 from a product of zero-valued differences, and
    raw's own (log x of probabilities) through the first term. Its Hessian,
    sum_i p_i c_i (e_i - p)(e_i - p)^T / T^2, is a cancelling sum of terms up to |p_i c_i| / T^2
    (2 entries, p = (1/2, 1/2): p_0 c_0 (1 - 2 p_0) / T^2 = 0 exactly; float32 [0, 0] against
    [-3e38, 3e38] at T = 0.5 has p_0 c_0 = 3e38), whose double backward through dlog p
    overflowed (the normaliser's cotangent sum_i p_i c_i (e_i - p)_a / T^2 = 6e38 there: inf -
    inf, a nan p-p block). So dlog p is taken as the centred differential of the raw inputs,
    d raw - sum_j p_j d raw_j with p a constant (dlog p's first derivative: only that enters),
    scaled by s / T (s = 4 / min(T, 1)), and p_i c_i by 1 / s^2 (k itself times min(T, 1) / 4:
    no clamp): each entry's cotangent is at most |p_i c_i| / 4, and the scale s / T applies
    last, to the centred sum (+-inf only where the Hessian entry itself overflows). (Entries
    whose weight underflows to 0 pass nothing: float64 logits of 1.7e308 at T = 1e-3 leave p's
    gradient, ~1e-120, at 0.)"""
    zero = xp.zeros_like(wn)
    wr = wide[..., None]
    k = stop_gradient(xp.where(pos & wr, wn * c4, zero))
    raw = xp.where(pos, P.raw, zero)
    t = P.temperature
    draw = _to_true(raw - stop_gradient(raw), t)
    if t != 1.0:
        draw = draw / t
    # s / T times the differential of log p (``_dlog``: d raw / T - d norm, d norm = sum_j p_j
    # d raw_j / T over the support; w is 0 off the support, k 0 off ``pos``)
    r = xp.where(P.support, P.raw, zero)
    e = (r - stop_gradient(r)) * (4.0 / (t * min(t, 1.0)))
    dl = e - xp.sum(stop_gradient(P.w) * e, axis=-1, keepdims=True)
    ks = k * (min(t, 1.0) / 4.0)  # p_i c_i / s^2
    g_wide = xp.sum(k * draw, axis=-1) + 0.5 * xp.sum(ks * (dl * dl), axis=-1)
    g_narrow = xp.sum(dw * xp.where(wr, zero, c), axis=-1)
    return xp.where(wide, g_wide, g_narrow)


def _subnormal_weight_derivatives(xp, P: _Side, Q: _Side, T, dc, kl, rows):
    """Rows where a probability (p's or q's) is so small that its reciprocal nears finfo.max
    (float32 subnormals): ``kl`` with the derivatives of the plain formula F = sum p_i r_i
    (r = log p - log q) formed so that second derivatives are right: the diagonal entry
    1/(z p_i) overflows to +inf there (correctly rounded), and nothing else becomes inf or nan.

    Autodiff of the accurate value (or of the plain formula) reaches log p_i with a cotangent of
    the size of p_i and divides it by p_i; differentiating that again multiplies 1/p_i (inf)
    into p_i's graph: a whole Hessian row of inf and nan. Here, with w = x / z (x the input on
    T), the differential is assembled from pieces whose derivatives stay finite:
        dF = sum dw_i (r_i - F) + sum w_i d(-log z - log q_i) + d(z) / z
    with r - F the accurate centred log-ratio (a constant to autodiff), and the second
    derivative of sum w_i log x_i, sum dx_i^2 / (z x_i) - 2 dz^2 / z^2, carried by x log x (a
    primitive whose derivatives are log x + 1 and 1/x: ``xlogx``) and by d(z) / z. The accurate
    value was computed from both sides frozen on these rows (``_freeze_rows``; a discarded
    branch would still multiply inf by 0 in the second derivative). Where p is log-space (the
    small probability on q's side), sum w_i d log p_i has no such product and is kept whole."""
    rows = rows & xp.isfinite(stop_gradient(kl))  # +inf rows keep their zero derivative
    if P.m is not None:
        zero = xp.zeros_like(P.lw)
        e = xp.where(T, xp.exp(P.lw), zero)
        w = e / xp.sum(e, axis=-1, keepdims=True)
        c = stop_gradient(xp.where(T, -dc, zero))
        r = xp.where(T, _dlog(xp, P, T) - _dlog(xp, Q, T), zero)
        g = xp.sum(w * c, axis=-1) + xp.sum(w * r, axis=-1)
        return xp.where(rows, stop_gradient(kl) + (g - stop_gradient(g)), kl)
    x = P.x
    zero = xp.zeros_like(x)
    one = const(xp, 1.0, x)
    xs = xp.where(T, x, one)  # safe values off T (double where)
    xt = xp.where(T, xs, zero)
    z = xp.sum(xt, axis=-1, keepdims=True)
    z = xp.where(z > 0, z, xp.ones_like(z))
    w = xt / z
    c = stop_gradient(xp.where(T, -dc, zero))  # r - F
    z0 = stop_gradient(z)
    l1 = stop_gradient(xp.log(xs) + 1)  # the derivative of x log x, as the primitive forms it
    k = xp.where(T, (xlogx(xp, xs) - stop_gradient(xlogx(xp, xs))) - l1 * (xs - stop_gradient(xs)),
                 zero)
    log_z = xp.log(z)
    rho = -(log_z - stop_gradient(log_z)) - _dlog(xp, Q, T)  # d(-log z) - d(log q), 0 in value
    g = (xp.sum(w * c, axis=-1) + xp.sum(xp.where(T, w * rho, zero), axis=-1)
         + xp.sum(k, axis=-1) / z0[..., 0] + xp.sum(xt - stop_gradient(xt), axis=-1) / z[..., 0])
    return xp.where(rows, stop_gradient(kl) + (g - stop_gradient(g)), kl)


def _subnormal_rows(xp, P: _Side, Q: _Side):
    """Rows where a side given as probabilities has an entry below 16 / finfo.max, whose
    reciprocal nears overflow (only where a side can be differentiated, known without
    tracing); None when there is none (the usual case: a comparison per probability side)."""
    if not (_may_differentiate(P.x) or _may_differentiate(Q.x)) or not is_concrete(P.x):
        return None
    rows = None
    for S in (P, Q):
        if S.m is None:
            lim = 16.0 / float(xp.finfo(S.x.dtype).max)
            r = xp.any(S.support & (S.x < lim), axis=-1)
            rows = r if rows is None else rows | r
    return rows if rows is not None and bool(xp.any(rows)) else None


def _freeze_rows(xp, S: _Side, rows):
    """``S`` with every differentiable field a constant to autodiff on ``rows``."""
    r = rows[..., None]

    def f(v):
        return xp.where(r, stop_gradient(v), v)

    return replace(S, x=f(S.x), w=f(S.w), raw=f(S.raw), lw=f(S.lw), c=f(S.c), ct=f(S.ct),
                   norm=f(S.norm))


def _mode(xp, w, where):
    """A one-hot mask of each row's largest ``w`` on ``where`` (the first of ties)."""
    v = stop_gradient(xp.where(where, w, const(xp, -math.inf, w)))
    idx = xp.argmax(v, axis=-1, keepdims=True)
    return xp.arange(w.shape[-1], device=device(w)) == idx


def _dlog_anchored(xp, S: _Side):
    """0 in value, the differential of the side's normalised log-probabilities in derivative
    (as ``_dlog``, on the support) with the mode k's coefficient in its own entry formed as
    the others' mass: dlog w_k = r draw_k / T - sum_{j != k} w_j draw_j / T, r = sum_{j != k}
    w_j, and dlog w_i = draw_i / T - w_k draw_k / T - sum_{j != k} w_j draw_j / T elsewhere,
    so that the entry at a saturated mode, (1 - w_k) / T, keeps its digits (as a sum of
    cotangents 1 - w_k would round to 0). For products of differences (second derivatives
    only): its own derivative is first order, w a constant."""
    where = S.support
    zero = xp.zeros_like(S.raw)
    raw = xp.where(where, S.raw, zero)
    d = raw - stop_gradient(raw)
    if S.temperature != 1.0:
        d = d / S.temperature
    top = _mode(xp, S.w, where)
    w = stop_gradient(xp.where(where, S.w, zero))
    rest = where & ~top
    r = xp.sum(xp.where(rest, w, zero), axis=-1, keepdims=True)
    wk = xp.sum(xp.where(top, w, zero), axis=-1, keepdims=True)
    dk = xp.sum(xp.where(top, d, zero), axis=-1, keepdims=True)
    mean = xp.sum(xp.where(rest, w * d, zero), axis=-1, keepdims=True)
    return xp.where(top, r * d - mean, xp.where(where, d - wk * dk - mean, zero))


def _anchored_sum(xp, dw, a, w, where):
    """sum_i dw_i a_i over ``where`` (dw = w - stop_gradient(w), w summing to 1 there; a a
    zero-valued differential), as sum_{i != k} dw_i (a_i - a_k), k the row's mode of w: equal in
    math (sum dw = 0), and the derivative of w_k, formed by autodiff as w_k (1 - w_k) with
    1 - w_k rounded (0 on a peaked float32 row), never enters. 0 in value and first derivative;
    its second derivative is the product of the two (a peaked row's largest Hessian entries,
    of the size of 1 - w_k)."""
    zero = xp.zeros_like(dw)
    top = _mode(xp, w, where)
    a = xp.where(where, a, zero)
    ak = xp.sum(xp.where(top, a, zero), axis=-1, keepdims=True)
    return xp.sum(xp.where(where & ~top, dw * (a - ak), zero), axis=-1)


def _dlog(xp, S: _Side, where):
    """0 in value, the differential of the side's normalised log-probabilities in derivative
    (d raw / T - d norm), on ``where``: unlike ``S.lw``, not cut off by the clamp at
    -finfo.max (an entry more than finfo.max below its row maximum still has derivative 1)."""
    zero = xp.zeros_like(S.raw)
    raw = xp.where(where, S.raw, zero)  # -inf off the support: no inf - inf
    d = raw - stop_gradient(raw)
    if S.temperature != 1.0:
        d = d / S.temperature
    return d - (S.norm - stop_gradient(S.norm))


def _may_differentiate(x) -> bool:
    """False only where no derivative can be taken of ``x`` (a torch tensor that does not require
    grad, a NumPy array): the core then skips work that only serves derivatives."""
    rg = getattr(x, "requires_grad", None)
    if rg is not None:
        return bool(rg)
    return not type(x).__module__.startswith(("numpy", "array_api_strict"))


def _log_ratio_quarter(xp, P, Q, T, deltaq, muq, dcq, mean_du):
    """log(q_i / p_i) on T (0 elsewhere) in units of min(T, 1) / 4 (``_to_true``), entry by
    entry by the more accurate of two routes (no overflow for float32 rows holding both +-3e38,
    nor for x / T beyond the float range; ``dcq`` is d' and ``mean_du`` E_p[d], in units).

    The centred route, d' + E_p[d], carries rounding errors of the size of |delta - mu| +
    |mean_d| (small in the usual rows); the direct difference of the normalised
    log-probabilities, of the size of |lw_p| + |lw_q|. A row where q is astronomically small
    somewhere p is not (a logit of -1e30 against a normal one) drags mu to ~1e28 and the centred
    value of every other entry to noise.
    """
    t = P.temperature
    d = xp.where(T, dcq + mean_du[..., None], xp.zeros_like(dcq))
    err_centred = xp.abs(deltaq) + xp.abs(muq) + xp.abs(mean_du)[..., None]
    lpu, lqu = _to_units(P.lw, t), _to_units(Q.lw, t)
    err_direct = xp.abs(lpu) + xp.abs(lqu)
    # a log-probability at -finfo.max went through the clamp: the direct route is a bound there
    # (at T > 1 the clamp acts on the centred input before the division: c = -finfo.max)
    fmax = xp.finfo(dcq.dtype).max
    lp = P.c if P.temperature > 1.0 else P.lw
    lq = Q.c if Q.temperature > 1.0 else Q.lw
    direct = T & (err_direct < err_centred) & (lp > -fmax) & (lq > -fmax)
    return xp.where(direct, lqu - lpu, d)


def _c_exp(xp, c, lc, d):
    """c e^d for a constant c > 0 (lc = log c) and d with c e^d <= e: the product where c is
    a normal number of any dtype (exp(d) <= e / c stays in range), e^(d + log c) below 2^-60
    (float32's exp(d) would overflow before c e^d reaches e, and c itself may be subnormal)."""
    return c * xp.exp(d) if c >= 2.0**-60 else xp.exp(d + lc)


def _log_mix(xp, c, d, b=None):
    """log(b + c e^d) with b = 1 - c, 0 < c < 1, to the last bits for every c and d: JS's
    log(m / p) (c = 1 - beta, b = beta) and log(m / q) (c = beta). Pass ``b`` (beta itself)
    where c is 1 - beta: 1 - c in floating point has lost a tiny beta's digits.

    log1p(x), x = c (e^d - 1), where x >= -1/2 (x formed without cancellation: expm1 within
    1/2 of 0, e^d - 1 beyond); where x < -1/2 (c > 1/2, e^d < 1/2) the sum b + c e^d of two
    positive terms (1 + x had lost beta's digits: eps / beta relative off where e^d << beta);
    where c e^d > e, log(c e^d) + log1p(b e^-(d + log c)) (log c + d + log1p(...) cancelled
    to eps |log c| where c e^d << 1). Float32 JS with beta = 1e-6 had O(1) gradients and
    float64 at beta = 1e-12 3e-4 per row through these. expm1 is never differentiated below
    d = -1/2 (the libraries differentiate it as ``expm1(d) + 1``, 0 once expm1(d) rounds to
    -1, which lost the derivative where a probability is 1e-20 or smaller against a normal
    one).
    """
    if b is None:
        b = 1.0 - c
    lc = math.log(c)
    zero = xp.zeros_like(d)
    big = d >= 1.0 - lc  # c e^d > e (then d >= 1)
    dn = xp.where(big, zero, d)
    neg = dn < -0.5
    pos = dn > 0.5
    x_mid = c * xp.expm1(xp.where(neg | pos, zero, dn))
    x_neg = c * (xp.exp(xp.where(neg, dn, zero)) - 1)
    x_pos = _c_exp(xp, c, lc, xp.where(pos, dn, zero)) - c
    x = xp.where(neg, x_neg, xp.where(pos, x_pos, x_mid))
    m1 = x < -0.5
    small = xp.log1p(xp.where(m1, zero, x))
    summed = xp.log(b + _c_exp(xp, c, lc, xp.where(m1, dn, zero)))
    s = xp.where(big, d, zero + (1.0 - lc)) + lc  # log(c e^d) >= 1
    large = s + xp.log1p(b * xp.exp(-s))
    return xp.where(big, large, xp.where(m1, summed, small))


def _log1p_cexp(xp, c, d):
    """log(1 + c e^d) for a constant c > 0, with full relative accuracy for every d (tiny where
    c e^d is), at most finfo.max; finite first and second derivatives (double where)."""
    lc = math.log(c)
    lo = d < 1.0 - lc  # c e^d < e: log1p of it (exact for tiny c, beta near 0 or 1); beyond,
    zero = xp.zeros_like(d)  # log(c e^d) >= 1 plus a log1p: log c + d no longer cancels
    ds = xp.where(lo, d, zero)
    s = xp.where(lo, zero + (1.0 - lc), d) + lc
    small = xp.log1p(_c_exp(xp, c, lc, ds))
    large = s + xp.log1p(xp.exp(-s))
    fmax = const(xp, xp.finfo(d.dtype).max, d)
    large = xp.where(large < fmax, large, fmax)  # d near finfo.max and c > 1
    return xp.where(lo, small, large)


def _js_surrogate(xp, P, Q, T, d, dd, y, z, beta):
    """A function with the derivatives (first, second, ...) of JS_beta, formed so that the
    first derivative keeps full relative accuracy on far, nearly disjoint rows.

    With u = log(m / (beta p)) = log1p(((1 - beta) / beta) e^d) and v = log(m / ((1 - beta) q))
    = log1p((beta / (1 - beta)) e^-d) on T (0 off T), d = log(q / p),

        JS = H(beta) - beta sum p u - (1 - beta) sum q v,  H(beta) = -beta log beta - ...,

    so dJS/dp_i = -beta u_i and dJS/dq_i = -(1 - beta) v_i up to constants (which the
    normalisation's derivative removes). The value formula's derivatives are assembled by
    autodiff from y = log(m/p) = log(beta) + u, whose rounding (eps |log beta|) is all of u where
    the row is far (u ~ e^d tiny): float32 JS gradients were 1e-5..O(1) off at logits of std
    3..8. Here each side contributes sum_i w_i c_i with c_i = u_i - E_w[u] or y_i - E_w[y]
    (equal in math: per entry the one with the smaller rounding, the means constants to
    autodiff), so the cotangent reaching w_i is the centred derivative itself, small where it
    is small. The derivatives of w_i c_i through d (beta p du + (1 - beta) q dv = 0 in math) are
    each of the size of p_i q_i / m_i and cancel to that relative accuracy; differentiated again
    they give the Hessian of JS exactly (the function is JS plus a constant).
    """
    zero = xp.zeros_like(d)
    u = xp.where(T, _log1p_cexp(xp, (1 - beta) / beta, xp.where(T, d, zero)), zero)
    v = xp.where(T, _log1p_cexp(xp, beta / (1 - beta), -xp.where(T, d, zero)), zero)

    def side(w, sup, s, t, off, ds):
        s = xp.where(T, s, const(xp, off, s))  # log(m/p) = log(beta) off T (where q = 0)
        ks = stop_gradient(xp.sum(w * s, axis=-1, keepdims=True))
        kt = stop_gradient(xp.sum(w * t, axis=-1, keepdims=True))
        c = xp.where(xp.abs(s) + xp.abs(ks) <= xp.abs(t) + xp.abs(kt), s - ks, t - kt)
        # first derivative: dw_i c_i only (c a constant); the w_i dc_i terms of the two sides
        # cancel in math (to eps * p_i, all of the gradient on close rows: 1e-4 per row in
        # float32) and are left out; second derivative: dw_i dc_i from the product of two
        # zero-valued differences, whose first derivative is exactly 0, with dc_i = ds_i (the
        # constant coefficient times the anchored dd). Both anchored at the side's mode
        # (_anchored_sum: a peaked row's w_k (1 - w_k) is not formed)
        dw = w - stop_gradient(w)
        return (_anchored_sum(xp, dw, stop_gradient(c), w, sup)
                + 0.5 * _anchored_sum(xp, dw, ds, w, sup))

    # d log(m/p) = (1 - beta) q/m dd = (1 - beta) e^(d - y) dd, d log(m/q) = -beta e^(-d - z) dd
    kp = stop_gradient(xp.where(T, (1 - beta) * xp.exp(xp.where(T, d - y, zero)), zero))
    kq = stop_gradient(xp.where(T, -beta * xp.exp(xp.where(T, -d - z, zero)), zero))
    return (-beta * side(P.w, P.support, y, u, math.log(beta), kp * dd)
            - (1 - beta) * side(Q.w, Q.support, z, v, math.log1p(-beta), kq * dd))


def _plogp_second(xp, S: _Side):
    """0 in value and first derivative; second derivative sum_i dw_i^2 / w_i of the side's
    normalised probabilities w, without 1/w_i in the graph where it would overflow: for
    probabilities w = x / z, sum dx_i^2 / (z x_i) - dz^2 / z^2 from x log x (a primitive:
    its second derivative 1/x, +inf for a subnormal x, correctly rounded) and log z; for a
    log-space side sum w_i (dlog w_i)^2 (``_dlog``)."""
    sup = S.support
    zero = xp.zeros_like(S.w)
    if S.m is not None:
        dl = _dlog(xp, S, sup)
        return 0.5 * xp.sum(xp.where(sup, stop_gradient(S.w) * (dl * dl), zero), axis=-1)
    x = S.x
    xs = xp.where(sup, x, const(xp, 1.0, x))
    xt = xp.where(sup, xs, zero)
    z = xp.sum(xt, axis=-1)
    z0 = stop_gradient(z)
    l1 = stop_gradient(xp.log(xs) + 1)  # the derivative of x log x, as the primitive forms it
    ent = xlogx(xp, xs)
    k = xp.where(sup, (ent - stop_gradient(ent)) - l1 * (xs - stop_gradient(xs)), zero)
    lz = xp.log(z)
    return xp.sum(k, axis=-1) / z0 + (lz - stop_gradient(lz)) - (z - z0) / z0


def _js_subnormal_second(xp, P: _Side, Q: _Side, beta):
    """Rows with a probability below 16 / finfo.max (``_subnormal_rows``): 0 in value and first
    derivative, and the second derivative of JS that ``_js_surrogate``'s product of differences
    carries elsewhere (there it multiplies 1/p_i, inf, into p's graph: the Hessian row of that
    entry was nan). With c = beta log(p/m) and (1 - beta) log(q/m) the first derivative's
    coefficients, d2 JS = sum c d2w + beta sum dp^2/p + (1 - beta) sum dq^2/q - sum dm^2/m
    (m = beta p + (1 - beta) q): the first sum is the surrogate's (its c frozen on these rows),
    the others are formed here, the mixture's from m log m (right where m is a normal number:
    a subnormal probability on one side against a normal one on the other)."""
    zero = xp.zeros_like(P.w)
    m = beta * P.w + (1 - beta) * Q.w
    pos = m > 0
    ms = xp.where(pos, m, const(xp, 1.0, m))
    l1 = stop_gradient(xp.log(ms) + 1)
    ent = xlogx(xp, ms)
    km = xp.where(pos, (ent - stop_gradient(ent)) - l1 * (ms - stop_gradient(ms)), zero)
    return (beta * _plogp_second(xp, P) + (1 - beta) * _plogp_second(xp, Q)
            - xp.sum(km, axis=-1))


def _jeffreys_derivatives(xp, P, Q, pr, val):
    """``(val, g)``: ``val`` (Jeffreys' divergence) with the first and second derivatives of the
    plain formula, formed from log-ratios anchored at each side's mode; ``g`` carries them alone
    (0 in value).

    Autodiff of the value's own formula meets two cancellations. On rows where some
    |log(q_i / p_i)| with mass exceeds 20, d carries a large row constant (up to ~1e38 in
    float32: logits of 3e38 on one side) whose rounding (eps |d|) would enter every entry of an
    O(1) gradient (mass far below the other side's maximum). On peaked rows (float32: a mode of
    probability 1 in the dtype) the weights' derivative at the mode, w_k (1 - w_k), rounds to 0,
    and with it the Hessian's largest entries (per-block relative error 1 before). With
    r = log p - log q,
        dJ = sum dp_i (r_i - E_p r) - sum dq_i (r_i - E_q r) + sum (p_i - q_i) dr_i,
    r - E_p r from p's exact centred log-ratio (``_pair``: 0 at p's mode up to E_p), r - E_q r
    from the log-ratio anchored at q's mode (``_log_delta`` the other way round), constants to
    autodiff; q - p as p expm1(d) where |d| < 1. Rows where a centred log-ratio is beyond the
    float range (logits near the float limit: J itself may overflow to +inf, its derivatives
    are finite) take the first two sums as ``_wide_p_terms`` does. Second derivatives:
        d2J = sum d2p_i (r_i - E_p r) - sum d2q_i (r_i - E_q r) + 2 sum (dp_i - dq_i) dr_i
    (dr's own second derivative sums to 0 against p - q, for log-space inputs), the first two
    from the constants above (their entry at the mode is E_p's small size), the last from a
    product of zero-valued differences anchored at each side's mode (``_anchored_sum``)."""
    T = pr.common
    zero = xp.zeros_like(pr.d)
    # JAX probabilities (T = 1): XLA on CPU reads a subnormal weight as 0 in comparisons and
    # arithmetic, yet it carries an O(1) derivative (1e-42 against 4e-42: (r_i - E r + 1 -
    # q_i / p_i) / z): such a side takes every entry of T, and the weights' derivative from x / z
    jp = P.m is None and P.space == "probs" and is_jax_array(P.w)
    jq = Q.m is None and Q.space == "probs" and is_jax_array(Q.w)
    pp = T if jp else T & (P.w > 0)
    qq = T if jq else T & (Q.w > 0)
    cp4 = stop_gradient(xp.where(pp, -pr.dcq, zero))  # r - E_p r in units (_to_true)
    if P.m is None and Q.m is None:  # probabilities: |d| <= 745, no row constant to fear
        rq = -pr.dq
    else:
        rq = _log_delta_mixed(xp, Q, P, T)[0]  # log(p/q) in units, anchored at q's mode
    rq = stop_gradient(xp.where(qq, rq, zero))
    wq = xp.where(qq, Q.w, zero)
    sq = xp.sum(wq, axis=-1, keepdims=True)
    mq = xp.sum(wq * rq, axis=-1, keepdims=True) / xp.where(sq > 0, sq, xp.ones_like(sq))
    cq4 = stop_gradient(xp.where(qq, mq - rq, zero))  # E_q r - r in units
    near = T & (xp.abs(pr.d) < 1)
    qmp = xp.where(near, P.w * xp.expm1(xp.where(near, pr.d, zero)), Q.w - P.w)
    dr = _dlog(xp, P, T) - _dlog(xp, Q, T)
    dwp = _dweights(xp, P) if jp else P.w - stop_gradient(P.w)
    dwq = _dweights(xp, Q) if jq else Q.w - stop_gradient(Q.w)
    # entries of T subnormal on both sides, where q - p (subnormal) is flushed to 0
    sub = T & subnormal(P.x) & subnormal(Q.x) if jp and jq else None
    # +-inf beyond the float range: the sums below are nan there
    cp, cq = _to_true(cp4, P.temperature), _to_true(cq4, P.temperature)
    gp = _anchored_sum(xp, dwp, cp, P.w, pp)
    gq = _anchored_sum(xp, dwq, cq, Q.w, qq)
    wide = xp.isnan(gp) | xp.isnan(gq)
    if not is_concrete(wide) or bool(xp.any(wide)):
        gp = _wide_p_terms(xp, P, pp, P.w, cp4, cp, dwp, wide)
        gq = _wide_p_terms(xp, Q, qq, Q.w, cq4, cq, dwq, wide)
    # the coefficient of dr: the accurate p - q (first derivative), and dp - dq (second)
    keep = T if sub is None else T & ~sub
    g = (gp + gq - xp.sum(xp.where(keep, stop_gradient(qmp) * dr, zero), axis=-1)
         + _anchored_sum(xp, dwp, dr, P.w, T) - _anchored_sum(xp, dwq, dr, Q.w, T))
    if sub is not None:
        # (p_j - q_j) dr_j at such an entry, with dr_j = dx_j / x_j - dy_j / y_j (the
        # normalisers' part, (p_j - q_j) times O(1), is subnormal): autodiff forms it as a
        # flushed p_j - q_j times 1 / x_j (0 before). Its coefficients, (p_j - q_j) / x_j =
        # -expm1(d_j) / z_x and -(p_j - q_j) / y_j = -expm1(-d_j) / z_y (d = log q/p), are O(1)
        # or overflow to +-inf (as h * h, h = e^(|d| / 2): the product forms in the derivative
        # only, and the value stays 0)
        d = xp.where(sub, pr.d, zero)
        g = g + _sub_term(xp, P, sub, d) + _sub_term(xp, Q, sub, -d)
    return stop_gradient(val) + g, g


def _dweights(xp, S: _Side):
    """0 in value, the differential of a JAX probability side's weights as x / z (z the row sum
    on the support): XLA flushes a subnormal weight, and its derivative, to 0."""
    zero = xp.zeros_like(S.x)
    xt = xp.where(S.support, S.x, zero)
    zt = xp.sum(xt, axis=-1, keepdims=True)
    wx = xt / xp.where(zt > 0, zt, xp.ones_like(zt))
    return wx - stop_gradient(wx)


def _sub_term(xp, S: _Side, sub, d):
    """0 in value, sum_j -expm1(d_j) dx_j / z over ``sub`` (x the side's probabilities, z their
    row sum on the support), +-inf in derivative where the coefficient overflows."""
    zero = xp.zeros_like(S.x)
    xt = xp.where(sub, S.x, zero)
    z = stop_gradient(xp.sum(xp.where(S.support, S.x, zero), axis=-1, keepdims=True))
    z = xp.where(z > 0, z, xp.ones_like(z))
    big = sub & (d > 40.0)
    h = stop_gradient(xp.exp(xp.where(big, 0.5 * d, zero)))
    rho = -xp.expm1(xp.where(sub & ~big, d, zero))
    rho = stop_gradient(xp.where(big, -h, rho) / z)
    return xp.sum(xp.where(sub, (rho * (xt - stop_gradient(xt))) * h, zero), axis=-1)


def _rows(kind, xp, P, Q, beta):
    """Per-row divergence of the given kind (categories on the last axis)."""
    if kind == "forward":
        return _pair(xp, P, Q).kl
    if kind == "reverse":
        return _pair(xp, Q, P).kl
    sub = _subnormal_rows(xp, P, Q) if kind == "js" else None
    if sub is None:
        pr = _pair(xp, P, Q, need_d=True)
    else:  # the log-ratio a constant to autodiff on these rows (_js_subnormal_second)
        pr = _pair(xp, _freeze_rows(xp, P, sub), _freeze_rows(xp, Q, sub), need_d=True)
    zero = xp.zeros_like(pr.d)
    if kind == "jeffreys":
        d = pr.d
        small = xp.abs(d) < _SMALL
        ds = xp.where(small, d, zero)
        # p e^d = q on the common support (d = log q/p): the large branch needs no exponential
        # (the large branch in units, then scaled: d may lie beyond finfo.max where q - p
        # does not make the term overflow, in float32 rows holding both +-3e38). An entry where
        # both weights are 0 contributes 0, and no gradient: its d (up to 1e308 / T) would come
        # back as an inf cotangent on a zero weight (inf * 0 in the softmax's backward: nan)
        dql = xp.where(small | ((P.w == 0) & (Q.w == 0)), zero, pr.dq)
        term = xp.where(small, P.w * ds * xp.expm1(ds),
                        _to_true(dql * (Q.w - P.w), P.temperature))
        val = xp.sum(xp.where(pr.common, term, zero), axis=-1)
        inf = const(xp, math.inf, val)
        escapes = pr.p_escapes | pr.q_escapes
        over = val >= xp.finfo(val.dtype).max  # as in _pair: the true value overflows
        if _may_differentiate(P.x) or _may_differentiate(Q.x):
            # a row that overflows keeps the exact derivatives (_jeffreys_derivatives); a row
            # that escapes (+inf for a structural reason) a zero derivative
            val, g = _jeffreys_derivatives(xp, P, Q, pr, val)
            carry = over & ~escapes & ~xp.isnan(g)
            val = xp.where(carry, inf + g, xp.where(escapes | over, inf, val))
            return val + pr.nan_rows
        return xp.where(escapes | over, inf, val) + pr.nan_rows
    if kind == "js":
        y = _log_mix(xp, 1.0 - beta, pr.d, beta)  # log(m/p) on T
        z = _log_mix(xp, beta, -pr.d)  # log(m/q) on T
        m = beta * P.w + (1 - beta) * Q.w  # p e^y = q e^z = m, exactly
        tp = xp.where(pr.common, _w_phi(xp, P.w, y, w_exp=m), zero)
        tq = xp.where(pr.common, _w_phi(xp, Q.w, z, w_exp=m), zero)
        val = beta * xp.sum(tp, axis=-1) + (1 - beta) * xp.sum(tq, axis=-1)
        val = val - beta * math.log(beta) * pr.p_out - (1 - beta) * math.log1p(-beta) * pr.q_out
        if _may_differentiate(P.x) or _may_differentiate(Q.x):
            # the value as it is, the derivatives (of every order) from _js_surrogate; the
            # log-ratio's differential anchored at each side's mode (_dlog_anchored)
            Pf, Qf = (P, Q) if sub is None else (_freeze_rows(xp, P, sub),
                                                 _freeze_rows(xp, Q, sub))
            dd = xp.where(pr.common, _dlog_anchored(xp, Qf) - _dlog_anchored(xp, Pf), zero)
            g = _js_surrogate(xp, P, Q, pr.common, pr.d, dd, y, z, beta)
            if sub is not None:  # second derivatives on these rows: _js_subnormal_second
                g = g + xp.where(sub, _js_subnormal_second(xp, P, Q, beta), xp.zeros_like(g))
            val = stop_gradient(val) + (g - stop_gradient(g))
        return val
    raise ValueError(f"unknown divergence kind {kind!r}")  # pragma: no cover


def divergence_rows(kind, xp, p, q, p_space, q_space, temperature=1.0, beta=0.5):
    """Per-row divergence of validated inputs (categories last, compute dtype, masked rows
    already replaced): the one entry point for the fast paths' reference computations."""
    with quiet(p):
        return _rows(kind, xp, _make_side(xp, p, p_space, temperature),
                     _make_side(xp, q, q_space, temperature), beta)


# ----------------------------------------------------------------------------------------------
# public functions


def _divergence(kind, p, q, *, p_space, q_space, axis, reduction, mask, weight, temperature,
                t2_scale, validate, beta=0.5, softcap=None, logit_scale=None, vocab_size=None,
                labels=None, ignore_index=None):
    if (softcap is not None or logit_scale is not None or vocab_size is not None
            or labels is not None or ignore_index is not None):
        # the model-side options (kldiv._core.options) transform the inputs before anything
        # else: the fast paths and the core see only the transformed arrays
        p, q, p_space, q_space, mask = _options.apply_options(
            p, q, p_space=p_space, q_space=q_space, axis=axis, mask=mask, softcap=softcap,
            logit_scale=logit_scale, vocab_size=vocab_size, labels=labels,
            ignore_index=ignore_index, validate=validate)
    pre = _dispatch.handler("pre", p, q)
    if pre is not None:
        out = pre(kind, p, q, p_space=p_space, q_space=q_space, axis=axis, reduction=reduction,
                  mask=mask, weight=weight, temperature=temperature, t2_scale=t2_scale,
                  validate=validate, beta=beta)
        if out is not NotImplemented:
            return out
    V.check_option("reduction", reduction, V.REDUCTIONS)
    xp, P, Q, mask, weight, temperature = _prepare(
        p, q, p_space, q_space, axis, temperature, mask, weight, validate
    )
    scale = temperature**2 if t2_scale else 1.0
    post = _dispatch.handler("post", P, Q)
    if post is not None:
        out = post(
            kind, P, Q, p_space=p_space, q_space=q_space, reduction=reduction, mask=mask,
            weight=weight, temperature=temperature, beta=beta,
        )
        if out is not NotImplemented:
            return out * scale if scale != 1.0 else out
    P, Q = _finish(xp, P, Q, mask, p_space, q_space)
    rows = divergence_rows(kind, xp, P, Q, p_space, q_space, temperature, beta)
    out = reduce_rows(xp, rows, reduction, mask, weight)
    return out * scale if scale != 1.0 else out


_COMMON_DOC = """
    Args:
      p: the reference distribution (target, teacher), any shape; categories along ``axis``.
      q: the approximating distribution (model, student), same shape or broadcastable with
        ``p`` as in NumPy (a missing leading axis counts as 1); the category axis itself is
        never broadcast: both sides must have the same number of categories (at least one).
      p_space, q_space: what each argument holds: ``"probs"`` (non-negative, rows sum to 1),
        ``"log_probs"`` (rows with logsumexp 0) or ``"logits"`` (any real scores, -inf allowed;
        normalised by a log-softmax along ``axis``). Chosen independently for each side.
      axis: the axis of the categories.
      reduction: ``"none"``: one value per distribution (the input shape without ``axis``);
        ``"sum"``: their sum; ``"mean"``: their mean over the rows where ``mask`` is true,
        weighted by ``weight`` (sum(w * kl) / sum(w)), 0 when no row counts. Never a mean over
        categories.
      mask: optional boolean array of the row shape (broadcastable): false rows contribute 0,
        are not counted by "mean", and are not checked (they may hold anything).
      weight: optional non-negative weights of the row shape (broadcastable).
      temperature: divides log-space inputs (probabilities are raised to 1/T and renormalised).
        Supported range: 1e-6 <= temperature <= 1e6 (``kldiv._core.validation.TEMPERATURE_RANGE``);
        outside it a ValueError is raised. A string or bool is refused with a TypeError.
      t2_scale: multiply the result by ``temperature**2`` (the usual distillation factor).
      validate: value checks (signs, finiteness, normalisation within
        ``kldiv.normalization_tolerance``); None follows ``kldiv.set_validation``. Without
        them, a nan in an unmasked row still gives nan for that row, never a number.
      softcap, logit_scale: the model's final-logit transform, applied to logits-space sides
        as its forward pass does: ``softcap * tanh(logit_scale * x / softcap)`` (Gemma-2
        soft-capping; ``logit_scale * x`` without ``softcap``), before the temperature
        divides. A number applies to every ``"logits"`` side; a pair ``(p_value, q_value)``
        to each side (None: that side untouched); a value for a probabilities or
        log-probabilities side is refused. -inf (masked categories) stays -inf. softcap must
        be positive and finite, logit_scale finite and nonzero. Gradients flow through.
        The transform is computed in the input's dtype, as the model's forward does: in
        float32 the transformed logits carry about ulp(softcap) each, so two sides within
        |delta| of each other give about 1e-7 * softcap / |delta| relative (1e-11 / KL for
        softcap 30); pass float64 logits where a KL below ~1e-5 must be exact.
      vocab_size: keep only the first ``vocab_size`` categories of both sides (whose widths
        may then differ: 151936 against 152064), each side renormalised over them. A
        log-probabilities side is cut and renormalised like logits; a probabilities side must
        hold no mass beyond the cut (checked with validation on). This is not padding the
        smaller side with zero logits, which gives the padding real probability mass.
      labels, ignore_index: rows whose label equals ``ignore_index`` (default -100, torch's
        convention) are masked exactly as by ``mask`` (and together with it). ``labels`` is an
        integer array of the row shape (broadcastable).

    Probabilities are renormalised along ``axis`` before use, so that float rounding in the row
    sums (up to the tolerance above) cannot masquerade as divergence. Half-precision inputs are
    computed in float32; the result has the promoted input dtype (at least float32).
"""


def kl_div(p, q, *, p_space="probs", q_space="probs", axis=-1, reduction="none", mask=None,
           weight=None, temperature=1.0, t2_scale=False, validate=None, softcap=None,
           logit_scale=None, vocab_size=None, labels=None, ignore_index=None):
    return _divergence("forward", p, q, p_space=p_space, q_space=q_space, axis=axis,
                       reduction=reduction, mask=mask, weight=weight, temperature=temperature,
                       t2_scale=t2_scale, validate=validate, softcap=softcap,
                       logit_scale=logit_scale, vocab_size=vocab_size, labels=labels,
                       ignore_index=ignore_index)


kl_div.__doc__ = r"""Kullback-Leibler divergence KL(p || q) = sum_i p_i log(p_i / q_i) along ``axis``.

    .. math:: \mathrm{KL}(p \,\|\, q) = \sum_i p_i \log \frac{p_i}{q_i}

    ``p`` is the reference (target), ``q`` the approximation (model): the order of the math.
    Per category: ``p_i = 0`` contributes 0 (whatever ``q_i``, also when both logits are -inf);
    ``p_i > 0 = q_i`` gives +inf. Never nan; gradients (first and second) are finite wherever
    the value is finite, with respect to both arguments. Near-identical distributions keep full
    relative accuracy (about 1e-6 in float32 down to KL = 1e-9): see ``kldiv._core.divergence``.
""" + _COMMON_DOC + """
    Returns:
      An array of the caller's type: shape ``p.shape`` without ``axis`` for ``reduction="none"``,
      a scalar (0-d array) otherwise.

    Example (the tutorial's distributions; the value is sum p log(p/q) written out by hand):

    >>> import numpy as np, kldiv
    >>> p = np.array([0.3, 0.4, 0.1, 0.2]); q = np.array([0.2, 0.5, 0.2, 0.1])
    >>> float(kldiv.kl_div(p, q))
    0.1016...
    >>> by_hand = 0.3*np.log(0.3/0.2) + 0.4*np.log(0.4/0.5) + 0.1*np.log(0.1/0.2) + 0.2*np.log(0.2/0.1)
    >>> bool(np.isclose(kldiv.kl_div(p, q), by_hand))
    True
    >>> float(kldiv.kl_div(np.array([0.0, 1.0]), np.array([1.0, 0.0])))
    inf
"""


def reverse_kl(p, q, *, p_space="probs", q_space="probs", axis=-1, reduction="none", mask=None,
               weight=None, temperature=1.0, t2_scale=False, validate=None, softcap=None,
               logit_scale=None, vocab_size=None, labels=None, ignore_index=None):
    return _divergence("reverse", p, q, p_space=p_space, q_space=q_space, axis=axis,
                       reduction=reduction, mask=mask, weight=weight, temperature=temperature,
                       t2_scale=t2_scale, validate=validate, softcap=softcap,
                       logit_scale=logit_scale, vocab_size=vocab_size, labels=labels,
                       ignore_index=ignore_index)


reverse_kl.__doc__ = r"""Reverse KL, KL(q || p), with the arguments in the same places as ``kl_div``.

    .. math:: \mathrm{KL}(q \,\|\, p) = \sum_i q_i \log \frac{q_i}{p_i}

    The reference ``p`` (teacher) stays first and the model ``q`` (student) second, so that
    switching a distillation loss from forward to reverse KL changes the function name only.
    Mode-seeking: it is +inf where q puts mass on a category where p has none.
""" + _COMMON_DOC + """
    >>> import numpy as np, kldiv
    >>> p = np.array([0.3, 0.4, 0.1, 0.2]); q = np.array([0.2, 0.5, 0.2, 0.1])
    >>> bool(np.isclose(kldiv.reverse_kl(p, q), np.sum(q * np.log(q / p))))
    True
"""


def js_div(p, q, *, beta=0.5, p_space="probs", q_space="probs", axis=-1, reduction="none",
           mask=None, weight=None, temperature=1.0, t2_scale=False, validate=None, softcap=None,
           logit_scale=None, vocab_size=None, labels=None, ignore_index=None):
    b = V.check_beta(beta)
    return _divergence("js", p, q, p_space=p_space, q_space=q_space, axis=axis,
                       reduction=reduction, mask=mask, weight=weight, temperature=temperature,
                       t2_scale=t2_scale, validate=validate, beta=b, softcap=softcap,
                       logit_scale=logit_scale, vocab_size=vocab_size, labels=labels,
                       ignore_index=ignore_index)


js_div.__doc__ = r"""Generalised Jensen-Shannon divergence with mixture weight ``beta``.

    .. math:: \mathrm{JS}_\beta(p, q) = \beta\,\mathrm{KL}(p \,\|\, m) + (1-\beta)\,\mathrm{KL}(q \,\|\, m),
              \quad m = \beta p + (1-\beta) q

    ``beta=0.5`` is the usual symmetric JSD (at most log 2). Always finite: support mismatch is
    allowed. With ``p`` the teacher and ``q`` the student this is the convention of
    Liger-Kernel's ``LigerJSD(beta)`` (whose call order is student, teacher) and of TRL's
    ``generalized_jsd_loss`` for 0 < beta < 1. Their endpoints beta = 0 and 1 are special-cased
    there to forward and reverse KL; here those are ``kl_div`` and ``reverse_kl`` (the formula
    itself vanishes at the endpoints). Computed from the accurate log-ratio, non-negative terms only.
""" + _COMMON_DOC + """
    >>> import numpy as np, kldiv
    >>> p = np.array([1.0, 0.0]); q = np.array([0.0, 1.0])
    >>> bool(np.isclose(kldiv.js_div(p, q), np.log(2)))
    True
"""


def jeffreys_div(p, q, *, p_space="probs", q_space="probs", axis=-1, reduction="none",
                 mask=None, weight=None, temperature=1.0, t2_scale=False, validate=None,
                 softcap=None, logit_scale=None, vocab_size=None, labels=None,
                 ignore_index=None):
    return _divergence("jeffreys", p, q, p_space=p_space, q_space=q_space, axis=axis,
                       reduction=reduction, mask=mask, weight=weight, temperature=temperature,
                       t2_scale=t2_scale, validate=validate, softcap=softcap,
                       logit_scale=logit_scale, vocab_size=vocab_size, labels=labels,
                       ignore_index=ignore_index)


jeffreys_div.__doc__ = r"""Jeffreys (symmetrised) divergence KL(p || q) + KL(q || p).

    .. math:: J(p, q) = \sum_i (p_i - q_i) \log \frac{p_i}{q_i}

    +inf unless p and q have the same support. Computed as ``sum p (e^d - 1) d`` with
    ``d = log(q/p)``: non-negative terms only.
""" + _COMMON_DOC + """
    >>> import numpy as np, kldiv
    >>> p = np.array([0.3, 0.4, 0.1, 0.2]); q = np.array([0.2, 0.5, 0.2, 0.1])
    >>> bool(np.isclose(kldiv.jeffreys_div(p, q), np.sum((p - q) * np.log(p / q))))
    True
"""


def _lw_log1p(xp, S: _Side):
    """The side's log-weights with the normaliser as log1p of the mass off the row's maximum
    (log-space sides): on a peaked row log s, s = 1 + (a small sum) rounded, is 1e-3 relative
    off in float32 (kl_terms' dominant term); the sum of the other entries keeps it (an exact
    count adds the maximum's ties). kl_div forms its value without these logs."""
    if S.m is None:
        return S.lw
    top = S.ct == 0
    e = xp.where(top, xp.expm1(S.ct), xp.exp(S.ct))  # (0 at the maximum, with its derivative)
    rest = xp.sum(e, axis=-1, keepdims=True) + (xp.sum(xp.astype(top, S.ct.dtype), axis=-1,
                                                      keepdims=True) - 1)
    return S.ct - xp.log1p(rest)


def kl_terms(p, q, *, p_space="probs", q_space="probs", axis=-1, temperature=1.0, validate=None):
    """Per-category contributions ``p_i log(p_i / q_i)`` to KL(p || q), in the input's shape.

    Their sum along ``axis`` is KL(p || q) (``kl_div`` computes that sum more accurately).
    Terms are negative where q_i > p_i. Edges as ``scipy.special.rel_entr``: 0 where
    p_i = 0, +inf where p_i > 0 = q_i. Useful to see which categories carry the divergence.

    Each log(p_i / q_i) is ``kl_div``'s log-ratio (the exact difference of the raw inputs and
    the row constants): a term is within a few eps of p_i times the row's largest
    |log(p_j / q_j)| (relative to itself where its log-ratio is of that size: float32 close rows
    ~1e-6), plus, for a float64 probability side, eps |log x_i| / T. Their sum is off by about
    the sum of those bounds (terms of both signs cancel in it): use ``kl_div`` for the value.

    >>> import numpy as np, kldiv
    >>> p = np.array([0.5, 0.5, 0.0]); q = np.array([0.25, 0.25, 0.5])
    >>> kldiv.kl_terms(p, q)
    array([0.3466, 0.3466, 0.    ])
    """
    xp, P, Q, _, _, temperature = _prepare(
        p, q, p_space, q_space, axis, temperature, None, None, validate
    )
    P, Q = _finish(xp, P, Q, None, p_space, q_space)
    with quiet(P):
        Ps = _make_side(xp, P, p_space, temperature)
        Qs = _make_side(xp, Q, q_space, temperature)
        # log(p_i / q_i) = -d_i from the core's log-ratio (``_pair``): the exact difference of
        # the raw inputs, centred, plus the row constant E_p[d] (accurate where the rows are
        # close), or the difference of the normalised log-probabilities where that is the more
        # accurate route (``_log_ratio_quarter``; peaked rows: normalisers by ``_lw_log1p``)
        pr = _pair(xp, replace(Ps, lw=_lw_log1p(xp, Ps)), replace(Qs, lw=_lw_log1p(xp, Qs)),
                   need_d=True)
        zero = xp.zeros_like(Ps.w)
        t = xp.where(pr.common, Ps.w * -pr.d, zero)
        t = xp.where(Ps.support & ~Qs.support, const(xp, math.inf, t), t)
    ax = V.check_axis(axis, t.ndim)
    return xp.moveaxis(t, -1, ax)
