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

#: the process-wide default (``set_validation``), shared by every thread
_DEFAULT = [True]
#: an override for the current thread / async context (``validation``); None: the default
_OVERRIDE = contextvars.ContextVar("kldiv_validation", default=None)

#: the supported temperatures, both ends included (``check_temperature``)
TEMPERATURE_RANGE = (1e-6, 1e6)


def set_validation(enabled: bool) -> None:
    """Turn value checks on or off for the whole process, every thread included.

    Shape, dtype and option checks always run. Inside a ``with kldiv.validation(...)`` block
    the block's setting wins (in that thread or async context only); ``validate=`` of a call
    wins over both.
    """
    _DEFAULT[0] = bool(enabled)


@contextlib.contextmanager
def validation(enabled: bool):
    """Context manager: ``with kldiv.validation(False): ...`` skips value checks inside.

    It applies to the current thread (or async context, a ``contextvars`` variable) only, and
    wins over ``set_validation`` there until the block ends.
    """
    token = _OVERRIDE.set(bool(enabled))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def validation_enabled(validate: bool | None) -> bool:
    if validate is not None:
        return bool(validate)
    v = _OVERRIDE.get()
    return _DEFAULT[0] if v is None else v


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
        how = "x.float()" if type(x).__module__.partition(".")[0] == "torch" else "x.astype(float)"
        raise TypeError(
            f"{name}: expected a real floating-point array, got dtype {x.dtype}; "
            f"convert it first (for example {how})"
        )


def check_axis(axis, ndim: int, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {axis!r}")
    if ndim == 0:
        raise ValueError("p: expected at least one dimension (the categories), got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: {axis} is out of range for arrays with {ndim} dimensions")
    return int(axis) % ndim


def _as_number(name: str, value, what: str) -> float:
    """``value`` as a float; strings and booleans are refused, not converted."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__} {value!r}")
    if getattr(value, "requires_grad", False):  # a torch tensor recording a gradient
        hint = (" (to learn a temperature T, pass logits / T and temperature=1: the gradient "
                "then reaches T through the division)" if name == "temperature" else "")
        raise TypeError(
            f"{name}: a tensor that requires grad; kldiv takes {name} as a constant and "
            f"computes no gradient for it, so a learnable {name} would silently not learn: "
            f"pass float({name}) or {name}.detach(){hint}"
        )
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected {what}, got {value!r}") from None


def check_positive_finite(name: str, value) -> float:
    if name == "temperature":  # one rule for the temperature on every path
        return check_temperature(value)
    v = _as_number(name, value, "a positive number")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return v


def check_temperature(value) -> float:
    """The temperature as a float, refused outside ``TEMPERATURE_RANGE`` (1e-6 to 1e6).

    Within the range every divergence of logits or log-probabilities is computed to its
    documented accuracy, in float32 too (x / T of any finite float32 logit is handled; a
    temperature below about 1e-38 would not even be representable in float32). So is every
    divergence of probabilities: below T = 1/2 each row is centred on its largest probability
    before the division by T (``kldiv._core.divergence._centred_log_probs``), so that float32
    keeps about 1e-7 relative down to T = 1e-6 (the plain log p lost 2e-8 / T there).
    Strings and booleans are refused with a TypeError.
    """
    v = _as_number("temperature", value, "a positive number")
    lo, hi = TEMPERATURE_RANGE
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"temperature: expected a positive finite number, got {value!r}")
    if not lo <= v <= hi:
        raise ValueError(
            f"temperature: {value!r} is outside the supported range [{lo:g}, {hi:g}]"
        )
    return v


def check_beta(value) -> float:
    """The Jensen-Shannon mixture weight as a float strictly between 0 and 1.

    Any such beta is computed to the dtype's accuracy, values and gradients, on every path
    (beta = 1e-12 or 1 - 2^-24: ~1e-7 in float32, ~1e-15 in float64;
    ``tests/test_js_extreme_beta.py``): the mixture's logarithms take 1 - beta from beta
    itself, never as 1 - (1 - beta)."""
    b = _as_number("beta", value, "a number strictly between 0 and 1")
    if not 0.0 < b < 1.0:
        raise ValueError(
            f"beta: must lie strictly between 0 and 1, got {value!r} (beta -> 0 or 1 makes the "
            "divergence vanish; use kl_div or reverse_kl for the KL limits)"
        )
    return b


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
            swap = ""
            if name == "p" and bool(xp.any(flagged(xp.max(x, axis=-1) <= 0))):
                swap = ("; the arguments may be swapped: kldiv takes the reference p first "
                        "(torch's F.kl_div takes the log-probabilities first)")
            raise ValueError(
                f"{name}: probabilities must be finite and >= 0; {_first_bad_row(bad)} is not "
                f"(pass {name}_space='logits' for unnormalised scores{swap})"
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
