"""Torch test helpers shared by the fast-path test files (imported, never collected).

- ``core_only()``: the core alone, the torch "pre" hook of :mod:`kldiv._core.dispatch` taken out
  for the duration (the core defines the semantics the fast paths must match);
- ``took_fast(v)``: whether a result came from the fast path's autograd Function;
- ``naive_row(kind, a, b, ps, qs, T, beta)``: the textbook float64 formula on one row (log_softmax,
  the support selected by boolean indexing), for torch.autograd to differentiate: independent of
  kldiv's algebra.
"""
from __future__ import annotations

import contextlib
import math

import torch

from kldiv._core import dispatch


@contextlib.contextmanager
def core_only():
    """The core alone: the torch pre hook taken out for the duration."""
    h = dispatch._HANDLERS.pop(("torch", "pre"), None)
    try:
        yield
    finally:
        if h is not None:
            dispatch._HANDLERS[("torch", "pre")] = h


def took_fast(v):
    name = type(v.grad_fn).__name__ if v.grad_fn is not None else ""
    return "_Divergence" in name or "_LaneFunction" in name


def _lw(x, space, T=1.0):
    """Normalised log-probabilities of one row at temperature T (float64)."""
    if space == "probs":
        x = torch.log(x)
    return torch.log_softmax(x / T, -1)


def _kl(lp, lq):
    S = torch.isfinite(lp)
    return (lp[S].exp() * (lp[S] - lq[S])).sum()


def naive_row(kind, a, b, ps, qs, T=1.0, beta=0.5):
    lp, lq = _lw(a, ps, T), _lw(b, qs, T)
    if kind == "forward":
        return _kl(lp, lq)
    if kind == "reverse":
        return _kl(lq, lp)
    if kind == "jeffreys":
        return _kl(lp, lq) + _kl(lq, lp)
    U = torch.isfinite(lp) | torch.isfinite(lq)  # the mixture's support only (no -inf - -inf)
    lp, lq = lp[U], lq[U]
    lm = torch.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
    return beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)
