"""Data parallelism: the global token count and the per-token mean over all ranks and steps."""
from __future__ import annotations

from ._comm import _all_reduce, _world


def global_token_count(mask, *, weight=None, group=None):
    """The number of counted rows (tokens) over all ranks of ``group`` and all given micro-batches.

    ``mask`` is a boolean tensor (true = counted), an int (a count of rows already made), or a
    list of either, one per gradient-accumulation micro-batch of this optimiser step;
    ``weight`` (optional, the same structure) counts ``sum(mask * weight)`` instead. The local
    sum is all-reduced (one SUM of one float64) over the data-parallel ``group``; every rank
    gets the same count. Call it once per optimiser step, before the micro-batches' backward
    passes (the masks are known up front: they come from the batch, not from the model).

    >>> import torch, kldiv.distributed as kd
    >>> float(kd.global_token_count([torch.tensor([True, False, True]), torch.tensor([True])]))
    3.0
    """
    import torch

    masks = mask if isinstance(mask, (list, tuple)) else [mask]
    weights = weight if isinstance(weight, (list, tuple)) else [weight] * len(masks)
    if len(weights) != len(masks):
        raise ValueError(f"weight: {len(weights)} entries for {len(masks)} masks")
    device = None
    total = 0.0
    for m, w in zip(masks, weights):
        if isinstance(m, torch.Tensor):
            device = m.device
            if m.dtype != torch.bool:
                raise TypeError(f"mask: expected boolean tensors or ints, got dtype {m.dtype}")
            mm = m.to(torch.float64)
            if w is not None:
                mm = mm * torch.as_tensor(w, dtype=torch.float64, device=m.device)
            total = total + mm.sum()
        elif isinstance(m, int) and not isinstance(m, bool) and m >= 0:
            if w is not None:
                raise ValueError("weight: give masks (tensors), not counts, when weighting")
            total = total + m
        else:
            raise TypeError(f"mask: expected a boolean tensor or a count, got {m!r}")
    if device is None and _world(group) > 1:  # counts only: nccl needs a tensor on the GPU
        import torch.distributed as dist

        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
    out = torch.as_tensor(total, dtype=torch.float64, device=device).detach().clone().reshape(1)
    return _all_reduce(out, "sum", group)[0]


def data_parallel_mean(local_sum, global_count, *, group=None, gradients_averaged=True):
    """This rank's share of a per-token mean over the whole data-parallel batch.

    ``local_sum`` is ``kldiv.kl_div(..., reduction="sum")`` (or any sum over rows) of this
    rank's micro-batch, ``global_count`` the value of ``global_token_count`` for the optimiser
    step. The result is ``local_sum / global_count``, times the world size of ``group`` when
    ``gradients_averaged`` (the default: DDP and FSDP divide the summed gradients by the world
    size). Back-propagating it on every rank and micro-batch gives exactly the gradient of the
    global mean ``sum over all tokens / count``, the gradient one process holding the whole
    batch gets; for logging, all-reduce the ``local_sum`` values (SUM) and divide by the count.
    An empty batch (count 0) gives 0, as ``reduction="mean"`` does. The result has the dtype of
    ``local_sum``, at least float32.

    Why not ``reduction="mean"`` per rank: with 3 counted tokens on rank 0 and 1 on rank 1, the
    mean of the two per-rank means weighs the lone token of rank 1 three times as much as each
    token of rank 0. The same happens across accumulation steps of unequal length.

    >>> import torch, kldiv.distributed as kd
    >>> float(kd.data_parallel_mean(torch.tensor(6.0), torch.tensor(4.0)))   # one process
    1.5
    """
    import torch

    if not isinstance(local_sum, torch.Tensor) or not local_sum.dtype.is_floating_point:
        raise TypeError(f"local_sum: expected a floating-point tensor, got {local_sum!r}")
    scale = float(_world(group)) if gradients_averaged else 1.0
    count = torch.as_tensor(global_count, dtype=torch.float64, device=local_sum.device)
    if bool((count < 0).any()) if count.device.type == "cpu" else False:
        raise ValueError(f"global_count: must be >= 0, got {float(count)}")
    # the factor is formed in float64 and applied in at least float32 (a bf16 count of a few
    # thousand tokens would be off by a fraction of a percent)
    dt = torch.promote_types(local_sum.dtype, torch.float32)
    factor = torch.where(count > 0, scale / torch.where(count > 0, count, 1.0), 0.0)
    return local_sum.to(dt) * factor.to(dt)
