"""The float32 C kernel's logarithm of probabilities (fused.c ``klog_fd``: log of a float in
double precision), through the kernel's results on crafted rows, against mpmath.

float32 probabilities against log-space input (the README's migration row and its mirror):
the kernel forms log p_i in double and the log-ratio to the other side in double, so that rows
near convergence keep their digits (a float32 log p_i is 6e-8 |log p_i| off: 6e-6 at a
subnormal p_i, against log-ratios of 1e-3 here). Crafted probabilities cover the float32
range: subnormals (2^-149 up to the largest), FLT_MIN and its neighbour, values just below, at
and just above powers of two from 2^-125 to 2^-1, the neighbours of sqrt(1/2) (where the
logarithm's mantissa reduction switches), 1 - 2^-24, 1, and a row of values up to FLT_MAX
(the kernel renormalises; validation is off for these unnormalised rows); zeros (log 0 =
-inf) leave the support: zero gradient there, the value over the support. The other side is
log p + 1e-3 noise, rounded to float32. Checked per entry: the gradient with respect to the
probabilities, (log(p_i / q_i) - KL) / sum(p) for p (and its mirror for q), which carries each
entry's log-ratio at full relative weight whatever p_i is; and each row's value.
"""
from __future__ import annotations

import mpmath
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from kldiv.backends import torch_fast  # noqa: E402
from torch_reference import took_fast  # noqa: E402

pytestmark = pytest.mark.skipif(torch_fast._EXT is None, reason="C extension not built")


def _f32(bits):
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _crafted():
    """float32 probabilities from all over the range (positive, finite), one list."""
    vals = [_f32(1), _f32(3), 2.0 ** -140, 1e-40, _f32(0x007FFFFF),  # subnormals
            2.0 ** -126, _f32(0x00800001)]  # FLT_MIN and the next float
    for k in (-125, -100, -87, -64, -30, -11, -3, -2, -1):
        b = int(np.array([2.0 ** k], dtype=np.float32).view(np.uint32)[0])
        vals += [_f32(b - 1), _f32(b), _f32(b + 1)]  # just below, at, just above 2^k
    for k in (-60, -7, 0):  # sqrt(1/2) 2^k and its neighbours
        b = int(np.array([np.sqrt(0.5) * 2.0 ** k], dtype=np.float32).view(np.uint32)[0])
        vals += [_f32(b - 1), _f32(b), _f32(b + 1)]
    vals += [_f32(0x3F7FFFFF), 1.0, 0.3, 0.7]
    return np.array(vals, dtype=np.float32)


def _rows():
    """(P, note) float32 rows: the crafted list, the same with zeros, and a row near FLT_MAX."""
    c = _crafted()
    with_zeros = np.concatenate([c[:20], np.zeros(3, np.float32), c[20:]])
    big = np.array([np.finfo(np.float32).max, _f32(0x7F7FFFFE), 2.0 ** 127, _f32(0x7F000001),
                    _f32(0x7EFFFFFF), 2.0 ** 120 * 1.5, 2.0 ** 110, 2.0 ** 100 * 1.25],
                   dtype=np.float32)
    return [(c, "range"), (with_zeros, "zeros"), (big, "FLT_MAX")]


def _other_side(P, seed):
    """float32 log-probabilities of P's normalisation plus 1e-3 noise (finite everywhere)."""
    rng = np.random.default_rng(seed)
    with mpmath.workdps(40):
        S = mpmath.fsum(mpmath.mpf(float(v)) for v in P)
        lp = [float(mpmath.log(mpmath.mpf(float(v)) / S)) if v > 0 else -5.0 for v in P]
    return (np.array(lp) + 1e-3 * rng.standard_normal(len(P))).astype(np.float32)


def _exact(P, W):
    """KL(P / sum P || softmax(W)) and its gradient with respect to P (0 off P's support), by
    mpmath from the exact float32 inputs."""
    with mpmath.workdps(50):
        p = [mpmath.mpf(float(v)) for v in P]
        S = mpmath.fsum(p)
        w = [mpmath.mpf(float(v)) for v in W]
        mw = max(w)
        lz = mw + mpmath.log(mpmath.fsum(mpmath.exp(v - mw) for v in w))
        lr = [mpmath.log(a / S) - (b - lz) if a > 0 else None for a, b in zip(p, w)]
        kl = mpmath.fsum(a / S * r for a, r in zip(p, lr) if r is not None)
        g = [float((r - kl) / S) if r is not None else 0.0 for r in lr]
    return float(kl), np.array(g)


def _exact_mirror(W, Q):
    """KL(softmax(W) || Q / sum Q) and its gradient with respect to Q: (1 - p_i / q_i) / sum Q."""
    with mpmath.workdps(50):
        q = [mpmath.mpf(float(v)) for v in Q]
        S = mpmath.fsum(q)
        w = [mpmath.mpf(float(v)) for v in W]
        mw = max(w)
        lz = mw + mpmath.log(mpmath.fsum(mpmath.exp(v - mw) for v in w))
        p = [mpmath.exp(v - lz) for v in w]
        kl = mpmath.fsum(a * ((v - lz) - mpmath.log(b / S)) for a, v, b in zip(p, w, q))
        g = [float((1 - a / (b / S)) / S) for a, b in zip(p, q)]
    return float(kl), np.array(g)


def _check_grad(got, ref, what):
    got = np.asarray(got, dtype=np.float64)
    tol = 2e-5 * np.abs(ref) + 1e-6 * np.abs(ref).max()
    bad = np.abs(got - ref) > tol
    assert not bad.any(), (what, np.flatnonzero(bad), got[bad], ref[bad])


@pytest.mark.parametrize("space", ["log_probs", "logits"])
def test_probabilities_against_log_space_over_the_float32_range(space):
    for k, (P, note) in enumerate(_rows()):
        W = _other_side(P, k)
        if space == "logits":
            W = (W + np.float32(3.0)).astype(np.float32)
        ref_v, ref_g = _exact(P, W)
        p = torch.tensor(P[None, :], requires_grad=True)
        v = kldiv.kl_div(p, torch.tensor(W[None, :]), p_space="probs", q_space=space,
                         reduction="sum", validate=False)
        assert took_fast(v)
        v.backward()
        val = float(v.detach())
        assert abs(val - ref_v) <= 1e-5 * ref_v, (note, val, ref_v)
        if note != "FLT_MAX":  # gradients there are ~1e-42: float32 subnormals
            _check_grad(p.grad[0].numpy(), ref_g, note)
            assert np.all(p.grad[0].numpy()[P == 0] == 0)


def test_log_space_against_probabilities_over_the_float32_range():
    for k, (Q, note) in enumerate(_rows()):
        if note == "zeros":  # p > 0 = q: +inf (covered elsewhere)
            continue
        W = _other_side(Q, 10 + k)
        ref_v, ref_g = _exact_mirror(W, Q)
        q = torch.tensor(Q[None, :], requires_grad=True)
        v = kldiv.kl_div(torch.tensor(W[None, :]), q, p_space="log_probs", q_space="probs",
                         reduction="sum", validate=False)
        assert took_fast(v)
        v.backward()
        val = float(v.detach())
        assert abs(val - ref_v) <= 1e-5 * ref_v, (note, val, ref_v)
        if note != "FLT_MAX":
            _check_grad(q.grad[0].numpy(), ref_g, note)
