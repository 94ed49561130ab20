"""Backend-specific fast paths. The core (``kldiv._core``) defines the semantics; these only go faster.

Design rules (einops-style): a backend module is imported only when the caller already uses that
framework (checked through ``sys.modules``), and a missing or broken fast path never breaks the core:
it answers ``NotImplemented`` and the core computes the value itself.
"""
from __future__ import annotations

import sys


def try_fast_divergence(kind, p, q, **kw):
    """Ask a fast path for a reduced divergence; ``NotImplemented`` when none applies.

    Called by the core after validation, with the distribution axis already moved last, both
    inputs in log space ("logits" or "log_probs"), reduction "sum" or "mean", and ``kind`` one of
    "forward", "reverse", "js", "jeffreys". Keyword arguments: p_space, q_space, reduction, mask,
    weight, temperature, beta.
    """
    if "torch" not in sys.modules:
        return NotImplemented
    import torch

    if not (isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor)):
        return NotImplemented
    try:
        from . import torch_fused
    except ImportError:
        return NotImplemented
    return torch_fused.fused_divergence(kind, p, q, **kw)
