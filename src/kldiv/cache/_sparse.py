"""Turn dense teacher logits into the sparse cached form (top-k, tail mass, sampled tail).

Per position, with ``lp = log_softmax(logits / T)`` (float64):

* the K largest log-probabilities and their token ids (``topk_ids``, ``topk_logprobs``);
* the log of the tail mass ``r = sum of p_i over the tokens outside the top-k``, summed over the
  complement directly (a log-sum-exp, no ``1 - sum`` cancellation): ``tail_logmass``;
* M tail tokens ``x_1..x_M`` drawn i.i.d. from the teacher's tail distribution ``p_i / r``
  (the proposal of "Sparse Logit Sampling", arXiv 2503.16870, restricted to the tail), their
  teacher log-probabilities and their importance weights ``w_m = p(x_m) / (M g(x_m)) = r / M``
  (g the proposal). Then for any f, ``sum_m w_m f(x_m)`` is an unbiased estimate of
  ``sum_{i in tail} p_i f(i)``; with the exact top-k part this makes the forward KL and
  cross-entropy estimates unbiased (see :mod:`kldiv.cache.estimators`).

A position whose tail is empty (K = V, or a tail of probability 0) gets weights 0.
"""
from __future__ import annotations

import math

import torch

FIELDS = ("topk_ids", "topk_logprobs", "tail_logmass", "tail_ids", "tail_logprobs",
          "tail_weights")


def sparsify(logits, top_k, tail_samples=0, *, temperature=None, generator=None):
    """The cached fields of each row of ``logits`` (N, V), as a dict of tensors.

    ``temperature``: None (log-probs of the logits as they are) or T > 0 (``logits / T``).

    >>> import torch
    >>> z = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    >>> f = sparsify(z, 2, 3, generator=torch.Generator().manual_seed(0))
    >>> f["topk_ids"].tolist()
    [[0, 1]]
    >>> p = torch.softmax(z.double(), -1)[0]
    >>> bool(abs(f["tail_logmass"][0].exp() - (p[2] + p[3])) < 1e-6)
    True
    >>> bool(torch.isclose(f["tail_weights"].sum(), f["tail_logmass"][0].exp()))
    True
    """
    z = torch.as_tensor(logits)
    if z.dim() != 2:
        raise ValueError(f"logits: expected shape (rows, vocab), got {tuple(z.shape)}")
    n, V = z.shape
    if not 1 <= top_k <= V:
        raise ValueError(f"--top-k: need 1 <= K <= vocabulary size {V}, got {top_k}")
    if tail_samples < 0:
        raise ValueError(f"--tail-samples: must be >= 0, got {tail_samples}")
    z = z.to(torch.float64)
    if not bool(torch.isfinite(z.amax(-1)).all()) or bool(torch.isnan(z).any()):
        raise ValueError("teacher logits: a row has nan, +inf or no finite entry")
    if temperature is not None:
        z = z / float(temperature)
    lp = torch.log_softmax(z, -1)
    vals, ids = torch.topk(lp, top_k, -1)
    rest = lp.scatter(-1, ids, -math.inf)
    if top_k < V:
        logmass = torch.logsumexp(rest, -1)
    else:
        logmass = torch.full((n,), -math.inf, dtype=torch.float64)
    out = {
        "topk_ids": ids.to(torch.int32),
        "topk_logprobs": vals.to(torch.float32),
        "tail_logmass": logmass.to(torch.float32),
    }
    M = int(tail_samples)
    t_ids = torch.zeros(n, M, dtype=torch.int64)
    t_lp = torch.zeros(n, M, dtype=torch.float64)
    t_w = torch.zeros(n, M, dtype=torch.float64)
    has = torch.isfinite(logmass)
    if M and bool(has.any()):
        rows = torch.nonzero(has).flatten()
        probs = torch.exp(rest[rows] - logmass[rows, None])  # the tail distribution, 0 on top-k
        draw = torch.multinomial(probs, M, replacement=True, generator=generator)
        t_ids[rows] = draw
        t_lp[rows] = torch.gather(lp[rows], -1, draw)
        # importance weight p(x) / (M g(x)) with g(x) = p(x) / r: r / M for every draw
        t_w[rows] = (torch.exp(logmass[rows]) / M)[:, None].expand(-1, M)
    out["tail_ids"] = t_ids.to(torch.int32)
    out["tail_logprobs"] = t_lp.to(torch.float32)
    out["tail_weights"] = t_w.to(torch.float32)
    return out


def bytes_per_position(top_k, tail_samples, with_tokens=True):
    """Bytes one position takes in the cache (int32 ids, float32 values).

    >>> bytes_per_position(64, 12), 32000 * 4
    (664, 128000)
    """
    return 8 * top_k + 4 + 12 * tail_samples + (4 if with_tokens else 0)
