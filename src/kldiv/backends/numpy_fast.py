"""NumPy fast paths: compiled row kernels in place of the core's array expressions.

Two handlers, registered with :mod:`kldiv._core.dispatch`:

- ``pre`` (raw user arguments): NumPy float32/float64 arrays of the same shape, in any spaces
  (probabilities, log-probabilities, logits; log-space sides with any temperature), every kind
  (KL, reverse KL, JS with any beta, Jeffreys), any axis, reduction, mask and weight, go through
  ``kldiv._ext._divrows``: one C pass per row reads both sides, runs the value checks
  (nan, signs, +inf, normalisation within ``kldiv.normalization_tolerance``) and forms the
  log-ratio; a second pass over the row (in cache) sums the centred terms. Everything is in
  double, with the core's cancellation-free algebra (see ``kldiv/_ext/divrows.c``). A row that
  fails a check, or that the kernel does not do exactly (a divergence beyond e^700, +inf inputs
  with checks off, ...), hands the whole call to the core, which then raises its own error or
  computes the value. Float32 logits at temperature 1 with KL, reverse KL or JS (beta 1/2) are
  left to the ``post`` handler below (its float32 kernel is faster).
- ``post`` (validated arguments): float32 logits through ``kldiv compare``'s row kernel.

Without value checks, a row holding a nan gives nan (a diverged model must not look finite).

>>> import numpy as np, kldiv
>>> p = np.array([0.3, 0.4, 0.1, 0.2]); q = np.array([0.2, 0.5, 0.2, 0.1])
>>> bool(np.isclose(kldiv.kl_div(p, q), np.sum(p * np.log(p / q))))
True
"""
from __future__ import annotations

import os

import numpy as np

from .._core import dispatch
from .._core.reduction import reduce_rows
from .._core.validation import (
    REDUCTIONS,
    TEMPERATURE_RANGE,
    normalization_tolerance,
    validation_enabled,
)

_KINDS = {"forward": 0, "reverse": 1, "js": 2, "jeffreys": 3}
_MODES = {"probs": 0, "log_probs": 1, "logits": 2}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_EPS = {np.dtype(np.float32): float(np.finfo(np.float32).eps),
        np.dtype(np.float64): float(np.finfo(np.float64).eps)}
#: below this many elements one call does all rows (thread hand-off costs more than it saves)
PARALLEL_MIN_ELEMENTS = 1 << 18

_NO_EXT = os.environ.get("KLDIV_NO_EXT", "") not in ("", "0")
_EXT = None
_EXT_TRIED = False


def extension():
    """The compiled ``_divrows`` module, or None (not built, or ``KLDIV_NO_EXT=1`` in the
    environment when this module was imported)."""
    global _EXT, _EXT_TRIED
    if _NO_EXT:
        return None
    if not _EXT_TRIED:
        _EXT_TRIED = True
        try:
            from .._ext import _divrows

            _EXT = _divrows
        except ImportError:
            _EXT = None
    return _EXT


