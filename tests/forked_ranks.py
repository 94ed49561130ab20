"""Gloo ranks forked from the test process (imported by test files, never collected).

``run_forked(worker, world)`` forks ``world`` processes that each call
``worker(rank, world, init_file, out_dir)``; the worker saves its results to
``out_dir/rank{rank}.pt``. Returns the loaded results of every rank, or skips the test on
platforms without fork. Forking (no second import of torch) keeps a launch to a fraction of a
second on a busy 2-core machine; the workers run torch only, so JAX's fork warning is silenced.
"""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch


def _child(worker, rank, world, init_file, out_dir):
    try:
        worker(rank, world, init_file, out_dir)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def run_forked(worker, world, timeout=120):
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():  # pragma: no cover
        pytest.skip("needs fork (the gloo launch of test_distributed.py covers the rest)")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_child, args=(worker, r, world, init_file, d))
                 for r in range(world)]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
            for p in procs:
                p.start()
        try:
            for p in procs:
                p.join(timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        assert not bad, f"workers failed (rank, exit code): {bad}"
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
