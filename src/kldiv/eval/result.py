"""The result of :func:`kldiv.eval.evaluate`: per-candidate statistics, paired comparisons, JSON."""
from __future__ import annotations

import itertools
import json
import math


from .._atomic import write_text_atomic
from .bootstrap import paired_bootstrap


class EvalResult:
    """Statistics of each candidate against the reference, side by side.

    ``summary()``: a JSON-ready dict with ``settings``, ``timing``, and per candidate the layout
    of :meth:`kldiv.compare.Report.summary` (``kl``, ``reverse_kl``, ``js``, ``same_top``,
    ``delta_p``, ``perplexity``) plus ``flips``, ``topk_overlap``, ``size_bytes``,
    ``kl_by_position`` and ``chunks`` (per-chunk token counts, KL sums, top-1 changes: the
    bootstrap's input); with two or
    more candidates, ``paired`` holds for each pair a paired bootstrap over chunks of the
    difference in mean KL and in flip rate (:func:`~kldiv.eval.bootstrap.paired_bootstrap`).
    ``table()``: the statistics as text, one column per candidate. ``to_json(path)``, ``plot(path)``.
    """

    def __init__(self, data, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0):
        self.data = data
        self.n_resamples = n_resamples
        self.confidence = confidence
        self.seed = seed
        self._summary = None

    @property
    def reference(self) -> str:
        return self.data.reference

    @property
    def candidates(self) -> list:
        return list(self.data.candidates)

    @property
    def metrics(self) -> list:
        return self.data.metrics

    def paired(self) -> list:
        """Paired bootstrap of every pair (A, B) of candidates: mean KL and flip rate, A - B."""
        d = self.data
        out = []
        for i, j in itertools.combinations(range(len(d.candidates)), 2):
            kw = dict(n_resamples=self.n_resamples, confidence=self.confidence, seed=self.seed)
            out.append({
                "a": d.candidates[i], "b": d.candidates[j],
                "kl_mean_diff": paired_bootstrap(d.chunk_kl[i], d.chunk_kl[j], d.chunk_tokens, **kw),
                "flip_rate_diff": paired_bootstrap(d.chunk_flips[i], d.chunk_flips[j], d.chunk_tokens, **kw),
            })
        return out

    def summary(self) -> dict:
        if self._summary is not None:
            return self._summary
        d = self.data
        cands = []
        for name, m, size, pos in zip(d.candidates, d.metrics, d.sizes, d.position_kl):
            s = {"name": name, "size_bytes": size, **m.compute()}
            n_chunks = d.settings["chunks"]
            s["kl_by_position"] = (pos / n_chunks).tolist() if n_chunks else []
            i = len(cands)
            s["chunks"] = {"tokens": d.chunk_tokens.tolist(), "kl_sum": d.chunk_kl[i].tolist(),
                           "top1_changed": d.chunk_flips[i].astype(int).tolist()}
            cands.append(s)
        out = {"reference": d.reference, "settings": dict(d.settings), "timing": dict(d.timing),
               "candidates": cands}
        if len(cands) > 1:
            out["paired"] = self.paired()
        self._summary = out
        return out

    def table(self) -> str:
        """llama.cpp's statistics and the flips, one column per candidate; then the paired comparisons."""
        s = self.summary()
        cs = s["candidates"]
        st = s["settings"]
        names = [_short(c["name"]) for c in cs]
        lines = [f"reference:  {s['reference']}",
                 f"tokens:     {cs[0]['n_tokens']} scored in {st['chunks']} chunks of {st['ctx']} "
                 f"({'llama.cpp window: second half of each chunk' if st['score'] == 'half' else 'every position'})"
                 f", vocabulary {st['n_vocab']}"]
        if st.get("statistics") == "llama.cpp":
            lines.append("KL as llama.cpp computes it: the reference's stored log-probabilities as they are "
                         "(not renormalised), terms <= -16 left out (--renormalize for kldiv's KL)")
        lines.append("")
        body = [("", names)]  # (label, one cell per candidate) or a section title (str)

        def row(label, vals):
            body.append((label, vals))

        def pm(x, e, fmt):
            return f"{fmt(x)} ± {fmt(e)}"

        if "perplexity" in cs[0]:
            body.append("====== Perplexity statistics ======")
            row("Mean PPL(other)", [pm(c["perplexity"]["ppl_other"], c["perplexity"]["ppl_other_err"], _g) for c in cs])
            row("Mean PPL(ref)", [pm(c["perplexity"]["ppl_ref"], c["perplexity"]["ppl_ref_err"], _g) for c in cs])
            row("Mean ln(PPL(other)/PPL(ref))", [pm(c["perplexity"]["ln_ppl_ratio"], c["perplexity"]["ln_ppl_ratio_err"], _g)
                                                 for c in cs])
        for key, title, tag in (("kl", "KL divergence", "KLD"), ("reverse_kl", "Reverse KL divergence", "RKL"),
                                ("js", "Jensen-Shannon divergence", "JSD")):
            body.append(f"====== {title} statistics ======")
            _block(row, pm, tag, [c[key] for c in cs], _g)
        body.append("====== Token probability statistics ======")
        if "delta_p" in cs[0]:
            _block(row, pm, "Δp", [c["delta_p"] for c in cs], _pct)
            row("RMS Δp", [pm(c["delta_p"]["rms"], c["delta_p"]["rms_err"], _pct) for c in cs])
        row("Same top p", [pm(c["same_top"]["share"], c["same_top"]["share_err"], _pct) for c in cs])
        body.append("====== Flips and top-k overlap ======")
        row("Top-1 changed", [pm(c["flips"]["top1_changed"]["share"], c["flips"]["top1_changed"]["share_err"], _pct)
                              for c in cs])
        if "correct_to_wrong" in cs[0]["flips"]:
            row("Correct -> wrong", [pm(c["flips"]["correct_to_wrong"]["share"],
                                        c["flips"]["correct_to_wrong"]["share_err"], _pct) for c in cs])
            row("Wrong -> correct", [pm(c["flips"]["wrong_to_correct"]["share"],
                                        c["flips"]["wrong_to_correct"]["share_err"], _pct) for c in cs])
        for k in cs[0]["topk_overlap"]:
            row(f"Top-{k} overlap", [pm(c["topk_overlap"][k]["mean"], c["topk_overlap"][k]["mean_err"], _pct)
                                     for c in cs])
        if any(c["size_bytes"] for c in cs):
            row("Size on disk", [_size(c["size_bytes"]) for c in cs])
        lines += _render(body, len(cs), 30)
        for p in s.get("paired", []):
            kl, fl = p["kl_mean_diff"], p["flip_rate_diff"]
            conf = f"{100 * kl['confidence']:g}%"
            lines += ["", f"====== Paired: {_short(p['a'])} - {_short(p['b'])} "
                          f"(bootstrap over {kl['n_chunks']} chunks, {kl['n_resamples']} resamples) ======",
                      f"Mean KLD difference : {_g(kl['diff'])}   {conf} CI [{_g(kl['ci_low'])}, {_g(kl['ci_high'])}]"
                      f"   A lower in {_pct(kl['share_a_lower']).strip()} of resamples",
                      f"Flip rate difference: {_pct(fl['diff'])}   {conf} CI [{_pct(fl['ci_low']).strip()}, "
                      f"{_pct(fl['ci_high']).strip()}]"]
            verdict = _verdict(kl, p["a"], p["b"])
            if verdict:
                lines.append(verdict)
        return "\n".join(lines)

    def to_json(self, path) -> None:
        """Write :meth:`summary` to ``path`` atomically (nan as null, infinities as strings)."""
        from ..compare.report import _jsonable

        write_text_atomic(path, json.dumps(_jsonable(self.summary()), indent=2, allow_nan=False) + "\n")

    def plot(self, path) -> str:
        from .plot import plot_eval

        return plot_eval(self, path)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        parts = []
        for name, m in zip(self.data.candidates, self.data.metrics):
            mean, err = m.mom["kl"].mean_and_error()
            parts.append(f"{_short(name)}: {mean:.6g} ± {err:.2g}")
        return f"<EvalResult vs {_short(self.reference)!r}, mean KL: " + "; ".join(parts) + ">"


