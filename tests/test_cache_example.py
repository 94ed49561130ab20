"""examples/distill_from_cache.py --smoke: caches a tiny random teacher, distils a student from the
cache, and the student's true (dense float64) KL falls and stays within the certified bounds."""
import importlib.util
import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("safetensors")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "distill_from_cache.py")


def test_distill_from_cache_smoke(tmp_path, loss="sampled"):
    spec = importlib.util.spec_from_file_location("distill_from_cache", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(["--smoke", "--loss", loss, "--out", str(tmp_path)])
    with open(tmp_path / "distill_from_cache.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == r["steps"]
    h = r["history"]
    assert h["true_kl"][-1] < h["true_kl"][0]
    for lo, kl, hi in zip(h["lower"], h["true_kl"], h["upper"]):
        assert lo <= kl * (1 + 1e-6) and kl <= hi * (1 + 1e-6)
