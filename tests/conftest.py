"""Shared test fixtures: the ``xp`` backend fixture and conversions to and from NumPy.

Usage in a test file::

    def test_something(xp):                      # runs once per selected backend
        p = xp.asarray(np_p)                     # NumPy array -> backend array (dtype kept)
        q = xp.asarray(np_q, dtype="float32")    # ... or cast ("float16", "bfloat16" too)
        out = kldiv.kl_div(p, q)
        np.testing.assert_allclose(to_numpy(out), expected)   # any backend -> float64 NumPy

``xp`` is a :class:`Backend`: ``xp.name`` ("numpy", "torch", "jax", "array_api_strict"),
``xp.ns`` (the library's array namespace: numpy, torch, jax.numpy, array_api_strict), and any
other attribute is looked up on ``xp.ns`` (``xp.float32``, ``xp.exp``...). ``xp.is_native(a)``
tells whether ``a`` is an array of that library (results must come back in the caller's type).

Backends are selected with the environment variable ``KLDIV_BACKENDS`` (comma separated; default
all four). A selected backend that cannot be imported makes every test that uses it FAIL, never
skip: a backend that silently does not run is a backend that is not tested. The pytest header
says which backends were selected and which of them imported. JAX runs with ``jax_enable_x64``
so that float64 means float64 there.
"""
from __future__ import annotations

import importlib
import os

# Triton's interpreter for the Triton kernel tests (tests/test_triton*.py) on CPU tensors: it
# must be set before triton is first imported, and torch.compile (inductor) imports triton when
# it is installed, so a pytest-xdist worker that ran a torch.compile test first skipped them.
# Nothing else changes: kldiv takes the Triton path on CPU only with KLDIV_BACKEND=triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

ALL_BACKENDS = ("numpy", "torch", "jax", "array_api_strict")


def selected_backends() -> list[str]:
    raw = os.environ.get("KLDIV_BACKENDS", "")
    names = [b.strip() for b in raw.split(",") if b.strip()] or list(ALL_BACKENDS)
    unknown = [b for b in names if b not in ALL_BACKENDS]
    if unknown:
        raise pytest.UsageError(
            f"KLDIV_BACKENDS: unknown backend(s) {unknown}; choose from {', '.join(ALL_BACKENDS)}"
        )
    return names


BACKENDS = selected_backends()
_IMPORT_ERRORS: dict[str, str] = {}


def _import_backend(name: str):
    """The namespace module of a backend (raises ImportError when it is not installed)."""
    if name == "numpy":
        return np
    if name == "torch":
        return importlib.import_module("torch")
    if name == "jax":
        jax = importlib.import_module("jax")
        jax.config.update("jax_enable_x64", True)
        return importlib.import_module("jax.numpy")
    return importlib.import_module("array_api_strict")


def pytest_configure(config):
    for name in BACKENDS:
        try:
            _import_backend(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is reported
            _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"


def pytest_report_header(config):
    ok = [b for b in BACKENDS if b not in _IMPORT_ERRORS]
    line = f"kldiv backends (KLDIV_BACKENDS): running {', '.join(ok) or 'none'}"
    if _IMPORT_ERRORS:
        line += "; NOT IMPORTABLE (their tests fail): " + "; ".join(
            f"{k} ({v})" for k, v in _IMPORT_ERRORS.items()
        )
    return line


# ----------------------------------------------------------------------------------------------
# conversions


def _np_dtype(dtype):
    if dtype is None:
        return None
    return np.dtype(str(dtype).replace("torch.", ""))


def to_numpy(a, dtype=np.float64) -> np.ndarray:
    """Any backend's array (or a Python scalar) as a NumPy array, cast to ``dtype``.

    Floating arrays are converted to float64 by default (bfloat16 and float16 included);
    ``dtype=None`` keeps the dtype where NumPy has it. Torch tensors are detached first.
    """
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        a = a.detach().cpu()
        if a.is_floating_point() and a.element_size() < 4:
            a = a.float()
        out = a.numpy()
    elif mod == "array_api_strict":
        out = np.from_dlpack(a)
    else:
        out = np.asarray(a)
    if dtype is not None and out.dtype.kind in "fc":
        out = out.astype(dtype)
    return out


class Backend:
    """One array library as seen by the tests: ``name``, namespace ``ns``, converters."""

    def __init__(self, name: str):
        self.name = name
        self.ns = _import_backend(name)

    def __repr__(self):
        return f"Backend({self.name})"

    def __getattr__(self, attr):
        return getattr(self.ns, attr)

    def dtype(self, name: str):
        """The backend's dtype object for "float16", "bfloat16", "float32", "float64", "bool"..."""
        if self.name == "numpy" and name == "bfloat16":
            pytest.skip("NumPy has no bfloat16")
        if self.name == "array_api_strict" and name in ("float16", "bfloat16"):
            pytest.skip("array_api_strict has no half-precision dtypes")
        return getattr(self.ns, name)

    def asarray(self, x, dtype=None, requires_grad: bool = False):
        """A NumPy array or nested list as an array of this backend; ``dtype`` as a string or
        a NumPy dtype casts (the values are first taken as NumPy values, then rounded once)."""
        x = np.asarray(x)
        dt = None if dtype is None else str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
        if self.name == "torch":
            import torch

            t = torch.from_numpy(np.array(x, copy=True))
            if dt is not None:
                t = t.to(getattr(torch, dt))
            if requires_grad:
                t.requires_grad_(True)
            return t
        if self.name == "numpy":
            if dt is None:
                return np.array(x, copy=True)
            return x.astype(self.dtype(dt))
        if self.name == "jax":
            return self.ns.asarray(x, dtype=None if dt is None else getattr(self.ns, dt))
        if dt is not None:
            self.dtype(dt)  # skips on half precision
            x = x.astype(dt)
        return self.ns.asarray(x)

    def is_native(self, a) -> bool:
        """True when ``a`` is an array of this backend (not a NumPy array, not a Python float)."""
        mod = type(a).__module__.split(".")[0]
        if self.name == "jax":
            return mod in ("jax", "jaxlib")
        return mod == self.name


@pytest.fixture(params=BACKENDS)
def xp(request) -> Backend:
    """The backend under test (see the module docstring). Fails if it cannot be imported."""
    name = request.param
    if name in _IMPORT_ERRORS:
        pytest.fail(f"backend {name!r} was selected (KLDIV_BACKENDS) but does not import: "
                    f"{_IMPORT_ERRORS[name]}")
    return Backend(name)


@pytest.fixture
def restore_jax_x64():
    """For tests that switch JAX to float64 themselves: put the global flag back afterwards."""
    import sys

    jax = sys.modules.get("jax")
    before = bool(jax.config.jax_enable_x64) if jax is not None else None
    yield
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.config.update("jax_enable_x64", bool(before))
