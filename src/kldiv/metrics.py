"""Streaming drift metrics (issue 14's ``kldiv.metrics``): the names of :mod:`kldiv.eval`.

- :class:`DriftMetric`: llama.cpp's KL statistics, answer flips and top-k overlap, accumulated
  batch by batch (NumPy, torch or JAX arrays), with exact ``merge`` across batches and
  processes and ``sync()`` over ``torch.distributed``;
- :func:`batch_kl`: the plain per-batch KL (both directions, with a mask) for training loops;
- ``TorchDriftMetric``: the same as a ``torchmetrics.Metric`` (imports torch on use).

>>> import numpy as np
>>> from kldiv.metrics import DriftMetric
>>> rng = np.random.default_rng(0)
>>> ref, other = rng.standard_normal((2, 8, 5))
>>> a, b = DriftMetric(), DriftMetric()
>>> a.update(ref[:3], other[:3]); b.update(ref[3:], other[3:])
>>> whole = DriftMetric(); whole.update(ref, other)
>>> a.merge(b).compute()["kl"]["mean"] == whole.compute()["kl"]["mean"]
True
"""
from .eval.metrics import DriftMetric, batch_kl, row_values, topk_overlap

__all__ = ["DriftMetric", "batch_kl", "row_values", "topk_overlap", "TorchDriftMetric"]


def __getattr__(name):  # the torchmetrics adapter imports torch and torchmetrics: only on use
    if name == "TorchDriftMetric":
        from .eval.tm import TorchDriftMetric

        return TorchDriftMetric
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
