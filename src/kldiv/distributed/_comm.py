"""Collectives of kldiv.distributed: the all-reduce wrapper, the world size, and their counter."""
from __future__ import annotations

import contextlib


_COUNTERS: list[dict] = []


@contextlib.contextmanager
def count_collectives():
    """Count the collectives issued by this module inside the ``with`` block.

    Yields a dict with ``"calls"`` (number of all-reduces) and ``"bytes"`` (their payload in
    bytes, summed; a ring all-reduce moves about ``2 (W - 1) / W`` times that per rank). Local
    runs (one rank) issue no collective and count nothing.

    >>> import torch, kldiv.distributed as kd
    >>> with kd.count_collectives() as c:
    ...     _ = kd.vocab_parallel_kl_div(torch.zeros(2, 3), torch.zeros(2, 3))
    >>> c["calls"], c["bytes"]
    (0, 0)
    """
    counter = {"calls": 0, "bytes": 0}
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _world(group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_reduce(t, op, group):
    """In-place all-reduce of a contiguous tensor over ``group`` (no-op on one rank)."""
    if _world(group) == 1:
        return t
    import torch.distributed as dist

    t = t.contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    for c in _COUNTERS:
        c["calls"] += 1
        c["bytes"] += t.numel() * t.element_size()
    return t
