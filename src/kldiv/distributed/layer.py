"""The vocabulary-parallel output layer fused with the loss (no full logits on any rank)."""
from __future__ import annotations

from .._core.validation import check_option, check_positive_finite, validation_enabled
from .._core.reduction import broadcast_rows
from ._comm import _all_reduce
from ._inputs import (_LOG_SPACES, _check_log_probs, _check_tensor, _check_weight_values,
                      _compute_dtype)
from ._rows import _KINDS, _local_grads, _rows_and_stats


def _linear_function_class():
    import torch

    class _VocabParallelLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight_shard, bias_shard, target, row_mask, row_weight, kind,
                    beta, temperature, reduction, chunk_size, group, check, target_space,
                    grad_on, student_cap):
            n, h = hidden.shape
            dt = _compute_dtype(hidden, target)
            # under torch.no_grad() (evaluation) no gradient is formed and grad_hidden is not
            # all-reduced: ctx.needs_input_grad follows requires_grad, not the grad mode
            need_h = grad_on and ctx.needs_input_grad[0]
            need_w = grad_on and ctx.needs_input_grad[1]
            need_b = grad_on and bias_shard is not None and ctx.needs_input_grad[2]
            need_t = grad_on and ctx.needs_input_grad[3]
            keep = row_mask
            if row_weight is not None:
                pos = row_weight > 0
                keep = pos if keep is None else keep & pos
            scale = torch.ones(n, dtype=dt, device=hidden.device)
            if row_weight is not None:
                scale = row_weight.to(dt)
            if keep is not None:
                scale = torch.where(keep, scale, 0.0)
            if reduction == "mean":
                den = scale.sum() if keep is not None else torch.tensor(float(max(n, 1)), dtype=dt)
                inv = torch.where(den > 0, 1.0 / torch.where(den > 0, den, 1.0), 0.0)
                scale = scale * inv.to(scale.device)
            dev = hidden.device
            gh = torch.zeros(n, h, dtype=dt, device=dev) if need_h else None
            gw = torch.zeros(weight_shard.shape, dtype=dt, device=dev) if need_w else None
            gb = torch.zeros(weight_shard.shape[0], dtype=dt, device=dev) if need_b else None
            gt = torch.zeros(target.shape, dtype=dt, device=dev) if need_t else None
            w_dt = weight_shard.to(dt)
            rows_all = torch.zeros(n, dtype=dt, device=dev)
            names = ("target_shard", "student logits")
            with torch.no_grad():
                for lo in range(0, n, chunk_size):
                    hi = min(n, lo + chunk_size)
                    hc = hidden[lo:hi]
                    logits = hc @ weight_shard.T
                    if bias_shard is not None:
                        logits = logits + bias_shard
                    y = logits.to(dt)
                    dcap = None
                    if student_cap is not None:  # the student's softcap / logit_scale
                        y, dcap = _cap_and_slope(y, *student_cap)
                    x = target[lo:hi].to(dt)
                    if row_mask is not None:
                        m = row_mask[lo:hi, None]
                        x = torch.where(m, x, 0.0)
                        y = torch.where(m, y, 0.0)
                    if target_space == "log_probs" and check:
                        _check_log_probs(x, "target_shard", group,
                                         None if row_mask is None else row_mask[lo:hi])
                    rows, st = _rows_and_stats(kind, x, y, beta, temperature, group, check,
                                               names)
                    rows_all[lo:hi] = rows
                    if need_h or need_w or need_b or need_t:
                        gx, gy = _local_grads(kind, x, y, rows, st, beta,
                                              scale=scale[lo:hi],
                                              need=(need_t, True))
                        if dcap is not None:  # chain rule through the cap (elementwise)
                            gy = gy * dcap
                        if need_h:
                            gh[lo:hi] = gy @ w_dt
                        if need_w:
                            gw += gy.T @ hc.to(dt)
                        if need_b:
                            gb += gy.sum(dim=0)
                        if need_t:
                            gt[lo:hi] = gx
                if need_h:
                    gh = _all_reduce(gh, "sum", group)
                kept = rows_all if keep is None else torch.where(keep, rows_all, 0.0)
                if row_weight is not None:
                    kept = kept * row_weight.to(dt)
                total = kept.sum()
                if reduction == "mean":
                    total = total * inv.to(total.device)
            empty = torch.empty(0)
            ctx.save_for_backward(*(empty if g is None else g for g in (gh, gw, gb, gt)))
            ctx.dtypes = (hidden.dtype, weight_shard.dtype,
                          None if bias_shard is None else bias_shard.dtype, target.dtype)
            return total

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            grads = []
            for i, (t, dt) in enumerate(zip(ctx.saved_tensors, ctx.dtypes)):
                grads.append((t * g).to(dt) if ctx.needs_input_grad[i] else None)
            return (*grads, None, None, None, None, None, None, None, None, None, None, None,
                    None)

    return _VocabParallelLinear


