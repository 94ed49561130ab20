"""`kldiv compare` end to end through kldiv.cli.main on temporary files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.special

from kldiv.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def files(tmp_path, n=64, v=32, seed=0):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((n, v)) * 2).astype(np.float32)
    b = (a + rng.standard_normal((n, v)) * 0.1).astype(np.float32)
    t = rng.integers(0, v, n)
    np.save(tmp_path / "ref.npy", a)
    np.save(tmp_path / "oth.npy", b)
    (tmp_path / "tok.txt").write_text(" ".join(map(str, t)))
    return a, b, t


def test_compare_cli_end_to_end(tmp_path, capsys):
    a, b, t = files(tmp_path)
    rc = main(["compare", str(tmp_path / "ref.npy"), str(tmp_path / "oth.npy"),
               "--tokens", str(tmp_path / "tok.txt"), "--json", str(tmp_path / "out" / "r.json"),
               "--plot", str(tmp_path / "out" / "r.png"), "--reverse", "--js", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Mean    KLD:" in out and "Same top p:" in out and "Mean    JSD:" in out
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    p = scipy.special.softmax(a.astype(np.float64), axis=1)
    q = scipy.special.softmax(b.astype(np.float64), axis=1)
    kl = scipy.special.rel_entr(p, q).sum(1)
    assert data["kl"]["mean"] == pytest.approx(kl.mean(), rel=1e-6)
    assert data["n_tokens"] == 64 and "delta_p" in data and "reverse_kl" in data
    assert (tmp_path / "out" / "r.png").read_bytes()[:8] == PNG
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.startswith(".")]  # no temp files


def test_compare_cli_example(tmp_path, capsys):
    rc = main(["compare", "--example", "--example-dir", str(tmp_path / "ex"),
               "--plot", str(tmp_path / "ex.png"), "--json", str(tmp_path / "ex.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Mean    KLD:" in out and "Δp" in out
    data = json.loads((tmp_path / "ex.json").read_text())
    assert data["n_tokens"] == 256 and data["n_vocab"] == 512
    # the example is a mild perturbation: mean KL well below 0.1 nats, top token mostly kept
    assert 1e-5 < data["kl"]["mean"] < 0.1 and data["same_top"]["share"] > 0.9
    assert (tmp_path / "ex.png").read_bytes()[:8] == PNG


def test_compare_cli_errors(tmp_path, capsys):
    a, b, _ = files(tmp_path)
    np.save(tmp_path / "small.npy", b[:, :10])
    rc = main(["compare", str(tmp_path / "ref.npy"), str(tmp_path / "small.npy")])
    err = capsys.readouterr().err
    assert rc == 1 and "vocabulary sizes differ" in err and "small.npy" in err
    rc = main(["compare", str(tmp_path / "ref.npy")])
    assert rc == 1 and "need REFERENCE and OTHER" in capsys.readouterr().err
    rc = main(["compare", str(tmp_path / "ref.npy"), str(tmp_path / "nope.npy")])
    assert rc == 1 and "nope.npy" in capsys.readouterr().err
    b[7, 3] = np.nan
    np.save(tmp_path / "nan.npy", b)
    rc = main(["compare", str(tmp_path / "ref.npy"), str(tmp_path / "nan.npy")])
    assert rc == 1 and "nan.npy: row 7 has NaN logits" in capsys.readouterr().err
    rc = main(["compare", str(tmp_path / "ref.npy"), str(tmp_path / "nan.npy"), "--skip-nan",
               "--json", str(tmp_path / "s.json"), "--quiet"])
    assert rc == 0
    assert json.loads((tmp_path / "s.json").read_text())["n_skipped_nan"] == 1


def test_no_progress_bar_when_piped(tmp_path, capsys, monkeypatch):
    files(tmp_path)
    monkeypatch.delenv("CI", raising=False)
    rc = main(["compare", str(tmp_path / "ref.npy"), str(tmp_path / "oth.npy"), "--quiet"])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.out == "" and "tok/s" not in cap.err and "%|" not in cap.err
