"""Knowledge distillation on scikit-learn's 8x8 digits with kldiv's temperature-scaled KL.

A teacher MLP (64-256-256-10) is trained on the labels of the whole training split (1198
images). Then a much smaller student (64-32-10 by default) is trained on only the first 100 of
those images (--student-images), twice, from the same initialisation and data order:

    labels only:  cross-entropy(student_logits, y)
    distilled:    alpha * kldiv.kl_div(teacher_logits, student_logits, p_space="logits",
                                       q_space="logits", temperature=T, t2_scale=True,
                                       reduction="mean")
                  + (1 - alpha) * cross-entropy(student_logits, y)

``t2_scale=True`` multiplies the KL by T**2 so that its gradient keeps the size of the
cross-entropy's as T changes (Hinton et al., 2015). Every student is trained for several seeds;
the test accuracies (mean and standard deviation over seeds) are printed and plotted.

Run:    python examples/distill_digits.py --out out/distill
Smoke:  python examples/distill_digits.py --smoke --out /tmp/distill
Writes: distill_accuracy.png and metrics.json in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from kldiv._atomic import save_atomic as _save_atomic


def load_data(seed):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 3
    te, tr = idx[:n_test], idx[n_test:]
    return x[tr], y[tr], x[te], y[te]


def mlp(sizes, torch):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def accuracy(model, x, y, torch):
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train(model, x, y, epochs, lr, batch, loss_fn, seed, torch, xte=None, yte=None):
    """Adam on minibatches in a seeded order; returns (first-epoch loss, last-epoch loss, accs)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    epoch_losses, accs = [], []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = loss_fn(model(x[idx]), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        epoch_losses.append(total / len(x))
        if xte is not None:
            accs.append(accuracy(model, xte, yte, torch))
    return epoch_losses, accs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/distill")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9, help="weight of the KL term")
    ap.add_argument("--student-hidden", type=int, default=32)
    ap.add_argument("--student-images", type=int, default=100,
                    help="train the students on only the first N training images (the teacher "
                         "always sees all of them); 0: all")
    ap.add_argument("--teacher-epochs", type=int, default=60)
    ap.add_argument("--student-epochs", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=5, help="student seeds per method")
    ap.add_argument("--seed", type=int, default=0, help="data split and teacher seed")
    ap.add_argument("--smoke", action="store_true", help="few epochs, one seed (for the tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.teacher_epochs, args.student_epochs, args.seeds = 4, 4, 1

    import torch

    import kldiv

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = (torch.as_tensor(a) for a in load_data(args.seed))
    ce = torch.nn.functional.cross_entropy

    torch.manual_seed(args.seed)
    teacher = mlp([64, 256, 256, 10], torch)
    t_losses, _ = train(teacher, xtr, ytr, args.teacher_epochs, 1e-3, 32,
                        lambda out, idx: ce(out, ytr[idx]), args.seed, torch)
    teacher.eval()
    teacher_acc = accuracy(teacher, xte, yte, torch)
    with torch.no_grad():
        teacher_logits = teacher(xtr)
    if args.student_images:
        xtr, ytr = xtr[:args.student_images], ytr[:args.student_images]
        teacher_logits = teacher_logits[:args.student_images]
    print(f"teacher (64-256-256-10): test accuracy {teacher_acc:.4f}", flush=True)

    T, alpha = args.temperature, args.alpha

    def distill_loss(out, idx):
        kl = kldiv.kl_div(teacher_logits[idx], out, p_space="logits", q_space="logits",
                          temperature=T, t2_scale=True, reduction="mean")
        return alpha * kl + (1 - alpha) * ce(out, ytr[idx])

    runs = {"labels only": [], "distilled": []}
    curves = {"labels only": [], "distilled": []}
    losses = {"labels only": [], "distilled": []}
    sizes = [64, args.student_hidden, 10]
    for s in range(args.seeds):
        for name, fn in (("labels only", lambda out, idx: ce(out, ytr[idx])),
                         ("distilled", distill_loss)):
            torch.manual_seed(1000 + s)          # same initialisation for both methods
            student = mlp(sizes, torch)
            ls, accs = train(student, xtr, ytr, args.student_epochs, 3e-3, 32, fn, 1000 + s,
                             torch, xte, yte)
            runs[name].append(accs[-1])
            curves[name].append(accs)
            losses[name].append(ls)
        print(f"seed {s}: labels only {runs['labels only'][-1]:.4f}   distilled "
              f"{runs['distilled'][-1]:.4f}", flush=True)
    elapsed = time.perf_counter() - t0
    summary = {k: dict(mean=float(np.mean(v)), std=float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                       runs=v) for k, v in runs.items()}
    n_params = sum(p.numel() for p in mlp(sizes, torch).parameters())
    print(f"student 64-{args.student_hidden}-10 ({n_params} parameters), T={T:g}, alpha={alpha:g}, "
          f"{args.seeds} seeds, {len(xtr)} training images:")
    for k, v in summary.items():
        print(f"  {k:12s} test accuracy {v['mean']:.4f} +- {v['std']:.4f}")
    print(f"{elapsed:.1f} s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.5), gridspec_kw=dict(width_ratios=[2, 1]))
    ep = np.arange(1, args.student_epochs + 1)
    for i, (k, c) in enumerate(curves.items()):
        c = np.asarray(c)
        axes[0].plot(ep, c.mean(0), color=f"C{i}", label=k)
        axes[0].fill_between(ep, c.min(0), c.max(0), color=f"C{i}", alpha=0.2)
    axes[0].axhline(teacher_acc, color="grey", ls="--", lw=1, label="teacher")
    axes[0].set_xlabel("student epoch")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_ylim(max(0.0, min(np.min(curves["labels only"]), np.min(curves["distilled"]))),
                     1.0)
    axes[0].legend(loc="lower right")
    axes[0].set_title(f"student 64-{args.student_hidden}-10, mean and range over seeds")
    names = list(summary)
    axes[1].bar(names, [summary[k]["mean"] for k in names],
                yerr=[summary[k]["std"] for k in names], color=["C0", "C1"], capsize=4)
    lo = min(summary[k]["mean"] - 3 * summary[k]["std"] for k in names)
    axes[1].set_ylim(max(0.0, lo - 0.02), 1.0)
    axes[1].set_title(f"final (T={T:g}, alpha={alpha:g})")
    fig.tight_layout()
    _save_atomic(os.path.join(args.out, "distill_accuracy.png"),
                 lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    metrics = dict(seed=args.seed, temperature=T, alpha=alpha, student_hidden=args.student_hidden,
                   student_parameters=n_params, student_images=len(xtr), teacher_accuracy=teacher_acc,
                   teacher_losses=t_losses, students=summary, student_losses=losses,
                   seconds=elapsed)
    _save_atomic(os.path.join(args.out, "metrics.json"),
                 lambda p: open(p, "w").write(json.dumps(metrics, indent=1)))
    return metrics


if __name__ == "__main__":
    main()
