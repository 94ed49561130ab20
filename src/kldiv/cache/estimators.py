r"""Losses on a cached sparse teacher: the top-k + tail bucket KL and the sampled-tail estimator.

Notation per position: the teacher's top-k set S with log-probs ``a_k``, its tail mass
``r = 1 - sum_k exp(a_k)``, the sampled tail tokens ``x_m`` with teacher log-probs ``b_m`` and
importance weights ``w_m`` (``sum_m w_m f(x_m)`` estimates ``sum_{i not in S} p_i f(i)`` without
bias); the student's log-probs ``log q = log_softmax(z / T)``.

* :func:`bucket_kl` (forward KL over K + 1 buckets, the K listed tokens and one bucket for the
  rest) ::

      sum_k p_k (a_k - log q_k) + r (log r - log Q_rest),   Q_rest = sum_{i not in S} q_i

  It never exceeds the full KL (log-sum inequality), see :mod:`kldiv.cache.bounds`. It is the
  value of ``kldiv.torch.linear_kl_div(hidden, W, (ids, log_probs))``, which computes it without
  materialising the student's logits (:func:`linear_bucket_kl`).
* :func:`sampled_kl` (the sampled-tail estimator, arXiv 2503.16870) ::

      sum_k p_k (a_k - log q_k) + sum_m w_m (b_m - log q(x_m))

  an unbiased estimate of the full KL(p || q) (and, dropping the teacher's terms, of the full
  cross-entropy), and its gradient in z an unbiased estimate of the full gradient.
"""
from __future__ import annotations

import math

import torch

__all__ = ["bucket_kl", "sampled_kl", "linear_bucket_kl", "teacher_fields"]


def teacher_fields(batch, device=None, dtype=torch.float32):
    """(topk ids int64, topk log-probs, tail log-mass, tail ids, tail log-probs, tail weights)."""
    def t(name, dt):
        x = batch[name]
        return x.to(device=device, dtype=dt)
    return (t("topk_ids", torch.int64), t("topk_logprobs", dtype), t("tail_logmass", dtype),
            t("tail_ids", torch.int64), t("tail_logprobs", dtype), t("tail_weights", dtype))


def _reduce(rows, reduction, mask):
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        n = rows.numel() if mask is None else mask.sum()
        return rows.sum() / (n.clamp(min=1) if torch.is_tensor(n) else max(n, 1))
    raise ValueError(f"reduction: expected 'none', 'sum' or 'mean', got {reduction!r}")


def _xlogy_terms(p_log, q_log):
    """exp(p_log) * (p_log - q_log), 0 where p is 0 (whatever q is)."""
    p = torch.exp(p_log)
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))


def _student_log_probs(student_logits, temperature):
    z = student_logits if temperature == 1.0 else student_logits / temperature
    return torch.log_softmax(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, -1)


def bucket_kl(student_logits, batch, *, temperature=1.0, reduction="mean", mask=None):
    """Forward KL(teacher || student) over the K + 1 buckets; see the module docstring.

    ``student_logits``: (..., V); ``batch``: a dict with the cache's fields of shape (..., K)
    etc. (as :class:`~kldiv.cache.TeacherCache` yields them). ``temperature`` divides the
    student's logits (the teacher's log-probs are used as cached). ``mask``: boolean (...).

    >>> import torch
    >>> from kldiv.cache import sparsify
    >>> t = torch.randn(4, 50, dtype=torch.float64); s = torch.randn(4, 50, dtype=torch.float64)
    >>> full = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    >>> b = bucket_kl(s, sparsify(t, 8), reduction="none")
    >>> bool((b <= full + 1e-6).all())
    True
    """
    from .._core.divergence import kl_div

    ids, a, logr, *_ = teacher_fields(batch, student_logits.device, torch.float64)
    z = student_logits
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    # the student's K + 1 bucket logits: its logits at the listed ids and the logsumexp of the
    # rest (log Q_rest up to the row constant), in float64 (K + 1 numbers: cheap); the row's
    # logsumexp over V never enters (the textbook sum of p_k (a_k - log q_k) rounded each
    # log q_k to eps |log q_k|: 2e-3 relative at bucket-KL 8e-5 in float32)
    zk = torch.gather(z, -1, ids).to(torch.float64)
    zt = z if temperature == 1.0 else z / temperature
    z_rest = torch.logsumexp(zt.scatter(-1, ids, -math.inf), -1).to(torch.float64)
    if temperature != 1.0:
        zk = zk / temperature
    y = torch.cat([zk, z_rest[..., None]], -1)
    t = torch.cat([a, logr[..., None]], -1)
    # KL of the bucket distributions by the core (the exact difference of the two sides); the
    # stored teacher fields sum to s = 1 + delta (float32 rounding), and the formula above on
    # them is s KL(p / s || q) + s log s: delta from the fields in float64
    kl = kl_div(t, y, p_space="log_probs", q_space="logits", validate=False)
    delta = torch.exp(t).sum(-1) - 1.0
    rows = (1.0 + delta) * kl + (1.0 + delta) * torch.log1p(delta)
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    return _reduce(rows.to(dt), reduction, mask)


