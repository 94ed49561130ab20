"""Offline sparse teacher cache for distillation: write, read, train on it, bound the error.

* :func:`build_cache` (``kldiv cache`` on the command line) runs a teacher once and stores, per
  position, its top-k token ids and log-probs, the tail mass, and M tail tokens drawn by
  importance sampling with their weights (arXiv 2503.16870), with the provenance in a header.
* :class:`TeacherCache` reads it back as a torch ``Dataset`` of aligned chunks.
* :func:`bucket_kl` / :func:`linear_bucket_kl` (top-k + tail bucket; a lower bound of the full
  KL) and :func:`sampled_kl` (unbiased estimate of the full KL) are losses on the cached teacher.
* :func:`kl_bounds` gives a certified lower and upper bound of the full KL per position.

Needs torch (and safetensors to read/write shards); importing ``kldiv.cache`` imports torch.
"""
from __future__ import annotations

from ._sparse import bytes_per_position, sparsify
from .bounds import kl_bounds
from .estimators import bucket_kl, linear_bucket_kl, sampled_kl
from .reader import TeacherCache
from .writer import build_cache

__all__ = ["build_cache", "TeacherCache", "sparsify", "bytes_per_position", "bucket_kl",
           "sampled_kl", "linear_bucket_kl", "kl_bounds"]
