"""Array-namespace helpers: the few primitives the array API lacks, written once per backend.

Everything backend-specific that the core needs lives here (log-sum-exp, tracer detection, a
host copy for error messages). Backends are detected from the array's type, and a framework is
never imported unless the caller's array already comes from it.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np
from array_api_compat import array_namespace, device, is_jax_array, is_torch_array

__all__ = ["namespace", "logsumexp", "const", "stop_gradient", "quiet", "is_concrete", "to_numpy",
           "device", "wide_float", "xlogx", "scaled_unflushed", "nonpositive", "subnormal",
           "is_jax_array"]


def namespace(*arrays, **named_arrays):
    """The array-API namespace shared by ``arrays`` (None entries are ignored).

    Pass them by keyword to have a mixed-library error name the arguments.
    """
    named = {f"argument {i}": a for i, a in enumerate(arrays)}
    named.update(named_arrays)
    named = {k: a for k, a in named.items() if a is not None}
    try:
        return array_namespace(*named.values())
    except (TypeError, ValueError) as exc:
        kinds = ", ".join(
            f"{k}: {type(a).__module__.split('.')[0]}.{type(a).__name__}" for k, a in named.items()
        )
        libs = ", ".join(sorted({type(a).__module__.split(".")[0] for a in named.values()}))
        raise TypeError(
            f"kldiv: all array arguments must come from one array library; got {kinds} "
            f"(libraries: {libs})"
        ) from exc


def const(xp, value, like):
    """A 0-d array holding ``value`` with the dtype and device of ``like``."""
    return xp.asarray(value, dtype=like.dtype, device=device(like))


def stop_gradient(x):
    """``x`` as a constant for automatic differentiation (torch ``detach``, JAX
    ``lax.stop_gradient``); arrays without autodiff are returned as they are.

    The core uses it for shifts that cancel exactly in the math (a row's maximum): their gradient
    would only add rounding noise, and no backward pass needs to run through them.
    """
    if is_torch_array(x):
        return x.detach()
    if is_jax_array(x):
        import jax

        return jax.lax.stop_gradient(x)
    return x


_NO_CONTEXT = contextlib.nullcontext()


def quiet(x):
    """A context in which NumPy raises no floating-point warnings for ``x``'s computations.

    The core forms inf, 0 * inf and overflows on purpose in branches that a ``where`` then
    discards (and clamps huge values itself); NumPy would warn about each. Other libraries do
    not warn: a no-op context for them.
    """
    if isinstance(x, (np.ndarray, np.generic)) or type(x).__module__.startswith("array_api_strict"):
        return np.errstate(all="ignore")  # array_api_strict computes with NumPy underneath
    return _NO_CONTEXT


def logsumexp(xp, x, axis=-1):
    """log(sum(exp(x))) along ``axis`` (kept as a size-1 axis); -inf for an all -inf row.

    Uses the framework's own primitive where one exists (its gradient and second derivative are
    exact and nan-free for -inf entries); otherwise the max-shifted form.
    """
    if is_torch_array(x):
        import torch

        return torch.logsumexp(x, dim=axis, keepdim=True)
    if is_jax_array(x):
        import jax

        return jax.nn.logsumexp(x, axis=axis, keepdims=True)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    return xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m


def xlogx(xp, x):
    """x log x for x > 0, as one primitive where the library has one (torch ``special.entr``,
    JAX ``scipy.special.entr``): its derivative is log x + 1 and its second derivative 1/x,
    each formed directly (autodiff of ``x * log(x)`` forms x * (1/x), whose derivative is
    inf - inf for a float32 subnormal x)."""
    if is_torch_array(x):
        import torch

        return -torch.special.entr(x)
    if is_jax_array(x):
        import jax

        return -jax.scipy.special.entr(x)
    return x * xp.log(x)


def nonpositive(x):
    """``x <= 0`` (a nan is not), read from the bits for a JAX array: XLA on CPU compares a
    subnormal operand as 0 (float32 1e-45 <= 0 is true there), which would drop a positive
    probability from the support (an escape: +inf where the divergence is finite)."""
    nonpos = x <= 0
    if not is_jax_array(x):
        return nonpos
    return nonpos & (_bits(x)[0] <= 0)  # a positive subnormal has bits > 0 (sign bit clear, not +0)


def _bits(x):
    import jax
    import jax.numpy as jnp

    ity = jnp.int64 if x.dtype == jnp.float64 else jnp.int32
    return jax.lax.bitcast_convert_type(jax.lax.stop_gradient(x), ity), (52 if ity == jnp.int64
                                                                           else 23)


def subnormal(x):
    """Where the JAX array ``x`` holds a nonzero subnormal (exponent field 0), from the bits."""
    bits, mbits = _bits(x)
    return ((bits >> mbits) == 0) & (bits != 0)


def scaled_unflushed(x, scaled, e):
    """``x * 2**e`` (``scaled``, formed by the caller) with its subnormal entries taken from their
    bits: XLA on CPU flushes subnormal operands to 0 in arithmetic (float32 and float64), so
    ``x * 2**e`` of a subnormal x is 0 there, although the scaled value is a normal number.
    For a JAX array, where x's exponent field is 0, the value is mantissa * 2**(e - 149)
    (float32; e - 1074 in float64), exact, with the derivative of ``x * 2**e`` (2**e; the
    cotangent itself is flushed where it is a subnormal: XLA's limit, not the formula's).
    Other arrays are returned as they are (their arithmetic keeps subnormals)."""
    if not is_jax_array(x):
        return scaled
    import jax
    import jax.numpy as jnp

    bits, mbits = _bits(x)
    low = 1074 if mbits == 52 else 149
    mant = bits & ((1 << mbits) - 1)
    sub = (bits >> mbits) == 0  # x > 0: the sign bit is 0; exponent field 0 (or x = 0)
    from_bits = mant.astype(x.dtype) * jnp.asarray(2.0 ** (e - low), x.dtype)
    # 0 in value (x - x, flushed or not), 2**e in derivative
    tangent = (x - jax.lax.stop_gradient(x)) * jnp.asarray(2.0 ** e, x.dtype)
    return jnp.where(sub, from_bits + tangent, scaled)


def wide_float(xp, x):
    """float64 where ``x``'s namespace and device compute in it, else None: JAX only with
    ``jax_enable_x64`` (otherwise it would silently stay float32), torch not on MPS."""
    if is_jax_array(x):
        import jax

        return xp.float64 if jax.config.jax_enable_x64 else None
    if is_torch_array(x) and x.device.type == "mps":
        return None
    return getattr(xp, "float64", None)


def is_concrete(x) -> bool:
    """False while ``x`` is traced (jax.jit, torch.compile): value checks cannot run then."""
    if is_jax_array(x):
        jax_core = sys.modules.get("jax.core")
        tracer = getattr(jax_core, "Tracer", None)
        return tracer is None or not isinstance(x, tracer)
    if is_torch_array(x):
        import torch

        try:
            if torch.compiler.is_compiling():
                return False
        except AttributeError:  # pragma: no cover - old torch
            pass
        return not getattr(x, "is_meta", False)
    return True


def to_numpy(x) -> np.ndarray:
    """A host NumPy copy of ``x`` (for error messages and the CLI); detaches torch tensors."""
    if is_torch_array(x):
        x = x.detach()
        if x.dtype.is_floating_point and x.dtype.itemsize < 4:
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def as_array(x, name):
    """An array as it is; nested lists and scalars as float64 NumPy; a clear TypeError naming
    ``name`` for anything else."""
    from array_api_compat import is_array_api_obj

    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    if is_array_api_obj(x):
        return x
    import numpy as np

    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected an array of numbers, got {type(x).__name__}") from None
