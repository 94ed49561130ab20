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

Run:  python benchmarks/accuracy.py            (V = 1000, 32000, 128000; 3 seeds)
      python benchmarks/accuracy.py --quick    (V = 1000, 32000; 1 seed; a CI smoke run)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    ap.add_argument("--sizes", type=int, nargs="*", help="vocabulary sizes V")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (median over them)")
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
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
