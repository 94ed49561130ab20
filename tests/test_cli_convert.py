"""`kldiv convert` (kldiv.cli.main) and kldiv.io.convert_logits / the streaming writers.

References are independent of the code under test: scipy.special.log_softmax / rel_entr for the
log-probabilities and KL, the `safetensors` package (numpy and torch APIs) and torch's own
bfloat16 rounding for safetensors, np.load for .npy, and a struct parse of llama.cpp's layout
(tools/perplexity/perplexity.cpp) for the KL base file.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
import scipy.special

from kldiv.cli import main
from kldiv.io import (
    LlamaCppKldWriter,
    NpyWriter,
    SafetensorsWriter,
    convert_logits,
    open_logits,
    save_llamacpp_kld,
)

STEP = 16 / 65535  # llama.cpp's quantisation step for a full 16-nat window


def logits(n, v, scale=6.0, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal((n, v)) * scale).astype(dtype)


def parse_kld(path):
    """(n_ctx, n_vocab, n_chunk, tokens, scale, min_lp, u) of a llama.cpp KL base file (struct)."""
    data = open(path, "rb").read()
    assert data[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<3i", data, 8)
    ntok = n_ctx * n_chunk
    tokens = np.array(struct.unpack_from(f"<{ntok}i", data, 20))
    nv = 2 * ((n_vocab + 1) // 2) + 4
    off = 20 + 4 * ntok
    rows = n_chunk * (n_ctx - 1 - n_ctx // 2)
    scale, lo, u = [], [], []
    for _ in range(rows):
        s, m = struct.unpack_from("<ff", data, off)
        scale.append(s)
        lo.append(m)
        u.append(struct.unpack_from(f"<{n_vocab}H", data, off + 8))
        off += 2 * nv
    assert off == len(data)
    return n_ctx, n_vocab, n_chunk, tokens, np.array(scale), np.array(lo), np.array(u, np.int64)


def run(argv, capsys):
    rc = main(["convert", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def error(argv, capsys):
    rc, out, err = run(argv, capsys)
    assert rc == 1 and out == ""
    assert err.startswith("kldiv convert: error: ") and err.count("\n") == 1
    return err


def no_leftovers(d, name):
    return not (d / name).exists() and not list(d.glob(f".{name}*"))


# ---------------------------------------------------------------------- round trips


def test_npy_to_llamacpp_round_trip(tmp_path, capsys):
    n_ctx, n_chunk, v = 10, 3, 64
    per = n_ctx - 1 - n_ctx // 2  # 4 scored rows per chunk
    x = logits(n_chunk * per, v, scale=6.0)  # wide rows: many entries fall below the window
    x[1] = np.linspace(-3, 3, v)  # a row entirely inside the window
    tok = np.random.default_rng(1).integers(0, v, n_chunk * n_ctx)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "tok.txt").write_text(" ".join(map(str, tok)))
    rc, out, _ = run([tmp_path / "x.npy", tmp_path / "base.kld", "--n-ctx", n_ctx,
                      "--tokens", tmp_path / "tok.txt"], capsys)
    assert rc == 0
    assert out.count("\n") == 1 and "12 rows x 64 vocab" in out and "llama.cpp" in out
    size = (tmp_path / "base.kld").stat().st_size
    assert f"{size} bytes" in out and size == 20 + 4 * n_chunk * n_ctx + 12 * 2 * (64 + 4)

    c, nv_, nch, t, scale, lo, u = parse_kld(tmp_path / "base.kld")
    assert (c, nv_, nch) == (n_ctx, v, n_chunk)
    np.testing.assert_array_equal(t, tok)
    true = scipy.special.log_softmax(x.astype(np.float64), axis=1)
    dec = scale[:, None] * u + lo[:, None]
    window = np.minimum(16.0, x.max(1) - x.min(1)).astype(np.float64)
    inside = x >= x.max(1, keepdims=True) - window[:, None] + 1e-3
    assert (~inside).sum() > 20  # the test exercises the window
    # within half a quantisation step (16/65535 for a full window) plus float32 rounding
    assert np.max(np.abs(dec - true)[inside]) <= 0.5 * STEP + 2e-5
    assert np.all(u[~inside] == 0)

    # per-token KL of the decoded file against the original: small (scipy on the decoded rows,
    # and kldiv compare on the two files)
    from kldiv.compare import compare

    r = compare(tmp_path / "base.kld", tmp_path / "x.npy", llamacpp=False)  # kldiv's renormalised KL
    full = scale * 65535 >= 16 - 1e-3  # below a full window: probability 0 for a reference
    assert not full[1] and full.sum() == 11
    p = scipy.special.softmax(np.where((u == 0) & full[:, None], -np.inf, dec), axis=1)
    q = scipy.special.softmax(x.astype(np.float64), axis=1)
    kl = scipy.special.rel_entr(p, q).sum(1)
    np.testing.assert_allclose(r.kl, kl, rtol=1e-4, atol=1e-7)
    assert kl.max() < 1e-3
    assert r.delta_p is not None and r.delta_p.shape == (12,)  # next tokens from the token table


def test_npy_to_safetensors(tmp_path, capsys):
    from safetensors.numpy import load_file

    x = logits(7, 9)
    np.save(tmp_path / "x.npy", x.reshape(7, 1, 9))  # (..., vocab) input: written as (rows, vocab)
    rc, out, _ = run([tmp_path / "x.npy", tmp_path / "x.safetensors"], capsys)
    assert rc == 0 and "safetensors float32" in out
    back = load_file(str(tmp_path / "x.safetensors"))
    assert list(back) == ["logits"]
    np.testing.assert_array_equal(back["logits"], x)
    assert back["logits"].dtype == np.float32

    rc, out, _ = run([tmp_path / "x.npy", tmp_path / "h.safetensors", "--dtype", "float16",
                      "--out-key", "lm_logits"], capsys)
    assert rc == 0
    back = load_file(str(tmp_path / "h.safetensors"))
    assert back["lm_logits"].dtype == np.float16
    np.testing.assert_array_equal(back["lm_logits"], x.astype(np.float16))
    # float16 input keeps its dtype by default, in both directions
    rc, out, _ = run([tmp_path / "h.safetensors", tmp_path / "h.npy"], capsys)
    assert rc == 0 and ".npy float16" in out
    np.testing.assert_array_equal(np.load(tmp_path / "h.npy"), x.astype(np.float16))


def test_safetensors_bfloat16_matches_torch(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    x = logits(20, 33, scale=50.0, seed=3)
    x[0, :3] = [np.nan, np.inf, -np.inf]  # carried over as they are
    x[1, :4] = np.frombuffer(struct.pack("<4I", 0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF),
                             np.float32)  # ties to even (both ways), above and below a tie
    np.save(tmp_path / "x.npy", x)
    rc, _, _ = run([tmp_path / "x.npy", tmp_path / "b.safetensors", "--dtype", "bfloat16"], capsys)
    assert rc == 0
    got = load_file(str(tmp_path / "b.safetensors"))["logits"]
    assert got.dtype == torch.bfloat16
    want = torch.from_numpy(x).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16)[1:], want.view(torch.int16)[1:])
    assert torch.isnan(got[0, 0]) and got[0, 1] == float("inf") and got[0, 2] == float("-inf")
    assert torch.equal(got[0, 3:], want[0, 3:])
    # bfloat16 back to .npy: widened to float32, exactly
    rc, out, _ = run([tmp_path / "b.safetensors", tmp_path / "w.npy"], capsys)
    assert rc == 0 and ".npy float32" in out
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), want.float().numpy())


def test_llamacpp_to_npy_decoded_log_probs(tmp_path, capsys):
    n_ctx, v = 8, 37  # odd vocabulary: rows padded to an even uint16 count
    x = logits(6, v, scale=7.0, seed=2)
    tok = np.arange(16) % v
    save_llamacpp_kld(tmp_path / "b.kld", x, tokens=tok, n_ctx=n_ctx)
    _, _, _, _, scale, lo, u = parse_kld(tmp_path / "b.kld")
    floor = scale[:, None] * u + lo[:, None]
    full = scale * 65535 >= 16 - 1e-3
    drop = np.where((u == 0) & full[:, None], -np.inf, floor)
    assert np.isinf(drop).sum() > 10

    rc, out, _ = run([tmp_path / "b.kld", tmp_path / "lp.npy"], capsys)
    assert rc == 0 and "6 rows x 37 vocab, .npy float32" in out
    np.testing.assert_allclose(np.load(tmp_path / "lp.npy"), drop, rtol=0, atol=2e-6)
    rc, _, _ = run([tmp_path / "b.kld", tmp_path / "fl.npy", "--below-window", "floor"], capsys)
    assert rc == 0
    got = np.load(tmp_path / "fl.npy")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, floor, rtol=0, atol=2e-6)
    # and they are the model's log-probabilities, within the quantisation
    true = scipy.special.log_softmax(x.astype(np.float64), axis=1)
    keep = np.isfinite(drop)
    assert np.max(np.abs(got - true)[keep]) <= 0.5 * STEP + 2e-5


def test_llamacpp_to_llamacpp_reuses_n_ctx_and_tokens(tmp_path, capsys):
    n_ctx, v = 12, 20
    x = logits(10, v, scale=8.0, seed=5)
    x[3, 5] = -np.inf  # probability 0 is allowed: stored below the window
    tok = np.random.default_rng(7).integers(0, v, 2 * n_ctx)
    with LlamaCppKldWriter(tmp_path / "a.kld", v, tokens=tok, n_ctx=n_ctx) as w:
        w.write(x[:4])
        w.write(x[4:])
    assert open_logits(tmp_path / "a.kld").read(3, 4)[0, 5] == -np.inf
    rc, out, _ = run([tmp_path / "a.kld", tmp_path / "b.bin"], capsys)  # .bin: llama.cpp
    assert rc == 0 and "(n_ctx 12, 2 chunks)" in out
    a, b = parse_kld(tmp_path / "a.kld"), parse_kld(tmp_path / "b.bin")
    assert a[:3] == b[:3]
    np.testing.assert_array_equal(a[3], b[3])
    # decoding and re-encoding moves a log-probability by at most a quantisation step
    da, db = a[4][:, None] * a[6] + a[5][:, None], b[4][:, None] * b[6] + b[5][:, None]
    assert np.max(np.abs(da - db)) <= STEP
    # --tokens replaces the token table of a llama.cpp input
    (tmp_path / "t.txt").write_text(",".join(["3"] * 24))
    rc, _, _ = run([tmp_path / "a.kld", tmp_path / "c.kld", "--tokens", tmp_path / "t.txt",
                    "--n-ctx", 12], capsys)
    assert rc == 0
    assert parse_kld(tmp_path / "c.kld")[3].tolist() == [3] * 24


def test_tokens_from_npy_and_library_api(tmp_path, capsys):
    x = logits(6, 10)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", (np.arange(16) % 10).reshape(2, 8))  # any integer shape, flattened
    rc, _, _ = run([tmp_path / "x.npy", tmp_path / "o.dat", "--n-ctx", 8, "--tokens",
                    tmp_path / "t.npy"], capsys)
    assert rc == 0
    src = open_logits(tmp_path / "o.dat")
    assert src.tokens.tolist() == [5, 6, 7, 3, 4, 5]  # next tokens of rows 4..6 of each chunk
    r = convert_logits(x, tmp_path / "py.kld", tokens=np.arange(16) % 10, n_ctx=8, chunk_rows=4)
    assert (tmp_path / "py.kld").read_bytes() == (tmp_path / "o.dat").read_bytes()
    assert (r.format, r.n_chunk, r.nbytes) == ("llamacpp", 2, (tmp_path / "o.dat").stat().st_size)


def test_streaming_blocks_and_writers(tmp_path):
    x = logits(11, 6, scale=2.0, dtype=np.float64)
    r = convert_logits(x, tmp_path / "a.npy", chunk_rows=3)  # float64 stays float64
    assert r.dtype == "float64"
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), x)
    convert_logits(tmp_path / "a.npy", tmp_path / "b.npy", dtype="float16", chunk_rows=2)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), x.astype(np.float16))
    with SafetensorsWriter(tmp_path / "s.safetensors", (11, 6), "float32", key="z",
                           metadata={"source": "test"}) as w:
        for s in range(0, 11, 4):
            w.write(x[s:s + 4])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), "np") as f:
        assert f.metadata() == {"source": "test"}
        np.testing.assert_array_equal(f.get_tensor("z"), x.astype(np.float32))


def test_progress_bar_on_stderr(tmp_path, capsys):
    convert_logits(logits(4, 3), tmp_path / "c.npy", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "kldiv convert" in err


# ---------------------------------------------------------------------- errors


@pytest.fixture
def inputs(tmp_path):
    x = logits(6, 10)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "t16.txt").write_text(" ".join(str(i % 10) for i in range(16)))
    return tmp_path, x


def test_error_unknown_suffix(inputs, capsys):
    d, x = inputs
    err = error([d / "x.npy", d / "out.txt"], capsys)
    assert "out.txt: cannot tell the output format" in err and "'.txt'" in err and "--to" in err
    err = error([d / "x.npy", d / "out"], capsys)
    assert "no suffix" in err
    rc, out, _ = run([d / "x.npy", d / "out.txt", "--to", "npy"], capsys)  # --to decides
    assert rc == 0
    np.testing.assert_array_equal(np.load(d / "out.txt"), x)


def test_error_missing_and_wrong_n_ctx(inputs, capsys):
    d, _ = inputs
    err = error([d / "x.npy", d / "o.kld", "--tokens", d / "t16.txt"], capsys)
    assert "--n-ctx is required for llama.cpp output" in err
    err = error([d / "x.npy", d / "o.kld", "--n-ctx", 2, "--tokens", d / "t16.txt"], capsys)
    assert "--n-ctx must be >= 3" in err
    save_llamacpp_kld(d / "b.kld", logits(6, 10), tokens=np.zeros(16, int), n_ctx=8)
    err = error([d / "b.kld", d / "o.kld", "--n-ctx", 10], capsys)
    assert "--n-ctx 10 contradicts the n_ctx 8 of" in err
    err = error([d / "x.npy", d / "o.npy", "--n-ctx", 8], capsys)
    assert "--n-ctx only applies to llama.cpp output, not npy" in err
    assert no_leftovers(d, "o.kld") and no_leftovers(d, "o.npy")


def test_error_wrong_row_count(inputs, capsys):
    d, _ = inputs
    err = error([d / "x.npy", d / "o.kld", "--n-ctx", 9, "--tokens", d / "t16.txt"], capsys)
    # n_ctx 9: 4 scored rows per chunk; 6 rows is not a whole number of chunks
    assert "x.npy has 6 rows, not a whole number of chunks" in err
    assert "--n-ctx 9" in err and "4 scored rows per chunk" in err and "multiple of 4" in err
    assert no_leftovers(d, "o.kld")


def test_error_tokens(inputs, capsys):
    d, _ = inputs
    err = error([d / "x.npy", d / "o.kld", "--n-ctx", 8], capsys)
    assert "--tokens is required for llama.cpp output" in err and "2 * 8 = 16" in err
    (d / "t6.txt").write_text("1 2 3 4 5 6")
    err = error([d / "x.npy", d / "o.kld", "--n-ctx", 8, "--tokens", d / "t6.txt"], capsys)
    assert "t6.txt: 6 token ids, expected n_chunk * n_ctx = 2 * 8 = 16" in err
    assert "one id per row" in err  # the hint for a next-token file
    (d / "t15.txt").write_text(" ".join(["1"] * 15))
    err = error([d / "x.npy", d / "o.kld", "--n-ctx", 8, "--tokens", d / "t15.txt"], capsys)
    assert "15 token ids, expected" in err and "one id per row" not in err
    (d / "tbig.txt").write_text(" ".join(["1"] * 10 + ["10"] + ["1"] * 5))
    err = error([d / "x.npy", d / "o.kld", "--n-ctx", 8, "--tokens", d / "tbig.txt"], capsys)
    assert "token id 10 at position 10 is outside the vocabulary [0, 10)" in err
    np.save(d / "tf.npy", np.zeros(16))
    err = error([d / "x.npy", d / "o.kld", "--n-ctx", 8, "--tokens", d / "tf.npy"], capsys)
    assert "tokens must be integers" in err
    err = error([d / "x.npy", d / "o.npy", "--tokens", d / "t16.txt"], capsys)
    assert "--tokens" in err and "only applies to llama.cpp output" in err
    assert no_leftovers(d, "o.kld") and no_leftovers(d, "o.npy")


def test_error_dtypes(inputs, capsys):
    d, _ = inputs
    err = error([d / "x.npy", d / "o.npy", "--dtype", "bfloat16"], capsys)
    assert "--dtype bfloat16: .npy has no bfloat16" in err and ".safetensors" in err
    err = error([d / "x.npy", d / "o.kld", "--dtype", "float16", "--n-ctx", 8,
                 "--tokens", d / "t16.txt"], capsys)
    assert "--dtype applies to .npy and .safetensors output only" in err
    big = logits(5, 4)
    big[3, 2] = 1e5  # finite, beyond float16's 65504
    np.save(d / "big.npy", big)
    err = error([d / "big.npy", d / "o.safetensors", "--dtype", "float16"], capsys)
    assert "big.npy: row 3 has a logit (" in err and "column 2" in err and "range of float16" in err
    np.save(d / "int.npy", np.zeros((3, 4), np.int32))
    err = error([d / "int.npy", d / "o.npy"], capsys)
    assert "floating point" in err
    assert no_leftovers(d, "o.npy") and no_leftovers(d, "o.safetensors")
    err = error([d / "missing.npy", d / "o.npy"], capsys)
    assert "missing.npy: no such file" in err


@pytest.mark.parametrize("bad, what", [(np.nan, "NaN"), (np.inf, "+inf"), (None, "no finite")])
def test_error_non_finite_row_named(inputs, capsys, bad, what):
    d, x = inputs
    x = x.copy()
    if bad is None:
        x[4] = -np.inf
    else:
        x[4, 7] = bad
    np.save(d / "nan.npy", x)
    err = error([d / "nan.npy", d / "o.kld", "--n-ctx", 8, "--tokens", d / "t16.txt"], capsys)
    assert f"nan.npy: row 4 has {what} logits" in err
    assert no_leftovers(d, "o.kld")


def test_atomic_on_error_mid_write(tmp_path, capsys):
    x = logits(30, 10)
    x[25, 3] = np.nan  # met after 6 blocks of 4 rows have been written
    np.save(tmp_path / "x.npy", x)
    tok = np.zeros(8 * 10, int)
    with pytest.raises(ValueError, match=r"x\.npy: row 25 has NaN logits"):
        convert_logits(tmp_path / "x.npy", tmp_path / "o.kld", tokens=tok, n_ctx=8, chunk_rows=4)
    assert no_leftovers(tmp_path, "o.kld")
    # an existing OUTPUT is left as it was
    (tmp_path / "old.kld").write_bytes(b"old contents")
    np.savetxt(tmp_path / "t.txt", tok, fmt="%d")
    err = error([tmp_path / "x.npy", tmp_path / "old.kld", "--n-ctx", 8, "--tokens",
                 tmp_path / "t.txt"], capsys)
    assert "row 25 has NaN" in err
    assert (tmp_path / "old.kld").read_bytes() == b"old contents"
    assert not list(tmp_path.glob(".old.kld*"))
    # a writer that is not given all its rows leaves nothing either
    with pytest.raises(ValueError, match="3 rows written, the header promises 4"):
        with NpyWriter(tmp_path / "short.npy", (4, 10)) as w:
            w.write(x[:3])
    assert no_leftovers(tmp_path, "short.npy")
    with pytest.raises(ValueError, match="5 rows written, the header promises 4"):
        with NpyWriter(tmp_path / "long.npy", (4, 10)) as w:
            w.write(x[:5])
    assert no_leftovers(tmp_path, "long.npy")
    # and a success replaces the old file
    x[25, 3] = 0
    np.save(tmp_path / "x.npy", x)
    rc, _, _ = run([tmp_path / "x.npy", tmp_path / "old.kld", "--n-ctx", 8, "--tokens",
                    tmp_path / "t.txt"], capsys)
    assert rc == 0 and open_logits(tmp_path / "old.kld").n_rows == 30
    assert not list(tmp_path.glob(".old.kld*"))


def test_help_lists_convert(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "convert" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["convert", "a.npy", "b.npy", "--dtype", "int8"])
    assert e.value.code == 2  # argparse's own usage error
    assert "invalid choice" in capsys.readouterr().err
