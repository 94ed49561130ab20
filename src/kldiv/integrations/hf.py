"""A Hugging Face ``Trainer`` that distils with ``kldiv.torch.LinearKLDivLoss``.

The student's logits are never materialised: ``compute_loss`` runs the student's backbone
(``model.base_model``) for its last hidden states and hands them with the output layer's weight
(``model.get_output_embeddings()``) to :func:`kldiv.torch.linear_kl_div`, which makes the
logits chunk by chunk. The teacher is either

* a model (``teacher_model=``): its logits (``teacher_model(...).logits``, with the model's own
  final-logit transform) at the same positions, without gradient, or
* a cache written by ``kldiv cache`` (train on :class:`kldiv.cache.TeacherCache`, whose items
  carry ``input_ids`` and the top-k fields): the top-k + tail bucket target
  ``(topk_ids, topk_logprobs)`` of ``linear_kl_div``.

Position t of the student predicts token t + 1, as the teacher's (and the cache's) position t:
the logits need no shift. Positions are kept as Hugging Face's causal-LM loss keeps them:

* ``attention_mask`` 0 at position t: left out;
* ``labels`` (aligned with ``input_ids``, -100 on prompt and padding tokens, as for
  ``model(..., labels=labels)``): position t is kept when ``labels[t + 1] != -100`` (it predicts
  a labelled token), and the last position is left out; ``shift_labels`` (padding-free
  collators), when the batch carries it, is used as given (position t kept when
  ``shift_labels[t] != -100``).

The student's final-logit transform is applied to its logits as its forward pass applies it:
Gemma-2/3's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
``logits_scaling`` (read from the config, :func:`final_logit_transform`), and checked once per
model against the model's own ``.logits`` on a few tokens (a model whose logits are some
other function of its backbone's output is refused with a ``ValueError``). The teacher's logits
already carry its transform and are used as they are.

Loss: the ``loss_fn``'s reduction over the kept positions (mean by default). With
``num_items_in_batch`` (the Trainer passes it when the batch carries ``labels`` and the model
accepts loss kwargs: the number of labelled tokens over all the micro-batches of one optimizer
step) the loss is ``sum over the kept positions / num_items_in_batch``, as transformers' own
causal-LM loss: the gradient accumulated over ``gradient_accumulation_steps`` micro-batches is
that of the mean over the whole batch. Without it, the micro-batch mean, which the Trainer
divides by the accumulation steps.

Usage::

    from kldiv.integrations.hf import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=ds)            # or train_dataset=TeacherCache(dir)
    trainer.train()

One process: ``compute_loss`` calls ``model.base_model``, which a DDP/FSDP wrapper does not
have (use TRL's trainers with :mod:`kldiv.integrations.trl` there).
"""
from __future__ import annotations

import weakref

import torch

from .._torch_modules import LinearKLDivLoss

try:
    from transformers import Trainer
except ImportError as _exc:  # transformers not installed: the class says so when used
    _MISSING = _exc

    class Trainer:  # noqa: D101 - placeholder
        def __init__(self, *args, **kwargs):
            raise ImportError(f"kldiv.integrations.hf needs transformers (pip install "
                              f"'kldiv[distill]'): {_MISSING}")

__all__ = ["DistillationTrainer", "linear_distillation_loss", "final_logit_transform"]

_CACHE_FIELDS = ("topk_ids", "topk_logprobs", "tail_logmass", "tail_ids", "tail_logprobs",
                 "tail_weights")

# the models whose final-logit transform has been checked: model -> (softcap, logit_scale)
_CHECKED = weakref.WeakKeyDictionary()


