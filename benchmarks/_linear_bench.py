"""Benchmark of kldiv.torch.linear_kl_div: forward + backward time and extra peak memory.

Peers measured side by side in one run, each in a fresh subprocess (so that the peak resident
memory belongs to that method alone: Linux's VmHWM, reset through /proc/self/clear_refs once
the inputs exist):

- ``linear_kl_div``: kldiv's chunked loss fused with the output layer;
- ``naive``: torch eager, ``F.linear`` then ``F.kl_div(log_softmax(z), log_softmax(t),
  log_target=True, reduction="batchmean")`` (forward KL; reverse swaps the two), backward;
- ``linear+kldiv``: ``F.linear`` then ``kldiv.kl_div`` (its fused loss) on the materialised
  logits, backward;
- ``matmuls``: the three matmuls of forward and backward alone (``z = h W^T + b``,
  ``dh = G W``, ``dW = G^T h``, with a precomputed G), the floor any method pays;
- ``kldiv loss``: kldiv's fused loss forward + backward on precomputed logits.

The time target of issue 3 is ``linear_kl_div <= 1.1 x (matmuls + kldiv loss)``; the memory
target is an extra peak <= 0.25 x one float32 N x V logits tensor, counted beyond the inputs and
the gradients that the call returns (``hidden.grad``, ``weight.grad``, ``bias.grad``, which every
method must produce). Times are medians over all timed calls (one warm-up call per process).

Run on its own: ``python benchmarks/_linear_bench.py --quick`` (a small smoke run) or
``python benchmarks/_linear_bench.py --n 2048 --v 32000 --h 1024``; the default size is
N x V = 8192 x 128256 with H = 2048, which needs about 10 GB and minutes per call on 2 cores.
Methods take turns (``--rounds`` processes each, interleaved) so that noise from other work on
the machine hits them alike. Methods whose estimated memory exceeds what the machine has
available are skipped and said so.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("linear_kl_div", "naive", "linear+kldiv", "matmuls", "kldiv loss")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak():
    """Reset the peak resident size (VmHWM) to the current one; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes():
    """Peak resident size since the last reset (VmHWM), else the lifetime peak (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return None


def _estimate_bytes(method, n, v, h, item, topk):
    """A rough upper estimate of a method's resident memory (inputs included), for skipping."""
    logits = n * v * 4
    inputs = (n * h + v * h + v) * item + (0 if topk else n * v * item)
    grads = (n * h + v * h + v) * 4
    extra = {"linear_kl_div": 0.3 * logits, "naive": 6 * logits, "linear+kldiv": 3 * logits,
             "matmuls": 2 * logits, "kldiv loss": 3 * logits}[method]
    return inputs + grads + extra + (300 << 20)


# ----------------------------------------------------------------------------------------------
# one method, in a worker process


