"""Argument checks of kldiv.distributed: tensors, shapes, masks, weights, log-probabilities."""
from __future__ import annotations

import math

from .._core.validation import check_option, normalization_tolerance
from .._core.reduction import broadcast_rows
from ._comm import _all_reduce
from ._rows import _masked_max, _safe_exp_sum

_LOG_SPACES = ("logits", "log_probs")


def _check_tensor(name, x):
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name}: expected at least one dimension (the categories), got a scalar")


def _compute_dtype(*ts):
    import torch

    dt = torch.promote_types(ts[0].dtype, ts[1].dtype)
    if torch.finfo(dt).bits < 32:
        dt = torch.float32
    return dt


def _prepare_shards(p, q, p_space, q_space, mask, weight, names=("p_shard", "q_shard")):
    """Checks, compute dtype, masked rows made safe; returns (N, V_r) views and row arrays."""
    import torch

    check_option("p_space", p_space, _LOG_SPACES)
    check_option("q_space", q_space, _LOG_SPACES)
    _check_tensor(names[0], p)
    _check_tensor(names[1], q)
    if p.shape != q.shape:
        raise ValueError(
            f"{names[0]} and {names[1]}: shapes {tuple(p.shape)} and {tuple(q.shape)} differ; "
            "both shards must hold the same rows and the same slice of the categories (last axis)"
        )
    dt = _compute_dtype(p, q)
    rows_shape = tuple(p.shape[:-1])
    x = p.to(dt)
    y = q.to(dt)
    if mask is not None:
        mask = _check_mask(mask, rows_shape, x.device)
        # masked rows may hold anything: both sides become the same (uniform) row, KL = 0
        x = torch.where(mask[..., None], x, 0.0)
        y = torch.where(mask[..., None], y, 0.0)
    if weight is not None:
        weight = broadcast_rows(torch, torch.as_tensor(weight, dtype=dt, device=x.device),
                                rows_shape, "weight")
    n = 1
    for s in rows_shape:
        n *= s
    return x.reshape(n, p.shape[-1]), y.reshape(n, q.shape[-1]), rows_shape, mask, weight


def _check_mask(mask, rows_shape, device):
    import torch

    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise TypeError(f"mask: expected a boolean tensor, got {got}")
    return broadcast_rows(torch, mask.to(device), rows_shape, "mask")


def _check_weight_values(weight):
    if weight is not None and bool((~weight.isfinite() | (weight < 0)).any()):
        raise ValueError("weight: must be finite and >= 0")


def _check_log_probs(raw, name, group, keep=None):
    """Rows of log-probabilities must have a global logsumexp of 0 (the core's tolerance).

    ``raw``: (N, V_r) before the temperature; ``keep``: (N,) rows to check (masked rows are
    exempt). Costs a MAX and a SUM all-reduce; runs only with validation on.
    """
    import torch

    with torch.no_grad():
        m = _all_reduce(_masked_max(raw, raw > -math.inf)[:, None], "max", group)[:, 0]
        s = torch.cat([_safe_exp_sum(raw, raw > -math.inf, m)[:, None],
                       torch.full((raw.shape[0], 1), float(raw.shape[-1]), dtype=raw.dtype,
                                  device=raw.device)], dim=1)
        s = _all_reduce(s, "sum", group)
        width = int(s[0, 1]) if raw.shape[0] else raw.shape[-1]
        tol = normalization_tolerance(torch.finfo(raw.dtype).eps, width)
        lse = m + torch.log(s[:, 0])
        off = (lse.abs() > tol) | (m > tol)
        if keep is not None:
            off = off & keep
        if bool(off.any()):
            row = int(torch.nonzero(off)[0, 0])
            raise ValueError(
                f"{name}: log-probabilities must be <= 0 with logsumexp 0 within {tol:.1e} over "
                f"the full vocabulary (all shards); row {row} has logsumexp "
                f"{float(lse[row]):.6g} (pass the logits with space 'logits' instead)"
            )


