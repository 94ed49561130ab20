"""Monte-Carlo estimators of KL divergence from the log-probabilities of samples (k1, k2, k3).

Notation used in every docstring here. Samples ``x_i`` are drawn from the *sampler* ``S``; the
estimators target ``KL(S || O) = E_{x~S}[log S(x) - log O(x)]`` where ``O`` is the *other*
distribution. The only inputs are ``logp_sampler = log S(x_i)`` and ``logp_other = log O(x_i)``
(for example the log-probabilities of sampled tokens under the policy and under a reference model).
With ``l = logp_other - logp_sampler`` and ``r = exp(l) = O(x)/S(x)`` (names from John Schulman,
"Approximating KL Divergence", 2020):

======  =====================  ================  ===================  ====================
name    per-sample value       E_S[value]        grad wrt O's params  grad wrt S's params
======  =====================  ================  ===================  ====================
k1      ``-l``                 KL(S||O), exact   unbiased             biased: mean 0
k2      ``l**2 / 2``           biased (>= 0)     biased               unbiased
k3      ``(r - 1) - l``        KL(S||O), exact   unbiased             biased: grad KL(O||S)
======  =====================  ================  ===================  ====================

"grad wrt S's params" is the gradient when the samples are held fixed (no gradient through the
sampling itself) and only ``logp_sampler`` carries the parameters: the RL case where ``S`` is the
policy being trained and ``O`` the reference (TRL's GRPO loss adds k3 this way, so its expected
gradient is that of the *forward* KL(ref || policy), not of the reverse KL it reports).
Passing ``logp_behavior=logp_sampler.detach()`` (torch; ``jax.lax.stop_gradient`` in JAX) weighs
each term by the importance ratio ``S(x)/b(x)``, whose value is 1 but whose gradient adds the
missing score-function term: k1 and k3 then have unbiased gradients with respect to both sides
(the "unbiased KL" correction of DeepSeek-V3.2, TRL issue 4967); k2 does not.
The same keyword handles off-policy samples from a behaviour distribution ``b`` (e.g. the old
policy in PPO/GRPO): values of k1 and k3 stay unbiased for KL(S||O).
"""
from __future__ import annotations

import math

from ._core._xp import is_concrete, namespace
from ._core.reduction import reduce_rows

__all__ = ["k1", "k2", "k3", "ESTIMATORS"]

_REDUCTIONS = ("none", "sum", "mean")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction: expected one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}"
        )


def _check_float(xp, name, x):
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name}: expected a real floating-point array, got dtype {x.dtype}")


def _as_array(xp, x, name, like):
    """Python scalars / lists become arrays of ``like``'s dtype and device."""
    if x is None:
        return None
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            return xp.asarray(x, dtype=like.dtype)
        except Exception as exc:  # pragma: no cover - message path
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from exc
    return x


def _broadcast_shape(name, shape, target):
    try:
        import numpy as np

        out = np.broadcast_shapes(tuple(shape), tuple(target))
    except ValueError:
        raise ValueError(
            f"{name}: shape {tuple(shape)} does not broadcast with {tuple(target)}"
        ) from None
    if tuple(out) != tuple(target):
        raise ValueError(f"{name}: shape {tuple(shape)} does not broadcast to {tuple(target)}")


def _norm_axes(axis, ndim):
    if axis is None:
        return None
    axes = (axis,) if isinstance(axis, int) and not isinstance(axis, bool) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(f"axis: expected an int, a tuple of ints or None, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis: {a} is out of range for arrays with {ndim} dimensions")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis: repeated axis in {axis!r}")
    return tuple(out)