def _touch_code_paths(torch, F, kldiv, linear_kl_div):
    """Run every method once on tiny inputs, so that lazy imports do not count as extra memory."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 8, generator=g, requires_grad=True)
    W = torch.randn(16, 8, generator=g, requires_grad=True)
    t = torch.randn(4, 16, generator=g)
    linear_kl_div(h, W, t).backward()
    linear_kl_div(h, W, (torch.arange(4).repeat(4, 1), torch.full((4, 4), -2.0))).backward()
    z = F.linear(h, W)
    kldiv.kl_div(t, z, p_space="logits", q_space="logits", reduction="mean").backward()
    F.kl_div(torch.log_softmax(F.linear(h, W), -1), torch.log_softmax(t, -1), log_target=True,
             reduction="batchmean").backward()


def _worker(cfg):
    import torch
    import torch.nn.functional as F

    import kldiv
    from kldiv.torch import linear_kl_div

    torch.set_num_threads(cfg["threads"])
    n, v, h, method = cfg["n"], cfg["v"], cfg["h"], cfg["method"]
    dt = getattr(torch, cfg["dtype"])
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g, dtype=dt).requires_grad_(True)
    W = torch.randn(v, h, generator=g, dtype=dt).mul_(h**-0.5).requires_grad_(True)
    b = torch.zeros(v, dtype=dt).requires_grad_(True)
    if cfg["topk"]:
        k = cfg["topk"]
        idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(min(n, 64))])
        idx = idx.repeat((n + 63) // 64, 1)[:n].contiguous()
        lp = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)[:, :k].contiguous()
        target = (idx, lp)
    else:
        target = torch.randn(n, v, generator=g, dtype=dt).mul_(2.0)
    kind = cfg["divergence"]
    fn = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div}[kind]
    pre = {}
    if method in ("matmuls", "kldiv loss"):
        with torch.no_grad():
            pre["z"] = F.linear(hid, W, b).float()
            pre["G"] = torch.randn(n, v, generator=g).mul_(1e-3)

    def call():
        for x in (hid, W, b):
            x.grad = None
        if method == "linear_kl_div":
            loss = linear_kl_div(hid, W, target, bias=b, divergence=kind,
                                 chunk_size=cfg["chunk_size"])
            loss.backward()
        elif method == "naive":
            z = F.linear(hid, W, b).float()
            if cfg["topk"]:
                raise ValueError("naive: dense targets only")
            ls, lt = torch.log_softmax(z, -1), torch.log_softmax(target.float(), -1)
            if kind == "forward":
                loss = F.kl_div(ls, lt, log_target=True, reduction="batchmean")
            elif kind == "reverse":
                loss = F.kl_div(lt, ls, log_target=True, reduction="batchmean")
            else:
                raise ValueError("naive: forward and reverse only")
            loss.backward()
        elif method == "linear+kldiv":
            if cfg["topk"]:
                raise ValueError("linear+kldiv: dense targets only")
            z = F.linear(hid, W, b)
            loss = fn(target, z, p_space="logits", q_space="logits", reduction="mean",
                      validate=False)
            loss.backward()
        elif method == "matmuls":
            with torch.no_grad():
                hd, Wd = hid.detach(), W.detach()
                torch.addmm(b.detach(), hd, Wd.T)
                G = pre["G"].to(dt)
                hid.grad = G @ Wd
                W.grad = G.T @ hd
                b.grad = G.sum(0)
        elif method == "kldiv loss":
            if cfg["topk"]:
                raise ValueError("kldiv loss: dense targets only")
            z = pre["z"].detach().requires_grad_(True)
            loss = fn(target, z, p_space="logits", q_space="logits", reduction="mean",
                      validate=False)
            loss.backward()

    import gc

    _touch_code_paths(torch, F, kldiv, linear_kl_div)
    gc.collect()
    base = _rss_bytes()
    _reset_peak()  # earlier transients (making the inputs) must not count
    times = []
    for i in range(cfg["repeats"] + 1):
        t0 = time.perf_counter()
        call()
        if i or not cfg["repeats"]:  # --repeats 0: time the only (first) call
            times.append(time.perf_counter() - t0)
    peak = _peak_bytes()
    grads = sum(x.grad.numel() * x.grad.element_size() for x in (hid, W, b)
                if x.grad is not None) if method != "kldiv loss" else n * v * 4
    return {"times": times, "extra_peak": peak - base,
            "extra_peak_excl_grads": peak - base - grads}


# ----------------------------------------------------------------------------------------------
# the driver


def _run_one(cfg):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    # glibc returns freed blocks above this size to the system at once; without it, its dynamic
    # threshold makes the peak resident size depend on the order of earlier frees (measured here:
    # 42 or 110 MB for the same call), with it the peak follows the live tensors
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_linear(args):
    """Measure every method at ``args``' size; a list of row dicts (one per method).

    The methods take turns: ``args.rounds`` rounds, each running every method once in a fresh
    process (one warm-up call, then ``args.repeats`` timed calls), so that a noisy neighbour on a
    shared machine slows all of them alike. Time: the median over all timed calls; memory: the
    largest extra peak seen.
    """
    item = 2 if args.dtype in ("bfloat16", "float16") else (8 if args.dtype == "float64" else 4)
    logits_bytes = args.n * args.v * 4
    avail = _available_bytes()
    methods = [m for m in args.methods.split(",")] if args.methods else list(METHODS)
    if args.topk:
        methods = [m for m in methods if m in ("linear_kl_div", "matmuls")]
    rows, times = [], {}
    for method in methods:
        need = _estimate_bytes(method, args.n, args.v, args.h, item, args.topk)
        row = {"method": method, "n": args.n, "v": args.v, "h": args.h, "dtype": args.dtype,
               "divergence": args.divergence, "target": f"top-{args.topk}" if args.topk else
               "dense", "threads": args.threads}
        if avail is not None and need > 0.9 * avail:
            row["error"] = f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free"
        rows.append(row)
        times[method] = []
    for _ in range(args.rounds):
        for row in rows:
            if "error" in row:
                continue
            cfg = {"method": row["method"], "n": args.n, "v": args.v, "h": args.h,
                   "dtype": args.dtype, "divergence": args.divergence, "topk": args.topk,
                   "repeats": args.repeats, "threads": args.threads,
                   "chunk_size": args.chunk_size}
            out = _run_one(cfg)
            if "error" in out:
                row["error"] = out["error"]
                continue
            times[row["method"]].extend(out["times"])
            for key in ("extra_peak", "extra_peak_excl_grads"):
                row[key] = max(row.get(key, out[key]), out[key])
    for row in rows:
        if "error" not in row and times[row["method"]]:
            row["time_s"] = statistics.median(times[row["method"]])
            row["times"] = times[row["method"]]
            row["extra_vs_logits"] = row["extra_peak_excl_grads"] / logits_bytes
    by = {r["method"]: r for r in rows}
    if all(m in by and "time_s" in by[m] for m in ("linear_kl_div", "matmuls", "kldiv loss")):
        floor = by["matmuls"]["time_s"] + by["kldiv loss"]["time_s"]
        for r in rows:
            if "time_s" in r:
                r["vs_matmuls+loss"] = r["time_s"] / floor
    if "linear_kl_div" in by and "time_s" in by["linear_kl_div"]:
        for r in rows:
            if "time_s" in r:
                r["vs_linear_kl_div"] = r["time_s"] / by["linear_kl_div"]["time_s"]
    return rows


def format_table(rows):
    head = ("method", "time_s", "vs_matmuls+loss", "extra_MB", "extra_excl_grads_MB",
            "extra/logits")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']} | {r['error']} | | | |")
            continue
        vs = r.get("vs_matmuls+loss")
        lines.append(" | ".join([
            r["method"], f"{r['time_s']:.3f}", "" if vs is None else f"{vs:.2f}",
            f"{r['extra_peak'] / 2**20:.0f}", f"{r['extra_peak_excl_grads'] / 2**20:.0f}",
            f"{r['extra_vs_logits']:.3f}",
        ]))
    return "\n".join(lines)


def _parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="rows (tokens)")
    ap.add_argument("--v", type=int, default=128256, help="vocabulary size")
    ap.add_argument("--h", type=int, default=2048, help="hidden size")
    ap.add_argument("--dtype", default="float32",
                    choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--divergence", default="forward", choices=["forward", "reverse", "js"])
    ap.add_argument("--topk", type=int, default=0, help="top-k teacher with this K (0: dense)")
    ap.add_argument("--chunk-size", type=int, default=None, dest="chunk_size")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed calls per process after a warm-up call (0: time the first only)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per method, interleaved")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--methods", default="", help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="small smoke run (N=512, V=4096, H=256)")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.n, args.v, args.h, args.repeats, args.rounds = 512, 4096, 256, 1, 1
    print(f"linear_kl_div benchmark: N={args.n} V={args.v} H={args.h} {args.dtype} "
          f"{args.divergence} target={'top-%d' % args.topk if args.topk else 'dense'} "
          f"threads={args.threads} rounds={args.rounds} x repeats={args.repeats}; "
          f"one float32 logits tensor = "
          f"{args.n * args.v * 4 / 2**20:.0f} MB")
    rows = run_linear(args)
    print(format_table(rows))
    if args.json:
        import tempfile

        d = os.path.dirname(os.path.abspath(args.json))
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
