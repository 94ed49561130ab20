"""Read a sparse teacher cache: a torch ``Dataset`` of chunks and a batch iterator."""
from __future__ import annotations

import json
import os

from ._sparse import FIELDS
from .writer import FORMAT, HEADER


class TeacherCache:
    """The cache in ``path`` (written by ``kldiv cache``) as a map-style torch ``Dataset``.

    ``cache[i]`` is chunk i as a dict of tensors: ``input_ids`` (ctx,) int64 (when the tokens
    are known), ``topk_ids`` (ctx, K) int64, ``topk_logprobs`` (ctx, K), ``tail_logmass``
    (ctx,), ``tail_ids`` (ctx, M) int64, ``tail_logprobs`` (ctx, M), ``tail_weights`` (ctx, M)
    (float32). :meth:`batches` stacks chunks into (B, ctx, ...) batches, aligned with the
    student's logits on ``input_ids`` (position t: the distribution of the token after t).
    ``header`` is the provenance dict (``cache.json``); ``len(cache)`` the number of chunks.
    One shard is held in memory at a time.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        hpath = os.path.join(self.path, HEADER)
        if not os.path.isfile(hpath):
            raise FileNotFoundError(f"{self.path}: no {HEADER}; not a kldiv teacher cache")
        with open(hpath, encoding="utf-8") as fh:
            try:
                self.header = json.load(fh)
            except ValueError as exc:
                raise ValueError(f"{hpath}: not valid JSON ({exc})") from None
        if self.header.get("format") != FORMAT:
            raise ValueError(f"{hpath}: not a kldiv teacher cache (format "
                             f"{self.header.get('format')!r})")
        if not self.header.get("complete"):
            raise ValueError(f"{self.path}: the cache is incomplete (an interrupted run); run "
                             f"`kldiv cache` again with the same options to finish it")
        st = self.header["settings"]
        self.ctx, self.n_chunks = st["ctx"], st["n_chunks"]
        self.top_k, self.tail_samples = st["top_k"], st["tail_samples"]
        self.per_shard = st["chunks_per_shard"]
        self.vocab_size = self.header["vocab_size"]
        self._shard = (None, None)

    def __len__(self):
        return self.n_chunks

    def _load(self, s):
        if self._shard[0] != s:
            from safetensors.torch import load_file

            f = os.path.join(self.path, self.header["shards"][s])
            self._shard = (s, load_file(f))
        return self._shard[1]

    def __getitem__(self, i):
        import torch

        if not -self.n_chunks <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range (the cache has {self.n_chunks})")
        i %= self.n_chunks
        s, j = divmod(i, self.per_shard)
        d = self._load(s)
        out = {}
        for k in (*FIELDS, "input_ids"):
            if k in d:
                x = d[k][j]
                out[k] = x.to(torch.int64) if k.endswith("ids") else x
        return out

    def batches(self, batch_size=1, *, shuffle=False, seed=0, drop_last=False):
        """Yield dicts of (B, ctx, ...) tensors; ``shuffle`` permutes chunks (seeded)."""
        import torch

        order = list(range(self.n_chunks))
        if shuffle:
            order = torch.randperm(self.n_chunks, generator=torch.Generator().manual_seed(seed)).tolist()
        for b0 in range(0, len(order), batch_size):
            idx = order[b0:b0 + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            items = [self[i] for i in idx]
            yield {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def __iter__(self):
        for i in range(self.n_chunks):
            yield self[i]
