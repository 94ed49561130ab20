r"""kldiv as the loss of TRL's distillation trainers (checked against trl 1.16).

TRL's conventions, kept here: ``beta = 0`` is the forward KL(teacher || student), ``beta = 1`` the
reverse KL(student || teacher), anything in between the generalised Jensen-Shannon divergence
``beta KL(t || m) + (1 - beta) KL(s || m)`` with ``m = beta t + (1 - beta) s`` (which is
``kldiv.js_div(teacher, student, beta=beta)``); ``temperature`` divides both models' logits
(no ``T**2`` factor); tokens whose label is -100 are left out; with ``num_items_in_batch`` the
loss is ``sum / num_items_in_batch``.

Usage::

    from trl.experimental.gkd import GKDTrainer
    from kldiv.integrations.trl import use_kldiv

    use_kldiv(GKDTrainer)          # or use_kldiv(trainer) for one instance
    # (trl.trainer.distillation_trainer.DistillationTrainer: use_kldiv(DistillationTrainer)
    #  replaces its chunked loss by kldiv.torch.linear_kl_div)
"""
from __future__ import annotations

import inspect
import math

import torch

__all__ = ["generalized_jsd_loss", "chunked_divergence_loss", "use_kldiv"]


def _divergence(beta):
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: TRL's interpolation coefficient must lie in [0, 1], got {beta!r}")
    return "forward" if beta == 0.0 else "reverse" if beta == 1.0 else "js"


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """``GKDTrainer.generalized_jsd_loss`` computed by kldiv (same arguments, same value).

    ``student_logits``/``teacher_logits``: (B, T, V) (or (N, V)); ``labels``: (B, T) with -100
    on the positions to leave out (TRL's ``GKDTrainer.compute_loss`` passes logits and labels
    already shifted: ``logits[:, :-1]`` with ``labels[:, 1:]``). Reductions, as TRL 1.16's:

    * ``num_items_in_batch`` given: ``sum / num_items_in_batch`` (whatever ``reduction``);
    * ``"batchmean"``: the sum divided by the number of kept positions with ``labels``, by the
      batch size ``B`` (the first dimension, torch's ``batchmean``) without them: a per-sequence
      sum, not a per-token mean;
    * ``"sum"``; ``"mean"``: the sum over the kept positions divided by their number times
      ``V`` (TRL averages its elementwise (..., V) terms);
    * ``"none"``: TRL's elementwise terms, (B, T, V) without ``labels`` and (n_kept, V) with
      them, whose sum over the vocabulary is each position's divergence. These are computed
      as TRL computes them (``log_softmax`` in the input's precision, at least float32), not by
      kldiv's kernels: for accurate per-position values use ``kldiv.kl_div`` /
      ``reverse_kl`` / ``js_div`` with ``reduction="none"``.

    >>> import torch
    >>> s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    >>> by_hand = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    >>> bool(torch.isclose(generalized_jsd_loss(s, t, beta=0.0), by_hand.sum() / 2, atol=1e-6))
    True
    """
    import kldiv

    kind = _divergence(beta)
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(f"reduction: expected 'batchmean', 'sum', 'mean' or 'none', got "
                         f"{reduction!r}")
    if reduction == "none" and num_items_in_batch is None:
        return _elementwise_terms(student_logits, teacher_logits, labels, beta, temperature)
    kw = dict(p_space="logits", q_space="logits", temperature=float(temperature), reduction="none")
    if kind == "forward":
        rows = kldiv.kl_div(teacher_logits, student_logits, **kw)
    elif kind == "reverse":
        rows = kldiv.reverse_kl(teacher_logits, student_logits, **kw)
    else:
        rows = kldiv.js_div(teacher_logits, student_logits, beta=float(beta), **kw)
    if labels is not None:
        keep = labels != -100
        rows = rows[keep]
    if num_items_in_batch is not None:
        n = num_items_in_batch
        if isinstance(n, torch.Tensor):
            n = n.to(rows.device)
        return rows.sum() / n
    if reduction == "batchmean":  # TRL: kept positions with labels, else the first dimension
        n = rows.numel() if labels is not None else student_logits.shape[0]
        return rows.sum() / max(n, 1)
    if reduction == "sum":
        return rows.sum()
    # "mean": TRL averages its elementwise (..., V) terms
    return rows.sum() / max(rows.numel() * student_logits.shape[-1], 1)


def _elementwise_terms(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's ``reduction="none"`` output: the elementwise terms of its generalised JSD."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype),
                                torch.float32)
    ls = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    lt = torch.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    beta = float(beta)
    if beta == 0.0:
        terms = torch.nn.functional.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1.0:
        terms = torch.nn.functional.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), 0)
        terms = (beta * torch.nn.functional.kl_div(lm, lt, reduction="none", log_target=True)
                 + (1 - beta) * torch.nn.functional.kl_div(lm, ls, reduction="none", log_target=True))
    return terms if labels is None else terms[labels != -100]


def chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                            student_lm_head_bias=None, teacher_lm_head_bias=None,
                            student_logit_scale=1.0, teacher_logit_scale=1.0,
                            student_final_logit_softcapping=None,
                            teacher_final_logit_softcapping=None, temperature=1.0):
    """Drop-in for ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (same arguments,
    same ``(loss, entropy_sum, n_valid)``), with ``kldiv.torch.linear_kl_div`` for the student.

    The student's logits are never materialised (``linear_kl_div`` walks the rows in chunks);
    the teacher's logits of the kept positions are made once without gradient (the teacher is a
    constant). The logit scales and soft-caps of both models are ``linear_kl_div``'s per-side
    ``logit_scale`` and ``softcap`` options (applied as the models' forward passes do, before
    the temperature; the student's with its gradient). ``entropy_sum`` (TRL logs it) is
    computed without gradient, chunk by chunk.
    """
    from ..backends.torch_linear import linear_kl_div

    kind = _divergence(beta)
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    h_s = student_hidden_states.reshape(-1, student_hidden_states.size(-1))[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.size(-1))[valid]
    W = student_lm_head_weight
    b = student_lm_head_bias
    # the models' final-logit transforms as linear_kl_div's per-side options, (teacher,
    # student): softcap * tanh(logit_scale * z / softcap), before the temperature
    scales = (_or_none(teacher_logit_scale, 1.0), _or_none(student_logit_scale, 1.0))
    caps = (_or_none(teacher_final_logit_softcapping), _or_none(student_final_logit_softcapping))
    extra = {}
    if caps != (None, None) or scales != (None, None):
        if "softcap" not in inspect.signature(linear_kl_div).parameters:  # pragma: no cover
            raise NotImplementedError("final_logit_softcapping / logit_scale need "
                                      "linear_kl_div(softcap=..., logit_scale=...), not in "
                                      "this kldiv")
        extra = dict(softcap=caps, logit_scale=scales)
    with torch.no_grad():
        zt = torch.nn.functional.linear(h_t.to(teacher_lm_head_weight.dtype), teacher_lm_head_weight,
                                        teacher_lm_head_bias).float()
    if h_s.shape[0] == 0:
        loss = (h_s.sum() + W.sum() * 0.0) * 0.0
        entropy = torch.zeros((), device=h_s.device)
    else:
        loss = linear_kl_div(h_s, W, zt, bias=b, divergence=kind, beta=float(beta) if kind == "js" else 0.5,
                             temperature=float(temperature), reduction="sum", **extra)
        with torch.no_grad():
            entropy = torch.zeros((), dtype=torch.float32, device=h_s.device)
            for i in range(0, h_s.shape[0], 1024):
                z = torch.nn.functional.linear(h_s[i:i + 1024].float(), W.float(),
                                               None if b is None else b.float())
                z = _cap(z, caps[1], scales[1])
                lq = torch.log_softmax(z / float(temperature), -1)
                entropy += -(lq.exp() * lq).nan_to_num().sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy, n_valid


def _or_none(value, neutral=None):
    """A model's option as a float, None when absent (or equal to the neutral value)."""
    if value is None:
        return None
    v = float(value)
    return None if neutral is not None and v == neutral else v


def _cap(z, softcap, logit_scale):
    """The model's final-logit transform (kldiv's definition, ``kldiv._core.options.cap``)."""
    from array_api_compat import torch as xp

    from .._core.options import cap

    return cap(xp, z, softcap, logit_scale)


def use_kldiv(target):
    """Make a TRL trainer (class or instance) compute its distillation loss with kldiv.

    ``GKDTrainer`` (``trl.experimental.gkd``) and its subclasses: ``generalized_jsd_loss`` is
    replaced. ``trl.trainer.distillation_trainer.DistillationTrainer``: its module's
    ``_chunked_divergence_loss`` is replaced by :func:`chunked_divergence_loss` (that module is
    shared: every DistillationTrainer then uses kldiv). Returns ``target``.
    """
    cls = target if isinstance(target, type) else type(target)
    if hasattr(cls, "generalized_jsd_loss"):
        if isinstance(target, type):
            target.generalized_jsd_loss = staticmethod(generalized_jsd_loss)
        else:
            target.generalized_jsd_loss = generalized_jsd_loss
        return target
    mod = inspect.getmodule(cls)
    for klass in cls.__mro__:
        m = inspect.getmodule(klass)
        if m is not None and hasattr(m, "_chunked_divergence_loss"):
            mod = m
            break
    if mod is not None and hasattr(mod, "_chunked_divergence_loss"):
        mod._chunked_divergence_loss = chunked_divergence_loss
        return target
    raise TypeError(f"{cls.__name__}: not a TRL distillation trainer kldiv knows (no "
                    f"generalized_jsd_loss, no _chunked_divergence_loss in its module)")
