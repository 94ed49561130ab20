"""Input checks at the boundary: each failure names the argument and what is wrong with it.

Shape, dtype and option checks always run. Value checks (signs, finiteness, normalisation) cost
a pass over the data and a host synchronisation; they are on by default and can be switched off
for hot loops with ``validate=False``, ``kldiv.set_validation(False)`` or the
``kldiv.validation(False)`` context manager. They are skipped automatically while an array is
being traced (``jax.jit``, ``torch.compile``), where values are not known.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np

from ._xp import is_concrete, to_numpy

SPACES = ("probs", "log_probs", "logits")
REDUCTIONS = ("none", "sum", "mean")

_ENABLED = contextvars.ContextVar("kldiv_validation", default=True)


def set_validation(enabled: bool) -> None:
    """Turn value checks on or off globally (shape, dtype and option checks always run)."""
    _ENABLED.set(bool(enabled))


@contextlib.contextmanager
def validation(enabled: bool):
    """Context manager: ``with kldiv.validation(False): ...`` skips value checks inside."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def validation_enabled(validate: bool | None) -> bool:
    return _ENABLED.get() if validate is None else bool(validate)


def check_option(name: str, value, allowed) -> None:
    if value not in allowed:
        hint = ""
        if name == "reduction" and value == "batchmean":
            hint = " ('mean' is the per-distribution mean that torch's 'batchmean' gives for 2-d input)"
        raise ValueError(
            f"{name}: expected one of {', '.join(map(repr, allowed))}, got {value!r}{hint}"
        )


def check_floating(xp, name: str, x) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name}: expected a real floating-point array, got dtype {x.dtype}; "
            f"convert it first (for example x.astype(float))"
        )


def check_axis(axis, ndim: int, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {axis!r}")
    if ndim == 0:
        raise ValueError("p: expected at least one dimension (the categories), got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: {axis} is out of range for arrays with {ndim} dimensions")
    return int(axis) % ndim


def check_positive_finite(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return v


def normalization_tolerance(dtype_eps: float, n: int) -> float:
    """Allowed |row sum - 1| for probabilities (and |logsumexp| for log-probabilities).

    ``max(1e-6, 8 * eps * sqrt(n))`` capped at 0.05, with eps of the input dtype and n categories:
    1e-6 in float64, about 1.7e-4 for float32 rows of 32000 entries.
    """
    return min(0.05, max(1e-6, 8.0 * dtype_eps * math.sqrt(max(n, 1))))


def _first_bad_row(bad_rows) -> str:
    arr = to_numpy(bad_rows)
    if arr.ndim == 0:
        return "the distribution"
    idx = np.argwhere(arr)
    if idx.size == 0:  # pragma: no cover - defensive
        return ""
    first = tuple(int(i) for i in idx[0])
    where = f"row {first[0]}" if len(first) == 1 else f"row {first}"
    return f"{where} (and {len(idx) - 1} more)" if len(idx) > 1 else where


def check_values(xp, name: str, x, space: str, eps: float, logsumexp, rows=None) -> None:
    """Value checks for one input with its categories on the last axis.

    ``rows`` (bool, the row shape) restricts the checks to the rows that count (the mask):
    masked rows may hold anything. Two or three passes over the data; the details of a failure
    are worked out only once one is found.
    """
    if not is_concrete(x):
        return
    n = x.shape[-1]
    tol = normalization_tolerance(eps, n)

    def flagged(row_flags):
        return row_flags if rows is None else (row_flags & rows)

    if space == "probs":
        # one reduction per check: min and max propagate nan (NumPy, torch and JAX alike)
        bad = flagged(~(xp.min(x, axis=-1) >= 0) | ~(xp.max(x, axis=-1) < math.inf))
        if bool(xp.any(bad)):
            if bool(xp.any(flagged(xp.any(xp.isnan(x), axis=-1)))):
                raise ValueError(f"{name}: contains nan at "
                                 f"{_first_bad_row(flagged(xp.any(xp.isnan(x), axis=-1)))}")
            raise ValueError(
                f"{name}: probabilities must be finite and >= 0; {_first_bad_row(bad)} is not "
                f"(pass {name}_space='logits' for unnormalised scores)"
            )
        s = xp.sum(x, axis=-1)
        off = flagged(xp.abs(s - 1) > tol)
        if bool(xp.any(off)):
            arr = to_numpy(s)[to_numpy(off)]
            raise ValueError(
                f"{name}: each distribution must sum to 1 within {tol:.1e}; "
                f"{_first_bad_row(off)} sums to {float(arr.flat[0]):.8g} "
                f"(normalise it, or pass {name}_space='logits')"
            )
        return
    top = xp.max(x, axis=-1)  # nan propagates: one pass finds nan, +inf and empty rows
    bad = flagged(~(top < math.inf))  # nan and +inf; -inf is allowed
    if bool(xp.any(bad)):
        nan_rows = flagged(xp.any(xp.isnan(x), axis=-1))
        if bool(xp.any(nan_rows)):
            raise ValueError(f"{name}: contains nan at {_first_bad_row(nan_rows)}")
        raise ValueError(f"{name}: contains +inf at {_first_bad_row(bad)} ({name}_space={space!r})")
    empty = flagged(top == -math.inf)
    if bool(xp.any(empty)):
        raise ValueError(
            f"{name}: {_first_bad_row(empty)} is -inf everywhere: that is no distribution"
        )
    if space == "log_probs":
        lse = logsumexp(xp, x, axis=-1)[..., 0]
        off = flagged((xp.abs(lse) > tol) | (top > tol))
        if bool(xp.any(off)):
            raise ValueError(
                f"{name}: log-probabilities must be <= 0 with logsumexp 0 within {tol:.1e}; "
                f"{_first_bad_row(off)} is not (pass {name}_space='logits' for unnormalised scores)"
            )
