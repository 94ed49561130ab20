"""Large-vocabulary distillation loss: forward + backward time and extra peak memory, side by side.

Methods (KL(teacher || student) on N x V float32 logits, mean over rows, gradient for the
student's logits), each measured in a fresh subprocess so that its peak memory is its own:

- ``kldiv``: ``kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean",
  validate=False)``, the fused path (C kernel when built), backward;
- ``kldiv (validate)``: the same with the default value checks on (a few passes over the data);
- ``kldiv (torch chunks)``: the fused path with the C kernel switched off (the pure-torch chunked
  fallback that also runs on other devices);
- ``kldiv inplace``: ``kldiv.torch.kl_div_inplace(t, s)``: the gradient overwrites ``s`` during
  the call (no backward pass left to run, no N x V allocation);
- ``torch eager``: ``F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
  reduction="batchmean")``, backward (the same quantity);
- ``torch.compile``: the same function under ``torch.compile``; its first call (compilation)
  is reported separately from the steady state;
- ``kldiv compiled``: the ``kldiv`` call (value checks at their default) inside a function
  compiled by ``torch.compile`` (the C kernel as one operator, ``kldiv::cpu_rows``).

Times: the first call in a fresh process; then the median of ``--repeats`` calls, all methods
in one process called in turn round after round (so that a shared machine's load weighs on
every method alike; torch.compile compiled before the rounds), with the median CPU time
(user + system, all threads: page faults of a fresh gradient buffer count here). Extra peak
memory: the peak resident set size during one call minus the resident size just before it
(the inputs exist already; the student's gradient, one logits tensor, is part of the extra),
read from ``/proc/self/status`` (VmHWM, reset through ``/proc/self/clear_refs``); elsewhere
from ``ru_maxrss`` (then it includes the inputs). The machine may be shared: compare ratios
within one run, not absolute times across runs.

    python benchmarks/large_vocab.py              # N x V = 4096 x 32000 (about 2 minutes)
    python benchmarks/large_vocab.py --quick      # tiny smoke run for CI
    python benchmarks/large_vocab.py --linear     # also linear_kl_div (benchmarks/_linear_bench.py)
    python benchmarks/large_vocab.py --n 256 --v 1000 --methods "torch.compile,kldiv compiled"
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _linear_bench import _reset_peak  # the same VmHWM reset (benchmarks/ is on sys.path)

METHODS = ("kldiv", "kldiv (validate)", "kldiv (torch chunks)", "kldiv inplace", "torch eager",
           "torch.compile", "kldiv compiled")


# ----------------------------------------------------------------------------------------------
# memory probes (Linux /proc; ru_maxrss elsewhere)


def _status_kb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_extra(fn):
    """Peak resident memory during ``fn()`` beyond the resident memory before it, in bytes."""
    import gc

    gc.collect()
    if _reset_peak() and _status_kb("VmRSS") is not None:
        before = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - before) * 1024
    import resource

    fn()  # no reset possible: the peak of the whole process (inputs included)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------
# one method, in its own process


def _make_step(method, t, s_base, torch):
    """``(step, setup)``: ``step()`` does forward + backward once and returns the loss;
    ``setup()`` (not timed) gives it a student whose previous gradient is released."""
    import torch.nn.functional as F

    import kldiv
    from kldiv.backends import torch_fused

    s = s_base.detach().clone().requires_grad_(method != "kldiv inplace")
    state = {"s": s}

    def setup():
        state["s"].grad = None

    if method == "kldiv inplace":
        from kldiv.torch import kl_div_inplace

        def setup():  # noqa: F811  (the student's logits, needed for this loss only)
            state["s"] = None
            state["s"] = s_base.detach().clone()

        def step():
            return kl_div_inplace(t, state["s"], reduction="mean")  # gradient now in state["s"]

        return step, setup
    if method == "kldiv compiled":
        def kl(s, t):
            return kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean")

        kl_c = torch.compile(kl, fullgraph=True)

        def step():
            loss = kl_c(state["s"], t)
            loss.backward()
            return loss

        return step, setup
    if method.startswith("kldiv"):
        validate = method == "kldiv (validate)"
        use_ext = method != "kldiv (torch chunks)"

        def step():
            with torch_fused._extension(use_ext):
                loss = kldiv.kl_div(t, state["s"], p_space="logits", q_space="logits",
                                    reduction="mean", validate=validate)
            loss.backward()
            return loss

        return step, setup

    def loss_fn(s, t):
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                        reduction="batchmean")

    fn = torch.compile(loss_fn) if method == "torch.compile" else loss_fn

    def step():
        loss = fn(state["s"], t)
        loss.backward()
        return loss

    return step, setup


def _inputs(cfg):
    import torch

    torch.set_num_threads(cfg["threads"])
    g = torch.Generator().manual_seed(0)
    n, v = cfg["n"], cfg["v"]
    t = torch.randn(n, v, generator=g) * 2
    s_base = t + torch.randn(n, v, generator=g)  # a student near the teacher
    return torch, t, s_base


def _worker(cfg):
    """A fresh process for one method: its first call and its extra peak memory."""
    torch, t, s_base = _inputs(cfg)
    step, setup = _make_step(cfg["method"], t, s_base, torch)
    setup()
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    value = float(loss.detach())
    setup()
    step()  # steady state before the memory probe (torch.compile's caches are built)
    setup()
    extra = _peak_extra(step)
    return {"first_s": first, "extra_peak": extra, "loss": value}


def _timing_worker(cfg):
    """All methods in one process, called in turn, round after round: on a shared machine the
    load then weighs on every method alike. Median per method over the rounds."""
    torch, t, s_base = _inputs(cfg)
    steps = {m: _make_step(m, t, s_base, torch) for m in cfg["methods"]}
    for m, (step, setup) in steps.items():  # warm-up (compilation included)
        setup()
        step()
    times = {m: [] for m in steps}
    cpu = {m: [] for m in steps}
    for r in range(cfg["repeats"]):
        order = list(steps)[r % len(steps):] + list(steps)[:r % len(steps)]
        for m in order:
            step, setup = steps[m]
            setup()
            c0 = time.process_time()
            t0 = time.perf_counter()
            step()
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
            # the gradient consumed and released, as an optimizer step followed by
            # zero_grad(set_to_none=True) does: no method holds its N x V gradient while
            # another one runs (a held gradient would keep every fused method from reusing a
            # buffer, a situation no training loop is in)
            setup()
    return {m: [statistics.median(times[m]), statistics.median(cpu[m])] for m in steps}


def _run_one(cfg, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    env = dict(os.environ)
    if cfg.get("thp"):
        env["THP_MEM_ALLOC_ENABLE"] = "1"  # torch's CPU allocator asks for huge pages
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"failed: {last[:120]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# the table


def run(args):
    rows = []
    methods = args.methods.split(",") if args.methods else list(METHODS)
    if args.quick and not args.methods:
        methods = [m for m in methods if m not in ("torch.compile", "kldiv compiled")]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    base = {"n": args.n, "v": args.v, "repeats": args.repeats, "threads": args.threads,
            "thp": args.thp}
    for m in methods:
        row = {"method": m}
        row.update(_run_one(dict(base, method=m), args.timeout))
        rows.append(row)
        print(f"  {m}: " + (row["error"] if "error" in row else
                            f"first call {row['first_s']:.3f} s, extra "
                            f"{row['extra_peak'] / 2**20:.0f} MB"), file=sys.stderr, flush=True)
    timed = [r["method"] for r in rows if "error" not in r]
    medians = _run_one(dict(base, methods=timed, timing=True), args.timeout * 2)
    for r in rows:
        if "error" in medians:
            r.setdefault("error", "timing " + medians["error"])
        elif r["method"] in medians:
            r["time_s"], r["cpu_s"] = medians[r["method"]]
    by = {r["method"]: r for r in rows if "time_s" in r}
    logits_bytes = args.n * args.v * 4
    for r in rows:
        if "time_s" not in r:
            continue
        for peer in ("torch eager", "torch.compile"):
            if peer in by:
                r[f"vs {peer}"] = r["time_s"] / by[peer]["time_s"]
        r["extra/logits"] = r["extra_peak"] / logits_bytes
    return rows


def format_table(rows):
    head = ("method", "first call s", "median s", "x eager", "x compile", "CPU s",
            "extra peak MB", "extra / logits")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} |" + " |" * (len(head) - 2))
            continue

        def ratio(key):
            return f"{r[key]:.3f}" if key in r else "-"

        lines.append("| " + " | ".join([
            r["method"], f"{r['first_s']:.3f}", f"{r['time_s']:.3f}", ratio("vs torch eager"),
            ratio("vs torch.compile"), f"{r['cpu_s']:.3f}", f"{r['extra_peak'] / 2**20:.0f}",
            f"{r['extra/logits']:.2f}",
        ]) + " |")
    return "\n".join(lines)


def _linear_section(args):
    """benchmarks/_linear_bench.py (linear_kl_div), when present."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    try:
        import _linear_bench
    except ImportError:
        print("\nlinear_kl_div: benchmarks/_linear_bench.py not found; skipped")
        return
    largv = ["--quick"] if args.quick else ["--n", str(args.linear_n), "--v", str(args.linear_v),
                                            "--h", str(args.linear_h)]
    largs = _linear_bench._parser().parse_args(largv + ["--threads", str(args.threads)])
    if args.quick:
        largs.n, largs.v, largs.h, largs.repeats, largs.rounds = 512, 4096, 256, 1, 1
    print(f"\nlinear_kl_div: N={largs.n} V={largs.v} H={largs.h} float32 "
          f"(one logits tensor = {largs.n * largs.v * 4 / 2**20:.0f} MB)")
    rows = _linear_bench.run_linear(largs)
    print(_linear_bench.format_table(rows))


