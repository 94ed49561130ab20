"""kldiv: Kullback-Leibler divergence done right, on NumPy, PyTorch and JAX.

KL(p || q) with the reference first, exact edge cases, float32 accuracy for close distributions,
and one semantics on every backend. Importing kldiv imports no torch, jax or matplotlib.
"""
from ._core import (
    jeffreys_div,
    js_div,
    kl_div,
    kl_terms,
    normalization_tolerance,
    reverse_kl,
    set_validation,
    validation,
)

from ._core import dispatch as _dispatch
from . import backends as _backends

_dispatch.set_loader(_backends.load)  # fast paths load on an array library's first use


def _preload_backends():
    import sys

    for lib in ("torch", "jax"):  # already imported by the caller: load their fast paths now
        if lib in sys.modules:
            _dispatch.preload(lib)


_preload_backends()

__version__ = "0.1.0"

__all__ = [
    "kl_div", "reverse_kl", "js_div", "jeffreys_div", "kl_terms",
    "set_validation", "validation", "normalization_tolerance", "compare",
    "estimators", "distributions", "gluon", "plots", "io", "__version__",
]


def __getattr__(name):  # lazy access to the thin layers on top of the core
    if name == "compare":
        from .compare import compare

        return compare
    if name in ("gluon", "estimators", "distributions", "distributed", "torch", "plots", "metrics",
                "io"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kldiv' has no attribute {name!r}")
