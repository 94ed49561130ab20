"""Options and checks shared by the sub-commands that compare a reference with other models
(``kldiv compare``, ``kldiv eval``): defined once here so that their names, help and checks agree."""
from __future__ import annotations

import os

from ._outputs import check_output

CACHE_NOTE = ("or a sparse teacher cache directory written by `kldiv cache` (then: certified "
              "bounds of the KL and the statistics a top-k reference determines)")


def add_reference(p, help_text: str, **kw) -> None:
    """The REFERENCE positional: a logits file, model directory or teacher cache (``help_text``)."""
    p.add_argument("reference", help=f"{help_text}, {CACHE_NOTE}", **kw)


def add_run_options(p) -> None:
    """``--threads``, ``--no-progress``, ``--quiet``."""
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.add_argument("--quiet", action="store_true", help="do not print the table")


#: how every output option treats a path in a directory that does not exist yet
CREATES_DIRS = "missing parent directories are created"


def add_outputs(p, *, json_help: str, plot_help: str) -> None:
    """``--json OUT`` and ``--plot OUT.png`` (both create missing parent directories, and say so)."""
    p.add_argument("--json", metavar="OUT", help=f"{json_help}; {CREATES_DIRS}")
    p.add_argument("--plot", metavar="OUT.png", help=f"{plot_help}; {CREATES_DIRS}")


def refuse_key(path, key, flag: str) -> None:
    """``flag`` (a tensor name) given for a file that is not a .safetensors: refused, not ignored.

    Only an existing regular file is looked at; a missing one gets the reader's own error."""
    if key is None or path is None or not os.path.isfile(path):
        return
    from ..io.formats import _sniff

    try:
        kind = _sniff(path)
    except (OSError, ValueError):  # unreadable / unknown format: the reader's error names it
        return
    if kind != "safetensors":
        raise ValueError(f"{flag} {key}: {path} is a {kind} file, which holds one unnamed array; "
                         f"{flag} picks a tensor of a .safetensors file (leave it out)")


def add_renormalize(p, group=None, *, help_text: str) -> None:
    """``--renormalize`` (kldiv's KL instead of llama.cpp's for a llama.cpp KL base reference)."""
    (group or p).add_argument("--renormalize", action="store_true", help=help_text)


def positive(args, *names) -> None:
    """Each of ``--name`` (given) must be >= 1."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def check_outputs(args, *, png_only: bool = False) -> list:
    """Refuse bad ``--json``/``--plot`` paths before any work; returns the directories writing
    them will create (for the command to mention)."""
    created = []
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not str(path).strip():
            raise ValueError(f"{opt}: empty file name")
    if args.json:
        created.append(check_output(args.json, "--json"))
    if args.plot:
        if png_only:
            if not args.plot.lower().endswith(".png"):
                raise ValueError(f"--plot {args.plot}: the figure is a PNG; name it *.png")
        else:
            from ._outputs import figure_format

            figure_format(args.plot, "--plot")
        created.append(check_output(args.plot, "--plot", kind="figure file"))
    return [c for c in created if c]


def progress(args):
    """The ``progress`` argument of the library calls: False with ``--no-progress``, else auto."""
    return False if args.no_progress else None


def cache_refusals(args, unsupported) -> None:
    """With a teacher cache as REFERENCE: refuse the options (``(attribute, flag, why)``) that
    need a dense reference, each with one line."""
    for attr, flag, why in unsupported:
        if getattr(args, attr, None):
            raise ValueError(f"{flag}: {why} (the reference {args.reference} is a sparse teacher cache)")


def print_result(res, args) -> None:
    """Table and JSON of a result (``EvalResult`` or :class:`kldiv.eval.sparse.CacheResult`)."""
    if not args.quiet:
        print(res.table())
    if args.json:
        res.to_json(args.json)
        if not args.quiet:
            print(f"\nstatistics: {args.json}")
