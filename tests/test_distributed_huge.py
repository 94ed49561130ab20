"""Vocabulary-parallel divergences on huge-KL rows: values and per-row gradients against mpmath.

Rows whose mass sits far from the other side's maximum (a = [2, -1, 3e38] against b = [0, -1,
-3.4e38], their mirror, float32 and float64, -finfo.max masks, V = 5..50 with one huge entry):
the log-ratio's O(1) differences between the entries that carry mass must survive a row
constant of 3e38. The sharded algorithm runs in one process on W simulated ranks (threads
whose all-reduces meet at a barrier), with cuts that put a side's mode on another rank than
the other side's maximum; one small gloo launch checks the real collectives.

The reference is mpmath (1200 bits or more) on the exact float inputs (no float arithmetic): KL and
its family from the log-softmax of each side, gradients w.r.t. both sides' logits.
"""
from __future__ import annotations

import os
import threading

import mpmath
import numpy as np
import pytest
import torch

import kldiv.distributed as kd
from kldiv.distributed import _rows

KINDS = ("forward", "reverse", "js", "jeffreys")
F32MAX = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------------------------
# mpmath reference


def _exp(v):
    """exp(v), taken as 0 below v = -1e6 (e^-1e6 = 10^-434294: nothing at float64's scale; and
    mpmath's exp of a huge integer-valued float, -3.4e308, takes seconds)."""
    return mpmath.exp(v) if v > -1e6 else mpmath.mpf(0)


def _lsm(x):
    fin = [v for v in x if v != -mpmath.inf]
    m = max(fin)
    lse = mpmath.log(mpmath.fsum(_exp(v - m) for v in fin)) + m
    return [v - lse if v != -mpmath.inf else -mpmath.inf for v in x]


def _ref_forward(a, b):
    lp, lq = _lsm(a), _lsm(b)
    p = [_exp(v) for v in lp]
    q = [_exp(v) for v in lq]
    return lp, lq, p, q


def mp_ref(kind, a, b, beta=0.5, extra=500):
    """(value, grad_a, grad_b) of ``kind`` between logits a (p) and b (q), exact inputs, with
    ``extra`` bits beyond the largest logit's exponent, 1200 at least (JS's gradients on
    disjoint rows, exp(-3e38) in truth, are a cancellation of O(1) terms: 2^-1200 is below
    float64; a value of 1e308 needs ``extra`` 1200 for gradients that vanish in truth)."""
    if kind == "reverse":
        v, ga, gb = mp_ref("forward", b, a, beta, extra)
        return v, gb, ga
    a = [v if isinstance(v, mpmath.mpf) else mpmath.mpf(float(v)) for v in a]
    b = [v if isinstance(v, mpmath.mpf) else mpmath.mpf(float(v)) for v in b]
    top = max(int(mpmath.mag(v)) for v in a + b if mpmath.isfinite(v) and v != 0)
    with mpmath.workprec(max(top + extra, 1200)):
        lp, lq, p, q = _ref_forward(a, b)
        n = len(a)
        # entries where p = q = 0 contribute nothing (in the value and in the gradients)
        r = [lp[i] - lq[i] if (p[i] > 0 or q[i] > 0) else mpmath.mpf(0) for i in range(n)]
        if kind == "forward":
            F = mpmath.fsum(p[i] * r[i] for i in range(n) if p[i] > 0)
            Gp = [p[i] * r[i] if p[i] > 0 else 0 for i in range(n)]
            Gq = [-p[i] for i in range(n)]
        elif kind == "jeffreys":
            F = mpmath.fsum((p[i] - q[i]) * r[i] for i in range(n))
            Gp = [p[i] * r[i] + p[i] - q[i] for i in range(n)]
            Gq = [-q[i] * r[i] - p[i] + q[i] for i in range(n)]
        else:
            lm = [mpmath.log(beta * p[i] + (1 - beta) * q[i]) if (p[i] > 0 or q[i] > 0) else 0
                  for i in range(n)]
            tp = [p[i] * (lp[i] - lm[i]) if p[i] > 0 else mpmath.mpf(0) for i in range(n)]
            tq = [q[i] * (lq[i] - lm[i]) if q[i] > 0 else mpmath.mpf(0) for i in range(n)]
            F = beta * mpmath.fsum(tp) + (1 - beta) * mpmath.fsum(tq)
            Gp = [beta * v for v in tp]
            Gq = [(1 - beta) * v for v in tq]
        sp, sq = mpmath.fsum(Gp), mpmath.fsum(Gq)
        ga = [Gp[i] - p[i] * sp for i in range(n)]
        gb = [Gq[i] - q[i] * sq for i in range(n)]
        return float(F), np.array([float(v) for v in ga]), np.array([float(v) for v in gb])


