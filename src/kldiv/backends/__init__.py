"""Backend-specific fast paths. The core (``kldiv._core``) defines the semantics; these only go faster.

Design rules (einops-style): a backend module is imported only when the caller already uses that
framework (checked through ``sys.modules``), and a missing or broken fast path never breaks the core:
it answers ``NotImplemented`` and the core computes the value itself.
"""
from __future__ import annotations

import sys

import numpy as np


def try_fast_divergence(kind, p, q, **kw):
    """Ask a fast path for the divergence; ``NotImplemented`` when none applies.

    Called by the core after validation, with the distribution axis already moved last and both
    inputs in log space ("logits" or "log_probs"); ``kind`` is one of "forward", "reverse",
    "js", "jeffreys". Keyword arguments: p_space, q_space, reduction, mask, weight,
    temperature, beta. Torch tensors with a "sum" or "mean" reduction go to the fused autograd
    path; float32 NumPy arrays (forward or reverse KL or JS with beta 1/2, temperature 1) to the
    compiled row kernel.
    """
    if isinstance(p, np.ndarray) and isinstance(q, np.ndarray):
        return _numpy_rows(kind, p, q, **kw)
    if kw["reduction"] == "none" or "torch" not in sys.modules:
        return NotImplemented
    import torch

    if not (isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor)):
        return NotImplemented
    try:
        from . import torch_fused
    except ImportError:
        return NotImplemented
    return torch_fused.fused_divergence(kind, p, q, **kw)


def _numpy_rows(kind, p, q, *, reduction, mask, weight, temperature, beta=0.5, **_):
    """Forward/reverse KL and JS (beta 1/2) of float32 NumPy logits through compare's row kernel."""
    js = kind == "js" and beta == 0.5
    if (not (kind in ("forward", "reverse") or js) or temperature != 1.0 or p.dtype != np.float32
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
    st = row_stats(a, b, reverse=(kind == "reverse"), js=js)
    rows = st.js if js else st.kl if kind == "forward" else st.rkl
    bad = st.status != 0
    if mask is not None:
        bad &= np.asarray(mask).reshape(-1)
    if bad.any():  # rows the kernel does not handle (validation off): the core decides
        return NotImplemented
    rows = rows.astype(np.float32).reshape(shape)
    from .._core.reduction import reduce_rows

    return reduce_rows(np, rows, reduction, mask, weight)
