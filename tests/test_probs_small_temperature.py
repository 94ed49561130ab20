"""Probabilities at a small temperature (issue 11, audit 3 F13), per row against mpmath on the
exact float inputs: values and gradients with respect to the probabilities.

A probability side at temperature T is the distribution p^(1/T) renormalised, i.e. the logits
log(p) / T. Formed as the float32 log p divided by T, every entry carried an error of
eps |log p_i| / T (about 2e-8 / T relative: 1e-4 at T = 1e-3, 5e-2 at T = 1e-6, on the core on
NumPy, torch and JAX). The core now centres the row on its largest probability first
(``kldiv._core.divergence._centred_log_probs``: log1p((p_i - p_max) / p_max) within a factor
2 of the maximum, exact by Sterbenz), so that the entries that carry weight have an error of
eps |log(p_i / p_max)| / T, itself of order eps.

Rows: V = 8 float32 probabilities within a factor exp(-4T) of their maximum (the tempered
distributions are far from one-hot), plus rows holding entries far below the maximum, an exact
zero (on both sides) and a subnormal (1e-40). Paths: NumPy (the core: its kernel declines
probabilities at a temperature), torch's default path (its C kernel at T = 0.02, whose
float32 probabilities go in as float64 logarithms; the core below T = 1/64), torch's core
with the fast path off, JAX (one case: its compiles are slow). The reference is formed from the
exact inputs in mpmath (``oracle.value_grad_log`` at 300 bits, derivatives with respect to the
tempered logits u = log p / T, then du_i / dp_i = 1 / (T p_i); 0 where p_i = 0).
"""
from __future__ import annotations

import functools

import mpmath
import numpy as np
import pytest

import kldiv
import oracle

torch = pytest.importorskip("torch")
from torch_reference import core_only  # noqa: E402

FUNCS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}
TEMPERATURES = (0.02, 1e-3, 1e-6)
# measured after the change: values <= 3e-7, gradients <= 4e-7 per row (before: up to 8e-2 and
# 1e-1 at T = 1e-6, 1e-4 at T = 1e-3)
VTOL, GTOL = 1.5e-6, 2e-6


def _rows(T, dtype=np.float32):
    """(P, Q) float rows, each within a few T of its maximum in log space, the last row also
    with far entries, a zero on both sides and a subnormal."""
    rng = np.random.default_rng(11)
    n, V = 3, 8
    u = rng.uniform(0, 4, (n, V))
    w = rng.uniform(0, 4, (n, V))
    u[:, 0] = w[:, 1] = 0
    P, Q = np.exp(-T * u), np.exp(-T * w)
    P[2, 5:], Q[2, 5:] = (0.3, 0.0, 1e-40), (0.1, 0.0, 2e-40)
    P /= P.sum(-1, keepdims=True)
    Q /= Q.sum(-1, keepdims=True)
    return P.astype(dtype), Q.astype(dtype)


@functools.lru_cache(maxsize=None)
def _reference(kind, T, dtype="float32"):
    """[(value, dD/dp, dD/dq)] per row, float64, from the exact float inputs."""
    P, Q = _rows(T, np.dtype(dtype))
    out = []
    with mpmath.workprec(300):
        t = mpmath.mpf(T)

        def lw(row):
            s = [mpmath.log(mpmath.mpf(float(v))) / t if v > 0 else None for v in row]
            m = max(v for v in s if v is not None)
            z = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in s if v is not None))
            return [v - z if v is not None else mpmath.mpf(-10) ** 30 for v in s]

        for prow, qrow in zip(P, Q):
            v, gu, gv = oracle.value_grad_log(kind, lw(prow), lw(qrow), prec=300)
            gp = [float(g / (t * mpmath.mpf(float(x)))) if x > 0 else 0.0
                  for g, x in zip(gu, prow)]
            gq = [float(g / (t * mpmath.mpf(float(y)))) if y > 0 else 0.0
                  for g, y in zip(gv, qrow)]
            out.append((float(v), np.array(gp), np.array(gq)))
    return out


def _row_err(g, ref):
    g = np.asarray(g, np.float64)
    return float(np.max(np.abs(g - ref)) / np.max(np.abs(ref)))


