"""``torch.nn.Module`` losses: thin shells over the functional calls, for training stacks.

Each module stores its options (the functional call's keywords) and nothing else: no buffers, no
parameters, no state between calls, so it behaves the same under ``torch.compile``,
``DistributedDataParallel`` and FSDP as the functional call it wraps. ``forward`` takes the
arguments in the functional call's order, the reference (teacher) first:

==================  =========================================  ===============================
module              forward(...)                               computes
==================  =========================================  ===============================
``KLDivLoss``       ``(p, q, *, mask=None, weight=None,        ``kldiv.kl_div(p, q, **options)``
                    labels=None)``
``ReverseKLLoss``   ``(p, q, *, mask=None, weight=None,        ``kldiv.reverse_kl(p, q, ...)``
                    labels=None)``
``JSDivLoss``       ``(p, q, *, mask=None, weight=None,        ``kldiv.js_div(p, q, ...)``
                    labels=None)``
``LinearKLDivLoss`` ``(hidden, weight, target, *, bias=None,   ``kldiv.torch.linear_kl_div``
                    mask=None, labels=None)``
==================  =========================================  ===============================

Per-call tensors (``mask``, ``weight``, ``labels``, the output layer's ``weight``/``bias``) are
arguments of ``forward``; everything else is fixed at construction. The default reduction is
``"mean"`` (the mean over distributions, per token for (B, T, V) inputs), as a loss module's
output is usually backpropagated directly; all other defaults are the functional call's.
"""
from __future__ import annotations

import torch

from ._core import divergence as _div
from ._core import options as _opt
from ._core.validation import check_option

__all__ = ["KLDivLoss", "ReverseKLLoss", "JSDivLoss", "LinearKLDivLoss"]

_OPTIONS = ("p_space", "q_space", "axis", "reduction", "temperature", "t2_scale", "validate",
            "softcap", "logit_scale", "vocab_size", "ignore_index")


class _DivergenceLoss(torch.nn.Module):
    _fn = None  # the functional call

    def __init__(self, *, p_space="probs", q_space="probs", axis=-1, reduction="mean",
                 temperature=1.0, t2_scale=False, validate=None, softcap=None,
                 logit_scale=None, vocab_size=None, ignore_index=None, **extra):
        super().__init__()
        check_option("reduction", reduction, ("none", "sum", "mean"))
        for name, value in (("p_space", p_space), ("q_space", q_space)):
            check_option(name, value, ("probs", "log_probs", "logits"))
        # the model-side options are checked now (a bad value fails at construction)
        _opt.check_per_side("softcap", softcap, p_space, q_space)
        _opt.check_per_side("logit_scale", logit_scale, p_space, q_space)
        _opt.check_vocab_size(vocab_size)
        if ignore_index is not None:
            _opt.check_ignore_index(ignore_index, True)
        model = dict(softcap=softcap, logit_scale=logit_scale, vocab_size=vocab_size,
                     ignore_index=ignore_index)
        self.options = dict(p_space=p_space, q_space=q_space, axis=axis, reduction=reduction,
                            temperature=temperature, t2_scale=t2_scale, validate=validate,
                            **{k: v for k, v in model.items() if v is not None}, **extra)

    def forward(self, p, q, *, mask=None, weight=None, labels=None):
        opts = self.options
        if labels is None and "ignore_index" in opts:  # ignore_index applies with labels only
            opts = {k: v for k, v in opts.items() if k != "ignore_index"}
        return type(self)._fn(p, q, mask=mask, weight=weight, labels=labels, **opts)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class KLDivLoss(_DivergenceLoss):
    r"""KL(p || q) as a module: ``KLDivLoss(**options)(p, q)`` is ``kldiv.kl_div(p, q, **options)``.

    .. math:: \mathrm{KL}(p \,\|\, q) = \sum_i p_i \log \frac{p_i}{q_i}

    Options (constructor keywords, as in ``kldiv.kl_div``): ``p_space``, ``q_space``, ``axis``,
    ``reduction`` (default ``"mean"`` here), ``temperature``, ``t2_scale``, ``validate``, and
    the model-side options ``softcap``, ``logit_scale``, ``vocab_size``, ``ignore_index``
    (see ``kldiv.kl_div``; ``ignore_index`` applies to the ``labels`` given to ``forward``,
    -100 by default). ``forward(p, q, *, mask=None, weight=None, labels=None)``: the
    reference (teacher) first.

    >>> import torch, kldiv.torch
    >>> loss_fn = kldiv.torch.KLDivLoss(p_space="logits", q_space="logits", temperature=2.0)
    >>> teacher = torch.tensor([[2.0, 0.0, -1.0]]); student = torch.zeros(1, 3, requires_grad=True)
    >>> loss = loss_fn(teacher, student); loss.backward()
    >>> p = torch.softmax(teacher / 2, -1); q = torch.softmax(student.detach() / 2, -1)
    >>> bool(torch.isclose(loss, (p * (p / q).log()).sum()))
    True
    """

    _fn = staticmethod(_div.kl_div)


