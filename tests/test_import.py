"""Importing kldiv imports no optional framework (torch, jax, matplotlib, scipy...).

Checked in a fresh interpreter, since this test session has imported them all already.
"""
import json
import subprocess
import sys

HEAVY = ("torch", "jax", "jaxlib", "matplotlib", "scipy", "tensorflow", "mxnet", "numba")


def _modules_after(code: str) -> set:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_kldiv_imports_no_optional_backend():
    mods = _modules_after("import kldiv")
    assert "kldiv" in mods
    leaked = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert not leaked, f"import kldiv pulled in: {leaked[:10]}"


def test_numpy_call_imports_no_optional_backend():
    """A NumPy computation through the core stays NumPy-only too."""
    code = ("import numpy as np, kldiv\n"
            "p = np.array([[0.3, 0.7]]); q = np.array([[0.5, 0.5]])\n"
            "kldiv.kl_div(p, q, reduction='mean'); kldiv.js_div(p, q); kldiv.kl_terms(p, q)\n"
            "kldiv.kl_div(np.log(p), np.log(q), p_space='logits', q_space='logits', "
            "reduction='sum')")
    mods = _modules_after(code)
    leaked = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert not leaked, f"a NumPy call pulled in: {leaked[:10]}"


def test_public_api():
    import kldiv

    for name in ("kl_div", "reverse_kl", "js_div", "jeffreys_div", "kl_terms", "set_validation",
                 "validation", "normalization_tolerance", "__version__"):
        assert hasattr(kldiv, name), name
        assert name in kldiv.__all__, name
    for name in ("kl_div", "reverse_kl", "js_div", "jeffreys_div", "kl_terms"):
        doc = getattr(kldiv, name).__doc__
        assert doc and ">>>" in doc, f"{name} needs a docstring with an example"
