"""Closed-form KL between parameterised distributions, with a Monte-Carlo fallback.

Functions on arrays (NumPy, PyTorch, JAX; differentiable, any batch shape):

- :func:`normal_kl_logvar`, :func:`normal_kl_scale`: diagonal Gaussians (the VAE term included:
  leave ``q`` out for the standard normal);
- :func:`mvn_kl_cholesky`: full-covariance Gaussians from Cholesky factors (triangular solves,
  no explicit inverse);
- :func:`bernoulli_kl`: Bernoulli from logits, finite values and gradients at saturation;
- :func:`categorical_kl`: categorical from logits (the core ``kldiv.kl_div``).

Small distribution objects (:class:`Normal`, :class:`Laplace`, :class:`Logistic`,
:class:`MultivariateNormal`, :class:`Bernoulli`, :class:`Categorical`) and :func:`kl`, which
uses a closed form when the pair has one and otherwise :func:`monte_carlo_kl` (a stated number
of samples, with the standard error returned) instead of raising NotImplementedError.

All KLs are ``KL(p || q)``, the first argument is the distribution the expectation is under.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from array_api_compat import device, is_jax_array, is_numpy_array, is_torch_array

from ._core._xp import is_concrete, namespace
from .estimators import _expm1_minus_x, _norm_axes, _reduce

__all__ = [
    "normal_kl_logvar", "normal_kl_scale", "mvn_kl_cholesky", "bernoulli_kl", "categorical_kl",
    "Normal", "Laplace", "Logistic", "MultivariateNormal", "Bernoulli", "Categorical",
    "kl", "monte_carlo_kl", "KLResult", "DEFAULT_N_SAMPLES",
]

_REDUCTIONS = ("none", "sum", "mean")
_LOG_2PI = math.log(2.0 * math.pi)

#: Sample count of :func:`monte_carlo_kl` (and of :func:`kl` for pairs without closed form).
DEFAULT_N_SAMPLES = 16384


# ----------------------------------------------------------------------------- helpers


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction: expected one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}"
        )


def _arrays(names, values):
    """Namespace of the array arguments; Python scalars become arrays of the common dtype."""
    present = [v for v in values if v is not None and hasattr(v, "dtype")]
    if not present:
        raise TypeError(f"{names[0]}: expected an array, got {type(values[0]).__name__}")
    xp = namespace(*present)
    for n, v in zip(names, values):
        if v is not None and hasattr(v, "dtype") and not xp.isdtype(v.dtype, "real floating"):
            raise TypeError(f"{n}: expected a real floating-point array, got dtype {v.dtype}")
    dtype = xp.result_type(*present)
    like = present[0]
    out = []
    for n, v in zip(names, values):
        if v is None:
            out.append(None)
            continue
        if not hasattr(v, "dtype"):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{n}: expected an array or a number, got {type(v).__name__}")
            v = xp.asarray(float(v), dtype=dtype, device=device(like))
        out.append(xp.astype(v, dtype))
    return xp, out


def _check_finite(xp, name, x):
    if is_concrete(x) and not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name}: contains nan or inf")


def _check_positive(xp, name, x):
    if is_concrete(x) and not bool(xp.all((x > 0) & xp.isfinite(x))):
        raise ValueError(f"{name}: expected finite values > 0")


def _sum_axes(xp, x, axis):
    """Sum over ``axis`` (int or tuple); ``()`` leaves ``x`` as it is (elementwise KL)."""
    axes = _norm_axes(axis, x.ndim)
    if not axes:
        return x
    return xp.sum(x, axis=axes)


def _broadcast(xp, *arrays):
    shape = np.broadcast_shapes(*(tuple(a.shape) for a in arrays))
    return [xp.broadcast_to(a, shape) for a in arrays]


def _softplus(xp, x):
    return xp.logaddexp(xp.zeros_like(x), x)


def _log_ratio(xp, a, b):
    """``log(a / b)`` for positive ``a``, ``b``, accurate when they are nearly equal at any
    magnitude: within a factor 2 the difference ``a - b`` is exact (Sterbenz) and
    ``log1p((a - b) / b)`` keeps every digit, where ``log a - log b`` would cancel (scales 0.01
    and 0.01 + 1e-14: log a and log b agree in 13 of their 16 digits).

    Farther apart it is ``log(a / b)`` (one rounding in the quotient, none cancelled) while the
    quotient is a normal number, else ``log a - log b`` (ratios beyond the float range).
    """
    near = (a <= 2 * b) & (b <= 2 * a)
    one = xp.ones_like(a)
    an = xp.where(near, a, one)
    bn = xp.where(near, b, one)
    af = xp.where(near, one, a)
    bf = xp.where(near, one, b)
    split = xp.log(af) - xp.log(bf)
    # log(a / b) where the quotient is a normal number with room to spare and its backward pass
    # (-g a / b^2) stays in range: a and b are first scaled by the same power of 2 (exact) into
    # [2 sqrt(tiny), sqrt(max) / 2]; otherwise log a - log b (whose gradients are 1/a, -1/b)
    fi = xp.finfo(a.dtype)
    lo, hi = 2.0 * math.sqrt(float(fi.smallest_normal)), 0.5 * math.sqrt(float(fi.max))
    k = 600 if float(fi.max) > 1e300 else (90 if float(fi.max) > 1e38 else 0)
    up, down = 2.0 ** k, 2.0 ** -k
    scale = one
    if k:
        scale = xp.where(bf < 2.0 ** (-k // 2), up * one,
                         xp.where(bf > 2.0 ** (k // 2), down * one, one))
    as_, bs = af * scale, bf * scale
    inside = ((xp.abs(split) < math.log(float(fi.max)) - 1.0) & (as_ >= lo) & (as_ <= hi)
              & (bs >= lo) & (bs <= hi))
    aq = xp.where(inside, as_, one)
    bq = xp.where(inside, bs, one)
    return xp.where(near, xp.log1p((an - bn) / bn), xp.where(inside, xp.log(aq / bq), split))


def _half_expm1_minus_x(xp, x):
    """``(e^x - 1 - x) / 2`` for ``x < +inf``, finite wherever the value is: near 0 the
    cancellation-free series of ``_expm1_minus_x``; where ``e^x`` itself would overflow
    (``x > log(max) - 1``) ``(e^(x/2) / 2) e^(x/2)`` (``- (1 + x) / 2`` is below its
    rounding)."""
    big = x > math.log(float(xp.finfo(x.dtype).max)) - 1.0
    zero = xp.zeros_like(x)
    xs = xp.where(big, zero, x)
    xb = xp.where(big, x, zero)
    e = xp.exp(0.5 * xb)
    return xp.where(big, (0.5 * e) * e, 0.5 * _expm1_minus_x(xp, xs))


def _safe_diff(xp, a, b):
    """``(a - b, over)``: the difference, or where it overflows (finite ``a``, ``b``: |a - b| up
    to 2 max) the halved difference ``a/2 - b/2``, flagged by ``over``."""
    d = a - b
    over = xp.isinf(d)
    zero = xp.zeros_like(d)
    return xp.where(over, 0.5 * a - 0.5 * b, d), over


def _half_sq(xp, z, over):
    """``z^2 / 2``, or ``(2 z)^2 / 2`` where ``over`` (``z`` holds a halved difference), formed
    as one product of in-range factors: finite wherever the value is."""
    return xp.where(over, (2.0 * z) * z, (0.5 * z) * z)


def _half_ratio_term(xp, a, b):
    """``(rho^2 - 1) / 2 - log rho``, ``rho = a / b`` (positive ``a``, ``b``), without
    cancellation or an overflowing intermediate.

    Through ``(e^u - 1 - u) / 2``, ``u = 2 log rho`` (``log rho`` by :func:`_log_ratio`: no
    cancellation near ``rho = 1``), but for ``rho > e`` from ``rho`` itself, ``(rho / 2) rho``:
    ``e^u`` would carry the rounding of ``u`` (``|u| eps`` relative: 5e-14 at ``rho = 1.6e154``)
    and overflow where ``rho^2 / 2`` does not.
    """
    lr = _log_ratio(xp, a, b)
    big = lr > 1.0
    one = xp.ones_like(lr)
    rho = xp.where(big, a, one) / xp.where(big, b, one)
    return xp.where(big, (0.5 * rho) * rho - (0.5 + lr),
                    _half_expm1_minus_x(xp, 2.0 * xp.where(big, xp.zeros_like(lr), lr)))


def _solve_tril(xp, L, B):
    """Solve ``L X = B`` for lower-triangular ``L`` (..., k, k), ``B`` (..., k, m), batched.

    The one backend-specific routine of this module: torch and JAX have a batched triangular
    solve; NumPy uses SciPy's when SciPy is installed, and any other namespace (or NumPy without
    SciPy) a general ``linalg.solve`` (LU of a triangular matrix; still no inverse).
    """
    batch = np.broadcast_shapes(tuple(L.shape[:-2]), tuple(B.shape[:-2]))
    L = xp.broadcast_to(L, batch + tuple(L.shape[-2:]))
    B = xp.broadcast_to(B, batch + tuple(B.shape[-2:]))
    if is_torch_array(L):
        import torch

        return torch.linalg.solve_triangular(L, B, upper=False)
    if is_jax_array(L):
        import jax.scipy.linalg

        return jax.scipy.linalg.solve_triangular(L, B, lower=True)
    if is_numpy_array(L):
        try:
            import scipy.linalg
        except ImportError:  # pragma: no cover - scipy is optional at run time
            return np.linalg.solve(L, B)
        if batch == ():
            return scipy.linalg.solve_triangular(L, B, lower=True)
        flat_l = np.reshape(L, (-1,) + tuple(L.shape[-2:]))
        flat_b = np.reshape(B, (-1,) + tuple(B.shape[-2:]))
        out = np.stack([scipy.linalg.solve_triangular(a, b, lower=True)
                        for a, b in zip(flat_l, flat_b)])
        return np.reshape(out, tuple(B.shape))
    return xp.linalg.solve(L, B)


def _tril(xp, L):
    k = L.shape[-1]
    idx = xp.arange(k, device=device(L))
    lower = idx[:, None] >= idx[None, :]
    return xp.where(lower, L, xp.zeros_like(L))


def _check_scale_tril(xp, name, L):
    if L.ndim < 2 or L.shape[-1] != L.shape[-2]:
        raise ValueError(f"{name}: expected square matrices (..., k, k), got shape {tuple(L.shape)}")
    if is_concrete(L):
        d = xp.linalg.diagonal(L)
        if not bool(xp.all((d > 0) & xp.isfinite(d))):
            raise ValueError(f"{name}: the diagonal of a Cholesky factor must be finite and > 0")
        if not bool(xp.all(xp.isfinite(L))):
            raise ValueError(f"{name}: contains nan or inf")


def _finish(xp, values, reduction, mask, weight):
    if mask is not None and (not hasattr(mask, "dtype") or not xp.isdtype(mask.dtype, "bool")):
        raise TypeError(f"mask: expected a boolean array, got {getattr(mask, 'dtype', mask)!r}")
    for name, a in (("mask", mask), ("weight", weight)):
        if a is not None:
            try:
                np.broadcast_shapes(tuple(a.shape), tuple(values.shape))
            except ValueError:
                raise ValueError(f"{name}: shape {tuple(a.shape)} does not broadcast to the KL "
                                 f"values' shape {tuple(values.shape)}") from None
    return _reduce(xp, values, reduction, mask, weight, None)


_REDUCE_DOC = """      reduction: ``"none"`` (default): one value per distribution; ``"sum"``; ``"mean"``:
        ``sum(mask * weight * kl) / sum(mask * weight)``, as in ``kldiv.kl_div``.
      mask, weight: optional, broadcastable to the per-distribution shape."""


def _doc(f):
    f.__doc__ = f.__doc__.replace("{reduce}", _REDUCE_DOC)
    return f


# ----------------------------------------------------------------------------- closed forms


@_doc
def normal_kl_logvar(mean_p, logvar_p, mean_q=None, logvar_q=None, *, axis=-1,
                     reduction="none", mask=None, weight=None):
    r"""KL(N(mean_p, exp(logvar_p)) || N(mean_q, exp(logvar_q))), diagonal, from log-variances.

    .. math:: \tfrac12 \sum_{i\in\text{axis}} \Big[ e^{d_i} - 1 - d_i
              + (\mu_{p,i}-\mu_{q,i})^2 e^{-v_{q,i}} \Big],\quad d_i = v_{p,i} - v_{q,i}

    ``e^d - 1 - d`` is evaluated without cancellation, so nearly equal variances keep full
    relative accuracy. No intermediate overflows where the value is in range: the mean term is
    ``((dm e) e)^2 / 2`` with ``e = e^(-v_q/4)`` (identical Gaussians of log-variance -100 in
    float32 give 0, with gradients 0), ``e^d / 2`` is formed as ``(e^(d/2) / 2) e^(d/2)``, and a
    difference that overflows (means 1e308 and -1e308) is taken from halves.
    Leave out ``mean_q`` and ``logvar_q`` for the standard normal (the VAE
    term ``-1/2 sum(1 + logvar - mean**2 - exp(logvar))``). All arguments broadcast.

    Args:
      mean_p, logvar_p: mean and log-variance of p (arrays).
      mean_q, logvar_q: of q; None means 0 (the standard normal). Numbers are accepted.
      axis: the event axes summed over (int or tuple); ``()`` gives elementwise KL of
        univariate normals.
{reduce}

    Returns:
      The broadcast shape without ``axis`` (``reduction="none"``), else a scalar.

    Example: N(1, 1) against N(0, 1) in one dimension is 1/2; against N(0, e) (log-variance
    1) it is 1/2 ((e^-1 - 1 + 1) + 1 * e^-1) = e^-1:

    >>> import math, numpy as np
    >>> from kldiv.distributions import normal_kl_logvar
    >>> float(normal_kl_logvar(np.array([1.0]), np.array([0.0])))
    0.5
    >>> v = normal_kl_logvar(np.array([1.0]), np.array([0.0]), 0.0, 1.0)
    >>> bool(abs(float(v) - math.exp(-1)) < 1e-15)
    True
    """
    _check_reduction(reduction)
    xp, (mp, vp, mq, vq) = _arrays(("mean_p", "logvar_p", "mean_q", "logvar_q"),
                                   (mean_p, logvar_p, mean_q, logvar_q))
    for n, a in (("mean_p", mp), ("logvar_p", vp), ("mean_q", mq), ("logvar_q", vq)):
        if a is not None:
            _check_finite(xp, n, a)
    if mq is None:
        mq = xp.zeros_like(mp)
    if vq is None:
        vq = xp.zeros_like(vp)
    mp, vp, mq, vq = _broadcast(xp, mp, vp, mq, vq)
    # (e^d - 1 - d) / 2, d = vp - vq; d = -inf (overflow of finite log-variances) is -d / 2
    d = vp - vq
    neg = d == -math.inf
    zero = xp.zeros_like(d)
    dn = xp.where(neg, zero, d)
    half_phi = _half_expm1_minus_x(xp, dn)
    # the rounding error of vp - vq (TwoSum, exact; its derivative is 0), carried to first
    # order, (e^d - 1) err / 2: at |d| = 700 the rounded d alone is 6e-14 relative off
    bv = d - vp
    err = (vp - (d - bv)) + (-vq - bv)
    fix = xp.isfinite(d) & (err != 0) & xp.isfinite(half_phi)
    corr = xp.where(fix, xp.where(fix, err, zero) * xp.where(fix, half_phi + 0.5 * dn, zero), zero)
    half_var = xp.where(neg, (0.5 * vq - 0.5 * vp) - 0.5, half_phi + corr)
    # (dm e^(-vq/2))^2 / 2 as ((dm e) e)^2 / 2, e = e^(-vq/4): every factor stays in range
    # whenever the term does (e^(-vq) alone overflows at vq < -709.8, float32 -88.7, where
    # dm * dm may be 0 or tiny); dm = 0 takes e = 1 (value and gradients 0, no 0 * inf)
    dm, over = _safe_diff(xp, mp, mq)
    e = xp.exp(xp.where(dm == 0, zero, -0.25 * vq))
    terms = half_var + _half_sq(xp, (dm * e) * e, over)
    return _finish(xp, _sum_axes(xp, terms, axis), reduction, mask, weight)


@_doc
def normal_kl_scale(mean_p, scale_p, mean_q=None, scale_q=None, *, axis=-1, reduction="none",
                    mask=None, weight=None):
    r"""KL(N(mean_p, scale_p**2) || N(mean_q, scale_q**2)), diagonal, from standard deviations.

    .. math:: \sum_{i\in\text{axis}} \Big[ \tfrac12 (\rho_i^2 - 1) - \log\rho_i
              + \frac{(\mu_{p,i}-\mu_{q,i})^2}{2\sigma_{q,i}^2} \Big],
              \quad \rho_i = \sigma_{p,i}/\sigma_{q,i}

    Same value as :func:`normal_kl_logvar` with ``logvar = 2 log(scale)``, computed the same
    way: the log of the scale ratio is ``log1p`` of the relative difference when the scales are
    within a factor 2, so nearly equal scales keep full relative accuracy at any magnitude (0.01
    against 0.01 + 1e-14 included); for ``rho > e`` the first two terms come from ``rho`` itself,
    ``(rho / 2) rho``. No intermediate overflows where the value is in range (``(dz / 2) dz``;
    means whose difference overflows are differenced from halves). Scales must be > 0
    (ValueError otherwise).
    None for ``mean_q``/``scale_q`` means 0 and 1 (the standard normal).

    Args:
      mean_p, scale_p, mean_q, scale_q: arrays (or numbers for q), broadcastable.
      axis: the event axes summed over; ``()`` for elementwise univariate KL.
{reduce}

    Returns:
      The broadcast shape without ``axis`` for ``"none"``, else a scalar.

    Example: equal means, scale 2 against scale 1: 1/2 (4 - 1) - log 2:

    >>> import math, numpy as np
    >>> from kldiv.distributions import normal_kl_scale
    >>> v = normal_kl_scale(np.zeros(1), np.array([2.0]))
    >>> bool(abs(float(v) - (1.5 - math.log(2))) < 1e-15)
    True
    """
    _check_reduction(reduction)
    xp, (mp, sp, mq, sq) = _arrays(("mean_p", "scale_p", "mean_q", "scale_q"),
                                   (mean_p, scale_p, mean_q, scale_q))
    _check_finite(xp, "mean_p", mp)
    _check_positive(xp, "scale_p", sp)
    if mq is not None:
        _check_finite(xp, "mean_q", mq)
    if sq is not None:
        _check_positive(xp, "scale_q", sq)
    if mq is None:
        mq = xp.zeros_like(mp)
    if sq is None:
        sq = xp.ones_like(sp)
    mp, sp, mq, sq = _broadcast(xp, mp, sp, mq, sq)
    dm, over = _safe_diff(xp, mp, mq)
    terms = _half_ratio_term(xp, sp, sq) + _half_sq(xp, dm / sq, over)
    return _finish(xp, _sum_axes(xp, terms, axis), reduction, mask, weight)


@_doc
def mvn_kl_cholesky(mean_p, scale_tril_p, mean_q=None, scale_tril_q=None, *, reduction="none",
                    mask=None, weight=None):
    r"""KL between full-covariance Gaussians given by Cholesky factors ``Sigma = L L^T``.

    .. math:: \tfrac12\Big[\|L_q^{-1}L_p\|_F^2 + \|L_q^{-1}(\mu_q-\mu_p)\|^2 - k\Big]
              + \sum_i \log (L_q)_{ii} - \sum_i \log (L_p)_{ii}

    The inverse is never formed: ``M = L_q^{-1} L_p`` and ``L_q^{-1}(mu_q - mu_p)`` are
    triangular solves (torch/JAX/SciPy ``solve_triangular``). ``M`` is lower triangular with
    diagonal ``r_i = (L_p)_{ii} / (L_q)_{ii}``, so the value is summed from non-negative terms
    only, ``1/2 [sum_{i>j} M_ij^2 + |L_q^{-1}(mu_q - mu_p)|^2 + sum_i phi(2 log r_i)]`` with
    ``phi(u) = e^u - 1 - u >= 0`` (series near 0, ``log r_i`` through ``log1p``): never
    negative, and exactly 0 for identical arguments. The strict lower part of ``M`` is that of
    ``L_q^{-1} (L_p - L_q)`` (``M - I``): ``L_p - L_q`` is exact for close factors, so nearly
    identical pairs keep full relative accuracy (a solve against ``L_p`` itself leaves
    ``ulp(|L|)`` of noise next to entries of the size of the difference). Squares are formed as
    ``(x / 2) x`` and means whose difference overflows are differenced from halves.
    Only the lower triangle of each factor is read; its diagonal must be > 0 (ValueError).
    None for ``mean_q`` and ``scale_tril_q`` means the standard normal N(0, I).

    Args:
      mean_p: (..., k); scale_tril_p: (..., k, k); likewise for q. Batch dimensions broadcast.
{reduce}

    Returns:
      The broadcast batch shape (``"none"``), else a scalar.

    Example: N(0, diag(4, 1)) against N(0, I): 1/2 (4 + 1 - 2) - log 2:

    >>> import math, numpy as np
    >>> from kldiv.distributions import mvn_kl_cholesky
    >>> v = mvn_kl_cholesky(np.zeros(2), np.diag([2.0, 1.0]))
    >>> bool(abs(float(v) - (1.5 - math.log(2))) < 1e-15)
    True
    """
    _check_reduction(reduction)
    xp, (mp, lp, mq, lq) = _arrays(("mean_p", "scale_tril_p", "mean_q", "scale_tril_q"),
                                   (mean_p, scale_tril_p, mean_q, scale_tril_q))
    if (mq is None) != (lq is None):
        raise ValueError("mean_q, scale_tril_q: give both or neither (neither: N(0, I))")
    _check_scale_tril(xp, "scale_tril_p", lp)
    _check_finite(xp, "mean_p", mp)
    k = lp.shape[-1]
    if mp.ndim < 1 or mp.shape[-1] != k:
        raise ValueError(f"mean_p: expected last dimension {k} (from scale_tril_p), "
                         f"got shape {tuple(mp.shape)}")
    lp = _tril(xp, lp)
    if lq is None:
        strict_m = lp
        dm, over = mp, None
        diag_p = xp.linalg.diagonal(lp)
        half_diag = _half_ratio_term(xp, diag_p, xp.ones_like(diag_p))
    else:
        _check_scale_tril(xp, "scale_tril_q", lq)
        _check_finite(xp, "mean_q", mq)
        if lq.shape[-1] != k or mq.shape[-1] != k:
            raise ValueError(f"mean_q, scale_tril_q: dimension {lq.shape[-1]}/{mq.shape[-1]} "
                             f"differs from p's {k}")
        lq = _tril(xp, lq)
        # M = L_q^-1 L_p = I + L_q^-1 (L_p - L_q): the strict lower parts agree, and for close
        # factors L_p - L_q is exact, where the solve against L_p leaves ulp(|L|) of noise next
        # to entries of the size of the difference (relative error 1/difference)
        # (from halves in every matrix where an entry of L_p - L_q overflows; 4x at the end)
        dl = lp - lq
        over_l = xp.any(xp.isinf(dl), axis=(-2, -1))
        strict_m = _solve_tril(xp, lq, xp.where(over_l[..., None, None], 0.5 * lp - 0.5 * lq, dl))
        # mu_q - mu_p, from halves in every row where an entry overflows
        d = mq - mp
        over = xp.any(xp.isinf(d), axis=-1)
        dm = xp.where(over[..., None], 0.5 * mq - 0.5 * mp, d)
        half_diag = _half_ratio_term(xp, xp.linalg.diagonal(lp), xp.linalg.diagonal(lq))
    y = dm if lq is None else _solve_tril(xp, lq, dm[..., None])[..., 0]
    # the strictly lower part of M (its diagonal enters through half_diag, exactly)
    idx = xp.arange(k, device=device(strict_m))
    strict = idx[:, None] > idx[None, :]
    off = xp.where(strict, strict_m, xp.zeros_like(strict_m))
    off = xp.sum((0.5 * off) * off, axis=(-2, -1))
    if lq is not None:
        off = xp.where(over_l, 4.0 * off, off)
    maha = xp.sum((0.5 * y) * y, axis=-1)
    if over is not None:
        maha = xp.where(over, 4.0 * maha, maha)
    diag = xp.sum(half_diag, axis=-1)
    off, maha, diag = _broadcast(xp, off, maha, diag)
    return _finish(xp, off + maha + diag, reduction, mask, weight)


@_doc
def bernoulli_kl(logits_p, logits_q, *, axis=(), reduction="none", mask=None, weight=None):
    r"""KL(Bernoulli(sigmoid(a)) || Bernoulli(sigmoid(b))) from logits ``a``, ``b``.

    .. math:: \mathrm{KL} = \operatorname{softplus}(-b') - \operatorname{softplus}(-a')
              + \sigma(-a')\,(b' - a'),\quad a' = |a|,\ b' = \operatorname{sign}(a)\, b

    (the pair is mirrored to ``a >= 0``, which keeps every term small: no cancellation of large
    logits). Values and gradients are finite for all finite logits, also at saturation
    (``|a| = 100`` in float32), where probabilities-based formulas and
    ``torch.distributions.kl_divergence`` give nan gradients (pytorch issue 15288).
    Infinite logits (probabilities exactly 0 or 1) follow the edge table:
    ``a = +-inf``: KL = ``softplus(-+b)`` (0 if ``b`` is the same infinity, +inf if the
    opposite one); finite ``a`` with ``b = +-inf``: +inf. nan raises ValueError.

    Args:
      logits_p, logits_q: arrays of logits, broadcastable.
      axis: event axes summed over (independent Bernoullis, e.g. pixels); default ``()``:
        elementwise.
{reduce}

    Example: p = 1/2 (a = 0) against q = sigmoid(log 3) = 3/4: 1/2 log(2/3) + 1/2 log 2:

    >>> import math, numpy as np
    >>> from kldiv.distributions import bernoulli_kl
    >>> v = float(bernoulli_kl(np.array(0.0), np.array(math.log(3.0))))
    >>> bool(abs(v - (0.5 * math.log(2 / 3) + 0.5 * math.log(2))) < 1e-15)
    True
    """
    _check_reduction(reduction)
    xp, (a, b) = _arrays(("logits_p", "logits_q"), (logits_p, logits_q))
    for n, x in (("logits_p", a), ("logits_q", b)):
        if is_concrete(x) and bool(xp.any(xp.isnan(x))):
            raise ValueError(f"{n}: contains nan")
    a, b = _broadcast(xp, a, b)
    zero = xp.zeros_like(a)
    pos = a >= 0
    am = xp.where(pos, a, -a)           # a' >= 0
    bm = xp.where(pos, b, -b)           # b mirrored with a
    a_inf = xp.isinf(am)
    b_inf = xp.isinf(bm)
    # safe inputs for the finite formula (double where: the edge branches never see inf)
    a_s = xp.where(a_inf | b_inf, zero, am)
    b_s = xp.where(a_inf | b_inf, zero, bm)
    finite = _bernoulli_mirrored(xp, a_s, b_s)
    # a' = +inf (p is 0 or 1 exactly): KL = -log q(the certain outcome) = softplus(-b')
    b_for_inf = xp.where(a_inf, bm, zero)
    at_inf = _softplus(xp, -b_for_inf)
    inf = xp.full_like(a, math.inf)
    out = xp.where(a_inf, at_inf, xp.where(b_inf, inf, finite))
    return _finish(xp, _sum_axes(xp, out, axis), reduction, mask, weight)


_LOG1P_SERIES = [(-1.0) ** j / (j + 2) for j in range(16)]


def _x_minus_log1p(xp, u):
    """``u - log1p(u)`` for ``u >= -1/2``: series ``sum_j (-1)^j u^(j+2)/(j+2)`` for |u| < 0.1."""
    small = xp.abs(u) < 0.1
    us = xp.where(small, u, xp.zeros_like(u))
    acc = xp.zeros_like(u)
    for c in reversed(_LOG1P_SERIES):
        acc = acc * us + c
    ul = xp.where(small, xp.zeros_like(u), u)
    return xp.where(small, us * us * acc, ul - xp.log1p(ul))


def _bernoulli_mirrored(xp, a, b):
    """KL for finite logits with ``a >= 0`` (the mirrored pair), accurate for every ``b``.

    This is the Bregman divergence of ``softplus(-x)``: with ``s = sigmoid(-a)`` and
    ``d = b - a``, ``softplus(-b) - softplus(-a) + s d``. For ``|d| >= 1`` that form has no
    harmful cancellation. For ``|d| < 1`` it loses everything below ``eps`` (a tiny KL can even
    come out negative), so it is rewritten as ``s phi(-d) - psi(s expm1(-d))`` with
    ``phi(x) = e^x - 1 - x`` and ``psi(u) = u - log1p(u)``, both evaluated without
    cancellation (series near 0); the two terms differ at most by a factor 1/(1 - s) <= 2.
    """
    d = b - a
    s = _sigmoid(xp, -a)
    near = xp.abs(d) < 1.0
    dn = xp.where(near, d, xp.zeros_like(d))
    close = s * _expm1_minus_x(xp, -dn) - _x_minus_log1p(xp, s * xp.expm1(-dn))
    bf = xp.where(near, a + 1.0, b)
    # s (b - a) is 0 where b - a overflows (a = 1e308, b = -1e308: 0 * inf was nan): with
    # a >= 0, s > 0 needs a < 750, and then |b - a| <= max + 750 rounds to max: the
    # difference overflows only where s = 0
    df = bf - a
    over = xp.isinf(df)
    zero = xp.zeros_like(df)
    far = (_softplus(xp, -bf) - _softplus(xp, -a)
           + xp.where(over, zero, s * xp.where(over, zero, df)))
    return xp.where(near, close, far)


def _sigmoid(xp, x):
    """1 / (1 + exp(-x)) without overflow: exp(-softplus(-x))."""
    return xp.exp(-_softplus(xp, -x))


def categorical_kl(logits_p, logits_q, *, axis=-1, reduction="none", mask=None, weight=None,
                   temperature=1.0):
    r"""KL(Categorical(softmax(logits_p)) || Categorical(softmax(logits_q))): the core's KL.

    .. math:: \sum_j \pi_j (\log \pi_j - \log \rho_j),\ \pi = \mathrm{softmax}(a),\
              \rho = \mathrm{softmax}(b)

    Exactly ``kldiv.kl_div(logits_p, logits_q, p_space="logits", q_space="logits", ...)``; see
    it for the edge cases (``-inf`` logits are categories of probability 0) and ``temperature``.

    Example: logits (0, 0) against (0, log 3): 1/2 log(1/2 / (1/4)) + 1/2 log(1/2 / (3/4)):

    >>> import math, numpy as np
    >>> from kldiv.distributions import categorical_kl
    >>> v = float(categorical_kl(np.zeros(2), np.array([0.0, math.log(3.0)])))
    >>> bool(abs(v - 0.5 * math.log(4 / 3)) < 1e-15)
    True
    """
    from . import kl_div

    return kl_div(logits_p, logits_q, p_space="logits", q_space="logits", axis=axis,
                  reduction=reduction, mask=mask, weight=weight, temperature=temperature)


# ----------------------------------------------------------------------------- objects


def _noise(like, kind, shape, seed, **kw):
    """Standard noise drawn with NumPy (fixed ``seed``) as an array of ``like``'s backend.

    Drawing on the host keeps one random stream for every backend (same samples on NumPy, torch
    and JAX for the same seed) and keeps JAX transformations pure (the noise is a constant).
    """
    rng = np.random.default_rng(seed)
    draw = getattr(rng, kind)
    z = draw(size=shape, **kw)
    xp = namespace(like)
    return xp.asarray(z, dtype=like.dtype, device=device(like))


class _Dist:
    """Base class: ``sample(n, seed)`` gives ``(n, *batch, *event)``, ``log_prob(x)`` ``(n, *batch)``.

    Any object with these two methods (and ``batch_shape``) works with :func:`monte_carlo_kl`.
    """

    event_ndim = 0

    def _event_sum(self, x):
        if self.event_ndim == 0:
            return x
        return self.xp.sum(x, axis=tuple(range(-self.event_ndim, 0)))

    @property
    def batch_shape(self):
        shape = tuple(self._shape)
        return shape[: len(shape) - self.event_ndim]

    def __repr__(self):
        return f"{type(self).__name__}(batch_shape={self.batch_shape}, event_ndim={self.event_ndim})"


def _check_event_ndim(event_ndim, shape):
    """``event_ndim`` must be an int in 0..len(shape) (the trailing axes of one event)."""
    if isinstance(event_ndim, bool) or not isinstance(event_ndim, (int, np.integer)):
        raise TypeError(f"event_ndim: expected an int, got {event_ndim!r}")
    if not 0 <= event_ndim <= len(shape):
        raise ValueError(f"event_ndim: {event_ndim} is out of range for shape {shape}")
    return int(event_ndim)


class _LocScale(_Dist):
    def __init__(self, loc, scale, *, event_ndim=0):
        self.xp, (loc, scale) = _arrays(("loc", "scale"), (loc, scale))
        _check_finite(self.xp, "loc", loc)
        _check_positive(self.xp, "scale", scale)
        self.loc, self.scale = _broadcast(self.xp, loc, scale)
        self._shape = tuple(self.loc.shape)
        self.event_ndim = _check_event_ndim(event_ndim, self._shape)

    def sample(self, n, seed=0):
        return self.loc + self.scale * _noise(self.loc, self._noise_kind, (n,) + self._shape, seed)

    def log_prob(self, x):
        z = (x - self.loc) / self.scale
        return self._event_sum(self._std_log_prob(z) - self.xp.log(self.scale))


class Normal(_LocScale):
    """Normal(loc, scale) elementwise; ``event_ndim=1`` makes the last axis one diagonal Gaussian."""

    _noise_kind = "standard_normal"

    def _std_log_prob(self, z):
        return -0.5 * z * z - 0.5 * _LOG_2PI


class Laplace(_LocScale):
    """Laplace(loc, scale): density ``exp(-|x - loc| / scale) / (2 scale)``."""

    _noise_kind = "laplace"

    def _std_log_prob(self, z):
        return -self.xp.abs(z) - math.log(2.0)


class Logistic(_LocScale):
    """Logistic(loc, scale): density ``e^-z / (scale (1 + e^-z)^2)``, ``z = (x - loc)/scale``."""

    _noise_kind = "logistic"

    def _std_log_prob(self, z):
        return -z - 2.0 * _softplus(self.xp, -z)


class MultivariateNormal(_Dist):
    """N(loc, L L^T) from a lower-triangular Cholesky factor ``scale_tril`` (..., k, k)."""

    event_ndim = 1

    def __init__(self, loc, scale_tril):
        self.xp, (loc, scale_tril) = _arrays(("loc", "scale_tril"), (loc, scale_tril))
        _check_scale_tril(self.xp, "scale_tril", scale_tril)
        _check_finite(self.xp, "loc", loc)
        self.loc, self.scale_tril = loc, _tril(self.xp, scale_tril)
        batch = np.broadcast_shapes(tuple(loc.shape[:-1]), tuple(scale_tril.shape[:-2]))
        self._shape = batch + (scale_tril.shape[-1],)

    def sample(self, n, seed=0):
        eps = _noise(self.loc, "standard_normal", (n,) + self._shape, seed)
        return self.loc + self.xp.sum(self.scale_tril * eps[..., None, :], axis=-1)

    def log_prob(self, x):
        xp = self.xp
        y = _solve_tril(xp, self.scale_tril, (x - self.loc)[..., None])[..., 0]
        k = self._shape[-1]
        half_logdet = xp.sum(xp.log(xp.linalg.diagonal(self.scale_tril)), axis=-1)
        return -0.5 * xp.sum(y * y, axis=-1) - half_logdet - 0.5 * k * _LOG_2PI


class Bernoulli(_Dist):
    """Bernoulli(sigmoid(logits)); samples are 0.0/1.0 in the logits' dtype."""

    def __init__(self, logits, *, event_ndim=0):
        self.xp, (self.logits,) = _arrays(("logits",), (logits,))
        if is_concrete(self.logits) and bool(self.xp.any(self.xp.isnan(self.logits))):
            raise ValueError("logits: contains nan")
        self._shape = tuple(self.logits.shape)
        self.event_ndim = _check_event_ndim(event_ndim, self._shape)

    def sample(self, n, seed=0):
        u = _noise(self.logits, "random", (n,) + self._shape, seed)
        xp = self.xp
        return xp.astype(u < _sigmoid(xp, self.logits), self.logits.dtype)

    def log_prob(self, x):
        """``x log sigmoid(a) + (1 - x) log sigmoid(-a)``; a term whose factor is 0 is 0 (the
        certain outcome at logits of +-inf has log-probability 0, the impossible one -inf)."""
        xp = self.xp
        if not hasattr(x, "dtype"):
            x = xp.asarray(x, dtype=self.logits.dtype, device=device(self.logits))
        x, a = _broadcast(xp, xp.astype(x, self.logits.dtype), self.logits)
        zero = xp.zeros_like(a)
        t1 = x * xp.where(x != 0, _softplus(xp, -a), zero)
        t2 = (1 - x) * xp.where(x != 1, _softplus(xp, a), zero)
        return self._event_sum(-(t1 + t2))


class Categorical(_Dist):
    """Categorical(softmax(logits)) over the last axis; samples are integer indices."""

    def __init__(self, logits):
        self.xp, (self.logits,) = _arrays(("logits",), (logits,))
        self._shape = tuple(self.logits.shape[:-1])

    def _log_probs(self):
        from ._core._xp import logsumexp

        return self.logits - logsumexp(self.xp, self.logits, axis=-1)

    def sample(self, n, seed=0):
        xp = self.xp
        g = _noise(self.logits, "gumbel", (n,) + tuple(self.logits.shape), seed)
        return xp.argmax(self.logits + g, axis=-1)

    def log_prob(self, x):
        xp = self.xp
        k = self.logits.shape[-1]
        onehot = x[..., None] == xp.arange(k, device=device(self.logits))
        lp = xp.broadcast_to(self._log_probs(), tuple(onehot.shape))
        return xp.sum(xp.where(onehot, lp, xp.zeros_like(lp)), axis=-1)


# ----------------------------------------------------------------------------- kl dispatch


class KLResult(NamedTuple):
    """What :func:`kl` returns: ``value``, its Monte-Carlo ``stderr`` (0 for closed forms),
    ``n_samples`` (0 for closed forms) and ``method`` ("closed_form" or "monte_carlo")."""

    value: object
    stderr: object
    n_samples: int
    method: str


def _kl_normal_normal(p, q):
    return normal_kl_scale(p.loc, p.scale, q.loc, q.scale, axis=tuple(range(-p.event_ndim, 0)))


def _kl_laplace_laplace(p, q):
    """log(b_q/b_p) + |mu_p - mu_q| / b_q + (b_p / b_q) exp(-|mu_p - mu_q| / b_p) - 1.

    With r = b_p / b_q, u = log r and t = |mu_p - mu_q| / b_p this is
    ``phi(u - t) + t (r - 1)``, ``phi(x) = e^x - 1 - x``: for nearly identical pairs
    (|u|, t < 1/2) that form has no cancellation (the textbook sum cancels to noise there);
    elsewhere the textbook form is used.
    """
    xp = p.xp
    loc_p, scale_p, loc_q, scale_q = _broadcast(xp, p.loc, p.scale, q.loc, q.scale)
    # |loc_p - loc_q|, halved where it overflows (finite locs 1e308 and -1e308)
    d, over = _safe_diff(xp, loc_p, loc_q)
    d = xp.abs(d)
    u = _log_ratio(xp, scale_p, scale_q)
    one = xp.ones_like(d)
    zero = xp.zeros_like(d)
    two = xp.where(over, 2.0 * one, one)
    # Every branch below sees safe inputs (double where), so that no gradient is 0 * inf:
    # where e^-t is 0 (t beyond 1e4) t is not formed from d / b_p (whose derivative
    # -d / b_p^2 may overflow), and the ratios of the branches not taken are 1.
    t0 = two * (d / scale_p)
    gone = t0 > 1e4
    t = two * (xp.where(gone, zero, d) / xp.where(gone, one, scale_p))
    near = (xp.abs(u) < 0.5) & (t0 < 0.5)
    un, tn = xp.where(near, u, zero), xp.where(near, t, zero)
    rel = (xp.where(near, scale_p, one) - xp.where(near, scale_q, one)) / xp.where(near, scale_q, one)
    close = _expm1_minus_x(xp, un - tn) + tn * rel
    # r e^-t, as e^(u - t) where r = b_p / b_q overflows (e^-t may then be 0: no inf * 0)
    r_inf = xp.isinf(scale_p / scale_q)
    ratio = xp.where(r_inf, one, scale_p) / xp.where(r_inf, one, scale_q)
    decay = xp.where(r_inf, xp.exp(xp.where(r_inf, u - t, zero)), ratio * xp.exp(-t))
    decay = xp.where(gone, zero, decay)
    far = -u + two * (d / scale_q) + decay - 1.0
    terms = xp.where(near, close, far)
    return _sum_axes(xp, terms, tuple(range(-p.event_ndim, 0)))


def _kl_mvn_mvn(p, q):
    return mvn_kl_cholesky(p.loc, p.scale_tril, q.loc, q.scale_tril)


def _kl_bern_bern(p, q):
    return bernoulli_kl(p.logits, q.logits, axis=tuple(range(-p.event_ndim, 0)))


def _kl_cat_cat(p, q):
    return categorical_kl(*_broadcast(p.xp, p.logits, q.logits))


_CLOSED = {
    (Normal, Normal): _kl_normal_normal,
    (Laplace, Laplace): _kl_laplace_laplace,
    (MultivariateNormal, MultivariateNormal): _kl_mvn_mvn,
    (Bernoulli, Bernoulli): _kl_bern_bern,
    (Categorical, Categorical): _kl_cat_cat,
}


def monte_carlo_kl(p, q, *, n_samples=DEFAULT_N_SAMPLES, seed=0, estimator="k1"):
    r"""Monte-Carlo KL(p || q) from ``n_samples`` samples of ``p``, with its standard error.

    .. math:: \widehat{\mathrm{KL}} = \frac1n \sum_{i=1}^n k(x_i),\ x_i \sim p,\qquad
              \mathrm{se} = \mathrm{std}_i(k(x_i)) / \sqrt{n}

    ``k`` is ``kldiv.estimators.k1`` (``log p - log q``, default) or ``"k3"``; both are
    unbiased for the value. k3 has lower variance when p and q are close, but its variance is
    infinite when q has heavier tails than p (e.g. Normal p, Laplace q): the standard error is
    then meaningless, so k1 is the default. Samples of the continuous families are reparameterised
    (``loc + scale * noise``, the noise drawn with NumPy from ``seed``), so in torch and JAX
    the estimate is differentiable and its gradient is an unbiased estimate of the KL's gradient.
    The standard error is per distribution of the batch; about 68 % of seeds land within one
    standard error of the exact value and 99.99994 % within five.

    Args:
      p, q: distribution objects with ``sample(n, seed)`` and ``log_prob(x)`` (the classes in
        this module, or your own with the same two methods); same batch shape.
      n_samples: number of samples (default ``DEFAULT_N_SAMPLES = 16384``); at least 2.
      seed: seed of the NumPy generator that draws the noise.
      estimator: ``"k1"`` or ``"k3"``.

    Returns:
      ``KLResult(value, stderr, n_samples, method="monte_carlo")``, value and stderr of the
      batch shape.

    Example: Normal(0, 1) against Laplace(0, 1), where this module has no closed form; the
    exact value is E[|x| - x^2/2] + log 2 - 1/2 log(2 pi) = sqrt(2/pi) - 1/2 + 1/2 log(2/pi):

    >>> import math, numpy as np
    >>> from kldiv.distributions import Normal, Laplace, monte_carlo_kl
    >>> r = monte_carlo_kl(Normal(np.zeros(1), np.ones(1)), Laplace(np.zeros(1), np.ones(1)))
    >>> exact = math.sqrt(2 / math.pi) - 0.5 + 0.5 * math.log(2 / math.pi)
    >>> bool(abs(r.value[0] - exact) < 5 * r.stderr[0]), r.n_samples
    (True, 16384)
    """
    from .estimators import ESTIMATORS

    if estimator not in ("k1", "k3"):
        raise ValueError(f"estimator: expected 'k1' or 'k3', got {estimator!r}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise ValueError(f"n_samples: expected an int >= 2, got {n_samples!r}")
    for name, d in (("p", p), ("q", q)):
        if not (hasattr(d, "sample") and hasattr(d, "log_prob")):
            raise TypeError(f"{name}: expected a distribution with sample(n, seed) and "
                            f"log_prob(x), got {type(d).__name__}")
    _check_same_event_ndim(p, q)
    x = p.sample(int(n_samples), seed)
    lp, lq = p.log_prob(x), q.log_prob(x)
    per = ESTIMATORS[estimator](lp, lq, reduction="none")
    xp = namespace(per)
    value = xp.mean(per, axis=0)
    stderr = xp.std(per, axis=0, correction=1) / math.sqrt(int(n_samples))
    return KLResult(value, stderr, int(n_samples), "monte_carlo")


def kl(p, q, *, n_samples=DEFAULT_N_SAMPLES, seed=0, estimator="k1"):
    """KL(p || q) between two distribution objects: closed form if known, else Monte Carlo.

    Closed forms: Normal-Normal, Laplace-Laplace, MultivariateNormal-MultivariateNormal,
    Bernoulli-Bernoulli, Categorical-Categorical, found through the class hierarchy (a subclass
    of Normal gets the Normal closed form). ``p`` and ``q`` must have the same ``event_ndim``
    (ValueError naming it otherwise). Every
    other pair (e.g. Normal-Laplace, Logistic-Normal, or your own objects) goes to
    :func:`monte_carlo_kl` with ``n_samples`` samples (default 16384) and ``seed``: the result
    then carries a standard error, instead of a NotImplementedError.

    Returns:
      :class:`KLResult` ``(value, stderr, n_samples, method)``; for closed forms ``stderr`` is
      an array of zeros, ``n_samples`` is 0 and ``method`` is ``"closed_form"``.

    Example:

    >>> import numpy as np
    >>> from kldiv.distributions import Normal, Logistic, kl
    >>> r = kl(Normal(np.zeros(1), np.full(1, 2.0)), Normal(np.zeros(1), np.ones(1)))
    >>> r.method, r.n_samples, float(r.stderr[0])
    ('closed_form', 0, 0.0)
    >>> kl(Normal(np.zeros(1), np.ones(1)), Logistic(np.zeros(1), np.ones(1))).method
    'monte_carlo'
    """
    _check_same_event_ndim(p, q)
    fn = _closed_form(type(p), type(q))
    if fn is not None:
        value = fn(p, q)
        xp = namespace(value)
        return KLResult(value, xp.zeros_like(value), 0, "closed_form")
    return monte_carlo_kl(p, q, n_samples=n_samples, seed=seed, estimator=estimator)


def _closed_form(tp, tq):
    """The closed form registered for the nearest pair of base classes (a subclass of Normal
    is a Normal), or None."""
    for cp in tp.__mro__:
        for cq in tq.__mro__:
            fn = _CLOSED.get((cp, cq))
            if fn is not None:
                return fn
    return None


def _check_same_event_ndim(p, q):
    """(Objects of the user's own that do not say their event_ndim are not checked.)"""
    ep, eq = getattr(p, "event_ndim", None), getattr(q, "event_ndim", None)
    if ep is not None and eq is not None and ep != eq:
        raise ValueError(
            f"event_ndim: p has event_ndim={ep} and q has event_ndim={eq}; both must describe "
            "events of the same number of axes"
        )
