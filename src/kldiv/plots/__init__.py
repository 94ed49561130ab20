"""Matplotlib figures: model-drift reports (``kldiv compare``) and small categorical distributions.

matplotlib is imported only when a function here runs (with the non-interactive Agg backend
unless a backend is already in use); PNG files are written atomically.

- :func:`plot_distributions`: overlaid bars of several small distributions (the tutorial's charts);
- :func:`plot_contributions`: per-category contributions ``p_i log(p_i / q_i)`` to KL(p || q);
- :func:`plot_divergence_matrix`: heat map of pairwise divergences;
- :func:`plot_compare`: the per-token KL figure of a :class:`kldiv.compare.Report`;
- :func:`save_figure`: atomic writer, in the format of the file's extension (PNG without one).
"""
from __future__ import annotations

from .figures import (
    plot_compare,
    plot_contributions,
    plot_distributions,
    plot_divergence_matrix,
    plot_table_file,
    save_figure,
)

__all__ = [
    "plot_distributions", "plot_contributions", "plot_divergence_matrix", "plot_compare",
    "plot_table_file", "save_figure",
]
