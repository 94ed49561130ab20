"""``kldiv tutorial``: the MXNet Gluon KLDivLoss tutorial's examples, worked with kldiv.

For each example it prints kldiv's true KL beside the value that MXNet Gluon's ``KLDivLoss``
returns (reproduced by ``kldiv.gluon``), so the differences in argument order, in the meaning of
``from_logits``, in the edge cases and in the aggregation can be read side by side.
"""
from __future__ import annotations

import os

import numpy as np

# The tutorial's three categorical distributions over four categories, and a fourth whose
# support is smaller.
DIST_1 = np.array([0.2, 0.5, 0.2, 0.1])
DIST_2 = np.array([0.3, 0.4, 0.1, 0.2])
DIST_3 = np.array([0.1, 0.1, 0.1, 0.7])
DIST_4 = np.array([0.0, 0.9, 0.0, 0.1])
# Network outputs (logits) whose softmax is DIST_1: log(DIST_1) shifted by a constant.
LOGITS_1 = np.log(DIST_1) - np.mean(np.log(DIST_1))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tutorial",
        help="walk through the Gluon KLDivLoss tutorial's examples with kldiv",
        description=__doc__,
    )
    p.add_argument("--out", default="kldiv-tutorial", metavar="DIR",
                   help="where to write the figures (default: ./kldiv-tutorial; created with its "
                        "missing parents)")
    p.add_argument("--no-plots", action="store_true", help="print only, write no figures")
    p.set_defaults(func=run)


def _gluon(pred, label, *, from_logits=True, aggregate="mean"):
    from ..gluon import KLDivLoss

    with np.errstate(divide="ignore", invalid="ignore"):
        return float(KLDivLoss(from_logits=from_logits, aggregate=aggregate)(
            pred[None, :], label[None, :])[0])


def _fmt(x: float) -> str:
    return f"{x:.6f}" if np.isfinite(x) else str(x)


def tutorial_rows():
    """The tutorial's comparisons as (label, kldiv value, Gluon mean, Gluon sum) rows.

    Gluon's ``loss_fn(log(a), b)`` compares the label ``b`` (reference) with the prediction
    ``a``: it is KL(b || a) up to its epsilon and aggregation, i.e. ``kldiv.kl_div(b, a)``.
    """
    from .. import kl_div

    rows = []
    with np.errstate(divide="ignore"):
        for name, a, b in (("1 vs 2", DIST_1, DIST_2), ("1 vs 3", DIST_1, DIST_3),
                           ("1 vs 1", DIST_1, DIST_1), ("4 vs 1", DIST_4, DIST_1),
                           ("4 vs 4", DIST_4, DIST_4)):
            rows.append((f"KL(dist_{name[-1]} || dist_{name[0]})  [gluon: pred=log dist_{name[0]}]",
                         float(kl_div(b, a)),
                         _gluon(np.log(a), b, aggregate="mean"),
                         _gluon(np.log(a), b, aggregate="sum")))
    rows.append(("KL(dist_2 || softmax(logits_1))  [gluon: from_logits=False]",
                 float(kl_div(DIST_2, LOGITS_1, q_space="logits")),
                 _gluon(LOGITS_1, DIST_2, from_logits=False, aggregate="mean"),
                 _gluon(LOGITS_1, DIST_2, from_logits=False, aggregate="sum")))
    return rows


