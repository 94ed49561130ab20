"""A Hugging Face ``Trainer`` that distils with ``kldiv.torch.LinearKLDivLoss``.

The student's logits are never materialised: ``compute_loss`` runs the student's backbone
(``model.base_model``) for its last hidden states and hands them with the output layer's weight
(``model.get_output_embeddings()``) to :class:`kldiv.torch.LinearKLDivLoss`, which makes the
logits chunk by chunk. The teacher is either

* a model (``teacher_model=``): its logits at the same positions, without gradient, or
* a cache written by ``kldiv cache`` (train on :class:`kldiv.cache.TeacherCache`, whose items
  carry ``input_ids`` and the top-k fields): the top-k + tail bucket target
  ``(topk_ids, topk_logprobs)`` of ``linear_kl_div``.

Position t of the student predicts token t + 1, as the teacher's (and the cache's) position t:
no shift is needed. Masked positions (``attention_mask`` 0, ``labels`` -100) are skipped.

Usage::

    from kldiv.integrations.hf import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=ds)            # or train_dataset=TeacherCache(dir)
    trainer.train()
"""
from __future__ import annotations

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

__all__ = ["DistillationTrainer", "linear_distillation_loss"]

_CACHE_FIELDS = ("topk_ids", "topk_logprobs", "tail_logmass", "tail_ids", "tail_logprobs",
                 "tail_weights")


def linear_distillation_loss(model, inputs, *, teacher_model=None, loss_fn=None):
    """The distillation loss of ``model`` on ``inputs`` (see the module docstring)."""
    loss_fn = loss_fn if loss_fn is not None else LinearKLDivLoss()
    ids = inputs["input_ids"]
    am = inputs.get("attention_mask")
    out = model.base_model(input_ids=ids, attention_mask=am, use_cache=False)
    hidden = out.last_hidden_state
    head = model.get_output_embeddings()
    mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if am is None else am.bool()
    labels = inputs.get("labels")
    if labels is not None:
        mask = mask & (labels != -100)
    if "topk_ids" in inputs:
        target = (inputs["topk_ids"].long(), inputs["topk_logprobs"])
    else:
        if teacher_model is None:
            raise ValueError("teacher_model: needed when the batch carries no cached teacher "
                             "(topk_ids, topk_logprobs)")
        with torch.no_grad():
            target = teacher_model(input_ids=ids, attention_mask=am, use_cache=False).logits.float()
    return loss_fn(hidden, head.weight, target, bias=getattr(head, "bias", None), mask=mask)


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` with a kldiv distillation ``compute_loss``.

    ``teacher_model``: a causal LM with the student's vocabulary (None when training on a
    cache); ``loss_fn``: a :class:`kldiv.torch.LinearKLDivLoss` (default: forward KL, mean over
    the kept positions; e.g. ``LinearKLDivLoss(temperature=2.0, t2_scale=True)``).
    """

    def __init__(self, *args, teacher_model=None, loss_fn=None, **kwargs):
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
                                        loss_fn=self.loss_fn)
        return (loss, None) if return_outputs else loss
