"""kldiv.distributed on real process groups: 2 and 4 gloo ranks on this machine (loopback only).

One launch per world size runs every case in the worker processes (this file, run as a
script); the workers save their results and the tests compare them, in this process, with
``kldiv``'s single-process functions on the gathered tensors, with the mpmath oracle
(``tests/oracle.py``) and with naive float64 formulas. The inputs are rebuilt here from the
same seeds, so nothing but the results crosses the process boundary.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import scipy.special

torch = pytest.importorskip("torch") if __name__ != "__main__" else __import__("torch")

import kldiv  # noqa: E402
import kldiv.distributed as kd  # noqa: E402

KINDS = ("forward", "reverse", "js", "jeffreys")
V = 13
CUTS = {1: [0, V], 2: [0, 5, V], 3: [0, 2, 9, V], 4: [0, 4, 4, 10, V]}  # uneven; rank 1 of 4
# holds nothing; rank 0 of 3 holds only -inf in some rows (family_data and extreme_data)
INF = math.inf
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ----------------------------------------------------------------------------------------------
# the data, rebuilt identically in the workers and here


def family_data(dtype, world):
    """(2, 3, V) logits for p and q with the edge rows, in float64 before the cast."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * 2
    y = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * 2
    x[0, 0, 0:5] = -INF  # rank 0's shard (and more) holds no support of p
    y[0, 1, 7] = -INF  # p > 0 = q: forward KL is +inf, reverse finite
    x[0, 2, [2, 11]] = -INF  # q > 0 = p: reverse KL is +inf, forward finite
    x[1, 0, [1, 6, 12]] = -INF  # both -inf in the same places
    y[1, 0, [1, 6, 12]] = -INF
    y[1, 1] = x[1, 1] + 1e-4 * torch.randn(V, generator=g, dtype=torch.float64)  # nearly equal
    y[1, 2, 0:4] = -INF  # a -inf block inside one shard
    x[1, 2, 0:4] = -INF
    cot = torch.randn(2, 3, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype), cot.to(dtype)


def far_data(dtype):
    x = torch.full((2, V), -INF, dtype=torch.float64)
    y = torch.linspace(-3, 3, V, dtype=torch.float64).repeat(2, 1)
    x[:, [0, 6]] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y[0, 12] = 100.0  # far above every logit on p's support
    y[1, 9] = 140.0
    return x.to(dtype), y.to(dtype)


def masked_data():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(5, V, generator=g, dtype=torch.float64)
    y = torch.randn(5, V, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False])
    x[1] = math.nan  # masked rows may hold anything
    y[4, 3] = -INF
    x[4, :] = -INF
    w = torch.tensor([1.0, 5.0, 0.5, 2.0, 3.0], dtype=torch.float64)
    return x, y, mask, w


def linear_data(dtype):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(9, 6, generator=g, dtype=torch.float64)
    w = torch.randn(V, 6, generator=g, dtype=torch.float64) / 2
    b = torch.randn(V, generator=g, dtype=torch.float64) / 4
    t = torch.randn(9, V, generator=g, dtype=torch.float64)
    t[2, 3:9] = -INF
    mask = torch.ones(9, dtype=torch.bool)
    mask[4] = False
    return h.to(dtype), w.to(dtype), b.to(dtype), t.to(dtype), mask


def dp_data(world):
    """Data-parallel batch: per rank two micro-batches of different lengths; a tiny model."""
    g = torch.Generator().manual_seed(5)
    n = 23
    feats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, V, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g, dtype=torch.float64) < 0.7
    w0 = torch.randn(V, 4, generator=g, dtype=torch.float64)
    # uneven split of the rows over ranks, then over two micro-batches per rank
    bounds = np.linspace(0, n, world + 1).astype(int).tolist()
    bounds[1] -= 2 if world > 1 else 0
    return feats, teacher, mask, w0, bounds