_LFN = None


def _cap_and_slope(y, softcap, logit_scale):
    """The student's capped logits and their derivative d(cap(y))/dy (y finite: a matmul)."""
    import torch

    s = 1.0 if logit_scale is None else logit_scale
    if softcap is None:
        return y * s, torch.full_like(y, s)
    t = torch.tanh(y * (s / softcap))
    return softcap * t, s * (1.0 - t * t)


def vocab_parallel_linear_kl_div(hidden, weight_shard, target_shard, *, bias_shard=None,
                                 target_space="logits", reduction="mean", mask=None,
                                 weight=None, temperature=1.0, t2_scale=False, kind="forward",
                                 beta=0.5, chunk_size=1024, group=None, validate=None,
                                 softcap=None, logit_scale=None, vocab_size=None, labels=None,
                                 ignore_index=None, vocab_start=None):
    r"""Divergence between teacher logits and a vocabulary-parallel output layer, fused.

    The student's logits slice is ``hidden @ weight_shard.T (+ bias_shard)``, computed
    ``chunk_size`` rows at a time, so that no rank holds more than ``chunk_size x V_r`` logits
    (plus the gradients of its parameters). The value is ``kldiv.kl_div(target, hidden @ W.T,
    p_space=target_space, q_space="logits", ...)`` on the gathered weight ``W`` and target
    (``kind`` picks reverse KL, JS or Jeffreys instead, with the teacher first as always).

    Gradients are computed during the forward pass (the backward only scales them by the
    incoming gradient): ``grad_weight_shard`` and ``grad_bias_shard`` are local;
    ``grad_hidden`` is summed over the group by one all-reduce of ``rows x hidden`` elements,
    because every rank's slice of the weight contributes to it. A gradient w.r.t. the target
    is given if it requires one.

    Args:
      hidden: ``(N, H)`` or ``(..., H)`` student features, the same on every rank.
      weight_shard: ``(V_r, H)``, this rank's rows of the output weight.
      target_shard: ``(..., V_r)`` teacher logits (or log-probabilities) for the same slice.
      bias_shard: optional ``(V_r,)``.
      reduction: ``"sum"`` or ``"mean"`` (``"none"`` is not available in the fused form).
      chunk_size: rows per chunk (each chunk costs the collectives of one
        ``vocab_parallel_kl_div`` call on that many rows).
      softcap, logit_scale: as ``kldiv.kl_div``, the target the p side and the student's
        logits the q side: a number applies to both (to the target only when it is logits), a
        pair ``(target_value, student_value)`` to each. The student's cap is applied inside
        the fused loop (its gradient by the chain rule, elementwise).
      vocab_size, vocab_start: the global columns at or beyond ``vocab_size`` are left out
        (rows of ``weight_shard`` and ``bias_shard``, columns of ``target_shard``).
      labels, ignore_index: rows whose label is ``ignore_index`` (default -100) are masked.
      Other arguments as ``vocab_parallel_kl_div``.

    >>> import torch, kldiv, kldiv.distributed as kd
    >>> g = torch.Generator().manual_seed(0)
    >>> h = torch.randn(4, 3, generator=g); w = torch.randn(5, 3, generator=g)
    >>> t = torch.randn(4, 5, generator=g)
    >>> fused = kd.vocab_parallel_linear_kl_div(h, w, t, chunk_size=3)
    >>> plain = kldiv.kl_div(t, h @ w.T, p_space="logits", q_space="logits", reduction="mean")
    >>> bool(torch.isclose(fused, plain, rtol=1e-5))
    True
    """
    import torch

    global _LFN
    check_option("reduction", reduction, ("sum", "mean"))
    check_option("kind", kind, _KINDS)
    check_option("target_space", target_space, _LOG_SPACES)
    temperature = check_positive_finite("temperature", temperature)
    if kind == "js" and not 0.0 < float(beta) < 1.0:
        raise ValueError(f"beta: must lie strictly between 0 and 1, got {beta!r}")
    for name, t in (("hidden", hidden), ("weight_shard", weight_shard),
                    ("target_shard", target_shard)):
        _check_tensor(name, t)
    if weight_shard.ndim != 2 or weight_shard.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight_shard: expected shape (V_r, {hidden.shape[-1]}) for hidden of shape "
            f"{tuple(hidden.shape)}, got {tuple(weight_shard.shape)}"
        )
    if target_shard.shape != (*hidden.shape[:-1], weight_shard.shape[0]):
        raise ValueError(
            f"target_shard: expected shape {(*hidden.shape[:-1], weight_shard.shape[0])} "
            f"(hidden's rows, weight_shard's slice), got {tuple(target_shard.shape)}"
        )
    if bias_shard is not None and tuple(bias_shard.shape) != (weight_shard.shape[0],):
        raise ValueError(f"bias_shard: expected shape ({weight_shard.shape[0]},), got "
                         f"{tuple(bias_shard.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    student_cap = None
    if (softcap is not None or logit_scale is not None or vocab_size is not None
            or labels is not None or ignore_index is not None or vocab_start is not None):
        (target_shard, target_space, weight_shard, bias_shard, mask,
         student_cap) = _layer_options(
            hidden, weight_shard, bias_shard, target_shard, target_space, mask, softcap,
            logit_scale, vocab_size, labels, ignore_index, vocab_start, group)
    rows_shape = tuple(hidden.shape[:-1])
    n = 1
    for s in rows_shape:
        n *= s
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = getattr(mask, "dtype", type(mask).__name__)
            raise TypeError(f"mask: expected a boolean tensor, got {got}")
        mask = broadcast_rows(torch, mask, rows_shape, "mask").reshape(n)
    if weight is not None:
        weight = broadcast_rows(torch, weight, rows_shape, "weight").reshape(n)
    check = validation_enabled(validate)
    if check:
        _check_weight_values(weight)
    if _LFN is None:
        _LFN = _linear_function_class()
    out = _LFN.apply(hidden.reshape(n, hidden.shape[-1]), weight_shard, bias_shard,
                     target_shard.reshape(n, weight_shard.shape[0]), mask, weight, kind,
                     float(beta), temperature, reduction, chunk_size, group, check, target_space,
                     torch.is_grad_enabled(), student_cap)
    if t2_scale:
        out = out * temperature**2
    return out


def _layer_options(hidden, weight_shard, bias_shard, target_shard, target_space, mask, softcap,
                   logit_scale, vocab_size, labels, ignore_index, vocab_start, group):
    """The model-side options of the fused layer: the target transformed here (autograd), the
    vocabulary cut on the weight's rows and the target's columns, labels made a mask; the
    student's cap is returned for the fused loop."""
    from .._core import options as O
    from ._inputs import _apply_options

    sc = O.check_per_side("softcap", softcap, target_space, "logits", ("target", "student"))
    ls = O.check_per_side("logit_scale", logit_scale, target_space, "logits",
                          ("target", "student"))
    # the target side through the shards' options (the student's logits do not exist yet: a
    # stand-in of the target's shape carries the vocabulary cut and is dropped)
    stand_in = target_shard.detach()
    target_shard, kept, target_space, _, mask = _apply_options(
        target_shard, stand_in, p_space=target_space, q_space="logits", mask=mask,
        softcap=(sc[0], None), logit_scale=(ls[0], None), vocab_size=vocab_size, labels=labels,
        ignore_index=ignore_index, vocab_start=vocab_start, group=group,
        names=("target_shard", "target_shard"))
    width = kept.shape[-1]
    if width < weight_shard.shape[0]:
        weight_shard = weight_shard[:width]
        bias_shard = None if bias_shard is None else bias_shard[:width]
    student = None if sc[1] is None and ls[1] is None else (sc[1], ls[1])
    return target_shard, target_space, weight_shard, bias_shard, mask, student
