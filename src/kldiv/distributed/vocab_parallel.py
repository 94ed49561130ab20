"""Vocabulary-parallel divergences: KL and its family on rows whose categories are sharded."""
from __future__ import annotations

from .._core.validation import (REDUCTIONS, check_option, check_positive_finite,
                                validation_enabled)
from .._core.reduction import reduce_rows
from ._comm import _world
from ._inputs import (_LOG_SPACES, _apply_options, _check_log_probs, _check_mask,
                      _check_tensor, _check_weight_values, _prepare_shards)
from ._rows import _KINDS, _rows_fn, _xp

#: with one rank, hand the call to the single-process core (set False to test the sharded path)
_DELEGATE_LOCAL = True


def _local_core(kind, p, q, *, beta, **kw):
    from .._core import divergence as D

    _check_tensor("p_shard", p)
    _check_tensor("q_shard", q)
    if p.shape != q.shape:
        raise ValueError(
            f"p_shard and q_shard: shapes {tuple(p.shape)} and {tuple(q.shape)} differ; "
            "both shards must hold the same rows and the same slice of the categories (last axis)"
        )
    if kw["mask"] is not None:
        _check_mask(kw["mask"], tuple(p.shape[:-1]), p.device)
    if kind == "js":
        return D.js_div(p, q, beta=beta, **kw)
    f = {"forward": D.kl_div, "reverse": D.reverse_kl, "jeffreys": D.jeffreys_div}[kind]
    return f(p, q, **kw)


def _vocab_parallel(kind, p_shard, q_shard, *, p_space, q_space, reduction, mask, weight,
                    temperature, t2_scale, group, beta, validate, softcap=None,
                    logit_scale=None, vocab_size=None, labels=None, ignore_index=None,
                    vocab_start=None):
    check_option("reduction", reduction, REDUCTIONS)
    check_option("kind", kind, _KINDS)
    check_option("p_space", p_space, _LOG_SPACES)
    check_option("q_space", q_space, _LOG_SPACES)
    temperature = check_positive_finite("temperature", temperature)
    if kind == "js" and not 0.0 < float(beta) < 1.0:
        raise ValueError(f"beta: must lie strictly between 0 and 1, got {beta!r}")
    if (softcap is not None or logit_scale is not None or vocab_size is not None
            or labels is not None or ignore_index is not None or vocab_start is not None):
        # the model-side options transform the shards first (kldiv._core.options' semantics)
        p_shard, q_shard, p_space, q_space, mask = _apply_options(
            p_shard, q_shard, p_space=p_space, q_space=q_space, mask=mask, softcap=softcap,
            logit_scale=logit_scale, vocab_size=vocab_size, labels=labels,
            ignore_index=ignore_index, vocab_start=vocab_start, group=group)
    if (_DELEGATE_LOCAL and _world(group) == 1
            and not (mask is not None and "log_probs" in (p_space, q_space))):
        # one rank holds the whole vocabulary: the core (and its fused kernels) computes it
        return _local_core(kind, p_shard, q_shard, p_space=p_space, q_space=q_space,
                           reduction=reduction, mask=mask, weight=weight,
                           temperature=temperature, t2_scale=t2_scale, beta=beta,
                           validate=validate)
    x, y, rows_shape, mask, weight = _prepare_shards(p_shard, q_shard, p_space, q_space, mask,
                                                     weight)
    check = validation_enabled(validate)
    if check:
        _check_weight_values(weight)
        keep = None if mask is None else mask.reshape(-1)
        for raw, space, name in ((x, p_space, "p_shard"), (y, q_space, "q_shard")):
            if space == "log_probs":
                _check_log_probs(raw.detach(), name, group, keep)
    # the temperature divides inside, after each side is centred on its maximum and the two
    # are differenced (x / T - y / T would round each side first)
    rows = _rows_fn().apply(x, y, kind, float(beta), temperature, group, check)
    rows = rows.reshape(rows_shape)
    out = reduce_rows(_xp(), rows, reduction, mask, weight)
    if t2_scale:
        out = out * temperature**2
    return out


def _opts(softcap, logit_scale, vocab_size, labels, ignore_index, vocab_start):
    return dict(softcap=softcap, logit_scale=logit_scale, vocab_size=vocab_size, labels=labels,
                ignore_index=ignore_index, vocab_start=vocab_start)