def _reduce(xp, values, reduction, mask=None, weight=None, axis=None):
    """The core's reductions (``kldiv._core.reduction``) of per-element ``values``, over ``axis``.

    With ``m`` the mask (1 where true) and ``w`` the weight (1 if absent): ``"none"``:
    ``m * w * v``; ``"sum"``: ``sum(m * w * v)``; ``"mean"``: ``sum(m * w * v) / sum(m * w)``,
    and 0 where ``sum(m * w) = 0`` (everything masked), as in the core. Entries with ``m = 0`` or
    ``w = 0`` may hold inf or nan: they are replaced before multiplying, never multiplied.
    ``axis=None`` reduces everything and is the core's own function.
    """
    shape = tuple(values.shape)
    if mask is not None:
        mask = xp.broadcast_to(mask, shape)
    if weight is not None:
        weight = xp.broadcast_to(xp.astype(weight, values.dtype), shape)
    if axis is None or reduction == "none":
        return reduce_rows(xp, values, reduction, mask, weight)
    axes = _norm_axes(axis, values.ndim)
    keep = mask
    if weight is not None:
        keep = weight > 0 if keep is None else keep & (weight > 0)
    if keep is not None:
        values = xp.where(keep, values, xp.zeros_like(values))
    if weight is not None:
        values = values * weight
    total = xp.sum(values, axis=axes)
    if reduction == "sum":
        return total
    if weight is not None:
        den = xp.sum(xp.where(keep, weight, xp.zeros_like(weight)), axis=axes)
    elif mask is not None:
        den = xp.sum(xp.astype(mask, values.dtype), axis=axes)
    else:
        return total / math.prod(shape[a] for a in axes)
    safe = xp.where(den > 0, den, xp.ones_like(den))
    return xp.where(den > 0, total / safe, xp.zeros_like(total))


def _prepare(logp_sampler, logp_other, logp_behavior, mask, weight, reduction):
    _check_reduction(reduction)
    xp = namespace(logp_sampler, logp_other, logp_behavior, mask, weight)
    if not hasattr(logp_sampler, "dtype"):
        logp_sampler = xp.asarray(logp_sampler)
    logp_other = _as_array(xp, logp_other, "logp_other", logp_sampler)
    logp_behavior = _as_array(xp, logp_behavior, "logp_behavior", logp_sampler)
    _check_float(xp, "logp_sampler", logp_sampler)
    _check_float(xp, "logp_other", logp_other)
    if logp_behavior is not None:
        _check_float(xp, "logp_behavior", logp_behavior)
    if tuple(logp_sampler.shape) != tuple(logp_other.shape):
        raise ValueError(
            f"logp_other: shape {tuple(logp_other.shape)} differs from logp_sampler's "
            f"{tuple(logp_sampler.shape)} (one log-probability per sample on each side)"
        )
    shape = tuple(logp_sampler.shape)
    dtype = xp.result_type(logp_sampler, logp_other)
    if xp.finfo(dtype).bits < 32:
        # half and bfloat16 inputs are computed in float32, as in the core: a float16 count or
        # sum of more than 65504 samples would be inf, and each term would be rounded to half
        dtype = xp.float32
    logp_sampler = xp.astype(logp_sampler, dtype)
    logp_other = xp.astype(logp_other, dtype)
    if logp_behavior is not None:
        _broadcast_shape("logp_behavior", logp_behavior.shape, shape)
        logp_behavior = xp.astype(logp_behavior, dtype)
    weight = _as_array(xp, weight, "weight", logp_sampler)  # (after the widening above)
    if mask is not None:
        if not hasattr(mask, "dtype") or not xp.isdtype(mask.dtype, "bool"):
            raise TypeError(f"mask: expected a boolean array, got {getattr(mask, 'dtype', mask)!r}")
        _broadcast_shape("mask", mask.shape, shape)
    if weight is not None:
        _check_float(xp, "weight", weight)
        _broadcast_shape("weight", weight.shape, shape)
        if is_concrete(weight) and bool(xp.any((weight < 0) | ~xp.isfinite(weight))):
            raise ValueError("weight: expected finite non-negative weights")
    if is_concrete(logp_sampler):
        live = None if mask is None else xp.broadcast_to(mask, shape)
        named = [("logp_sampler", logp_sampler), ("logp_other", logp_other),
                 ("logp_behavior", logp_behavior)]
        for name, x in named:
            if x is None:
                continue
            x = xp.broadcast_to(x, shape)
            bad = xp.isnan(x) | (x == math.inf)
            if live is not None:
                bad = bad & live
            if bool(xp.any(bad)):
                raise ValueError(f"{name}: contains nan or +inf (where the mask is true)")
        who = "logp_sampler" if logp_behavior is None else "logp_behavior"
        sampled = xp.broadcast_to(logp_sampler if logp_behavior is None else logp_behavior, shape)
        unsampleable = xp.isinf(sampled) if live is None else xp.isinf(sampled) & live
        if bool(xp.any(unsampleable)):
            raise ValueError(
                f"{who}: -inf log-probability for a sample; the samples must come from this "
                f"distribution, so each has positive probability under it"
            )
    # sanitise masked entries before any arithmetic, so that their gradients are 0, not nan
    if mask is not None:
        m = xp.broadcast_to(mask, shape)
        zero = xp.zeros_like(logp_sampler)
        logp_sampler = xp.where(m, logp_sampler, zero)
        logp_other = xp.where(m, logp_other, zero)
        if logp_behavior is not None:
            logp_behavior = xp.where(m, xp.broadcast_to(logp_behavior, shape), zero)
    return xp, logp_sampler, logp_other, logp_behavior, mask, weight


