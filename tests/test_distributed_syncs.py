"""Host synchronisations per vocabulary-parallel call (two gloo ranks, one launch).

Every read of a tensor's value on the host (``.tolist()``, ``.item()``, ``bool()``, ``int()``,
``float()``, ``__index__``) waits for the device; on a GPU each one stalls the stream. The
sharded forward pass of an ordinary call needs exactly these: the support check (``_is_dense``),
the flags read after the MAX collective (and, for JS / Jeffreys, the direct-route flag after the
sums, which depends on them). The overflow check of the sums (rows whose log-ratios leave an
eighth of the float range, computed again wider) is decided from the maxima and the minima of
the MAX collective and read with the flags: it adds a synchronisation only on calls with a row
whose spread times the vocabulary could reach the float range (``3e38`` against ``-3e38``).

The counts are made inside the ranks with the tensor's host-read methods wrapped; values of
the wide calls are checked against the single-process core (the sharded path's accuracy is
tested against mpmath in tests/test_distributed*.py).
"""
from __future__ import annotations

import os

import pytest
import torch

import kldiv.distributed as kd

KINDS = ("forward", "reverse", "js", "jeffreys")
READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")


def _count_reads():
    """Wrap the host reads of torch.Tensor; returns (counter dict, restore function)."""
    count = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(f):
        def g(self, *args, **kw):
            count["n"] += 1
            return f(self, *args, **kw)
        return g

    for name, f in saved.items():
        setattr(torch.Tensor, name, wrap(f))

    def restore():
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)

    return count, restore


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64) * 3
    y = torch.randn(5, 12, generator=g, dtype=torch.float64) * 3
    wide_x, wide_y = x.clone(), y.clone()
    # at T = 0.5 a log-ratio beyond an eighth of the float range (the sums overflow: the call is
    # computed again, float32 in float64, float64 in quarters), logits within the range that
    # the maxima alone send there (2^125 T for float32, 2^1020 for float64)
    big = 2e37 if dtype == torch.float32 else 1.1e307
    wide_x[2, 3], wide_y[2, 3] = big, -big
    masked_x = x.clone()
    masked_x[1, 4:8] = -float("inf")
    return {"ordinary": (x, y), "masked": (masked_x, y), "wide": (wide_x, wide_y),
            "empty": (x[:0], y[:0])}


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    out = {}
    try:
        cut = [slice(0, 5), slice(5, 12)][rank]
        for dtype in (torch.float32, torch.float64):
            for case, (x, y) in _inputs(dtype).items():
                for kind in KINDS:
                    xs = x.to(dtype)[:, cut].contiguous()
                    ys = y.to(dtype)[:, cut].contiguous()
                    xs.requires_grad_()
                    T = 0.5 if case == "wide" else 1.0
                    count, restore = _count_reads()
                    try:
                        v = kd.vocab_parallel_kl_div(xs, ys, kind=kind, reduction="none",
                                                     temperature=T)
                        n_fwd = count["n"]
                        g = torch.autograd.grad(v.sum(), xs)[0]
                    finally:
                        restore()
                    out[(str(dtype), case, kind)] = (n_fwd, count["n"] - n_fwd, v.detach(), g)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def counts():
    from forked_ranks import run_forked

    return run_forked(_worker, 2)


# forward pass: _is_dense's support check and the flags after the MAX; JS / Jeffreys read the
# direct-route flag after the sums; a call whose sums overflow reads their check once (it is
# computed again wider, where nothing can overflow). The backward pass reads nothing.
WANT = {"forward": 2, "reverse": 2, "js": 3, "jeffreys": 3}


def test_syncs_per_call(counts):
    a, b = counts
    for key, (n, nb, v, _) in a.items():
        assert b[key][:2] == (n, nb), key  # every rank reads the same (it decides the same)
        assert torch.equal(v, b[key][2]), key
        dtype, case, kind = key
        if case == "empty":  # (no rows: nothing to read but the support check)
            assert v.shape == (0,) and n <= WANT[kind] and nb == 0, (key, n, nb)
            continue
        assert (n, nb) == (WANT[kind] + (case == "wide"), 0), (key, n, nb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_rows_against_mpmath(counts, dtype):
    """The wide call's values and gradients (the row that overflowed, and an ordinary one of
    the same call) against mpmath: the sums' check still runs where it is needed."""
    import numpy as np
    from test_distributed_huge import grad_ok, mp_ref

    a, b = counts
    x, y = _inputs(dtype)["wide"]
    for kind in ("forward", "reverse", "js", "jeffreys"):
        _, _, v, g0 = a[(str(dtype), "wide", kind)]
        g = torch.cat([g0, b[(str(dtype), "wide", kind)][3]], 1)
        for r in (2, 0):
            xr = x[r].to(dtype).double().numpy() * 2.0  # / T, exact
            yr = y[r].to(dtype).double().numpy() * 2.0
            vr, ga, _ = mp_ref(kind, xr, yr)
            tol = 3e-6 if dtype == torch.float32 else 1e-12
            if vr > float(torch.finfo(dtype).max):
                assert float(v[r]) == float("inf"), (kind, r)
            else:
                assert abs(float(v[r]) - vr) <= tol * abs(vr), (kind, r, float(v[r]), vr)
            assert grad_ok(g[r].double().numpy(), 2.0 * np.asarray(ga, dtype=float), 5 * tol,
                           1e-300), (kind, r)