def _parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="rows (tokens)")
    ap.add_argument("--v", type=int, default=32000, help="vocabulary size")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls after the first")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's default)")
    ap.add_argument("--methods", default="", help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per method")
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run (N=64, V=1000, 2 repeats, no torch.compile)")
    ap.add_argument("--thp", action="store_true",
                    help="run every method with THP_MEM_ALLOC_ENABLE=1 (transparent huge pages "
                         "for torch's large CPU allocations: fewer page faults)")
    ap.add_argument("--linear", action="store_true",
                    help="also benchmark linear_kl_div (N x V = 8192 x 128256, hidden 2048)")
    ap.add_argument("--linear-n", type=int, default=8192, dest="linear_n")
    ap.add_argument("--linear-v", type=int, default=128256, dest="linear_v")
    ap.add_argument("--linear-h", type=int, default=2048, dest="linear_h")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        print(json.dumps(_timing_worker(cfg) if cfg.get("timing") else _worker(cfg)))
        return 0
    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.quick:
        args.n, args.v, args.repeats = 64, 1000, 2
    try:
        from kldiv._ext import _fused  # noqa: F401

        ext = "built"
    except ImportError:
        ext = "NOT built (pure-torch fallback)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"large-vocabulary KL, forward + backward: N={args.n} V={args.v} float32, "
          f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load average {load:.1f}, C kernel {ext}{', THP on' if args.thp else ''}; "
          f"one logits tensor = "
          f"{args.n * args.v * 4 / 2**20:.0f} MB; median of {args.repeats}")
    rows = run(args)
    print(format_table(rows))
    if args.linear or args.quick:
        _linear_section(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
