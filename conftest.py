"""Root pytest configuration: what the doctest collection over src/ must not import."""
from pathlib import Path

collect_ignore = ["src/kldiv/__main__.py", "setup.py"]

# Modules whose import is slow and that hold no doctest example: not imported by the doctest
# collection (every pytest-xdist worker collects everything) as long as they hold none; the tests
# import and test them. integrations/hf.py: transformers' Trainer, ~1 s per worker on top of
# `import transformers` (tests/test_integrations.py).
_SLOW_IMPORTS_WITHOUT_DOCTESTS = ("src/kldiv/integrations/hf.py",)
_ROOT = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path, config):
    for rel in _SLOW_IMPORTS_WITHOUT_DOCTESTS:
        path = _ROOT / rel
        if Path(collection_path).resolve() == path:
            return ">>>" not in path.read_text(encoding="utf-8")
    return None
