"""The ``kldiv eval`` figure: KL distribution (histogram, CDF), KL by position, mean KL vs size."""
from __future__ import annotations

import numpy as np


def plot_eval(result, path) -> str:
    """Write a 2 x 2 PNG figure of an :class:`~kldiv.eval.result.EvalResult` to ``path`` (atomic).

    Panels: histogram of the per-token KL (log-spaced bins; exact values, or the quantile
    sketch's buckets beyond ``max_exact`` tokens), its CDF, the mean KL at each scored position
    of a chunk, and the mean KL (± error) against the candidate's size on disk.
    """
    from ..plots.figures import _COLORS, _plt, save_figure

    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_h, ax_c), (ax_p, ax_s) = axes
    s = result.summary()
    first = s["settings"]["first_scored"]
    pos_lo = np.inf
    pos_hi = 0.0
    for i, (c, m) in enumerate(zip(s["candidates"], result.metrics)):
        color = _COLORS[(i + 1) % len(_COLORS)]
        label = _label(c["name"])
        vals, cnts = m.q["kl"].histogram()
        fin = np.isfinite(vals) & (vals > 0)
        if fin.any():
            pos_lo = min(pos_lo, float(vals[fin].min()))
            pos_hi = max(pos_hi, float(vals[fin].max()))
        c["_hist"] = (vals, cnts, color, label)
    if pos_hi > 0:
        lo = max(pos_lo, pos_hi * 1e-12)
        bins = np.geomspace(lo, pos_hi * 1.0001, 60)
    else:
        bins = np.linspace(0, 1, 2)
    for c in s["candidates"]:
        vals, cnts, color, label = c.pop("_hist")
        fin = np.isfinite(vals)
        ax_h.hist(np.clip(vals[fin], bins[0], bins[-1]), bins=bins, weights=cnts[fin], histtype="step",
                  color=color, label=label)
        order = np.argsort(vals, kind="stable")
        cum = np.cumsum(cnts[order]) / max(1, cnts.sum())
        ax_c.step(np.clip(vals[order], bins[0], None), cum, where="post", color=color, label=label)
        kp = np.asarray(c["kl_by_position"])
        ax_p.plot(np.arange(first, first + kp.size), kp, color=color, label=label, lw=1)
        if c["size_bytes"]:
            x, y = c["size_bytes"] / 2**20, c["kl"]["mean"]
            ax_s.errorbar([x], [y], yerr=[c["kl"]["mean_err"] or 0.0], fmt="o", color=color, label=label)
            ax_s.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if pos_hi > 0:
        for ax in (ax_h, ax_c):
            ax.set_xscale("log")
    means = [c["kl"]["mean"] for c in s["candidates"]]
    if all(m is not None and np.isfinite(m) and m > 0 for m in means):  # candidates decades apart
        for ax in (ax_p, ax_s):
            ax.set_yscale("log")
    ax_h.set(title="Per-token KL(reference || candidate)", xlabel="KL (nats)", ylabel="tokens")
    ax_c.set(title="CDF of per-token KL", xlabel="KL (nats)", ylabel="share of tokens ≤ x")
    ax_p.set(title="Mean KL by position in the chunk", xlabel="position", ylabel="mean KL (nats)")
    ax_s.set(title="Mean KL against size on disk", xlabel="weights on disk (MiB)", ylabel="mean KL (nats)")
    if not any(c["size_bytes"] for c in s["candidates"]):
        ax_s.text(0.5, 0.5, "sizes unknown (logits files)", ha="center", va="center", transform=ax_s.transAxes)
    for ax in (ax_h, ax_c, ax_p):
        ax.legend(fontsize=8)
    fig.suptitle(f"kldiv eval: reference {_label(s['reference'])}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return str(path)


def _label(name) -> str:
    import os

    name = os.fspath(name).rstrip("/")
    return os.path.basename(name) or name
