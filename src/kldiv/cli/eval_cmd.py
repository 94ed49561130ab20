"""``kldiv eval``: run a reference model and candidates on a text, compare their next-token distributions."""
from __future__ import annotations

import sys

from . import _common as C


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="how far quantized/pruned/distilled models drift from a reference, run on the models",
        description=(
            "Run REFERENCE and each CANDIDATE (Hugging Face causal LM directories, or logits files "
            "that `kldiv compare` reads) on the same tokens, with llama.cpp's scoring window "
            "(chunks of --ctx tokens, second half scored), and report llama.cpp's KL statistics, "
            "flips, top-k overlap and, with several candidates, a paired bootstrap interval of "
            "their difference. One batch of logits in memory at a time."
        ),
    )
    C.add_reference(p, "reference model directory, or a logits file (.npy, .safetensors, llama.cpp KL base)")
    p.add_argument("candidates", nargs="+", metavar="CANDIDATE", help="candidate model directories or logits files")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="FILE", help="text file, tokenized with the reference's tokenizer")
    src.add_argument("--tokens", metavar="FILE",
                     help="token ids: .npy of int, or text with whitespace/comma separated ids")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="tokens per chunk (default 512; a llama.cpp reference file sets it)")
    p.add_argument("--chunks", type=int, default=None, metavar="K", help="score at most K chunks")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="chunks per forward pass (default 1)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the models are run in (default float32)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--all-positions", action="store_true",
                   help="score every position of each chunk, not llama.cpp's second half")
    p.add_argument("--bos", default="auto", metavar="auto|none|ID",
                   help="token that starts every chunk, as llama.cpp does (auto: the tokenizer's BOS "
                        "with --text when it adds one; none with --tokens)")
    C.add_renormalize(p, help_text="with a llama.cpp KL base file as REFERENCE: kldiv's KL with the "
                                   "reference row renormalised (default: llama.cpp's own statistics, as "
                                   "kldiv compare)")
    C.add_outputs(p, json_help="write every number as JSON (atomically)",
                  plot_help="write the figure (PNG, atomically)")
    p.add_argument("--save-reference", metavar="FILE",
                   help="write the reference's scored logits (.kld/.bin/.dat: llama.cpp's KL base format; "
                        ".npy; .safetensors)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--max-exact", type=int, default=None, metavar="N",
                   help="tokens kept for exact quantiles (default 1048576; beyond: a 0.1%% sketch)")
    C.add_run_options(p)
    p.set_defaults(func=run)


def _check(args) -> None:
    C.positive(args, "ctx", "chunks", "batch", "resamples", "threads")
    if args.ctx is not None and args.ctx < 3:
        raise ValueError(f"--ctx must be >= 3, got {args.ctx}")
    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.max_exact is not None and args.max_exact < 0:
        raise ValueError(f"--max-exact must be >= 0, got {args.max_exact}")
    C.check_outputs(args, png_only=True)


def _bos(value):
    v = str(value).strip().lower()
    if v == "auto":
        return "auto"
    if v == "none":
        return None
    try:
        b = int(v)
    except ValueError:
        raise ValueError(f"--bos must be auto, none or a token id, got {value!r}") from None
    if b < 0:
        raise ValueError(f"--bos must be a token id >= 0, got {b}")
    return b


def _quiet_transformers() -> None:
    """transformers' own loading bars and warnings would bury the one-line errors and the table."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


_CACHE_UNSUPPORTED = (
    ("plot", "--plot", "the figures draw per-token KL values, which a top-k cache only bounds"),
    ("save_reference", "--save-reference", "there are no dense reference logits to save"),
    ("renormalize", "--renormalize", "applies to a llama.cpp KL base file"),
)


def run(args) -> int:
    _check(args)
    bos = _bos(args.bos)
    from ..eval.sparse import is_cache_dir

    cache = is_cache_dir(args.reference)
    if cache:
        C.cache_refusals(args, _CACHE_UNSUPPORTED)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before the models run, not after)
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install 'kldiv[plot]')") from None
    from ..eval.result import EvalResult
    from ..eval.runner import evaluate

    _quiet_transformers()

    try:
        res = evaluate(args.reference, args.candidates, tokens=args.tokens, text=args.text, ctx=args.ctx,
                       chunks=args.chunks, batch=args.batch, dtype=args.dtype, device=args.device,
                       score="all" if args.all_positions else "half", bos=bos,
                       save_reference=args.save_reference,
                       progress=C.progress(args),
                       max_exact=args.max_exact, threads=args.threads,
                       llamacpp=False if args.renormalize else None)
    except (TypeError, RuntimeError, ImportError, KeyError) as exc:  # one line, never a traceback
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(msg) from None
    if cache:
        C.print_result(res, args)
        sys.stdout.flush()
        return 0
    cls = _windowed_result_class(EvalResult) if _is_kld(args.reference) else EvalResult
    res = cls(res.data, n_resamples=args.resamples, confidence=args.confidence, seed=args.seed)
    C.print_result(res, args)
    if args.plot:
        res.plot(args.plot)
        if not args.quiet:
            print(f"figure: {args.plot}")
    if args.save_reference and not args.quiet:
        print(f"reference logits: {args.save_reference}")
    sys.stdout.flush()
    return 0


_NO_REVERSE = ("not computed: a llama.cpp KL base file keeps each row only within 16 nats of its "
               "largest log-probability, and KL(candidate || reference) is unbounded above over what "
               "lies below (kldiv compare --reverse refuses it); run the reference model, or give "
               "its dense logits (.npy, .safetensors), for the reverse KL")


def _is_kld(path) -> bool:
    """Whether ``path`` is a llama.cpp KL base file (a model directory is not)."""
    from ..io import KLD_MAGIC

    try:
        with open(path, "rb") as fh:
            return fh.read(len(KLD_MAGIC)) == KLD_MAGIC
    except OSError:
        return False


def _windowed_result_class(base):
    """``base`` (EvalResult) for a llama.cpp KL base reference: the reverse KL, +inf on nearly every
    row (the decoded reference gives the tokens below its 16-nat window probability 0, the file
    does not say what they have), is left out of the table and is null in the JSON, with the reason."""

    class WindowedReferenceResult(base):
        def table(self) -> str:
            lines = super().table().split("\n")
            head = "====== Reverse KL divergence statistics ======"
            if head in lines:
                i = lines.index(head)
                j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("======")), len(lines))
                lines[i:j] = [head, f"Reverse KL {_NO_REVERSE}"]
            return "\n".join(lines)

        def to_json(self, path) -> None:
            import copy
            import json

            from .._atomic import write_text_atomic
            from ..compare.report import _jsonable

            s = copy.deepcopy(self.summary())
            for c in s["candidates"]:
                c["reverse_kl"] = None
            s["settings"]["reverse_kl"] = _NO_REVERSE
            write_text_atomic(path, json.dumps(_jsonable(s), indent=2, allow_nan=False) + "\n")

    return WindowedReferenceResult