class ReverseKLLoss(_DivergenceLoss):
    r"""KL(q || p) as a module (arguments in ``kl_div``'s places): ``kldiv.reverse_kl``.

    .. math:: \mathrm{KL}(q \,\|\, p) = \sum_i q_i \log \frac{q_i}{p_i}

    >>> import torch, kldiv.torch
    >>> loss_fn = kldiv.torch.ReverseKLLoss(p_space="logits", q_space="logits")
    >>> t = torch.tensor([[1.0, 0.0]]); s = torch.tensor([[0.0, 1.0]])
    >>> p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    >>> bool(torch.isclose(loss_fn(t, s), (q * (q / p).log()).sum()))
    True
    """

    _fn = staticmethod(_div.reverse_kl)


class JSDivLoss(_DivergenceLoss):
    r"""Generalised Jensen-Shannon divergence as a module: ``kldiv.js_div`` with ``beta``.

    .. math:: \mathrm{JS}_\beta(p, q) = \beta\,\mathrm{KL}(p \,\|\, m)
              + (1-\beta)\,\mathrm{KL}(q \,\|\, m), \quad m = \beta p + (1-\beta) q

    >>> import math, torch, kldiv.torch
    >>> loss_fn = kldiv.torch.JSDivLoss(beta=0.5)
    >>> round(float(loss_fn(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))), 6) == round(math.log(2), 6)
    True
    """

    _fn = staticmethod(_div.js_div)

    def __init__(self, *, beta=0.5, **options):
        b = _check_beta(beta)
        super().__init__(beta=b, **options)


def _check_beta(beta):
    if isinstance(beta, (bool, str)) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta: expected a number strictly between 0 and 1, got {beta!r}")
    if not 0.0 < float(beta) < 1.0:
        raise ValueError(f"beta: must lie strictly between 0 and 1, got {beta!r}")
    return float(beta)


class LinearKLDivLoss(torch.nn.Module):
    r"""The divergence fused with the student's output layer: ``kldiv.torch.linear_kl_div``.

    .. math:: \mathrm{loss} = \operatorname{reduce}_r\, D\big(p_r \,\|\, \mathrm{softmax}(
              (h_r W^\top + b) / T)\big)

    The student's logits are never materialised in full (see ``linear_kl_div``). Options
    (constructor keywords): ``target_space``, ``divergence`` ("forward", "reverse", "js"),
    ``beta``, ``temperature``, ``t2_scale``, ``reduction`` (default ``"mean"``),
    ``ignore_index``, ``chunk_size``, ``validate``, ``softcap``, ``logit_scale`` (a number, or
    a pair ``(teacher, student)``) and ``vocab_size``, as ``linear_kl_div``.
    ``forward(hidden, weight, target, *, bias=None, mask=None, labels=None)``: ``weight`` and
    ``bias`` are the output layer's (``lm_head.weight``), ``target`` the teacher (logits or
    log-probs (N, V), or a top-k pair ``(indices, log_probs)``).

    >>> import torch, kldiv.torch
    >>> torch.manual_seed(0) and None
    >>> head = torch.nn.Linear(4, 6, bias=False)
    >>> h = torch.randn(3, 4, requires_grad=True); teacher = torch.randn(3, 6)
    >>> loss = kldiv.torch.LinearKLDivLoss()(h, head.weight, teacher)
    >>> dense = kldiv.kl_div(teacher, head(h), p_space="logits", q_space="logits", reduction="mean")
    >>> bool(torch.isclose(loss, dense))
    True
    """

    def __init__(self, *, target_space="logits", divergence="forward", beta=0.5,
                 temperature=1.0, t2_scale=False, reduction="mean", ignore_index=-100,
                 chunk_size=None, validate=None, softcap=None, logit_scale=None,
                 vocab_size=None):
        super().__init__()
        check_option("reduction", reduction, ("sum", "mean"))
        check_option("divergence", divergence, ("forward", "reverse", "js"))
        check_option("target_space", target_space, ("logits", "log_probs"))
        if divergence == "js":
            beta = _check_beta(beta)
        names = ("target", "student")  # linear_kl_div's pairs: (teacher = target, student)
        _opt.check_per_side("softcap", softcap, target_space, "logits", names)
        _opt.check_per_side("logit_scale", logit_scale, target_space, "logits", names)
        _opt.check_vocab_size(vocab_size)
        model = dict(softcap=softcap, logit_scale=logit_scale, vocab_size=vocab_size)
        self.options = dict(target_space=target_space, divergence=divergence, beta=beta,
                            temperature=temperature, t2_scale=t2_scale, reduction=reduction,
                            ignore_index=ignore_index, chunk_size=chunk_size, validate=validate,
                            **{k: v for k, v in model.items() if v is not None})

    def forward(self, hidden, weight, target, *, bias=None, mask=None, labels=None):
        from .backends.torch_linear import linear_kl_div

        return linear_kl_div(hidden, weight, target, bias=bias, mask=mask, labels=labels,
                             **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
