"""kldiv.compare: statistics against NumPy/SciPy computed here, streaming, mixed formats, errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats

from kldiv.compare import Report, compare
from kldiv.compare import stats as S
from kldiv.io import save_llamacpp_kld, save_safetensors


def pair(n=300, v=50, noise=0.2, seed=0):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((n, v)) * 2.5).astype(np.float32)
    b = (a + rng.standard_normal((n, v)) * noise * rng.uniform(0.1, 2, (n, 1))).astype(np.float32)
    tok = rng.integers(0, v, n)
    return a, b, tok


def naive_kl(a, b):
    """KL per row with scipy's rel_entr on float64 softmax (independent, fine at these sizes)."""
    p = scipy.special.softmax(a.astype(np.float64), axis=1)
    q = scipy.special.softmax(b.astype(np.float64), axis=1)
    return scipy.special.rel_entr(p, q).sum(1)


def interp_quantile(x, f):
    """llama.cpp's percentile(): linear interpolation at f * (n - 1) of the sorted values."""
    s = sorted(x)
    pos = f * (len(s) - 1)
    i = int(math.floor(pos))
    frac = pos - i
    return (1 - frac) * s[i] + frac * s[min(i + 1, len(s) - 1)]


def test_summary_matches_independent_statistics():
    a, b, tok = pair()
    r = compare(a, b, tokens=tok)
    kl = naive_kl(a, b)
    np.testing.assert_allclose(r.kl, kl, rtol=1e-6, atol=1e-12)
    s = r.summary()
    assert s["n_tokens"] == 300 and s["n_vocab"] == 50
    k = s["kl"]
    assert k["mean"] == pytest.approx(kl.mean(), rel=1e-6)
    # llama.cpp's error sqrt(var/(n-1)) is scipy's standard error of the mean
    assert k["mean_err"] == pytest.approx(scipy.stats.sem(kl), rel=1e-6)
    assert k["max"] == pytest.approx(kl.max(), rel=1e-6)
    assert k["min"] == pytest.approx(kl.min(), rel=1e-6)
    assert k["median"] == pytest.approx(np.median(kl), rel=1e-6)
    for f in S.KL_QUANTILES:
        assert k["quantiles"][f"{100 * f:.1f}%"] == pytest.approx(interp_quantile(kl, f), rel=1e-6)
    same = np.argmax(a, 1) == np.argmax(b, 1)
    share = same.mean()
    assert s["same_top"]["share"] == pytest.approx(share)
    assert s["same_top"]["share_err"] == pytest.approx(math.sqrt(share * (1 - share) / 299))
    p = scipy.special.softmax(a.astype(np.float64), axis=1)[np.arange(300), tok]
    q = scipy.special.softmax(b.astype(np.float64), axis=1)[np.arange(300), tok]
    dp = q - p
    d = s["delta_p"]
    assert d["mean"] == pytest.approx(dp.mean(), rel=1e-5, abs=1e-9)
    assert d["mean_err"] == pytest.approx(scipy.stats.sem(dp), rel=1e-5)
    assert d["rms"] == pytest.approx(math.sqrt(np.mean(dp**2)), rel=1e-5)
    assert d["rms_err"] == pytest.approx(0.5 / math.sqrt(np.mean(dp**2)) * scipy.stats.sem(dp**2), rel=1e-4)
    for f in S.DP_QUANTILES:
        assert d["quantiles"][f"{100 * f:.1f}%"] == pytest.approx(interp_quantile(dp, f), rel=1e-5, abs=1e-9)
    pp = s["perplexity"]
    assert pp["ppl_ref"] == pytest.approx(math.exp(-np.log(p).mean()), rel=1e-6)
    assert pp["ppl_other"] == pytest.approx(math.exp(-np.log(q).mean()), rel=1e-6)
    assert pp["ln_ppl_ratio"] == pytest.approx(np.log(p).mean() - np.log(q).mean(), rel=1e-5)
    np.testing.assert_allclose(r.p_top_ref, scipy.special.softmax(a.astype(np.float64), axis=1).max(1), rtol=1e-6)