def _with_args(f):
    f.__doc__ = f.__doc__.replace("    {args}\n", _ARGS_DOC)
    return f


def _finish(xp, per_sample, logp_sampler, logp_behavior, mask, weight, reduction, axis):
    if logp_behavior is not None:
        # importance ratio S(x)/b(x): multiplies the terms (value and score-function gradient)
        per_sample = xp.exp(logp_sampler - logp_behavior) * per_sample
    return _reduce(xp, per_sample, reduction, mask, weight, axis)


_ARGS_DOC = """
    Args:
      logp_sampler: ``log S(x_i)``, log-probabilities of the samples under the distribution
        they are drawn from (the first argument of the estimated KL). Any shape, e.g.
        ``(batch, tokens)``. Real floating dtype.
      logp_other: ``log O(x_i)``, same shape: the same samples under the other distribution.
        ``-inf`` (O gives the sample probability 0) gives ``+inf``.
      logp_behavior: optional ``log b(x_i)`` when the samples come from ``b`` rather than ``S``
        (broadcastable to the shape): each term is weighted by ``exp(logp_sampler -
        logp_behavior)``. Pass a detached copy of ``logp_sampler`` to get the on-policy
        score-function gradient (see the module docstring).
      mask: optional boolean array broadcastable to the shape; false entries (padding) may hold
        anything and contribute nothing, with zero gradient.
      weight: optional non-negative weights broadcastable to the shape.
      reduction: ``"mean"`` (default): ``sum(m*w*k) / sum(m*w)``, the estimate (0 if every
        entry is masked out, as in ``kldiv.kl_div``); ``"sum"``: ``sum(m*w*k)``;
        ``"none"``: the per-sample values ``m*w*k`` (0 where masked).
      axis: axes reduced by ``"mean"``/``"sum"``; None (default) reduces all of them. E.g.
        ``axis=-1`` gives one estimate per sequence.

    Returns:
      An array of the input's type: a scalar for the default reduction, else the reduced
      shape (``reduction="none"``: the input shape). Half-precision (float16, bfloat16) inputs
      are computed in float32 and give float32 results, as in ``kldiv.kl_div``.

"""


_SERIES = [1.0 / math.factorial(j + 2) for j in range(16)]


def _expm1_minus_x(xp, x):
    """``exp(x) - 1 - x`` to full relative precision, also for tiny ``|x|``.

    ``expm1(x) - x`` loses ``log10(1/|x|)`` digits to cancellation; for ``|x| < 1/2`` the
    Taylor series ``x**2 * sum_j x**j / (j+2)!`` (16 terms, truncation < 1e-19 relative) is
    used instead. The series branch sees a safe 0 elsewhere, so neither branch's gradient is nan.
    """
    small = xp.abs(x) < 0.5
    xs = xp.where(small, x, xp.zeros_like(x))
    acc = xp.zeros_like(x)
    for c in reversed(_SERIES):
        acc = acc * xs + c
    xl = xp.where(small, xp.zeros_like(x), x)
    return xp.where(small, xs * xs * acc, xp.expm1(xl) - xl)