def _check(kind, T, value, gp=None, gq=None, vtol=VTOL, gtol=GTOL, dtype="float32"):
    for i, (rv, rp, rq) in enumerate(_reference(kind, T, dtype)):
        err = abs(float(value[i]) - rv) / rv
        assert err <= vtol, (kind, T, i, float(value[i]), rv, err)
        if gp is not None:
            assert np.all(gp[i][rp == 0] == 0), (kind, T, i, gp[i])
            assert _row_err(gp[i], rp) <= gtol, (kind, T, i, "p", _row_err(gp[i], rp))
            assert _row_err(gq[i], rq) <= gtol, (kind, T, i, "q", _row_err(gq[i], rq))


@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("kind", list(FUNCS))
def test_numpy(kind, T):
    P, Q = _rows(T)
    _check(kind, T, FUNCS[kind](P, Q, temperature=T))


@pytest.mark.parametrize("fast", [True, False], ids=["default", "core"])
@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("kind", list(FUNCS))
def test_torch(kind, T, fast):
    P, Q = _rows(T)
    x = torch.tensor(P, requires_grad=True)
    y = torch.tensor(Q, requires_grad=True)
    if fast:
        v = FUNCS[kind](x, y, temperature=T)
    else:
        with core_only():
            v = FUNCS[kind](x, y, temperature=T)
    v.sum().backward()
    _check(kind, T, v.detach().numpy(), x.grad.numpy(), y.grad.numpy())


@pytest.mark.parametrize("kind", ["forward", "js"])
def test_torch_float64(kind):
    """float64 at T = 1e-6: the plain log p was off 1e-16 |log p| / T (2e-10 relative)."""
    T = 1e-6
    P, Q = _rows(T, np.float64)
    x = torch.tensor(P, requires_grad=True)
    y = torch.tensor(Q, requires_grad=True)
    v = FUNCS[kind](x, y, temperature=T)
    v.sum().backward()
    _check(kind, T, v.detach().numpy(), x.grad.numpy(), y.grad.numpy(), vtol=1e-13, gtol=1e-12,
           dtype="float64")


def test_probs_against_logits():
    """One side probabilities, the other logits: forward KL at T = 1e-3 (torch core)."""
    T = 1e-3
    P, Q = _rows(T)
    with np.errstate(divide="ignore"):  # log 0 = -inf: a masked category
        logits = np.log(Q.astype(np.float64)).astype(np.float32)
    x = torch.tensor(P, requires_grad=True)
    with core_only():
        v = kldiv.kl_div(x, torch.tensor(logits), q_space="logits", temperature=T)
    v.sum().backward()
    v = v.detach()
    with mpmath.workprec(300):
        t = mpmath.mpf(T)
        for i in range(P.shape[0]):
            sp = [mpmath.log(mpmath.mpf(float(a))) / t if a > 0 else None for a in P[i]]
            sq = [mpmath.mpf(float(b)) / t if np.isfinite(b) else None for b in logits[i]]

            def lw(s):
                m = max(a for a in s if a is not None)
                z = m + mpmath.log(mpmath.fsum(mpmath.exp(a - m) for a in s if a is not None))
                return [a - z if a is not None else mpmath.mpf(-10) ** 30 for a in s]

            rv, gu, _ = oracle.value_grad_log("forward", lw(sp), lw(sq), prec=300)
            rp = np.array([float(g / (t * mpmath.mpf(float(a)))) if a > 0 else 0.0
                           for g, a in zip(gu, P[i])])
            assert abs(float(v[i]) - float(rv)) <= VTOL * float(rv), (i, float(v[i]), rv)
            assert _row_err(x.grad[i].numpy(), rp) <= GTOL, (i, _row_err(x.grad[i].numpy(), rp))


def test_jax():
    """JAX (core), forward KL at T = 1e-6, value and jax.grad (one shape: few compiles)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    T = 1e-6
    P, Q = _rows(T)

    def f(a, b):
        return kldiv.kl_div(a, b, temperature=T)

    v = f(jnp.asarray(P), jnp.asarray(Q))
    gp, gq = jax.grad(lambda a, b: f(a, b).sum(), argnums=(0, 1))(jnp.asarray(P), jnp.asarray(Q))
    _check("forward", T, np.asarray(v), np.asarray(gp), np.asarray(gq))
