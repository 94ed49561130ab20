"""kldiv.compare / kldiv compare / kldiv eval with a llama.cpp KL base (.kld) reference (audit 4 F6).

(1) The reverse KL against a KL base file is refused with the reason (the file holds the
reference only within 16 nats of each row's largest log-probability; KL(other || reference) is
unbounded above over what lies below, and decoded as probability 0 it was +inf on every row),
and ``kldiv eval`` prints no column of inf for it. (2) JS (and the reverse KL of a dense
``--llamacpp`` reference) use the renormalised reference, as documented, not llama.cpp's cut one.
References: the stored rows decoded here from the file's bytes (llama.cpp's
``scale * u + min_log_prob`` in float32, the entries of a full window at ``u = 0`` dropped), and
float64 KL / JS of their renormalisation written out below.
"""
import json
import struct

import numpy as np
import pytest

from kldiv.cli import main
from kldiv.compare import compare
from kldiv.io import save_llamacpp_kld

N_CTX, V = 16, 500
ROWS = 5 * (N_CTX - 1 - N_CTX // 2)  # 35: the scored positions of 5 chunks

_rng = np.random.default_rng(4)
X = (_rng.standard_normal((ROWS, V)) * 6).astype(np.float32)  # ~60 nats wide: full windows
Y = (X + _rng.standard_normal(X.shape).astype(np.float32) * 0.02).astype(np.float32)
TOKENS = _rng.integers(0, V, 5 * N_CTX)


@pytest.fixture(scope="module")
def kld(tmp_path_factory):
    d = tmp_path_factory.mktemp("kld")
    path = d / "base.kld"
    save_llamacpp_kld(str(path), X, tokens=TOKENS, n_ctx=N_CTX)
    np.save(d / "other.npy", Y)
    return path


def _decoded_window(path):
    """The stored log-probabilities of each row, llama.cpp's layout read from the bytes: header
    (magic, n_ctx, n_vocab, n_chunk), token table, then rows of (float32 scale, float32
    min_log_prob, uint16 values padded to an even count). Entries of a full 16-nat window at the
    floor (u = 0) are -inf: below the window, not stored."""
    raw = path.read_bytes()
    n_ctx, n_vocab, n_chunk = struct.unpack("<3i", raw[8:20])
    off = 20 + 4 * n_ctx * n_chunk
    width = 4 + 2 * ((n_vocab + 1) // 2)
    rows = np.frombuffer(raw[off:], dtype="<u2").reshape(-1, width)
    head = np.ascontiguousarray(rows[:, :4]).view("<f4")
    scale, lo = head[:, :1], head[:, 1:2]
    u = rows[:, 4:4 + n_vocab]
    lp = (u.astype(np.float32) * scale).astype(np.float32) + lo
    full = scale * np.float32(65535) > np.float32(15.99)
    return np.where((u == 0) & full, -np.inf, lp.astype(np.float64))


def _log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))


def _kl(la, lb):
    pa = np.exp(la)
    with np.errstate(invalid="ignore"):
        return np.where(pa > 0, pa * (la - lb), 0.0).sum(1)


def _js(la, lb):
    pa, pb = np.exp(la), np.exp(lb)
    lm = np.log((pa + pb) / 2)
    with np.errstate(invalid="ignore"):
        return 0.5 * (np.where(pa > 0, pa * (la - lm), 0.0).sum(1)
                      + np.where(pb > 0, pb * (lb - lm), 0.0).sum(1))


@pytest.mark.parametrize("llamacpp", [None, False])
def test_reverse_against_kld_is_refused(kld, llamacpp):
    with pytest.raises(ValueError, match=r"reverse=True: .*base\.kld is a llama\.cpp KL base file.*"
                                         r"unbounded above"):
        compare(str(kld), Y, reverse=True, js=True, llamacpp=llamacpp)


def test_js_uses_the_window_renormalised_reference(kld):
    la = _log_softmax(_decoded_window(kld))
    assert np.isinf(la).any(axis=1).all()  # every row has entries below its window
    ref = _js(la, _log_softmax(Y))
    for llamacpp in (None, False):  # llama.cpp's statistics (the default) or kldiv's
        got = compare(str(kld), Y, js=True, llamacpp=llamacpp).js
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)


def test_dense_llamacpp_reference_reverse_and_js_renormalised(tmp_path):
    """``llamacpp=True`` on a dense reference of log-probabilities: llama.cpp's KL drops the
    terms <= -16, the reverse KL and JS use the whole row (before: the cut row, so reverse
    was +inf wherever the other model gave mass to a dropped entry)."""
    lp = _log_softmax(X)
    assert (lp <= -16).any(axis=1).all()
    path = tmp_path / "ref_logprobs.npy"
    np.save(path, lp.astype(np.float32))
    la = _log_softmax(lp.astype(np.float32))
    lb = _log_softmax(Y)
    r = compare(str(path), Y, reverse=True, js=True, llamacpp=True)
    np.testing.assert_allclose(r.reverse_kl, _kl(lb, la), rtol=1e-5, atol=0)
    np.testing.assert_allclose(r.js, _js(la, lb), rtol=1e-5, atol=0)


def test_cli_compare_reverse_is_one_line_error(kld, capsys):
    rc = main(["compare", str(kld), str(kld.parent / "other.npy"), "--reverse", "--js",
               "--no-progress", "--quiet"])
    cap = capsys.readouterr()
    assert rc == 1 and cap.err.count("\n") == 1 and "Traceback" not in cap.err + cap.out
    assert cap.err.startswith("kldiv compare: error: --reverse: ") and "unbounded above" in cap.err


def test_cli_eval_prints_no_inf_reverse_column(kld, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(kld), str(kld.parent / "other.npy"), "--json", str(out),
                 "--no-progress", "--resamples", "20"]) == 0
    text = capsys.readouterr().out
    block = text.split("====== Reverse KL divergence statistics ======")[1].split("======")[0]
    assert "inf" not in block and "not computed" in block
    cand = json.loads(out.read_text())["candidates"][0]
    assert cand["reverse_kl"] is None
    assert cand["kl"]["mean"] > 0 and cand["js"]["mean"] > 0
