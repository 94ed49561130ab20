"""Backend-specific fast paths. The core (``kldiv._core``) defines the semantics; these only go faster.

Design rules (einops-style): a backend module is imported only when the caller already uses that
framework (the core asks for it on the first call with an array of that library, through the
loader that ``kldiv/__init__.py`` installs in ``kldiv._core.dispatch``), and a missing or broken
fast path never breaks the core: it answers ``NotImplemented`` and the core computes the value
itself. Dependencies point down: backends import the core, never the other way.
"""
from __future__ import annotations

import importlib

#: the backend modules of each array library (imported on the library's first use by kldiv)
MODULES = {
    "numpy": ("numpy_fast",),
    "torch": ("torch_fast", "torch_fused"),
    "jax": ("jax_fast",),
}


def load(library: str) -> None:
    """Import the fast-path modules of ``library``; they register their handlers with the core."""
    for name in MODULES.get(library, ()):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError:  # a missing or broken fast path never breaks the core
            pass
