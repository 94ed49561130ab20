"""The figures themselves (see the package docstring). matplotlib is imported lazily."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from .._atomic import atomic_path

_COLORS = ("black", "tab:cyan", "tab:orange", "tab:purple", "tab:green", "tab:red", "tab:brown",
           "tab:pink", "tab:olive", "tab:blue")


def _plt():
    import matplotlib

    if "matplotlib.pyplot" not in __import__("sys").modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_format(path) -> str:
    """The image format of ``path`` from its extension, as matplotlib names it ("png" when the
    name has no extension); an extension matplotlib cannot write is a ValueError.

    >>> figure_format("kl.png"), figure_format("kl.JPG"), figure_format("kl")
    ('png', 'jpg', 'png')
    """
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if not ext:
        return "png"
    from matplotlib.backend_bases import FigureCanvasBase

    known = FigureCanvasBase.get_supported_filetypes()
    if ext not in known:
        raise ValueError(f"{os.fspath(path)}: unknown image format {ext!r}; use one of "
                         f"{', '.join('.' + k for k in sorted(known))}")
    return ext


def save_figure(fig, path, *, dpi: int = 110) -> str:
    """Save ``fig`` at ``path`` atomically (temporary file + ``os.replace``) in the format of
    its extension (PNG without one; :func:`figure_format`); return path."""
    path = os.fspath(path)
    fmt = figure_format(path)
    with atomic_path(path, suffix="." + fmt) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path


def _finish(fig, path, close):
    if path is not None:
        save_figure(fig, path)
        if close:
            _plt().close(fig)
    return fig


# ---------------------------------------------------------------------- small distributions


def _as_dists(dists, labels):
    """(2-d float64 array, list of labels) from a dict, a sequence of rows or a 2-d array."""
    if isinstance(dists, dict):
        labels = list(dists) if labels is None else list(labels)
        rows = [np.asarray(v, dtype=np.float64).reshape(-1) for v in dists.values()]
    else:
        rows = [np.asarray(v, dtype=np.float64).reshape(-1) for v in dists]
    if not rows:
        raise ValueError("dists: need at least one distribution")
    n = rows[0].size
    for i, r in enumerate(rows):
        if r.size != n:
            raise ValueError(f"dists: distribution {i} has {r.size} categories, distribution 0 has {n}")
    if labels is None:
        labels = [f"dist_{i + 1}" for i in range(len(rows))]
    labels = [str(x) for x in labels]
    if len(labels) != len(rows):
        raise ValueError(f"labels: {len(labels)} labels for {len(rows)} distributions")
    return np.stack(rows), labels


def plot_distributions(dists, *, labels=None, categories=None, title=None, ax=None, path=None,
                       colors=None, alpha=0.5, ylim=None, close=True):
    """Overlaid bar charts of several small categorical distributions, one colour each.

    Args:
        dists: a dict ``{label: probabilities}``, a sequence of 1-d arrays, or a 2-d array with
            one distribution per row (all with the same number of categories).
        labels: legend entries (default: the dict's keys, or dist_1, dist_2, ...).
        categories: tick labels of the categories (default 1..n).
        title: axes title. ax: draw into this matplotlib Axes instead of a new figure.
        path: if given, save the figure there as a PNG, atomically (and close it when ``close``).
        colors, alpha: bar colours (default black, cyan, orange, ...) and transparency, so that
            overlapping bars stay visible. ylim: y range (default [0, 1] for probabilities
            when all values are within it).

    Returns:
        The matplotlib Figure.

    >>> fig = plot_distributions({"p": [0.2, 0.8], "q": [0.5, 0.5]}, title="two coins")
    >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    ['p', 'q']
    """
    plt = _plt()
    mat, labels = _as_dists(dists, labels)
    k, n = mat.shape
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * n + 2.5), 3.8))
    else:
        fig = ax.figure
    idx = np.arange(1, n + 1)
    colors = list(colors) if colors is not None else [_COLORS[i % len(_COLORS)] for i in range(k)]
    for i in range(k):
        ax.bar(idx, mat[i], width=0.8, alpha=alpha, color=colors[i], edgecolor=colors[i],
               linewidth=1.0, label=labels[i])
    ax.set_xticks(idx)
    ax.set_xticklabels([str(c) for c in categories] if categories is not None else [str(i) for i in idx],
                       rotation=0 if n <= 12 else 60)
    ax.set_xlabel("category")
    ax.set_ylabel("probability")
    if ylim is None and np.all((mat >= 0) & (mat <= 1)):
        ylim = (0, 1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    if path is not None:
        fig.tight_layout()
    return _finish(fig, path, close)


def plot_contributions(p, q, *, labels=None, categories=None, title=None, ax=None, path=None,
                       close=True):
    """Per-category contributions ``p_i log(p_i / q_i)`` to KL(p || q) as bars (``kldiv.kl_terms``).

    ``q`` may be one distribution or several (a dict or 2-d array): one bar group per q, each
    labelled with its total KL. Bars below zero are categories where q gives more mass than p;
    infinite contributions (p_i > 0 = q_i) are drawn as hatched bars at the top of the axis.

    >>> fig = plot_contributions([0.5, 0.5], {"q": [0.25, 0.75]})
    >>> fig.axes[0].get_legend().get_texts()[0].get_text()   # 0.5 ln 2 + 0.5 ln(2/3)
    'q: KL = 0.1438'
    """
    from .. import kl_div, kl_terms

    plt = _plt()
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if isinstance(q, dict) or np.ndim(q) == 2 or (not isinstance(q, np.ndarray) and np.ndim(q) == 2):
        mat, labels = _as_dists(q, labels)
    else:
        mat, labels = _as_dists([q], labels or ["q"])
    if mat.shape[1] != p.size:
        raise ValueError(f"q: {mat.shape[1]} categories, p has {p.size}")
    k, n = mat.shape
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * n * max(1, k / 2) + 2.5), 3.8))
    else:
        fig = ax.figure
    terms = np.stack([np.asarray(kl_terms(p, mat[i]), dtype=np.float64) for i in range(k)])
    totals = [float(kl_div(p, mat[i])) for i in range(k)]
    finite = terms[np.isfinite(terms)]
    top = max(float(np.max(np.abs(finite))) if finite.size else 1.0, 1e-12)
    idx = np.arange(1, n + 1)
    width = 0.8 / k
    for i in range(k):
        x = idx - 0.4 + width * (i + 0.5)
        t = terms[i]
        c = _COLORS[(i + 1) % len(_COLORS)]
        fin = np.isfinite(t)
        ax.bar(x[fin], t[fin], width=width, color=c, alpha=0.8,
               label=f"{labels[i]}: KL = {totals[i]:.4g}")
        if (~fin).any():
            ax.bar(x[~fin], np.full((~fin).sum(), 1.1 * top), width=width, color="white",
                   edgecolor=c, hatch="//")
            for xi in x[~fin]:
                ax.text(xi, 1.12 * top, "inf", ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    if not np.isfinite(terms).all():
        ax.set_ylim(top=1.3 * top)
    ax.set_xticks(idx)
    ax.set_xticklabels([str(c) for c in categories] if categories is not None else [str(i) for i in idx],
                       rotation=0 if n <= 12 else 60)
    ax.set_xlabel("category")
    ax.set_ylabel(r"$p_i \log(p_i / q_i)$  (nats)")
    ax.set_title(title or "Contributions to KL(p || q)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if path is not None:
        fig.tight_layout()
    return _finish(fig, path, close)


def divergence_matrix(dists, *, divergence="kl"):
    """Matrix M[i, j] = D(dist_i || dist_j) for D in "kl", "reverse_kl", "js", "jeffreys".

    >>> divergence_matrix([[0.5, 0.5], [0.25, 0.75]]).round(4).tolist()
    [[0.0, 0.1438], [0.1308, 0.0]]
    """
    import kldiv

    fn = {"kl": kldiv.kl_div, "reverse_kl": kldiv.reverse_kl, "js": kldiv.js_div,
          "jeffreys": kldiv.jeffreys_div}.get(divergence)
    if fn is None:
        raise ValueError(f"divergence must be one of kl, reverse_kl, js, jeffreys; got {divergence!r}")
    mat, _ = _as_dists(dists, None)
    k = mat.shape[0]
    p = np.repeat(mat, k, axis=0)
    q = np.tile(mat, (k, 1))
    return np.asarray(fn(p, q), dtype=np.float64).reshape(k, k)


def plot_divergence_matrix(dists, *, labels=None, divergence="kl", title=None, ax=None, path=None,
                           close=True):
    """Heat map of pairwise divergences D(row || column) between small distributions.

    Cells are annotated with their value; infinite divergences (disjoint supports) are shown as
    "inf" in grey.

    >>> fig = plot_divergence_matrix({"a": [0.5, 0.5], "b": [0.25, 0.75]})
    >>> [t.get_text() for t in fig.axes[0].texts]
    ['0', '0.144', '0.131', '0']
    """
    plt = _plt()
    mat, labels = _as_dists(dists, labels)
    m = divergence_matrix(mat, divergence=divergence)
    k = m.shape[0]
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * k + 2.5), max(3.5, 0.6 * k + 2)))
    else:
        fig = ax.figure
    finite = np.isfinite(m)
    shown = np.where(finite, m, np.nan)
    vmax = float(np.nanmax(shown)) if finite.any() else 1.0
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=vmax if vmax > 0 else 1.0)
    for i in range(k):
        for j in range(k):
            v = m[i, j]
            txt = "inf" if math.isinf(v) else f"{v:.3g}"
            light = finite[i, j] and vmax > 0 and v < 0.6 * vmax
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="white" if light else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(labels, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticklabels(labels)
    name = {"kl": "KL(row || column)", "reverse_kl": "KL(column || row)", "js": "JS(row, column)",
            "jeffreys": "Jeffreys(row, column)"}[divergence]
    ax.set_title(title or name)
    fig.colorbar(im, ax=ax, label="nats", shrink=0.85)
    if path is not None:
        fig.tight_layout()
    return _finish(fig, path, close)


# ---------------------------------------------------------------------- tables for `kldiv plot`


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _check_text_table(path):
    """Refuse a binary file (a logits file above all) with a message saying what is read."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    kind = ("a NumPy .npy file" if head.startswith(b"\x93NUMPY")
            else "a llama.cpp KL base file" if head.startswith(b"_logits_")
            else "a safetensors file" if head[8:9] == b"{" and b"\0" in head[:8]
            else "binary data" if b"\0" in head else None)
    if kind is None:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not just a character cut at the end of the probe
                kind = "binary data (not UTF-8 text)"
    if kind is not None:
        raise ValueError(f"{path}: this is {kind}; `kldiv plot` reads small distributions from a "
                         f"CSV or JSON file (one distribution per row); for logits files use "
                         f"`kldiv compare REFERENCE OTHER --plot OUT.png`")


