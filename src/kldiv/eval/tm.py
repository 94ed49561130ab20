"""A ``torchmetrics.Metric`` around :class:`~kldiv.eval.metrics.DriftMetric` (needs torchmetrics).

``TorchDriftMetric`` behaves as any torchmetrics metric (``update``, ``compute``, ``forward``
returning the batch's statistics while accumulating, ``reset``, ``merge_state``, ``sync`` /
``unsync`` and ``compute`` synchronising over ``torch.distributed``), with DriftMetric's exact
accumulators as its state instead of tensors: the synchronisation gathers the serialised states
(``all_gather_object``) and merges them exactly.
"""
from __future__ import annotations

from typing import Any

from torchmetrics import Metric

from .metrics import TOPK, DriftMetric


class TorchDriftMetric(Metric):
    """KL(reference || other) statistics, flips and top-k overlap as a ``torchmetrics.Metric``.

    ``compute()`` returns :meth:`DriftMetric.compute`'s dict (floats, not tensors).

    >>> import torch
    >>> m = TorchDriftMetric(topk=(1,))
    >>> ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    >>> oth = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    >>> m.update(ref, oth)
    >>> round(m.compute()["kl"]["mean"], 5)    # (0.143841 + 0) / 2, float32 logits
    0.07192
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, *, topk=TOPK, max_exact: int | None = None, alpha: float = 1e-3, **kwargs: Any):
        super().__init__(**kwargs)
        kw = {} if max_exact is None else {"max_exact": max_exact}
        self._drift_args = dict(topk=topk, alpha=alpha, **kw)
        self.drift = DriftMetric(**self._drift_args)

    def update(self, reference_logits, other_logits, tokens=None, mask=None) -> None:
        self.drift.update(reference_logits, other_logits, tokens=tokens, mask=mask)

    def compute(self) -> dict:
        return self.drift.compute()

    def reset(self) -> None:
        super().reset()
        self.drift = DriftMetric(**self._drift_args)

    # the state is the DriftMetric: copied, reduced and synchronised as a whole
    def _copy_state_dict(self) -> dict:
        out = super()._copy_state_dict()
        out["drift"] = DriftMetric.from_state_dict(self.drift.state_dict())
        return out

    def _reduce_states(self, incoming_state: dict) -> None:
        super()._reduce_states({k: v for k, v in incoming_state.items() if k != "drift"})
        if "drift" in incoming_state:
            self.drift.merge(incoming_state["drift"])

    def merge_state(self, incoming_state) -> None:
        if isinstance(incoming_state, TorchDriftMetric):
            self.drift.merge(incoming_state.drift)
        elif isinstance(incoming_state, dict) and "drift" in incoming_state:
            other = incoming_state["drift"]
            self.drift.merge(other if isinstance(other, DriftMetric) else DriftMetric.from_state_dict(other))
        else:
            raise ValueError("merge_state: expected a TorchDriftMetric or a dict with a 'drift' state")

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        import torch.distributed as dist

        group = process_group or self.process_group
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.drift.state_dict(), group=group)
        total = DriftMetric.from_state_dict(states[0])
        for st in states[1:]:
            total.merge(DriftMetric.from_state_dict(st))
        self.drift = total



__all__ = ["TorchDriftMetric"]
