"""NumPy row kernel (kldiv._ext._divrows) at tiny divergences: JS and Jeffreys of nearly equal
rows (logits z and z + eps * noise, eps 1e-8 .. 1e-12, so JS ~ eps^2 down to ~1e-25), with
-1e30 masks on both sides or one, in every input space, against 50-digit mpmath on the exact
stored inputs. The kernel used to take log(F / E) of the two sides' masses directly: its
rounding (~1e-16 absolute) sat in every log-ratio, and its square in JS (4e-11 relative at JS
1e-25, 1e-8 with masks). KL and reverse KL on the same rows are checked too."""
from __future__ import annotations

import mpmath
import numpy as np
import pytest

import kldiv
from kldiv.backends import numpy_fast as NF

pytestmark = pytest.mark.skipif(NF.extension() is None, reason="kldiv._ext._divrows not built")
FNS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
       "jeffreys": kldiv.jeffreys_div}
V = 50


def mp_row(x, space, T):
    """Exact normalised probabilities of one stored row (mpmath, 0 off the support)."""
    xs = [mpmath.mpf(float(v)) for v in x]
    if space == "probs":
        s = mpmath.fsum(v for v in xs if v > 0)
        return [v / s if v > 0 else mpmath.mpf(0) for v in xs]
    ys = [v / T for v in xs]
    m = max(ys)
    w = [mpmath.exp(v - m) for v in ys]
    z = mpmath.fsum(w)
    return [v / z for v in w]


def mp_value(kind, p, q, beta):
    def kl(a, b):
        return mpmath.fsum(x * mpmath.log(x / y) for x, y in zip(a, b) if x != 0)

    if kind == "forward":
        return kl(p, q)
    if kind == "reverse":
        return kl(q, p)
    if kind == "jeffreys":
        return kl(p, q) + kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def truth(kind, a, b, ps, qs, T, beta):
    with mpmath.workdps(50):
        return float(mp_value(kind, mp_row(a, ps, mpmath.mpf(T)), mp_row(b, qs, mpmath.mpf(T)),
                              mpmath.mpf(beta)))


def near_rows(rng, eps, mask):
    """float64 logits z, z + eps * noise; -1e30 masks at the same entries or on one side (there
    at logits ~ -60 so that the masked mass, ~1e-26, keeps the divergence tiny)."""
    z = rng.standard_normal(V) * 2.0
    idx = rng.choice(V, 5, replace=False)
    if mask in ("p", "q"):
        z[idx] = -60.0 - rng.random(5)
    a, b = z.copy(), z + eps * rng.standard_normal(V)
    if mask in ("both", "p"):
        a[idx] = -1e30
    if mask in ("both", "q"):
        b[idx] = -1e30
    return a, b


def to_space(x, space):
    if space == "logits":
        return x
    lp = x - (x.max() + np.log(np.sum(np.exp(x - x.max()))))
    return lp if space == "log_probs" else np.exp(lp)


def check(kind, a, b, ps, qs, T, beta, rtol, kernel=True):
    kw = dict(p_space=ps, q_space=qs, reduction="none")
    if T != 1.0:
        kw["temperature"] = T
    if kind == "js":
        kw["beta"] = beta
    opts = dict(p_space=ps, q_space=qs, axis=-1, reduction="none", mask=None, weight=None,
                temperature=T, t2_scale=False, validate=None, beta=beta)
    # kernel=False: float32 logits at T = 1 for KL / reverse KL, compare's float32 kernel
    assert (NF.numpy_pre(kind, a[None], b[None], **opts) is not NotImplemented) == kernel
    got = float(FNS[kind](a[None], b[None], **kw)[0])
    ref = truth(kind, a, b, ps, qs, T, beta)
    assert ref > 0
    assert abs(got - ref) <= rtol * ref, (kind, ps, qs, T, beta, got, ref, abs(got - ref) / ref)


@pytest.mark.parametrize("mask", [None, "both", "p", "q"])
@pytest.mark.parametrize("kind", ["js", "jeffreys", "forward", "reverse"])
def test_float64_logits_tiny_divergence_match_mpmath(kind, mask):
    rng = np.random.default_rng(hash((kind, str(mask))) % 2**32)
    for eps in (1e-8, 1e-10, 1e-12):
        a, b = near_rows(rng, eps, mask)
        for T, beta in ((1.0, 0.5), (0.7, 0.2), (2.0, 0.9)):
            if kind in ("forward", "reverse") and beta != 0.5:
                continue
            check(kind, a, b, "logits", "logits", T, beta, 1e-13)


# (probabilities against log space are not here: the kernel and the core round log p_j of each
# probability, ~1e-16 absolute per entry, which is 1e-7 relative at JS 1e-20)
@pytest.mark.parametrize("spaces", [("probs", "probs"), ("log_probs", "log_probs"),
                                    ("log_probs", "logits")])
@pytest.mark.parametrize("kind", ["js", "jeffreys"])
def test_float64_other_spaces_tiny_divergence_match_mpmath(kind, spaces):
    rng = np.random.default_rng(7 + len(spaces[0]) * 3 + len(spaces[1]))
    for eps in (1e-9, 1e-12):
        z, w = near_rows(rng, eps, None)
        a, b = to_space(z, spaces[0]), to_space(w, spaces[1])
        for beta in (0.5, 0.3):
            check(kind, a, b, spaces[0], spaces[1], 1.0, beta, 1e-13)


@pytest.mark.parametrize("kind", ["js", "jeffreys", "forward", "reverse"])
def test_float32_rows_keep_float32_accuracy(kind):
    rng = np.random.default_rng(11)
    for eps, mask, space in ((1e-2, None, "logits"), (1e-3, "both", "logits"),
                             (1e-3, None, "probs"), (1e-2, "q", "log_probs")):
        z, w = near_rows(rng, eps, mask)
        a = to_space(z, space).astype(np.float32)
        b = to_space(w, space).astype(np.float32)
        if space == "probs":
            a, b = a / a.sum(dtype=np.float64), b / b.sum(dtype=np.float64)
            a, b = a.astype(np.float32), b.astype(np.float32)
        # beta 0.3: float32 logits at beta 1/2 and T = 1 go to compare's float32 kernel instead
        check(kind, a, b, space, space, 1.0, 0.3, 2e-6,
              kernel=space == "probs" or kind in ("js", "jeffreys"))
