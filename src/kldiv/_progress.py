"""Progress bars for long streaming work (compare, convert): on a terminal only, never in CI."""
from __future__ import annotations

import os
import sys


def want_progress(progress) -> bool:
    """An explicit True/False wins; otherwise a bar only when stderr is a terminal and CI is unset."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(progress, total: int, *, desc: str, unit: str):
    """A tqdm bar on stderr, or None (not wanted, or tqdm not installed)."""
    if not want_progress(progress):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, file=sys.stderr)
