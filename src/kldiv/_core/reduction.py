"""Reductions over distributions (rows), with masks and weights: the one place they are defined.

"mean" is the mean over distributions (per token for (B, T, V) inputs), weighted when weights
are given: ``sum(mask * w * kl) / sum(mask * w)``; never a mean over categories.
"""
from __future__ import annotations


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
    """Apply ``reduction`` ("none", "sum", "mean") to per-row values."""
    zero = xp.zeros_like(rows)
    keep = None
    if mask is not None:
        keep = mask
    if weight is not None:
        pos = weight > 0
        keep = pos if keep is None else (keep & pos)
    if keep is not None:
        # select before multiplying: an inf row with weight 0 must give 0, not nan
        rows = xp.where(keep, rows, zero)
    if weight is not None:
        rows = rows * weight
    if reduction == "none":
        return rows
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
        return total / max(n, 1) if n else total
    safe = xp.where(den > 0, den, xp.ones_like(den))
    return xp.where(den > 0, total / safe, xp.zeros_like(total))