# ----------------------------------------------------------------------------------------------
# W simulated ranks in one process


class _Ranks:
    """Threads as ranks: ``_rows._all_reduce`` meets the other threads at a barrier."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world
        self.local = threading.local()
        self.calls = [0] * world

    def all_reduce(self, t, op, group):
        r = self.local.rank
        self.calls[r] += 1
        self.slots[r] = t.clone()
        self.barrier.wait()
        stack = torch.stack(self.slots)
        out = stack.amax(0) if op == "max" else stack.sum(0)
        self.barrier.wait()
        return out

    def run(self, fn, args):
        out = [None] * self.world
        err = []

        def work(r):
            self.local.rank = r
            try:
                out[r] = fn(r, *args[r])
            except BaseException as e:  # pragma: no cover - reported below
                err.append(e)
                self.barrier.abort()

        ts = [threading.Thread(target=work, args=(r,)) for r in range(self.world)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        if err:
            raise err[0]
        return out


def sharded(kind, x, y, cuts, monkeypatch, temperature=1.0):
    """Per-row values and the gathered gradients, each rank holding x[:, cuts[r]:cuts[r+1]]."""
    world = len(cuts) - 1
    ranks = _Ranks(world)
    monkeypatch.setattr(kd.vocab_parallel, "_DELEGATE_LOCAL", False)
    monkeypatch.setattr(_rows, "_all_reduce", ranks.all_reduce)

    def one(r, xs, ys):
        xs = xs.clone().requires_grad_()
        ys = ys.clone().requires_grad_()
        v = kd.vocab_parallel_kl_div(xs, ys, kind=kind, reduction="none",
                                     temperature=temperature)
        gx, gy = torch.autograd.grad(v.sum(), (xs, ys))
        return v.detach(), gx, gy

    args = [(x[:, cuts[r]:cuts[r + 1]], y[:, cuts[r]:cuts[r + 1]]) for r in range(world)]
    out = ranks.run(one, args)
    for r in range(1, world):
        assert torch.equal(out[r][0], out[0][0])
    return out[0][0], torch.cat([o[1] for o in out], 1), torch.cat([o[2] for o in out], 1), \
        ranks.calls[0]


# ----------------------------------------------------------------------------------------------
# the rows


def repro_rows():
    """The issue's rows and their variants (lists of python floats; V = 3 or 4)."""
    m = F32MAX
    base = [([2, -1, 3e38], [0, -1, -3.4e38]),
            ([2, -1, 1e38], [0, -1, -1e38]),
            ([2, -1, -m], [0, -1, 3e38]),  # a masked with -finfo.max where b's maximum is
            ([2, -1, 3e38, -m], [0, -1, -m, 3e38]),  # each side's maximum masked on the other
            ([2, -1, -3e38], [0, -1, 3e38]),
            ([1e30 + 2 ** 80, 1e30, -3e38], [0, -1, 3e38]),  # a shifted by 1e30
            # a nearly saturated (mass 1e-26 off its top) against a log-ratio of 3e38 at the
            # top: the top's gradient p_top (ell_top - KL) ~ 3e12 must not cancel
            ([0, -60, -1e3], [-3e38, 0, 0]),
            ([0, -60, -1e3], [-3e38, 0, 3e38])]
    out = []
    for a, b in base:
        out += [(a, b), (b, a)]
    return out


