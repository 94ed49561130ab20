"""Logits readers/writers: round trips through independent implementations, and bad files.

References: numpy's own np.save/np.load, the `safetensors` package (numpy and torch APIs), and
a llama.cpp KL-base writer/parser written here from the file layout of
tools/perplexity/perplexity.cpp (struct + plain loops, float32 arithmetic as in llama.cpp).
"""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from kldiv.io import (
    kld_next_tokens,
    kld_scored_per_chunk,
    load_tokens,
    open_logits,
    save_llamacpp_kld,
    save_npy,
    save_safetensors,
)

RNG = np.random.default_rng(11)


def logits(n, v, scale=4.0, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, v)) * scale).astype(np.float32)


# ---------------------------------------------------------------------- llama.cpp, independently


def ref_kld_write(path, rows, tokens, n_ctx):
    """llama.cpp's --kl-divergence-base layout, row by row (independent of kldiv.io)."""
    n_rows, n_vocab = rows.shape
    n_chunk = n_rows // kld_scored_per_chunk_ref(n_ctx)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as fh:
        fh.write(b"_logits_")
        fh.write(struct.pack("<iii", n_ctx, n_vocab, n_chunk))
        fh.write(struct.pack(f"<{len(tokens)}i", *[int(t) for t in tokens]))
        for x in rows.astype(np.float32):
            mx, mn = np.float32(x.max()), np.float32(x.min())
            mn = max(mn, np.float32(mx - np.float32(16)))
            sum_exp = sum(float(np.exp(np.float32(v - mx))) for v in x)
            lse = np.float32(math.log(sum_exp))
            min_lp = np.float32(mn - mx - lse)
            scale = np.float32((mx - mn) / np.float32(65535))
            vals = [0] * (nv - 4)
            if scale:
                inv = np.float32(1) / scale
                for i, v in enumerate(x):
                    vals[i] = int(np.rint(np.float32(inv * np.float32(v - mn)))) if v > mn else 0
            fh.write(struct.pack("<ff", scale, min_lp))
            fh.write(struct.pack(f"<{nv - 4}H", *vals))


def kld_scored_per_chunk_ref(n_ctx):
    return n_ctx - 1 - n_ctx // 2


def ref_kld_parse(path):
    """(n_ctx, n_vocab, n_chunk, tokens, [(scale, min_lp, uint16 values)]) parsed with struct."""
    data = open(path, "rb").read()
    assert data[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<iii", data, 8)
    ntok = n_ctx * n_chunk
    tokens = struct.unpack_from(f"<{ntok}i", data, 20)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    off = 20 + 4 * ntok
    rows = []
    for _ in range(n_chunk * kld_scored_per_chunk_ref(n_ctx)):
        scale, lo = struct.unpack_from("<ff", data, off)
        vals = np.array(struct.unpack_from(f"<{n_vocab}H", data, off + 8))
        rows.append((scale, lo, vals))
        off += 2 * nv
    assert off == len(data)
    return n_ctx, n_vocab, n_chunk, tokens, rows


def log_softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------------- npy / safetensors


def test_npy_roundtrip_and_memmap(tmp_path):
    a = logits(10, 7)
    np.save(tmp_path / "a.npy", a)
    src = open_logits(tmp_path / "a.npy")
    assert (src.format, src.n_rows, src.n_vocab) == ("npy", 10, 7)
    np.testing.assert_array_equal(src.read(3, 9), a[3:9])
    src.release(0, 10)  # dropping pages keeps the data readable
    np.testing.assert_array_equal(src.read(0, 10), a)
    src.close()
    save_npy(tmp_path / "b.npy", a.reshape(2, 5, 7))
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), a.reshape(2, 5, 7))
    src = open_logits(tmp_path / "b.npy")  # (..., vocab) -> rows
    assert (src.n_rows, src.n_vocab) == (10, 7)
    np.testing.assert_array_equal(src.read(0, 10), a)