def _verdict(kl, a, b) -> str:
    lo, hi = kl["ci_low"], kl["ci_high"]
    if not (lo == lo and hi == hi):
        return "(no interval: fewer than two chunks, or an infinite KL)"
    if hi < 0:
        return f"=> {_short(a)} is closer to the reference (the interval excludes 0)"
    if lo > 0:
        return f"=> {_short(b)} is closer to the reference (the interval excludes 0)"
    return "=> no significant difference in mean KLD (the interval contains 0)"


def _block(row, pm, tag, ds, fmt):
    row(f"Mean    {tag}", [pm(d["mean"], d["mean_err"], fmt) for d in ds])
    row(f"Maximum {tag}", [fmt(d["max"]) for d in ds])
    for q in ds[0]["quantiles"]:
        label = "Median " if q == "50.0%" else f"{q:>6} "
        row(f"{label} {tag}", [fmt(d["quantiles"][q]) for d in ds])
    row(f"Minimum {tag}", [fmt(d["min"]) for d in ds])


def _render(body, ncols, label_width) -> list:
    """Table lines from rows ``(label, [cell per column])`` and plain strings (headings):
    labels left-aligned in ``label_width``, each column right-aligned to its widest cell."""
    widths = [max(len(r[1][i]) for r in body if not isinstance(r, str)) + 3 for i in range(ncols)]
    return [r if isinstance(r, str) else
            (f"{r[0]:<{label_width}}" + "".join(f"{v:>{w}}" for v, w in zip(r[1], widths))).rstrip()
            for r in body]


def _short(name: str) -> str:
    import os

    name = os.fspath(name).rstrip("/")
    return os.path.basename(name) or name


def _g(x) -> str:
    """llama.cpp's %.6f, or 5 significant digits for values below 1e-3 (good quantisations)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if x != 0 and abs(x) < 1e-3 and math.isfinite(x):
        return f"{x:.4e}"
    return f"{x:.6f}"


def _pct(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan %"
    return f"{100 * x:.3f} %"


def _size(n) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