def _rows_c(ext, a, b, modes, temperature, kind, beta, validate, tols, eps, threads=None):
    """Per-row values (float64) and status (int32) of two C-contiguous (rows, n) matrices."""
    n_rows, n = a.shape
    out = np.empty(n_rows, np.float64)
    status = np.empty(n_rows, np.int32)
    a64, b64 = int(a.dtype == np.float64), int(b.dtype == np.float64)

    def call(s, e):
        ext.rows(a[s:e], b[s:e], e - s, n, a64, b64, modes[0], modes[1], temperature, beta, kind,
                 validate, tols[0], tols[1], eps[0], eps[1], out[s:e], status[s:e])

    if a.size < PARALLEL_MIN_ELEMENTS or n_rows < 4:
        call(0, n_rows)
        return out, status
    from ..compare.kernel import _pool, cpu_count

    workers = cpu_count() if threads is None else int(threads)
    if workers <= 1 or n_rows < 2 * workers:
        call(0, n_rows)
        return out, status
    step = max(1, -(-n_rows // (2 * workers)))
    futures = [_pool(workers).submit(call, s, min(n_rows, s + step)) for s in range(0, n_rows, step)]
    for f in futures:
        f.result()
    return out, status


def divergence_rows_logits(kind, a, b, temperature=1.0, beta=0.5):
    """Per-row ``kind`` divergence (float64) of two C-contiguous 2-d logits blocks through
    ``_divrows`` without value checks, or None when the kernel is missing or declines a row.
    (``kldiv compare``'s kernel hands it the rows whose logits reach 2^16.)"""
    ext = extension()
    if ext is None or a.shape[0] == 0:
        return None
    n = a.shape[1]
    out, status = _rows_c(ext, a, b, (2, 2), float(temperature), _KINDS[kind], float(beta), 0,
                          (1.0, 1.0), (_EPS[a.dtype], _EPS[b.dtype]))
    return None if status.any() else out


def _plain_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def numpy_pre(kind, p, q, *, p_space, q_space, axis, reduction, mask, weight, temperature,
              t2_scale, validate, beta=0.5):
    """The whole call through ``_divrows`` when the inputs are plain (see the module docstring);
    ``NotImplemented`` otherwise (the core then runs, with its checks and its errors)."""
    if type(p) is not np.ndarray or type(q) is not np.ndarray:
        return NotImplemented
    if p.dtype not in _FLOATS or q.dtype not in _FLOATS or p.shape != q.shape or p.ndim == 0:
        return NotImplemented
    if not (isinstance(p_space, str) and isinstance(q_space, str) and isinstance(reduction, str)):
        return NotImplemented
    if p_space not in _MODES or q_space not in _MODES or reduction not in REDUCTIONS:
        return NotImplemented
    if kind not in _KINDS or not _plain_number(temperature) or not _plain_number(beta):
        return NotImplemented
    temperature = float(temperature)
    lo, hi = TEMPERATURE_RANGE
    if not lo <= temperature <= hi:  # nan, inf and out-of-range: the core raises its error
        return NotImplemented
    if temperature != 1.0 and (p_space == "probs" or q_space == "probs"):
        return NotImplemented
    if kind == "js" and not 0.0 < beta < 1.0:
        return NotImplemented
    if (p.dtype == np.float32 and q.dtype == np.float32 and p_space != "probs"
            and q_space != "probs" and temperature == 1.0
            and (kind in ("forward", "reverse") or (kind == "js" and beta == 0.5))):
        return NotImplemented  # float32 logits: the post handler's float32 kernel
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        return NotImplemented
    if not -p.ndim <= axis < p.ndim:
        return NotImplemented
    ext = extension()
    if ext is None:
        return NotImplemented
    ax = int(axis) % p.ndim
    n = p.shape[ax]
    if n == 0 or p.size == 0:
        return NotImplemented
    if ax != p.ndim - 1:
        p = np.moveaxis(p, ax, -1)
        q = np.moveaxis(q, ax, -1)
    rows_shape = p.shape[:-1]
    dt = p.dtype if p.dtype == q.dtype else np.result_type(p.dtype, q.dtype)
    try:
        if mask is not None:
            if type(mask) is not np.ndarray or mask.dtype != np.bool_:
                return NotImplemented
            mask = np.broadcast_to(mask, rows_shape)
        if weight is not None:
            if type(weight) is not np.ndarray or weight.dtype not in _FLOATS:
                return NotImplemented
            weight = np.broadcast_to(weight.astype(dt, copy=False), rows_shape)
    except ValueError:
        return NotImplemented
    check = validation_enabled(validate)
    if check and weight is not None and not bool(np.all(np.isfinite(weight) & (weight >= 0))):
        return NotImplemented
    a = np.ascontiguousarray(p).reshape(-1, n)
    b = np.ascontiguousarray(q).reshape(-1, n)
    eps = (_EPS[p.dtype], _EPS[q.dtype])
    tols = (normalization_tolerance(eps[0], n), normalization_tolerance(eps[1], n))
    out, status = _rows_c(ext, a, b, (_MODES[p_space], _MODES[q_space]), temperature, _KINDS[kind],
                          float(beta), int(check), tols, eps)
    # a failed check (the core raises its error) or a row for the core
    if (status.any() if mask is None else ((status != 0) & mask.reshape(-1)).any()):
        return NotImplemented
    with np.errstate(over="ignore"):  # a value beyond float32's range is +inf there, quietly
        rows = out.astype(dt, copy=False).reshape(rows_shape)
    if mask is None and weight is None:  # what reduce_rows returns then, without its overhead
        if reduction == "none":
            res = rows
        else:  # summed in double (the kernel's rows): a float32 mean near finfo.max stays finite
            tot = out.sum() if reduction == "sum" else out.sum() / max(rows.size, 1)
            with np.errstate(over="ignore"):
                res = rows.dtype.type(tot)
    else:
        res = reduce_rows(_xp(), rows, reduction, mask, weight)
    if t2_scale:
        res = res * temperature**2
    return res


_XP = None


def _xp():
    global _XP
    if _XP is None:
        from array_api_compat import numpy as cnp

        _XP = cnp
    return _XP


def numpy_rows(kind, p, q, *, p_space, q_space, reduction, mask, weight, temperature, beta=0.5):
    """Forward/reverse KL and JS (beta 1/2) of float32 NumPy logits through compare's row kernel."""
    js = kind == "js" and beta == 0.5
    if (p_space == "probs" or q_space == "probs" or not (kind in ("forward", "reverse") or js) or temperature != 1.0 or p.dtype != np.float32
            or q.dtype != np.float32 or p.ndim < 1 or p.shape[-1] == 0):
        return NotImplemented
    from ..compare.kernel import extension, row_stats

    if extension() is None:
        return NotImplemented
    shape = p.shape[:-1]
    v = p.shape[-1]
    a = np.ascontiguousarray(p).reshape(-1, v)
    b = np.ascontiguousarray(q).reshape(-1, v)
    if a.shape[0] == 0:
        return NotImplemented
    from ..compare.kernel import NAN_OTHER, NAN_REF

    st = row_stats(a, b, reverse=(kind == "reverse"), js=js)
    rows = st.js if js else st.kl if kind == "forward" else st.rkl
    # a nan in a row (only with checks off) gives nan: a diverged model must not look finite
    nan_rows = (st.status & (NAN_REF | NAN_OTHER)) != 0
    bad = (st.status != 0) & ~nan_rows
    if mask is not None:
        bad &= np.asarray(mask).reshape(-1)
    if bad.any():  # rows the kernel does not handle (validation off): the core decides
        return NotImplemented
    rows = np.where(nan_rows, np.nan, rows).astype(np.float32).reshape(shape)
    return reduce_rows(np, rows, reduction, mask, weight)


dispatch.register("numpy", "pre", numpy_pre)
dispatch.register("numpy", "post", numpy_rows)
