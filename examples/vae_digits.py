"""A variational autoencoder on scikit-learn's 8x8 digits, with kldiv's Gaussian KL term.

The encoder outputs the mean and log-variance of q(z|x) = N(mu, diag(exp(logvar))); the loss is
the negative ELBO per image:

    reconstruction  = -log p(x|z), Bernoulli likelihood on pixel intensities in [0, 1]
    KL              = kldiv.distributions.normal_kl_logvar(mu, logvar)  # KL(q(z|x) || N(0, I))

Data: sklearn.datasets.load_digits (bundled with scikit-learn, no download), 80/20 split.

Run:    python examples/vae_digits.py --out out/vae
Smoke:  python examples/vae_digits.py --smoke --out /tmp/vae
Writes: vae_loss.png (reconstruction and KL per epoch), vae_prior_samples.png (decoded
        z ~ N(0, I)), metrics.json in --out.
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

    x = load_digits().data.astype(np.float32) / 16.0
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    return x[idx[n_test:]], x[idx[:n_test]]


def make_model(latent, hidden, torch):
    nn = torch.nn

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                     nn.ReLU(), nn.Linear(hidden, 2 * latent))
            self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 64))

        def forward(self, x):
            mu, logvar = self.enc(x).chunk(2, dim=-1)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)   # reparameterisation
            return self.dec(z), mu, logvar

    return VAE()


def losses(model, x, torch, kldiv_dist):
    logits, mu, logvar = model(x)
    # -log p(x|z) summed over the 64 pixels, mean over images
    rec = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
    rec = rec.sum(-1).mean()
    # KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dims, mean over images: kldiv
    kl = kldiv_dist.normal_kl_logvar(mu, logvar, reduction="mean")
    return rec, kl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/vae")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--latent", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="3 epochs (for the tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs = 3

    import torch

    from kldiv import distributions as kldiv_dist

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    xtr, xte = load_data(args.seed)
    xtr_t, xte_t = torch.as_tensor(xtr), torch.as_tensor(xte)
    model = make_model(args.latent, args.hidden, torch)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)

    hist = dict(train_rec=[], train_kl=[], test_rec=[], test_kl=[], first_batch_loss=None)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(xtr_t), generator=gen)
        rec_sum = kl_sum = 0.0
        for i in range(0, len(perm), args.batch):
            xb = xtr_t[perm[i:i + args.batch]]
            rec, kl = losses(model, xb, torch, kldiv_dist)
            loss = rec + kl
            if hist["first_batch_loss"] is None:
                hist["first_batch_loss"] = float(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec_sum += float(rec.detach()) * len(xb)
            kl_sum += float(kl.detach()) * len(xb)
        hist["train_rec"].append(rec_sum / len(xtr_t))
        hist["train_kl"].append(kl_sum / len(xtr_t))
        model.eval()
        with torch.no_grad():
            rec, kl = losses(model, xte_t, torch, kldiv_dist)
        hist["test_rec"].append(float(rec))
        hist["test_kl"].append(float(kl))
        if epoch == 1 or epoch % 25 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:4d}  train rec {hist['train_rec'][-1]:7.3f}  KL "
                  f"{hist['train_kl'][-1]:6.3f}  | test -ELBO {hist['test_rec'][-1] + hist['test_kl'][-1]:7.3f}",
                  flush=True)
    elapsed = time.perf_counter() - t0

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = np.arange(1, args.epochs + 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, ls in (("train", "-"), ("test", "--")):
        axes[0].plot(ep, hist[f"{key}_rec"], ls, color="C0", label=f"reconstruction ({key})")
        axes[1].plot(ep, hist[f"{key}_kl"], ls, color="C1", label=f"KL to N(0, I) ({key})")
    axes[0].set_ylabel("-log p(x|z) per image (nats)")
    axes[1].set_ylabel("KL per image (nats)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend()
    fig.suptitle("VAE on 8x8 digits: the two terms of the negative ELBO")
    fig.tight_layout()
    _save_atomic(os.path.join(args.out, "vae_loss.png"), lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)

    with torch.no_grad():
        z = torch.randn(64, args.latent, generator=torch.Generator().manual_seed(args.seed + 1))
        imgs = torch.sigmoid(model.dec(z)).reshape(64, 8, 8).numpy()
    fig, axes = plt.subplots(8, 8, figsize=(5, 5))
    for ax, im in zip(axes.ravel(), imgs):
        ax.imshow(im, cmap="gray_r", vmin=0, vmax=1)
        ax.axis("off")
    fig.suptitle("Decoded samples z ~ N(0, I)")
    fig.tight_layout()
    _save_atomic(os.path.join(args.out, "vae_prior_samples.png"),
                 lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)

    metrics = dict(seed=args.seed, epochs=args.epochs, latent=args.latent, seconds=elapsed,
                   first_batch_loss=hist["first_batch_loss"],
                   final_train_loss=hist["train_rec"][-1] + hist["train_kl"][-1],
                   final_test_rec=hist["test_rec"][-1], final_test_kl=hist["test_kl"][-1],
                   final_test_neg_elbo=hist["test_rec"][-1] + hist["test_kl"][-1], history=hist)
    print(f"test -ELBO {metrics['final_test_neg_elbo']:.3f} nats/image "
          f"(reconstruction {metrics['final_test_rec']:.3f}, KL {metrics['final_test_kl']:.3f}); "
          f"{elapsed:.1f} s")
    _save_atomic(os.path.join(args.out, "metrics.json"),
                 lambda p: open(p, "w").write(json.dumps(metrics, indent=1)))
    return metrics


if __name__ == "__main__":
    main()