def test_reverse_and_js():
    a, b, _ = pair(n=40, v=30)
    r = compare(a, b, reverse=True, js=True)
    np.testing.assert_allclose(r.reverse_kl, naive_kl(b, a), rtol=1e-6, atol=1e-12)
    p = scipy.special.softmax(a.astype(np.float64), axis=1)
    q = scipy.special.softmax(b.astype(np.float64), axis=1)
    js = scipy.spatial.distance.jensenshannon(p, q, axis=1) ** 2  # scipy: sqrt of JS in nats
    # float32 logits, float32 kernel: ~1e-7 typical, ~1e-6 worst relative error (target 1e-4)
    np.testing.assert_allclose(r.js, js, rtol=5e-6)
    assert "reverse_kl" in r.summary() and "js" in r.summary()


@pytest.mark.parametrize("fallback", [False, True])
def test_streaming_blocks_do_not_change_results(tmp_path, fallback):
    a, b, tok = pair(n=103, v=64)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    whole = compare(a, b, tokens=tok)
    blocks = compare(tmp_path / "a.npy", tmp_path / "b.npy", tokens=tok, chunk_rows=7,
                     force_fallback=fallback, threads=1)
    np.testing.assert_allclose(blocks.kl, whole.kl, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(blocks.delta_p, whole.delta_p, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(blocks.same_top, whole.same_top)
    from kldiv.compare import kernel as K

    compiled = not fallback and K.extension() is not None
    assert blocks.kernel == ("c-float32" if compiled else "numpy-float64")


def test_mixed_formats_and_kld_tokens(tmp_path):
    n_ctx, v = 10, 40
    per = n_ctx - 1 - n_ctx // 2
    a, b, _ = pair(n=3 * per, v=v, seed=3)
    rng = np.random.default_rng(3)
    toks = rng.integers(0, v, 3 * n_ctx)
    save_llamacpp_kld(tmp_path / "ref.kld", a, tokens=toks, n_ctx=n_ctx)
    save_safetensors(tmp_path / "oth.safetensors", {"logits": b})
    r = compare(tmp_path / "ref.kld", tmp_path / "oth.safetensors")
    assert r.formats == ("llama.cpp-kld", "safetensors")
    assert r.delta_p is not None  # tokens come from the llama.cpp file
    nxt = toks.reshape(3, n_ctx)[:, n_ctx // 2 + 1:].reshape(-1)
    q = scipy.special.softmax(b.astype(np.float64), axis=1)[np.arange(3 * per), nxt]
    p = scipy.special.softmax(a.astype(np.float64), axis=1)[np.arange(3 * per), nxt]
    np.testing.assert_allclose(r.delta_p, q - p, atol=5e-4)
    np.testing.assert_allclose(r.kl, naive_kl(a, b), rtol=0.02, atol=5e-4)


def test_nan_rows_error_or_skip(tmp_path):
    a, b, tok = pair(n=20, v=8)
    b[5, 2] = np.nan
    a[11, 0] = np.nan
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    with pytest.raises(ValueError, match=r"b\.npy: row 5 has NaN logits"):
        compare(tmp_path / "a.npy", tmp_path / "b.npy")
    r = compare(tmp_path / "a.npy", tmp_path / "b.npy", skip_nan=True, tokens=tok)
    assert r.n_skipped == 2 and r.n_tokens == 18
    assert r.skipped_rows.tolist() == [5, 11]
    keep = np.setdiff1d(np.arange(20), [5, 11])
    np.testing.assert_array_equal(r.rows, keep)
    np.testing.assert_allclose(r.kl, naive_kl(a[keep], b[keep]), rtol=1e-6, atol=1e-12)
    assert r.summary()["n_skipped_nan"] == 2
    a[3, 1] = np.inf  # +inf is an error even with skip_nan
    np.save(tmp_path / "a.npy", a)
    with pytest.raises(ValueError, match=r"a\.npy: row 3 has \+inf logits"):
        compare(tmp_path / "a.npy", tmp_path / "b.npy", skip_nan=True)


def test_shape_and_token_errors(tmp_path):
    a, b, tok = pair(n=10, v=8)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "c.npy", b[:, :7])
    with pytest.raises(ValueError, match=r"vocabulary sizes differ: .*a\.npy has 8.*c\.npy has 7"):
        compare(tmp_path / "a.npy", tmp_path / "c.npy")
    np.save(tmp_path / "d.npy", b[:9])
    with pytest.raises(ValueError, match=r"row counts differ: .*a\.npy has 10 rows.*d\.npy has 9"):
        compare(tmp_path / "a.npy", tmp_path / "d.npy")
    with pytest.raises(ValueError, match="3 tokens for 10 rows"):
        compare(a, b, tokens=[1, 2, 3])
    bad = tok.copy()
    bad[4] = 99
    np.save(tmp_path / "t.npy", bad)
    with pytest.raises(ValueError, match=r"t\.npy: token of row 4 is outside the vocabulary"):
        compare(a, b, tokens=str(tmp_path / "t.npy"))


def test_infinite_kl_is_reported_not_hidden():
    a = np.zeros((3, 4), np.float32)
    b = np.zeros((3, 4), np.float32)
    b[1, 2] = -np.inf  # q = 0 where p > 0
    r = compare(a, b)
    assert r.kl[1] == math.inf and r.kl[0] == 0
    s = r.summary()
    assert s["kl"]["max"] == math.inf and s["kl"]["mean"] == math.inf


def test_report_json_and_table(tmp_path):
    a, b, tok = pair(n=50, v=20)
    r = compare(a, b, tokens=tok, reverse=True)
    assert isinstance(r, Report)
    r.to_json(tmp_path / "r.json", per_token=True)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["kl"]["mean"] == pytest.approx(naive_kl(a, b).mean(), rel=1e-6)
    assert len(data["per_token"]["kl"]) == 50
    text = r.table()
    for line in ("Mean    KLD:", "Median  KLD:", "99.9%  KLD:", "Minimum KLD:", "RMS Δp    :",
                 "Same top p:", "Mean    RKL:"):
        assert line in text
    assert "mean KL" in repr(r)


def test_kldiv_compare_is_callable_both_ways():
    import kldiv
    import kldiv.compare as module  # once imported, kldiv.compare is the (callable) package

    a, b, _ = pair(n=5, v=6)
    np.testing.assert_allclose(kldiv.compare(a, b).kl, module.compare(a, b).kl)
    np.testing.assert_allclose(kldiv.compare(a, b).kl, naive_kl(a, b), rtol=1e-6, atol=1e-12)


def test_progress_bar_on_request(capsys):
    pytest.importorskip("tqdm")
    a, b, _ = pair(n=20, v=6)
    compare(a, b, progress=True, chunk_rows=5)
    assert "kldiv compare" in capsys.readouterr().err
    compare(a, b, chunk_rows=5)  # default: stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""


def test_row_mismatch_with_llamacpp_file_explains_scored_positions(tmp_path):
    a = np.zeros((3, 4), np.float32)
    save_llamacpp_kld(tmp_path / "a.kld", a, tokens=np.zeros(8, int), n_ctx=8)
    with pytest.raises(ValueError, match=r"has 3 rows.*has 8.*scored positions 4\.\.6"):
        compare(tmp_path / "a.kld", np.zeros((8, 4), np.float32))


def test_progress_default_follows_terminal_and_ci(monkeypatch):
    import sys

    from kldiv._progress import want_progress as _want_progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert _want_progress(None) is True
    monkeypatch.setenv("CI", "true")
    assert _want_progress(None) is False
    assert _want_progress(True) is True  # an explicit request wins
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert _want_progress(None) is False