def sweep_case(i, world):
    """Seeded random case: random vocabulary size, -inf pattern, uneven cuts (some empty)."""
    g = torch.Generator().manual_seed(1000 + i)
    v = int(torch.randint(1, 12, (1,), generator=g))
    dtype = (torch.float64, torch.float32)[i % 2]
    kind = KINDS[(i // 2) % 4]
    x = torch.randn(3, v, generator=g, dtype=torch.float64) * 3
    y = torch.randn(3, v, generator=g, dtype=torch.float64) * 3
    dense = i % 3 == 0  # every third case without -inf (the shards' fast path)
    x[torch.rand(3, v, generator=g) < (0.0 if dense else 0.3)] = -INF
    y[torch.rand(3, v, generator=g) < (0.0 if dense else 0.3)] = -INF
    keep = torch.randint(0, v, (3,), generator=g)
    x[torch.arange(3), keep] = torch.randn(3, generator=g, dtype=torch.float64)
    y[torch.arange(3), torch.randint(0, v, (3,), generator=g)] = 0.5
    cuts = sorted(torch.randint(0, v + 1, (world - 1,), generator=g).tolist())
    return x.to(dtype), y.to(dtype), [0, *cuts, v], kind, dtype


SWEEP = 36


def extreme_data(dtype):
    """Rows of V logits at the edges of the float range, built in float64 and cast once.

    float64: a side shifted or masked by +-1e30 or finfo.min, a moderate offset of -1e4, nearly
    equal rows at an offset of 2^40, a block of -inf on the last rank's whole slice (world 3)
    with none of p's support on rank 0's, rows holding +-1.7e308 or finfo.min where the other
    side carries mass (log-ratios beyond the float64 range), and disjoint supports (JS =
    log 2, gradient 0).
    float32: logits at +-3e38 (differences overflow float32), -5e37, a shift of 1e37,
    finfo.min masking, wide logits (|x / T| up to about 60) nearly equal and not.
    """
    g = torch.Generator().manual_seed(77)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ninf = torch.full((V,), -INF, dtype=torch.float64)
    rows = []

    def at(pos, vals, base=None):
        v = ninf.clone() if base is None else base.clone()
        v[pos] = torch.tensor(vals, dtype=torch.float64)
        return v

    disjoint = (ninf.clone(), ninf.clone())
    disjoint[0][0::2] = r(7)
    disjoint[1][1::2] = r(6)
    if dtype == torch.float64:
        rows.append((torch.full((V,), -1e30, dtype=torch.float64), torch.arange(V) / 4.0))
        rows.append((at([1, 6, 11], [1e30, 1e30, -1e30]), at([1, 6, 11], [0.0, 5, 10])))
        rows.append((r(V) - 1e4, r(V)))
        rows.append((r(V), at([3, 8], [-1e30, -1e30], r(V))))
        rows.append((at([0, 5, 12], [torch.finfo(torch.float64).min] * 3, r(V)), r(V) + 1e30))
        near = r(V) + 2.0**40
        rows.append((near, near + 2.0**-10 * torch.randint(-2, 3, (V,), generator=g)))
        x, y = r(V), r(V)
        x[9:], y[9:] = -INF, -INF  # the last rank's whole slice (world 3) is -inf on both sides
        x[0:2] = -INF  # rank 0's slice (world 3) holds none of p's support
        rows.append((x, y))
        # wider than the float64 range at entries that carry mass (log-ratios up to 4 finfo.max
        # over T: computed in quarters); values of 0.4, 4e307, and beyond finfo.max (+inf,
        # with the finite gradient of the true value)
        big, fmin = 1.7e308, float(torch.finfo(torch.float64).min)
        rows.append((at([0, 6, 12], [0.0, 1, 2]), at([0, 6, 12], [0.0, big, -big])))
        rows.append((at([1, 5, 9], [1.0, 2, -big]), at([1, 5, 9], [3.0, -big, 1])))
        rows.append((at([2, 7, 12], [-big, 1, 2]), at([2, 7, 12], [0.5, -big, 2])))
        rows.append((at([3, 4, 11], [big, big, -big]), at([3, 4, 11], [big, -big, big])))
        rows.append((at([0, 8, 10], [0.0, 1, fmin]), at([0, 8, 10], [0.0, 1, -30])))
        rows.append((at([4, 9, 12], [big, 1, 2]), at([4, 9, 12], [big, 2, -big])))
    else:
        big = 3e38
        rows.append((at([0, 4, 8, 12], [big, big, 1, 2]), at([0, 4, 8, 12], [0.0, 1, 2, 3])))
        rows.append((at([2, 10], [big, -big]), at([2, 10], [0.99, 0.42])))
        rows.append((at([7], [-big]), at([7], [big])))
        rows.append((at([1, 11], [big, -big]), at([1, 11], [-big, big])))
        rows.append((at([0, 6, 12], [-5e37] * 3), at([0, 6, 12], [-5e37, -INF, -5e37])))
        rows.append((1e37 + r(V), r(V)))
        wide = 15 * r(V)
        rows.append((wide, wide + 0.05 * r(V)))
        rows.append((at([1, 2, 3], [float(torch.finfo(torch.float32).min)] * 3, r(V)), r(V)))
        rows.append((20 * r(V), 20 * r(V)))
    rows.append(disjoint)
    x = torch.stack([a for a, _ in rows]).to(dtype)
    y = torch.stack([b for _, b in rows]).to(dtype)
    return x, y


EXTREME_T = (1.0, 0.7)


def tpdp_data():
    g = torch.Generator().manual_seed(21)
    teacher = torch.randn(7, V, generator=g, dtype=torch.float64)
    student = torch.randn(7, V, generator=g, dtype=torch.float64)
    tmask = torch.tensor([True, True, False, True, True, True, False])
    return teacher, student, tmask, [0, 2, 7]  # 2 rows on one data rank, 5 on the other


def shard(t, rank, world):
    return t[..., CUTS[world][rank]:CUTS[world][rank + 1]].contiguous()


# ----------------------------------------------------------------------------------------------
# the worker (runs in each spawned process)


def _family_case(rank, world, dtype, temperature, out):
    x, y, cot = family_data(dtype, world)
    for kind in KINDS:
        a = shard(x, rank, world).requires_grad_()
        b = shard(y, rank, world).requires_grad_()
        with kd.count_collectives() as cf:
            rows = kd.vocab_parallel_kl_div(a, b, kind=kind, reduction="none",
                                            temperature=temperature)
        loss = torch.where(torch.isfinite(rows), rows, 0.0).mul(cot).sum()
        with kd.count_collectives() as cb:
            loss.backward()
        out[f"family/{dtype}/{temperature}/{kind}"] = dict(
            rows=rows.detach(), gp=a.grad, gq=b.grad, calls=(cf["calls"], cb["calls"]),
            bytes=cf["bytes"],
        )


def _worker_cases(rank, world):
    import torch.distributed as dist

    out = {}
    chunk = kd._rows._CHUNK_ELEMENTS
    if world == 4:  # row chunks of one or two rows: the chunked passes and their seams
        kd._rows._CHUNK_ELEMENTS = 16
    for dtype in (torch.float64, torch.float32):
        for temperature in (1.0, 1.7):
            _family_case(rank, world, dtype, temperature, out)

    for i in range(SWEEP):
        x, y, cuts, kind, _ = sweep_case(i, world)
        a = x[:, cuts[rank]:cuts[rank + 1]].clone().requires_grad_()
        b = y[:, cuts[rank]:cuts[rank + 1]].clone().requires_grad_()
        rows = kd.vocab_parallel_kl_div(a, b, kind=kind, reduction="none")
        torch.where(torch.isfinite(rows), rows, 0.0).sum().backward()
        out[f"sweep/{i}"] = dict(rows=rows.detach(), gp=a.grad, gq=b.grad)

    kd._rows._CHUNK_ELEMENTS = chunk  # (the rest in one chunk: fewer collectives, faster)

    # q's mass on p's support underflows relative to q's maximum: KL is about 100, not inf
    for dtype in (torch.float64, torch.float32):
        x, y = far_data(dtype)
        for kind in ("forward", "js"):
            a = shard(x, rank, world).requires_grad_()
            b = shard(y, rank, world).requires_grad_()
            rows = kd.vocab_parallel_kl_div(a, b, kind=kind, reduction="none")
            rows.sum().backward()
            out[f"far/{dtype}/{kind}"] = dict(rows=rows.detach(), gp=a.grad, gq=b.grad)

    # the edges of the float range, every kind, two temperatures
    for dtype in (torch.float64, torch.float32):
        x, y = extreme_data(dtype)
        for temperature in EXTREME_T:
            for kind in KINDS:
                a = shard(x, rank, world).requires_grad_()
                b = shard(y, rank, world).requires_grad_()
                rows = kd.vocab_parallel_kl_div(a, b, kind=kind, reduction="none",
                                                temperature=temperature)
                # (every row's cotangent 1: a row beyond the float range, +inf, passes back
                # the finite gradient of its true value; a row whose true value is +inf, 0)
                rows.backward(torch.ones_like(rows))
                out[f"extreme/{dtype}/{temperature}/{kind}"] = dict(rows=rows.detach(),
                                                                    gp=a.grad, gq=b.grad)

    # masks, weights, reductions, t2 scaling
    x, y, mask, w = masked_data()
    for reduction in ("mean", "sum"):
        a = shard(x, rank, world).requires_grad_()
        b = shard(y, rank, world).requires_grad_()
        val = kd.vocab_parallel_kl_div(a, b, reduction=reduction, mask=mask, weight=w,
                                       temperature=2.0, t2_scale=True)
        val.backward()
        out[f"masked/{reduction}"] = dict(val=val.detach(), gp=a.grad, gq=b.grad)

    # log-probabilities (normalised over the full vocabulary) against logits
    xl = torch.log_softmax(x[[0, 2, 3]], dim=-1)
    a = shard(xl, rank, world).requires_grad_()
    b = shard(y[[0, 2, 3]], rank, world).requires_grad_()
    val = kd.vocab_parallel_js_div(a, b, p_space="log_probs", beta=0.3, reduction="sum")
    val.backward()
    out["log_probs"] = dict(val=val.detach(), gp=a.grad, gq=b.grad)

    # the output layer fused with the loss
    for dtype in (torch.float64, torch.float32):
        h, wt, bias, t, m = linear_data(dtype)
        hh = h.clone().requires_grad_()
        ws = wt[CUTS[world][rank]:CUTS[world][rank + 1]].clone().requires_grad_()
        bs = bias[CUTS[world][rank]:CUTS[world][rank + 1]].clone().requires_grad_()
        ts = shard(t, rank, world).requires_grad_()
        for kind in KINDS:
            for g_ in (hh, ws, bs, ts):
                g_.grad = None
            with kd.count_collectives() as c:
                val = kd.vocab_parallel_linear_kl_div(hh, ws, ts, bias_shard=bs, mask=m,
                                                      kind=kind, temperature=1.3, chunk_size=4)
            val.backward()
            # evaluation: under no_grad no gradient is formed and grad_hidden not all-reduced
            with torch.no_grad(), kd.count_collectives() as c_eval:
                val_eval = kd.vocab_parallel_linear_kl_div(hh, ws, ts, bias_shard=bs, mask=m,
                                                           kind=kind, temperature=1.3,
                                                           chunk_size=4)
            out[f"linear/{dtype}/{kind}"] = dict(val=val.detach(), gh=hh.grad, gw=ws.grad,
                                                 gb=bs.grad, gt=ts.grad, calls=c["calls"],
                                                 eval=val_eval, eval_calls=c_eval["calls"],
                                                 eval_grad=val_eval.requires_grad)

    # bad input in one rank's shard: every rank raises the same ValueError
    for name, bad in (("nan", math.nan), ("allinf", -INF)):
        xb = x[[0, 2]].clone()
        if name == "nan":
            xb[1, V - 1] = bad  # only the last rank's shard has it
        else:
            xb[0, :] = bad
        try:
            kd.vocab_parallel_kl_div(shard(xb, rank, world), shard(y[[0, 2]], rank, world))
            out[f"error/{name}"] = "no error"
        except ValueError as exc:
            out[f"error/{name}"] = str(exc)

    # data parallelism: this rank's rows, two micro-batches, gradient accumulation
    feats, teacher, dmask, w0, bounds = dp_data(world)
    lo, hi = bounds[rank], bounds[rank + 1]
    mid = lo + (hi - lo) // 3
    micro = [(lo, mid), (mid, hi)]
    model_w = w0.clone().requires_grad_()
    count = kd.global_token_count([dmask[a_:b_] for a_, b_ in micro])
    logged = torch.zeros((), dtype=torch.float64)
    for a_, b_ in micro:
        logits = feats[a_:b_] @ model_w.T
        s = kldiv.kl_div(teacher[a_:b_], logits, p_space="logits", q_space="logits",
                         reduction="sum", mask=dmask[a_:b_])
        kd.data_parallel_mean(s, count).backward()
        logged = logged + s.detach()
    grad = model_w.grad.clone()
    dist.all_reduce(grad)  # what DDP does: average the gradients over the ranks
    grad /= world
    dist.all_reduce(logged)
    out["dp"] = dict(count=count, grad=grad, mean=logged / count)

    # a group smaller than the world: ranks {0, 1} and {2, 3} each form a vocabulary group
    if world == 4:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        mine = groups[rank // 2]
        xg, yg, _ = family_data(torch.float64, 2)
        xg = xg[1] + (rank // 2)  # the two groups see different rows (+1 shifts p only)
        yg = yg[1] * (1 + rank // 2)
        r = rank % 2
        a = shard(xg, r, 2).requires_grad_()
        b = shard(yg, r, 2).requires_grad_()
        val = kd.vocab_parallel_kl_div(a, b, reduction="none", group=mine)
        val.sum().backward()
        out["group"] = dict(val=val.detach(), gp=a.grad, gq=b.grad)

        # tensor x data parallel: vocabulary groups {0,1}, {2,3}; data groups {0,2}, {1,3}
        dp = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
        teacher, student, tmask, bounds = tpdp_data()
        lo, hi = bounds[rank // 2], bounds[rank // 2 + 1]  # this data-parallel rank's rows
        t = shard(teacher[lo:hi], rank % 2, 2)
        s = shard(student[lo:hi], rank % 2, 2).requires_grad_()
        count = kd.global_token_count(tmask[lo:hi], group=dp)
        local = kd.vocab_parallel_kl_div(t, s, mask=tmask[lo:hi], reduction="sum", group=mine)
        kd.data_parallel_mean(local, count, group=dp).backward()
        total = local.detach().clone()
        dist.all_reduce(total, group=dp)
        out["tpdp"] = dict(mean=total / count, gq=s.grad, rows=(lo, hi))
    return out


def _worker_main(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        out = _worker_cases(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    tmp = os.path.join(out_dir, f".rank{rank}.pt.tmp")
    torch.save(out, tmp)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":  # a worker process: rank world init_file out_dir
    _worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    sys.exit(0)


# ----------------------------------------------------------------------------------------------
# launching


def launch(world, timeout=150):
    """Run the worker on ``world`` gloo ranks (loopback only); the results of every rank.

    The workers are forked from this process where the platform allows it (no second import
    of torch: spawning costs seconds per process on a busy 2-core machine); otherwise they
    run this file as a script (``tests/forked_ranks.py``).
    """
    from forked_ranks import run_forked

    return run_forked(_worker_main, world, timeout=timeout, script=__file__)


_LAUNCHED: dict = {}


def launched(world):
    """One launch per world size for the whole module."""
    if world not in _LAUNCHED:
        _LAUNCHED[world] = launch(world)
    return world, _LAUNCHED[world]


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"world{w}")
def results(request):
    return launched(request.param)


@pytest.fixture(scope="module")
def results4():
    return launched(4)


# ----------------------------------------------------------------------------------------------
# references, independent of kldiv.distributed


def naive(kind, x, y, temperature=1.0, beta=0.5):
    """Textbook float64 divergences per row from scipy's softmax and rel_entr."""
    x = np.asarray(x, dtype=np.float64) / temperature
    y = np.asarray(y, dtype=np.float64) / temperature
    p = scipy.special.softmax(x, axis=-1)
    q = scipy.special.softmax(y, axis=-1)
    kl = lambda a, b: scipy.special.rel_entr(a, b).sum(-1)  # noqa: E731
    if kind == "forward":
        return kl(p, q)
    if kind == "reverse":
        return kl(q, p)
    if kind == "jeffreys":
        return kl(p, q) + kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


CORE = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
        "jeffreys": kldiv.jeffreys_div}
ORACLE = {"forward": "kl", "reverse": "reverse_kl", "js": "js", "jeffreys": "jeffreys"}


def gathered(per_rank, key, field):
    """A per-shard result of every rank, concatenated along the categories."""
    return torch.cat([r[key][field] for r in per_rank], dim=-1)


def assert_close(got, want, rtol, what, atol=1e-300, overflow=None):
    """Relative error per value; +-inf must match. With ``overflow`` (a dtype), a true value
    beyond a 16th of the dtype's largest number may come back as +inf (documented)."""
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    if overflow is not None:
        huge = (want > torch.finfo(overflow).max / 16) & (got == INF)
        want = torch.where(huge, INF, want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.equal(torch.isinf(got), torch.isinf(want)), (what, got, want)
    fin = torch.isfinite(want)
    err = (got[fin] - want[fin]).abs()
    bound = rtol * want[fin].abs() + atol
    worst = float((err / bound).max() * rtol) if err.numel() else 0.0
    assert bool((err <= bound).all()), f"{what}: max rel err {worst:.3g}"


def assert_grad_close(got, want, rtol, what, atol=0.0, per_row=True):
    """Gradients, row by row (the last axis is a row): the error of every entry relative to the
    largest entry of the reference in its row (plus ``atol``). A normwise error over the whole
    tensor would hide the rows with small gradients; ``per_row=False`` (parameter gradients,
    whose rows are no distributions) compares with the largest entry of the whole tensor."""
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient {got}"
    if per_row and want.ndim:
        scale = want.abs().amax(dim=-1, keepdim=True)
    else:
        scale = want.abs().max()
    scale = torch.where(scale > 0, scale, 1.0)
    err = (got - want).abs()
    worst = float((err / (rtol * scale + atol)).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: worst error {worst:.3g} x the bound (rtol {rtol:g} per row)"


def js_grad_atol(kind, dtype):
    """JS's gradient, ``beta p (log(p/m) - KL(p||m))``, is a difference of two numbers near
    log(1/beta) when the supports barely overlap; the sharded path takes it from
    ``log(m / (beta p))`` there (no cancellation), so no allowance is needed: 0. (The core's
    float32 gradient is about eps * p off there.)"""
    return 0.0


def naive_torch(kind, x, y, temperature=1.0, beta=0.5):
    """Textbook divergences per row in float64 torch, for reference gradients by autograd:
    log_softmax of both sides, then ``sum p (log p - log q)``; the -inf edges are fed safe
    values before each ``where`` (no nan in the backward pass). Not accurate for nearly equal
    rows (the values there come from mpmath), but its gradients are good to ~1e-15."""
    def centred(v):  # (v - max) / T: dividing first would round a logit of 2^40 to 1e-4
        m = torch.where(v > -INF, v, -INF).amax(dim=-1, keepdim=True).detach()
        return (v - m) / temperature

    lp = torch.log_softmax(centred(x), dim=-1)
    lq = torch.log_softmax(centred(y), dim=-1)

    def kl(la, lb):
        sa = la > -INF
        ok = sa & (lb > -INF)
        la0 = torch.where(ok, la, 0.0)
        lb0 = torch.where(ok, lb, 0.0)
        val = torch.where(ok, la0.exp() * (la0 - lb0), 0.0).sum(-1)
        return torch.where((sa & ~ok).any(-1), INF, val)

    if kind == "forward":
        return kl(lp, lq)
    if kind == "reverse":
        return kl(lq, lp)
    if kind == "jeffreys":
        return kl(lp, lq) + kl(lq, lp)
    either = (lp > -INF) | (lq > -INF)
    lm = torch.logaddexp(torch.where(either, lp, 0.0) + math.log(beta),
                         torch.where(either, lq, 0.0) + math.log1p(-beta))
    lm = torch.where(either, lm, -INF)
    return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)


def reference_grads(kind, x, y, cot=None, temperature=1.0, beta=0.5):
    """float64 autograd gradients of ``naive_torch`` on the exact inputs (rows of infinite value
    get 0, as kldiv's), weighted by the cotangent ``cot`` per row."""
    a = x.double().clone().requires_grad_()
    b = y.double().clone().requires_grad_()
    rows = naive_torch(kind, a, b, temperature, beta)
    w = torch.ones_like(rows) if cot is None else cot.double()
    torch.where(torch.isfinite(rows), rows * w, 0.0).sum().backward()
    return a.grad, b.grad


def mp_grads_where_float64_overflows(kind, x, y, temperature=1.0):
    """``reference_grads``; on rows where they are not finite or the value is 1e15 or more (the
    float64 textbook formula overflows, or loses eps * KL absolutely), mpmath's derivatives on
    the exact inputs (``test_distributed_huge.mp_ref``)."""
    import mpmath
    from test_distributed_huge import mp_ref

    rp, rq = reference_grads(kind, x, y, temperature=temperature)
    bad = ~(torch.isfinite(rp).all(-1) & torch.isfinite(rq).all(-1))
    # (and rows that the textbook value takes to +inf, a side escaping or not: 0 there)
    sp, sq = x > -INF, y > -INF
    esc = {"forward": (sp & ~sq).any(-1), "reverse": (sq & ~sp).any(-1),
           "jeffreys": (sp != sq).any(-1), "js": torch.zeros_like(sp[..., 0])}[kind]
    # (the textbook's gradient is eps * KL off, absolutely: O(1) at KL = 1e16 and beyond)
    val = naive_torch(kind, x.double(), y.double(), temperature)
    bad |= ~(torch.isfinite(val) & (val < 1e15)) & ~esc
    t = mpmath.mpf(float(temperature))
    for r in torch.nonzero(bad).flatten().tolist():
        with mpmath.workprec(1200):  # (the logits / T exactly)
            _, ga, gb = mp_ref(kind, [mpmath.mpf(float(v)) / t for v in x[r].double()],
                               [mpmath.mpf(float(v)) / t for v in y[r].double()])
        rp[r] = torch.from_numpy(ga / temperature)
        rq[r] = torch.from_numpy(gb / temperature)
    return rp, rq


def mp_rows_wide(kind, x, y, temperature=1.0):
    """``mp_rows``; rows holding a logit of 1e307 or more in magnitude from
    ``test_distributed_huge.mp_ref`` (its precision grows with the logits; 120 digits are not
    enough for log-ratios of 1e308)."""
    import mpmath
    from test_distributed_huge import mp_ref

    want = mp_rows(kind, x, y, temperature)
    fin = lambda v: torch.where(torch.isfinite(v), v.double(), 0.0)  # noqa: E731
    wide = torch.maximum(fin(x).abs().amax(-1), fin(y).abs().amax(-1)) >= 1e307
    t = mpmath.mpf(float(temperature))
    for r in torch.nonzero(wide).flatten().tolist():
        with mpmath.workprec(1200):
            want[r] = mp_ref(kind, [mpmath.mpf(float(v)) / t for v in x[r].double()],
                             [mpmath.mpf(float(v)) / t for v in y[r].double()])[0]
    return want


def mp_rows(kind, x, y, temperature=1.0, beta=0.5):
    """Per-row divergence in mpmath at 120 digits from the exact inputs: a log-softmax centred on
    the row maximum, then the textbook sums. Unlike ``tests/oracle.py`` its precision does not
    grow with the range of the logits, so logits of 1e30 or 3e38 cost no more than others; the
    inputs (float32 or float64) are exact in 120 digits, and so is each centred logit."""
    import mpmath

    x = np.asarray(torch.as_tensor(x).double().numpy())
    y = np.asarray(torch.as_tensor(y).double().numpy())
    out = np.empty(x.shape[:-1])
    t = mpmath.mpf(float(temperature))
    with mpmath.workdps(120):
        def logsoftmax(row):
            v = [mpmath.mpf(float(a)) / t if a != -INF else None for a in row]
            m = max(a for a in v if a is not None)
            s = mpmath.fsum(mpmath.exp(a - m) for a in v if a is not None)
            lse = m + mpmath.log(s)
            return [None if a is None else a - lse for a in v]

        def kl(la, lb):
            acc = []
            for a, b in zip(la, lb):
                if a is None:
                    continue
                if b is None:
                    return mpmath.inf
                acc.append(mpmath.exp(a) * (a - b))
            return mpmath.fsum(acc)

        bb = mpmath.mpf(beta)
        for idx in np.ndindex(*x.shape[:-1]):
            lp, lq = logsoftmax(x[idx]), logsoftmax(y[idx])
            if kind == "forward":
                v = kl(lp, lq)
            elif kind == "reverse":
                v = kl(lq, lp)
            elif kind == "jeffreys":
                v = kl(lp, lq) + kl(lq, lp)
            else:
                lm = [None if a is None and b is None else mpmath.log(
                      bb * (mpmath.exp(a) if a is not None else 0)
                      + (1 - bb) * (mpmath.exp(b) if b is not None else 0))
                      for a, b in zip(lp, lq)]
                v = bb * kl(lp, lm) + (1 - bb) * kl(lq, lm)
            out[idx] = float(v)
    return out


# ----------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("kind", KINDS)
def test_family_values_and_gradients(results, kind, temperature, dtype):
    world, res = results
    x, y, cot = family_data(dtype, world)
    key = f"family/{dtype}/{temperature}/{kind}"
    rows = [r[key]["rows"] for r in res]
    for r in range(1, world):  # every rank holds the same answer
        assert torch.equal(rows[r].nan_to_num(), rows[0].nan_to_num())
    got = rows[0]
    assert got.dtype == dtype
    # the mpmath oracle on the exact inputs, and the naive float64 formula
    import oracle  # tests/oracle.py: mpmath, 50 digits
    want = oracle.rows(ORACLE[kind], x.numpy(), y.numpy(), p_space="logits", q_space="logits",
                       temperature=temperature)
    # x / T rounds in float32 here (the core divides the logit difference instead, which is
    # exact to ~1e-7 relative): ~1e-7 absolute on the logit difference, which bounds the absolute
    # error of a nearly-zero KL (1e-9 here) by about 1e-12
    atol = 1e-12 if (dtype == torch.float32 and temperature != 1.0) else 1e-300
    assert_close(got, want, TOL[dtype], f"{key} vs mpmath", atol=atol)
    # (the textbook sum cancels: it is good to about 1e-15 absolute only)
    assert_close(got, naive(kind, x, y, temperature), max(TOL[dtype], 1e-8), f"{key} vs naive",
                 atol=max(atol, 1e-13))
    # the single-process function on the gathered tensors, value and gradient
    a = x.clone().requires_grad_()
    b = y.clone().requires_grad_()
    core = CORE[kind](a, b, p_space="logits", q_space="logits", temperature=temperature)
    assert_close(got, core.detach(), TOL[dtype], f"{key} vs kldiv", atol=atol)
    # gradients, row by row, against float64 autograd of the textbook formula
    rp, rq = reference_grads(kind, x, y, cot, temperature)
    gp = gathered(res, key, "gp")
    gq = gathered(res, key, "gq")
    assert_grad_close(gp, rp, TOL[dtype], f"{key} grad p")
    assert_grad_close(gq, rq, TOL[dtype], f"{key} grad q")
    if kind == "forward":  # d KL / d student logits = (q - p) / T on finite rows, by hand
        p = torch.softmax(x.double() / temperature, -1)
        q = torch.softmax(y.double() / temperature, -1)
        fin = torch.isfinite(core.detach())[..., None]
        by_hand = torch.where(fin, (q - p) / temperature * cot.double()[..., None], 0.0)
        assert_grad_close(gq, by_hand, TOL[dtype], f"{key} grad q by hand")
    # communication: 3 all-reduces (4 for JS and Jeffreys) forward, none backward
    calls = res[0][key]["calls"]
    assert calls == ((3 if kind in ("forward", "reverse") else 4), 0)


def test_family_edges_present(results):
    """The data really has the promised edges: a shard without p's support, inf rows."""
    world, _ = results
    x, y, _ = family_data(torch.float64, world)
    assert bool((shard(x, 0, world)[0, 0] == -INF).all())
    fwd = naive("forward", x, y)
    rev = naive("reverse", x, y)
    assert np.isinf(fwd[0, 1]) and np.isfinite(rev[0, 1])
    assert np.isinf(rev[0, 2]) and np.isfinite(fwd[0, 2])
    assert 0 < fwd[1, 1] < 1e-7


_SWEEP_REFS: dict = {}


def test_random_splits_and_supports(results):
    """Seeded sweep: random -inf patterns and random uneven cuts (empty shards included)."""
    world, res = results
    for i in range(SWEEP):
        x, y, cuts, kind, dtype = sweep_case(i, world)
        what = f"sweep {i} ({kind}, {dtype}, cuts {cuts})"
        if i not in _SWEEP_REFS:  # (the rows are the same for every world size, the cuts not)
            _SWEEP_REFS[i] = (CORE[kind](x, y, p_space="logits", q_space="logits"),
                              naive(kind, x, y), *reference_grads(kind, x, y))
        core, textbook, rp, rq = _SWEEP_REFS[i]
        assert_close(res[0][f"sweep/{i}"]["rows"], core, TOL[dtype], what)
        assert_close(res[0][f"sweep/{i}"]["rows"], textbook, max(TOL[dtype], 1e-8),
                     what + " naive", atol=1e-13)
        atol = js_grad_atol(kind, dtype)
        assert_grad_close(gathered(res, f"sweep/{i}", "gp"), rp, TOL[dtype], what + " gp", atol)
        assert_grad_close(gathered(res, f"sweep/{i}", "gq"), rq, TOL[dtype], what + " gq", atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["forward", "js"])
def test_mass_far_below_the_maximum(results, kind, dtype):
    import oracle

    world, res = results
    x, y = far_data(dtype)
    got = res[0][f"far/{dtype}/{kind}"]
    want = oracle.rows(ORACLE[kind], x.numpy(), y.numpy(), p_space="logits", q_space="logits")
    if kind == "forward":
        assert want.min() > 95  # finite, and no float32 exp(-100) underflow makes it inf
    assert_close(got["rows"], want, TOL[dtype], f"far {kind}")
    rp, rq = reference_grads(kind, x, y)
    # JS's true gradients are about e^-100 here (m = beta p on p's support, q(T) ~ e^-100):
    # the float64 reference is noise at ~1e-16 there, hence the absolute tolerance
    eps = 32 * torch.finfo(torch.float64).eps
    assert_grad_close(gathered(res, f"far/{dtype}/{kind}", "gp"), rp, TOL[dtype], "gp", eps)
    assert_grad_close(gathered(res, f"far/{dtype}/{kind}", "gq"), rq, TOL[dtype], "gq", eps)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_masks_weights_temperature(results, reduction):
    world, res = results
    x, y, mask, w = masked_data()
    a = x.clone().requires_grad_()
    b = y.clone().requires_grad_()
    core = kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction=reduction,
                        mask=mask, weight=w, temperature=2.0, t2_scale=True)
    core.backward()
    got = res[0][f"masked/{reduction}"]
    assert_close(got["val"], core.detach(), 1e-10, "masked value")
    # naive: sum over kept rows of w * KL * T^2 (divided by the kept weight for the mean)
    rows = naive("forward", torch.where(mask[:, None], x, 0.0), y, temperature=2.0) * 4.0
    keep = mask.numpy()
    want = (w.numpy()[keep] * rows[keep]).sum()
    if reduction == "mean":
        want /= w.numpy()[keep].sum()
    assert_close(got["val"], want, 1e-9, "masked value vs naive")
    gp = gathered(res, f"masked/{reduction}", "gp")
    gq = gathered(res, f"masked/{reduction}", "gq")
    assert_grad_close(gp, a.grad, 1e-10, "masked grad p")
    assert_grad_close(gq, b.grad, 1e-10, "masked grad q")
    assert bool((gp[~mask] == 0).all()) and bool((gq[~mask] == 0).all())


def test_log_probs_js(results):
    world, res = results
    x, y, _, _ = masked_data()
    xl = torch.log_softmax(x[[0, 2, 3]], dim=-1).requires_grad_()
    b = y[[0, 2, 3]].clone().requires_grad_()
    core = kldiv.js_div(xl, b, beta=0.3, p_space="log_probs", q_space="logits", reduction="sum")
    core.backward()
    got = res[0]["log_probs"]
    assert_close(got["val"], core.detach(), 1e-10, "log_probs value")
    assert_close(got["val"], naive("js", xl.detach(), b.detach(), beta=0.3).sum(), 1e-9, "naive")
    assert_grad_close(gathered(res, "log_probs", "gp"), xl.grad, 1e-10, "gp")
    assert_grad_close(gathered(res, "log_probs", "gq"), b.grad, 1e-10, "gq")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", KINDS)
def test_linear(results, kind, dtype):
    world, res = results
    h, wt, bias, t, m = linear_data(dtype)
    core = CORE[kind](t, h @ wt.T + bias, p_space="logits", q_space="logits",
                      reduction="mean", mask=m, temperature=1.3)
    # reference gradients: float64 autograd of the textbook rows through the layer (rows of
    # infinite value contribute no gradient, kldiv's convention)
    hh, ww, bb, tt = (v.double().clone().requires_grad_() for v in (h, wt, bias, t))
    rows = naive_torch(kind, tt, hh @ ww.T + bb, temperature=1.3)
    (torch.where(torch.isfinite(rows) & m, rows, 0.0).sum() / m.sum()).backward()
    key = f"linear/{dtype}/{kind}"
    for r in range(world):
        assert_close(res[r][key]["val"], core, TOL[dtype], f"{key} value rank {r}")
        assert_close(res[r][key]["eval"], core, TOL[dtype], f"{key} no_grad value rank {r}")
        assert not res[r][key]["eval_grad"]
        assert_grad_close(res[r][key]["gh"], hh.grad, TOL[dtype], f"{key} grad hidden rank {r}")
    gw = torch.cat([r[key]["gw"] for r in res], 0)
    gb = torch.cat([r[key]["gb"] for r in res], 0)
    gt = gathered(res, key, "gt")
    assert_grad_close(gw, ww.grad, TOL[dtype], f"{key} grad weight", per_row=False)
    assert_grad_close(gb, bb.grad, TOL[dtype], f"{key} grad bias", per_row=False)
    assert_grad_close(gt, tt.grad, TOL[dtype], f"{key} grad target",
                      atol=js_grad_atol(kind, dtype))
    # 3 chunks of rows (9 rows, chunk_size 4) x 3 all-reduces (4 for JS and Jeffreys), plus one
    # for grad_hidden; under no_grad that one is not issued
    per_chunk = 3 if kind in ("forward", "reverse") else 4
    assert res[0][key]["calls"] == 3 * per_chunk + 1
    assert res[0][key]["eval_calls"] == 3 * per_chunk


_MP_CACHE: dict = {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("temperature", EXTREME_T)
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_rows_against_mpmath(results, kind, temperature, dtype):
    """Logits of 1e30, 3e38, finfo.min, -1e30 masks, wide and nearly equal rows, disjoint
    supports: values against mpmath (120 digits, exact inputs), gradients row by row against
    float64 autograd of the textbook formula; never nan, JS never above log(2)."""
    world, res = results
    x, y = extreme_data(dtype)
    key = f"extreme/{dtype}/{temperature}/{kind}"
    rows = [r[key]["rows"] for r in res]
    for r in range(1, world):
        assert torch.equal(rows[r], rows[0]), key
    got = rows[0]
    assert got.dtype == dtype and not bool(torch.isnan(got).any()), (key, got)
    if key not in _MP_CACHE:
        _MP_CACHE[key] = mp_rows_wide(kind, x, y, temperature)
    want = _MP_CACHE[key]
    assert_close(got, want, TOL[dtype], f"{key} vs mpmath", overflow=dtype)
    if kind == "js":
        assert bool((got <= math.log(2) * (1 + 2 * torch.finfo(dtype).eps)).all())
        # disjoint supports (the last row): log 2, and a gradient of exactly 0
        assert abs(float(got[-1]) - math.log(2)) <= 4 * torch.finfo(dtype).eps
        for field in ("gp", "gq"):
            assert float(gathered(res, key, field)[-1].abs().max()) == 0.0, field
    # rows whose true value overflows the dtype (see above) are +inf, with the finite gradient
    # of the true value (float64 autograd; mpmath's on rows where that overflows itself:
    # finfo.min against 1e30 at T < 1); rows of infinite true value (a side escapes) get 0
    if ("grads", key) not in _MP_CACHE:
        _MP_CACHE[("grads", key)] = mp_grads_where_float64_overflows(kind, x, y, temperature)
    rp, rq = _MP_CACHE[("grads", key)]
    if dtype == torch.float64:
        # the rows wider than the float64 range: the core's values too (it carries such
        # log-ratios in quarters), and at T = 1 its gradients on rows of finite value (at
        # T = 0.7 the core's Jeffreys gradient on [1.7e308, 1, 2] vs [1.7e308, 2, -1.7e308]
        # is off: mpmath above is the reference there)
        wide = slice(7, 13)
        a, b = x[wide].clone().requires_grad_(), y[wide].clone().requires_grad_()
        core = CORE[kind](a, b, p_space="logits", q_space="logits", temperature=temperature,
                          reduction="none")
        assert_close(got[wide], core.detach(), 1e-10, f"{key} vs the core")
        if temperature == 1.0:
            ca, cb = torch.autograd.grad(core.sum(), (a, b))
            fin = torch.isfinite(core.detach())
            assert_grad_close(gathered(res, key, "gp")[wide][fin], ca[fin], 1e-10, "core gp")
            assert_grad_close(gathered(res, key, "gq")[wide][fin], cb[fin], 1e-10, "core gq")
    atol = max(js_grad_atol(kind, dtype), 1e-14)  # (the float64 reference's own noise)
    assert_grad_close(gathered(res, key, "gp"), rp, TOL[dtype], f"{key} grad p", atol)
    assert_grad_close(gathered(res, key, "gq"), rq, TOL[dtype], f"{key} grad q", atol)


def test_bad_input_raises_on_every_rank(results):
    world, res = results
    for r in range(world):
        assert "p_shard: contains nan or +inf" in res[r]["error/nan"]
        assert "p_shard: row 0 is -inf on every shard" in res[r]["error/allinf"]


def test_data_parallel_mean_equals_one_process(results):
    world, res = results
    feats, teacher, dmask, w0, _ = dp_data(world)
    w = w0.clone().requires_grad_()
    full = kldiv.kl_div(teacher, feats @ w.T, p_space="logits", q_space="logits",
                        reduction="mean", mask=dmask)
    full.backward()
    for r in range(world):
        got = res[r]["dp"]
        assert float(got["count"]) == float(dmask.sum())
        assert_close(got["mean"], full.detach(), 1e-12, "data-parallel mean")
        assert_grad_close(got["grad"], w.grad, 1e-12, "data-parallel gradient")
    # the per-rank "mean" that this helper replaces is really different here
    _, _, _, _, bounds = dp_data(world)
    per_rank = [float(kldiv.kl_div(teacher[a:b], (feats @ w0.T)[a:b], p_space="logits",
                                   q_space="logits", reduction="mean", mask=dmask[a:b]))
                for a, b in zip(bounds[:-1], bounds[1:])]
    assert abs(sum(per_rank) / world - float(full.detach())) > 1e-6


def test_subgroups(results4):
    world, res = results4
    for grp in range(2):
        xg, yg, _ = family_data(torch.float64, 2)
        xg = (xg[1] + grp).requires_grad_()
        yg = (yg[1] * (1 + grp)).detach().requires_grad_()
        core = kldiv.kl_div(xg, yg, p_space="logits", q_space="logits")
        core.sum().backward()
        r0, r1 = res[2 * grp], res[2 * grp + 1]
        assert_close(r0["group"]["val"], core.detach(), 1e-10, f"group {grp}")
        assert_close(r1["group"]["val"], core.detach(), 1e-10, f"group {grp}")
        gp = torch.cat([r0["group"]["gp"], r1["group"]["gp"]], -1)
        assert_grad_close(gp, xg.grad, 1e-10, f"group {grp} grad p")


def test_tensor_and_data_parallel_together(results4):
    """2 vocabulary ranks x 2 data ranks: value and gradient of the global per-token mean."""
    world, res = results4
    teacher, student, tmask, _ = tpdp_data()
    s = student.clone().requires_grad_()
    full = kldiv.kl_div(teacher, s, p_space="logits", q_space="logits", mask=tmask,
                        reduction="mean")
    full.backward()
    grad = torch.zeros_like(student)
    for rank in range(4):
        got = res[rank]["tpdp"]
        assert_close(got["mean"], full.detach(), 1e-12, f"mean on rank {rank}")
        lo, hi = got["rows"]
        a, b = CUTS[2][rank % 2], CUTS[2][rank % 2 + 1]
        # DDP averages parameter gradients over the 2 data ranks: divide by 2 to compare
        grad[lo:hi, a:b] = got["gq"] / 2
    assert_grad_close(grad, s.grad, 1e-12, "gradient")


# ----------------------------------------------------------------------------------------------
# single process (no process group): argument errors and helpers


@pytest.fixture
def sharded_path(monkeypatch):
    """One rank normally hands the call to the core; this keeps it on the sharded algorithm."""
    monkeypatch.setattr(kd.vocab_parallel, "_DELEGATE_LOCAL", False)


def test_local_run_without_process_group_matches_core(sharded_path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for kind in KINDS:
        got = kd.vocab_parallel_kl_div(x, y, kind=kind, reduction="none")
        assert_close(got, naive(kind, x, y), 1e-10, kind)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: kd.vocab_parallel_kl_div(x, x, p_space="probs"), "p_space"),
        (lambda x: kd.vocab_parallel_kl_div(x, x[:, :3]), "differ"),
        (lambda x: kd.vocab_parallel_kl_div(x, x, reduction="avg"), "reduction"),
        (lambda x: kd.vocab_parallel_kl_div(x, x, temperature=0), "temperature"),
        (lambda x: kd.vocab_parallel_js_div(x, x, beta=1.0), "beta"),
        (lambda x: kd.vocab_parallel_kl_div(x, x, mask=torch.ones(2)), "mask"),
        (lambda x: kd.vocab_parallel_kl_div(x, x, weight=-torch.ones(2)), "weight"),
        (lambda x: kd.vocab_parallel_kl_div(x.long(), x), "floating"),
        (lambda x: kd.vocab_parallel_kl_div(x, x, q_space="log_probs"), "logsumexp"),
        (lambda x: kd.vocab_parallel_linear_kl_div(x, x, x, reduction="none"), "reduction"),
        (lambda x: kd.vocab_parallel_linear_kl_div(x, x[:3], x), "weight_shard"),
        (lambda x: kd.vocab_parallel_linear_kl_div(x, x, x[:, :2], chunk_size=0), "chunk_size"),
        (lambda x: kd.global_token_count([torch.ones(2)]), "mask"),
    ],
)
@pytest.mark.parametrize("delegate", [True, False], ids=["core", "sharded"])
def test_argument_errors(monkeypatch, call, match, delegate):
    monkeypatch.setattr(kd.vocab_parallel, "_DELEGATE_LOCAL", delegate)
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x)


def test_global_token_count_and_mean_locally():
    masks = [torch.tensor([True, False, True]), torch.tensor([False, True])]
    assert float(kd.global_token_count(masks)) == 3.0
    assert float(kd.global_token_count(masks, weight=[torch.tensor([2.0, 9.0, 1.0]),
                                                     torch.tensor([5.0, 0.5])])) == 3.5
    assert float(kd.global_token_count([4, 3])) == 7.0
    assert float(kd.data_parallel_mean(torch.tensor(3.0), torch.tensor(0.0))) == 0.0


def _hyp_rows():
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    elems = st.one_of(st.floats(-30, 30), st.just(-INF))
    return st.integers(1, 9).flatmap(
        lambda v: st.tuples(arrays(np.float64, (2, v), elements=elems),
                            arrays(np.float64, (2, v), elements=elems),
                            st.sampled_from(KINDS), st.floats(0.25, 4.0)))


def test_property_local_equals_core(monkeypatch, sharded_path):
    """Property (hypothesis): one rank, any supports and temperatures: the core's value."""
    from hypothesis import given, settings

    monkeypatch.setattr(kd._rows, "_CHUNK_ELEMENTS", 8)  # several row chunks

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(_hyp_rows())
    def check(case):
        x, y, kind, temperature = case
        x[:, 0] = np.where(np.isinf(x[:, 0]), 0.0, x[:, 0])  # no row is -inf everywhere
        y[:, -1] = np.where(np.isinf(y[:, -1]), 0.0, y[:, -1])
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        got = kd.vocab_parallel_kl_div(x, y, kind=kind, reduction="none",
                                       temperature=temperature)
        want = CORE[kind](x, y, p_space="logits", q_space="logits", temperature=temperature)
        assert_close(got, want, 1e-10, f"{kind} T={temperature}", atol=1e-14)

    check()


def _free_loopback_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(port):
    """The environment torchrun would set for each rank (2 ranks, env://, loopback)."""
    return lambda rank: dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                             GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="")


def _run_script_as_rank(script, env, rank, world, init_file, out_dir):
    """A forked rank: torchrun's environment, then the script; its output saved as the rank's
    result (``{"log": ...}``, as ``forked_ranks`` returns for a script run without fork)."""
    import contextlib
    import io
    import runpy

    # the parent's OpenMP pool does not survive fork(): stay single-threaded in the child
    torch.set_num_threads(1)
    os.environ.update(env(rank))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.stdout.write(buf.getvalue())  # (shown with the failure, if any)
    torch.save({"log": buf.getvalue()}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_docs_torchrun_example_runs_on_two_processes(tmp_path):
    """The script in docs/distributed.md, launched as torchrun would (env://, loopback)."""
    import functools

    from forked_ranks import run_forked

    doc = os.path.join(os.path.dirname(__file__), "..", "docs", "distributed.md")
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    start = text.index("<!-- example: kl_tp.py")
    code = text[text.index("```python\n", start) + 10:]
    code = code[:code.index("```")]
    script = tmp_path / "kl_tp.py"
    script.write_text(code)
    env = _torchrun_env(_free_loopback_port())
    res = run_forked(functools.partial(_run_script_as_rank, str(script), env), 2,
                     script=str(script), env=env)
    for rank, out in enumerate(res):
        assert f"rank {rank}: loss" in out["log"], out["log"]


@pytest.mark.parametrize("delegate", [True, False], ids=["core", "sharded"])
def test_half_precision_inputs_compute_in_float32(monkeypatch, delegate):
    monkeypatch.setattr(kd.vocab_parallel, "_DELEGATE_LOCAL", delegate)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, generator=g).to(torch.bfloat16).requires_grad_()
    y = torch.randn(3, 7, generator=g).to(torch.bfloat16).requires_grad_()
    got = kd.vocab_parallel_kl_div(x, y, reduction="sum")
    assert got.dtype == torch.float32
    got.backward()
    want = naive("forward", x.detach().double(), y.detach().double()).sum()
    assert abs(float(got.detach()) - want) <= 1e-5 * want
    assert x.grad.dtype == torch.bfloat16 and y.grad.dtype == torch.bfloat16
    s = torch.tensor(3.0, dtype=torch.bfloat16)
    assert kd.data_parallel_mean(s, torch.tensor(1001.0)).dtype == torch.float32
    assert abs(float(kd.data_parallel_mean(s, torch.tensor(1001.0))) - 3.0 / 1001) < 1e-9


@pytest.mark.parametrize("kind", ["js", "jeffreys"])
def test_linear_js_jeffreys_locally(kind):
    h, wt, bias, t, m = linear_data(torch.float64)
    t = torch.where(torch.isinf(t), 0.0, t)  # Jeffreys needs equal supports to be finite
    hh, ww = h.clone().requires_grad_(), wt.clone().requires_grad_()
    got = kd.vocab_parallel_linear_kl_div(hh, ww, t, mask=m, kind=kind, beta=0.3,
                                          reduction="sum", chunk_size=2)
    got.backward()
    h2, w2 = h.clone().requires_grad_(), wt.clone().requires_grad_()
    kw = dict(beta=0.3) if kind == "js" else {}
    want = CORE[kind](t, h2 @ w2.T, p_space="logits", q_space="logits", mask=m,
                      reduction="sum", **kw)
    want.backward()
    assert_close(got.detach(), want.detach(), 1e-10, kind)
    assert_grad_close(hh.grad, h2.grad, 1e-10, "grad hidden")
    assert_grad_close(ww.grad, w2.grad, 1e-10, "grad weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_js_with_an_astronomically_small_q_locally(dtype):
    """q's logit -3e38 where p's is normal: the centring shift becomes ~1e36 and the centred
    log-ratios of every other entry noise; the per-entry direct route keeps JS right."""
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 40))
    b = a + 0.01 * rng.standard_normal((2, 40))
    b[0, 6] = -3e38
    at, bt = torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)
    got = kd.vocab_parallel_js_div(at, bt, p_space="logits", q_space="logits", reduction="none")
    a64, b64 = at.double().numpy(), bt.double().numpy()
    want = jensenshannon(scipy.special.softmax(a64, -1), scipy.special.softmax(b64, -1),
                         axis=-1) ** 2
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5 if dtype == torch.float32
                               else 1e-10)