@pytest.mark.parametrize("dtype, expect", [("float16", "float32"), ("float64", "float64")])
def test_npy_other_float_dtypes(tmp_path, dtype, expect):
    """float16 is widened to float32 (the compiled kernel's input); float64 keeps its precision."""
    a = logits(4, 5).astype(dtype)
    np.save(tmp_path / "a.npy", a)
    got = open_logits(tmp_path / "a.npy").read(0, 4)
    assert got.dtype == np.dtype(expect)
    np.testing.assert_array_equal(got, a.astype(expect))


def test_safetensors_read_files_written_by_the_library(tmp_path):
    from safetensors.numpy import save_file

    a = logits(6, 9)
    save_file({"logits": a, "other": np.zeros((2, 2), np.float32)}, str(tmp_path / "m.safetensors"),
              metadata={"model": "x"})
    src = open_logits(tmp_path / "m.safetensors")  # picks "logits" among several
    assert src.format == "safetensors" and src.key == "logits"
    np.testing.assert_array_equal(src.read(0, 6), a)
    with pytest.raises(ValueError, match="no tensor named 'nope'"):
        open_logits(tmp_path / "m.safetensors", key="nope")
    save_file({"x": a, "y": a}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="choose one with key="):
        open_logits(tmp_path / "two.safetensors")
    np.testing.assert_array_equal(open_logits(tmp_path / "two.safetensors", key="y").read(2, 4), a[2:4])


def test_safetensors_written_here_are_read_by_the_library(tmp_path):
    from safetensors.numpy import load_file

    a = logits(3, 4)
    t = np.arange(5, dtype=np.int64)
    save_safetensors(tmp_path / "o.safetensors", {"logits": a, "tokens": t}, metadata={"k": 1})
    back = load_file(str(tmp_path / "o.safetensors"))
    np.testing.assert_array_equal(back["logits"], a)
    np.testing.assert_array_equal(back["tokens"], t)


def test_safetensors_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = torch.tensor(logits(3, 8)).to(torch.bfloat16)
    save_file({"logits": t}, str(tmp_path / "b.safetensors"))
    got = open_logits(tmp_path / "b.safetensors").read(0, 3)
    np.testing.assert_array_equal(got, t.float().numpy())


# ---------------------------------------------------------------------- llama.cpp KL base


