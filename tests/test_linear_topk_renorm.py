"""linear_kl_div with a top-k teacher renormalised in float32 / bfloat16 / float16.

The left-out mass ``r = 1 - sum_k exp(lp_k)`` of the stored values is taken as 0 when it is
within what rounding to the storage dtype (and renormalising) can leave:
``|r| <= max(2^-40, u (1 + 2 sum_k p_k |lp_k|) + 4 u' sqrt(K))`` with u the storage dtype's unit
roundoff and u' = min(u, 2^-24). So a teacher renormalised over its top-k in any dtype has an
empty extra bucket whatever the sign of its residue (forward / JS: the value of the stored
distribution with an empty bucket; reverse: +inf, since the student has mass outside the K
indices), and a truly incomplete teacher keeps its mass. As everywhere in kldiv, log-probs
are a distribution: the core renormalises them, so an empty bucket means the K stored
probabilities divided by their sum (the renormalised teacher).

Reference: 50-digit mpmath on the exact stored values, with the tolerance written out here in
mpmath (not taken from the library), value and gradient with respect to ``hidden`` per row (the
weight is the identity, so the student's logits are ``hidden`` exactly).
"""
import math

import mpmath
import numpy as np
import pytest
import torch

from kldiv.torch import linear_kl_div

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
U = {F64: mpmath.mpf(2) ** -53, F32: mpmath.mpf(2) ** -24, F16: mpmath.mpf(2) ** -11,
     BF16: mpmath.mpf(2) ** -8}


def mp_tolerance(row, dtype):
    """The documented tolerance of one stored row, in mpmath."""
    u = U[dtype]
    u2 = min(u, mpmath.mpf(2) ** -24)
    s = mpmath.fsum(mpmath.exp(mpmath.mpf(v)) * -mpmath.mpf(v) for v in row if v != -math.inf)
    return max(mpmath.mpf(2) ** -40, u * (1 + 2 * s) + 4 * u2 * mpmath.sqrt(len(row)))


def mp_rows(kind, z, idx, lp, dtype, beta=0.5, T=1.0):
    """Per-row (value, d value / d z, left-out mass, its tolerance) of the K + 1-bucket
    divergence, 50-digit mpmath; G_b = d D / d q_b, gradient q_j (G_b(j) - sum_b q_b G_b) / T."""
    out = []
    with mpmath.workdps(50):
        beta = mpmath.mpf(beta)
        for zr, ir, lr in zip(z.tolist(), idx.tolist(), lp.double().tolist()):
            V, K = len(zr), len(ir)
            zz = [mpmath.mpf(v) / mpmath.mpf(T) for v in zr]
            mx = max(zz)
            ez = [mpmath.exp(v - mx) for v in zz]
            s = mpmath.fsum(ez)
            q = [v / s for v in ez]
            p_b = [mpmath.exp(mpmath.mpf(v)) for v in lr]
            q_b = [q[i] for i in ir]
            bucket = [K] * V
            for b, i in enumerate(ir):
                bucket[i] = b
            rest, tol = 1 - mpmath.fsum(p_b), mp_tolerance(lr, dtype)
            if K < V:
                p_b.append(rest if rest > tol else mpmath.mpf(0))
                q_b.append(mpmath.fsum(q[j] for j in range(V) if bucket[j] == K))
            tot = mpmath.fsum(p_b)  # log-probs are a distribution: renormalised (1 with a mass)
            p_b = [x / tot for x in p_b]

            def kl(a, c):
                return mpmath.fsum(x * mpmath.log(x / y) if x > 0 else 0 for x, y in zip(a, c))

            if kind == "forward":
                val = kl(p_b, q_b)
                G = [-x / y for x, y in zip(p_b, q_b)]
            elif kind == "reverse":
                if any(x == 0 and y > 0 for x, y in zip(p_b, q_b)):
                    out.append((math.inf, None, rest, tol))
                    continue
                val = kl(q_b, p_b)
                G = [mpmath.log(y / x) + 1 for x, y in zip(p_b, q_b)]
            else:
                m = [beta * x + (1 - beta) * y for x, y in zip(p_b, q_b)]
                val = beta * kl(p_b, m) + (1 - beta) * kl(q_b, m)
                G = [(1 - beta) * mpmath.log(y / w) for y, w in zip(q_b, m)]
            mean_g = mpmath.fsum(y * g for y, g in zip(q_b, G))
            out.append((float(val), [float(q[j] * (G[bucket[j]] - mean_g) / T) for j in range(V)],
                        rest, tol))
    return out


