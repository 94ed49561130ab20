r"""Certified bounds on the full forward KL(teacher || student) from a top-k teacher.

Given the teacher's top-k log-probs ``a_k`` on the set S and its tail mass
``r = 1 - sum_k p_k`` (but not how r spreads over the V - K other tokens), the full KL is
``A + T(p_tail)`` with ``A = sum_k p_k (a_k - log q_k)`` known and the tail term
``T = sum_{i not in S} p_i log(p_i / q_i)`` unknown. Over all tails compatible with the cache:

* lower bound: ``T >= r log(r / Q_rest)`` (log-sum inequality, ``Q_rest`` the student's mass
  outside S), attained when the teacher's tail is proportional to the student's: this is the
  top-k + tail-bucket loss, :func:`kldiv.cache.bucket_kl`. The truncated KL without the bucket
  (verl's, DistillKit's zero tail) is not a bound: it can be below zero.
* upper bound: T is convex in the tail, so its maximum over the polytope
  ``{p_i >= 0, sum p_i = r, p_i <= c}`` (``c = min_k p_k``: a tail token is no more likely than
  the least likely top-k token) sits at a vertex: mass c on the student's least likely tail
  tokens, in increasing order of q, the remainder on the next one. This is the exact maximum
  (greedy by the rearrangement inequality), attained by that teacher: the bound is tight.
  It is +inf when the student gives a tail token probability 0.

Both bounds hold exactly in real arithmetic; computed in float64 they hold to rounding.
"""
from __future__ import annotations

import math

import torch

__all__ = ["kl_bounds"]


def kl_bounds(student_logits, topk_ids, topk_logprobs, *, temperature=1.0, tail_logmass=None):
    """Per-row ``(lower, upper)`` of the full KL(teacher || student), both of shape (...).

    ``student_logits``: (..., V); ``topk_ids``/``topk_logprobs``: (..., K), the teacher's K most
    likely tokens (the upper bound relies on their being the largest). ``tail_logmass``: the
    cached log tail mass (default: ``log(1 - sum exp(topk_logprobs))`` from the stored values,
    -inf where that is within their dtype's rounding:
    ``kldiv.backends.torch_linear.topk_rest_tolerance``). Computed in float64
    without gradient.

    >>> import torch
    >>> g = torch.Generator().manual_seed(1)
    >>> t = torch.randn(3, 40, generator=g, dtype=torch.float64)
    >>> s = torch.randn(3, 40, generator=g, dtype=torch.float64)
    >>> full = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    >>> a, ids = torch.topk(torch.log_softmax(t, -1), 5)
    >>> lo, hi = kl_bounds(s, ids, a)
    >>> bool((lo <= full + 1e-12).all() and (full <= hi + 1e-12).all())
    True
    """
    with torch.no_grad():
        z = student_logits.detach().to(torch.float64)
        if temperature != 1.0:
            z = z / temperature
        lq = torch.log_softmax(z, -1)
        ids = topk_ids.to(device=z.device, dtype=torch.int64)
        a = topk_logprobs.to(device=z.device, dtype=torch.float64)
        V, K = z.shape[-1], ids.shape[-1]
        if tail_logmass is None:  # as linear_kl_div reads a top-k teacher: exact, 0 within rounding
            from ..backends.torch_linear import _topk_rest_mass, topk_rest_tolerance

            lp = topk_logprobs.to(z.device).reshape(-1, K)
            rest = _topk_rest_mass(lp)
            rest = torch.where(rest > topk_rest_tolerance(lp), rest, torch.zeros_like(rest))
            logr = torch.log(rest).reshape(a.shape[:-1])
        else:
            logr = tail_logmass.to(device=z.device, dtype=torch.float64)
        pa = torch.exp(a)
        lq_k = torch.gather(lq, -1, ids)
        head = torch.where(pa > 0, pa * (a - lq_k), torch.zeros_like(pa)).sum(-1)
        r = torch.exp(logr)
        if K == V:
            return head, head.clone()
        rest = lq.scatter(-1, ids, math.inf)  # the tail's log q, top-k pushed to the end
        lq_rest = torch.logsumexp(lq.scatter(-1, ids, -math.inf), -1)
        tail_lo = torch.where(r > 0, r * (logr - lq_rest), torch.zeros_like(r))
        # upper: mass c on the least likely tail tokens first, the remainder on the next
        c = torch.minimum(torch.exp(a.min(-1).values), r)
        srt = torch.sort(rest, -1).values[..., : V - K]
        j = torch.arange(V - K, dtype=torch.float64, device=z.device)
        m = torch.clamp(r[..., None] - j * c[..., None], min=0.0)
        m = torch.minimum(m, c[..., None])
        tail_hi = torch.where(m > 0, m * (torch.log(m) - srt), torch.zeros_like(m)).sum(-1)
        return head + tail_lo, head + tail_hi
