"""Reductions over distributions (rows), with masks and weights: the one place they are defined.

"mean" is the mean over distributions (per token for (B, T, V) inputs), weighted when weights
are given: ``sum(mask * w * kl) / sum(mask * w)``; never a mean over categories.
"""
from __future__ import annotations

from ._xp import quiet


def broadcast_rows(xp, a, rows_shape, name):
    """Broadcast a per-row array (mask, weight) to ``rows_shape`` or say clearly why not."""
    try:
        return xp.broadcast_to(a, rows_shape)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{name}: shape {tuple(a.shape)} does not broadcast to the shape of the distributions "
            f"{tuple(rows_shape)} (the input shape without the category axis)"
        ) from exc


def reduce_rows(xp, rows, reduction, mask=None, weight=None):
    """Apply ``reduction`` ("none", "sum", "mean") to per-row values.

    A row counts where ``mask`` is true; a row of weight 0 adds 0 (even an inf or nan row: it is
    left out), and the derivative with respect to that weight is still the row's value where
    that is finite (a weight that reaches 0 can move again). "mean" is finite whenever the mean
    is: where the plain sum overflows, the rows are divided before they are added.

    "sum" and "mean" of half-precision rows (float16, bfloat16; the core never passes them, it
    computes in float32) are formed in float32 and returned as float32: a float16 count of more
    than 65504 rows is inf, and half sums of ones or weights are rounded above 2048 (256).
    """
    if reduction != "none" and getattr(rows.dtype, "itemsize", 4) < 4:  # (no cost otherwise)
        rows = xp.astype(rows, xp.float32)
        if weight is not None:
            weight = xp.astype(weight, xp.float32)
    zero = xp.zeros_like(rows)
    keep = mask
    if weight is not None:
        # rows of weight 0 are left out only where they would spoil the sum (0 * inf, 0 * nan):
        # a finite row stays in, adding 0 * row = 0, so that d/dw = row there
        live = (weight > 0) | ((weight == 0) & xp.isfinite(rows))
        keep = live if keep is None else (keep & live)
    if keep is not None:
        # select before multiplying: an inf row with weight 0 must give 0, not nan
        rows = xp.where(keep, rows, zero)
    if weight is not None:
        rows = rows * weight
    if reduction == "none":
        return rows
    with quiet(rows):
        total = xp.sum(rows)
    if reduction == "sum":
        return total
    if weight is not None:
        den = xp.sum(xp.where(keep, weight, xp.zeros_like(weight)))
    elif mask is not None:
        den = xp.sum(xp.astype(mask, rows.dtype))
    else:
        n = 1
        for s in rows.shape:
            n *= s
        if not n:
            return total
        den = xp.asarray(float(n), dtype=rows.dtype)
    safe = xp.where(den > 0, den, xp.ones_like(den))
    # the sum of rows near finfo.max overflows where their mean does not: divide first there
    with quiet(rows):
        mean = xp.where(xp.isinf(total), xp.sum(rows / safe), total / safe)
    return xp.where(den > 0, mean, xp.zeros_like(total))
