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
    "cache": ".cache_cmd",
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


def _one_line_warnings(command):
    """Show warnings as one line on stderr, ``kldiv COMMAND: warning: ...`` (not Python's two)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"kldiv {command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            _one_line_warnings(args.command)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:  # FileNotFoundError, IsADirectoryError are OSErrors
        print(f"kldiv {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (OverflowError, MemoryError) as exc:  # a size no check caught: still one line
        print(f"kldiv {args.command}: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc) -> str:
    """The message of ``exc`` on one line."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