def check(kind, z, idx, lp, rtol, beta=0.5, T=1.0, ref=None):
    """Every row against mpmath: the value of each row alone (reduction="sum"), the gradient of
    all rows from one call (rows are independent); returns the reference."""
    ref = ref if ref is not None else mp_rows(kind, z, idx, lp, lp.dtype, beta=beta, T=T)
    V = z.shape[-1]
    W = torch.eye(V, dtype=z.dtype)
    kw = dict(divergence=kind, beta=beta, temperature=T, reduction="sum")
    with torch.no_grad():
        for r, (rv, _, _, _) in enumerate(ref):
            got = float(linear_kl_div(z[r:r + 1], W, (idx[r:r + 1], lp[r:r + 1]), **kw))
            if math.isinf(rv):
                assert math.isinf(got) and got > 0, (kind, r, got)
            else:
                assert abs(got - rv) <= rtol * abs(rv) + 1e-300, (kind, r, got, rv)
    fin = [r for r, (rv, *_) in enumerate(ref) if math.isfinite(rv)]
    if fin:
        fin_t = torch.tensor(fin)
        h = z[fin_t].clone().requires_grad_()
        linear_kl_div(h, W, (idx[fin_t], lp[fin_t]), **kw).backward()
        for j, r in enumerate(fin):
            rg = np.array(ref[r][1])
            err = np.abs(h.grad[j].double().numpy() - rg).max() / np.abs(rg).max()
            assert err <= 5 * rtol, (kind, r, err)
    return ref


def renormalised_teachers(dtype, seed):
    """Top-k teachers renormalised three ways: log_softmax of the top-k logits in the storage
    dtype, in float64 then rounded, and a float32 full-vocabulary log_softmax cut to its top-k
    and renormalised in float32 then stored. Offsets and scales as language models give."""
    g = torch.Generator().manual_seed(seed)
    V, K = 16, 7
    rows = []
    for scale, shift in [(0.3, 0.0), (2.0, 0.0), (4.0, 30.0), (8.0, -500.0), (1.0, 1000.0)]:
        t = torch.randn(1, V, generator=g, dtype=F64) * scale + shift
        top, ix = torch.topk(t, K, -1)
        a = torch.log_softmax(top.to(dtype).float(), -1).to(dtype)
        b = torch.log_softmax(top, -1).to(dtype)
        full = torch.log_softmax(t.float(), -1)
        tk = torch.gather(full, -1, ix)
        c = (tk - torch.logsumexp(tk, -1, keepdim=True)).to(dtype)
        for lp in (a, b, c):
            rows.append((ix, lp))
    idx = torch.cat([r[0] for r in rows])
    lp = torch.cat([r[1] for r in rows])
    z = torch.randn(idx.shape[0], V, generator=g, dtype=F64) * 2
    return z, idx, lp


RTOL = {F32: 2e-6, F64: 1e-12}


@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_renormalised_teacher_has_an_empty_bucket(kind, dtype):
    """Every row's residue is within the tolerance (both signs, most above 2^-40: the old rule
    gave inf or a finite rounding-noise value by the sign); forward / JS are the value of the
    stored distribution with an empty bucket, reverse +inf on every row, for float32 and
    float64 students."""
    z, idx, lp = renormalised_teachers(dtype, 11)
    ref = mp_rows(kind, z, idx, lp, dtype, beta=0.3)
    for cdt in (F32, F64):
        check(kind, z.to(cdt), idx, lp, RTOL[cdt], beta=0.3, ref=ref)
    rests = [r for _, _, r, _ in ref]
    assert all(abs(r) <= t for _, _, r, t in ref)
    assert min(rests) < 0 < max(rests)
    assert sum(abs(r) > 2.0**-40 for r in rests) > len(rests) // 2
    if kind == "reverse":
        assert all(math.isinf(v) for v, *_ in ref)


@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_incomplete_teacher_keeps_its_mass(kind, dtype):
    """A left-out mass well above the tolerance (float32 1e-5..0.5, half precision 0.1..0.5) is
    real mass: reverse KL finite, every kind against mpmath with the stored values' mass."""
    g = torch.Generator().manual_seed(5)
    V, K = 16, 7
    masses = [1e-5, 1e-3, 0.1, 0.5] if dtype == F32 else [0.1, 0.3, 0.5]
    zs, idxs, lps = [], [], []
    for rest in masses:
        t = torch.randn(1, V, generator=g, dtype=F64) * 3
        top, ix = torch.topk(t, K, -1)
        lps.append(torch.log(torch.softmax(top, -1) * (1 - rest)))
        idxs.append(ix)
        zs.append(torch.randn(1, V, generator=g, dtype=F64) * 2)
    z, idx, lp = torch.cat(zs), torch.cat(idxs), torch.cat(lps).to(dtype)
    ref = mp_rows(kind, z, idx, lp, dtype, T=0.8)
    for cdt in (F32, F64):
        check(kind, z.to(cdt), idx, lp, RTOL[cdt], T=0.8, ref=ref)
    assert all(r > 4 * t for _, _, r, t in ref)
    assert all(math.isfinite(v) for v, *_ in ref)


