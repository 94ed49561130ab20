"""Streaming, exactly mergeable drift metrics between a reference model and another.

:class:`DriftMetric` accumulates, batch after batch of logits, everything ``kldiv compare`` and
``kldiv eval`` report: KL(reference || other) and its reverse and Jensen-Shannon divergence (mean,
standard error, min, max, quantiles), the share of tokens whose top-1 token is the same, the
top-k overlap of the two distributions, and, when the actual next tokens are given, delta p,
both perplexities and the answer flips (correct-to-wrong, wrong-to-correct).

Every sum is exact (:mod:`kldiv.eval._exact`): ``merge`` is bit for bit one pass over the
concatenated data, whatever the batch or process split. Quantiles are exact while at most
``max_exact`` values are kept, then come from a mergeable sketch of relative accuracy ``alpha``.

:func:`batch_kl` is the plain per-batch metric for training loops.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ._exact import CrossSum, Moments, QuantileStore, _to_float

DIVERGENCES = ("kl", "reverse_kl", "js")
TOPK = (5, 10)
MAX_EXACT = 1 << 20  # per-token values kept for exact quantiles (8 bytes each per quantity)


def _to_numpy(x, name):
    """NumPy view of a NumPy / torch / JAX array (torch tensors are moved to the CPU; half
    precision becomes float32)."""
    if x is None:
        return None
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch
        t = x.detach()
        if t.is_floating_point() and t.dtype.itemsize < 4:
            t = t.float()
        return t.cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind == "V" or str(a.dtype) == "bfloat16":  # ml_dtypes bfloat16 from JAX
        a = a.astype(np.float32)
    return a


def _on_device(x) -> bool:
    """A torch tensor on an accelerator (not the CPU)."""
    dev = getattr(x, "device", None)
    return hasattr(x, "detach") and dev is not None and getattr(dev, "type", "cpu") != "cpu"


def row_values(reference_logits, other_logits, tokens=None, mask=None, *, topk=TOPK, threads=None,
               names=("reference_logits", "other_logits"), ref_top=None, _device_path=None) -> dict:
    """Per-row quantities of two logits arrays of shape (..., V), rows flattened (masked rows dropped).

    Returns a dict of 1-d NumPy arrays: ``kl`` = KL(p || q), ``reverse_kl`` = KL(q || p), ``js``
    (nats, beta 1/2), ``top_ref``/``top_other`` (first argmax), ``logz_ref`` =
    log sum exp(a - max a) (the reference's top-1 probability is exp(-logz_ref)),
    ``top{k}_overlap`` = |top_k(p) ∩
    top_k(q)| / k (k capped at V; ties in the k-th place broken arbitrarily), and with tokens
    ``token``, ``lp_ref``/``lp_other`` (log-probabilities of the token). ``ref_top``: the
    reference's :func:`top_indices` for the largest k, when already known (several candidates
    against one reference batch; rows after masking).

    NumPy, JAX and CPU torch inputs go through the compiled row kernel of ``kldiv compare``;
    torch tensors on an accelerator stay there (kldiv's core ``kl_div``/``js_div`` per row, torch's
    ``topk``), and only the per-row values come back to the host.
    """
    from ..compare import kernel as K

    topk = _check_ks("topk", topk) if topk else ()
    if _device_path or (_device_path is None and (_on_device(reference_logits) or _on_device(other_logits))):
        return _row_values_torch(reference_logits, other_logits, tokens, mask, topk, names)
    a = _to_numpy(reference_logits, names[0])
    b = _to_numpy(other_logits, names[1])
    for x, nm in ((a, names[0]), (b, names[1])):
        if x.ndim < 1 or not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{nm}: expected a floating-point array of logits (..., vocab), got "
                            f"dtype {x.dtype} and shape {x.shape}")
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")
    v = a.shape[-1]
    if v < 1:
        raise ValueError(f"{names[0]}: empty vocabulary axis (shape {a.shape})")
    lead = a.shape[:-1]
    a = a.reshape(-1, v)
    b = b.reshape(-1, v)
    tok = None
    if tokens is not None:
        t = _to_numpy(tokens, "tokens")
        if not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"tokens: expected integer token ids, got dtype {t.dtype}")
        if t.shape != lead:
            raise ValueError(f"tokens: shape {t.shape} does not match the logits' leading shape {lead}")
        tok = t.reshape(-1)
        bad = (tok < 0) | (tok >= v)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"tokens: id {int(tok[i])} at row {i} is outside the vocabulary [0, {v})")
    rows = None
    if mask is not None:
        m = _to_numpy(mask, "mask")
        if m.dtype != bool:
            raise TypeError(f"mask: expected a boolean array, got dtype {m.dtype}")
        if m.shape != lead:
            raise ValueError(f"mask: shape {m.shape} does not match the logits' leading shape {lead}")
        rows = np.flatnonzero(m.reshape(-1))
        a, b = a[rows], b[rows]
        tok = None if tok is None else tok[rows]
    r = K.row_stats(a, b, tokens=tok, reverse=True, js=True, threads=threads)
    bad = np.flatnonzero(r.status)
    if bad.size:
        i = int(bad[0])
        code = int(r.status[i])
        row = i if rows is None else int(rows[i])
        for bit, side, what in ((K.NAN_REF, 0, "NaN"), (K.PINF_REF, 0, "+inf"), (K.EMPTY_REF, 0, "no finite"),
                                (K.NAN_OTHER, 1, "NaN"), (K.PINF_OTHER, 1, "+inf"),
                                (K.EMPTY_OTHER, 1, "no finite")):
            if code & bit:
                raise ValueError(f"{names[side]}: row {row} has {what} logits")
        raise ValueError(f"row {row}: invalid input (status {code})")
    out = {"kl": r.kl, "reverse_kl": r.rkl, "js": r.js,
           "top_ref": r.top_ref.astype(np.int64), "top_other": r.top_other.astype(np.int64),
           "logz_ref": r.logz_ref}
    if tok is not None:
        out["token"] = tok.astype(np.int64)
        out["lp_ref"] = r.lp_ref_tok
        out["lp_other"] = r.lp_other_tok
    if topk:
        out.update(topk_overlap(a, b, topk, ref_top=ref_top))
    return out


def _row_values_torch(a, b, tokens, mask, topk, names) -> dict:
    """:func:`row_values` on torch tensors, computed where they are (GPU): the same quantities."""
    import torch

    from .. import js_div, kl_div

    dev = a.device if hasattr(a, "device") else b.device
    a = torch.as_tensor(a, device=dev).detach()
    b = torch.as_tensor(b, device=dev).detach()
    for x, nm in ((a, names[0]), (b, names[1])):
        if not x.is_floating_point():
            raise TypeError(f"{nm}: expected a floating-point array of logits (..., vocab), got dtype {x.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    v = a.shape[-1]
    lead = tuple(a.shape[:-1])
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    if b.dtype not in (torch.float32, torch.float64):
        b = b.float()
    a = a.reshape(-1, v)
    b = b.reshape(-1, v)
    tok = None
    if tokens is not None:
        t = torch.as_tensor(tokens, device=dev)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"tokens: expected integer token ids, got dtype {t.dtype}")
        if tuple(t.shape) != lead:
            raise ValueError(f"tokens: shape {tuple(t.shape)} does not match the logits' leading shape {lead}")
        tok = t.reshape(-1).long()
        bad = (tok < 0) | (tok >= v)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"tokens: id {int(tok[i])} at row {i} is outside the vocabulary [0, {v})")
    rows = None
    if mask is not None:
        m = torch.as_tensor(mask, device=dev)
        if m.dtype != torch.bool:
            raise TypeError(f"mask: expected a boolean array, got dtype {m.dtype}")
        if tuple(m.shape) != lead:
            raise ValueError(f"mask: shape {tuple(m.shape)} does not match the logits' leading shape {lead}")
        rows = m.reshape(-1).nonzero()[:, 0]
        a, b = a[rows], b[rows]
        tok = None if tok is None else tok[rows]
    # the row checks of the compiled kernel, as one host synchronisation
    flags = torch.stack([torch.isnan(a).any(1), (a == torch.inf).any(1), (a == -torch.inf).all(1),
                         torch.isnan(b).any(1), (b == torch.inf).any(1), (b == -torch.inf).all(1)])
    if bool(flags.any()):
        f = flags.cpu().numpy()
        i = int(np.flatnonzero(f.any(0))[0])
        j = int(np.flatnonzero(f[:, i])[0])
        row = i if rows is None else int(rows[i])
        what = ("NaN", "+inf", "no finite")[j % 3]
        raise ValueError(f"{names[j // 3]}: row {row} has {what} logits")
    kw = {"p_space": "logits", "q_space": "logits"}
    out = {"kl": kl_div(a, b, **kw), "reverse_kl": kl_div(b, a, **kw), "js": js_div(a, b, **kw),
           "top_ref": a.argmax(1), "top_other": b.argmax(1),
           "logz_ref": torch.logsumexp(a - a.max(1, keepdim=True).values, 1)}
    if tok is not None:
        r = torch.arange(a.shape[0], device=dev)
        out["token"] = tok
        out["lp_ref"] = a[r, tok].double() - torch.logsumexp(a, 1).double()
        out["lp_other"] = b[r, tok].double() - torch.logsumexp(b, 1).double()
    if topk and a.shape[0]:
        kmax = max(min(int(k), v) for k in topk)
        ia = torch.topk(a, kmax, dim=1).indices
        ib = torch.topk(b, kmax, dim=1).indices
        for k in topk:
            ke = min(int(k), v)
            hit = (ia[:, :ke, None] == ib[:, None, :ke]).any(2).sum(1)
            out[f"top{k}_overlap"] = hit.double() / ke
    elif topk:
        out.update({f"top{k}_overlap": torch.zeros(0, dtype=torch.float64) for k in topk})
    res = {}
    for key, val in out.items():
        x = val.detach().cpu().numpy()
        res[key] = x.astype(np.int64) if key in ("top_ref", "top_other", "token") else x.astype(np.float64)
    return res


def _check_ks(name: str, ks) -> tuple:
    """``ks`` as a tuple of ints; each must be an integer >= 1 (ValueError naming ``name``)."""
    try:
        ks = tuple(ks)
    except TypeError:
        raise ValueError(f"{name}: expected a sequence of integers >= 1, got {ks!r}") from None
    for k in ks:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name}: every k must be an integer >= 1, got {k!r} in {ks!r}")
    return tuple(int(k) for k in ks)


def topk_overlap(a, b, ks=TOPK, *, ref_top=None) -> dict:
    """``{"top{k}_overlap": |top_k(a) ∩ top_k(b)| / k per row}`` for (rows, V) logits
    (``ref_top``: ``top_indices(a, max k)`` if already computed). Every k must be an integer
    >= 1 (ValueError naming ``ks``); k beyond V counts the whole row."""
    ks = _check_ks("ks", ks)
    n, v = a.shape
    if n == 0:
        return {f"top{k}_overlap": np.zeros(0) for k in ks}
    kmax = max(min(int(k), v) for k in ks)
    ia = top_indices(a, kmax) if ref_top is None else np.asarray(ref_top)[:, :kmax]
    if ia.shape != (n, kmax):
        raise ValueError(f"ref_top: expected shape {(n, kmax)}, got {ia.shape}")
    ib = top_indices(b, kmax)
    out = {}
    for k in ks:
        ke = min(int(k), v)
        hit = (ia[:, :ke, None] == ib[:, None, :ke]).any(axis=2).sum(axis=1)
        out[f"top{k}_overlap"] = hit / ke
    return out


_GROUP = 32  # entries per group of top_indices


def top_indices(x, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest entries of each row, largest first, (rows, k).

    Ties at the k-th place are broken arbitrarily (any valid top-k set). Each row is cut into
    ``nb = V // 32`` groups of 32 strided entries (group j: columns j, j + nb, j + 2 nb, ...),
    whose maxima are one elementwise maximum over 32 contiguous slices of the row (a single
    vectorised pass). The k largest entries lie in the k groups with the largest maxima (an
    entry outside them is at most the smallest of those k maxima, k entries of the chosen
    groups), so only those 32 k entries (and the V mod 32 left-over columns) are searched.

    >>> top_indices(np.array([[0.1, 3.0, -1.0, 2.0]]), 2).tolist()
    [[1, 3]]
    """
    x = np.asarray(x)
    n, v = x.shape
    k = min(int(k), v)
    nb = v // _GROUP
    if nb <= k or k * _GROUP * 4 > v:  # small rows: partition them directly
        idx = np.argpartition(-x, k - 1, axis=1)[:, :k] if k < v else np.tile(np.arange(v), (n, 1))
    else:
        s0, s1 = x.strides
        groups = np.lib.stride_tricks.as_strided(x, shape=(n, _GROUP, nb), strides=(s0, nb * s1, s1),
                                                 writeable=False)
        gmax = groups.max(axis=1)                                            # (n, nb)
        best = np.argpartition(gmax, nb - k, axis=1)[:, nb - k:]             # (n, k) group ids
        cols = (best[:, :, None] + nb * np.arange(_GROUP)).reshape(n, k * _GROUP)
        if v > nb * _GROUP:  # the left-over columns belong to no group: always candidates
            cols = np.concatenate([cols, np.broadcast_to(np.arange(nb * _GROUP, v), (n, v - nb * _GROUP))],
                                  axis=1)
        cand = _take_rows(x, cols)
        m = cols.shape[1]
        sel = np.argpartition(cand, m - k, axis=1)[:, m - k:]
        idx = np.take_along_axis(cols, sel, axis=1)
    vals = _take_rows(x, idx)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def _take_rows(x, cols):
    """``x[r, cols[r, j]]`` for every r, j (a flat take: cheaper than take_along_axis)."""
    n = x.shape[0]
    if x.flags.c_contiguous:
        flat = (np.arange(n, dtype=np.intp) * x.shape[1])[:, None] + cols
        return np.take(x.reshape(-1), flat)
    return np.take_along_axis(x, cols, axis=1)


