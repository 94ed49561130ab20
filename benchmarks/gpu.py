"""GPU benchmark (issue 16): forward + backward time, peak memory and gradient accuracy of kldiv
against torch eager, torch.compile and Liger-Kernel (when installed), side by side in one run.

    python benchmarks/gpu.py                    # the issue's sizes (one CUDA GPU; ~100 GB
                                                # for the eager peers' largest rows)
    python benchmarks/gpu.py --json gpu.json    # also write the results (after every row)
    python benchmarks/gpu.py --quick            # small sizes on the GPU
    python benchmarks/gpu.py --dry-run          # no GPU: tiny sizes on the CPU, kldiv through
                                                # the Triton kernels in Triton's interpreter
    python benchmarks/gpu.py --device cpu       # no GPU: tiny sizes, kldiv's CPU paths

Rows (in this order; with ``--budget`` seconds spent, the rows left are reported as skipped):
kl_div at 8192 x 128256 (bfloat16, float32) and 16384 x 131072 (bfloat16, float32), js_div at
8192 x 128256 (bfloat16), and at 8192 tokens x hidden 4096 x vocabulary 128256 (bfloat16) the
fused linear layers: ``linear_kl_div`` with a teacher's logits (made inside the timed step
without gradient), ``linear_kl_div`` with a teacher distribution given as data against Liger's
``LigerFusedLinearKLDivLoss`` (its PR 1423: probabilities for Liger, the same distribution as
log-probabilities for kldiv, both bfloat16), and the JS divergence against Liger's
``LigerFusedLinearJSD`` (which takes the teacher's hidden states and weight).

Every method computes the same loss (the mean over rows of the divergence of the student from
the teacher); kldiv runs with its default value checks (one host synchronisation per call). Time: the median of CUDA-event timings of forward + backward, the methods taking
turns round by round (round 0, compilation and autotuning, not timed). Peak memory:
``max_memory_allocated`` during the step, above what was allocated before it (inputs excluded).
Gradient error: the worst row's normwise relative error of the student's gradient (the logits'
rows; the hidden states' rows for the linear layers) against float64 autograd of the textbook
formula on the same inputs, over the first ``--check-rows`` rows. After each row the ratios
kldiv / torch.compile and kldiv / Liger are printed with the issue's targets (time <= 0.7x
Liger's and <= 0.5x torch.compile's for the fused family, peak memory <= Liger's), and the path
kldiv took is named. A method that is not installed prints "not available"; one that fails at a
size (out of memory, an API change) prints its error and the others still run.
"""
from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:]:
    # before torch (and so triton) is imported: Triton decides at import whether it interprets
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["KLDIV_BACKEND"] = "triton"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEV = "cuda"
COMPILE_BACKEND = "inductor"

# ----------------------------------------------------------------------------------------------
# Liger-Kernel, when installed (each class looked up on its own: releases differ)


def _liger(name):
    """Liger-Kernel's ``name`` (a class in ``liger_kernel.transformers``), or None."""
    try:
        import liger_kernel.transformers as lt
    except Exception:
        return None
    cls = getattr(lt, name, None)
    if cls is None and name == "LigerFusedLinearKLDivLoss":
        try:  # (a release that has the module but does not re-export the class)
            from liger_kernel.transformers.fused_linear_kl_div import LigerFusedLinearKLDivLoss
        except Exception:
            return None
        cls = LigerFusedLinearKLDivLoss
    return cls


def _liger_version():
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# the rows

ROWS_FULL = [
    ("kl_div", (8192, 128256), torch.bfloat16),
    ("kl_div", (8192, 128256), torch.float32),
    ("linear_kl_div", (8192, 4096, 128256), torch.bfloat16),
    ("linear_kl_data", (8192, 4096, 128256), torch.bfloat16),
    ("js_div", (8192, 128256), torch.bfloat16),
    ("linear_js", (8192, 4096, 128256), torch.bfloat16),
    ("kl_div", (16384, 131072), torch.bfloat16),
    ("kl_div", (16384, 131072), torch.float32),
]


