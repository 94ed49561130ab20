"""Atomic file writes: a temporary file in the target's directory, renamed over it when complete.

An interrupted run leaves either the old file or none, never half a file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (os.umask sets it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=suffix or ".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 - umask)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def save_atomic(path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary path beside ``path``, then move it into place."""
    with atomic_path(path, suffix=os.path.splitext(os.fspath(path))[1] or None) as tmp:
        write(tmp)
