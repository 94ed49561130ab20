"""Accuracy of KL(p || q) for near-identical distributions: kldiv against its peers.

For logits ``a`` (float32 or bfloat16) and ``b = a + eps * z`` rounded to the same dtype, with
eps chosen so that KL(softmax(a) || softmax(b)) is about 1e-2 ... 1e-9, each method's relative
error is measured against a high-precision reference computed from the exact rounded inputs
(tests/oracle.py: the textbook formula in extended precision, checked against a 50-digit mpmath
oracle by tests/test_core_values.py). The table shows the median over seeds.

Methods (all on CPU, in float32; bfloat16 inputs are upcast to float32 exactly for the peers,
while kldiv takes them as they are and computes in float32 itself):
  kldiv        kldiv.kl_div(a, b, p_space="logits", q_space="logits") on torch tensors
  kldiv-np     the same on NumPy arrays (float32 rows only; NumPy has no bfloat16)
  torch        F.kl_div(F.log_softmax(b), F.log_softmax(a), log_target=True, reduction="sum")
  scipy        scipy.special.rel_entr(softmax(a), softmax(b)).sum() on float32 softmax outputs
  jax          jnp.sum(softmax(a) * (log_softmax(a) - log_softmax(b))), float32
  optax        optax.losses.kl_divergence_with_log_targets (only when optax is installed)

Gradients (``--grad``, on by default in a full run): the same pairs, the gradient of the summed
KL with respect to the teacher's logits ``a`` and to the student's logits ``b``, against the exact
gradients in extended precision (dKL/db = q - p and dKL/da = p (log p - log q - KL), from the
exact rounded inputs). Each cell is the median over seeds of the normwise relative error of one
row, ||g - g_ref|| / ||g_ref||; the summary gives the worst row. Methods: kldiv on torch (the
default path) and on JAX (``jax.grad``), torch's ``F.kl_div`` (autograd), the naive formula
``sum softmax(a) * (log_softmax(a) - log_softmax(b))`` (torch autograd) and optax
(``jax.grad`` of ``kl_divergence_with_log_targets``), all on float32 tensors holding the exact
inputs (bfloat16 inputs upcast exactly, for kldiv too: a bfloat16 leaf gets a bfloat16 gradient,
whose final rounding, up to 2e-3, would hide everything else).

Run:  python benchmarks/accuracy.py            (V = 1000, 32000, 128000; 3 seeds; values, gradients)
      python benchmarks/accuracy.py --quick    (V = 1000, 32000; 1 seed; a CI smoke run)
      python benchmarks/accuracy.py --no-grad  (values only)
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import oracle  # noqa: E402  (tests/oracle.py: the reference, validated against mpmath)

LEVELS = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]


def near_pairs(V, levels, np_dtype, seed, scale=2.0):
    """Logit rows a, b (exact values of ``np_dtype``, as float64), one row per KL level."""
    rng = np.random.default_rng(seed)
    a = np.asarray(rng.standard_normal((len(levels), V)) * scale, dtype=np_dtype).astype(np.float64)
    z = rng.standard_normal((len(levels), V))
    e = np.exp(a - a.max(-1, keepdims=True))
    P = e / e.sum(-1, keepdims=True)
    var = np.sum(P * z * z, -1) - np.sum(P * z, -1) ** 2
    eps = np.sqrt(2 * np.asarray(levels) / var)[:, None]
    b = np.asarray(a + eps * z, dtype=np_dtype).astype(np.float64)
    return a, b


# ----------------------------------------------------------------------------------------------
# the methods: each takes float64 arrays holding the exact inputs and the input dtype name


def m_kldiv(a, b, dtype):
    import torch

    import kldiv

    ta = torch.from_numpy(a).to(getattr(torch, dtype))
    tb = torch.from_numpy(b).to(getattr(torch, dtype))
    out = kldiv.kl_div(ta, tb, p_space="logits", q_space="logits")
    return out.double().numpy()


def m_kldiv_np(a, b, dtype):
    if dtype != "float32":
        return None
    import kldiv

    return np.asarray(kldiv.kl_div(a.astype(np.float32), b.astype(np.float32),
                                   p_space="logits", q_space="logits"), dtype=np.float64)


def m_torch(a, b, dtype):
    import torch
    import torch.nn.functional as F

    ta = torch.from_numpy(a).float()
    tb = torch.from_numpy(b).float()
    out = F.kl_div(F.log_softmax(tb, -1), F.log_softmax(ta, -1), log_target=True,
                   reduction="none").sum(-1)
    return out.double().numpy()


def m_scipy(a, b, dtype):
    import scipy.special

    P = scipy.special.softmax(a.astype(np.float32), axis=-1).astype(np.float32)
    Q = scipy.special.softmax(b.astype(np.float32), axis=-1).astype(np.float32)
    return scipy.special.rel_entr(P, Q).sum(-1).astype(np.float64)


_JAX_FN = None


def m_jax(a, b, dtype):
    global _JAX_FN
    import jax
    import jax.numpy as jnp

    if _JAX_FN is None:
        def naive(x, y):
            lx = jax.nn.log_softmax(x, -1)
            return jnp.sum(jnp.exp(lx) * (lx - jax.nn.log_softmax(y, -1)), -1)

        _JAX_FN = jax.jit(naive)
    out = _JAX_FN(jnp.asarray(a, dtype=jnp.float32), jnp.asarray(b, dtype=jnp.float32))
    return np.asarray(out, dtype=np.float64)


def m_optax(a, b, dtype):
    import jax
    import jax.numpy as jnp
    from optax import losses

    la = jax.nn.log_softmax(jnp.asarray(a, dtype=jnp.float32), -1)
    lb = jax.nn.log_softmax(jnp.asarray(b, dtype=jnp.float32), -1)
    # optax's (log_predictions, log_targets): KL(targets || predictions)
    return np.asarray(losses.kl_divergence_with_log_targets(lb, la), dtype=np.float64)


def available_methods():
    methods = {"kldiv": m_kldiv, "kldiv-np": m_kldiv_np, "torch": m_torch, "scipy": m_scipy}
    try:
        import jax  # noqa: F401

        jax.config.update("jax_enable_x64", False)
        methods["jax"] = m_jax
    except ImportError:
        pass
    try:
        from optax import losses  # noqa: F401

        methods["optax"] = m_optax
    except ImportError:
        pass
    return methods


# ----------------------------------------------------------------------------------------------


def run(sizes, seeds, dtypes, levels):
    np_dtypes = {"float32": np.float32}
    try:
        import ml_dtypes  # NumPy's bfloat16 (installed with jax)

        np_dtypes["bfloat16"] = ml_dtypes.bfloat16
    except ImportError:
        print("# ml_dtypes not installed: bfloat16 rows left out\n")
    dtypes = [d for d in dtypes if d in np_dtypes]
    methods = available_methods()
    rows = []
    for dtype in dtypes:
        for V in sizes:
            errs = {m: [[] for _ in levels] for m in methods}
            kls = [[] for _ in levels]
            for seed in seeds:
                a, b = near_pairs(V, levels, np_dtypes[dtype], seed)
                ref = oracle.kl_extended(a, b)
                for m, f in methods.items():
                    got = f(a, b, dtype)
                    if got is None:
                        continue
                    for i, r in enumerate(ref):
                        if r > 0:
                            errs[m][i].append(abs(got[i] - r) / r)
                for i, r in enumerate(ref):
                    kls[i].append(r)
            for i, level in enumerate(levels):
                med = {m: (float(np.median(e[i])) if e[i] else math.nan) for m, e in errs.items()}
                rows.append((dtype, V, level, float(np.median(kls[i])), med))
    return list(methods), rows


def fmt(x):
    if math.isnan(x):
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.1e}"


def print_table(methods, rows):
    head = ["dtype", "V", "target KL", "true KL"] + methods
    body = [[d, str(V), f"{lv:.0e}", f"{kl:.2e}"] + [fmt(med[m]) for m in methods]
            for d, V, lv, kl, med in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in body:
        print(line(r))
    # one summary line per method: the worst median relative error over all rows
    print()
    for m in methods:
        vals = [med[m] for *_, med in rows if not math.isnan(med[m])]
        if vals:
            print(f"{m:>9}: worst median relative error {max(vals):.1e}; "
                  f"ratio to kldiv's worst {max(vals) / max(1e-300, max_err(rows, 'kldiv')):.2g}")


def max_err(rows, m):
    vals = [med[m] for *_, med in rows if not math.isnan(med[m])]
    return max(vals) if vals else math.nan


# ----------------------------------------------------------------------------------------------
# gradients


def grad_reference(a, b):
    """Exact gradients of KL(softmax(a) || softmax(b)) per row, in extended precision."""
    la = oracle._log_softmax_ld(a)
    lb = oracle._log_softmax_ld(b)
    p = np.exp(la)
    q = np.exp(lb)
    kl = np.sum(p * (la - lb), -1, keepdims=True)
    return p * (la - lb - kl), q - p  # d/da, d/db


def g_kldiv(a, b, dtype):
    import torch

    import kldiv

    # float32 tensors holding the exact inputs, as the peers get them: a bfloat16 leaf would
    # receive a bfloat16 gradient, whose final rounding (up to 2e-3) is all one would see
    ta = torch.from_numpy(a).float().requires_grad_(True)
    tb = torch.from_numpy(b).float().requires_grad_(True)
    kldiv.kl_div(ta, tb, p_space="logits", q_space="logits", reduction="sum").backward()
    return ta.grad.double().numpy(), tb.grad.double().numpy()


def _torch_autograd(loss):
    import torch

    def g(a, b, dtype):
        ta = torch.from_numpy(a).float().requires_grad_(True)
        tb = torch.from_numpy(b).float().requires_grad_(True)
        loss(ta, tb).backward()
        return ta.grad.double().numpy(), tb.grad.double().numpy()
    return g


def _torch_losses():
    import torch.nn.functional as F

    def torch_kl(ta, tb):
        return F.kl_div(F.log_softmax(tb, -1), F.log_softmax(ta, -1), log_target=True,
                        reduction="sum")

    def naive(ta, tb):
        la = F.log_softmax(ta, -1)
        return (la.exp() * (la - F.log_softmax(tb, -1))).sum()
    return torch_kl, naive


def _jax_grad(loss):
    import jax
    import jax.numpy as jnp

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))

    def g(a, b, dtype):
        ga, gb = fn(jnp.asarray(a, dtype=jnp.float32), jnp.asarray(b, dtype=jnp.float32))
        return np.asarray(ga, dtype=np.float64), np.asarray(gb, dtype=np.float64)
    return g


def grad_methods():
    torch_kl, naive = _torch_losses()
    methods = {"kldiv": g_kldiv}
    try:
        import jax
        import jax.numpy as jnp

        import kldiv

        def kldiv_jax(x, y):
            return kldiv.kl_div(x, y, p_space="logits", q_space="logits", reduction="sum")

        methods["kldiv-jax"] = _jax_grad(kldiv_jax)
    except ImportError:
        pass
    methods["torch"] = _torch_autograd(torch_kl)
    methods["naive"] = _torch_autograd(naive)
    try:
        import jax
        from optax import losses

        def optax_kl(x, y):
            return jnp.sum(losses.kl_divergence_with_log_targets(
                jax.nn.log_softmax(y, -1), jax.nn.log_softmax(x, -1)))

        methods["optax"] = _jax_grad(optax_kl)
    except ImportError:
        pass
    return methods


def run_grad(sizes, seeds, dtypes, levels):
    np_dtypes = {"float32": np.float32}
    try:
        import ml_dtypes

        np_dtypes["bfloat16"] = ml_dtypes.bfloat16
    except ImportError:
        pass
    methods = grad_methods()
    rows = []
    for dtype in [d for d in dtypes if d in np_dtypes]:
        for V in sizes:
            errs = {(m, w): [[] for _ in levels] for m in methods for w in "pq"}
            for seed in seeds:
                a, b = near_pairs(V, levels, np_dtypes[dtype], seed)
                ra, rb = grad_reference(a, b)
                for m, f in methods.items():
                    ga, gb = f(a, b, dtype)
                    for w, g, r in (("p", ga, ra), ("q", gb, rb)):
                        num = np.sqrt(np.sum((g - r.astype(np.float64)) ** 2, -1))
                        den = np.sqrt(np.sum(r.astype(np.float64) ** 2, -1))
                        for i in range(len(levels)):
                            errs[(m, w)][i].append(float(num[i] / den[i]))
            for i, level in enumerate(levels):
                med = {k: float(np.median(e[i])) for k, e in errs.items()}
                worst = {k: float(np.max(e[i])) for k, e in errs.items()}
                rows.append((dtype, V, level, med, worst))
    return list(methods), rows


def print_grad_table(methods, rows):
    for w, what in (("q", "student logits b (dKL/db = q - p)"),
                    ("p", "teacher logits a (dKL/da = p (log p - log q - KL))")):
        print(f"\n## gradient with respect to the {what}: normwise relative error per row, "
              "median over seeds\n")
        head = ["dtype", "V", "target KL"] + methods
        body = [[d, str(V), f"{lv:.0e}"] + [fmt(med[(m, w)]) for m in methods]
                for d, V, lv, med, _ in rows]
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        line = lambda r: "| " + " | ".join(c.rjust(x) for c, x in zip(r, widths)) + " |"  # noqa
        print(line(head))
        print("|" + "|".join("-" * (x + 2) for x in widths) + "|")
        for r in body:
            print(line(r))
        print()
        for m in methods:
            worst = max(wr[(m, w)] for *_, wr in rows)
            print(f"{m:>9}: worst row {worst:.1e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    ap.add_argument("--sizes", type=int, nargs="*", help="vocabulary sizes V")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (median over them)")
    ap.add_argument("--no-grad", action="store_true", help="values only (no gradient tables)")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([1000, 32000] if args.quick else [1000, 32000, 128000])
    nseeds = args.seeds or (1 if args.quick else 3)
    levels = [1e-2, 1e-5, 1e-7, 1e-9] if args.quick else LEVELS
    print(f"# relative error |KL - KL_ref| / KL_ref, median over {nseeds} seed(s); "
          f"reference: extended-precision textbook formula on the exact inputs "
          f"(longdouble eps {np.finfo(np.longdouble).eps:.1e})\n")
    methods, rows = run(sizes, list(range(nseeds)), ["float32", "bfloat16"], levels)
    print_table(methods, rows)
    worst = max_err(rows, "kldiv")
    print(f"\nkldiv within 1e-4 everywhere: {'yes' if worst <= 1e-4 else 'NO'}")
    ok = worst <= 1e-4
    if not args.no_grad:
        gmethods, grows = run_grad(sizes, list(range(nseeds)), ["float32", "bfloat16"], levels)
        print_grad_table(gmethods, grows)
        gworst = max(wr[(m, w)] for *_, wr in grows for m in gmethods if m.startswith("kldiv")
                     for w in "pq")
        print(f"\nkldiv gradients within 1e-5 per row everywhere: "
              f"{'yes' if gworst <= 1e-5 else 'NO'} (worst {gworst:.1e})")
        ok = ok and gworst <= 1e-5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