def _rows(args):
    if args.dry_run:  # the interpreter: ~0.15 s per row and kernel call
        return [("kl_div", (4, 300), torch.float32), ("kl_div", (4, 300), torch.bfloat16),
                ("js_div", (4, 300), torch.bfloat16),
                ("linear_kl_div", (4, 16, 300), torch.bfloat16),
                ("linear_kl_data", (4, 16, 300), torch.bfloat16),
                ("linear_js", (4, 16, 300), torch.bfloat16)]
    if DEV == "cpu":
        return [("kl_div", (64, 1000), torch.float32), ("kl_div", (64, 1000), torch.bfloat16),
                ("js_div", (64, 1000), torch.bfloat16),
                ("linear_kl_div", (64, 32, 1000), torch.bfloat16),
                ("linear_kl_data", (64, 32, 1000), torch.bfloat16),
                ("linear_js", (64, 32, 1000), torch.bfloat16)]
    if args.quick:
        return [("kl_div", (1024, 32000), torch.bfloat16), ("kl_div", (1024, 32000), torch.float32),
                ("linear_kl_div", (1024, 512, 32000), torch.bfloat16),
                ("linear_kl_data", (1024, 512, 32000), torch.bfloat16),
                ("js_div", (512, 32000), torch.bfloat16),
                ("linear_js", (1024, 512, 32000), torch.bfloat16)]
    return ROWS_FULL


def _label(kind, shape, dtype):
    return f"{kind} {' x '.join(str(s) for s in shape)} {str(dtype)[6:]}"


# ----------------------------------------------------------------------------------------------
# the losses: each f(teacher, student) -> scalar, the mean over rows


