"""How far one model's next-token distributions drift from a reference's, from logits files.

``compare(reference, other, ...)`` streams two logits files (.npy, .safetensors, llama.cpp KL
base) row block by row block through a compiled row kernel and returns a :class:`Report` with
llama.cpp's statistics (``kldiv compare`` on the command line).
"""
from __future__ import annotations

from .api import compare
from .report import Report

__all__ = ["compare", "Report"]