def test_tolerance_edge_per_dtype():
    """Just inside the tolerance the bucket is empty (reverse +inf), at three times it the mass
    is kept (reverse finite); float64 keeps 2^-40 (the float32-rounded renormalisation that a
    float64 teacher cannot tell from real mass stays mass)."""
    z = torch.tensor([[0.3, -0.2, 1.0, 0.1]], dtype=F64)
    idx = torch.tensor([[0, 1, 3]])
    W = torch.eye(4, dtype=F64)
    for dtype in (F64, F32, F16, BF16):
        base = torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)
        with mpmath.workdps(50):
            tol = mp_tolerance(base.log()[0].tolist(), dtype)
        for f, finite in [(0.5, False), (3.0, True)]:
            lp = (base * (1 - float(tol) * f)).log().to(dtype)
            with mpmath.workdps(50):
                rest = 1 - mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in lp[0].double().tolist())
                t = mp_tolerance(lp[0].double().tolist(), dtype)
            if (rest > t) != finite:  # rounding to the dtype moved the mass across: skip
                continue
            v = linear_kl_div(z, W, (idx, lp), divergence="reverse")
            assert math.isfinite(float(v)) == finite, (dtype, f, float(rest), float(t))
            check("reverse", z, idx, lp, RTOL[F64])
    # float64 storage of a float32-renormalised teacher: 1e-7 residue is mass (as before)
    lp = torch.log_softmax(torch.tensor([[2.0, 1.0, -0.5]]), -1).double()
    with mpmath.workdps(50):
        rest = 1 - mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in lp[0].tolist())
    if rest > 2.0**-40:
        assert math.isfinite(float(linear_kl_div(z, W, (idx, lp), divergence="reverse")))


def test_bucket_estimator_agrees():
    """kldiv.cache.linear_bucket_kl (a float32 cache, a float64 student) gives
    linear_kl_div's value on the stored float32 values (the same tolerance)."""
    from kldiv.cache import linear_bucket_kl

    z, idx, lp = renormalised_teachers(F32, 4)
    z = z[:12]
    idx, lp = idx[:12], lp[:12]
    W = torch.eye(z.shape[-1], dtype=F64)
    batch = {"topk_ids": idx.to(torch.int32), "topk_logprobs": lp}
    a = linear_bucket_kl(z, W, batch, reduction="sum")
    b = linear_kl_div(z, W, (idx, lp), reduction="sum")
    ref = sum(v for v, *_ in mp_rows("forward", z, idx, lp, F32))
    assert abs(float(b) - ref) <= 1e-12 * abs(ref)
    assert abs(float(a) - ref) <= 1e-12 * abs(ref)


def test_float32_log_softmax_residue_within_the_tolerance():
    """The renormalisation term's size: float32 ``log_softmax`` over K = 1000 and 32000 top
    logits (offsets 0 and 1000) leaves residues up to ~1e-5 (docs/linear.md quotes this
    test); every one is within the row's tolerance, whose sqrt(K) term they need (without it
    the K = 32000 rows fail)."""
    from kldiv.backends.torch_linear import topk_rest_tolerance

    g = torch.Generator().manual_seed(2)
    worst = 0.0
    for K in (1000, 32000):
        for shift in (0.0, 1000.0):
            t = torch.randn(6, K, generator=g, dtype=F64) * 4 + shift
            lp = torch.log_softmax(t.float(), -1)
            rest = 1 - torch.exp(lp.double()).sum(-1, keepdim=True)  # float64: 1e-13 here
            tol = topk_rest_tolerance(lp)
            assert bool((rest.abs() <= tol).all()), (K, shift, float(rest.abs().max()))
            worst = max(worst, float((rest.abs() / tol).max()))
            if K == 32000:
                x = lp.double()
                s = torch.where(x > -math.inf, torch.exp(x) * -x, 0 * x).sum(-1, keepdim=True)
                assert bool((rest.abs() > 2.0**-24 * (1 + 2 * s)).any())
    assert worst < 1.0