def _up(x):
    """At least float32 (float64 stays float64: the reference)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _eager_kl(t, s):
    """KL(softmax(t) || softmax(s)), t and s logits."""
    return F.kl_div(F.log_softmax(_up(s), -1), F.log_softmax(_up(t), -1),
                    reduction="batchmean", log_target=True)


def _eager_kl_probs(p, s):
    """KL(p || softmax(s)), p probabilities as given (torch.nn.KLDivLoss's and Liger's)."""
    return F.kl_div(F.log_softmax(_up(s), -1), _up(p), reduction="batchmean")


def _eager_js(t, s, beta=0.5):
    lp = F.log_softmax(_up(t), -1)
    lq = F.log_softmax(_up(s), -1)
    lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log1p(-beta)]), 0)
    return (beta * (lp.exp() * (lp - lm)).sum(-1)
            + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)).mean()


def _compile(f):
    return torch.compile(f, backend=COMPILE_BACKEND)


def _row_methods(kind):
    """{name: f(t, s) or the reason it is not available}."""
    import kldiv

    if kind == "kl_div":
        ms = {"kldiv": lambda t, s: kldiv.kl_div(t, s, p_space="logits", q_space="logits",
                                                 reduction="mean"),
              "torch eager": _eager_kl, "torch.compile": _compile(_eager_kl)}
        cls = _liger("LigerKLDIVLoss")
        if cls is None:
            ms["liger"] = "not available"
        else:
            loss = cls(reduction="batchmean", log_target=True)
            # log-probabilities in float32 (from upcast logits): Liger is not charged with
            # the rounding of log-probabilities to bfloat16 (its memory counts the temporaries)
            ms["liger"] = lambda t, s: loss(F.log_softmax(_up(s), -1),
                                            F.log_softmax(_up(t), -1))
        return ms
    if kind == "js_div":
        ms = {"kldiv": lambda t, s: kldiv.js_div(t, s, p_space="logits", q_space="logits",
                                                 reduction="mean"),
              "torch eager": _eager_js, "torch.compile": _compile(_eager_js)}
        cls = _liger("LigerJSD")
        if cls is None:
            ms["liger"] = "not available"
        else:
            jsd = cls(beta=0.5)
            # Liger's JSD takes (student log-probs, teacher log-probs); float32 as above
            ms["liger"] = lambda t, s: jsd(F.log_softmax(_up(s), -1),
                                           F.log_softmax(_up(t), -1))
        return ms
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------
# measuring


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _timed(step):
    """Milliseconds of step() (CUDA events on the GPU, wall clock on the CPU)."""
    if DEV != "cuda":
        t0 = time.perf_counter()
        step()
        return 1e3 * (time.perf_counter() - t0)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _mem():
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def _reset_peak():
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(base):
    if DEV != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _row_error(g, g64):
    if g is None:
        return float("nan")
    g = g.double()
    num = (g - g64).norm(dim=-1)
    den = g64.norm(dim=-1).clamp_min(1e-300)
    return float((num / den).max())


def _run_methods(methods, make_inputs, grad_of, refs, reps):
    """Time each method's forward + backward, round by round; peak memory and gradient error.

    methods: {name: callable(*inputs) -> loss, or a string saying why it is not there};
    make_inputs(): fresh leaf inputs; grad_of(inputs): the gradient checked (first rows);
    refs: {name: float64 reference gradient of those rows} (a "default" entry for the rest).
    """
    out = {}
    times = {m: [] for m in methods}
    for name, f in methods.items():
        if isinstance(f, str):
            out[name] = {"error": f}
    for r in range(reps + 1):  # round 0: warm-up (compilation, autotuning), not timed
        for name, f in methods.items():
            if name in out and "error" in out[name]:
                continue
            ins = make_inputs()
            _sync()
            base = _mem()
            _reset_peak()
            try:
                ms = _timed(lambda: f(*ins).backward())
            except Exception as e:  # out of memory, an API that changed, ...
                out[name] = {"error": f"failed: {type(e).__name__}: {str(e)[:300]}"}
                continue
            if r:
                times[name].append(ms)
                ref = refs.get(name, refs["default"])
                out[name] = {"peak_gib": _peak_gib(base), "grad_err": _row_error(
                    grad_of(ins), ref)}
            ins = None  # (the inputs and their gradients freed before the next method)
    for name in methods:
        if times[name] and "error" not in out.get(name, {}):
            out[name]["ms"] = statistics.median(times[name])
    return {name: out.get(name, {"error": "did not run"}) for name in methods}  # in order


def _bench_rows(kind, shape, dtype, reps, check_rows):
    """kl_div / js_div on (n, V) logits: teacher t, student s (the gradient is the student's)."""
    n, V = shape
    gen = torch.Generator(device=DEV).manual_seed(0)
    t = torch.randn(n, V, device=DEV, generator=gen, dtype=torch.float32) * 2
    # a student close to the teacher (KL ~ 1e-4 per row): where precision matters
    s = (t + 0.01 * torch.randn(n, V, device=DEV, generator=gen)).to(dtype)
    t = t.to(dtype)
    k = min(check_rows, n)
    sc = s[:k].double().requires_grad_(True)
    ref = _eager_kl if kind == "kl_div" else _eager_js
    (ref(t[:k].double(), sc) * k / n).backward()  # the same mean over all n rows
    refs = {"default": sc.grad}
    del sc
    methods = _row_methods(kind)
    return _run_methods(methods, lambda: (t, s.detach().clone().requires_grad_(True)),
                        lambda ins: ins[1].grad[:k] if ins[1].grad is not None else None,
                        refs, reps)


def _bench_linear(kind, shape, dtype, reps, check_rows):
    """The fused linear layers: hidden (n, H), weight (V, H); the hidden states' gradient."""
    import kldiv.torch as kt

    n, H, V = shape
    gen = torch.Generator(device=DEV).manual_seed(0)
    h = (torch.randn(n, H, device=DEV, generator=gen) / math.sqrt(H)).to(dtype)
    W = torch.randn(V, H, device=DEV, generator=gen).to(dtype)
    # the teacher: its own last layer (hidden states close to the student's: KL ~ 1e-4)
    ht = (h.float() + 0.01 * torch.randn(n, H, device=DEV, generator=gen) / math.sqrt(H))
    ht = ht.to(dtype)
    Wt = W
    k = min(check_rows, n)

    def teacher_logits():
        with torch.no_grad():
            return ht @ Wt.T

    def ref_grad(loss_fn, target_rows):
        hc = h[:k].double().requires_grad_(True)
        (loss_fn(target_rows, hc @ W.double().T) * k / n).backward()
        return hc.grad

    methods = {}
    if kind in ("linear_kl_div", "linear_js"):
        div = "forward" if kind == "linear_kl_div" else "js"
        eager_loss = _eager_kl if div == "forward" else _eager_js

        def eager(hh, WW):
            return eager_loss(teacher_logits(), hh @ WW.T)

        methods["kldiv"] = lambda hh, WW: kt.linear_kl_div(
            hh, WW, teacher_logits(), target_space="logits", divergence=div, reduction="mean")
        methods["torch eager"] = eager
        methods["torch.compile"] = _compile(eager)
        if kind == "linear_js":
            cls = _liger("LigerFusedLinearJSD")
            if cls is None:
                methods["liger"] = "not available"
            else:
                fjsd = cls(jsd_beta=0.5, temperature=1.0)
                # (student input, student weight, teacher input, teacher weight, shift_labels)
                methods["liger"] = lambda hh, WW: fjsd(hh, WW, ht, Wt, None)
        else:
            methods["liger"] = "no Liger peer (see linear_kl_data)"
        # the teacher's logits as every method sees them: made in the input dtype
        refs = {"default": ref_grad(eager_loss, teacher_logits()[:k].double())}
    elif kind == "linear_kl_data":
        # a teacher distribution given as data (cached soft labels), from the teacher's logits
        # in float32: probabilities for Liger (and torch), log-probabilities for kldiv, both
        # rounded to the input dtype; each method's reference is on its own input
        z = (ht.float() @ Wt.float().T)
        probs = torch.softmax(z, -1).to(dtype)
        logp = torch.log_softmax(z, -1).to(dtype)
        del z

        def eager(hh, WW):
            return _eager_kl_probs(probs, hh @ WW.T)

        methods["kldiv"] = lambda hh, WW: kt.linear_kl_div(
            hh, WW, logp, target_space="log_probs", reduction="mean")
        methods["torch eager"] = eager
        methods["torch.compile"] = _compile(eager)
        cls = _liger("LigerFusedLinearKLDivLoss")
        if cls is None:
            methods["liger"] = "not available"
        else:
            fkl = cls(reduction="batchmean", temperature=1.0)
            methods["liger"] = lambda hh, WW: fkl(hh, WW, probs)
        refs = {"default": ref_grad(_eager_kl_probs, probs[:k].double()),
                # kldiv renormalises the rounded log-probabilities (the core's semantics)
                "kldiv": ref_grad(_eager_kl, logp[:k].double())}
    else:
        raise ValueError(kind)
    return _run_methods(
        methods, lambda: (h.detach().clone().requires_grad_(True),
                          W.detach().clone().requires_grad_(True)),
        lambda ins: ins[0].grad[:k] if ins[0].grad is not None else None, refs, reps)


# ----------------------------------------------------------------------------------------------
# reporting


def _path():
    """Which path kldiv takes for tensors on DEV (read as the dispatch reads it)."""
    try:
        from kldiv.backends import triton_kernels as tk
    except Exception as e:
        return f"pure torch (triton_kernels unavailable: {type(e).__name__})"
    if tk.wanted_device(torch.device(DEV)):
        return "Triton kernels" + (" (in Triton's interpreter)" if DEV == "cpu" else "")
    if not tk.available():
        why = "triton not installed"
    elif DEV == "cpu":
        why = "CPU tensors: KLDIV_BACKEND=triton and TRITON_INTERPRET=1 take the kernels"
    else:
        why = "KLDIV_BACKEND"
    return f"pure-torch / C fallback ({why})"


def _ratios(res, fused):
    """Lines 'kldiv / X: time r (target), memory r (target)' for torch.compile and Liger."""
    k = res.get("kldiv", {})
    if "ms" not in k:
        return ["  kldiv did not run: no ratios"]
    lines = []
    for other, t_target, m_target in (("torch.compile", 0.5 if fused else None, None),
                                      ("liger", 0.7, 1.0)):
        o = res.get(other)
        if o is None:
            continue
        if "ms" not in o:
            lines.append(f"  kldiv / {other}: n/a ({o.get('error', 'did not run')[:60]})")
            continue
        rt = k["ms"] / o["ms"]
        rm = k["peak_gib"] / o["peak_gib"] if o["peak_gib"] else float("nan")

        def mark(r, target):
            if target is None or r != r or DEV != "cuda":  # (CPU runs are no benchmark)
                return ""
            return f" (target <= {target}: {'met' if r <= target else 'NOT met'})"

        mem = f"{rm:.2f}x{mark(rm, m_target)}" if rm == rm else "n/a (no CUDA memory figures)"
        lines.append(f"  kldiv / {other}: time {rt:.2f}x{mark(rt, t_target)}, peak memory {mem}")
    return lines


def _print_row(label, res, fused):
    print(f"\n{label}")
    print(f"  {'method':<14} {'ms':>9} {'peak GiB':>9} {'grad err':>10}")
    for name, r in res.items():
        if "ms" in r:
            print(f"  {name:<14} {r['ms']:9.2f} {r['peak_gib']:9.2f} {r['grad_err']:10.2e}")
        else:
            print(f"  {name:<14} {r.get('error', 'did not run')}")
    for line in _ratios(res, fused):
        print(line)
    sys.stdout.flush()


def _plain(x):
    """nan/inf as null: strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _write_json(path, doc):
    """Atomically (a temporary file in the same folder, then renamed); nan/inf as null."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".gpu-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(_plain(doc), fh, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="On a lent GPU: python benchmarks/gpu.py --json gpu.json (one command; --budget "
               "keeps it under ~8 minutes by starting no new row after that many seconds).")
    ap.add_argument("--quick", action="store_true", help="small sizes on the GPU")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU needed: tiny sizes on the CPU, kldiv through the Triton kernels "
                         "in Triton's interpreter (checks this script's code paths; not a "
                         "benchmark)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: tiny sizes on the CPU through kldiv's CPU paths (not a benchmark)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per method (default 5)")
    ap.add_argument("--check-rows", type=int, default=64,
                    help="rows checked against the float64 reference (default 64)")
    ap.add_argument("--budget", type=float, default=360.0,
                    help="seconds after which no new row starts (default 360: the whole run "
                         "stays under ~8 minutes); the rows left are reported as skipped")
    ap.add_argument("--only", default=None,
                    help="run only the rows whose label contains this text (e.g. linear)")
    ap.add_argument("--json", default=None,
                    help="write the results to this file (rewritten after every row)")
    args = ap.parse_args(argv)
    global DEV, COMPILE_BACKEND
    DEV = "cpu" if args.dry_run else args.device
    if args.reps is not None and args.reps < 1:
        ap.error("--reps: must be at least 1")
    if args.check_rows < 1:
        ap.error("--check-rows: must be at least 1")
    if args.json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json: the folder of {args.json} does not exist")
    if DEV == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here, so nothing is measured (GPU speed stays "
              "unmeasured); --dry-run checks this script on the CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        # inductor's CPU code generation would dominate a smoke run: Dynamo + AOTAutograd only
        COMPILE_BACKEND = "aot_eager"
        from kldiv.backends import triton_kernels as tk

        if not tk.cpu_ready():
            print("benchmarks/gpu.py --dry-run: Triton's interpreter is not available (triton "
                  "not installed?)", file=sys.stderr)
            return 2
    # one compiled function per loss serves several shapes and dtypes
    try:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
    except Exception:
        pass
    reps = args.reps or (1 if DEV == "cpu" else 5)
    if DEV == "cuda":
        dev_name = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmuls as float32
    else:
        dev_name = "cpu (" + ("dry run, Triton interpreter" if args.dry_run else "smoke run") + \
            "; not a benchmark)"
    lv = _liger_version()
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    path = _path()
    print(f"device: {dev_name}")
    print(f"torch {torch.__version__}; triton {tv or 'not installed'}; liger-kernel "
          f"{lv or 'not installed'}")
    print(f"kldiv's path: {path}")
    doc = {"device": dev_name, "torch": torch.__version__, "triton": tv, "liger_kernel": lv,
           "kldiv_path": path, "reps": reps, "check_rows": args.check_rows, "rows": []}
    t0 = time.monotonic()
    rows = [r for r in _rows(args) if args.only is None or args.only in _label(*r)]
    for kind, shape, dtype in rows:
        label = _label(kind, shape, dtype)
        if time.monotonic() - t0 > args.budget:
            print(f"\n{label}\n  skipped (the time budget of {args.budget:.0f} s is spent)")
            doc["rows"].append({"row": label, "skipped": "time budget"})
            continue
        r0 = time.monotonic()
        try:
            if kind.startswith("linear"):
                res = _bench_linear(kind, shape, dtype, reps, args.check_rows)
            else:
                res = _bench_rows(kind, shape, dtype, reps, args.check_rows)
        except Exception as e:  # the inputs themselves did not fit, ...
            res = {"kldiv": {"error": f"row failed: {type(e).__name__}: {str(e)[:300]}"}}
        _print_row(label, res, fused=kind in ("kl_div", "js_div"))
        doc["rows"].append({"row": label, "seconds": round(time.monotonic() - r0, 1),
                            "results": res})
        if DEV == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            _write_json(args.json, doc)
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    if args.json:
        _write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
