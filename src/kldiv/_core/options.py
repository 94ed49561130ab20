"""The model-side options of the divergences: soft-capping, logit scale, labels, vocabulary cut.

These turn the caller's arrays into the ones the divergence is defined on, before anything
else runs (checks, fast paths, the core), so every backend sees the same transformed inputs:

1. ``vocab_size``: only the first ``vocab_size`` categories of each side are kept (both sides
   are cut, so widths may differ: a student of 151936 logits against a teacher of 152064).
   Each side is then renormalised over the kept categories (a log-softmax of the kept
   logits): the divergence of the two distributions conditioned on the real vocabulary.
   Log-probability sides are cut and then treated as logits (the renormalisation is the same);
   probability sides must hold no mass beyond the cut (checked, within the normalisation
   tolerance, with validation on). Never pad the smaller side with zero logits instead: a
   logit of 0 is a real score, and ``softmax`` gives each padded column ``exp(0) / Z`` of
   probability, a distribution that neither model defines (and a spurious divergence).
2. ``logit_scale`` and ``softcap`` on logits-space sides, as a model's forward pass applies
   them: ``softcap * tanh(logit_scale * x / softcap)`` (Gemma-2's final-logit soft-capping
   with ``logit_scale`` 1; ``logit_scale * x`` without ``softcap``). A logit of -inf (a masked
   category) stays -inf: the cap bounds finite scores and never unmasks a category. The
   distillation temperature of the divergence divides afterwards (the model's output first,
   then the distillation's temperature). Gradients (first and second order) flow through.
3. ``labels`` with ``ignore_index`` (default -100, as torch's ``cross_entropy``): rows whose
   label equals ``ignore_index`` are masked, exactly as with ``mask`` (and together with it).

Per-side values (``softcap``, ``logit_scale``): a number applies to every side whose space is
``"logits"`` (and to no other side; at least one side must be logits); a pair
``(p_value, q_value)`` gives each side its own, ``None`` leaving that side alone; a value for
a side that is not ``"logits"`` is refused (probabilities and log-probabilities are past the
model's output layer).
"""
from __future__ import annotations

import math
import numbers

from . import validation as V
from ._xp import as_array, const, is_concrete, namespace

__all__ = ["apply_options", "check_per_side", "check_vocab_size", "check_ignore_index"]

_WHAT = {
    "softcap": "a positive finite number",
    "logit_scale": "a finite nonzero number",
}


def _check_value(name, value, side):
    """One side's ``softcap`` or ``logit_scale`` as a float (None passes)."""
    if value is None:
        return None
    label = name if side is None else f"{name} ({side} side)"
    if getattr(value, "requires_grad", False):
        raise TypeError(f"{label}: a tensor that requires grad would lose its gradient here; "
                        "pass a number, or apply a learned scale to the logits yourself")
    v = V._as_number(label, value, _WHAT[name])
    if name == "softcap" and not (math.isfinite(v) and v > 0):
        raise ValueError(f"{label}: expected a positive finite number, got {value!r}")
    if name == "logit_scale" and not (math.isfinite(v) and v != 0):
        raise ValueError(f"{label}: expected a finite nonzero number, got {value!r}")
    return v


def check_per_side(name, value, p_space, q_space, names=("p", "q")):
    """``(p_value, q_value)`` of a per-side option; see the module docstring for the rules."""
    if value is None:
        return None, None
    spaces = (p_space, q_space)
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected a number or a pair ({names[0]}_value, "
                             f"{names[1]}_value), got a sequence of {len(value)}")
        out = []
        for v, side, space in zip(value, names, spaces):
            v = _check_value(name, v, side)
            if v is not None and space != "logits":
                raise ValueError(
                    f"{name}: applies to logits (the model's output layer), but "
                    f"{side}_space={space!r}; pass None for {side}, or {side}'s logits"
                )
            out.append(v)
        return tuple(out)
    v = _check_value(name, value, None)
    if "logits" not in spaces:
        raise ValueError(
            f"{name}: applies to logits-space inputs, and neither side is one "
            f"({names[0]}_space={p_space!r}, {names[1]}_space={q_space!r})"
        )
    return tuple(v if s == "logits" else None for s in spaces)


