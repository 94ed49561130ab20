"""`kldiv plot` on a CSV whose first row mixes numbers and text (audit 4 L2): a data row with a
bad value, reported as one ("row 1: not all values are numbers"), not taken as a header (then
"dists: need at least one distribution"). A header of names only is still a header."""
from kldiv.cli import main


def _err(path, capsys):
    rc = main(["plot", str(path)])
    cap = capsys.readouterr()
    assert rc == 1, cap
    assert cap.err.startswith("kldiv plot: error: ") and cap.err.count("\n") == 1, cap.err
    return cap.err


def test_first_row_with_a_bad_value_names_the_row(tmp_path, capsys):
    for text, row in (("x,0.2,abc\n", "row 1"), ("x,0.2,0.8\ny,0.2,abc\n", "row 2"),
                      ("0.2,abc\n", "row 1")):
        f = tmp_path / "f.csv"
        f.write_text(text)
        err = _err(f, capsys)
        assert f"f.csv: {row}: not all values are numbers" in err and "abc" in err, err


def test_header_of_names_still_read(tmp_path, capsys):
    f = tmp_path / "h.csv"
    f.write_text(",a,b\nx,0.5,0.5\ny,0.2,0.8\n")
    assert main(["plot", str(f), "-o", str(tmp_path / "h.png")]) == 0, capsys.readouterr()