def test_kld_reader_on_independently_written_file(tmp_path):
    n_ctx, v = 8, 37  # odd vocabulary: rows are padded to an even uint16 count
    per = kld_scored_per_chunk_ref(n_ctx)
    n_chunk = 3
    x = logits(n_chunk * per, v, scale=5.0)
    x[0, 3] = x[0].max() - 30  # below the 16-nat window
    x[1] = np.linspace(-2, 2, v)  # whole row within the window: nothing dropped
    toks = RNG.integers(0, v, n_chunk * n_ctx)
    ref_kld_write(tmp_path / "base.kld", x, toks, n_ctx)

    src = open_logits(tmp_path / "base.kld")
    assert (src.format, src.n_rows, src.n_vocab) == ("llama.cpp-kld", n_chunk * per, v)
    np.testing.assert_array_equal(src.all_tokens, toks)
    # row i of chunk c predicts the token after position n_ctx//2 + i
    expect = [toks[c * n_ctx + n_ctx // 2 + i + 1] for c in range(n_chunk) for i in range(per)]
    np.testing.assert_array_equal(src.tokens, expect)
    got = src.read(0, src.n_rows).astype(np.float64)
    true = log_softmax64(x)
    inside = true >= true.max(1, keepdims=True) - 16 + 1e-3
    # quantisation: half a step of 16/65535 nats, plus float32 rounding
    assert np.max(np.abs(got[inside] - true[inside])) <= 0.5 * 16 / 65535 + 2e-5
    assert got[0, 3] == -np.inf  # below the window: probability 0 for a reference
    assert np.isfinite(got[1]).all()
    other = open_logits(tmp_path / "base.kld", side="other").read(0, 1)
    assert np.isfinite(other).all() and other[0, 3] == pytest.approx(true[0].max() - 16, abs=1e-3)


def test_kld_writer_parsed_independently(tmp_path):
    n_ctx, v, n_chunk = 10, 64, 2
    per = kld_scored_per_chunk(n_ctx)
    assert per == kld_scored_per_chunk_ref(n_ctx) == 4
    x = logits(n_chunk * per, v, scale=6.0)
    toks = RNG.integers(0, v, n_chunk * n_ctx)
    save_llamacpp_kld(tmp_path / "w.kld", x, tokens=toks, n_ctx=n_ctx)
    c, nv_, nch, t, rows = ref_kld_parse(tmp_path / "w.kld")
    assert (c, nv_, nch) == (n_ctx, v, n_chunk)
    assert list(t) == list(toks)
    true = log_softmax64(x)
    for r, (scale, lo, vals) in enumerate(rows):
        xr = x[r].astype(np.float64)
        window = min(16.0, xr.max() - xr.min())
        assert scale == pytest.approx(window / 65535, rel=1e-5)
        dec = scale * vals + lo
        inside = xr > xr.max() - window + 1e-3
        assert np.max(np.abs(dec[inside] - true[r, inside])) <= 0.5 * scale + 2e-5
        assert vals.max() == 65535  # the top logit sits at the top of the window
    # and our own reader agrees with the independent parse
    ours = open_logits(tmp_path / "w.kld", side="other").read(0, n_chunk * per)
    dec = np.stack([s * vals + lo for s, lo, vals in rows])
    np.testing.assert_allclose(ours, dec, atol=2e-6)


def test_kld_round_trip_kl_within_quantisation(tmp_path):
    """KL from a llama.cpp base file vs KL from the exact logits: close within quantisation."""
    from kldiv.compare import compare

    n_ctx, v = 16, 500
    per = kld_scored_per_chunk(n_ctx)
    a = logits(2 * per, v, scale=3.0, seed=4)
    b = (a + np.random.default_rng(5).standard_normal(a.shape) * 0.3).astype(np.float32)
    save_llamacpp_kld(tmp_path / "a.kld", a, tokens=np.zeros(2 * n_ctx, int), n_ctx=n_ctx)
    np.save(tmp_path / "b.npy", b)
    r_kld = compare(tmp_path / "a.kld", tmp_path / "b.npy")
    r_true = compare(a, b)
    # log-prob errors <= 1.3e-4 nats change KL by at most about that much per unit of mass
    np.testing.assert_allclose(r_kld.kl, r_true.kl, rtol=0, atol=5e-4)
    assert np.mean(np.abs(r_kld.kl - r_true.kl) / r_true.kl) < 5e-3


def test_kld_next_tokens_doc():
    assert kld_next_tokens(np.arange(12), 6).tolist() == [4, 5, 10, 11]


# ---------------------------------------------------------------------- bad files


def test_truncated_npy_names_file_and_row(tmp_path):
    a = logits(10, 16)
    np.save(tmp_path / "a.npy", a)
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[: len(data) - 3 * 64 - 5])
    with pytest.raises(ValueError, match=r"t\.npy: truncated file.*row 6 is the first incomplete"):
        open_logits(tmp_path / "t.npy")


def test_wrong_magic_and_corrupt_headers(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ValueError, match=r"junk\.bin: unknown format"):
        open_logits(tmp_path / "junk.bin")
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}" + bytes(8))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        open_logits(tmp_path / "bad.safetensors")
    (tmp_path / "bad.kld").write_bytes(b"_logits_" + struct.pack("<iii", 0, 10, 1))
    with pytest.raises(ValueError, match=r"bad\.kld: corrupt header: n_ctx=0"):
        open_logits(tmp_path / "bad.kld")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"\x10\x00" + b"{'descr': garbage" + bytes(4))
    with pytest.raises(ValueError, match=r"bad\.npy: corrupt \.npy header"):
        open_logits(tmp_path / "bad.npy")
    np.save(tmp_path / "int.npy", np.zeros((3, 4), np.int32))
    with pytest.raises(TypeError, match="floating point"):
        open_logits(tmp_path / "int.npy")
    np.save(tmp_path / "vec.npy", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        open_logits(tmp_path / "vec.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        open_logits(tmp_path / "missing.npy")


def test_truncated_and_padded_kld(tmp_path):
    n_ctx, v = 8, 10
    x = logits(2 * kld_scored_per_chunk(n_ctx), v)
    save_llamacpp_kld(tmp_path / "a.kld", x, tokens=np.zeros(2 * n_ctx, int), n_ctx=n_ctx)
    data = (tmp_path / "a.kld").read_bytes()
    row_bytes = 2 * (2 * ((v + 1) // 2) + 4)
    (tmp_path / "t.kld").write_bytes(data[: len(data) - 2 * row_bytes - 3])
    with pytest.raises(ValueError, match=r"t\.kld: truncated file.*row 3 is the first incomplete"):
        open_logits(tmp_path / "t.kld")
    (tmp_path / "p.kld").write_bytes(data + b"\0\0")
    with pytest.raises(ValueError, match=r"p\.kld: corrupt file: 2 unexpected bytes"):
        open_logits(tmp_path / "p.kld")
    (tmp_path / "s.kld").write_bytes(data[:30])
    with pytest.raises(ValueError, match=r"s\.kld: truncated file: token table"):
        open_logits(tmp_path / "s.kld")
    # a corrupt row header (negative scale) is reported with its row
    bad = bytearray(data)
    off = 20 + 4 * 2 * n_ctx + 2 * row_bytes
    bad[off:off + 4] = struct.pack("<f", -1.0)
    (tmp_path / "c.kld").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"c\.kld: corrupt row 2"):
        open_logits(tmp_path / "c.kld").read(0, 6)


def test_kld_writer_validates(tmp_path):
    x = logits(6, 5)
    with pytest.raises(ValueError, match="whole number of chunks"):
        save_llamacpp_kld(tmp_path / "x.kld", x[:5], tokens=np.zeros(16, int), n_ctx=8)
    with pytest.raises(ValueError, match="tokens: expected n_chunk"):
        save_llamacpp_kld(tmp_path / "x.kld", x, tokens=np.zeros(3, int), n_ctx=8)
    x[4, 1] = np.nan
    with pytest.raises(ValueError, match="row 4 has NaN logits"):
        save_llamacpp_kld(tmp_path / "x.kld", x, tokens=np.zeros(16, int), n_ctx=8)
    assert not (tmp_path / "x.kld").exists()  # atomic: nothing half-written is left behind
    assert not list(tmp_path.glob(".x.kld*"))


def test_load_tokens(tmp_path):
    (tmp_path / "t.txt").write_text("1 2, 3\n4\n")
    assert load_tokens(tmp_path / "t.txt").tolist() == [1, 2, 3, 4]
    np.save(tmp_path / "t.npy", np.array([[5, 6], [7, 8]]))
    assert load_tokens(tmp_path / "t.npy", 4).tolist() == [5, 6, 7, 8]
    with pytest.raises(ValueError, match=r"t\.npy: 4 tokens for 3 rows"):
        load_tokens(tmp_path / "t.npy", 3)
    (tmp_path / "bad.txt").write_text("1 x 3")
    with pytest.raises(ValueError, match="must be integers"):
        load_tokens(tmp_path / "bad.txt")


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    """Files written atomically are not left 0600 (mkstemp's mode): 0666 less the umask."""
    import os
    import stat

    from kldiv._atomic import write_text_atomic

    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "r.json", "{}")
        with open(tmp_path / "plain.json", "w") as fh:
            fh.write("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.json").st_mode) == 0o640


def test_io_import_graph_points_one_way():
    """llamacpp <- formats <- writers: no module of kldiv.io imports one that imports it back."""
    import ast
    import pathlib

    import kldiv.io

    here = pathlib.Path(kldiv.io.__file__).parent
    deps = {}
    for name in ("llamacpp", "formats", "writers"):
        tree = ast.parse((here / f"{name}.py").read_text())
        deps[name] = {n.module for n in ast.walk(tree)
                      if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    assert deps["llamacpp"] == set()
    assert "writers" not in deps["formats"] and "llamacpp" in deps["formats"]
    assert {"formats", "llamacpp"} <= deps["writers"]


def test_kldiv_io_is_an_attribute_and_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys, kldiv; kldiv.io.open_logits; "
            "print(sorted(m for m in ('torch', 'jax', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
