"""Gloo ranks forked from the test process (imported by test files, never collected).

``run_forked(worker, world)`` forks ``world`` processes that each call
``worker(rank, world, init_file, out_dir)``; the worker saves its results to
``out_dir/rank{rank}.pt``. Returns the loaded results of every rank. Forking (no second import
of torch) keeps a launch to a fraction of a second on a busy 2-core machine; the workers run
torch only, so JAX's fork warning is silenced.

Platforms without fork: with ``script``, each rank runs ``python script rank world init_file
out_dir`` instead (``env(rank)``, if given, added to its environment; the script's own
``__main__`` does what ``worker`` does); a rank that writes no results file returns
``{"log": its output}``. Without ``script`` the test is skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
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


def _results(d, world, logs=None):
    out = []
    for r in range(world):
        path = os.path.join(d, f"rank{r}.pt")
        if os.path.exists(path) or logs is None:
            out.append(torch.load(path))
        else:
            out.append({"log": logs[r]})
    return out


def _preload():
    """Modules torch imports lazily on a worker's first backward (autograd's ``_make_grads``
    loads torch.fx's symbolic shapes, and sympy with it: seconds per process on a busy 2-core
    machine), imported once here so that every forked rank inherits them."""
    try:
        import torch.fx.experimental.symbolic_shapes  # noqa: F401
    except ImportError:  # pragma: no cover
        pass


def _run_forked(worker, world, timeout, init_file, d):
    import multiprocessing as mp

    _preload()
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
    return _results(d, world)


def _run_scripts(script, world, timeout, init_file, d, env):  # pragma: no cover - no fork
    base = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, script, str(r), str(world), init_file, d],
                              env=dict(base, **(env(r) if env else {})),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    assert not bad, f"workers failed: {bad}\n" + "\n".join(logs)[-4000:]
    return _results(d, world, logs)


def run_forked(worker, world, timeout=120, script=None, env=None):
    """The results of ``worker`` on ``world`` gloo ranks (loopback only); see the module."""
    import multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        if "fork" in mp.get_all_start_methods():
            return _run_forked(worker, world, timeout, init_file, d)
        if script is None:  # pragma: no cover
            pytest.skip("needs fork")
        return _run_scripts(script, world, timeout, init_file, d, env)  # pragma: no cover
