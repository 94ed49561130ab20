"""Everyday sizes: kldiv against the one-line call it replaces, on torch, JAX and NumPy.

Training loops with a KL term (VAE, RL trust regions, classifier distillation) call the loss at
64 x 10 to 32 x 32000, thousands of times. This script measures kldiv there against the peer a
user would otherwise write, in one process, with the methods taking turns round by round
(interleaved, so that a slow phase of a shared machine hits every method alike), and prints the
median time of each and the ratio kldiv / peer (below 1: kldiv is faster). Value checks are ON
(kldiv's default) unless a row says otherwise.

torch (CPU), forward + backward; peer:
  F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="sum") / rows
  kldiv logits     kl_div(t, s, p_space="logits", q_space="logits", reduction="mean")
  kldiv migration  kl_div(F.softmax(t, -1), F.log_softmax(s, -1), q_space="log_probs",
                   reduction="mean")   (the README's migration row)
  reverse / JS / Jeffreys: kldiv's function against its obvious torch formula (log_softmax,
  softmax, the sum written out; JS with m = (p + q) / 2).
  memory: extra peak resident memory of forward + backward for the migration row at
  512 x 32000 and up, as a multiple of one input tensor (Linux VmHWM).
JAX (CPU, jax.jit), value and value_and_grad with respect to the student's logits; peer:
  optax.losses.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t)).mean()
  Both methods AOT-compiled the same way and called on the same arrays; a sample is K calls
  dispatched back to back, the last one waited for, K chosen so that a sample lasts 50 ms
  (a 64 x 10 call is tens of microseconds, mostly dispatch); every round each pair runs
  optax, kldiv, kldiv, optax; the ratio is the median of the paired ratios (kldiv sample /
  the optax sample next to it), printed with its quartiles. Compile time of value_and_grad:
  tracing + lowering + XLA compilation of a fresh jit after jax.clear_caches() (nothing of an
  earlier compile reused), max(3, rounds) of each, taking turns, paired ratios, median; wall
  time and the process's CPU time (which a busy machine barely moves).
NumPy: kldiv.kl_div(p, q) (per-row KL of probabilities) against
  scipy.special.rel_entr(p, q).sum(-1), float32 and float64.

Run:  python benchmarks/everyday.py                  (all sections; about 10 minutes)
      python benchmarks/everyday.py --only torch     (or jax, numpy, memory)
      python benchmarks/everyday.py --only torch --shapes 64x10,256x1000   (some torch shapes)
      python benchmarks/everyday.py --quick          (small smoke run, used by the test suite)
Unset OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE only if you know your CPU needs it (see env notes).
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

TORCH_SHAPES = [(64, 10), (256, 1000), (4, 64, 1000), (32, 32000), (33, 32000), (4096, 32000)]
JAX_SHAPES = [(64, 10), (256, 1000), (32, 32000), (256, 32000)]
NUMPY_SHAPES = [(1000, 1000), (100, 100000)]
MEMORY_SHAPES = [(512, 32000), (2048, 32000)]


# ----------------------------------------------------------------------------------------------
# timing: interleaved rounds, medians


def _calibrate(fn, target_s):
    """Inner repetitions so that one sample lasts about ``target_s`` (timer noise negligible)."""
    fn()  # warm-up (first-call costs are not what this table measures)
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(target_s / dt))


def interleaved(methods, rounds, target_s):
    """Median seconds per call of each method; methods take turns within every round."""
    reps = {k: _calibrate(f, target_s) for k, f in methods.items()}
    samples = {k: [] for k in methods}
    names = list(methods)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            f, n = methods[k], reps[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in samples.items()}


def _fmt_t(s):
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


class _Table:
    """A Markdown table printed row by row (a long run shows its results as they come)."""

    def __init__(self, head, width=12):
        self.widths = [max(len(h), width) for h in head]
        print(self._line(head))
        print("|" + "|".join("-" * (w + 2) for w in self.widths) + "|", flush=True)

    def _line(self, r):
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(r, self.widths)) + " |"

    def add(self, row):
        print(self._line(row), flush=True)

    def close(self):
        print(flush=True)


def _table(head, rows):
    t = _Table(head)
    for r in rows:
        t.add(r)
    t.close()


def _shape_str(shape):
    return " x ".join(map(str, shape))


# ----------------------------------------------------------------------------------------------
# torch


def torch_section(shapes, rounds, target_s):
    import torch
    import torch.nn.functional as F

    import kldiv

    torch.manual_seed(0)
    print(f"## torch {torch.__version__}, CPU, {torch.get_num_threads()} threads: "
          "forward + backward, median per call (ratio = kldiv / peer)\n")
    table = _Table(["shape", "F.kl_div peer", "x logits call", "x migration row", "x reverse",
                    "x JS", "x Jeffreys"])
    for shape in shapes:
        n = 1
        for s_ in shape[:-1]:
            n *= s_
        t = torch.randn(shape) * 2
        s0 = torch.randn(shape) * 2
        s = s0.clone().requires_grad_(True)

        def run(loss_fn):
            def f():
                s.grad = None
                loss_fn().backward()
            return f

        def peer_kl():
            return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="sum") / n

        def kl_logits():
            return kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean")

        def kl_migration():
            return kldiv.kl_div(F.softmax(t, -1), F.log_softmax(s, -1), q_space="log_probs",
                                reduction="mean")

        def peer_rev():
            lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
            return (lq.exp() * (lq - lp)).sum() / n

        def kl_rev():
            return kldiv.reverse_kl(t, s, p_space="logits", q_space="logits", reduction="mean")

        def peer_js():
            p, q = F.softmax(t, -1), F.softmax(s, -1)
            lm = ((p + q) / 2).log()
            return 0.5 * ((p * (p.log() - lm)).sum() + (q * (q.log() - lm)).sum()) / n

        def kl_js():
            return kldiv.js_div(t, s, p_space="logits", q_space="logits", reduction="mean")

        def peer_jef():
            lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
            return ((lp.exp() - lq.exp()) * (lp - lq)).sum() / n

        def kl_jef():
            return kldiv.jeffreys_div(t, s, p_space="logits", q_space="logits",
                                      reduction="mean")

        methods = {
            "peer KL": run(peer_kl), "KL logits": run(kl_logits),
            "KL migration": run(kl_migration),
            "peer reverse": run(peer_rev), "reverse": run(kl_rev),
            "peer JS": run(peer_js), "JS": run(kl_js),
            "peer Jeffreys": run(peer_jef), "Jeffreys": run(kl_jef),
        }
        big = t.numel() >= 4096 * 32000
        med = interleaved(methods, max(3, rounds // 2) if big else rounds, target_s)
        table.add([
            _shape_str(shape), _fmt_t(med["peer KL"]),
            f"{med['KL logits'] / med['peer KL']:.2f}",
            f"{med['KL migration'] / med['peer KL']:.2f}",
            f"{med['reverse'] / med['peer reverse']:.2f}",
            f"{med['JS'] / med['peer JS']:.2f}",
            f"{med['Jeffreys'] / med['peer Jeffreys']:.2f}",
        ])
        del t, s, s0
        gc.collect()
    table.close()


# ----------------------------------------------------------------------------------------------
# memory (torch, migration row): each measurement in a fresh process


def _memory_worker(shape):
    import torch
    import torch.nn.functional as F

    import kldiv
    from _linear_bench import _reset_peak

    def status_kb(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    torch.manual_seed(0)
    p = F.softmax(torch.randn(shape), -1)
    lq = F.log_softmax(torch.randn(shape), -1).requires_grad_(True)
    one = p.numel() * p.element_size()
    # warm-up on a small input (library code and thread pools are not the loss's memory)
    kldiv.kl_div(p[:2], lq[:2], q_space="log_probs", reduction="mean").backward()
    lq.grad = None
    gc.collect()
    _reset_peak()
    before = status_kb("VmRSS")
    loss = kldiv.kl_div(p, lq, q_space="log_probs", reduction="mean")
    loss.backward()
    extra = (status_kb("VmHWM") - before) * 1024
    print(f"{extra / one:.2f}")


def memory_section(shapes):
    import subprocess

    print("## torch, migration row `kl_div(p, log_q, q_space=\"log_probs\", reduction=\"mean\")`"
          ": extra peak memory of forward + backward (the gradient included), in units of one "
          "input tensor\n")
    rows = []
    for shape in shapes:
        res = subprocess.run(
            [sys.executable, __file__, "--memory-worker", *map(str, shape)],
            capture_output=True, text=True, timeout=600)
        val = res.stdout.strip().splitlines()[-1] if res.returncode == 0 else "failed"
        rows.append([_shape_str(shape), val, "<= 1.1"])
    _table(["shape", "extra peak / one input", "target"], rows)


# ----------------------------------------------------------------------------------------------
# JAX


def _jax_pairs_timed(pairs, rounds, target_s):
    """Per label of ``pairs`` (label -> (optax call, kldiv call), each a zero-argument callable
    that dispatches one jitted call and returns its output): the median seconds per call of
    each, and the median and quartiles of the paired ratios kldiv / optax.

    Both methods get the same treatment: the same number K of calls per sample (K chosen so
    that a sample lasts ``target_s``, at least 20 ms: a 64 x 10 call is tens of microseconds,
    mostly dispatch, which timer resolution and scheduler hiccups would swamp one call at a
    time), the calls dispatched back to back and only the last one waited for (as a training
    loop does), the garbage collector off while a sample runs. Every round, every label's
    methods take turns in the order optax, kldiv, kldiv, optax (a slow phase of a shared machine
    or a cache warmed by the previous sample favours neither), and each kldiv sample is divided
    by the optax sample next to it: two paired ratios per label and round.
    """
    import jax

    def sample(f, k):
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(k - 1):
                f()
            jax.block_until_ready(f())
            return (time.perf_counter() - t0) / k
        finally:
            gc.enable()

    floor = max(target_s, 0.02) if target_s >= 0.01 else target_s
    reps = {}
    for label, (peer, ours) in pairs.items():
        for f in (peer, ours):  # warm-up: first calls, buffers, thread pools
            jax.block_until_ready(f())
            sample(f, 3)
        per_call = min(sample(peer, 3), sample(ours, 3))
        reps[label] = max(1, math.ceil(floor / max(per_call, 1e-7)))
    times = {label: ([], []) for label in pairs}
    ratios = {label: [] for label in pairs}
    labels = list(pairs)
    for r in range(rounds):
        gc.collect()
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            (peer, ours), k = pairs[label], reps[label]
            a1 = sample(peer, k)
            b1 = sample(ours, k)
            b2 = sample(ours, k)
            a2 = sample(peer, k)
            times[label][0].extend((a1, a2))
            times[label][1].extend((b1, b2))
            ratios[label].extend((b1 / a1, b2 / a2))
    return {label: (statistics.median(times[label][0]), statistics.median(times[label][1]),
                    *_median_quartiles(ratios[label])) for label in pairs}


def _median_quartiles(v):
    """Median, first and third quartile of ``v`` (the quartiles of two values are the values)."""
    v = sorted(v)
    if len(v) < 4:
        return statistics.median(v), v[0], v[-1]
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q2, q1, q3


def _jax_compile_timed(fns, args, repeats):
    """Compile time of each of ``fns`` (name -> function): lowering + XLA compilation of a fresh
    ``jax.jit(jax.value_and_grad(f))``, tracing included. Every repeat starts from empty caches
    (``jax.clear_caches()``: no trace, lowering or executable of an earlier repeat, or of the
    other method's library calls, is reused; kldiv's own inner ``jax.jit`` is traced again too),
    the methods take turns (order alternating), and each kldiv compile is divided by the optax
    compile next to it. Returns the medians and quartiles of those paired ratios in wall time
    and in the process's CPU time (all threads: the compiler runs on this process's threads, so
    other jobs on a shared machine barely move it)."""
    import jax

    names = list(fns)  # [optax, kldiv]
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            jax.clear_caches()
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            jax.jit(jax.value_and_grad(fns[name])).lower(*args).compile()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    peer, ours = names
    return (_median_quartiles([b / a for a, b in zip(wall[peer], wall[ours])]),
            _median_quartiles([b / a for a, b in zip(cpu[peer], cpu[ours])]))


def jax_section(shapes, rounds, target_s):
    import jax
    import optax

    import kldiv

    print(f"## JAX {jax.__version__}, CPU, under jax.jit (ratio = kldiv / optax: the median of "
          "paired, interleaved samples; [q1-q3]: their quartiles)\n")
    table = _Table(["shape", "optax value", "x value", "optax value_and_grad",
                    "x value_and_grad", "x compile (grad)", "x compile, CPU time",
                    "spread [q1-q3]: value; grad; compile"])

    def peer(s, t):
        return optax.losses.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t)).mean()

    def ours(s, t):
        return kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean")

    for shape in shapes:
        k1, k2 = jax.random.split(jax.random.PRNGKey(0))
        t = jax.random.normal(k1, shape) * 2
        s = jax.random.normal(k2, shape) * 2
        jax.block_until_ready((s, t))
        # first compiles (one-time costs: imports, kldiv's backend loading) out of the way
        for f in (peer, ours):
            jax.jit(jax.value_and_grad(f)).lower(s, t).compile()
        # compile time: paired fresh compiles, max(3, rounds) of each method
        comp_wall, comp_cpu = _jax_compile_timed({"optax": peer, "kldiv": ours}, (s, t),
                                                 max(3, rounds))
        # run time: the same inputs, the same jit wrapping (an AOT-compiled executable, no
        # donation) for both methods
        pairs = {}
        for mode in ("value", "grad"):
            calls = []
            for f in (peer, ours):
                g = f if mode == "value" else jax.value_and_grad(f)
                compiled = jax.jit(g).lower(s, t).compile()
                calls.append(functools.partial(compiled, s, t))
            pairs[mode] = tuple(calls)
        res = _jax_pairs_timed(pairs, rounds, target_s)

        def spread(q):
            return f"{q[1]:.2f}-{q[2]:.2f}"

        table.add([
            _shape_str(shape), _fmt_t(res["value"][0]), f"{res['value'][2]:.2f}",
            _fmt_t(res["grad"][0]), f"{res['grad'][2]:.2f}",
            f"{comp_wall[0]:.2f}", f"{comp_cpu[0]:.2f}",
            f"{spread(res['value'][2:])}; {spread(res['grad'][2:])}; {spread(comp_wall)}",
        ])
        del pairs, s, t
        gc.collect()
    table.close()


# ----------------------------------------------------------------------------------------------
# NumPy


def numpy_section(shapes, rounds, target_s):
    import scipy
    import scipy.special

    import kldiv

    print(f"## NumPy {np.__version__}, probabilities, per-row KL (ratio = kldiv / "
          f"scipy {scipy.__version__} rel_entr(p, q).sum(-1)); value checks on\n")
    rows = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        for dt in (np.float32, np.float64):
            p = rng.random(shape).astype(dt) ** 3
            q = rng.random(shape).astype(dt) ** 3
            p /= p.sum(-1, keepdims=True)
            q /= q.sum(-1, keepdims=True)
            methods = {
                "scipy": lambda: scipy.special.rel_entr(p, q).sum(-1),
                "kldiv": lambda: kldiv.kl_div(p, q),
                "kldiv nocheck": lambda: kldiv.kl_div(p, q, validate=False),
            }
            med = interleaved(methods, rounds, target_s)
            rows.append([_shape_str(shape), np.dtype(dt).name, _fmt_t(med["scipy"]),
                         f"{med['kldiv'] / med['scipy']:.2f}",
                         f"{med['kldiv nocheck'] / med['scipy']:.2f}"])
    _table(["shape", "dtype", "rel_entr", "x kldiv", "x kldiv validate=False"], rows)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    ap.add_argument("--only", choices=["torch", "jax", "numpy", "memory"], action="append",
                    help="run only these sections (repeatable)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (median)")
    ap.add_argument("--shapes", default=None,
                    help="torch only: comma-separated shapes to run, e.g. 64x10,256x1000")
    ap.add_argument("--memory-worker", type=int, nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        _memory_worker(tuple(args.memory_worker))
        return 0
    sections = args.only or ["torch", "jax", "numpy", "memory"]
    rounds = args.rounds or (3 if args.quick else 11)
    target = 0.002 if args.quick else 0.05
    print(f"# kldiv everyday-size benchmark: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{rounds} interleaved rounds, medians\n")
    if "torch" in sections:
        shapes = TORCH_SHAPES[:2] if args.quick else TORCH_SHAPES
        if args.shapes:
            shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
        torch_section(shapes, rounds, target)
    if "jax" in sections:
        jax_section(JAX_SHAPES[:1] if args.quick else JAX_SHAPES, rounds, target)
    if "numpy" in sections:
        numpy_section([(50, 100)] if args.quick else NUMPY_SHAPES, rounds, target)
    if "memory" in sections:
        memory_section([(64, 1000)] if args.quick else MEMORY_SHAPES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