def test_property_large_shifts_against_mpmath(monkeypatch, sharded_path):
    """Property (hypothesis): logits shifted by up to 1e30 (float64) or 1e37 (float32), on one
    side or both, with -inf entries and temperatures: the value is mpmath's on the shifted
    inputs (to 1e-10 / 1e-5 relative) and the gradient float64 autograd's, row by row. The
    sharded algorithm on one process (several row chunks): each side is centred on its own
    maximum before the two are differenced, whatever the magnitudes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    monkeypatch.setattr(kd._rows, "_CHUNK_ELEMENTS", 8)

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(st.integers(1, 7), st.sampled_from([torch.float64, torch.float32]),
           st.sampled_from(KINDS), st.sampled_from([1.0, 0.5, 3.0]),
           st.tuples(st.floats(0, 1), st.floats(0, 1)), st.tuples(st.integers(-1, 1),
                                                                  st.integers(-1, 1)),
           st.integers(0, 2**31 - 1))
    def check(v, dtype, kind, temperature, exps, signs, seed):
        top = 30 if dtype == torch.float64 else 37
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2, v)) * 3
        y = rng.standard_normal((2, v)) * 3
        x[rng.random((2, v)) < 0.2] = -INF
        y[rng.random((2, v)) < 0.2] = -INF
        x[:, 0] = np.where(np.isinf(x[:, 0]), 0.5, x[:, 0])  # no row -inf everywhere
        y[:, -1] = np.where(np.isinf(y[:, -1]), -0.5, y[:, -1])
        x = x + signs[0] * 10.0 ** (exps[0] * top)
        y = y + signs[1] * 10.0 ** (exps[1] * top)
        xt = torch.tensor(x).to(dtype)
        yt = torch.tensor(y).to(dtype)
        a, b = xt.clone().requires_grad_(), yt.clone().requires_grad_()
        got = kd.vocab_parallel_kl_div(a, b, kind=kind, reduction="none",
                                       temperature=temperature)
        torch.where(torch.isfinite(got), got, 0.0).sum().backward()
        want = mp_rows(kind, xt, yt, temperature)
        what = f"{kind} {dtype} T={temperature} shifts {exps} {signs}"
        assert_close(got.detach(), want, TOL[dtype], what, atol=1e-14 if dtype ==
                     torch.float64 else 1e-9, overflow=dtype)
        rp, rq = reference_grads(kind, xt, yt, temperature=temperature)
        atol = max(js_grad_atol(kind, dtype), 1e-14)
        assert_grad_close(a.grad, rp, TOL[dtype], what + " grad p", atol)
        assert_grad_close(b.grad, rq, TOL[dtype], what + " grad q", atol)

    check()


@pytest.mark.parametrize("kind", KINDS)
def test_validate_false_propagates_nan(kind, sharded_path):
    """With the checks off a nan in an unmasked row gives a nan (on either side, with or
    without -inf in the shard), never a plausible number; masked rows still give 0."""
    rows = torch.tensor([[math.nan, 0.0, 1.0], [math.nan, -INF, 1.0], [0.0, -INF, math.nan],
                         [0.5, 0.0, 1.0]], dtype=torch.float64)
    other = torch.zeros_like(rows)
    for x, y in ((rows, other), (other, rows)):
        got = kd.vocab_parallel_kl_div(x, y, kind=kind, validate=False, reduction="none")
        assert bool(torch.isnan(got[:3]).all()) and bool(torch.isfinite(got[3])), got
        mask = torch.tensor([False, False, False, True])
        masked = kd.vocab_parallel_kl_div(x, y, kind=kind, validate=False, mask=mask,
                                          reduction="sum")
        assert_close(masked, naive(kind, x[3:], y[3:]).sum(), 1e-12, "masked nan rows")
