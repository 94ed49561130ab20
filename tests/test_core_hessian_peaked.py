"""float32 second derivatives of the core on peaked rows (#11; the torch default path's are in
tests/test_torch_hessian_peaked.py, whose rows, mpmath reference and error measure this file
reuses).

A side whose mode has probability 1 in float32 has its largest Hessian entries, of the size of
1 - w_mode, at that mode. Autodiff of the core's derivative formulas formed them from the
weights' derivative there, w_mode (1 - w_mode) with 1 - w_mode rounded to 0: per-block relative
error 1.0 for forward KL d2/dq2, reverse KL d2/dp2, every block of Jeffreys, and JS's mixed
blocks on far rows (entries of the size of p q). Reference: the Hessian in mpmath at 60 digits
on the exact float32 inputs. Error: per block (pp, pq, qp, qq), max |H - H_ref| over the
block's max |H_ref|.

Tolerance: 2e-6, except Jeffreys' d2/dp2 on one overlapping row at T = 2 (rows 8: its block is
1/300 of the Hessian's largest entry, a difference of terms 12 times its size: 1.9e-6..6e-6
measured, 2e-8 of the whole Hessian).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kldiv
from test_torch_hessian_peaked import ROWS, _block_errors, _mp_hessian
from torch_reference import core_only

FUNCS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}
KINDS = tuple(FUNCS)
TOL = 2e-6
TOL_CANCEL = 1e-5  # Jeffreys' pp block on ROWS[8] (see the module docstring)

_REF: dict = {}


def _log_probs(x):
    """float32 log-probabilities of a logit row (rounded once from float64)."""
    return torch.log_softmax(torch.tensor(x, dtype=torch.float64), -1).float().tolist()


def _inputs(i, space):
    a, b, T = ROWS[i]
    if space == "log_probs":
        a, b = _log_probs(a), _log_probs(b)
    return a, b, T


def reference(kind, i, space):
    key = (kind, i, space)
    if key not in _REF:
        a, b, T = _inputs(i, space)
        _REF[key] = _mp_hessian(kind, a, b, T)
    return _REF[key]


def _check(kind, i, H, R):
    errs = _block_errors(H, R)
    tol = [TOL] * 4
    if kind == "jeffreys" and i == 8:
        tol[0] = TOL_CANCEL
    return [("%.1e" % e) for e, t in zip(errs, tol) if not e <= t] and errs


@pytest.mark.parametrize("space", ["logits", "log_probs"])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_core_float32_hessian_peaked_rows(kind, space):
    bad = []
    for i in range(len(ROWS)):
        a, b, T = _inputs(i, space)
        A = torch.tensor([a], dtype=torch.float32)
        B = torch.tensor([b], dtype=torch.float32)

        def f(x, y):
            with core_only():
                return FUNCS[kind](x, y, p_space=space, q_space=space, temperature=T,
                                   reduction="sum")

        H = torch.autograd.functional.hessian(f, (A, B))
        V = len(a)
        H = torch.cat([torch.cat([H[r][c].reshape(V, V) for c in range(2)], 1)
                       for r in range(2)], 0).double()
        errs = _check(kind, i, H, reference(kind, i, space))
        if errs:
            bad.append((i, ["%.1e" % e for e in errs]))
    assert not bad, bad


def test_jax_core_float32_hessian_peaked_rows():
    """The JAX core (``divergence_rows``: JS and Jeffreys always run it, KL and reverse KL on
    probabilities or extreme temperatures): the audit's row and the far row at T = 1, padded
    with -inf to one (2, 8) batch, jax.hessian of all four kinds under one jit."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from kldiv._core.divergence import divergence_rows
    from kldiv.backends import jax_fast

    pick = [0, 7]  # both at T = 1
    Vm = max(len(ROWS[i][0]) for i in pick)

    def pad(x):
        return list(x) + [-np.inf] * (Vm - len(x))

    A = jnp.asarray(np.array([pad(ROWS[i][0]) for i in pick], dtype=np.float32))
    B = jnp.asarray(np.array([pad(ROWS[i][1]) for i in pick], dtype=np.float32))
    def hessians(a, b):  # one jit for the four kinds: one compile (~14 CPU-s)
        return [jax.hessian(lambda a, b, k=k: jnp.sum(divergence_rows(
            k, jax_fast._xp(), a, b, "logits", "logits", 1.0)), argnums=(0, 1))(a, b)
            for k in KINDS]

    bad = []
    for kind, H in zip(KINDS, jax.jit(hessians)(A, B)):
        H = [[np.asarray(H[r][c]) for c in range(2)] for r in range(2)]
        for k, i in enumerate(pick):
            V = len(ROWS[i][0])
            assert not any(np.isnan(H[r][c][k, :, k, :]).any() for r in range(2)
                           for c in range(2))
            blk = np.block([[H[r][c][k, :V, k, :V] for c in range(2)] for r in range(2)])
            errs = _check(kind, i, torch.tensor(blk, dtype=torch.float64),
                          reference(kind, i, "logits"))
            if errs:
                bad.append((kind, i, ["%.1e" % e for e in errs]))
    assert not bad, bad
