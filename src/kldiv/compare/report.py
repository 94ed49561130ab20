"""The result of :func:`kldiv.compare.compare`: per-token vectors, summary, table, JSON."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from .._atomic import write_text_atomic
from . import stats as S


@dataclass
class Report:
    """Per-token divergences between a reference and another model, and their statistics.

    Per-token arrays (one entry per compared token, skipped rows excluded; ``rows`` gives the
    row index in the input of each entry): ``kl`` = KL(reference || other) in nats,
    ``reverse_kl`` = KL(other || reference) and ``js`` (Jensen-Shannon, natural log) when
    requested, ``same_top`` (bool), ``p_top_ref`` (the reference's top-1 probability),
    ``delta_p`` = p_other(token) - p_ref(token) and ``nll_ref``/``nll_other`` when tokens are
    known. ``summary()`` gives llama.cpp's statistics as a dict, ``table()`` as text,
    ``to_json(path)`` writes them (atomically). ``llamacpp``: the KL and the reference's token
    probabilities are llama.cpp's (stored reference log-probabilities, not renormalised, terms
    <= -16 left out; float32 quantiles), see :func:`kldiv.compare.compare`.
    """

    reference: str
    other: str
    n_vocab: int
    n_rows: int
    kl: np.ndarray
    rows: np.ndarray
    same_top: np.ndarray
    p_top_ref: np.ndarray
    reverse_kl: np.ndarray | None = None
    js: np.ndarray | None = None
    delta_p: np.ndarray | None = None
    nll_ref: np.ndarray | None = None
    nll_other: np.ndarray | None = None
    skipped_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    formats: tuple = ("", "")
    kernel: str = ""
    llamacpp: bool = False

    @property
    def _method(self) -> str:
        return "llamacpp" if self.llamacpp else "linear"

    @property
    def n_tokens(self) -> int:
        return int(self.kl.size)

    @property
    def n_skipped(self) -> int:
        return int(self.skipped_rows.size)

    def summary(self) -> dict:
        """All statistics as a JSON-ready dict (nan becomes None in JSON)."""
        out = {
            "reference": self.reference, "other": self.other,
            "formats": list(self.formats), "n_vocab": self.n_vocab,
            "n_rows": self.n_rows, "n_tokens": self.n_tokens, "n_skipped_nan": self.n_skipped,
            "kernel": self.kernel,
            "statistics": "llama.cpp" if self.llamacpp else "kldiv",
            "kl": S.distribution_summary(self.kl, method=self._method),
        }
        if self.reverse_kl is not None:
            out["reverse_kl"] = S.distribution_summary(self.reverse_kl, method=self._method)
        if self.js is not None:
            out["js"] = S.distribution_summary(self.js, method=self._method)
        s, e = S.share_and_error(self.same_top)
        out["same_top"] = {"share": s, "share_err": e}
        if self.delta_p is not None:
            dp = S.distribution_summary(self.delta_p, S.DP_QUANTILES, method=self._method)
            dp["rms"], dp["rms_err"] = S.rms_and_error(self.delta_p)
            out["delta_p"] = dp
            out["perplexity"] = S.log_ppl_summary(self.nll_other, self.nll_ref)
        return out

    def table(self) -> str:
        """The statistics as a terminal table in llama.cpp's layout."""
        s = self.summary()
        lines = [f"reference: {self.reference}  ({self.formats[0]})",
                 f"other:     {self.other}  ({self.formats[1]})",
                 f"tokens:    {self.n_tokens} compared"
                 + (f", {self.n_skipped} NaN rows skipped" if self.n_skipped else "")
                 + f", vocabulary {self.n_vocab}"]
        if self.llamacpp:
            lines += ["KL as llama.cpp computes it: the reference's stored log-probabilities as they "
                      "are (not renormalised),",
                      "terms with log-probability <= -16 left out (`--renormalize` for kldiv's "
                      "renormalised KL)"]
        lines += ["mean ± e: e is the standard error of the mean over tokens", ""]
        if "perplexity" in s:
            p = s["perplexity"]
            lines += ["====== Perplexity statistics ======",
                      f"Mean PPL(other)               : {_f(p['ppl_other'])} ± {_f(p['ppl_other_err'])}",
                      f"Mean PPL(ref)                 : {_f(p['ppl_ref'])} ± {_f(p['ppl_ref_err'])}",
                      f"Cor(ln(PPL(other)), ln(PPL(ref))): {_pct(p['correlation'], 2)}",
                      f"Mean ln(PPL(other)/PPL(ref))  : {_f(p['ln_ppl_ratio'])} ± {_f(p['ln_ppl_ratio_err'])}",
                      f"Mean PPL(other)/PPL(ref)      : {_f(p['ppl_ratio'])} ± {_f(p['ppl_ratio_err'])}",
                      f"Mean PPL(other)-PPL(ref)      : {_f(p['ppl_diff'])} ± {_f(p['ppl_diff_err'])}",
                      ""]
        for key, title in (("kl", "KL divergence"), ("reverse_kl", "Reverse KL divergence"),
                           ("js", "Jensen-Shannon divergence")):
            if key not in s:
                continue
            d, tag = s[key], {"kl": "KLD", "reverse_kl": "RKL", "js": "JSD"}[key]
            lines.append(f"====== {title} statistics ======")
            _stat_lines(lines, tag, d, _f)
            lines.append("")
        lines.append("====== Token probability statistics ======")
        if "delta_p" in s:
            d = s["delta_p"]
            _stat_lines(lines, "Δp", d, _pct)
            lines.append(f"RMS Δp    : {_pct(d['rms'])} ± {_pct(d['rms_err'])}")
        st = s["same_top"]
        lines.append(f"Same top p: {_pct(st['share'])} ± {_pct(st['share_err'])}")
        if self.delta_p is None:
            lines += ["", "(no token ids: the perplexities and Δp, the change in the probability of "
                          "the actual next token, need --tokens FILE)"]
        return "\n".join(lines)

    def to_json(self, path, *, per_token: bool = False) -> None:
        """Write ``summary()`` (and with ``per_token`` the per-token vectors) to ``path`` atomically."""
        data = self.summary()
        if per_token:
            data["per_token"] = {k: v.tolist() for k, v in self._vectors().items()}
        write_text_atomic(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")

    def _vectors(self) -> dict:
        out = {"row": self.rows, "kl": self.kl, "same_top": self.same_top, "p_top_ref": self.p_top_ref}
        for k in ("reverse_kl", "js", "delta_p"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        m, e = S.mean_and_error(self.kl)
        return (f"<Report {self.n_tokens} tokens, mean KL {m:.6g} ± {e:.2g} nats, "
                f"{self.reference!r} vs {self.other!r}>")


def _nonneg_zero(text: str) -> str:
    """'-0.000' (a tiny negative rounded to zero) printed without its sign."""
    t = text.strip().rstrip("%").strip()
    if t.startswith("-") and set(t[1:]) <= set("0."):
        return text.replace("-", " ", 1)
    return text


def _f(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "       nan"
    return _nonneg_zero(f"{x:10.6f}")


def _pct(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "   nan %"
    return _nonneg_zero(f"{100 * x:{digits + 4}.{digits}f} %")


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _stat_lines(lines, tag, d, fmt):
    """llama.cpp's block for one statistic: mean ± error, maximum, quantiles, minimum."""
    lines.append(f"Mean    {tag}: {fmt(d['mean'])} ± {fmt(d['mean_err'])}")
    lines.append(f"Maximum {tag}: {fmt(d['max'])}")
    for q, v in d["quantiles"].items():
        label = "Median " if q == "50.0%" else f"{q:>6} "
        lines.append(f"{label} {tag}: {fmt(v)}")
    lines.append(f"Minimum {tag}: {fmt(d['min'])}")
