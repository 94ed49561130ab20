"""Registration points for fast paths: the core calls them, backends fill them.

Dependencies point one way: ``kldiv._core`` imports no backend; a backend module
(``kldiv.backends.*``) imports the core and registers its handlers here when it is imported.
The package's top level (``kldiv/__init__.py``) installs a *loader* that imports the backend
module for an array library on first use, and only once the caller's array comes from that
library (so importing kldiv never imports torch or jax).

Two hooks, both keyed by the array library's name ("numpy", "torch", "jax"):

- ``pre``: called first by every public divergence with the user's arguments untouched
  (``handler(kind, p, q, **options)``, options as the public keywords plus ``beta``). It may do
  everything itself (checks included: its errors must be the core's) or answer
  ``NotImplemented``, and the core then runs as if no handler existed.
- ``post``: called by the core after validation, with the category axis moved last and
  mask/weight broadcast to the row shape (``handler(kind, p, q, p_space=..., q_space=...,
  reduction=..., mask=..., weight=..., temperature=..., beta=...)``); same contract.

A handler must agree with the core on every input the core accepts (values, dtypes, edges).
"""
from __future__ import annotations

__all__ = ["register", "set_loader", "preload", "handler", "library_of"]

_HANDLERS: dict[tuple[str, str], object] = {}
_LOADED: set[str] = set()
_LIB_BY_TYPE: dict[type, str] = {}
_loader = None


def library_of(x) -> str:
    """The array library of ``x`` by its type's top-level module ("jaxlib" counts as "jax")."""
    t = type(x)
    lib = _LIB_BY_TYPE.get(t)
    if lib is None:
        lib = t.__module__.partition(".")[0]
        if lib == "jaxlib":
            lib = "jax"
        _LIB_BY_TYPE[t] = lib
    return lib


def register(library: str, hook: str, fn) -> None:
    """Register ``fn`` as the ``hook`` ("pre" or "post") handler for ``library``."""
    if hook not in ("pre", "post"):
        raise ValueError(f"hook: expected 'pre' or 'post', got {hook!r}")
    _HANDLERS[(library, hook)] = fn


def set_loader(fn) -> None:
    """Install the function that imports the backend module of a library (called once each)."""
    global _loader
    _loader = fn


def preload(library: str) -> None:
    """Load ``library``'s backend now (once), not on its first call.

    The package does this at import for the libraries already imported: a first call made
    inside a ``torch.compile`` trace must not have to import a module (Dynamo cannot trace
    an import).
    """
    if library not in _LOADED:
        _LOADED.add(library)
        if _loader is not None:
            _loader(library)


def handler(hook: str, p, q):
    """The ``hook`` handler for arrays ``p`` and ``q`` of one library, or None."""
    lib = library_of(p)
    if library_of(q) != lib:
        return None
    if lib not in _LOADED:
        preload(lib)
    return _HANDLERS.get((lib, hook))
