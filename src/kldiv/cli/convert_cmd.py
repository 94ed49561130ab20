"""``kldiv convert``: logits from one file format to another, e.g. into llama.cpp's KL base file."""
from __future__ import annotations

import sys

_FORMATS = ("npy", "safetensors", "llamacpp")
_DTYPES = ("float32", "float16", "bfloat16", "float64")
# how library errors name the arguments on the command line
_NAMES = {"to": "--to", "dtype": "--dtype", "n_ctx": "--n-ctx", "tokens": "--tokens"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert logits between .npy, .safetensors and llama.cpp's KL-divergence base file",
        description=(
            "Convert a logits file (.npy, .safetensors or llama.cpp's --kl-divergence-base file, "
            "recognised by content) to another format, streaming in bounded memory and writing "
            "OUTPUT atomically. The output format comes from OUTPUT's suffix (.npy, .safetensors, "
            ".kld/.bin/.dat for llama.cpp) unless --to is given. Exporting to llama.cpp's format "
            "(for llama-perplexity --kl-divergence-base FILE --kl-divergence) needs the context "
            "size (--n-ctx) and the n_chunk * n_ctx evaluated token ids (--tokens); the rows are "
            "the scored positions, n_ctx - 1 - n_ctx // 2 per chunk. A llama.cpp INPUT supplies "
            "both itself."
        ),
    )
    p.add_argument("input", metavar="INPUT", help="logits file: .npy, .safetensors or llama.cpp KL base")
    p.add_argument("output", metavar="OUTPUT",
                   help="file to write (atomically; missing parent directories are created)")
    p.add_argument("--to", choices=_FORMATS,
                   help="output format (default: from OUTPUT's suffix)")
    p.add_argument("--key", metavar="NAME",
                   help="tensor name in an INPUT .safetensors with several tensors")
    p.add_argument("--out-key", metavar="NAME", default="logits",
                   help="tensor name in a .safetensors OUTPUT (default: logits)")
    p.add_argument("--tokens", metavar="FILE",
                   help="llama.cpp output: the n_chunk * n_ctx evaluated token ids (.npy, or "
                        "whitespace/comma-separated text); default: the token table of a llama.cpp INPUT")
    p.add_argument("--n-ctx", metavar="N", type=int,
                   help="llama.cpp output: the context size (rows must be n_chunk * "
                        "(N - 1 - N // 2)); default: that of a llama.cpp INPUT")
    p.add_argument("--dtype", choices=_DTYPES,
                   help=".npy/.safetensors output dtype (bfloat16: .safetensors only); default: "
                        "INPUT's dtype (float32 for a llama.cpp INPUT)")
    p.add_argument("--below-window", choices=("drop", "floor"), default="drop",
                   help="a llama.cpp INPUT's entries below its 16-nat window: -inf (drop, as a "
                        "reference is read; default) or the stored floor value (floor, the value "
                        "llama.cpp reads); either way, converting the file back to llama.cpp's "
                        "format gives the same stored rows")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..io import convert_logits, load_tokens, open_logits
    from ._outputs import check_output

    names = dict(_NAMES)
    created = check_output(args.output, "OUTPUT")
    from ._common import refuse_key

    refuse_key(args.input, args.key, "--key")
    tokens = None
    if args.tokens is not None:
        names["tokens"] = f"--tokens {args.tokens}"
        tokens = load_tokens(args.tokens)
    src = open_logits(args.input, key=args.key, below_window=args.below_window, key_name="--key")
    try:
        result = convert_logits(src, args.output, to=args.to, dtype=args.dtype,
                                out_key=args.out_key, tokens=tokens, n_ctx=args.n_ctx,
                                below_window=args.below_window,
                                progress=False if args.no_progress else None, _names=names)
    finally:
        src.close()
    if created:
        print(f"created directory {created}")
    print(result)
    sys.stdout.flush()
    return 0