class DriftMetric:
    """How far another model's next-token distributions drift from a reference's, streamed.

    .. math::

        \\overline{\\mathrm{KL}} = \\frac1n \\sum_t \\sum_i p_{t,i} \\log\\frac{p_{t,i}}{q_{t,i}},
        \\qquad \\text{error} = \\sqrt{\\frac{\\mathrm{var}}{n-1}}

    with p = softmax(reference logits), q = softmax(other logits), t over the tokens (rows) seen.

    ``update(reference_logits, other_logits, tokens=None, mask=None)`` takes NumPy, torch or JAX
    arrays of shape (..., V) (``tokens``: the actual next token ids, shape (...); ``mask``: bool,
    shape (...), True = count the row). ``compute()`` returns a dict with the layout of
    :meth:`kldiv.compare.Report.summary` plus ``flips`` and ``topk_overlap``; ``merge(other)``
    adds another metric's data (exactly); ``reset()``; ``state_dict()``/``from_state_dict()``
    give a JSON-serialisable state; ``sync()`` merges over ``torch.distributed``.

    Edge cases: q = 0 where p > 0 gives KL = +inf (the mean is then inf, never hidden); NaN or
    +inf logits, or a row without a finite logit, raise ValueError naming the argument and row.
    Means, errors, shares are exact functions of the per-token float64 values (independent of
    batching); quantiles are exact up to ``max_exact`` tokens, then within relative ``alpha``.

    >>> import numpy as np
    >>> ref = np.log([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    >>> oth = np.log([[0.25, 0.75], [0.9, 0.1], [0.3, 0.7]])
    >>> m = DriftMetric(topk=(1,))
    >>> m.update(ref[:2], oth[:2], tokens=[0, 0]); m.update(ref[2:], oth[2:], tokens=[1])
    >>> s = m.compute()
    >>> round(s["kl"]["mean"], 6), s["same_top"]["share"]   # (0.143841 + 0 + 0.025732) / 3
    (0.056524, 0.6666666666666666)
    >>> s["flips"]["correct_to_wrong"]["share"]             # row 0: reference right, other wrong
    0.3333333333333333
    """

    def __init__(self, *, topk=TOPK, max_exact: int = MAX_EXACT, alpha: float = 1e-3,
                 threads=None):
        self.topk = _check_ks("topk", topk)
        self.max_exact = int(max_exact)
        self.alpha = float(alpha)
        self.threads = threads
        QuantileStore(self.max_exact, self.alpha)  # validates max_exact and alpha
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.n_tok = 0
        self.counts = {"same_top": 0, "ref_correct": 0, "other_correct": 0,
                       "correct_to_wrong": 0, "wrong_to_correct": 0}
        self.mom = {k: Moments() for k in (*DIVERGENCES, "delta_p", "delta_p_sq", "nll_ref", "nll_other",
                                           *(f"top{k}_overlap" for k in self.topk))}
        self.nll_cross = CrossSum()
        self.q = {k: QuantileStore(self.max_exact, self.alpha) for k in (*DIVERGENCES, "delta_p")}

    # -- updates ------------------------------------------------------------------------------
    def update(self, reference_logits, other_logits, tokens=None, mask=None) -> None:
        """Add a batch of logits (..., V); ``tokens`` and ``mask`` of shape (...)."""
        self.update_values(row_values(reference_logits, other_logits, tokens, mask, topk=self.topk,
                                      threads=self.threads))

    def update_values(self, vals: dict) -> None:
        """Add per-row values as :func:`row_values` returns them."""
        n = int(vals["kl"].size)
        if n == 0:
            return
        self.n += n
        for k in DIVERGENCES:
            self.mom[k].add(vals[k])
            self.q[k].add(vals[k])
        for k in self.topk:
            self.mom[f"top{k}_overlap"].add(vals[f"top{k}_overlap"])
        same = vals["top_ref"] == vals["top_other"]
        self.counts["same_top"] += int(same.sum())
        if "token" in vals:
            self.n_tok += n
            la, lb = np.asarray(vals["lp_ref"], np.float64), np.asarray(vals["lp_other"], np.float64)
            dp = np.exp(lb) - np.exp(la)
            self.mom["delta_p"].add(dp)
            self.mom["delta_p_sq"].add(dp * dp)
            self.q["delta_p"].add(dp)
            self.mom["nll_ref"].add(-la)
            self.mom["nll_other"].add(-lb)
            self.nll_cross.add(-la, -lb)
            rc = vals["top_ref"] == vals["token"]
            oc = vals["top_other"] == vals["token"]
            self.counts["ref_correct"] += int(rc.sum())
            self.counts["other_correct"] += int(oc.sum())
            self.counts["correct_to_wrong"] += int((rc & ~oc).sum())
            self.counts["wrong_to_correct"] += int((~rc & oc).sum())

    # -- merging ------------------------------------------------------------------------------
    def merge(self, other: "DriftMetric") -> "DriftMetric":
        """Add ``other``'s data to this metric (in place; returns self). Exact: the result equals
        one metric updated with both metrics' data."""
        if not isinstance(other, DriftMetric):
            raise TypeError(f"merge: expected a DriftMetric, got {type(other).__name__}")
        if (other.topk, other.max_exact, other.alpha) != (self.topk, self.max_exact, self.alpha):
            raise ValueError("merge: metrics with different topk / max_exact / alpha")
        self.n += other.n
        self.n_tok += other.n_tok
        for k in self.counts:
            self.counts[k] += other.counts[k]
        for k in self.mom:
            self.mom[k].merge(other.mom[k])
        self.nll_cross.merge(other.nll_cross)
        for k in self.q:
            self.q[k].merge(other.q[k])
        return self

    def sync(self, group=None) -> "DriftMetric":
        """Merge the metrics of all ranks of ``torch.distributed`` (every rank gets the total).

        Ranks are merged in rank order; since the merge is exact, the result equals one metric
        updated with every rank's data.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync: torch.distributed is not initialised")
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.state_dict(), group=group)
        total = DriftMetric.from_state_dict(states[0])
        for st in states[1:]:
            total.merge(DriftMetric.from_state_dict(st))
        threads = self.threads
        self.__dict__.update(total.__dict__)
        self.threads = threads
        return self

    def state_dict(self) -> dict:
        """A JSON-serialisable state (exact sums as hexadecimal integers)."""
        return {
            "version": 1, "topk": list(self.topk), "max_exact": self.max_exact, "alpha": self.alpha,
            "n": self.n, "n_tok": self.n_tok, "counts": dict(self.counts),
            "moments": {k: m.state() for k, m in self.mom.items()},
            "nll_cross": self.nll_cross.s.state(),
            "quantiles": {k: q.state() for k, q in self.q.items()},
        }

    @classmethod
    def from_state_dict(cls, st: dict) -> "DriftMetric":
        from ._exact import ExactSum

        m = cls(topk=st["topk"], max_exact=st["max_exact"], alpha=st["alpha"])
        m.n, m.n_tok = int(st["n"]), int(st["n_tok"])
        m.counts = {k: int(v) for k, v in st["counts"].items()}
        m.mom = {k: Moments.from_state(v) for k, v in st["moments"].items()}
        m.nll_cross.s = ExactSum.from_state(st["nll_cross"])
        m.q = {k: QuantileStore.from_state(v) for k, v in st["quantiles"].items()}
        return m

    # -- results ------------------------------------------------------------------------------
    def _dist(self, key, fractions) -> dict:
        mom, q = self.mom[key], self.q[key]
        m, e = mom.mean_and_error()
        lo = mom.lo if mom.n else math.nan
        hi = mom.hi if mom.n else math.nan
        qs = q.quantiles(fractions, lo, hi)
        med = q.quantiles((0.5,), lo, hi)["50.0%"]
        return {"mean": m, "mean_err": e, "max": hi, "min": lo, "median": med, "quantiles": qs,
                "quantiles_exact": q.exact}

    def compute(self) -> dict:
        """All statistics as a dict (see the class docstring); nan where undefined."""
        from ..compare import stats as S

        out = {"n_tokens": self.n}
        for k in DIVERGENCES:
            out[k] = self._dist(k, S.KL_QUANTILES)
        out["same_top"] = _share(self.counts["same_top"], self.n)
        out["topk_overlap"] = {str(k): dict(zip(("mean", "mean_err"), self.mom[f"top{k}_overlap"].mean_and_error()))
                               for k in self.topk}
        flips = {"top1_changed": _share(self.n - self.counts["same_top"], self.n)}
        if self.n_tok:
            dp = self._dist("delta_p", S.DP_QUANTILES)
            m2, e2 = self.mom["delta_p_sq"].mean_and_error()
            rms = math.sqrt(m2) if m2 == m2 else math.nan
            dp["rms"], dp["rms_err"] = rms, (0.5 / rms * e2 if rms > 0 else math.nan)
            out["delta_p"] = dp
            out["perplexity"] = self._perplexity()
            for k in ("correct_to_wrong", "wrong_to_correct"):
                flips[k] = _share(self.counts[k], self.n_tok)
            flips["top1_accuracy_ref"] = _share(self.counts["ref_correct"], self.n_tok)
            flips["top1_accuracy_other"] = _share(self.counts["other_correct"], self.n_tok)
        out["flips"] = flips
        return out

    def _perplexity(self) -> dict:
        a, b = self.mom["nll_other"], self.mom["nll_ref"]
        n = a.n
        ma, ea = a.mean_and_error()
        mb, eb = b.mean_and_error()
        cov = math.nan
        if n > 1 and a.s1.special() is None and b.s1.special() is None and self.nll_cross.s.special() is None:
            sab = self.nll_cross.s.fraction()
            cov = _to_float((n * sab - a.s1.fraction() * b.s1.fraction()) / (Fraction(n) ** 2 * (n - 1)))
        ratio_err = math.sqrt(max(ea * ea + eb * eb - 2 * cov, 0.0)) if n > 1 and cov == cov else math.nan
        po, pr = _exp(ma), _exp(mb)
        lr = ma - mb if math.isfinite(ma) and math.isfinite(mb) else math.nan
        ratio = _exp(lr) if lr == lr else math.nan
        with np.errstate(over="ignore", invalid="ignore"):
            diff_err = (math.sqrt(max((po * ea) ** 2 + (pr * eb) ** 2 - 2 * po * pr * cov, 0.0))
                        if n > 1 and math.isfinite(po * pr * cov) else math.nan)
        return {
            "ppl_other": po, "ppl_other_err": po * ea,
            "ppl_ref": pr, "ppl_ref_err": pr * eb,
            "ln_ppl_ratio": ma - mb, "ln_ppl_ratio_err": ratio_err,
            "ppl_ratio": ratio, "ppl_ratio_err": ratio * ratio_err if n > 1 else math.nan,
            "ppl_diff": po - pr, "ppl_diff_err": diff_err,
            "correlation": cov / (ea * eb) if n > 1 and ea > 0 and eb > 0 else math.nan,
        }

    def __repr__(self) -> str:
        m, e = self.mom["kl"].mean_and_error()
        return f"<DriftMetric {self.n} tokens, mean KL {m:.6g} ± {e:.2g} nats>"


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _share(k: int, n: int) -> dict:
    """Share k/n and its binomial error sqrt(s (1 - s) / (n - 1)), as llama.cpp."""
    if n == 0:
        return {"share": math.nan, "share_err": math.nan, "count": 0}
    s = k / n
    return {"share": s, "share_err": math.sqrt(s * (1 - s) / (n - 1)) if n > 1 else math.nan, "count": k}


def batch_kl(reference_logits, other_logits, *, mask=None, direction="forward"):
    """Mean per-token KL over a batch of logits (..., V), for training loops.

    ``direction``: "forward" = KL(p_ref || q), "reverse" = KL(q || p_ref), "both" = a pair
    (forward, reverse). Masked-out rows (``mask`` False, broadcastable to the row shape) are
    left out of the mean and out of the checks, as in ``kldiv.kl_div(mask=...)``: padding rows
    may hold anything (nan, all -inf). The mean divides by the number of rows counted; nan if
    none (on torch and JAX with gradient 0). Works on NumPy, torch and JAX arrays
    (differentiable on torch and JAX), with kldiv's accurate core.

    >>> import numpy as np
    >>> ref = np.log([[0.5, 0.5], [0.9, 0.1]]); oth = np.log([[0.25, 0.75], [0.9, 0.1]])
    >>> float(batch_kl(ref, oth)), float(batch_kl(ref, oth, mask=np.array([True, False])))
    (0.0719205181129..., 0.1438410362258...)
    """
    from .. import kl_div

    if direction not in ("forward", "reverse", "both"):
        raise ValueError(f"direction must be 'forward', 'reverse' or 'both', got {direction!r}")

    def one(p, q):
        if mask is None:
            return kl_div(p, q, p_space="logits", q_space="logits").mean()
        # the mask goes to kl_div: masked-out rows (padding: nan, all -inf) are neither checked
        # nor differentiated, and come back as 0
        if hasattr(p, "detach"):  # torch
            import torch as xp

            m = xp.as_tensor(mask, device=p.device, dtype=xp.bool)
        elif isinstance(p, (np.ndarray, np.generic)):
            xp = np
            m = np.asarray(mask, dtype=bool)
        else:
            import jax.numpy as xp  # JAX

            m = xp.asarray(mask, dtype=bool)
        d = kl_div(p, q, p_space="logits", q_space="logits", mask=m)
        count = xp.broadcast_to(m, tuple(d.shape)).sum()
        total = d.sum()
        if xp is np:
            return total / count if count > 0 else np.float64(math.nan).astype(d.dtype)
        nan = xp.full_like(total, math.nan)
        # nan when no row counts (a value, with gradient 0: no 0/0 in the backward pass)
        return xp.where(count > 0, total / xp.where(count > 0, count, 1), nan)

    if direction == "forward":
        return one(reference_logits, other_logits)
    if direction == "reverse":
        return one(other_logits, reference_logits)
    return one(reference_logits, other_logits), one(other_logits, reference_logits)