_SHARD_DOC = """
    Args:
      p_shard: this rank's slice of the reference (teacher) along the last axis, shape
        ``(..., V_r)``; rows (the leading axes) are the same on every rank of ``group``.
      q_shard: the same slice of the model (student), same shape. Slice widths ``V_r`` may
        differ between ranks (uneven splits, even 0); the full vocabulary is their union.
      p_space, q_space: ``"logits"`` or ``"log_probs"`` (log-probabilities of the full
        vocabulary; renormalised like logits). Probabilities are not accepted: a
        vocabulary-parallel layer produces logits.
      reduction: ``"none"`` (one value per row, shape ``p_shard.shape[:-1]``), ``"sum"`` or
        ``"mean"`` (over rows where ``mask`` is true, weighted by ``weight``), as ``kldiv.kl_div``.
      mask, weight: per-row boolean mask and non-negative weights (same on every rank); masked
        rows may hold anything and contribute 0.
      temperature: divides both sides; ``t2_scale`` multiplies the result by ``temperature**2``.
      group: the vocabulary-parallel process group (default: the world). Without an
        initialised process group the call runs locally.
      validate: value checks (nan/+inf in any shard, rows -inf on every shard, log-probability
        normalisation); None follows ``kldiv.set_validation``. The checks are decided from
        all-reduced flags, so every rank raises the same ValueError (no rank is left waiting).
      softcap, logit_scale, labels, ignore_index: as ``kldiv.kl_div`` (applied to each shard:
        the transform is elementwise; ``labels`` are the same on every rank).
      vocab_size: keep only the global columns below ``vocab_size`` (as ``kldiv.kl_div``):
        each shard keeps its columns below it, the rest (padding) is left out of both sides.
        Both models' shards must share one slicing: shard a smaller vocabulary at the larger
        (padded) width, with anything in the padding.
      vocab_start: this shard's first global column (Megatron's ``vocab_start_index``), used
        with ``vocab_size``; by default the widths of the lower ranks of ``group`` (one
        all-reduce of ``world`` integers), i.e. shards in rank order. With ``vocab_start``
        the full width is not looked up, so log-probabilities are always renormalised over
        the kept columns (as where ``vocab_size`` cuts the vocabulary) and not checked.

    Returns:
      The same value on every rank of the group, equal to the single-process function on the
      gathered tensors; gradients flow to both shards, with no collective in the backward.
"""


def vocab_parallel_kl_div(p_shard, q_shard, *, p_space="logits", q_space="logits",
                          reduction="mean", mask=None, weight=None, temperature=1.0,
                          t2_scale=False, group=None, kind="forward", beta=0.5, validate=None,
                          softcap=None, logit_scale=None, vocab_size=None, labels=None,
                          ignore_index=None, vocab_start=None):
    return _vocab_parallel(kind, p_shard, q_shard, p_space=p_space, q_space=q_space,
                           reduction=reduction, mask=mask, weight=weight,
                           temperature=temperature, t2_scale=t2_scale, group=group, beta=beta,
                           validate=validate, **_opts(softcap, logit_scale, vocab_size, labels,
                                                     ignore_index, vocab_start))


vocab_parallel_kl_div.__doc__ = r"""Vocab-parallel KL(p || q); equals ``kldiv.kl_div`` unsharded.

    .. math:: \mathrm{KL}(p \,\|\, q) = \sum_{r} \sum_{i \in \mathrm{shard}_r}
              p_i \log \frac{p_i}{q_i},
              \quad p = \mathrm{softmax}(x / T) \text{ over all shards}

    Edges as ``kldiv.kl_div``: categories with p_i = 0 (logit -inf) contribute 0, also when a
    whole shard holds no support of p; p_i > 0 = q_i gives +inf (gradient 0 on that row). The
    gradient w.r.t. the student logits is ``(q - p) / T``, w.r.t. the teacher logits
    ``-p * (log(q/p) - E_p[log(q/p)]) / T``, both computed locally.

    ``kind`` selects the family member with the same arguments: ``"forward"`` (this function's
    default), ``"reverse"`` (KL(q || p)), ``"js"`` (with ``beta``), ``"jeffreys"``; the functions
    ``vocab_parallel_reverse_kl``, ``vocab_parallel_js_div`` and ``vocab_parallel_jeffreys_div``
    are the same call with ``kind`` fixed.
""" + _SHARD_DOC + """
    One process (no process group): the shard is the whole vocabulary.

    >>> import math, torch, kldiv.distributed as kd
    >>> p = torch.tensor([[0.0, math.log(3.0)]])      # softmax: (1/4, 3/4)
    >>> q = torch.tensor([[0.0, 0.0]])                 # (1/2, 1/2)
    >>> by_hand = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    >>> abs(float(kd.vocab_parallel_kl_div(p, q)) - by_hand) < 1e-7
    True

    Launched with ``torchrun --nproc-per-node 2``, rank r passes ``p[..., lo_r:hi_r]`` and
    ``q[..., lo_r:hi_r]`` and gets the same number on both ranks (see docs/distributed.md).
"""