def wide_rows(V, n, seed):
    """n rows of V entries: random logits (std 3), one entry of each side set huge (+-3e38 or
    -finfo.max), on the same or different entries."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        a = list(rng.standard_normal(V) * 3)
        b = list(rng.standard_normal(V) * 3)
        i, j = rng.integers(V), rng.integers(V)
        a[i] = [3e38, -3e38, -F32MAX, 1e38][k % 4]
        b[j] = [-3.4e38, 3e38, 2e38, -1e38][(k // 3) % 4]
        if k % 3 == 2:
            a, b = b, a
        rows.append((a, b))
    return rows


def check_rows(kind, rows, dtype, cuts, monkeypatch, what, temperature=1.0):
    x = torch.tensor([a for a, _ in rows], dtype=dtype)
    y = torch.tensor([b for _, b in rows], dtype=dtype)
    v, gx, gy = sharded(kind, x, y, cuts, monkeypatch, temperature)[:3]
    f32 = dtype == torch.float32
    rtol_v, rtol_g = (3e-6, 1e-5) if f32 else (1e-12, 1e-11)
    # gradients below the dtype's normal range round to 0 (JS on disjoint rows: ~1e-121)
    atol_g = 1e-36 if f32 else 1e-300
    xs, ys = x.double().numpy(), y.double().numpy()
    for r in range(len(rows)):
        # (rows at 1e307 and beyond: mp_ref's gradients that vanish in truth carry noise of
        # 1e308 * 2^-1500 = 1e-151: below 1e-100 a gradient counts as 0)
        fin = np.r_[xs[r], ys[r]][np.isfinite(np.r_[xs[r], ys[r]])]
        atol_r = 1e-100 if (not f32 and np.abs(fin).max() >= 1e307) else atol_g
        if temperature == 1.0:
            vr, ga, gb = mp_ref(kind, xs[r], ys[r])
        else:  # (the logits divided by T exactly, in mpmath; d/dx = d/d(x / T) / T)
            with mpmath.workprec(1200):
                vr, ga, gb = mp_ref(kind, [mpmath.mpf(float(u)) / temperature for u in xs[r]],
                                    [mpmath.mpf(float(u)) / temperature for u in ys[r]])
            ga, gb = ga / temperature, gb / temperature
        limit = F32MAX if f32 else float(np.finfo(np.float64).max)
        got = float(v[r])
        if abs(vr) > limit:  # +inf, with the finite gradient of the true value
            assert got == np.inf, (what, kind, r, got, vr)
        else:
            assert abs(got - vr) <= rtol_v * abs(vr) + 1e-300, (what, kind, r, got, vr)
        g = np.r_[gx[r].double().numpy(), gy[r].double().numpy()]
        gref = np.r_[ga, gb]
        assert grad_ok(g, gref, rtol_g, atol_r), (what, kind, r, rows[r], g, gref)


def grad_ok(g, gref, rtol, atol):
    """Normwise ||g - gref|| <= rtol ||gref|| + atol, scaled (gradients of 1e198 square to
    beyond float64)."""
    inf = ~np.isfinite(gref)  # (a true gradient beyond the float range: the same +-inf)
    if inf.any():
        if not np.array_equal(g[inf], gref[inf]):
            return False
        g, gref = g[~inf], gref[~inf]
    s = max(float(np.abs(gref).max()), float(np.abs(g).max()), atol)
    if not np.isfinite(s):
        return False
    return np.linalg.norm((g - gref) / s) <= rtol * np.linalg.norm(gref / s) + atol / s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
def test_repro_rows(kind, dtype, monkeypatch):
    rows = repro_rows()
    three = [r for r in rows if len(r[0]) == 3]
    four = [r for r in rows if len(r[0]) == 4]
    # one rank (the whole row), and cuts that part the modes from the other side's maximum
    for cuts in ([0, 3], [0, 1, 3], [0, 2, 3], [0, 1, 2, 3]):
        check_rows(kind, three, dtype, cuts, monkeypatch, f"V=3 cuts {cuts}")
    for cuts in ([0, 4], [0, 1, 3, 4], [0, 2, 2, 4]):
        check_rows(kind, four, dtype, cuts, monkeypatch, f"V=4 cuts {cuts}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
def test_wide_rows_one_huge_entry(kind, dtype, monkeypatch):
    for V, cuts in ((5, [0, 2, 5]), (13, [0, 1, 7, 13]), (50, [0, 17, 33, 50])):
        rows = wide_rows(V, 12, seed=V)
        check_rows(kind, rows, dtype, cuts, monkeypatch, f"V={V}")


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_temperature(dtype, temperature, monkeypatch):
    rows = [r for r in repro_rows() if len(r[0]) == 3]
    for kind in KINDS:
        check_rows(kind, rows, dtype, [0, 1, 3], monkeypatch, f"T={temperature}", temperature)


def test_float64_beyond_float32(monkeypatch):
    """float64 rows at 1e300 (huge and ordinary rows in one call), and rows wider than the
    float64 range (+-1.7e308: computed in quarters; KL up to 1.7e308, Jeffreys beyond: +inf)."""
    rows = [([2, -1, 1e300], [0, -1, -1e300]), ([0, -1, -1e300], [2, -1, 1e300]),
            ([2, -1, 1e200], [0.5, -1, 3.0])]
    wide = [([2, -1, 1.7e308], [0, -1, -1.7e308]), ([0, -1, -1.7e308], [2, -1, 1.7e308]),
            ([2, -1, 1e308], [0, -1, -1e308]), ([1, 2, 3], [3, 1, -1e308])]
    for kind in KINDS:
        check_rows(kind, rows, torch.float64, [0, 1, 3], monkeypatch, "1e300")
        check_rows(kind, wide, torch.float64, [0, 2, 3], monkeypatch, "1.7e308")


WIDE64 = [([1.7e308, 0.0, 1.0], [-1.7e308, 0.0, 1.0]),
          ([0.0, 1.0, 2.0], [0.0, 1.7e308, -1.7e308]),
          ([1.7e308, -1.7e308, 0.0], [-1.7e308, 1.7e308, 0.0]),
          ([1.7e308, 1.7e308, -1.7e308], [1.7e308, -1.7e308, 1.7e308]),
          ([1.0, 2.0, -1.7e308], [3.0, -1.7e308, 1.0]),
          ([-1.7e308, 1.0, 2.0], [0.5, -1.7e308, 2.0]),
          ([0.0, 1.0, float(np.finfo(np.float64).min)], [0.0, 1.0, -30.0]),
          ([1.7e308, 1.0, 2.0], [1.7e308, 2.0, -1.7e308])]


@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.2])
def test_float64_wider_than_the_range(temperature, monkeypatch):
    """float64 rows whose log-ratio at an entry that carries mass lies beyond the float64 range
    (+-1.7e308 on the two sides, finfo.min masks at T < 1): every kind's value (0.38 .. 6e306,
    or +inf beyond finfo.max) and both gradients against mpmath, finite wherever the true
    gradient is (T = 0.2 takes even a quarter of such a log-ratio beyond the range: the inputs
    are divided by 256 there)."""
    for kind in KINDS:
        check_rows(kind, WIDE64, torch.float64, [0, 1, 3], monkeypatch, f"wide T={temperature}",
                   temperature)


def test_float64_wider_than_the_range_equals_the_core(monkeypatch):
    """The same rows (T = 1): the core's values and gradients (the core carries such log-ratios
    in quarters too), per row, both inputs, rows of finite value."""
    import kldiv

    core = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
            "jeffreys": kldiv.jeffreys_div}
    x = torch.tensor([a for a, _ in WIDE64], dtype=torch.float64)
    y = torch.tensor([b for _, b in WIDE64], dtype=torch.float64)
    for kind in KINDS:
        v, gx, gy = sharded(kind, x, y, [0, 2, 3], monkeypatch)[:3]
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        want = core[kind](a, b, p_space="logits", q_space="logits", reduction="none")
        ga, gb = torch.autograd.grad(want.sum(), (a, b))
        want = want.detach()
        assert torch.equal(torch.isinf(v), torch.isinf(want)), (kind, v, want)
        fin = torch.isfinite(want)
        assert torch.allclose(v[fin], want[fin], rtol=1e-12, atol=0), (kind, v, want)
        for r in torch.nonzero(fin).flatten().tolist():
            g, gref = np.r_[gx[r].numpy(), gy[r].numpy()], np.r_[ga[r].numpy(), gb[r].numpy()]
            assert grad_ok(g, gref, 1e-11, 1e-300), (kind, r, g, gref)


def test_ordinary_calls_keep_their_collectives(monkeypatch):
    """Calls without a row whose two maxima lie far apart issue no extra collective."""
    x = torch.randn(3, 8, dtype=torch.float64)
    y = torch.randn(3, 8, dtype=torch.float64)
    assert sharded("forward", x, y, [0, 4, 8], monkeypatch)[3] == 3
    assert sharded("jeffreys", x, y, [0, 4, 8], monkeypatch)[3] == 4
    x[1, 2] = 3e38
    assert sharded("forward", x, y, [0, 4, 8], monkeypatch)[3] == 4


# ----------------------------------------------------------------------------------------------
# one real launch: two gloo ranks


def _gloo_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = repro_rows()[:4]
        x = torch.tensor([a for a, _ in rows], dtype=torch.float32)
        y = torch.tensor([b for _, b in rows], dtype=torch.float32)
        cut = [slice(0, 1), slice(1, 3)][rank]  # a's mode and b's maximum on different ranks
        out = {}
        for kind in KINDS:
            xs = x[:, cut].clone().requires_grad_()
            ys = y[:, cut].clone().requires_grad_()
            v = kd.vocab_parallel_kl_div(xs, ys, kind=kind, reduction="none")
            out[kind] = (v.detach(), *torch.autograd.grad(v.sum(), (xs, ys)))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks():
    from forked_ranks import run_forked

    res = run_forked(_gloo_worker, 2)
    rows = repro_rows()[:4]
    for kind in KINDS:
        v = res[0][kind][0]
        assert torch.equal(v, res[1][kind][0])
        gx = torch.cat([res[0][kind][1], res[1][kind][1]], 1)
        gy = torch.cat([res[0][kind][2], res[1][kind][2]], 1)
        for r, (a, b) in enumerate(rows):
            vr, ga, gb = mp_ref(kind, np.float32(a).astype(np.float64),
                                np.float32(b).astype(np.float64))
            if vr > F32MAX:
                assert float(v[r]) == np.inf
            else:
                assert abs(float(v[r]) - vr) <= 3e-6 * abs(vr), (kind, r)
            g = np.r_[gx[r].double().numpy(), gy[r].double().numpy()]
            gref = np.r_[ga, gb]
            assert grad_ok(g, gref, 1e-5, 1e-36), (kind, r, g, gref)


# ----------------------------------------------------------------------------------------------
# close rows offset by a constant (teacher log-probs against student logits): the log-ratio
# must keep the accuracy of the raw difference whatever the offset (audit: 2e-3 off at 8)


@pytest.mark.parametrize("offset", [0.5, 2.0, 8.0, 15.9, 16.1, 1e4])
@pytest.mark.parametrize("kind", KINDS)
def test_close_rows_with_an_offset(kind, offset, monkeypatch):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 8, generator=g, dtype=torch.float64)
    x = (z + offset).float()
    y = (z + 1e-4 * torch.randn(4, 8, generator=g, dtype=torch.float64)).float()
    v, gx, gy = sharded(kind, x, y, [0, 3, 8], monkeypatch)[:3]
    for r in range(4):  # per row, against 50-digit mpmath on the float32 inputs
        vr, ga, gb = mp_ref(kind, x[r].double().numpy(), y[r].double().numpy())
        assert abs(float(v[r]) - vr) <= 1e-6 * vr, (r, float(v[r]), vr)
        assert grad_ok(np.r_[gx[r].double().numpy(), gy[r].double().numpy()], np.r_[ga, gb],
                       1e-5, 1e-36)
