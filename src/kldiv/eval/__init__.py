"""Model drift, measured on the models themselves: ``kldiv eval`` and its streaming metric.

:class:`DriftMetric` (:mod:`kldiv.eval.metrics`) accumulates llama.cpp's KL statistics, answer
flips and top-k overlap batch by batch, with exact merges across batches and processes;
:func:`batch_kl` is the plain per-batch KL for training loops.
"""
from __future__ import annotations

from .metrics import DriftMetric, batch_kl, row_values, topk_overlap

__all__ = ["DriftMetric", "batch_kl", "row_values", "topk_overlap"]