def read_table(path):
    """Read small distributions from CSV or JSON: returns (2-d array, labels, categories).

    CSV: one distribution per row; an optional header row of category names; an optional first
    column of labels. JSON: ``{"categories": [...], "distributions": {label: [...]}}``, or
    ``{label: [...]}``, or a list of lists.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, expected a CSV or JSON file")
    _check_text_table(path)
    labels = categories = None
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: invalid JSON: {exc}") from None
        if isinstance(data, dict) and "distributions" in data:
            categories = data.get("categories")
            labels = data.get("labels")
            data = data["distributions"]
        if isinstance(data, dict):
            labels = list(data)
            rows = list(data.values())
        elif isinstance(data, list):
            rows = data
        else:
            raise ValueError(f"{path}: expected a list of distributions or a dict of them")
    else:
        with open(path, newline="", encoding="utf-8") as fh:
            table = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
        if not table:
            raise ValueError(f"{path}: empty file")
        has_labels = not _is_number(table[-1][0].strip())
        first = table[0][1:] if has_labels else table[0]
        # a header names categories: none of its cells is a number (a row that mixes numbers
        # and text is a data row with a bad value, reported as such below)
        if first and not any(_is_number(c.strip()) for c in first):
            categories = [c.strip() for c in first]
            table = table[1:]
        if has_labels:
            labels = [r[0].strip() for r in table]
            table = [r[1:] for r in table]
        rows = []
        for i, r in enumerate(table):
            try:
                rows.append([float(c) for c in r])
            except ValueError:
                raise ValueError(f"{path}: row {i + 1}: not all values are numbers: {r}") from None
    try:
        mat, labels = _as_dists(rows, labels)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if categories is not None and len(categories) != mat.shape[1]:
        raise ValueError(f"{path}: {len(categories)} category names for {mat.shape[1]} categories")
    return mat, labels, categories


def check_distributions(mat, labels, *, normalize=False, source="dists"):
    """Validate rows as probability distributions (finite, >= 0, sum 1 within 1e-6), or normalise."""
    if not np.all(np.isfinite(mat)):
        i = int(np.argmax(~np.isfinite(mat).all(1)))
        raise ValueError(f"{source}: distribution {labels[i]!r} has non-finite values")
    if np.any(mat < 0):
        i = int(np.argmax((mat < 0).any(1)))
        raise ValueError(f"{source}: distribution {labels[i]!r} has negative values")
    sums = mat.sum(1)
    if normalize:
        if np.any(sums <= 0):
            i = int(np.argmax(sums <= 0))
            raise ValueError(f"{source}: distribution {labels[i]!r} sums to 0 and cannot be normalised")
        return mat / sums[:, None]
    bad = np.abs(sums - 1) > 1e-6
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{source}: distribution {labels[i]!r} sums to {sums[i]:.8g}, not 1 "
                         f"(use --normalize to rescale the rows)")
    return mat


def plot_table_file(path_in, path_out=None, *, divergence="kl", reference=None, normalize=False):
    """The `kldiv plot` figure: overlaid bars, contributions to KL against a reference row, and
    the pairwise divergence heat map, in one PNG (default: ``<input>.png``). Returns the path."""
    plt = _plt()
    mat, labels, categories = read_table(path_in)
    mat = check_distributions(mat, labels, normalize=normalize, source=os.fspath(path_in))
    ref = 0
    if reference is not None:
        if reference not in labels:
            raise ValueError(f"reference: no distribution named {reference!r}; have {labels}")
        ref = labels.index(reference)
    others = [i for i in range(len(labels)) if i != ref]
    n = mat.shape[1]
    ncols = 3 if others else 2
    w = max(4.5, 0.45 * n + 2.5)
    fig, axes = plt.subplots(1, ncols, figsize=(2 * w + 5.0 if ncols == 3 else w + 5.0, 4.2),
                             gridspec_kw={"width_ratios": [w, w, 5.0][:ncols] if ncols == 3 else [w, 5.0]})
    plot_distributions(mat, labels=labels, categories=categories, ax=axes[0], title="Distributions")
    if others:
        plot_contributions(mat[ref], {labels[i]: mat[i] for i in others}, categories=categories,
                           ax=axes[1], title=f"Contributions to KL({labels[ref]} || ·)")
    plot_divergence_matrix(mat, labels=labels, divergence=divergence, ax=axes[-1])
    fig.tight_layout()
    if path_out is None:
        path_out = os.path.splitext(os.fspath(path_in))[0] + ".png"
    save_figure(fig, path_out)
    plt.close(fig)
    return path_out


# ---------------------------------------------------------------------- compare report


def plot_compare(report, path=None, *, title=None, close=True):
    """The per-token figure of a :class:`kldiv.compare.Report` (2 x 2 panels):

    histogram of per-token KL on a log axis with its cumulative distribution, KL against token
    position, the reference's top-1 probability against KL, and delta p (or the summary).
    Tokens with KL = 0 exactly (or below 0: llama.cpp's statistic, see
    :func:`kldiv.compare.compare`) are drawn at the smallest positive value / 10 and counted in
    the legend; infinite KL is counted, not drawn.
    """
    plt = _plt()
    kl = np.asarray(report.kl, dtype=np.float64)
    pos = np.asarray(report.rows)
    fin = np.isfinite(kl)
    n_inf = int((~fin).sum())
    positive = kl[fin & (kl > 0)]
    floor = positive.min() / 10 if positive.size else 1e-12
    klc = np.where(fin, np.maximum(kl, floor), np.nan)
    n_zero = int((fin & (kl <= 0)).sum())

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    vals = klc[fin]
    if not vals.size:  # every KL infinite: nothing to draw on log axes, say so
        for a in (axes[0, 0], axes[0, 1], axes[1, 0]):
            a.text(0.5, 0.5, f"all {n_inf} tokens have infinite KL\n(the other model gives "
                   f"probability 0 to a token the reference supports)", ha="center", va="center",
                   transform=a.transAxes, fontsize=9)
            a.set_xticks([])
            a.set_yticks([])
        return _finish_compare(fig, axes, report, title, path, close)
    lo, hi = (np.log10(vals.min()), np.log10(vals.max())) if vals.size else (-12, 0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.logspace(lo, hi, 50)
    ax.hist(vals, bins=bins, color="tab:blue", alpha=0.75)
    ax.set_xscale("log")
    ax.set_xlabel("KL(reference || other) per token (nats)")
    ax.set_ylabel("tokens")
    ax2 = ax.twinx()
    srt = np.sort(vals)
    ax2.plot(srt, np.arange(1, srt.size + 1) / max(srt.size, 1), color="tab:red", linewidth=1.5,
             label="cumulative share")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative share of tokens", color="tab:red")
    m = float(np.mean(kl)) if kl.size else math.nan
    ax.axvline(m, color="black", linestyle="--", linewidth=1)
    note = f"mean {m:.3g}"
    if n_zero:
        what = "exactly 0" if not (fin & (kl < 0)).any() else "<= 0 (llama.cpp's sum)"
        note += f", {n_zero} {what} (drawn at {floor:.1g})"
    if n_inf:
        note += f", {n_inf} infinite (not drawn)"
    ax.set_title(f"Per-token KL: {note}", fontsize=10)

    ax = axes[0, 1]
    ax.scatter(pos[fin], klc[fin], s=4, alpha=0.5, color="tab:blue", rasterized=True)
    if fin.sum() >= 20:
        w = max(5, int(fin.sum()) // 50)
        kern = np.ones(w) / w
        smooth = np.convolve(kl[fin], kern, mode="valid")
        ax.plot(pos[fin][w - 1:], np.maximum(smooth, floor), color="black", linewidth=1.2,
                label=f"running mean ({w} tokens)")
        ax.legend(frameon=False, fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("token position (row)")
    ax.set_ylabel("KL (nats)")
    ax.set_title("KL along the sequence", fontsize=10)

    ax = axes[1, 0]
    same = np.asarray(report.same_top, bool)
    pt = np.asarray(report.p_top_ref)
    ax.scatter(pt[fin & same], klc[fin & same], s=5, alpha=0.5, color="tab:blue", label="same top-1",
               rasterized=True)
    ax.scatter(pt[fin & ~same], klc[fin & ~same], s=9, alpha=0.8, color="tab:red",
               label="top-1 changed", rasterized=True)
    ax.set_yscale("log")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("reference top-1 probability")
    ax.set_ylabel("KL (nats)")
    ax.set_title("Confidence of the reference vs KL", fontsize=10)
    ax.legend(frameon=False, fontsize=8)

    return _finish_compare(fig, axes, report, title, path, close)


def _finish_compare(fig, axes, report, title, path, close):
    """The delta p panel, the summary box and the title of :func:`plot_compare`."""
    ax = axes[1, 1]
    if report.delta_p is not None and report.delta_p.size and np.isfinite(report.delta_p).any():
        dp = 100 * np.asarray(report.delta_p)
        dp = dp[np.isfinite(dp)]
        lim = max(float(np.max(np.abs(dp))), 1e-6)
        counts, _, _ = ax.hist(dp, bins=np.linspace(-lim, lim, 61), color="tab:green", alpha=0.8)
        ax.set_yscale("log")
        ax.set_ylim(0.7, max(float(counts.max()), 1.0) * 60)  # headroom for the summary box
        ax.set_xlabel("Δp of the actual next token (percentage points)")
        ax.set_ylabel("tokens")
        ax.set_title("Change in the probability of the actual next token", fontsize=10)
    else:
        ax.axis("off")
    s = report.summary()
    k = s["kl"]
    txt = (f"tokens {report.n_tokens}" + (f" (+{report.n_skipped} skipped)" if report.n_skipped else "")
           + f"\nmean KL {k['mean']:.4g} ± {k['mean_err']:.2g}\nmedian {k['median']:.3g}, "
           f"99% {k['quantiles']['99.0%']:.3g}, max {k['max']:.3g}\n"
           f"same top-1 {100 * s['same_top']['share']:.2f} %")
    ax.text(0.02, 0.97, txt, transform=ax.transAxes, ha="left", va="top", fontsize=9,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.85))
    fig.suptitle(title or f"{os.path.basename(report.other)} vs reference {os.path.basename(report.reference)}",
                 fontsize=11)
    fig.tight_layout()
    return _finish(fig, path, close)
