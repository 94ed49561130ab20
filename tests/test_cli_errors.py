"""The command line never prints a traceback: each damaged file, bad option or odd output path is
one line on stderr, ``kldiv COMMAND: error: ...``, naming the file, with exit code 1."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from kldiv.cli import main


def npy_header(shape, descr="<f4"):
    """A .npy version 1.0 header written by hand (np.save refuses the shapes tested here)."""
    h = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))
    h += " " * ((64 - (10 + len(h) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h.encode()


def safetensors(path, tensors):
    header, off = {}, 0
    for k, (dt, shape, nbytes) in tensors.items():
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(off))


def save_as(path, array):
    """np.save to exactly ``path`` (np.save adds .npy to a name without it)."""
    with open(path, "wb") as fh:
        np.save(fh, array)


def kld_header(n_ctx, n_vocab, n_chunk, extra=200):
    return b"_logits_" + struct.pack("<3i", n_ctx, n_vocab, n_chunk) + bytes(extra)


# name -> writer of a damaged logits file, and a word its error message must contain
DAMAGED = {
    "int.npy": (lambda p: np.save(p, np.zeros((4, 6), np.int32)), "floating point"),
    "bool.npy": (lambda p: np.save(p, np.zeros((4, 6), bool)), "floating point"),
    "object.npy": (lambda p: np.save(p, np.zeros((4, 6), object), allow_pickle=True), "floating point"),
    "complex.npy": (lambda p: np.save(p, np.zeros((4, 6), np.complex64)), "floating point"),
    "empty_vocab.npy": (lambda p: np.save(p, np.zeros((4, 0), np.float32)), "vocabulary"),
    "negative_dim.npy": (lambda p: p.write_bytes(npy_header((-1, 6)) + bytes(96)), "negative"),
    "overflow.npy": (lambda p: p.write_bytes(npy_header((2**40, 2**40)) + bytes(96)), "truncated"),
    "vector.npy": (lambda p: np.save(p, np.zeros(6, np.float32)), "2 dimensions"),
    "garbage.npy": (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': junk" + bytes(8)),
                    "corrupt"),
    "i32.safetensors": (lambda p: safetensors(p, {"logits": ("I32", [4, 6], 96)}), "I32"),
    "neg.safetensors": (lambda p: safetensors(p, {"logits": ("F32", [-4, 6], 96)}), "negative"),
    "multi.safetensors": (lambda p: safetensors(p, {"a": ("F32", [4, 6], 96),
                                                    "b": ("F32", [4, 6], 96)}), "--"),
    "huge_ctx.kld": (lambda p: p.write_bytes(kld_header(2**30, 6, 16)), "truncated"),
    "max_ctx.kld": (lambda p: p.write_bytes(kld_header(2**31 - 1, 6, 1)), "truncated"),
    "max_vocab.kld": (lambda p: p.write_bytes(kld_header(8, 2**31 - 1, 2, 64)), "truncated"),
    "short.kld": (lambda p: p.write_bytes(b"_logits_" + bytes(4)), "truncated"),
    "negative.kld": (lambda p: p.write_bytes(kld_header(-8, 6, 1)), "corrupt header"),
    "unknown.bin": (lambda p: p.write_bytes(b"GGUF" + bytes(60)), "unknown format"),
    "empty.npy": (lambda p: p.write_bytes(b""), "unknown format"),
}


@pytest.fixture
def good(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    np.save(tmp_path / "good.npy", x)
    return tmp_path / "good.npy"


def one_line_error(command, argv, capsys, *names):
    rc = main([command, *map(str, argv)])
    cap = capsys.readouterr()
    assert rc == 1, cap
    assert cap.err.startswith(f"kldiv {command}: error: ") and cap.err.count("\n") == 1, cap.err
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    for name in names:
        assert str(name) in cap.err, (name, cap.err)
    return cap.err


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_logits_files(tmp_path, capsys, good, name):
    write, word = DAMAGED[name]
    path = tmp_path / name
    write(path)
    for argv in ([path, good], [good, path]):
        err = one_line_error("compare", [*argv, "--no-progress"], capsys, name)
        assert word in err
    err = one_line_error("convert", [path, tmp_path / "out.npy", "--no-progress"], capsys, name)
    assert word in err and not (tmp_path / "out.npy").exists()


def test_multi_tensor_message_names_the_cli_options(tmp_path, capsys, good):
    DAMAGED["multi.safetensors"][0](tmp_path / "m.safetensors")
    err = one_line_error("compare", [tmp_path / "m.safetensors", good], capsys, "m.safetensors")
    assert "--key" in err and "key=" not in err
    err = one_line_error("compare", [good, tmp_path / "m.safetensors"], capsys)
    assert "--other-key" in err
    assert main(["compare", str(tmp_path / "m.safetensors"), str(good), "--key", "a", "--quiet",
                 "--no-progress"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("content,word", [
    (lambda p: save_as(p, np.zeros(4)), "integers"),
    (lambda p: save_as(p, np.zeros(4, np.complex64)), "integers"),
    (lambda p: p.write_bytes(b"\x00\x93\xff\xfe" * 8), "not a token file"),
    (lambda p: p.write_text("1 2 x 4"), "integers"),
    (lambda p: p.write_text("1 2 3"), "3 tokens for 4 rows"),
    (lambda p: p.write_bytes(npy_header((-2,), "<i8")), "negative"),
    (lambda p: p.write_text("1 2 3 99999999999999999999999"), "range"),
])
def test_damaged_token_files(tmp_path, capsys, good, content, word):
    content(tmp_path / "tok")
    err = one_line_error("compare", [good, good, "--tokens", tmp_path / "tok"], capsys, "tok")
    assert word in err


def test_zero_rows_and_all_skipped_refused(tmp_path, capsys, good):
    np.save(tmp_path / "z.npy", np.zeros((0, 6), np.float32))
    err = one_line_error("compare", [tmp_path / "z.npy", tmp_path / "z.npy"], capsys, "z.npy")
    assert "nothing to compare" in err
    err = one_line_error("compare", [tmp_path / "z.npy", good], capsys, "z.npy", "good.npy")
    x = np.full((3, 6), np.nan, np.float32)
    np.save(tmp_path / "nan.npy", x)
    np.save(tmp_path / "ok.npy", np.zeros((3, 6), np.float32))
    err = one_line_error("compare", [tmp_path / "nan.npy", tmp_path / "ok.npy", "--skip-nan"], capsys)
    assert "nothing to compare" in err


def test_directories_as_inputs_and_outputs(tmp_path, capsys, good):
    (tmp_path / "d").mkdir()
    err = one_line_error("compare", [tmp_path / "d", good], capsys, "d: is a directory")
    err = one_line_error("convert", [tmp_path / "d", tmp_path / "o.npy"], capsys, "is a directory")
    err = one_line_error("plot", [tmp_path / "d"], capsys, "is a directory")
    for opt in ("--json", "--plot"):
        err = one_line_error("compare", [good, good, opt, tmp_path / "d"], capsys, opt, "is a directory")
        assert ".tmp" not in err and "/." not in err  # no temporary file name
    err = one_line_error("convert", [good, tmp_path / "d"], capsys, "is a directory")
    assert not [f for f in (tmp_path / "d").iterdir()]


def test_output_directory_created_is_said(tmp_path, capsys, good):
    assert main(["compare", str(good), str(good), "--plot", str(tmp_path / "new" / "x.png"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"created directory {tmp_path / 'new'}" in out
    assert (tmp_path / "new" / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "file").write_text("x")
    one_line_error("compare", [good, good, "--json", tmp_path / "file" / "r.json"], capsys,
                   "is a file, not a directory")


def test_plot_format_follows_the_extension(tmp_path, capsys, good):
    assert main(["compare", str(good), str(good), "--plot", str(tmp_path / "x.jpg"), "--quiet",
                 "--no-progress"]) == 0
    assert (tmp_path / "x.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes
    one_line_error("compare", [good, good, "--plot", tmp_path / "x.xyz", "--json",
                                     tmp_path / "r.json"], capsys, "x.xyz", "unknown image format")
    assert not (tmp_path / "r.json").exists()  # refused before any work or output


def test_plot_says_it_reads_csv(tmp_path, capsys, good):
    err = one_line_error("plot", [good], capsys, "good.npy", "CSV")
    assert "kldiv compare" in err
    (tmp_path / "t.csv").write_text("0.5,0.5\n0.25,0.75\n")
    one_line_error("plot", [tmp_path / "t.csv", "-o", tmp_path / "x.bad"], capsys, "unknown image format")
    assert main(["plot", str(tmp_path / "t.csv"), "-o", str(tmp_path / "t.pdf")]) == 0
    assert (tmp_path / "t.pdf").read_bytes()[:4] == b"%PDF"
    capsys.readouterr()


def test_report_wording(tmp_path, capsys):
    """± is explained, no '-0.000', the missing --tokens is hinted at."""
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", x)  # identical: every value 0, the tiny negatives included
    assert main(["compare", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "standard error" in out and "-0.000" not in out
    assert "--tokens" in out
    np.save(tmp_path / "t.npy", np.zeros(40, int))
    assert main(["compare", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--tokens",
                 str(tmp_path / "t.npy"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "-0.000" not in out and "need --tokens" not in out and "Δp" in out


def test_probabilities_warned_and_probs_space(tmp_path, capsys):
    import scipy.special

    rng = np.random.default_rng(2)
    p = scipy.special.softmax(rng.standard_normal((30, 5)), axis=1)
    q = scipy.special.softmax(rng.standard_normal((30, 5)), axis=1)
    np.save(tmp_path / "p.npy", p.astype(np.float32))
    np.save(tmp_path / "q.npy", q.astype(np.float32))
    assert main(["compare", str(tmp_path / "p.npy"), str(tmp_path / "q.npy"), "--quiet",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("kldiv compare: warning: ") for line in lines)
    assert "p.npy" in err and "--ref-space probs" in err and "--other-space probs" in err
    assert main(["compare", str(tmp_path / "p.npy"), str(tmp_path / "q.npy"), "--ref-space", "probs",
                 "--other-space", "probs", "--json", str(tmp_path / "r.json"), "--quiet",
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    want = scipy.special.rel_entr(p.astype(np.float32).astype(np.float64),
                                  q.astype(np.float32).astype(np.float64)).sum(1).mean()
    assert json.loads((tmp_path / "r.json").read_text())["kl"]["mean"] == pytest.approx(want, rel=1e-5)
    x = p.copy()
    x[3, 1] = -0.1
    np.save(tmp_path / "neg.npy", x.astype(np.float32))
    one_line_error("compare", [tmp_path / "neg.npy", tmp_path / "q.npy", "--ref-space", "probs"],
                   capsys, "neg.npy", "row 3 has negative probabilities")


def test_example_prints_no_temporary_paths(capsys):
    assert main(["compare", "--example", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kldiv-example-" not in out and "/tmp" not in out
    assert "example reference.npy" in out


def test_no_traceback_from_the_installed_command(tmp_path):
    """The console entry point itself (a subprocess): one line, exit status 1."""
    np.save(tmp_path / "int.npy", np.zeros((4, 6), np.int64))
    (tmp_path / "big.kld").write_bytes(kld_header(2**30, 6, 16))
    env = dict(os.environ)
    for bad in ("int.npy", "big.kld"):
        proc = subprocess.run([sys.executable, "-m", "kldiv", "compare", str(tmp_path / bad),
                               str(tmp_path / bad)], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1 and bad in proc.stderr


def _valid_files(d):
    from kldiv.io import save_llamacpp_kld, save_safetensors

    x = np.random.default_rng(5).standard_normal((6, 5)).astype(np.float32)
    np.save(d / "v.npy", x)
    save_safetensors(d / "v.safetensors", {"logits": x})
    save_llamacpp_kld(d / "v.kld", x, tokens=np.zeros(16, int), n_ctx=8)
    return {name: (d / name).read_bytes() for name in ("v.npy", "v.safetensors", "v.kld")}


def test_fuzzed_files_give_errors_not_crashes(tmp_path):
    """Truncations and byte flips of valid files: a ValueError/OSError naming the file, or a
    file that reads (hypothesis drives the damage)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kldiv.compare import compare
    from kldiv.io import open_logits

    files = _valid_files(tmp_path)

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(name=st.sampled_from(sorted(files)), cut=st.integers(0, 400),
           flips=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=4))
    def check(name, cut, flips):
        data = bytearray(files[name])
        for pos, val in flips:
            if pos < len(data):
                data[pos] = val
        data = bytes(data[: len(data) - cut]) if cut < len(data) else b""
        path = tmp_path / ("f_" + name)
        path.write_bytes(data)
        try:
            src = open_logits(path)
            try:
                src.read(0, src.n_rows)
            finally:
                src.close()
            compare(path, path, skip_nan=True)
        except (ValueError, OSError) as exc:
            assert str(path) in str(exc) or "nothing to compare" in str(exc), str(exc)

    check()


def test_llamacpp_flag_on_logits_is_warned(tmp_path, capsys):
    x = np.random.default_rng(3).standard_normal((12, 7)).astype(np.float32) + 2
    np.save(tmp_path / "x.npy", x)
    assert main(["compare", str(tmp_path / "x.npy"), str(tmp_path / "x.npy"), "--llamacpp",
                 "--quiet", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("kldiv compare: warning: ") and err.count("\n") == 1
    assert "x.npy" in err and "log-probabilities" in err
    lp = x - np.log(np.exp(x.astype(np.float64)).sum(1, keepdims=True))
    np.save(tmp_path / "lp.npy", lp.astype(np.float32))
    assert main(["compare", str(tmp_path / "lp.npy"), str(tmp_path / "x.npy"), "--llamacpp",
                 "--quiet", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
