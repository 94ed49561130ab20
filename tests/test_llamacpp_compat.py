"""llama.cpp compatibility: the KL base file round trip, and llama.cpp's own statistics.

The references here are independent of kldiv.io and kldiv.compare: a float32 NumPy transcription
of what tools/perplexity/perplexity.cpp does (its ``log_softmax`` that writes a base file, and
the ``log_softmax`` + ``kl_divergence`` that read one and print the statistics), with the file
parsed by np.frombuffer on the documented layout. The real llama.cpp is not needed.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kldiv.cli import main
from kldiv.compare import compare
from kldiv.io import convert_logits, open_logits

F = np.float32


# ------------------------------------------------------------- llama.cpp, transcribed (float32)


def llama_write(path, logits, tokens, n_ctx):
    """A KL base file as llama-perplexity --kl-divergence-base writes it (float32 arithmetic)."""
    x = np.asarray(logits, F)
    n, v = x.shape
    per = n_ctx - 1 - n_ctx // 2
    nv = 2 * ((v + 1) // 2) + 4
    rows = np.zeros((n, nv), np.uint16)
    for i in range(n):
        r = x[i]
        mx = r.max()
        mn = max(r.min(), F(mx - F(16)))
        sum_exp = np.exp((r - mx).astype(F)).astype(np.float64).sum()
        lse = F(np.log(sum_exp))
        min_lp = F(F(mn - mx) - lse)
        scale = F(F(mx - mn) / F(65535))
        rows[i, :4] = np.array([scale, min_lp], F).view(np.uint16)
        if scale:
            inv = F(F(1) / scale)
            q = np.rint((inv * (r - mn).astype(F)).astype(F))  # nearest_int: half to even
            rows[i, 4 : 4 + v] = np.where(r > mn, q, 0).astype(np.uint16)
    with open(path, "wb") as fh:
        fh.write(b"_logits_" + struct.pack("<3i", n_ctx, v, n // per))
        fh.write(np.asarray(tokens, "<i4").tobytes())
        fh.write(rows.tobytes())


def llama_parse(path):
    """(n_ctx, n_vocab, tokens, scale, min_log_prob, u) of a KL base file."""
    data = open(path, "rb").read()
    assert data[:8] == b"_logits_"
    n_ctx, v, n_chunk = struct.unpack_from("<3i", data, 8)
    tokens = np.frombuffer(data, "<i4", n_ctx * n_chunk, 20)
    nv = 2 * ((v + 1) // 2) + 4
    rows = np.frombuffer(data, "<u2", offset=20 + 4 * n_ctx * n_chunk).reshape(-1, nv)
    assert rows.shape[0] == n_chunk * (n_ctx - 1 - n_ctx // 2)
    head = np.ascontiguousarray(rows[:, :4]).view(F)
    return n_ctx, v, tokens, head[:, 0], head[:, 1], rows[:, 4 : 4 + v]


def llama_stats(base, other):
    """The numbers `llama-perplexity --kl-divergence` prints for a base file and the other
    model's logits of the same rows (tools/perplexity/perplexity.cpp, in float32)."""
    n_ctx, v, tokens, scale, lo, u = llama_parse(base)
    first = n_ctx // 2
    nxt = tokens.reshape(-1, n_ctx)[:, first + 1 :].reshape(-1)
    y = np.asarray(other, F)
    n = y.shape[0]
    kld = np.empty(n, F)
    pdiff = np.empty(n, F)
    sums = dict(nll=0.0, nll2=0.0, base=0.0, base2=0.0, cross=0.0, kld=0.0, kld2=0.0,
                pd=0.0, pd2=0.0, pd4=0.0, same=0)
    for i in range(n):
        logits, t = y[i], nxt[i]
        mx = logits.max()
        imax = int(np.argmax(logits))
        sum_exp = np.exp((logits - mx).astype(F)).astype(np.float64).sum()
        lse = F(np.log(sum_exp))
        nll = F(F(mx + lse) - logits[t])
        lpb = (F(scale[i]) * u[i].astype(F)).astype(F) + F(lo[i])
        nll_base = -lpb[t]
        sums["nll"] += float(nll)
        sums["nll2"] += float(F(nll * nll))
        sums["base"] += float(nll_base)
        sums["base2"] += float(F(nll_base * nll_base))
        sums["cross"] += float(F(nll * nll_base))
        m = F(mx + lse)
        keep = lpb > F(-16)
        terms = (np.exp(lpb) * ((lpb - logits).astype(F) + m).astype(F)).astype(F)
        s = float(terms[keep].astype(np.float64).sum())
        sums["kld"] += s
        sums["kld2"] += s * s
        sums["same"] += int(imax == int(np.argmax(lpb)))
        d = F(np.exp(-nll) - np.exp(-nll_base))
        sums["pd"] += float(d)
        sums["pd2"] += float(d) * float(d)
        sums["pd4"] += (float(d) * float(d)) ** 2
        kld[i], pdiff[i] = s, d

    def mean_unc(s, s2):
        f = s / n
        df = s2 / n - f * f
        return f, (np.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

    def percentile(vals, fraction):
        fr = F(fraction)
        p = F(fr * F(vals.size - 1))
        ip = int(p)
        p = F(p - F(ip))
        return F(F(F(1) - p) * vals[ip] + F(p * vals[min(ip + 1, vals.size - 1)]))

    def median(vals):
        k = vals.size
        return vals[k // 2] if k % 2 else F(F(0.5) * F(vals[k // 2] + vals[k // 2 - 1]))

    kld.sort()
    pdiff.sort()
    out = {}
    out["kld_mean"], out["kld_err"] = mean_unc(sums["kld"], sums["kld2"])
    out["kld_max"], out["kld_min"], out["kld_median"] = kld[-1], kld[0], median(kld)
    for f in (0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001):
        out[f"kld_{100 * f:.1f}"] = percentile(kld, f)
    out["dp_mean"], out["dp_err"] = mean_unc(sums["pd"], sums["pd2"])
    out["dp_max"], out["dp_min"], out["dp_median"] = pdiff[-1], pdiff[0], median(pdiff)
    for f in (0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001):
        out[f"dp_{100 * f:.1f}"] = percentile(pdiff, f)
    mse, mse_err = mean_unc(sums["pd2"], sums["pd4"])
    out["dp_rms"], out["dp_rms_err"] = np.sqrt(mse), 0.5 / np.sqrt(mse) * mse_err
    out["same"] = sums["same"] / n
    lp, lp_err = mean_unc(sums["nll"], sums["nll2"])
    lb, lb_err = mean_unc(sums["base"], sums["base2"])
    out["ppl"], out["ppl_err"] = np.exp(lp), np.exp(lp) * lp_err
    out["ppl_base"], out["ppl_base_err"] = np.exp(lb), np.exp(lb) * lb_err
    out["ln_ratio"] = lp - lb
    return out


def kldiv_numbers(report):
    """The same quantities from a kldiv Report's summary, under llama.cpp's names."""
    s = report.summary()
    k, d, p = s["kl"], s["delta_p"], s["perplexity"]
    out = {"kld_mean": k["mean"], "kld_err": k["mean_err"], "kld_max": k["max"],
           "kld_min": k["min"], "kld_median": k["median"],
           "dp_mean": d["mean"], "dp_err": d["mean_err"], "dp_max": d["max"], "dp_min": d["min"],
           "dp_median": d["median"], "dp_rms": d["rms"], "dp_rms_err": d["rms_err"],
           "same": s["same_top"]["share"], "ppl": p["ppl_other"], "ppl_err": p["ppl_other_err"],
           "ppl_base": p["ppl_ref"], "ppl_base_err": p["ppl_ref_err"], "ln_ratio": p["ln_ppl_ratio"]}
    for q, val in k["quantiles"].items():
        out[f"kld_{q[:-1]}"] = val
    for q, val in d["quantiles"].items():
        out[f"dp_{q[:-1]}"] = val
    out.pop("kld_50.0"), out.pop("dp_50.0")
    return out


def printed(stats):
    """Each number as llama.cpp prints it: %10.6f for KL and perplexity, percentages %6.3f."""
    out = {}
    for k, val in stats.items():
        if k.startswith("dp_") or k == "same":
            out[k] = f"{100 * float(val):6.3f}"
        else:
            out[k] = f"{float(val):10.6f}"
    return out


def model_pair(n_chunk=4, n_ctx=128, v=800, seed=0, spread=4.0, noise=0.3):
    """Reference and quantised-like logits of the scored rows (offsets up to 30, as a model's
    logits have), and a token table whose scored tokens are drawn from the reference."""
    rng = np.random.default_rng(seed)
    per = n_ctx - 1 - n_ctx // 2
    x = (rng.standard_normal((n_chunk * per, v)) * spread
         + rng.uniform(-30, 30, (n_chunk * per, 1))).astype(F)
    y = (x + rng.standard_normal(x.shape) * noise).astype(F)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    nxt = (p.cumsum(1) < rng.random((x.shape[0], 1))).sum(1).clip(0, v - 1)
    tokens = rng.integers(0, v, (n_chunk, n_ctx))
    tokens[:, n_ctx // 2 + 1 :] = nxt.reshape(n_chunk, per)
    return x, y, tokens.reshape(-1)


# ------------------------------------------------------------------------------ round trip


def _same_rows(a, b):
    _, _, ta, sa, la, ua = llama_parse(a)
    _, _, tb, sb, lb, ub = llama_parse(b)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(la, lb)  # min_log_prob, bit for bit
    np.testing.assert_array_equal(ua, ub)


@pytest.mark.parametrize("below_window", ["drop", "floor"])
def test_round_trip_is_lossless_directly_and_through_npy_and_safetensors(tmp_path, capsys,
                                                                         below_window):
    x, _, tokens = model_pair(n_chunk=2, n_ctx=32, v=300, spread=6.0)
    x[3, :40] = -np.inf  # probability 0 in the original
    x[4] = np.linspace(-3, 3, 300)  # a window that is not full
    base = tmp_path / "base.kld"
    llama_write(base, x, tokens, 32)
    bw = ["--below-window", below_window]
    assert main(["convert", str(base), str(tmp_path / "copy.kld"), *bw, "--no-progress"]) == 0
    _same_rows(base, tmp_path / "copy.kld")
    assert (tmp_path / "copy.kld").read_bytes() == base.read_bytes()
    for mid, extra in (("lp.npy", []), ("lp.safetensors", []), ("lp64.npy", ["--dtype", "float64"]),
                       ("lp64.safetensors", ["--dtype", "float64"])):
        assert main(["convert", str(base), str(tmp_path / mid), *bw, *extra, "--no-progress"]) == 0
        out = tmp_path / (mid + ".kld")
        assert main(["convert", str(tmp_path / mid), str(out), "--n-ctx", "32", "--tokens",
                     _tokens_file(tmp_path, tokens), "--no-progress"]) == 0
        assert out.read_bytes() == base.read_bytes(), mid
        # read -> write -> read: identical decoded values
        a = open_logits(base, below_window=below_window).read(0, 30)
        b = open_logits(out, below_window=below_window).read(0, 30)
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()


def _tokens_file(tmp_path, tokens):
    np.save(tmp_path / "tok.npy", np.asarray(tokens))
    return str(tmp_path / "tok.npy")


@settings(max_examples=25, deadline=None)
@given(v=st.integers(1, 70), spread=st.sampled_from([0.0, 0.3, 3.0, 8.0, 40.0]),
       shift=st.floats(-1e4, 1e4), seed=st.integers(0, 2**32 - 1),
       below=st.sampled_from(["drop", "floor"]), n_inf=st.integers(0, 5))
def test_round_trip_property(tmp_path_factory, v, spread, shift, seed, below, n_inf):
    """Any file llama.cpp writes: read -> write -> read gives the same stored rows."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, v)) * spread + shift).astype(F)
    x[:, : min(n_inf, v - 1)] = -np.inf
    d = tmp_path_factory.mktemp("rt")
    llama_write(d / "a.kld", x, rng.integers(0, v, 8), 8)
    src = open_logits(d / "a.kld", below_window=below)
    dec = src.read(0, 3)
    src.close()
    convert_logits(dec, d / "b.kld", tokens=llama_parse(d / "a.kld")[2], n_ctx=8)
    _same_rows(d / "a.kld", d / "b.kld")
    np.testing.assert_array_equal(open_logits(d / "b.kld", below_window=below).read(0, 3), dec)


def test_normalised_log_probs_are_stored_as_given(tmp_path):
    """Log-probabilities whose mass below the 16-nat window is gone are not renormalised."""
    rng = np.random.default_rng(3)
    v = 10000
    lp = np.empty((3, v))
    lp[:, 0] = 0.0
    lp[:, 1:1000] = rng.uniform(-14, -8, (3, 999))
    lp[:, 1000:] = -16.5 + rng.uniform(-0.3, 0.3, (3, v - 1000))  # below the window
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    cut = np.arange(v) >= 1000
    missing = np.exp(lp[:, cut]).sum(1)
    lp[:, cut] = -np.inf
    assert (missing > 2 * 16 / 65535).all()  # more than a quantisation step: renormalising shows
    convert_logits(lp.astype(F), tmp_path / "a.kld", tokens=np.zeros(8, int), n_ctx=8)
    _, _, _, scale, lo, u = llama_parse(tmp_path / "a.kld")
    dec = scale[:, None].astype(np.float64) * u + lo[:, None]
    keep = np.isfinite(lp)
    # within half a step of the values given (a renormalisation would shift them by -log(1 - m))
    assert np.abs(dec - lp)[keep].max() <= 0.5 * 16 / 65535 + 1e-5
    # logits (not normalised) are still encoded as llama.cpp encodes them
    x = rng.standard_normal((3, v)) * 3
    convert_logits((x + 5).astype(F), tmp_path / "b.kld", tokens=np.zeros(8, int), n_ctx=8)
    llama_write(tmp_path / "c.kld", (x + 5).astype(F), np.zeros(8, int), 8)
    _, _, _, s1, l1, u1 = llama_parse(tmp_path / "b.kld")
    _, _, _, s2, l2, u2 = llama_parse(tmp_path / "c.kld")
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_allclose(l1, l2, rtol=0, atol=4e-6)  # expf/log may differ by an ulp
    assert np.abs(u1.astype(int) - u2).max() <= 1


# ------------------------------------------------------------------------- the statistics


# llama.cpp forms each KL term in float32 (differences of logits of magnitude ~30: ulp 2e-6), so
# its per-token values carry a few 1e-6 nats of rounding that the means average away
MEANS = ("kld_mean", "kld_err", "dp_mean", "dp_err", "dp_rms", "dp_rms_err", "same", "ln_ratio")


@pytest.mark.parametrize("spread,noise,seed", [(4.0, 0.3, 0), (2.0, 0.05, 1), (7.0, 1.0, 2),
                                               (3.0, 0.02, 3)])
def test_compare_reproduces_llamacpp_statistics(tmp_path, spread, noise, seed):
    x, y, tokens = model_pair(spread=spread, noise=noise, seed=seed)
    llama_write(tmp_path / "base.kld", x, tokens, 128)
    want = llama_stats(tmp_path / "base.kld", y)
    r = compare(tmp_path / "base.kld", y)
    assert r.llamacpp and r.summary()["statistics"] == "llama.cpp"
    got = kldiv_numbers(r)
    assert got.keys() == want.keys()
    for k in want:
        g, w = float(got[k]), float(want[k])
        if k in MEANS:  # equal to the printed digits: within half a unit of the last one
            unit = 1e-5 if k.startswith("dp") or k == "same" else 1e-6
            assert abs(g - w) < 0.5 * unit, (k, g, w)
        elif k.startswith("ppl"):  # llama.cpp rounds each token's log-likelihood to float32
            assert g == pytest.approx(w, rel=3e-7), k
        else:  # order statistics of per-token values: llama.cpp's float32 rounding
            assert abs(g - w) < (1e-6 if k.startswith("dp") else 2e-6), (k, g, w)


def test_llamacpp_statistics_through_the_cli(tmp_path, capsys):
    import json

    x, y, tokens = model_pair(n_chunk=2, seed=4)
    llama_write(tmp_path / "base.kld", x, tokens, 128)
    want = printed(llama_stats(tmp_path / "base.kld", y))
    np.save(tmp_path / "y.npy", y)
    assert main(["compare", str(tmp_path / "base.kld"), str(tmp_path / "y.npy"),
                 "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "r.json").read_text())
    assert f"{data['kl']['mean']:10.6f}" == want["kld_mean"]
    assert f"Mean    KLD: {want['kld_mean']} ± {want['kld_err']}" in out
    assert f"Same top p: {want['same']:>7} %" in out


def test_renormalized_variant_and_its_difference(tmp_path, capsys):
    """--renormalize gives kldiv's KL: the decoded reference renormalised (oracle: scipy)."""
    import scipy.special

    x, y, tokens = model_pair(spread=6.0, noise=0.3, seed=5)
    llama_write(tmp_path / "base.kld", x, tokens, 128)
    r_ll = compare(tmp_path / "base.kld", y)
    r_kl = compare(tmp_path / "base.kld", y, llamacpp=False)
    assert not r_kl.llamacpp
    _, _, _, scale, lo, u = llama_parse(tmp_path / "base.kld")
    dec = scale[:, None].astype(np.float64) * u + lo[:, None]
    full = scale * 65535 >= 16 - 1e-3
    p = scipy.special.softmax(np.where((u == 0) & full[:, None], -np.inf, dec), axis=1)
    q = scipy.special.softmax(y.astype(np.float64), axis=1)
    np.testing.assert_allclose(r_kl.kl, scipy.special.rel_entr(p, q).sum(1), rtol=2e-4, atol=1e-8)
    assert r_ll.kl.mean() != pytest.approx(r_kl.kl.mean(), rel=1e-4)
    np.save(tmp_path / "y.npy", y)
    assert main(["compare", str(tmp_path / "base.kld"), str(tmp_path / "y.npy"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "llama.cpp" in out and "--renormalize" in out and "standard error" in out
    assert main(["compare", str(tmp_path / "base.kld"), str(tmp_path / "y.npy"), "--renormalize",
                 "--no-progress"]) == 0
    assert "as llama.cpp computes it" not in capsys.readouterr().out


def test_converted_file_with_llamacpp_flag_gives_the_same_numbers(tmp_path, capsys):
    x, y, tokens = model_pair(n_chunk=2, seed=7)
    llama_write(tmp_path / "base.kld", x, tokens, 128)
    assert main(["convert", str(tmp_path / "base.kld"), str(tmp_path / "lp.npy"),
                 "--below-window", "floor", "--no-progress"]) == 0
    capsys.readouterr()
    nxt = open_logits(tmp_path / "base.kld").tokens
    a = compare(tmp_path / "base.kld", y)
    b = compare(tmp_path / "lp.npy", y, tokens=nxt, llamacpp=True)
    np.testing.assert_array_equal(a.kl, b.kl)
    np.testing.assert_array_equal(a.delta_p, b.delta_p)