def final_logit_transform(model):
    """``(softcap, logit_scale)`` that ``model``'s forward applies after its output layer.

    Read from its (text) config: ``final_logit_softcapping`` (Gemma-2/3), ``logit_scale``
    (Cohere: ``logits * logit_scale``), ``logits_scaling`` (Granite: ``logits / logits_scaling``)
    and ``output_multiplier`` (a factor before the cap), in kldiv's form
    ``softcap * tanh(logit_scale * z / softcap)`` (``logit_scale * z`` without a cap). None for
    an absent part.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None, None
    if hasattr(cfg, "get_text_config"):
        try:
            cfg = cfg.get_text_config(decoder=True)
        except TypeError:  # older transformers: no decoder keyword
            cfg = cfg.get_text_config()

    def number(name):
        v = getattr(cfg, name, None)
        return None if v is None or isinstance(v, bool) else float(v)

    cap = number("final_logit_softcapping")
    scale = 1.0
    for name in ("logit_scale", "output_multiplier"):
        if number(name) is not None:
            scale *= number(name)
    if number("logits_scaling") is not None:
        scale /= number("logits_scaling")
    return cap, (None if scale == 1.0 else scale)


def _check_transform(model, ids, am):
    """The student's (softcap, logit_scale), checked once against its own logits."""
    try:
        return _CHECKED[model]
    except (KeyError, TypeError):
        pass
    cap, scale = final_logit_transform(model)
    k = min(ids.shape[-1], 16)
    pi = ids.reshape(-1, ids.shape[-1])[:1, :k]
    pa = None if am is None else am.reshape(-1, am.shape[-1])[:1, :k]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=pi, attention_mask=pa, use_cache=False).logits
            h = model.base_model(input_ids=pi, attention_mask=pa, use_cache=False).last_hidden_state
            head = model.get_output_embeddings()
            z = torch.nn.functional.linear(h, head.weight, getattr(head, "bias", None))
            z = _apply_cap(z.float(), cap, scale)
    finally:
        for m, mode in modes:
            m.training = mode
    ok = full.shape == z.shape
    if ok:
        eps = max(torch.finfo(t.dtype).eps for t in (full, h, head.weight))
        err = float((full.float() - z).abs().max())
        ok = err <= max(1e-4, 16 * eps) * (1.0 + float(full.float().abs().max()))
    if not ok:
        what = "" if (cap, scale) == (None, None) else f" with softcap={cap}, logit_scale={scale}"
        detail = (f"max difference {err:.3g}" if full.shape == z.shape
                  else f"shapes {tuple(full.shape)} and {tuple(z.shape)}")
        raise ValueError(
            f"{type(model).__name__}: its logits are not its backbone's last hidden state through "
            f"get_output_embeddings(){what} ({detail}); kldiv.integrations.hf knows the "
            f"config's final_logit_softcapping, logit_scale, logits_scaling and "
            f"output_multiplier, not this model's output transform: distil from the model's "
            f"logits with kldiv.torch.KLDivLoss instead")
    try:
        _CHECKED[model] = (cap, scale)
    except TypeError:  # pragma: no cover - not weakly referenceable: check every call
        pass
    return cap, scale


def _apply_cap(z, softcap, logit_scale):
    from array_api_compat import torch as xp

    from .._core.options import cap

    return cap(xp, z, softcap, logit_scale)


def _kept_positions(ids, am, inputs):
    """Positions that count, Hugging Face's causal-LM convention (see the module docstring)."""
    keep = torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if am is None else am.bool()
    shift = inputs.get("shift_labels")
    labels = inputs.get("labels")
    if shift is not None:
        keep = keep & (shift != -100)
    elif labels is not None:
        nxt = torch.zeros_like(keep)
        nxt[..., :-1] = labels[..., 1:] != -100
        keep = keep & nxt
    return keep


def _options(loss_fn):
    if loss_fn is None:
        loss_fn = LinearKLDivLoss()
    if not isinstance(loss_fn, LinearKLDivLoss):
        raise TypeError(f"loss_fn: expected a kldiv.torch.LinearKLDivLoss, got "
                        f"{type(loss_fn).__name__}")
    opts = dict(loss_fn.options)
    for name in ("softcap", "logit_scale"):
        if name in opts:
            raise ValueError(f"loss_fn: leave {name} off; the student's is read from its config "
                             f"and the teacher's logits already carry the teacher's")
    return opts


