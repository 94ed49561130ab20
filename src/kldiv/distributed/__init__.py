"""KL on torch.distributed: vocabulary-parallel divergences and data-parallel token means.

Vocabulary (tensor) parallelism, as in Megatron-LM: every rank of a process group holds the same
rows (tokens) but only its slice of the categories, for both distributions (and, for
``vocab_parallel_linear_kl_div``, its slice of the output weight). The functions here return,
on every rank of the group, exactly what ``kldiv.kl_div`` (and its family) returns for the full,
gathered tensors, in value and in gradient, without gathering anything wider than a few numbers
per row.

Communication per row, forward pass (payload elements of the compute dtype, float32 or float64):

====================  ==========================================  =========================
divergence            collectives                                 payload elements per row
====================  ==========================================  =========================
forward, reverse KL   1 MAX + 2 SUM all-reduces                   8 + 9 + 1 = 18
Jeffreys              1 MAX + 3 SUM all-reduces                   8 + 9 + 1 + 5 = 23
JS                    1 MAX + 3 SUM all-reduces                   8 + 9 + 1 + 6 = 24
====================  ==========================================  =========================

Calls holding a row whose two maxima (over the common support) lie more than 16 apart add
one MAX of 2 elements per row (b's value at a's mode and a's at b's mode: the log-ratio is
taken relative to it, exactly, so that a row constant of 3e38 never rounds the O(1)
differences between the entries that carry the mass).

The MAX carries the row maxima of both sides over their supports and over the common support
(the global log-normalisers are then ``max + log(SUM of exp((x - max) / T))``) and four flags
(support escapes, invalid values, float32 logits beyond 2^125 T); the first SUM carries the
exp-sums, the p-weighted sum of the centred logit difference (the entry at p's maximum apart
from the rest, with the rest's mass) and the masses outside the common support; the second
SUM carries the sum of ``w * phi(centred difference)`` (it needs the global mean of the
first); JS and Jeffreys add one SUM of their own terms. The backward pass needs no collective
at all: every gradient (``q - p`` for forward KL w.r.t. the student, ``-p * (centred
difference)`` w.r.t. the teacher, and their analogues) is local once the row statistics are
known.
``vocab_parallel_linear_kl_div`` adds one SUM all-reduce of ``grad_hidden`` (``rows x hidden``
elements), which the math requires since every rank's weight slice contributes to it (not
under ``torch.no_grad()``, where no gradient is formed).
Validation of ``"log_probs"`` inputs adds a MAX (1 element) and a SUM (2 elements) per row and
side; ``validate=False`` drops it.

The algorithm is the core's accurate one (``kldiv._core.divergence``): the logit difference is
centred by its global p-weighted mean before ``phi(x) = exp(x) - 1 - x`` is summed, so no large
normalisers are subtracted and float32 keeps its relative accuracy for nearly equal rows. Each
side is centred on its own global maximum (carried by the MAX) before the two are differenced
(by TwoSum: a side shifted by 1e30 or masked with -1e30 loses nothing), the temperature
divides last, float32 rows with logits beyond 2^125 T run in float64 (never a nan), and a large
KL is taken in closed form (no overflow). See docs/distributed.md, "Accuracy and range".

Data parallelism needs no new divergence, only the right denominator: a per-token mean over all
ranks and gradient-accumulation steps is ``sum of per-token KL / global count of tokens``.
``global_token_count`` all-reduces that count, ``data_parallel_mean`` applies it (and undoes
DDP's division of gradients by the world size).

Without an initialised process group (or with a group of one rank) the divergences are handed to
the single-process core (``kldiv.kl_div`` and family, with its fused kernels), so the same code
runs on one device at full speed. torch is imported only when these functions are called.

Host synchronisations: one check per call whether the shards hold any -inf (shards without one
skip every support mask), one per call for the all-reduced flags (errors, the float32 limit, the
form of the difference), one per row chunk for the underflow guard of the common-support sums,
and for JS and Jeffreys one per call for the direct log-ratio; on GPUs each is a device
synchronisation.

The model-side options of ``kldiv.kl_div`` (``softcap``, ``logit_scale``, ``vocab_size``,
``labels`` with ``ignore_index``) are taken with the same meaning: the transform is elementwise,
so each rank applies it to its shard; ``vocab_size`` counts global columns from each shard's
first column (``vocab_start``, by default the widths of the lower ranks: one all-reduce of
``world`` integers), and a shard may keep none of its columns.

Modules: ``_comm`` (the all-reduce and its counter), ``_rows`` (the sharded row statistics and
local gradients), ``_inputs`` (argument checks), ``vocab_parallel`` (the four divergences),
``layer`` (the fused output layer), ``data_parallel`` (the global token mean).
"""
from __future__ import annotations

from ._comm import count_collectives
from .data_parallel import data_parallel_mean, global_token_count
from .layer import vocab_parallel_linear_kl_div
from .vocab_parallel import (vocab_parallel_jeffreys_div, vocab_parallel_js_div,
                             vocab_parallel_kl_div, vocab_parallel_reverse_kl)

__all__ = [
    "vocab_parallel_kl_div",
    "vocab_parallel_reverse_kl",
    "vocab_parallel_js_div",
    "vocab_parallel_jeffreys_div",
    "vocab_parallel_linear_kl_div",
    "global_token_count",
    "data_parallel_mean",
    "count_collectives",
]