def sampled_kl(student_logits, batch, *, temperature=1.0, reduction="mean", mask=None,
               cross_entropy=False):
    """The sampled-tail estimate of KL(teacher || student) (unbiased); see the module docstring.

    ``cross_entropy=True`` drops the teacher's own terms (``a_k``, ``b_m``): an unbiased
    estimate of the cross-entropy ``-sum_i p_i log q_i`` instead (same gradient).

    >>> import torch
    >>> from kldiv.cache import sparsify
    >>> t = torch.randn(2, 30, dtype=torch.float64); s = torch.randn(2, 30, dtype=torch.float64)
    >>> est = sampled_kl(s, sparsify(t, 30, 4), reduction="none")   # K = V: no tail, exact
    >>> full = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    >>> bool(torch.allclose(est, full, atol=1e-5))
    True
    """
    ids, a, _, tid, b, w = teacher_fields(batch, student_logits.device, torch.float64
                                         if student_logits.dtype == torch.float64 else torch.float32)
    lq = _student_log_probs(student_logits, temperature)
    a, b, w = a.to(lq.dtype), b.to(lq.dtype), w.to(lq.dtype)
    lq_k = torch.gather(lq, -1, ids)
    lq_t = torch.gather(lq, -1, tid)
    pa = torch.exp(a)
    if cross_entropy:
        top = torch.where(pa > 0, -pa * lq_k, torch.zeros_like(pa)).sum(-1)
        tail = torch.where(w > 0, -w * lq_t, torch.zeros_like(w)).sum(-1)
    else:
        top = _xlogy_terms(a, lq_k).sum(-1)
        tail = torch.where(w > 0, w * (b - lq_t), torch.zeros_like(w)).sum(-1)
    return _reduce(top + tail, reduction, mask)


def linear_bucket_kl(hidden, weight, batch, *, bias=None, temperature=1.0, reduction="mean",
                     mask=None, chunk_size=None):
    """:func:`bucket_kl` on the student ``hidden @ weight.T + bias`` without its logits in memory.

    A thin call of ``kldiv.torch.linear_kl_div(hidden, weight, (topk_ids, topk_logprobs))``: the
    teacher's extra bucket there is ``1 - sum_k exp(a_k)``, the cached tail mass.
    ``reduction``: ``"mean"`` or ``"sum"`` only (``linear_kl_div`` reduces as it goes); per-row
    values need the logits: ``bucket_kl(hidden @ weight.T, batch, reduction="none")``.
    """
    from ..backends.torch_linear import linear_kl_div

    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"reduction: linear_bucket_kl takes 'mean' or 'sum', got {reduction!r} (per-row "
            "values need the student's logits: bucket_kl(hidden @ weight.T, batch, "
            "reduction='none'))")

    ids = batch["topk_ids"].to(device=hidden.device, dtype=torch.int64)
    lp = batch["topk_logprobs"].to(device=hidden.device)  # its dtype sets the tail's tolerance
    return linear_kl_div(hidden, weight, (ids, lp), bias=bias, temperature=temperature,
                         reduction=reduction, mask=mask, chunk_size=chunk_size)
