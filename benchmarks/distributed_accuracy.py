"""float32 accuracy of the vocabulary-parallel algorithm at wide logits, against float64.

Rows of V = 1000 float32 logits with |x / T| up to about 60 (``12 * randn`` at T = 0.7), the
student nearly equal to the teacher (``+ 0.01 randn``), moderately different (``+ randn``) or
independent. For each divergence: the worst relative error of the value (rows with a value
>= 1e-9) and the worst error of the gradient w.r.t. either side's logits, entry by entry
relative to the largest entry of its row (per row, so that rows with small gradients count;
rows whose gradient is below 1e-6 everywhere are left out: there p is one-hot to within
float32's resolution and the row's whole gradient is below eps * |log(q/p)|, which float32 does
not resolve; the worst absolute error is shown too), against float64 autograd of the textbook
formula on the same float32 inputs. Columns: the sharded algorithm of
``kldiv.distributed`` (run on one process, ``_DELEGATE_LOCAL = False``: the same arithmetic as
on W ranks up to the order of the row sums) and the single-process core (``kldiv.kl_div`` and
family, torch).

Run: ``python benchmarks/distributed_accuracy.py`` (``--rows N``, ``--temperature T``).
"""
from __future__ import annotations

import argparse


def reference(kind, x, y, temperature):
    import torch

    a = x.double().clone().requires_grad_()
    b = y.double().clone().requires_grad_()

    def centred(v):
        return (v - v.amax(dim=-1, keepdim=True).detach()) / temperature

    lp = torch.log_softmax(centred(a), -1)
    lq = torch.log_softmax(centred(b), -1)
    kl = lambda u, w: (u.exp() * (u - w)).sum(-1)  # noqa: E731
    if kind == "forward":
        rows = kl(lp, lq)
    elif kind == "reverse":
        rows = kl(lq, lp)
    elif kind == "jeffreys":
        rows = kl(lp, lq) + kl(lq, lp)
    else:
        import math

        lm = torch.logaddexp(lp + math.log(0.5), lq + math.log(0.5))
        rows = 0.5 * kl(lp, lm) + 0.5 * kl(lq, lm)
    rows.sum().backward()
    return rows.detach(), a.grad, b.grad


def measure(fn, kind, x, y, temperature):
    import torch

    a = x.clone().requires_grad_()
    b = y.clone().requires_grad_()
    rows = fn(a, b)
    rows.sum().backward()
    want, ga, gb = reference(kind, x, y, temperature)
    keep = want >= 1e-9  # the documented range of relative accuracy (KL >= 1e-9)
    val = float(((rows.detach().double() - want).abs() / want.abs())[keep].max())

    def per_row(g, r):
        # per row relative to the row's largest entry, on rows whose largest entry is >= 1e-6
        # (below, a row is saturated: float32 cannot resolve it, see the absolute column)
        scale = r.abs().amax(-1, keepdim=True)
        err = ((g.double() - r).abs() / scale).amax(-1)
        keep = scale[:, 0] >= 1e-6
        return float(err[keep].max()) if bool(keep.any()) else 0.0

    def absolute(g, r):
        return float((g.double() - r).abs().max())

    return (val, max(per_row(a.grad, ga), per_row(b.grad, gb)),
            max(absolute(a.grad, ga), absolute(b.grad, gb)))


def main(argv=None):
    import torch

    import kldiv
    import kldiv.distributed as kd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args(argv)
    kd.vocab_parallel._DELEGATE_LOCAL = False
    g = torch.Generator().manual_seed(0)
    x = 12 * torch.randn(args.rows, args.vocab, generator=g)
    students = {
        "nearly equal": x + 0.01 * torch.randn(x.shape, generator=g),
        "moderate": x + torch.randn(x.shape, generator=g),
        "independent": 12 * torch.randn(x.shape, generator=g),
    }
    T = args.temperature
    core = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
            "jeffreys": kldiv.jeffreys_div}
    print(f"float32, {args.rows} x {args.vocab}, T = {T}, max |x / T| = "
          f"{float(x.abs().max()) / T:.0f}; errors against float64 autograd (per row)")
    print("| student | divergence | value, sharded | value, core | gradient per row, sharded | "
          "gradient per row, core | gradient absolute, sharded | gradient absolute, core |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, y in students.items():
        for kind in ("forward", "reverse", "js", "jeffreys"):
            sv, sg, sa = measure(lambda a, b: kd.vocab_parallel_kl_div(
                a, b, kind=kind, reduction="none", temperature=T), kind, x, y, T)
            cv, cg, ca = measure(lambda a, b: core[kind](a, b, p_space="logits",
                                                         q_space="logits", temperature=T),
                                 kind, x, y, T)
            print(f"| {name} | {kind} | {sv:.1e} | {cv:.1e} | {sg:.1e} | {cg:.1e} | {sa:.1e} | "
                  f"{ca:.1e} |")


if __name__ == "__main__":
    main()
