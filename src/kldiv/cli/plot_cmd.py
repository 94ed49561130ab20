"""``kldiv plot``: figures of small categorical distributions from a CSV or JSON file."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="bar charts, KL contributions and a divergence heat map of small distributions",
        description=(
            "Read small categorical distributions (one per row) from CSV or JSON and draw, in one "
            "PNG: overlaid bar charts, the per-category contributions p_i log(p_i/q_i) to "
            "KL(reference || each other row), and the matrix of pairwise divergences. CSV: an "
            "optional header row of category names and an optional first column of labels. JSON: "
            '{"categories": [...], "distributions": {"label": [...], ...}}, {"label": [...]} '
            "or a list of lists."
        ),
    )
    p.add_argument("file", help="CSV or JSON file, one distribution per row")
    p.add_argument("-o", "--out", metavar="OUT.png",
                   help="output figure, its format from the extension (.png, .svg, .pdf, ...; "
                        "default: FILE with .png; missing parent directories are created)")
    p.add_argument("--divergence", choices=("kl", "reverse_kl", "js", "jeffreys"), default="kl",
                   help="divergence of the heat map (default kl: KL(row || column))")
    p.add_argument("--reference", metavar="LABEL",
                   help="the row the contributions are taken against (default: the first)")
    p.add_argument("--normalize", action="store_true",
                   help="rescale rows to sum to 1 (default: rows must already sum to 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..plots import plot_table_file
    from ._outputs import check_output, figure_format

    created = None
    if args.out:
        figure_format(args.out, "--out")
        created = check_output(args.out, "--out", kind="figure file")
    out = plot_table_file(args.file, args.out, divergence=args.divergence,
                          reference=args.reference, normalize=args.normalize)
    if created:
        print(f"created directory {created}")
    print(f"figure: {out}")
    return 0
