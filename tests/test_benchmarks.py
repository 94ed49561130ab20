"""Smoke runs of the benchmark scripts (`--quick`): they run, exit 0 and print their table.

Timings are never asserted (shared, noisy machines); the full runs are documented in docs/.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["accuracy.py", "compare.py", "distributed.py", "_linear_bench.py", "large_vocab.py",
           "everyday.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick(script):
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "|" in res.stdout or "  " in res.stdout  # a table was printed