def _shard_layout(width, group, device):
    """(first global column of this shard, full vocabulary width): one SUM all-reduce of the
    group's shard widths, the shards taken in the order of the ranks of ``group``."""
    import torch

    from ._comm import _world

    world = _world(group)
    if world == 1:
        return 0, width
    import torch.distributed as dist

    widths = torch.zeros(world, dtype=torch.int64, device=device)
    widths[dist.get_rank(group)] = width
    widths = _all_reduce(widths, "sum", group).tolist()
    rank = dist.get_rank(group)
    return int(sum(widths[:rank])), int(sum(widths))


def _apply_options(p, q, *, p_space, q_space, mask, softcap, logit_scale, vocab_size, labels,
                   ignore_index, vocab_start, group, names=("p_shard", "q_shard")):
    """The model-side options of ``kldiv.kl_div`` on vocabulary shards (the same semantics:
    ``kldiv._core.options``). ``vocab_size`` counts global columns: this shard keeps those of
    its columns that lie below it, from ``vocab_start`` (default: the widths of the lower ranks
    of ``group``, one all-reduce). Returns ``(p, q, p_space, q_space, mask)``."""
    import torch

    from .._core import options as O
    from ._rows import _xp

    sc = O.check_per_side("softcap", softcap, p_space, q_space)
    ls = O.check_per_side("logit_scale", logit_scale, p_space, q_space)
    vocab_size = O.check_vocab_size(vocab_size)
    ignore_index = O.check_ignore_index(ignore_index, labels)
    if vocab_start is not None:
        if vocab_size is None:
            raise ValueError("vocab_start: given without vocab_size")
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start: expected an int >= 0, got {vocab_start!r}")
    _check_tensor(names[0], p)
    _check_tensor(names[1], q)
    if p.shape != q.shape:  # (before any cut: both shards must share the slicing)
        raise ValueError(
            f"{names[0]} and {names[1]}: shapes {tuple(p.shape)} and {tuple(q.shape)} differ; "
            "both shards must hold the same rows and the same slice of the categories (last "
            "axis); for vocabularies of different sizes, shard both at the larger (padded) "
            "width and pass vocab_size"
        )
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or \
                labels.dtype == torch.bool or labels.is_complex():
            got = getattr(labels, "dtype", type(labels).__name__)
            raise TypeError(f"labels: expected an integer tensor, got {got}")
        rows_shape = tuple(p.shape[:-1])
        keep = broadcast_rows(torch, labels.to(p.device), rows_shape, "labels") != ignore_index
        if mask is not None:
            keep = keep & _check_mask(mask, rows_shape, p.device)
        mask = keep
    if vocab_size is not None:
        width = p.shape[-1]
        if vocab_start is None:
            start, total = _shard_layout(width, group, p.device)
            if vocab_size > total:
                raise ValueError(
                    f"vocab_size: {vocab_size} is more than the {total} categories of the full "
                    "vocabulary (all shards)"
                )
            cut = vocab_size < total
        else:
            # the full width is not known here without a collective: log-probabilities are
            # renormalised over the kept columns (taken as logits) on every rank alike
            start, cut = vocab_start, True
        keep_cols = max(0, min(width, vocab_size - start))
        if keep_cols < width:
            p, q = p[..., :keep_cols], q[..., :keep_cols]
        if cut:
            # decided alike on every rank (from the global layout, not from this shard's cut):
            # the checks that follow are collectives, and the ranks must call the same ones
            p_space = "logits" if p_space == "log_probs" else p_space
            q_space = "logits" if q_space == "log_probs" else q_space
    xp = _xp()
    if sc[0] is not None or ls[0] is not None:
        p = O.cap(xp, O._promote(xp, p), sc[0], ls[0])
    if sc[1] is not None or ls[1] is not None:
        q = O.cap(xp, O._promote(xp, q), sc[1], ls[1])
    return p, q, p_space, q_space, mask
