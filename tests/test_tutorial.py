"""`kldiv tutorial`: its numbers against scipy and the Gluon formula written out, its figures."""
import numpy as np
import pytest
from scipy.special import rel_entr

from kldiv.cli import main
from kldiv.cli.tutorial import DIST_1, DIST_2, DIST_3, DIST_4, LOGITS_1, tutorial_rows


def test_logits_of_dist_1_softmax_back_to_it():
    e = np.exp(LOGITS_1 - LOGITS_1.max())
    np.testing.assert_allclose(e / e.sum(), DIST_1, rtol=1e-12)


def test_rows_against_scipy_and_gluon_formula():
    rows = tutorial_rows()
    pairs = [(DIST_1, DIST_2), (DIST_1, DIST_3), (DIST_1, DIST_1), (DIST_4, DIST_1),
             (DIST_4, DIST_4), (DIST_1, DIST_2)]
    for (label, true, mean, total), (a, b) in zip(rows, pairs):
        with np.errstate(divide="ignore", invalid="ignore"):
            ref = rel_entr(b, a).sum()
            gluon = b * (np.log(b + 1e-12) - np.log(a))  # MXNet: label * (log(label+eps) - pred)
        if np.isnan(gluon.sum()):
            assert np.isnan(mean) and np.isnan(total)
        else:
            np.testing.assert_allclose(total, gluon.sum(), rtol=1e-9)
            np.testing.assert_allclose(mean, gluon.mean(), rtol=1e-9)
        np.testing.assert_allclose(true, ref, rtol=1e-12)
    assert np.isinf(rows[3][1]) and rows[4][1] == 0.0  # dist_1 vs dist_4: +inf; dist_4 vs itself: 0


def test_cli_prints_and_writes_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["tutorial", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{rel_entr(DIST_2, DIST_1).sum():.6f}" in out
    for name in ("distributions.png", "common_support.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