def vocab_parallel_reverse_kl(p_shard, q_shard, *, p_space="logits", q_space="logits",
                              reduction="mean", mask=None, weight=None, temperature=1.0,
                              t2_scale=False, group=None, validate=None, softcap=None,
                              logit_scale=None, vocab_size=None, labels=None, ignore_index=None,
                              vocab_start=None):
    """Reverse KL, KL(q || p), of vocabulary-sharded rows, equal to ``kldiv.reverse_kl`` unsharded.

    Same arguments and conventions as ``vocab_parallel_kl_div`` (p the teacher first, q the
    student second); +inf where q has mass on a category where p has none.

    >>> import math, torch, kldiv.distributed as kd
    >>> p = torch.tensor([[0.0, math.log(3.0)]]); q = torch.tensor([[0.0, 0.0]])
    >>> by_hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    >>> abs(float(kd.vocab_parallel_reverse_kl(p, q)) - by_hand) < 1e-7
    True
    """
    return _vocab_parallel("reverse", p_shard, q_shard, p_space=p_space, q_space=q_space,
                           reduction=reduction, mask=mask, weight=weight,
                           temperature=temperature, t2_scale=t2_scale, group=group, beta=0.5,
                           validate=validate, **_opts(softcap, logit_scale, vocab_size, labels,
                                                     ignore_index, vocab_start))


def vocab_parallel_js_div(p_shard, q_shard, *, beta=0.5, p_space="logits", q_space="logits",
                          reduction="mean", mask=None, weight=None, temperature=1.0,
                          t2_scale=False, group=None, validate=None, softcap=None,
                          logit_scale=None, vocab_size=None, labels=None, ignore_index=None,
                          vocab_start=None):
    """Jensen-Shannon divergence of sharded rows: ``kldiv.js_div`` on the gathered rows.

    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta p + (1 - beta) q``; always
    finite. Costs one SUM all-reduce (6 elements per row) more than ``vocab_parallel_kl_div``.

    >>> import math, torch, kldiv.distributed as kd
    >>> inf = math.inf
    >>> p = torch.tensor([[0.0, -inf]]); q = torch.tensor([[-inf, 0.0]])   # disjoint supports
    >>> abs(float(kd.vocab_parallel_js_div(p, q)) - math.log(2)) < 1e-7
    True
    """
    return _vocab_parallel("js", p_shard, q_shard, p_space=p_space, q_space=q_space,
                           reduction=reduction, mask=mask, weight=weight,
                           temperature=temperature, t2_scale=t2_scale, group=group, beta=beta,
                           validate=validate, **_opts(softcap, logit_scale, vocab_size, labels,
                                                     ignore_index, vocab_start))


def vocab_parallel_jeffreys_div(p_shard, q_shard, *, p_space="logits", q_space="logits",
                                reduction="mean", mask=None, weight=None, temperature=1.0,
                                t2_scale=False, group=None, validate=None, softcap=None,
                                logit_scale=None, vocab_size=None, labels=None, ignore_index=None,
                                vocab_start=None):
    """Jeffreys divergence KL(p || q) + KL(q || p) of sharded rows: ``kldiv.jeffreys_div``.

    +inf unless both sides have the same support. One SUM all-reduce (5 elements per row) more
    than ``vocab_parallel_kl_div``.

    >>> import math, torch, kldiv.distributed as kd
    >>> p = torch.tensor([[0.0, math.log(3.0)]]); q = torch.tensor([[0.0, 0.0]])
    >>> by_hand = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    >>> abs(float(kd.vocab_parallel_jeffreys_div(p, q)) - by_hand) < 1e-7
    True
    """
    return _vocab_parallel("jeffreys", p_shard, q_shard, p_space=p_space, q_space=q_space,
                           reduction=reduction, mask=mask, weight=weight,
                           temperature=temperature, t2_scale=t2_scale, group=group, beta=0.5,
                           validate=validate, **_opts(softcap, logit_scale, vocab_size, labels,
                                                     ignore_index, vocab_start))
