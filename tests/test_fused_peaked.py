"""The C kernel's float32 gradients on peaked, nearly disjoint rows, and float32 probabilities at a
temperature (outside audit, findings 3 and 2).

Peaked rows: the gradient with respect to the side whose own log-probabilities appear twice is
w_i (log(w_i / v_i) - KL); at that side's top entry it is a tiny difference of two numbers of size
KL, formed by the kernel from log-ratios centred at the top entry of p (its reference entry). With
probabilities against log-space input the reference entry's logarithms were float-rounded (4e-6 at
log p = -40), which rounded that tiny difference away (0.17 of a row's gradient).

Temperature: float32 probabilities against logits at T != 1 went in as float32 logarithms, 6e-8
|log p| off, the whole log-ratio of a near-convergent row (5.8e-5 relative at KL 1.4e-7).

The reference is mpmath at 50 digits on the exact float32 inputs, per row (the float64 textbook
formula is no reference on these rows: it loses the digits itself). The error of a row's gradient
is max |g - ref| / max |ref| (max-abs over the row's largest entry), with the row maximum floored
at 1e-30 (gradients that float32 holds only as subnormals).

Not covered here: a float32 probability that is itself subnormal (tests/test_fused_subnormal.py);
rows whose whole gradient lies below ~1e-30.
"""
from __future__ import annotations

import mpmath
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from torch_reference import took_fast  # noqa: E402

FNS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "jeffreys": kldiv.jeffreys_div}


def _mp_kl(lx, ly, T):
    """KL(softmax(lx / T) || softmax(ly / T)) and its gradients with respect to lx and ly (lists
    of mpf log-space values, None for -inf), in mpmath."""
    a = [None if v is None else v / T for v in lx]
    b = [None if v is None else v / T for v in ly]
    za = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in a if v is not None))
    zb = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in b if v is not None))
    lp = [None if v is None else v - za for v in a]
    lq = [None if v is None else v - zb for v in b]
    p = [0 if v is None else mpmath.exp(v) for v in lp]
    q = [0 if v is None else mpmath.exp(v) for v in lq]
    kl = mpmath.fsum(pi * (u - w) for pi, u, w in zip(p, lp, lq) if u is not None)
    gx = [0 if u is None else pi * ((u - w) - kl) / T for pi, u, w in zip(p, lp, lq)]
    gy = [(qi - pi) / T for pi, qi in zip(p, q)]
    return kl, gx, gy


def _mp_row(kind, x, y, ps, qs, T):
    """The divergence of one row and its gradients with respect to the inputs themselves."""
    with mpmath.workdps(50):
        def logs(v, sp):
            v = [mpmath.mpf(float(t)) for t in v]
            if sp == "probs":
                return [mpmath.log(t) if t > 0 else None for t in v]
            return v
        lx, ly = logs(x, ps), logs(y, qs)
        if kind == "forward":
            val, gx, gy = _mp_kl(lx, ly, T)
        elif kind == "reverse":
            val, gy, gx = _mp_kl(ly, lx, T)
        else:
            v1, g1x, g1y = _mp_kl(lx, ly, T)
            v2, g2y, g2x = _mp_kl(ly, lx, T)
            val = v1 + v2
            gx = [u + w for u, w in zip(g1x, g2x)]
            gy = [u + w for u, w in zip(g1y, g2y)]
        # with respect to a probability: the log-space gradient / p (0 where p = 0)
        if ps == "probs":
            gx = [g / mpmath.mpf(float(t)) if t > 0 else 0 for g, t in zip(gx, x)]
        if qs == "probs":
            gy = [g / mpmath.mpf(float(t)) if t > 0 else 0 for g, t in zip(gy, y)]
        return float(val), [float(g) for g in gx], [float(g) for g in gy]


def _row_err(g, ref):
    ref = torch.tensor(ref, dtype=torch.float64)
    return float((g.double() - ref).abs().max() / max(float(ref.abs().max()), 1e-30))


def _check(kind, a, b, ps, qs, T, tol=1e-5, vtol=2e-6):
    x = a.clone().requires_grad_()
    y = b.clone().requires_grad_()
    rows = FNS[kind](a, b, p_space=ps, q_space=qs, temperature=T, reduction="none")
    v = FNS[kind](x, y, p_space=ps, q_space=qs, temperature=T, reduction="sum")
    assert took_fast(v), (kind, ps, qs, T)
    v.backward()
    for r in range(a.shape[0]):
        val, gx, gy = _mp_row(kind, a[r].tolist(), b[r].tolist(), ps, qs, T)
        assert abs(float(rows[r]) - val) <= vtol * abs(val) + 1e-30, (kind, ps, qs, T, r)
        ep, eq = _row_err(x.grad[r], gx), _row_err(y.grad[r], gy)
        assert ep <= tol and eq <= tol, (kind, ps, qs, T, r, ep, eq)


def _peaked(seed, n, V, std, space):
    """n rows of softmax(std * randn) in the given space (float32); entries kept above e^-80
    for probabilities (float32 normal numbers: subnormal probabilities are another matter)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, dtype=torch.float64, generator=g) * std
    if space == "probs":
        z = z.clamp(-38.0, 38.0)
    lp = torch.log_softmax(z, -1)
    if space == "probs":
        return lp.exp().float()
    if space == "logits":
        return (lp + 3.0).float()
    return lp.float()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys"])
@pytest.mark.parametrize("std,T", [(5.0, 1.0), (10.0, 1.0), (20.0, 1.0), (40.0, 1.0),
                                   (1.0, 0.05)])
def test_peaked_log_space(kind, std, T):
    """log-probabilities against logits: the audit's rows (V = 40)."""
    a = _peaked(1, 6, 40, std, "log_probs")
    b = _peaked(2, 6, 40, std, "logits")
    _check(kind, a, b, "log_probs", "logits", T)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys"])
@pytest.mark.parametrize("ps,qs", [("probs", "logits"), ("logits", "probs"),
                                   ("probs", "probs")])
@pytest.mark.parametrize("std,seed", [(20.0, 8), (30.0, 5), (30.0, 8)])
def test_peaked_probabilities(kind, ps, qs, std, seed):
    """Probabilities on one side or both (temperature 1: the kernel takes them directly). The
    seeds hold rows where the float-rounded reference logarithms gave 1e-5 .. 1.0 per row."""
    a = _peaked(seed, 12, 40, std, ps)
    b = _peaked(seed + 100, 12, 40, std, qs)
    _check(kind, a, b, ps, qs, 1.0)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys"])
@pytest.mark.parametrize("ps,qs", [("probs", "logits"), ("log_probs", "probs"),
                                   ("probs", "probs")])
@pytest.mark.parametrize("T", [2.0, 0.5])
def test_close_probabilities_temperature(kind, ps, qs, T):
    """Near-convergent float32 probabilities at T != 1 (KL ~ 1e-7): value to 1e-6 relative."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 7, dtype=torch.float64, generator=g)
    lp = torch.log_softmax(z, -1)
    lq = torch.log_softmax(z + 1e-3 * torch.randn(4, 7, dtype=torch.float64, generator=g), -1)

    def side(l, sp):
        return (l.exp() if sp == "probs" else l).float()

    _check(kind, side(lp, ps), side(lq, qs), ps, qs, T, tol=1e-5, vtol=1e-6)
