"""linear_kl_div with a top-k teacher: the teacher's left-out mass (audit 2, finding F-B).

The extra bucket's mass ``1 - sum_k exp(lp_k)`` is taken from the stored log-probs exactly (in
float64, whatever their dtype), and is 0 at or below ``TOPK_REST_TOL``. Reference: 50-digit
mpmath on the exact float inputs, value and gradient with respect to ``hidden`` per row (the
weight is the identity, so the student's logits are ``hidden`` exactly).
"""
import math

import mpmath
import numpy as np
import pytest
import torch

from kldiv.backends.torch_linear import TOPK_REST_TOL
from kldiv.torch import linear_kl_div
from test_linear_topk_renorm import mp_rows as renorm_mp_rows

F32, F64 = torch.float32, torch.float64


def mp_rows(kind, z, idx, lp, beta=0.5, T=1.0):
    """Per-row values, d value / d z and left-out masses (None where K = V) of the K + 1-bucket
    divergence, 50-digit mpmath (test_linear_topk_renorm.mp_rows: the storage dtype's tolerance
    decides an empty bucket, and the K probabilities are renormalised as every log-prob input).
    """
    out = renorm_mp_rows(kind, z, idx, lp, lp.dtype, beta=beta, T=T)
    full = idx.shape[-1] == z.shape[-1]
    return ([o[0] for o in out], [o[1] for o in out],
            [None if full else o[2] for o in out])


def check(kind, z, idx, lp, dtype, rtol, beta=0.5, T=1.0):
    """Value and gradient of every row against mpmath (one row per call: reduction="sum").

    The left-out mass is exact to about 1e-28 absolute (double-double exponentials), so every
    row, whatever its mass above the tolerance, gets the dtype's full accuracy.
    """
    ref_v, ref_g, rests = mp_rows(kind, z, idx, lp, beta=beta, T=T)
    V = z.shape[-1]
    W = torch.eye(V, dtype=dtype)
    for r in range(z.shape[0]):
        h = z[r:r + 1].clone().requires_grad_()
        loss = linear_kl_div(h, W, (idx[r:r + 1], lp[r:r + 1]), divergence=kind, beta=beta,
                             temperature=T, reduction="sum")
        if math.isinf(ref_v[r]):
            assert math.isinf(float(loss.detach())) and float(loss.detach()) > 0, (kind, r)
            continue
        tol = rtol
        got = float(loss.detach())
        assert abs(got - ref_v[r]) <= tol * abs(ref_v[r]) + 1e-300, (kind, r, got, ref_v[r])
        loss.backward()
        g = h.grad[0].double().numpy()
        rg = np.array(ref_g[r])
        err = np.abs(g - rg).max() / np.abs(rg).max()
        assert err <= 5 * tol, (kind, r, err)


def audit_example(dtype):
    """The audit's row: top-8 of 12 with a left-out mass of 1.5e-8 (float32 log-probs)."""
    tl = torch.tensor([[9., 8., 7.5, 7., 6., 5., 4., 3., -12., -13., -14., -15.]], dtype=F64)
    idx = torch.arange(8)[None]
    lp = torch.log_softmax(tl, -1)[:, :8].to(dtype)
    z = torch.tensor([[1., .5, 0., -.5, -1., -1.5, -2., -2.5, -1., -2., -3., -4.]], dtype=dtype)
    return z, idx, lp


RTOL = {F32: 2e-6, F64: 1e-12}


@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_small_left_out_mass_is_kept(kind, dtype):
    z, idx, lp = audit_example(dtype)
    with mpmath.workdps(50):
        rest = 1 - mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in lp[0].tolist())
    assert 1e-10 < rest < 3e-8  # the exact left-out mass: float32 1.5e-8, float64 6.5e-10
    check(kind, z, idx, lp, dtype, RTOL[dtype])
    if kind == "reverse":  # float64: finite, the mass is kept (the audit's inf was it rounded)
        W = torch.eye(12, dtype=dtype)  # float32: the stored 1.5e-8 (the true mass 6.5e-10, the
        # rest rounding) is within the float32 tolerance: an empty bucket, +inf
        v = float(linear_kl_div(z, W, (idx, lp), divergence="reverse"))
        assert math.isfinite(v) if dtype == F64 else v == math.inf


@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_random_left_out_masses(kind, dtype):
    """Left-out masses from 1e-7 to 0.5 (the float32 compute dtype used to lose digits at
    1e-6..1e-5: values 1e-4, gradients 2e-3 off), a temperature, K = V rows."""
    g = torch.Generator().manual_seed(7)
    V, K = 14, 6
    zs, idxs, lps = [], [], []
    for rest in [1e-7, 1e-6, 3e-6, 1e-5, 1e-3, 0.5]:
        tl = torch.randn(1, V, generator=g, dtype=F64) * 3
        top, ix = torch.topk(tl, K, -1)
        pk = torch.softmax(top, -1) * (1 - rest)  # the listed K carry 1 - rest
        zs.append(torch.randn(1, V, generator=g, dtype=F64) * 2)
        idxs.append(ix)
        lps.append(torch.log(pk))
    z, idx, lp = torch.cat(zs).to(dtype), torch.cat(idxs), torch.cat(lps).to(dtype)
    check(kind, z, idx, lp, dtype, RTOL[dtype], beta=0.3, T=0.7)
    # K = V: no extra bucket
    full = torch.log_softmax(torch.randn(2, 5, generator=g, dtype=F64), -1)
    idx5 = torch.argsort(torch.rand(2, 5, generator=g), -1)
    check(kind, torch.randn(2, 5, generator=g, dtype=F64).to(dtype), idx5,
          torch.gather(full, -1, idx5).to(dtype), dtype, RTOL[dtype])


