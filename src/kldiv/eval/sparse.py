r"""A sparse teacher cache (``kldiv cache``) as the reference of ``kldiv compare`` and ``kldiv eval``.

A cache keeps, per position, the reference's K most likely tokens S with their log-probabilities
``a_k``, the log of its tail mass ``r = 1 - sum_k p_k``, and optionally M tail tokens drawn from
``p_i / r`` with weights ``r / M`` (:mod:`kldiv.cache`). It does not say how ``r`` spreads over
the V - K other tokens: any tail with ``p_i <= min_k p_k`` and total ``r`` is compatible with it.
Against a dense candidate (q = softmax(candidate logits / T), T the cache's temperature) this
module reports what the cache determines:

* **certified bounds** of KL(reference || candidate) per token, ``lower_t <= KL_t <= upper_t``
  (:func:`kldiv.cache.kl_bounds`): lower = the top-K + tail-bucket KL (log-sum inequality),
  upper = the tail's mass placed on the candidate's least likely tail tokens, each at most the
  K-th probability (the exact maximum over compatible tails). The mean, minimum, maximum and every
  quantile of the true per-token KL lie between those of the two bounds (order statistics are
  monotone in each value), so each is printed as an interval;
* with M > 0, the **sampled-tail estimate** (arXiv 2503.16870): unbiased for each token's KL,
  its mean with a standard error that includes the sampling noise;
* exactly: the same-top share and top-1 changes (the reference's top-1 is its first cached
  token), the top-k overlap for k <= K, and with the next tokens the answer flips
  (correct-to-wrong, wrong-to-correct), both models' top-1 accuracy, the candidate's
  perplexity and the share of next tokens inside the reference's top-K.

Not computable from a top-K cache, so never printed (the table says why): the reference's
perplexity, ``ln(PPL(other)/PPL(ref))``, delta p and RMS delta p (they need the reference's
probability of each next token; outside the top-K the cache only bounds it), the reverse KL and
the Jensen-Shannon divergence (they need the reference's probability of every tail token the
candidate gives mass to; the reverse KL is unbounded above over compatible tails), and the exact
KL quantiles (bracketed only).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from .._atomic import write_text_atomic
from ._exact import Moments, QuantileStore
from .metrics import MAX_EXACT, TOPK, _share, top_indices

HEADER = "cache.json"
_SUB_ROWS = 64  # rows per float64 block of the bounds (bounded memory at large V)

NOT_COMPUTABLE = {
    "ppl_ref": "PPL(ref), ln(PPL(other)/PPL(ref)), Δp and RMS Δp need the reference's probability "
               "of every next token; outside the top-K the cache only bounds it (at most the K-th "
               "probability)",
    "reverse_kl": "reverse KL(other || ref) and Jensen-Shannon need the reference's probability of "
                  "every tail token the candidate gives mass to; compatible tails leave it anywhere "
                  "in [0, K-th probability] (the reverse KL is unbounded above)",
    "kl_exact": "the exact KL and its quantiles need the reference's tail; each is bracketed by the "
                "certified bounds",
}


def is_cache_dir(path) -> bool:
    """True for a directory with a ``cache.json`` (a ``kldiv cache`` output, maybe damaged)."""
    try:
        p = os.fspath(path)
    except TypeError:
        return False
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, HEADER))


class CacheReference:
    """A teacher cache read chunk by chunk, every problem reported as one line naming the path."""

    kind = "cache"

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{self.path}: no such teacher cache directory")
        if not os.path.isfile(os.path.join(self.path, HEADER)):
            raise ValueError(f"{self.path}: a directory without {HEADER}: not a kldiv teacher cache "
                             f"(written by `kldiv cache`) nor a logits file")
        try:
            from ..cache.reader import TeacherCache
        except ImportError as exc:
            raise ValueError(f"{self.path}: reading a teacher cache needs torch and safetensors "
                             f"({exc})") from None
        try:
            self.cache = TeacherCache(self.path)
            h = self.cache.header
            self.n_vocab = int(h["vocab_size"])
            self.ctx, self.n_chunks = int(self.cache.ctx), int(self.cache.n_chunks)
            self.top_k, self.tail_samples = int(self.cache.top_k), int(self.cache.tail_samples)
            self.temperature = h.get("temperature_applied")
            self.shards = list(h["shards"])
            self.has_ids = bool(h.get("has_input_ids"))
            if min(self.n_vocab, self.ctx, self.n_chunks, self.top_k) < 1 or self.tail_samples < 0:
                raise ValueError("sizes in the header out of range")
            if self.top_k > self.n_vocab:
                raise ValueError(f"top_k {self.top_k} exceeds the vocabulary {self.n_vocab}")
            if self.temperature is not None:
                self.temperature = float(self.temperature)
                if not (math.isfinite(self.temperature) and self.temperature > 0):
                    raise ValueError(f"temperature {self.temperature!r}")
        except (FileNotFoundError, ValueError) as exc:
            msg = str(exc)
            raise ValueError(msg if self.path in msg else f"{self.path}: {msg}") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{self.path}: damaged {HEADER} (missing or invalid field {exc})") from None
        self.name = self.path
        self.teacher = (h.get("teacher") or {}).get("name")
        self.tokenizer = h.get("tokenizer")
        self.forward_seconds = 0.0
        self.size = None
        self._ids = None

    def chunk(self, i) -> dict:
        """Chunk ``i`` as NumPy arrays (float64 values), checked against the header's shapes."""
        try:
            d = self.cache[i]
        except Exception as exc:  # safetensors errors, damaged shards: one line naming the shard
            shard = self.shards[i // self.cache.per_shard] if self.shards else "?"
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{os.path.join(self.path, shard)}: unreadable shard ({msg})") from None
        out = {}
        want = {"topk_ids": (self.ctx, self.top_k), "topk_logprobs": (self.ctx, self.top_k),
                "tail_logmass": (self.ctx,), "tail_ids": (self.ctx, self.tail_samples),
                "tail_logprobs": (self.ctx, self.tail_samples),
                "tail_weights": (self.ctx, self.tail_samples)}
        shard = os.path.join(self.path, self.shards[i // self.cache.per_shard])
        for k, shape in want.items():
            if k not in d:
                raise ValueError(f"{shard}: no field {k!r}; not a kldiv teacher cache shard")
            x = d[k].numpy()
            if x.shape != shape:
                raise ValueError(f"{shard}: field {k!r} has shape {x.shape}, the header says {shape}")
            out[k] = x.astype(np.int64) if k.endswith("ids") else x.astype(np.float64)
        for k in ("topk_ids", "tail_ids"):
            if out[k].size and (out[k].min() < 0 or out[k].max() >= self.n_vocab):
                raise ValueError(f"{shard}: {k} outside the vocabulary [0, {self.n_vocab})")
        if "input_ids" in d:
            out["input_ids"] = d["input_ids"].numpy().astype(np.int64).reshape(-1)
        return out

    def input_ids(self) -> np.ndarray | None:
        """All chunks' input tokens, (n_chunks * ctx,), or None when the cache has none."""
        if not self.has_ids:
            return None
        if self._ids is None:
            parts = []
            for c in range(self.n_chunks):
                ids = self.chunk(c).get("input_ids")
                if ids is None or ids.shape != (self.ctx,):
                    raise ValueError(f"{self.path}: chunk {c} has no input_ids of length {self.ctx}")
                parts.append(ids)
            self._ids = np.concatenate(parts)
        return self._ids

    def describe(self) -> str:
        m = f" + {self.tail_samples} sampled tail tokens" if self.tail_samples else ""
        t = "" if self.temperature is None else f", temperature {self.temperature:g} applied"
        return f"kldiv teacher cache: top-{self.top_k} log-probs + tail mass{m} per position{t}"

    def close(self):
        self.cache = None


def check_tokenizer(cache: CacheReference, model_dir) -> None:
    """Refuse a candidate whose tokenizer differs from the one the cache records."""
    rec = cache.tokenizer
    if not rec or not rec.get("vocab_sha256") or not os.path.isdir(os.fspath(model_dir)):
        return
    from ..cache.writer import _tokenizer_identity

    ident = _tokenizer_identity(model_dir)
    if ident is None:
        return
    if ident.get("vocab_sha256") != rec["vocab_sha256"]:
        raise ValueError(f"{cache.path}: the cache was written with another tokenizer "
                         f"({rec.get('name_or_path')}) than {os.fspath(model_dir)}'s (the "
                         f"vocabularies differ)")


def _has_tokenizer(path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


def sparse_row_values(fields: dict, logits, tokens=None, *, temperature=None, topk=TOPK,
                      name="candidate") -> dict:
    """Per-row quantities of a cached reference and dense candidate logits (rows, V).

    Returns 1-d arrays: ``kl_lower``/``kl_upper`` (certified bounds of KL(reference || candidate)),
    ``kl_sampled`` (the unbiased sampled-tail estimate; only when the cache has tail samples),
    ``top_ref``/``top_other``, ``top{k}_overlap`` for k <= K, and with ``tokens`` (-1 = unknown)
    ``token``, ``lp_other`` (the candidate's log-probability at temperature 1) and ``in_topk``.
    """
    import torch

    from ..cache.bounds import kl_bounds
    from ..cache.estimators import sampled_kl

    z = np.asarray(logits)
    if z.ndim != 2 or not np.issubdtype(z.dtype, np.floating):
        raise TypeError(f"{name}: expected a floating-point (rows, vocab) array, got {z.dtype} {z.shape}")
    n, v = z.shape
    ids = fields["topk_ids"]
    K = ids.shape[1]
    if ids.shape[0] != n:
        raise ValueError(f"{name}: {n} rows against {ids.shape[0]} cached positions")
    bad = np.isnan(z).any(1) | (z == np.inf).any(1) | (z == -np.inf).all(1)
    if bad.any():
        i = int(np.argmax(bad))
        what = "NaN" if np.isnan(z[i]).any() else "+inf" if (z[i] == np.inf).any() else "no finite"
        raise ValueError(f"{name}: row {i} has {what} logits")
    T = 1.0 if temperature is None else float(temperature)
    lo = np.empty(n)
    hi = np.empty(n)
    est = np.empty(n) if fields["tail_ids"].shape[1] else None
    lp_other = None
    tok = None
    if tokens is not None:
        tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
        lp_other = np.full(n, np.nan)
    for s in range(0, n, _SUB_ROWS):
        e = min(n, s + _SUB_ROWS)
        zt = torch.from_numpy(np.ascontiguousarray(z[s:e], dtype=np.float64))
        f = {k: torch.from_numpy(np.ascontiguousarray(fields[k][s:e])) for k in
             ("topk_ids", "topk_logprobs", "tail_logmass", "tail_ids", "tail_logprobs", "tail_weights")}
        a, b = kl_bounds(zt, f["topk_ids"], f["topk_logprobs"], temperature=T,
                         tail_logmass=f["tail_logmass"])
        lo[s:e], hi[s:e] = a.numpy(), b.numpy()
        if est is not None:
            est[s:e] = sampled_kl(zt, f, temperature=T, reduction="none").numpy()
        if tok is not None:
            t = tok[s:e]
            known = t >= 0
            if known.any():
                lq = torch.log_softmax(zt, -1).numpy()
                r = np.flatnonzero(known)
                lp_other[s + r] = lq[r, t[r]]
    out = {"kl_lower": lo, "kl_upper": hi, "top_ref": ids[:, 0].copy(), "top_other": z.argmax(1)}
    if est is not None:
        out["kl_sampled"] = est
    ks = [k for k in topk if k <= K]
    if ks and n:
        kmax = max(min(k, v) for k in ks)
        ib = top_indices(z, kmax)
        for k in ks:
            ke = min(int(k), v)
            hit = (ids[:, :ke, None] == ib[:, None, :ke]).any(axis=2).sum(axis=1)
            out[f"top{k}_overlap"] = hit / ke
    elif ks:
        out.update({f"top{k}_overlap": np.zeros(0) for k in ks})
    if tok is not None:
        out["token"] = tok
        out["lp_other"] = lp_other
        out["in_topk"] = (ids == tok[:, None]).any(1) & (tok >= 0)
    return out


class CacheDriftMetric:
    """Streaming statistics of a dense candidate against a cached sparse reference.

    ``update_values(vals)`` with :func:`sparse_row_values`' output; ``compute()`` gives the bounds'
    distributions, the sampled estimate's mean and error, shares, flips, overlaps and the
    candidate's perplexity; ``merge`` is exact (the sums of :mod:`kldiv.eval._exact`).
    """

    def __init__(self, *, top_k: int, topk=TOPK, max_exact: int = MAX_EXACT, alpha: float = 1e-3):
        self.top_k = int(top_k)
        self.topk = tuple(int(k) for k in topk if int(k) <= self.top_k)
        self.topk_dropped = tuple(int(k) for k in topk if int(k) > self.top_k)
        self.max_exact, self.alpha = int(max_exact), float(alpha)
        self.n = self.n_tok = 0
        self.counts = {k: 0 for k in ("same_top", "ref_correct", "other_correct", "correct_to_wrong",
                                      "wrong_to_correct", "in_topk")}
        self.mom = {k: Moments() for k in ("kl_lower", "kl_upper", "kl_sampled", "nll_other",
                                           *(f"top{k}_overlap" for k in self.topk))}
        self.q = {k: QuantileStore(self.max_exact, self.alpha) for k in ("kl_lower", "kl_upper")}
        self.sampled = False

    def update_values(self, vals: dict) -> None:
        n = int(vals["kl_lower"].size)
        if n == 0:
            return
        self.n += n
        for k in ("kl_lower", "kl_upper"):
            self.mom[k].add(vals[k])
            self.q[k].add(vals[k])
        if "kl_sampled" in vals:
            self.sampled = True
            self.mom["kl_sampled"].add(vals["kl_sampled"])
        for k in self.topk:
            self.mom[f"top{k}_overlap"].add(vals[f"top{k}_overlap"])
        self.counts["same_top"] += int((vals["top_ref"] == vals["top_other"]).sum())
        if "token" in vals:
            known = vals["token"] >= 0
            m = int(known.sum())
            if m:
                self.n_tok += m
                tok = vals["token"][known]
                rc = vals["top_ref"][known] == tok
                oc = vals["top_other"][known] == tok
                self.mom["nll_other"].add(-np.asarray(vals["lp_other"][known], np.float64))
                self.counts["ref_correct"] += int(rc.sum())
                self.counts["other_correct"] += int(oc.sum())
                self.counts["correct_to_wrong"] += int((rc & ~oc).sum())
                self.counts["wrong_to_correct"] += int((~rc & oc).sum())
                self.counts["in_topk"] += int(vals["in_topk"][known].sum())

    def merge(self, other: "CacheDriftMetric") -> "CacheDriftMetric":
        if (other.top_k, other.topk, other.max_exact, other.alpha) != (self.top_k, self.topk,
                                                                       self.max_exact, self.alpha):
            raise ValueError("merge: metrics with different top_k / topk / max_exact / alpha")
        self.n += other.n
        self.n_tok += other.n_tok
        self.sampled |= other.sampled
        for k in self.counts:
            self.counts[k] += other.counts[k]
        for k in self.mom:
            self.mom[k].merge(other.mom[k])
        for k in self.q:
            self.q[k].merge(other.q[k])
        return self

    def compute(self) -> dict:
        from ..compare import stats as S

        out = {"n_tokens": self.n}
        for k in ("kl_lower", "kl_upper"):
            mom, q = self.mom[k], self.q[k]
            m, e = mom.mean_and_error()
            lo = mom.lo if mom.n else math.nan
            hi = mom.hi if mom.n else math.nan
            out[k] = {"mean": m, "mean_err": e, "max": hi, "min": lo,
                      "median": q.quantiles((0.5,), lo, hi)["50.0%"],
                      "quantiles": q.quantiles(S.KL_QUANTILES, lo, hi), "quantiles_exact": q.exact}
        if self.sampled:
            m, e = self.mom["kl_sampled"].mean_and_error()
            out["kl_sampled"] = {"mean": m, "mean_err": e}
        out["same_top"] = _share(self.counts["same_top"], self.n)
        out["topk_overlap"] = {str(k): dict(zip(("mean", "mean_err"),
                                                self.mom[f"top{k}_overlap"].mean_and_error()))
                               for k in self.topk}
        flips = {"top1_changed": _share(self.n - self.counts["same_top"], self.n)}
        if self.n_tok:
            for k in ("correct_to_wrong", "wrong_to_correct"):
                flips[k] = _share(self.counts[k], self.n_tok)
            flips["top1_accuracy_ref"] = _share(self.counts["ref_correct"], self.n_tok)
            flips["top1_accuracy_other"] = _share(self.counts["other_correct"], self.n_tok)
            m, e = self.mom["nll_other"].mean_and_error()
            po = math.exp(m) if m < 709 else math.inf
            out["perplexity"] = {"ppl_other": po, "ppl_other_err": po * e, "n_tokens": self.n_tok}
            out["next_token_in_ref_topk"] = _share(self.counts["in_topk"], self.n_tok)
        out["flips"] = flips
        return out


class CacheResult:
    """The statistics of one or more candidates against a cached reference: table, JSON."""

    def __init__(self, reference: CacheReference, names, metrics, settings, timing=None, sizes=None):
        self.reference = reference.path
        self.ref_info = {"format": "kldiv teacher cache", "top_k": reference.top_k,
                         "tail_samples": reference.tail_samples,
                         "temperature": reference.temperature, "n_vocab": reference.n_vocab,
                         "teacher": reference.teacher, "description": reference.describe()}
        self.names = [os.fspath(n) for n in names]
        self.metrics = metrics
        self.settings = dict(settings)
        self.timing = dict(timing or {})
        self.sizes = list(sizes or [None] * len(self.names))

    def summary(self) -> dict:
        cands = []
        for name, m, size in zip(self.names, self.metrics, self.sizes):
            c = {"name": name, **m.compute(), "size_bytes": size}
            if m.topk_dropped:
                c["topk_overlap_not_computable"] = list(m.topk_dropped)
            cands.append(c)
        return {"reference": self.reference, "reference_kind": "sparse teacher cache",
                "reference_info": self.ref_info, "settings": self.settings,
                "statistics": "certified bounds from a top-k cache", "timing": self.timing,
                "not_computable": dict(NOT_COMPUTABLE), "candidates": cands}

    def table(self) -> str:
        from .result import _g, _pct, _render, _short

        s = self.summary()
        cs = s["candidates"]
        st = s["settings"]
        K = self.ref_info["top_k"]
        names = [_short(c["name"]) for c in cs]
        window = st.get("window", "")
        lines = [f"reference:  {s['reference']}  ({self.ref_info['description']}, "
                 f"V = {self.ref_info['n_vocab']})",
                 f"tokens:     {cs[0]['n_tokens']} scored{window}",
                 "",
                 f"A top-{K} cache holds the reference's {K} largest probabilities and its tail mass, "
                 f"not how the tail spreads:",
                 "KL(ref || other) per token lies in certified bounds [lower, upper] (lower: top-K + "
                 "tail bucket, log-sum",
                 "inequality; upper: the tail's mass on the candidate's least likely tokens, each at most "
                 "the K-th probability);",
                 "the mean, quantiles, minimum and maximum of the true KL lie between those of the bounds."]
        if self.ref_info["temperature"] is not None:
            lines.append(f"The cache stores log_softmax(logits / {self.ref_info['temperature']:g}): the "
                         f"candidate's logits are divided by the same temperature for the KL.")
        lines.append("")
        body = [("", names)]

        def row(label, vals):
            body.append((label, vals))

        def pm(x, e, fmt):
            return f"{fmt(x)} ± {fmt(e)}"

        def iv(a, b, fmt=_g):
            return f"[{fmt(a)}, {fmt(b)}]"

        body.append("====== KL divergence: certified bounds ======")
        row("Mean    KLD lower bound", [pm(c["kl_lower"]["mean"], c["kl_lower"]["mean_err"], _g) for c in cs])
        row("Mean    KLD upper bound", [pm(c["kl_upper"]["mean"], c["kl_upper"]["mean_err"], _g) for c in cs])
        if "kl_sampled" in cs[0]:
            row(f"Mean    KLD sampled tail (M={self.ref_info['tail_samples']})",
                [pm(c["kl_sampled"]["mean"], c["kl_sampled"]["mean_err"], _g) for c in cs])
        row("Maximum KLD in", [iv(c["kl_lower"]["max"], c["kl_upper"]["max"]) for c in cs])
        for q in cs[0]["kl_lower"]["quantiles"]:
            label = "Median " if q == "50.0%" else f"{q:>6} "
            row(f"{label} KLD in", [iv(c["kl_lower"]["quantiles"][q], c["kl_upper"]["quantiles"][q]) for c in cs])
        row("Minimum KLD in", [iv(c["kl_lower"]["min"], c["kl_upper"]["min"]) for c in cs])
        body.append("====== Token probability statistics ======")
        if "perplexity" in cs[0]:
            row("Mean PPL(other)", [pm(c["perplexity"]["ppl_other"], c["perplexity"]["ppl_other_err"], _g)
                                    for c in cs])
            row(f"Next token in ref top-{K}", [pm(c["next_token_in_ref_topk"]["share"],
                                                  c["next_token_in_ref_topk"]["share_err"], _pct) for c in cs])
        row("Same top p", [pm(c["same_top"]["share"], c["same_top"]["share_err"], _pct) for c in cs])
        body.append("====== Flips and top-k overlap ======")
        row("Top-1 changed", [pm(c["flips"]["top1_changed"]["share"], c["flips"]["top1_changed"]["share_err"],
                                 _pct) for c in cs])
        if "correct_to_wrong" in cs[0]["flips"]:
            for k, label in (("correct_to_wrong", "Correct -> wrong"), ("wrong_to_correct", "Wrong -> correct")):
                row(label, [pm(c["flips"][k]["share"], c["flips"][k]["share_err"], _pct) for c in cs])
        for k in cs[0]["topk_overlap"]:
            row(f"Top-{k} overlap", [pm(c["topk_overlap"][k]["mean"], c["topk_overlap"][k]["mean_err"], _pct)
                                     for c in cs])
        if any(c.get("size_bytes") for c in cs):
            from .result import _size

            row("Size on disk", [_size(c["size_bytes"]) for c in cs])
        lines += _render(body, len(cs), 34)
        lines += ["", f"Not computable from a top-{K} cache (not printed):"]
        frac = ""
        if "next_token_in_ref_topk" in cs[0]:
            out = 1 - cs[0]["next_token_in_ref_topk"]["share"]
            frac = f"; here {100 * out:.1f} % of the next tokens lie outside the top-{K}"
        lines.append(f"- {NOT_COMPUTABLE['ppl_ref']}{frac};")
        lines.append(f"- {NOT_COMPUTABLE['reverse_kl']};")
        lines.append(f"- {NOT_COMPUTABLE['kl_exact']}.")
        if len(cs) > 1:
            lines.append("- the paired bootstrap between candidates: it resamples per-token KL values, "
                         "which the cache only bounds.")
        dropped = cs[0].get("topk_overlap_not_computable")
        if dropped:
            lines.append(f"- top-{', '.join(map(str, dropped))} overlap: k exceeds the cache's K = {K}.")
        if "perplexity" not in cs[0]:
            lines += ["", "(no token ids: flips against the next token and PPL(other) need the cache's "
                          "input_ids or --tokens FILE)"]
        return "\n".join(lines)

    def to_json(self, path) -> None:
        from ..compare.report import _jsonable

        write_text_atomic(path, json.dumps(_jsonable(self.summary()), indent=2, allow_nan=False) + "\n")

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        parts = []
        for name, m in zip(self.names, self.metrics):
            lo, hi = m.mom["kl_lower"].mean(), m.mom["kl_upper"].mean()
            parts.append(f"{os.path.basename(name.rstrip('/')) or name}: [{lo:.6g}, {hi:.6g}]")
        return f"<CacheResult vs cache {self.reference!r}, mean KL in " + "; ".join(parts) + ">"


def _next_tokens(ids: np.ndarray, n_rows: int) -> np.ndarray:
    """The next token of each flat position (the text continues across chunks); -1 for the last."""
    nxt = np.full(n_rows, -1, np.int64)
    m = min(n_rows - 1, ids.size - 1)
    if m > 0:
        nxt[:m] = ids[1:m + 1]
    return nxt


def compare_cache(cache, other, *, tokens=None, other_key=None, other_space="logits", topk=TOPK,
                  progress=None, max_exact=None, _names=None) -> CacheResult:
    """A dense logits file ``other`` (one row per cached position, in order) against a teacher cache.

    ``tokens``: the actual next token of each row (a path or an int array); default: the cache's
    ``input_ids`` shifted by one (the text continues across chunks; the last row has none).
    """
    from .._progress import progress_bar
    from ..io import load_tokens, open_logits

    names = _names or {}
    ref = cache if isinstance(cache, CacheReference) else CacheReference(cache)
    src = open_logits(other, key=other_key, side="other") if not hasattr(other, "read") else other
    try:
        n_pos = ref.n_chunks * ref.ctx
        if src.n_vocab != ref.n_vocab:
            raise ValueError(f"{src.name}: vocabulary of {src.n_vocab} entries, but the cache "
                             f"{ref.path} has {ref.n_vocab}")
        if src.n_rows != n_pos and src.n_rows // ref.ctx != ref.n_chunks:
            raise ValueError(f"{src.name}: {src.n_rows} rows, but the cache {ref.path} has {n_pos} "
                             f"positions ({ref.n_chunks} chunks of {ref.ctx}); need one row per position")
        if tokens is not None:
            nxt = (load_tokens(tokens, n_pos) if isinstance(tokens, (str, os.PathLike))
                   else np.asarray(tokens)).astype(np.int64).reshape(-1)
            if nxt.size != n_pos:
                raise ValueError(f"{names.get('tokens', 'tokens')}: {nxt.size} tokens for {n_pos} rows")
            if ((nxt < 0) | (nxt >= ref.n_vocab)).any():
                raise ValueError(f"{names.get('tokens', 'tokens')}: ids outside the vocabulary [0, {ref.n_vocab})")
        else:
            ids = ref.input_ids()
            nxt = None if ids is None else _next_tokens(ids, n_pos)
        kw = {} if max_exact is None else {"max_exact": max_exact}
        metric = CacheDriftMetric(top_k=ref.top_k, topk=topk, **kw)
        bar = progress_bar(progress, n_pos, desc="kldiv compare", unit="tok")
        try:
            for c in range(ref.n_chunks):
                f = ref.chunk(c)
                s, e = c * ref.ctx, (c + 1) * ref.ctx
                z = np.asarray(src.read(s, e), dtype=np.float32)
                if other_space == "probs":
                    with np.errstate(divide="ignore"):
                        z = np.log(z)
                vals = sparse_row_values(f, z, None if nxt is None else nxt[s:e],
                                         temperature=ref.temperature, topk=topk, name=src.name)
                if hasattr(src, "release"):
                    src.release(s, e)
                metric.update_values(vals)
                if bar is not None:
                    bar.update(e - s)
        finally:
            if bar is not None:
                bar.close()
        settings = {"rows": n_pos, "other_rows": int(src.n_rows), "ctx": ref.ctx, "chunks": ref.n_chunks,
                    "window": f" ({ref.n_chunks} chunks of {ref.ctx}, every cached position)",
                    "tokens": "given" if tokens is not None else ("cache input_ids" if nxt is not None else None)}
        return CacheResult(ref, [src.name], [metric], settings)
    finally:
        if src is not other:
            src.close()


def evaluate_cache(reference, candidates, *, tokens=None, text=None, ctx=None, chunks=None, batch=1,
                   dtype="float32", device=None, score="half", bos="auto", progress=None, topk=TOPK,
                   max_exact=None) -> CacheResult:
    """Run each candidate on a teacher cache's tokens and compare it with the cached reference.

    The candidates run on the cache's ``input_ids`` as they are (the teacher ran on them without
    a BOS per chunk), in chunks of the cache's ``ctx``, scored in llama.cpp's window
    (``score="half"``) or at every position but the last (``"all"``). ``tokens``/``text``, when
    given, must equal the cache's tokens (and are required when the cache has none).
    """
    import time

    from .._progress import progress_bar
    from ..io import load_tokens
    from .runner import HFModel, open_candidates, scored_positions, tokenize_text

    ref = reference if isinstance(reference, CacheReference) else CacheReference(reference)
    opened = []
    try:
        cands = open_candidates(candidates, opened, dtype=dtype, device=device)
        for m in cands:
            m.forward_seconds = 0.0
            if m.n_vocab != ref.n_vocab:
                raise ValueError(f"{ref.path}: the cache's vocabulary has {ref.n_vocab} entries, "
                                 f"{m.name} has {m.n_vocab}")
            if isinstance(m, HFModel):
                check_tokenizer(ref, m.name)
        if bos not in ("auto", None):
            raise ValueError(f"--bos {bos}: with a teacher cache as REFERENCE the chunks are the "
                             f"cache's input_ids as the teacher saw them (no BOS is put in)")
        if ctx is not None and int(ctx) != ref.ctx:
            raise ValueError(f"--ctx {ctx} differs from the cache {ref.path}'s ctx = {ref.ctx}")
        ctx = ref.ctx
        if ctx < 3:
            raise ValueError(f"{ref.path}: ctx = {ctx}; scoring needs chunks of 3 or more positions")
        ids = ref.input_ids()
        given = None
        if text is not None:  # the cache's own tokenizer when its directory is here, else a candidate's
            rec = (ref.tokenizer or {}).get("name_or_path")
            dirs = ([rec] if rec and _has_tokenizer(rec) else []) + [
                m.name for m in cands if isinstance(m, HFModel) and _has_tokenizer(m.name)]
            if not dirs:
                raise ValueError("--text needs the cache's tokenizer directory or a candidate with tokenizer "
                                 "files; give --tokens (or nothing: the cache holds its input_ids)")
            given, _ = tokenize_text(text, dirs[0])
        elif isinstance(tokens, (str, os.PathLike)):
            given = load_tokens(tokens).astype(np.int64)
        elif tokens is not None:
            given = np.asarray(tokens).reshape(-1).astype(np.int64)
        n_pos = ref.n_chunks * ref.ctx
        if ids is None:
            if given is None:
                raise ValueError(f"{ref.path}: the cache holds no input_ids; give the tokens it was "
                                 f"written from with --tokens FILE")
            if given.size < n_pos:
                raise ValueError(f"{given.size} tokens for the cache {ref.path}'s {n_pos} positions")
            ids = given[:n_pos]
        elif given is not None:
            n = min(given.size, n_pos)
            if n < n_pos or not np.array_equal(given[:n], ids[:n]):
                raise ValueError(f"the given tokens differ from the input_ids of the cache {ref.path}")
        if ids.size and (ids.min() < 0 or ids.max() >= ref.n_vocab):
            raise ValueError(f"{ref.path}: input_ids outside the vocabulary [0, {ref.n_vocab})")
        first, stop = scored_positions(ctx, score)
        per = stop - first
        n_chunks = ref.n_chunks if chunks is None else min(int(chunks), ref.n_chunks)
        kw = {} if max_exact is None else {"max_exact": max_exact}
        metrics = [CacheDriftMetric(top_k=ref.top_k, topk=topk, **kw) for _ in cands]
        bar = progress_bar(progress, n_chunks * ctx, desc="kldiv eval", unit="tok")
        t_cmp = 0.0
        t_start = time.perf_counter()
        try:
            for c0 in range(0, n_chunks, batch):
                c1 = min(n_chunks, c0 + batch)
                x = ids[c0 * ctx:c1 * ctx].reshape(c1 - c0, ctx)
                nxt = np.ascontiguousarray(x[:, first + 1:stop + 1]).reshape(-1)
                fs = [ref.chunk(c) for c in range(c0, c1)]
                f = {k: np.concatenate([d[k][first:stop] for d in fs]) for k in
                     ("topk_ids", "topk_logprobs", "tail_logmass", "tail_ids", "tail_logprobs", "tail_weights")}
                for i, cand in enumerate(cands):
                    b = cand.block(x, first, stop, c0)
                    if not isinstance(b, np.ndarray):
                        b = b.float().cpu().numpy()
                    t0 = time.perf_counter()
                    vals = sparse_row_values(f, b, nxt, temperature=ref.temperature, topk=topk, name=cand.name)
                    metrics[i].update_values(vals)
                    t_cmp += time.perf_counter() - t0
                if bar is not None:
                    bar.update((c1 - c0) * ctx)
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t_start
        settings = {"ctx": ctx, "chunks": n_chunks, "chunks_available": ref.n_chunks, "batch": batch,
                    "dtype": dtype, "score": score, "scored_per_chunk": per, "first_scored": first,
                    "n_vocab": ref.n_vocab,
                    "window": f" in {n_chunks} chunks of {ctx} ("
                              + ("llama.cpp window: second half of each chunk" if score == "half"
                                 else "every position") + ")"}
        timing = {"wall_seconds": wall, "compare_seconds": t_cmp,
                  "forward_seconds": {m.name: m.forward_seconds for m in cands}}
        return CacheResult(ref, [m.name for m in cands], metrics, settings, timing,
                           [m.size for m in cands])
    finally:
        for m in opened:
            m.close()
        ref.close()
