"""Plug kldiv's losses into training stacks: TRL's distillation trainers, the Hugging Face Trainer.

* :mod:`kldiv.integrations.trl`: :func:`~kldiv.integrations.trl.generalized_jsd_loss` (a
  drop-in for ``GKDTrainer.generalized_jsd_loss``, same signature and conventions),
  :func:`~kldiv.integrations.trl.chunked_divergence_loss` (a drop-in for the
  ``DistillationTrainer``'s ``_chunked_divergence_loss``, built on ``linear_kl_div``: the
  student's logits never materialised) and :func:`~kldiv.integrations.trl.use_kldiv` to install
  them.
* :mod:`kldiv.integrations.hf`: :class:`~kldiv.integrations.hf.DistillationTrainer`, a
  ``transformers.Trainer`` whose ``compute_loss`` distils from a teacher model or a cached
  teacher (``kldiv cache``) with ``kldiv.torch.LinearKLDivLoss``.

Nothing here is imported by ``import kldiv``; each module imports torch (and transformers/trl
only where it needs them).
"""