def _bar_figure(path, panels):
    """One panel of overlaid bars per (title, {label: distribution}) pair, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._atomic import atomic_path
    from ..plots import plot_distributions

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, dists) in zip(axes[0], panels):
        plot_distributions(dists, title=title, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _make_out(path) -> None:
    """Create ``--out`` (and its missing parents) before any work; errors name ``--out``."""
    if not str(path).strip():
        raise ValueError("--out: empty directory name")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"--out {path}: is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OSError(f"--out {path}: cannot create the directory ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {path}: the directory is not writable")


def run(args) -> int:
    from .. import kl_div, kl_terms

    if not args.no_plots:
        _make_out(args.out)

    print("kldiv tutorial: the Gluon KLDivLoss tutorial's examples, worked with kldiv\n")
    for i, d in enumerate((DIST_1, DIST_2, DIST_3, DIST_4), 1):
        print(f"  dist_{i} = {d}")
    print(
        "\nkldiv.kl_div(p, q) is KL(p || q) = sum p log(p / q): reference p first, model q second."
        "\nGluon's loss_fn(pred, label) puts the model first and the reference (label) second,"
        "\nexpects pred as log-probabilities when from_logits=True (the default), adds 1e-12 to"
        "\nthe label inside the log, and averages over categories (MXNet 1.0-1.8, 2.0) or sums"
        "\nthem (MXNet 1.9).\n"
    )
    rows = tutorial_rows()
    w = max(len(r[0]) for r in rows)
    print(f"  {'comparison':<{w}}  {'kldiv (true KL)':>16}  {'gluon mean':>11}  {'gluon sum':>10}")
    for label, true, mean, total in rows:
        print(f"  {label:<{w}}  {_fmt(true):>16}  {_fmt(mean):>11}  {_fmt(total):>10}")

    print("\nCommon support (dist_4 has zeros):")
    print("  * Gluon with pred = log(dist_4) = -inf where dist_4 is 0 and label dist_1 > 0 gives"
          " +inf: KL(dist_1 || dist_4) really is infinite, and kldiv says so: "
          f"{float(kl_div(DIST_1, DIST_4))}.")
    print("  * Gluon with label = pred = dist_4 gives nan (0 * (log 1e-12 + inf)); kldiv gives "
          f"{float(kl_div(DIST_4, DIST_4))}: a term with p = 0 contributes 0.")
    print("  * The other direction is finite: KL(dist_4 || dist_1) = "
          f"{float(kl_div(DIST_4, DIST_1)):.6f} (no epsilon needed, none added).")

    n = DIST_1.size
    true = float(kl_div(DIST_2, DIST_1))
    mean = _gluon(np.log(DIST_1), DIST_2, aggregate="mean")
    print("\nAggregation: the true KL sums over categories; Gluon's mean divides by their number.")
    print(f"  kldiv.kl_div(dist_2, dist_1)            = {true:.6f}")
    print(f"  gluon (mean) x {n} categories           = {mean * n:.6f}")
    print("  kldiv.kl_div(..., reduction='mean') averages over distributions, never categories.")

    terms = kl_terms(DIST_2, DIST_1)
    print("\nWhere the divergence comes from (kldiv.kl_terms(dist_2, dist_1), sum = KL):")
    print("  " + "  ".join(f"c{i + 1}: {t:+.4f}" for i, t in enumerate(terms)))

    if not args.no_plots:
        try:
            _write_figures(args.out, kl_div)
        except OSError as exc:
            raise OSError(f"--out {args.out}: cannot write the figures ({exc.strerror or exc})") from None
    return 0


def _write_figures(out, kl_div) -> None:
    """The two figures into ``out`` (atomically, each)."""
    p1 = os.path.join(out, "distributions.png")
    _bar_figure(p1, [
        (f"Distributions 1 & 2: KL(2 || 1) = {float(kl_div(DIST_2, DIST_1)):.3f}",
         {"dist_1": DIST_1, "dist_2": DIST_2}),
        (f"Distributions 1 & 3: KL(3 || 1) = {float(kl_div(DIST_3, DIST_1)):.3f}",
         {"dist_1": DIST_1, "dist_3": DIST_3}),
    ])
    p2 = os.path.join(out, "common_support.png")
    _bar_figure(p2, [
        ("KL(1 || 4) = inf: dist_4 is 0 where dist_1 is not",
         {"dist_1": DIST_1, "dist_4": DIST_4}),
        (f"KL(4 || 1) = {float(kl_div(DIST_4, DIST_1)):.3f}",
         {"dist_4": DIST_4, "dist_1": DIST_1}),
    ])
    print(f"\nfigures: {p1}, {p2}")