def linear_distillation_loss(model, inputs, *, teacher_model=None, loss_fn=None,
                             num_items_in_batch=None):
    """The distillation loss of ``model`` on ``inputs`` (see the module docstring).

    ``loss_fn``: a :class:`kldiv.torch.LinearKLDivLoss` (its options; default forward KL, mean
    over the kept positions). ``num_items_in_batch``: when given, the loss is the sum over the
    kept positions divided by it (a ``"mean"`` loss_fn; a ``"sum"`` one stays the sum).
    """
    from ..backends.torch_linear import linear_kl_div

    opts = _options(loss_fn)
    ids = inputs["input_ids"]
    am = inputs.get("attention_mask")
    mask = _kept_positions(ids, am, inputs)
    if "topk_ids" in inputs:
        target = (inputs["topk_ids"].long(), inputs["topk_logprobs"])
    else:
        if teacher_model is None:
            raise ValueError("teacher_model: needed when the batch carries no cached teacher "
                             "(topk_ids, topk_logprobs)")
        with torch.no_grad():
            target = teacher_model(input_ids=ids, attention_mask=am, use_cache=False).logits
        if target.dtype in (torch.float16, torch.bfloat16):
            target = target.float()
    cap, scale = _check_transform(model, ids, am)
    if cap is not None:  # the student's side only: the teacher's logits are already capped
        opts["softcap"] = (None, cap)
    if scale is not None:
        opts["logit_scale"] = (None, scale)
    out = model.base_model(input_ids=ids, attention_mask=am, use_cache=False)
    hidden = out.last_hidden_state
    head = model.get_output_embeddings()
    per_item = num_items_in_batch is not None and opts["reduction"] == "mean"
    if per_item:
        opts["reduction"] = "sum"
    loss = linear_kl_div(hidden, head.weight, target, bias=getattr(head, "bias", None),
                         mask=mask, **opts)
    if per_item:
        n = num_items_in_batch
        n = n.to(loss.device).clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)
        loss = loss / n
    return loss


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` with a kldiv distillation ``compute_loss``.

    ``teacher_model``: a causal LM with the student's vocabulary (None when training on a
    cache); ``loss_fn``: a :class:`kldiv.torch.LinearKLDivLoss` (default: forward KL, mean over
    the kept positions; e.g. ``LinearKLDivLoss(temperature=2.0, t2_scale=True)``; without
    ``softcap``/``logit_scale``, which come from the student's config). Gradient accumulation:
    ``compute_loss`` normalises by ``num_items_in_batch`` when the Trainer gives it and sets
    ``loss_is_scaled_for_ga`` accordingly, so the accumulated gradient is that of the whole
    batch's mean (see the module docstring).
    """

    def __init__(self, *args, teacher_model=None, loss_fn=None, **kwargs):
        _options(loss_fn)  # refuse a wrong loss_fn before the Trainer is set up
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.eval()
            teacher_model.to(self.args.device)
        self.loss_fn = loss_fn if loss_fn is not None else LinearKLDivLoss()

    def _set_signature_columns_if_needed(self):  # keep the cache's fields (datasets.Dataset)
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *_CACHE_FIELDS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = linear_distillation_loss(model, inputs, teacher_model=self.teacher_model,
                                        loss_fn=self.loss_fn, num_items_in_batch=num_items_in_batch)
        # training_step divides by the accumulation steps unless told the loss is scaled:
        # a sum (over the kept positions, or divided by the whole batch's count) is
        self.loss_is_scaled_for_ga = (num_items_in_batch is not None
                                      or self.loss_fn.options["reduction"] == "sum")
        return (loss, None) if return_outputs else loss
