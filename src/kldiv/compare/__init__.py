"""How far one model's next-token distributions drift from a reference's, from logits files.

``compare(reference, other, ...)`` streams two logits files (.npy, .safetensors, llama.cpp KL
base) row block by row block through a compiled row kernel and returns a :class:`Report` with
llama.cpp's statistics (``kldiv compare`` on the command line).

``kldiv.compare`` is both this package and the function: once the package is imported, Python
binds ``kldiv.compare`` to the module, so the module itself is made callable and forwards to
:func:`compare` (``kldiv.compare(a, b)`` and ``from kldiv.compare import compare`` both work).
"""
from __future__ import annotations

import sys
import types

from .api import compare
from .report import Report

__all__ = ["compare", "Report"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