@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
def test_renormalised_float64_teacher_has_an_empty_bucket(kind):
    """``log_softmax`` of the top-k logits in float64: the exact left-out mass of the stored
    values is a rounding residue of either sign (~1e-16); it is below the tolerance on every
    row, so the reverse KL is +inf on every row (it was inf or a finite rounding-noise value by
    the residue's sign), and forward / JS match the reference with an empty bucket."""
    g = torch.Generator().manual_seed(3)
    V, K, n = 12, 11, 8
    tl = torch.randn(n, V, generator=g, dtype=F64) * 4
    idx = torch.argsort(tl, -1, descending=True)[:, :K]
    lp = torch.log_softmax(torch.gather(tl, 1, idx), -1)
    z = torch.randn(n, V, generator=g, dtype=F64)
    with mpmath.workdps(50):
        res = [1 - mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in row) for row in lp.tolist()]
    assert max(abs(r) for r in res) < 1e-14 and min(res) < 0 < max(res)  # both signs occur
    check(kind, z, idx, lp, F64, RTOL[F64])
    if kind == "reverse":
        rows = linear_kl_div(z, torch.eye(V, dtype=F64), (idx, lp), divergence="reverse",
                             reduction="sum")
        assert math.isinf(float(rows))


def test_left_out_mass_at_the_tolerance():
    """Just above TOPK_REST_TOL the bucket is real mass (finite reverse KL), at or below it 0."""
    for rest, finite in [(4 * TOPK_REST_TOL, True), (TOPK_REST_TOL / 4, False)]:
        lp = torch.log(torch.tensor([[0.5, 0.5 - rest]], dtype=F64))
        with mpmath.workdps(50):
            exact = 1 - mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in lp[0].tolist())
        assert (exact > TOPK_REST_TOL) == finite
        z = torch.tensor([[0.3, -0.2, 1.0]], dtype=F64)
        for dtype in (F64,):
            v = linear_kl_div(z.to(dtype), torch.eye(3, dtype=dtype), (torch.tensor([[0, 1]]),
                              lp.to(dtype)), divergence="reverse")
            assert math.isfinite(float(v)) == finite
        check("reverse", z, torch.tensor([[0, 1]]), lp, F64, RTOL[F64])


def test_rest_mass_and_exponentials_against_mpmath():
    """The double-double exponential (3e-27 relative) and the left-out mass of stored log-probs
    of every float dtype (1e-28 absolute: full float64 relative accuracy down to the tolerance)."""
    from kldiv.backends.torch_linear import _exp_dd, _topk_rest_mass

    g = torch.Generator().manual_seed(9)
    x = torch.cat([-torch.rand(300, generator=g, dtype=F64) * 40,
                   -torch.rand(50, generator=g, dtype=F64) * 1e-4,
                   torch.tensor([0.0, -1e-300, -599.5, -np.log(2.0)], dtype=F64)])
    hi, lo = _exp_dd(x)
    with mpmath.workdps(60):
        for xi, h, l in zip(x.tolist(), hi.tolist(), lo.tolist()):
            ex = mpmath.exp(mpmath.mpf(xi))
            assert abs(mpmath.mpf(h) + mpmath.mpf(l) - ex) <= 3e-27 * ex, xi
    hi, lo = _exp_dd(torch.tensor([-math.inf, -800.0], dtype=F64))
    assert hi.tolist() == [0.0, math.exp(-800.0)] and lo.tolist() == [0.0, 0.0]
    # the compute dtype's relative accuracy (float64 rows above 1/4 and float32 rows above
    # 2^-20 keep the float64 exponentials: 2^-52 absolute)
    for cdt, rel in ((F64, 1e-15), (F32, 1e-9)):
        for dtype in (F64, F32, torch.bfloat16, torch.float16):
            for rest in (2e-12, 1e-9, 1e-6, 1e-3, 0.3):
                p = torch.softmax(torch.randn(4, 9, generator=g, dtype=F64), -1) * (1 - rest)
                lp = p.log().to(dtype)
                got = _topk_rest_mass(lp, cdt)[:, 0].tolist()
                with mpmath.workdps(60):
                    for row, r in zip(lp.double().tolist(), got):
                        ex = 1 - mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in row)
                        assert abs(r - ex) <= 1e-28 + rel * abs(ex), (cdt, dtype, rest, r, ex)
