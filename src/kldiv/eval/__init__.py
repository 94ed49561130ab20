"""Model drift, measured on the models themselves: ``kldiv eval`` and its streaming metric.

- :class:`DriftMetric` (:mod:`kldiv.eval.metrics`): llama.cpp's KL statistics, answer flips and
  top-k overlap, accumulated batch by batch, with exact merges across batches and processes;
  :func:`batch_kl`: the plain per-batch KL for training loops;
- :func:`evaluate` (:mod:`kldiv.eval.runner`): run a reference and candidates (Hugging Face model
  directories or logits files) over a text in llama.cpp's scoring window, in bounded memory;
  returns an :class:`EvalResult` (table, JSON, figure);
- :func:`paired_bootstrap`: is candidate A really closer than B (resampling whole chunks);
- ``TorchDriftMetric`` (:mod:`kldiv.eval.tm`): DriftMetric as a ``torchmetrics.Metric``;
- :mod:`kldiv.eval.sparse`: a sparse teacher cache (``kldiv cache``) as the reference
  (:func:`compare_cache`, and :func:`evaluate` with a cache directory): certified KL bounds and
  the statistics a top-k reference determines, in a :class:`CacheResult`.

transformers and torch are imported only when a model runs.
"""
from __future__ import annotations

from .bootstrap import paired_bootstrap
from .metrics import DriftMetric, batch_kl, row_values, topk_overlap
from .result import EvalResult
from .runner import evaluate, scored_positions
from .sparse import CacheResult, compare_cache

__all__ = ["DriftMetric", "batch_kl", "row_values", "topk_overlap", "evaluate", "EvalResult",
           "paired_bootstrap", "scored_positions", "TorchDriftMetric", "CacheResult", "compare_cache"]


def __getattr__(name):  # the torchmetrics adapter imports torch and torchmetrics: only on use
    if name == "TorchDriftMetric":
        from .tm import TorchDriftMetric

        return TorchDriftMetric
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
