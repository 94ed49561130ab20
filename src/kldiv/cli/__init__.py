"""The ``kldiv`` command line: one sub-command per module, each a thin shell over the library.

Each sub-command module defines ``register(subparsers)`` and imports its heavy dependencies
(matplotlib, safetensors, tqdm) only when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module (relative to this package) defining register(subparsers)
_COMMANDS = {
    "tutorial": ".tutorial",
    "compare": ".compare_cmd",
    "plot": ".plot_cmd",
    "convert": ".convert_cmd",
    "eval": ".eval_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="kldiv",
        description="Kullback-Leibler divergence: tutorial, model-drift reports, plots, logits conversion.",
    )
    parser.add_argument("--version", action="version", version=f"kldiv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in _COMMANDS.items():
        try:
            mod = importlib.import_module(modname, __name__)
        except ImportError:  # a sub-command not built yet
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"kldiv {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
