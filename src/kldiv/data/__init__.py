"""The example that ships with kldiv: two small logits files, generated deterministically.

``example_files(directory)`` writes a reference model's logits, a "quantised" copy of them and the
tokens that followed each position (256 positions x 512 vocabulary, float32 .npy, about 1 MB in
all) and returns their paths. Nothing binary is stored in the package: the files come from a
seeded generator, so every installation gets the same example.

The reference logits are a Zipf-like unigram prior plus a position-dependent preference for a few
tokens; the other model is the reference with its logits rounded to a grid of 1/16 nat plus small
noise, the kind of perturbation a low-bit weight quantisation produces, and a few positions
where it changes its mind more strongly. Mean KL comes out around 1e-3 nats, the range of a good
8-bit quantisation.
"""
from __future__ import annotations

import os

import numpy as np

N_TOKENS = 256
N_VOCAB = 512
SEED = 20240521


def example_logits(n_tokens: int = N_TOKENS, n_vocab: int = N_VOCAB, seed: int = SEED):
    """(reference logits, other logits, next tokens), float32 / float32 / int32, deterministic."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, n_vocab + 1, dtype=np.float64)
    prior = -1.1 * np.log(ranks)  # Zipf-like unigram log-frequencies
    prior = prior[rng.permutation(n_vocab)]
    ref = np.empty((n_tokens, n_vocab), np.float64)
    for t in range(n_tokens):
        ctx = rng.standard_normal(n_vocab) * 1.5
        favourites = rng.choice(n_vocab, size=3, replace=False)
        ctx[favourites] += rng.uniform(4.0, 9.0, size=3)  # what this context predicts
        ref[t] = prior + ctx
    ref = ref.astype(np.float32)
    grid = 1.0 / 16.0
    other = np.round(ref / grid) * grid + rng.standard_normal(ref.shape) * 0.02
    unsure = rng.choice(n_tokens, size=n_tokens // 32, replace=False)
    other[unsure] += rng.standard_normal((unsure.size, n_vocab)) * 0.6  # harder positions
    other = other.astype(np.float32)
    # the actual next token: sampled from the reference distribution
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    u = rng.random(n_tokens)
    tokens = np.minimum((p.cumsum(1) < u[:, None]).sum(1), n_vocab - 1).astype(np.int32)
    return ref, other, tokens


def example_files(directory=None) -> tuple[str, str, str]:
    """Write the example into ``directory`` (default: a new temporary directory).

    Returns the paths of ``reference.npy``, ``other.npy`` and ``tokens.npy``.

    >>> import tempfile, numpy as np
    >>> ref, other, tokens = example_files(tempfile.mkdtemp())
    >>> np.load(ref, mmap_mode="r").shape, np.load(tokens).shape
    ((256, 512), (256,))
    """
    from ..io import save_npy

    if directory is None:
        import tempfile

        directory = tempfile.mkdtemp(prefix="kldiv-example-")
    os.makedirs(directory, exist_ok=True)
    ref, other, tokens = example_logits()
    paths = tuple(os.path.join(directory, f) for f in ("reference.npy", "other.npy", "tokens.npy"))
    for path, arr in zip(paths, (ref, other, tokens)):
        save_npy(path, arr)
    return paths