def check_vocab_size(vocab_size):
    if vocab_size is None:
        return None
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size: expected a positive int, got {vocab_size!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
    return int(vocab_size)


def check_ignore_index(ignore_index, labels):
    """The ignore index as an int (-100 when labels are given without one)."""
    if ignore_index is None:
        return -100
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if labels is None:
        raise ValueError("ignore_index: given without labels; pass labels= (the row labels "
                         "whose value ignore_index masks a row)")
    return int(ignore_index)


def cap(xp, x, softcap=None, logit_scale=None):
    """``softcap * tanh(logit_scale * x / softcap)`` (``logit_scale * x`` without a cap).

    -inf entries stay -inf (masked categories remain masked); the selected-away branch is fed
    a safe 0 (double where: no nan in first or second derivatives).
    """
    if softcap is None:
        if logit_scale is None:
            return x
        y = x * const(xp, logit_scale, x)
        # a negative scale must not turn a masked -inf into +inf
        return y if logit_scale > 0 else xp.where(x == -math.inf, x, y)
    factor = (1.0 if logit_scale is None else logit_scale) / softcap
    masked = x == -math.inf
    safe = xp.where(masked, xp.zeros_like(x), x)
    # x * (scale / cap), not (scale * x) / cap: no overflow of scale * x before the tanh
    y = const(xp, softcap, x) * xp.tanh(safe * const(xp, factor, x))
    return xp.where(masked, x, y)


_array = as_array


def _promote(xp, x):
    """Half-precision inputs are transformed in float32 (the core computes in float32)."""
    if xp.finfo(x.dtype).bits < 32:
        return xp.astype(x, xp.float32)
    return x


def _cut(x, ax, n):
    return x[(slice(None),) * ax + (slice(0, n),)]


def _axis_of(x, axis, ndim):
    """Index of ``axis`` (counted on the broadcast ``ndim``) in ``x``; None if out of range."""
    try:
        a = V.check_axis(axis, ndim)
    except (TypeError, ValueError):
        return None
    a -= ndim - x.ndim
    return a if 0 <= a < x.ndim else None


def _rows_shape(p, q, ax_p, ax_q):
    import numpy as np

    sp = tuple(s for i, s in enumerate(p.shape) if i != ax_p)
    sq = tuple(s for i, s in enumerate(q.shape) if i != ax_q)
    try:
        return tuple(np.broadcast_shapes(sp, sq))
    except ValueError:
        return None


def _mass_beyond(xp, x, ax, n, name, eps, keep):
    """Probabilities beyond the cut must be (numerically) zero: checked with validation on."""
    if not is_concrete(x):
        return
    tail = xp.sum(xp.moveaxis(x, ax, -1)[..., n:], axis=-1)
    tol = V.normalization_tolerance(eps, x.shape[ax])
    bad = ~(tail <= tol)  # nan counts as bad
    if keep is not None:
        try:
            bad = bad & keep
        except (ValueError, RuntimeError, TypeError):  # the divergence reports the mask
            pass
    if bool(xp.any(bad)):
        raise ValueError(
            f"vocab_size: {name} (probabilities) holds mass beyond the first {n} categories "
            f"(more than {tol:.1e} at {V._first_bad_row(bad)}); the cut keeps a distribution "
            f"only if nothing is cut off: pass {name}'s logits or log-probabilities to "
            "condition on the first vocab_size categories"
        )


def apply_options(p, q, *, p_space, q_space, axis, mask, softcap=None, logit_scale=None,
                  vocab_size=None, labels=None, ignore_index=None, validate=None,
                  names=("p", "q")):
    """Transform ``p``, ``q`` and ``mask`` by the options; returns ``(p, q, p_space, q_space,
    mask)`` for the divergence proper (see the module docstring for the semantics)."""
    from array_api_compat import is_array_api_obj

    V.check_option(f"{names[0]}_space", p_space, V.SPACES)
    V.check_option(f"{names[1]}_space", q_space, V.SPACES)
    sc = check_per_side("softcap", softcap, p_space, q_space, names)
    ls = check_per_side("logit_scale", logit_scale, p_space, q_space, names)
    vocab_size = check_vocab_size(vocab_size)
    ignore_index = check_ignore_index(ignore_index, labels)
    p, q = _array(p, names[0]), _array(q, names[1])
    if labels is not None and not is_array_api_obj(labels):
        raise TypeError(f"labels: expected an integer array of the row shape, got "
                        f"{type(labels).__name__}")
    # labels from another array library: named in the error (not reported later as the mask)
    xp = namespace(**{names[0]: p, names[1]: q, "labels": labels})
    V.check_floating(xp, names[0], p)
    V.check_floating(xp, names[1], q)
    ndim = max(p.ndim, q.ndim, 1)
    ax_p, ax_q = _axis_of(p, axis, ndim), _axis_of(q, axis, ndim)
    if ax_p is None or ax_q is None:  # the divergence reports the axis or the scalar
        return p, q, p_space, q_space, mask
    if labels is not None:
        if not xp.isdtype(labels.dtype, "integral"):
            raise TypeError(f"labels: expected an integer array, got dtype {labels.dtype}")
        rows_shape = _rows_shape(p, q, ax_p, ax_q)
        if rows_shape is not None:
            from .reduction import broadcast_rows

            labels = broadcast_rows(xp, labels, rows_shape, "labels")
        keep = labels != ignore_index
        if mask is not None:
            if not xp.isdtype(mask.dtype, "bool"):
                raise TypeError(f"mask: expected a boolean array, got dtype {mask.dtype}")
            keep = keep & mask
        mask = keep
    if vocab_size is not None:
        for x, ax, name in ((p, ax_p, names[0]), (q, ax_q, names[1])):
            if x.shape[ax] < vocab_size:
                raise ValueError(
                    f"vocab_size: {vocab_size} is more than the {x.shape[ax]} categories of "
                    f"{name} (axis {axis}); vocab_size keeps the first vocab_size categories "
                    "of both sides"
                )
        if V.validation_enabled(validate):
            for x, ax, space, name in ((p, ax_p, p_space, names[0]), (q, ax_q, q_space, names[1])):
                if space == "probs" and x.shape[ax] > vocab_size:
                    _mass_beyond(xp, x, ax, vocab_size, name, xp.finfo(x.dtype).eps, mask)
        if p.shape[ax_p] > vocab_size:
            p = _cut(p, ax_p, vocab_size)
            p_space = "logits" if p_space == "log_probs" else p_space
        if q.shape[ax_q] > vocab_size:
            q = _cut(q, ax_q, vocab_size)
            q_space = "logits" if q_space == "log_probs" else q_space
    if sc[0] is not None or ls[0] is not None:
        p = cap(xp, _promote(xp, p), sc[0], ls[0])
    if sc[1] is not None or ls[1] is not None:
        q = cap(xp, _promote(xp, q), sc[1], ls[1])
    return p, q, p_space, q_space, mask
