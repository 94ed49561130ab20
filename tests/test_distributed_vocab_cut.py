"""vocab_size on log-probability shards: every rank takes the same collectives.

Audit finding: the space switch (log-probs renormalised as logits once the vocabulary is cut)
was decided from each shard's own cut, so a rank whose shard was not cut ran the log-prob
checks' all-reduces alone and gloo aborted the process. Reference: the single-process textbook
formula in float64 (tests/torch_reference.py naive_row) on the gathered, cut rows (renormalised
over the kept columns).
"""
import os

import torch

import kldiv.distributed as kd
from torch_reference import naive_row

KINDS = ("forward", "reverse", "js", "jeffreys")
V, CUT = 6, 5  # rank 0 holds columns 0-2, rank 1 columns 3-5: the cut falls in rank 1's shard


def _inputs():
    g = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(3, V, generator=g, dtype=torch.float64), -1)
    b = torch.log_softmax(torch.randn(3, V, generator=g, dtype=torch.float64), -1)
    return a.float(), b.float()


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        a, b = _inputs()
        cols = slice(0, 3) if rank == 0 else slice(3, 6)
        out = {}
        for kind in KINDS:
            for start in (None, 3 * rank):
                xs = a[:, cols].clone().requires_grad_()
                ys = b[:, cols].clone().requires_grad_()
                v = kd.vocab_parallel_kl_div(xs, ys, kind=kind, p_space="log_probs",
                                             q_space="log_probs", vocab_size=CUT,
                                             vocab_start=start, reduction="none")
                out[kind, start] = (v.detach(), *torch.autograd.grad(v.sum(), (xs, ys)))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_cut_inside_one_shard_log_probs():
    from forked_ranks import run_forked

    res = run_forked(_worker, 2)
    a, b = _inputs()
    for kind in KINDS:
        x = a[:, :CUT].double().requires_grad_()
        y = b[:, :CUT].double().requires_grad_()
        ref = torch.stack([naive_row(kind, x[r], y[r], "logits", "logits") for r in range(3)])
        gx, gy = torch.autograd.grad(ref.sum(), (x, y))
        for explicit in (False, True):  # vocab_start looked up, or given
            k0, k1 = ((kind, 0), (kind, 3)) if explicit else ((kind, None), (kind, None))
            v0 = res[0][k0][0]
            assert torch.equal(v0, res[1][k1][0])
            torch.testing.assert_close(v0.double(), ref.detach(), rtol=2e-6, atol=0)
            g = torch.cat([res[0][k0][1], res[1][k1][1]], 1).double()
            h = torch.cat([res[0][k0][2], res[1][k1][2]], 1).double()
            assert torch.all(g[:, CUT:] == 0) and torch.all(h[:, CUT:] == 0)
            for r in range(3):  # per row
                torch.testing.assert_close(g[r, :CUT], gx[r], rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(h[r, :CUT], gy[r], rtol=1e-5, atol=1e-7)
