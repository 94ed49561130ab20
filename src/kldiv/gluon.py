"""MXNet Gluon's ``KLDivLoss``, reproduced on NumPy, PyTorch and JAX arrays (a migration shim).

This is a compatibility layer, not a KL divergence: it keeps MXNet's argument names, its
epsilon and its aggregation so that a model trained with ``mx.gluon.loss.KLDivLoss`` gives the
same loss values and gradients after moving to another framework. For the true
KL(label || softmax(pred)) use :func:`kldiv.kl_div` (see ``docs/gluon.md``).

Checked against fixtures recorded with the real MXNet 1.9.1 (aggregation by sum) and 1.8.0
(aggregation by mean): ``tests/fixtures/gluon/``, made by ``scripts/make_gluon_fixtures.py``.
"""
from __future__ import annotations

import numbers

import numpy as np

from ._core._xp import logsumexp, namespace
from ._core.validation import check_axis, check_floating, check_option

__all__ = ["KLDivLoss", "AGGREGATES", "LABEL_EPS"]

AGGREGATES = ("mean", "sum")
#: MXNet adds this to the label inside the log (in the label's dtype), so that 0 * log 0 is 0.
LABEL_EPS = 1e-12


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {value!r}")


class KLDivLoss:
    r"""MXNet Gluon's ``KLDivLoss``, value for value and gradient for gradient.

    ``KLDivLoss(from_logits=True, axis=-1, weight=None, batch_axis=0, aggregate="mean")``,
    called as ``loss_fn(pred, label, sample_weight=None)``. For one element:

    .. math::

        \ell = \mathrm{label} \cdot \bigl(\log(\mathrm{label} + 10^{-12}) - \mathrm{pred}\bigr)
               \cdot \mathrm{sample\_weight} \cdot \mathrm{weight}

    where ``pred`` is first replaced by ``log_softmax(pred, axis)`` when ``from_logits`` is
    False. The result has one value per entry of ``batch_axis``: ``aggregate="mean"`` averages
    :math:`\ell` over all the other axes (MXNet 1.0 to 1.8 and 2.0, the behaviour the MXNet
    tutorial describes), ``aggregate="sum"`` sums them (MXNet 1.9).

    Read the names with care, they are MXNet's:

    - ``from_logits=True`` (the default) means **pred is already log-probabilities** (for
      example the output of a log_softmax), not raw logits. Pass ``from_logits=False`` for raw
      scores; the log_softmax along ``axis`` is then applied here. ``axis`` is used only then.
    - ``label`` is the reference distribution, as probabilities; ``pred`` is the model.
    - The value is **not the true KL divergence**. With ``aggregate="mean"`` it is the KL
      divided by the number of aggregated elements (the number of categories for 2-D input,
      times the other non-batch axes for N-D input). With either aggregate, 1e-12 is added to
      the label inside the log, so ``label = 0`` contributes 0 where ``pred`` is finite; in
      float64 the value is off by about 1e-12 per category.
    - The true KL(label || q) with q = softmax(pred) per row is
      ``kldiv.kl_div(label, pred, q_space="log_probs", axis=axis)`` (or ``q_space="logits"``
      for ``from_logits=False``), one value per distribution; sum it over the non-batch axes
      other than ``axis`` to get one value per sample.

    Edge cases, exactly as in MXNet (the formula is evaluated as written, no clipping):

    - ``label = 0`` and finite ``pred``: contributes 0.
    - ``label > 0`` and ``pred = -inf`` (q = 0 where the label has mass): ``+inf``.
    - ``label = 0`` and ``pred = -inf``: ``0 * inf = nan`` (the tutorial's dist_4 against itself).
    - Gradient with respect to ``pred``: ``-label * sample_weight * weight`` (divided by the
      count for "mean", after the log_softmax's Jacobian for ``from_logits=False``), finite even
      where the value is inf or nan.
    - float16: 1e-12 rounds to 0, so any ``label = 0`` gives nan (MXNet does the same).

    Args:
      from_logits: True: ``pred`` holds log-probabilities. False: ``pred`` holds raw scores,
        normalised here by a log_softmax along ``axis``.
      axis: the category axis of the log_softmax (only used when ``from_logits`` is False;
        checked against ``pred.ndim`` in both cases).
      weight: a global scalar weight (a real number) or None.
      batch_axis: the axis that is kept; every other axis is aggregated.
      aggregate: "mean" (MXNet 1.0-1.8, 2.0) or "sum" (MXNet 1.9). The default is "mean",
        because the MXNet documentation and tutorial describe it.

    Call arguments:
      pred: real floating array (NumPy, PyTorch or JAX), at least 1-D.
      label: real floating array of the same shape and library as ``pred``.
      sample_weight: optional array (or Python number) that broadcasts to ``pred.shape``
        without enlarging it, e.g. shape (batch, 1) to weight each sample.

    Differences from MXNet, all of them errors where MXNet would compute something: ``label``
    must have exactly ``pred``'s shape (MXNet broadcasts it), ``sample_weight`` must not enlarge
    the shape, and mixed dtypes are promoted by the array library's rules (MXNet refuses them).

    Returns:
      An array of the caller's type and of shape ``(pred.shape[batch_axis],)``, in the dtype of
      ``pred``, ``label`` and ``sample_weight`` promoted together. Differentiable with torch
      autograd and ``jax.grad`` (plain array operations).

    Examples:
      The MXNet tutorial's first comparison, pred = log(dist_1), label = dist_2. By hand,
      KL(dist_2 || dist_1) = 0.3 ln 1.5 + 0.4 ln 0.8 + 0.1 ln 0.5 + 0.2 ln 2 = 0.1016968; MXNet
      1.9 returns that sum, MXNet 1.8 and the tutorial a quarter of it (4 categories).

      >>> import numpy as np
      >>> from kldiv.gluon import KLDivLoss
      >>> pred = np.log(np.array([[0.2, 0.5, 0.2, 0.1]]))
      >>> label = np.array([[0.3, 0.4, 0.1, 0.2]])
      >>> print(f"{float(KLDivLoss(aggregate='sum')(pred, label)[0]):.6f}")
      0.101697
      >>> print(f"{float(KLDivLoss()(pred, label)[0]):.6f}")
      0.025424
      >>> import kldiv
      >>> print(f"{float(kldiv.kl_div(label, pred, q_space='log_probs')[0]):.6f}")
      0.101697

    References:
      MXNet ``python/mxnet/gluon/loss.py``, ``KLDivLoss`` (1.8.0: ``F.mean(loss, axis=batch_axis,
      exclude=True)``; 1.9.1: ``F.sum``; 2.0: ``_batch_mean``).
    """

    def __init__(self, from_logits=True, axis=-1, weight=None, batch_axis=0, aggregate="mean"):
        _check_bool("from_logits", from_logits)
        _check_int("axis", axis)
        _check_int("batch_axis", batch_axis)
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, numbers.Real)
        ):
            raise TypeError(f"weight: expected a real number or None, got {weight!r}")
        check_option("aggregate", aggregate, AGGREGATES)
        self.from_logits = from_logits
        self.axis = int(axis)
        self.weight = None if weight is None else float(weight)
        self.batch_axis = int(batch_axis)
        self.aggregate = aggregate

    def __repr__(self):
        return (
            f"KLDivLoss(from_logits={self.from_logits}, axis={self.axis}, weight={self.weight}, "
            f"batch_axis={self.batch_axis}, aggregate={self.aggregate!r})"
        )

    def __call__(self, pred, label, sample_weight=None):
        sw_is_array = sample_weight is not None and not isinstance(sample_weight, numbers.Real)
        if isinstance(sample_weight, bool):
            raise TypeError("sample_weight: expected a floating array or a number, got a bool")
        for name, x in (("pred", pred), ("label", label)) + (
            (("sample_weight", sample_weight),) if sw_is_array else ()
        ):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise TypeError(
                    f"{name}: expected a NumPy, PyTorch or JAX array, got {type(x).__name__}"
                )
        if sample_weight is not None and not sw_is_array:
            sample_weight = float(sample_weight)  # a Python scalar never changes the dtype
        xp = namespace(pred, label, sample_weight if sw_is_array else None)
        check_floating(xp, "pred", pred)
        check_floating(xp, "label", label)
        if sw_is_array:
            check_floating(xp, "sample_weight", sample_weight)
        shape = tuple(pred.shape)
        ndim = len(shape)
        if ndim == 0:
            raise ValueError("pred: expected at least one dimension (the batch axis), got a scalar")
        if tuple(label.shape) != shape:
            raise ValueError(
                f"label: shape {tuple(label.shape)} does not match pred's shape {shape}"
            )
        axis = check_axis(self.axis, ndim, "axis")
        batch_axis = check_axis(self.batch_axis, ndim, "batch_axis")
        if sw_is_array:
            sw_shape = tuple(sample_weight.shape)
            try:
                bshape = tuple(np.broadcast_shapes(sw_shape, shape))
            except ValueError:
                bshape = None
            if bshape != shape:
                raise ValueError(
                    f"sample_weight: shape {sw_shape} does not broadcast to pred's shape {shape}"
                )

        dtype = xp.result_type(pred, label, *((sample_weight,) if sw_is_array else ()))
        if pred.dtype != dtype:
            pred = xp.astype(pred, dtype)
        if label.dtype != dtype:
            label = xp.astype(label, dtype)

        if not self.from_logits:
            pred = pred - logsumexp(xp, pred, axis=axis)
        loss = label * (xp.log(label + LABEL_EPS) - pred)
        if sample_weight is not None:
            loss = loss * sample_weight
        if self.weight is not None:
            loss = loss * self.weight
        axes = tuple(i for i in range(ndim) if i != batch_axis)
        if not axes:
            return loss
        if self.aggregate == "sum":
            return xp.sum(loss, axis=axes)
        return xp.mean(loss, axis=axes)
