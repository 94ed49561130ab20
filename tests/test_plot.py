"""Figures: `kldiv plot`, the reusable bar charts and the compare figure are written as PNGs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.special

from kldiv.cli import main
from kldiv.plots import (
    plot_compare,
    plot_contributions,
    plot_distributions,
    plot_divergence_matrix,
)
from kldiv.plots.figures import divergence_matrix, read_table

PNG = b"\x89PNG\r\n\x1a\n"
DISTS = {"d1": [0.2, 0.3, 0.4, 0.1], "d2": [0.25, 0.25, 0.25, 0.25], "d3": [0.5, 0.5, 0.0, 0.0]}


def is_png(path):
    return path.exists() and path.read_bytes()[:8] == PNG


def test_plot_distributions_reusable(tmp_path):
    fig = plot_distributions(DISTS, title="t", path=tmp_path / "bars.png")
    assert is_png(tmp_path / "bars.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["d1", "d2", "d3"]
    assert len(ax.patches) == 12  # 3 distributions x 4 categories, overlaid
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted(round(x, 6) for v in DISTS.values() for x in v)
    # drawing into an existing axes (as a tutorial figure with several panels would)
    import matplotlib.pyplot as plt

    f2, axes = plt.subplots(1, 2)
    assert plot_distributions([[0.5, 0.5], [0.9, 0.1]], ax=axes[1]) is f2
    plt.close(f2)


def test_divergence_matrix_values():
    m = divergence_matrix(list(DISTS.values()))
    p = np.array(list(DISTS.values()))
    for i in range(3):
        for j in range(3):
            expect = scipy.special.rel_entr(p[i], p[j]).sum()
            assert m[i, j] == pytest.approx(expect, rel=1e-9, abs=1e-12) or (math.isinf(expect) and math.isinf(m[i, j]))
    assert math.isinf(m[2, 0]) is False and math.isinf(m[0, 2])


def test_contributions_and_heatmap_files(tmp_path):
    plot_contributions(DISTS["d1"], {"d2": DISTS["d2"], "d3": DISTS["d3"]}, path=tmp_path / "c.png")
    plot_divergence_matrix(DISTS, divergence="js", path=tmp_path / "h.png")
    assert is_png(tmp_path / "c.png") and is_png(tmp_path / "h.png")


def test_kldiv_plot_csv_and_json(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("label,a,b,c,d\n" + "\n".join(
        f"{k}," + ",".join(map(str, v)) for k, v in DISTS.items()) + "\n")
    assert main(["plot", str(tmp_path / "d.csv")]) == 0
    assert is_png(tmp_path / "d.png")
    (tmp_path / "d.json").write_text(json.dumps({"categories": list("abcd"), "distributions": DISTS}))
    assert main(["plot", str(tmp_path / "d.json"), "-o", str(tmp_path / "j.png"),
                 "--divergence", "jeffreys", "--reference", "d2"]) == 0
    assert is_png(tmp_path / "j.png")
    mat, labels, cats = read_table(tmp_path / "d.csv")
    assert labels == ["d1", "d2", "d3"] and cats == list("abcd")
    np.testing.assert_array_equal(mat, np.array(list(DISTS.values())))
    (tmp_path / "plain.csv").write_text("1,3\n2,2\n")
    assert main(["plot", str(tmp_path / "plain.csv"), "--normalize"]) == 0
    assert is_png(tmp_path / "plain.png")


def test_kldiv_plot_errors(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("0.5,0.6\n0.5,0.5\n")
    assert main(["plot", str(tmp_path / "bad.csv")]) == 1
    err = capsys.readouterr().err
    assert "dist_1" in err and "sums to 1.1" in err and "--normalize" in err
    (tmp_path / "neg.json").write_text(json.dumps([[1.2, -0.2], [0.5, 0.5]]))
    assert main(["plot", str(tmp_path / "neg.json")]) == 1
    assert "negative" in capsys.readouterr().err
    (tmp_path / "ragged.json").write_text(json.dumps({"a": [0.5, 0.5], "b": [1.0]}))
    assert main(["plot", str(tmp_path / "ragged.json")]) == 1
    assert "distribution 1 has 1 categories" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_plot_compare_figure(tmp_path):
    from kldiv.compare import compare
    from kldiv.data import example_logits

    ref, other, tok = example_logits(n_tokens=64, n_vocab=128)
    other[3] = ref[3]  # a token with KL exactly 0 (drawn at the floor of the log axis)
    r = compare(ref, other, tokens=tok)
    plot_compare(r, tmp_path / "cmp.png")
    assert is_png(tmp_path / "cmp.png")
    r2 = compare(ref, other)  # without tokens: no delta p panel
    plot_compare(r2, tmp_path / "cmp2.png")
    assert is_png(tmp_path / "cmp2.png")


def test_importing_kldiv_does_not_import_matplotlib():
    import subprocess
    import sys

    code = ("import sys, kldiv, kldiv.compare, kldiv.io; "
            "print('matplotlib' in sys.modules, 'tqdm' in sys.modules, 'safetensors' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_plot_compare_degenerate_reports(tmp_path):
    """Every KL infinite, or KL <= 0 (llama.cpp's sum): still a figure, no log-scale error."""
    import warnings

    from kldiv.compare import compare
    from kldiv.plots import plot_compare

    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 8)).astype(np.float32)
    b = a.copy()
    b[:, 0] = -np.inf  # the other model rules out a token the reference supports: KL = inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_compare(compare(a, b, tokens=np.zeros(6, int)), tmp_path / "inf.png")
        r = compare(a, a + 0.1 * rng.standard_normal(a.shape).astype(np.float32))
        r.kl = -np.abs(r.kl)
        plot_compare(r, tmp_path / "neg.png")
    assert is_png(tmp_path / "inf.png") and is_png(tmp_path / "neg.png")
