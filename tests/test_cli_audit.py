"""CLI points of the outside audit (notes/audit.md, finding 6): every error names the option,
tensor names are refused for files that have none, and the help says that output options create
missing parent directories (which they do, and say so)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kldiv.cli import main


def one_line_error(command, argv, capsys, *words):
    rc = main([command, *map(str, argv)])
    cap = capsys.readouterr()
    assert rc == 1, cap
    assert cap.err.startswith(f"kldiv {command}: error: ") and cap.err.count("\n") == 1, cap.err
    assert "Traceback" not in cap.err + cap.out
    for w in words:
        assert str(w) in cap.err, (w, cap.err)
    return cap.err


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, rng.standard_normal((5, 7)).astype(np.float32))
    np.save(b, rng.standard_normal((5, 7)).astype(np.float32))
    return a, b


def test_tutorial_out_errors_name_the_option(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    for bad in ("/proc/kldiv-forbidden", f, f / "sub"):
        err = one_line_error("tutorial", ["--out", bad], capsys, "--out", bad)
        assert "Traceback" not in err
    one_line_error("tutorial", ["--out", " "], capsys, "--out")
    # nothing is printed before the refusal: the check comes first
    main(["tutorial", "--out", str(f)])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("flag", ["--key", "--other-key"])
def test_compare_refuses_tensor_names_for_npy(pair, capsys, flag):
    a, b = pair
    err = one_line_error("compare", [a, b, flag, "foo", "--no-progress"], capsys, flag, "foo")
    assert (str(a) if flag == "--key" else str(b)) in err and "safetensors" in err


def test_convert_refuses_key_for_npy(pair, tmp_path, capsys):
    a, _ = pair
    one_line_error("convert", [a, tmp_path / "out.npy", "--key", "foo", "--no-progress"], capsys,
                   "--key", a)
    assert not (tmp_path / "out.npy").exists()


def test_compare_key_still_picks_a_safetensors_tensor(pair, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file

    a, b = pair
    st = tmp_path / "ref.safetensors"
    save_file({"x": np.load(a), "other": np.zeros((2, 3), np.float32)}, str(st))
    rc = main(["compare", str(st), str(b), "--key", "x", "--no-progress", "--quiet",
               "--json", str(tmp_path / "s.json")])
    capsys.readouterr()
    assert rc == 0
    assert json.loads((tmp_path / "s.json").read_text())


def test_json_creates_missing_directories_as_documented(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "new" / "deeper" / "stats.json"
    assert main(["compare", str(a), str(b), "--no-progress", "--json", str(out)]) == 0
    cap = capsys.readouterr()
    assert out.is_file() and "created directory" in cap.out
    for cmd in ("compare", "eval"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "missing parent directories are created" in text, cmd
