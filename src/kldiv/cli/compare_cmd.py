"""``kldiv compare``: per-token KL between a reference model's logits and another's, from files."""
from __future__ import annotations

import sys

from . import _common as C


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="how far one model's next-token distributions drift from a reference's",
        description=(
            "Per-token KL(reference || other) between two logits files (.npy, .safetensors or "
            "llama.cpp's --kl-divergence-base file, recognised by content), with llama.cpp's "
            "statistics: mean KLD ± standard error, quantiles, same-top share, delta p. With a "
            "llama.cpp base file as reference the numbers are llama.cpp's own (its stored "
            "log-probabilities as they are; --renormalize for kldiv's renormalised KL). Streams "
            "in bounded memory on all cores."
        ),
    )
    C.add_reference(p, "reference logits file (the p side)", nargs="?")
    p.add_argument("other", nargs="?", help="other model's logits file (the q side)")
    p.add_argument("--example", action="store_true",
                   help="run on the small example that ships with kldiv (256 tokens x 512 vocab)")
    p.add_argument("--example-dir", metavar="DIR", default=None,
                   help="where --example writes its files (default: a temporary directory)")
    p.add_argument("--tokens", metavar="FILE",
                   help="the actual next token of each row (.npy or whitespace-separated text); "
                        "default: the token table of a llama.cpp file")
    C.add_outputs(p, json_help="write the statistics as JSON (atomically)",
                  plot_help="write the per-token figure (atomically; the format follows the extension: "
                            ".png, .svg, .pdf, .jpg, ...)")
    p.add_argument("--per-token", action="store_true", help="include per-token values in --json")
    p.add_argument("--reverse", action="store_true", help="also KL(other || reference)")
    p.add_argument("--js", action="store_true",
                   help="also the Jensen-Shannon divergence (beta 1/2, nats)")
    p.add_argument("--skip-nan", action="store_true",
                   help="skip rows with NaN logits (counted in the report) instead of failing")
    p.add_argument("--key", help="tensor name in a reference .safetensors with several tensors")
    p.add_argument("--other-key", help="tensor name in the other .safetensors")
    stat = p.add_mutually_exclusive_group()
    C.add_renormalize(p, stat, help_text="with a llama.cpp KL base file as reference: kldiv's KL, the "
                                         "decoded reference row renormalised (default: llama.cpp's own "
                                         "statistics)")
    stat.add_argument("--llamacpp", action="store_true",
                      help="llama.cpp's statistics for a reference of log-probabilities in another "
                           "format (e.g. converted from a KL base file): stored values as they are, "
                           "terms <= -16 left out")
    p.add_argument("--ref-space", choices=("logits", "log_probs", "probs"), default="logits",
                   help="what REFERENCE holds (default logits; log-probabilities are logits too)")
    p.add_argument("--other-space", choices=("logits", "log_probs", "probs"), default="logits",
                   help="what OTHER holds (default logits)")
    C.add_run_options(p)
    p.set_defaults(func=run)


_NAMES = {"key": "--key", "other_key": "--other-key", "tokens": "--tokens",
          "ref_space": "--ref-space", "other_space": "--other-space", "reverse": "--reverse",
          "js": "--js"}


_CACHE_UNSUPPORTED = (
    ("reverse", "--reverse", "KL(other || reference) needs the reference's probability of every tail "
                             "token (unbounded above over the tails a top-k cache allows)"),
    ("js", "--js", "Jensen-Shannon needs the reference's probability of every tail token"),
    ("per_token", "--per-token", "per-token KL values are only bounded by a top-k cache"),
    ("plot", "--plot", "the figure draws per-token KL values, which a top-k cache only bounds"),
    ("skip_nan", "--skip-nan", "not supported with a cache"),
    ("key", "--key", "a cache has no tensor names"),
    ("renormalize", "--renormalize", "applies to a llama.cpp KL base file"),
    ("llamacpp", "--llamacpp", "applies to a dense reference of log-probabilities"),
)


def run(args) -> int:
    C.positive(args, "threads")
    if args.per_token and not args.json:
        raise ValueError("--per-token adds the per-token values to --json OUT; give --json too")
    if args.example:
        if args.reference or args.other:
            raise ValueError("--example takes no REFERENCE/OTHER files")
        import tempfile

        from ..data import N_TOKENS, N_VOCAB, example_files

        if args.example_dir:
            return _run(args, *example_files(args.example_dir), note=args.example_dir)
        with tempfile.TemporaryDirectory(prefix="kldiv-example-") as tmp:  # removed afterwards
            return _run(args, *example_files(tmp),
                        note=f"{N_TOKENS} tokens x {N_VOCAB} vocabulary, generated in a temporary "
                             f"directory; --example-dir DIR keeps the files",
                        shown=("example reference.npy", "example other.npy"))
    if not (args.reference and args.other):
        raise ValueError("need REFERENCE and OTHER files (or --example)")
    from ..eval.sparse import is_cache_dir

    if is_cache_dir(args.reference):
        return _run_cache(args)
    return _run(args, args.reference, args.other, args.tokens)


def _run_cache(args) -> int:
    """A sparse teacher cache as REFERENCE: certified KL bounds and what a top-k reference gives."""
    from ..eval.sparse import compare_cache

    C.cache_refusals(args, _CACHE_UNSUPPORTED)
    if args.ref_space != "logits":
        raise ValueError(f"--ref-space: the reference {args.reference} is a sparse teacher cache "
                         f"(log-probabilities as cached)")
    created = C.check_outputs(args)
    C.refuse_key(args.other, args.other_key, "--other-key")
    res = compare_cache(args.reference, args.other, tokens=args.tokens, other_key=args.other_key,
                        other_space=args.other_space, progress=C.progress(args), _names=_NAMES)
    for d in sorted(set(created)):
        if not args.quiet:
            print(f"created directory {d}")
    C.print_result(res, args)
    sys.stdout.flush()
    return 0


def _run(args, ref, other, tokens, note=None, shown=None) -> int:
    from ..compare import compare

    created = C.check_outputs(args)  # every output is checked before the work starts
    C.refuse_key(ref, args.key, "--key")
    C.refuse_key(other, args.other_key, "--other-key")
    tokens = args.tokens or tokens
    if note and not args.quiet:
        print(f"example ({note}): a reference model's logits and a quantised copy's\n")
    report = compare(ref, other, tokens=tokens, reverse=args.reverse, js=args.js,
                     skip_nan=args.skip_nan, key=args.key, other_key=args.other_key,
                     threads=args.threads, progress=C.progress(args),
                     llamacpp=True if args.llamacpp else False if args.renormalize else None,
                     ref_space=args.ref_space, other_space=args.other_space, _names=_NAMES)
    if shown:  # the example's files live in a directory that is gone afterwards
        report.reference, report.other = shown
    if not args.quiet:
        print(report.table())
    for d in sorted({c for c in created if c}):
        if not args.quiet:
            print(f"\ncreated directory {d}")
    if args.plot:
        from ..plots import plot_compare

        plot_compare(report, args.plot)
    if args.json:
        report.to_json(args.json, per_token=args.per_token)
        if not args.quiet:
            print(f"\nstatistics: {args.json}")
    if args.plot and not args.quiet:
        print(f"figure: {args.plot}")
    sys.stdout.flush()
    return 0
