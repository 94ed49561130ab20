"""Vocabulary-parallel KL on 1, 2 and 4 gloo ranks of this machine: time and bytes communicated.

Every rank holds ``rows x V/W`` float32 logits of the teacher and of the student (uneven when W
does not divide V). Measured, forward + backward, median over repeats of the slowest rank:

* ``vocab_parallel_kl_div`` and ``vocab_parallel_js_div`` (``kldiv.distributed``): a few
  numbers per row are all-reduced, the backward is local;
* ``vocab_parallel_linear_kl_div``: the output layer (``hidden x V/W`` weight slice) fused
  with the loss, plus the all-reduce of ``grad_hidden``;
* the peer "gather + kldiv.kl_div": all-gather both shards, then the single-process function
  on the full rows (what one writes without a vocabulary-parallel loss);
* on one rank, ``kldiv.kl_div`` and ``torch.nn.functional.kl_div`` on the full rows.

Bytes are the payloads handed to the collectives by one rank (a ring all-reduce moves about
``2 (W - 1) / W`` times that; an all-gather receives ``(W - 1) / W`` of its output). Ranks run
one thread each; with 4 ranks on a 2-core machine they share cores, so the time there measures
oversubscription as much as the algorithm. The point of the table is the communication column.

Run: ``python benchmarks/distributed.py`` (``--quick`` for a smoke run). The same code under
torchrun, for a real cluster (one process per GPU, nccl)::

    # kl_tp.py -- torchrun --nproc-per-node 2 kl_tp.py
    import torch, torch.distributed as dist
    import kldiv.distributed as kd

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    g = torch.Generator().manual_seed(0)                  # same full tensors on every rank
    teacher = torch.randn(8, 1000, generator=g)
    student = torch.randn(8, 1000, generator=g)
    lo, hi = rank * 1000 // world, (rank + 1) * 1000 // world
    t = teacher[:, lo:hi].to(dev)
    s = student[:, lo:hi].to(dev).requires_grad_()
    loss = kd.vocab_parallel_kl_div(t, s, reduction="mean")   # same value on every rank
    loss.backward()                                             # s.grad = (q - p)[:, lo:hi] / 8
    print(rank, float(loss))
    dist.destroy_process_group()
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _bounds(v, world, rank):
    return rank * v // world, (rank + 1) * v // world


def _worker(rank, world, init_file, args, queue):
    import torch
    import torch.distributed as dist

    import kldiv
    import kldiv.distributed as kd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    rows, v, hid = args.rows, args.vocab, args.hidden
    g = torch.Generator().manual_seed(0)
    p_full = torch.randn(rows, v, generator=g)
    q_full = p_full + 0.5 * torch.randn(rows, v, generator=g)
    h = torch.randn(rows, hid, generator=g)
    w_full = torch.randn(v, hid, generator=g) / hid**0.5
    lo, hi = _bounds(v, world, rank)
    p = p_full[:, lo:hi].contiguous()
    q = q_full[:, lo:hi].contiguous()
    w = w_full[lo:hi].contiguous()
    t_lin = (h @ w_full.T)[:, lo:hi].contiguous() + 0.1
    del p_full, q_full, w_full

    def vp_kl():
        qq = q.clone().requires_grad_()
        kd.vocab_parallel_kl_div(p, qq, validate=False).backward()

    def vp_js():
        qq = q.clone().requires_grad_()
        kd.vocab_parallel_js_div(p, qq, validate=False).backward()

    def vp_linear():
        hh = h.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        kd.vocab_parallel_linear_kl_div(hh, ww, t_lin, chunk_size=args.chunk,
                                        validate=False).backward()

    gather_bytes = [0]

    def gather_kl():
        ps = [torch.empty(rows, b - a) for a, b in (_bounds(v, world, r) for r in range(world))]
        qs = [torch.empty_like(t) for t in ps]
        if world > 1:  # all_gather needs equal sizes: pad to the widest slice
            width = max(t.shape[1] for t in ps)
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
            bp = [torch.empty(rows, width) for _ in range(world)]
            bq = [torch.empty(rows, width) for _ in range(world)]
            dist.all_gather(bp, pad(p))
            dist.all_gather(bq, pad(q))
            gather_bytes[0] = 2 * world * rows * width * 4
            ps = [b[:, : t.shape[1]] for b, t in zip(bp, ps)]
            qs = [b[:, : t.shape[1]] for b, t in zip(bq, qs)]
        else:
            ps, qs = [p], [q]
        qf = torch.cat(qs, 1).requires_grad_()
        kldiv.kl_div(torch.cat(ps, 1), qf, p_space="logits", q_space="logits",
                     reduction="mean", validate=False).backward()

    def torch_kl():
        qq = q.clone().requires_grad_()
        torch.nn.functional.kl_div(torch.log_softmax(qq, -1), torch.log_softmax(p, -1),
                                   log_target=True, reduction="batchmean").backward()

    cases = [("vocab_parallel_kl_div", vp_kl), ("vocab_parallel_js_div", vp_js),
             ("vocab_parallel_linear_kl_div", vp_linear), ("gather + kldiv.kl_div", gather_kl)]
    if world == 1:
        cases.append(("torch.nn.functional.kl_div", torch_kl))
    results = []
    for name, fn in cases:
        fn()  # warm-up
        with kd.count_collectives() as c:
            gather_bytes[0] = 0
            fn()
        calls, nbytes = c["calls"], c["bytes"] + gather_bytes[0]
        if name.startswith("gather") and world > 1:
            calls = 2
        times = []
        for _ in range(args.repeat):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times.append(float(dt))
        results.append((name, statistics.median(times), calls, nbytes))
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def run_world(world, args):
    import multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, args, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        out = queue.get(timeout=1800)
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a worker of world {world} failed")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 repeats (smoke run)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=128, help="chunk_size of the fused layer")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--worlds", default="1,2,4")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.vocab, args.hidden, args.chunk, args.repeat = 32, 2048, 64, 16, 3
    worlds = [int(w) for w in args.worlds.split(",")]
    print(f"rows={args.rows} vocab={args.vocab} hidden={args.hidden} float32, forward + "
          f"backward, median of {args.repeat} (slowest rank), gloo on {os.cpu_count()} cores, "
          "1 thread per rank", flush=True)
    table = {}
    for w in worlds:
        table[w] = run_world(w, args)
    base = {name: t for name, t, _, _ in table.get(1, [])}
    ref = base.get("gather + kldiv.kl_div")  # on one rank: plain kldiv.kl_div
    print()
    print(f"{'ranks':>5} | {'method':<30} | {'median ms':>9} | {'vs 1-rank kl_div':>16} | "
          f"{'collectives':>11} | {'bytes/call':>12} | {'bytes/row':>9}")
    print("-" * 112)
    for w in worlds:
        for name, t, calls, nbytes in table[w]:
            ratio = f"{t / ref:.2f}x" if ref else "-"
            print(f"{w:>5} | {name:<30} | {t * 1e3:>9.2f} | {ratio:>16} | {calls:>11} | "
                  f"{nbytes:>12,} | {nbytes / args.rows:>9,.0f}")
    print("\n(1 rank: 'gather + kldiv.kl_div' is plain kldiv.kl_div; the fused layer's bytes "
          "include grad_hidden, rows x hidden x 4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
