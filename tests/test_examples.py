"""Smoke tests of the three training examples: each runs a few steps, writes its figures, and
its loss falls. The full runs (and their measured results) are described in examples/README.md."""
import importlib.util
import json
import math
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_vae_smoke(tmp_path):
    m = _load("vae_digits").main(["--smoke", "--out", str(tmp_path)])
    assert _png(tmp_path / "vae_loss.png") and _png(tmp_path / "vae_prior_samples.png")
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 3
    h = m["history"]
    assert m["final_train_loss"] < m["first_batch_loss"]
    assert h["train_rec"][-1] < h["train_rec"][0]
    assert all(math.isfinite(v) and v >= 0 for v in h["train_kl"] + h["test_kl"])


def test_trpo_smoke(tmp_path):
    pytest.importorskip("gymnasium")
    m = _load("trpo_cartpole").main(["--smoke", "--out", str(tmp_path)])
    assert _png(tmp_path / "return_per_iteration.png")
    hist = m["history"]
    assert len(hist) == 3
    accepted = [h for h in hist if h["accepted"]]
    assert accepted, "no TRPO step passed the line search"
    for h in accepted:
        # the surrogate loss (-surrogate) falls and the KL constraint holds
        assert h["surrogate_after"] > h["surrogate_before"]
        assert 0 < h["kl"] <= m["max_kl"]
    assert all(h["value_loss_last"] < h["value_loss_first"] for h in hist)


def test_distill_smoke(tmp_path):
    m = _load("distill_digits").main(["--smoke", "--out", str(tmp_path)])
    assert _png(tmp_path / "distill_accuracy.png")
    assert m["teacher_losses"][-1] < m["teacher_losses"][0]
    for name, runs in m["student_losses"].items():
        for losses in runs:
            assert losses[-1] < losses[0], name
    assert 0.1 < m["teacher_accuracy"] <= 1.0