@_with_args
def k1(logp_sampler, logp_other, *, logp_behavior=None, mask=None, weight=None,
       reduction="mean", axis=None):
    r"""The naive estimator ``k1 = log S(x) - log O(x)`` of KL(S || O), samples ``x ~ S``.

    .. math:: \mathrm{KL}(S\|O) \approx \frac{1}{n}\sum_i \log\frac{S(x_i)}{O(x_i)}

    Value: unbiased for KL(S || O); high variance, single terms are negative half the time.
    Gradient (samples held fixed): unbiased with respect to O's parameters (it is the
    negative log-likelihood of the samples under O); with respect to S's parameters its mean
    is 0, i.e. biased, unless ``logp_behavior=stop_gradient(logp_sampler)`` is passed, which
    makes it unbiased.
    {args}
    Example (two samples; log-ratios -0.5 and 0.25, mean 0.125):

    >>> import numpy as np
    >>> from kldiv.estimators import k1
    >>> float(k1(np.array([-1.0, -2.0]), np.array([-1.5, -1.75])))
    0.125
    """
    xp, ls, lo, lb, mask, weight = _prepare(logp_sampler, logp_other, logp_behavior, mask,
                                            weight, reduction)
    return _finish(xp, ls - lo, ls, lb, mask, weight, reduction, axis)


@_with_args
def k2(logp_sampler, logp_other, *, logp_behavior=None, mask=None, weight=None,
       reduction="mean", axis=None):
    r"""The squared estimator ``k2 = (log O(x) - log S(x))**2 / 2`` of KL(S || O), ``x ~ S``.

    .. math:: \mathrm{KL}(S\|O) \approx \frac{1}{n}\sum_i \tfrac12 \Big(\log\frac{O(x_i)}{S(x_i)}\Big)^2

    Value: biased (its mean is an f-divergence that agrees with KL(S || O) to second order as
    O -> S; the bias grows with the divergence), non-negative, low variance.
    Gradient (samples held fixed): unbiased for grad KL(S || O) with respect to S's parameters
    (the on-policy RL case), biased with respect to O's parameters. ``logp_behavior`` does not
    fix either bias.
    {args}
    Example (log-ratios -0.5 and 0.25: (0.125 + 0.03125) / 2 = 0.078125):

    >>> import numpy as np
    >>> from kldiv.estimators import k2
    >>> float(k2(np.array([-1.0, -2.0]), np.array([-1.5, -1.75])))
    0.078125
    """
    xp, ls, lo, lb, mask, weight = _prepare(logp_sampler, logp_other, logp_behavior, mask,
                                            weight, reduction)
    lr = lo - ls
    return _finish(xp, 0.5 * lr * lr, ls, lb, mask, weight, reduction, axis)


@_with_args
def k3(logp_sampler, logp_other, *, logp_behavior=None, mask=None, weight=None,
       reduction="mean", axis=None):
    r"""Schulman's control-variate estimator ``k3 = (r - 1) - log r`` of KL(S || O), ``x ~ S``.

    .. math:: \mathrm{KL}(S\|O) \approx \frac{1}{n}\sum_i \big(r_i - 1 - \log r_i\big),
              \quad r_i = \frac{O(x_i)}{S(x_i)}

    Computed as ``expm1(l) - l`` with ``l = log r``, by its Taylor series for ``|l| < 1/2``
    (full relative precision even for tiny ``l``; ``+inf`` when ``exp(l)`` overflows, never
    clipped). Each term is >= 0.
    Value: unbiased for KL(S || O) (``E_S[r - 1] = 0``), low variance when S and O are close;
    heavy-tailed when O puts much more mass than S on some samples.
    Gradient (samples held fixed): unbiased with respect to O's parameters; with respect to
    S's parameters its mean is grad KL(O || S), the *other* direction (this is the GRPO case),
    unless ``logp_behavior=stop_gradient(logp_sampler)`` is passed, which makes it unbiased.
    {args}
    Example: one sample with ``S(x) = O(x)`` gives exactly 0; ``l = log 2`` gives
    ``1 - log 2``:

    >>> import math, numpy as np
    >>> from kldiv.estimators import k3
    >>> k3(np.array([-1.0, -1.0]), np.array([-1.0, -1.0 + math.log(2.0)]), reduction="none")
    array([0.        , 0.30685282])
    """
    xp, ls, lo, lb, mask, weight = _prepare(logp_sampler, logp_other, logp_behavior, mask,
                                            weight, reduction)
    return _finish(xp, _expm1_minus_x(xp, lo - ls), ls, lb, mask, weight, reduction, axis)


ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}
