"""Checks of the output paths the sub-commands write, made before any work starts."""
from __future__ import annotations

import os


def check_output(path, option: str, *, kind: str = "file") -> str | None:
    """Refuse a directory (or a path inside a regular file) as ``option``'s output.

    Returns the missing parent directory that writing ``path`` will create (None if it exists),
    so that the command can say so.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path}: is a directory; give a {kind} name")
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise NotADirectoryError(f"{option} {path}: {probe} is a file, not a directory")
    return None if os.path.isdir(parent) else os.path.dirname(path) or parent


def figure_format(path, option: str) -> str:
    """The image format for ``path`` from its extension (matplotlib's formats); PNG without one."""
    from ..plots.figures import figure_format as fmt

    try:
        return fmt(path)
    except ValueError as exc:
        raise ValueError(f"{option} {exc}") from None
    except ImportError:
        raise ValueError(f"{option} {path}: drawing figures needs matplotlib "
                         f"(pip install matplotlib)") from None
