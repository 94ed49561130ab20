"""Write a sparse teacher cache: run (or read) the teacher chunk by chunk, keep top-k + sampled tail.

Layout of ``DIR``:

* ``cache.json``: the header (format, provenance, settings, shard list when complete), written
  atomically first (``"complete": false``) and again at the end.
* ``shard-00000.safetensors``, ...: ``chunks_per_shard`` chunks of ``ctx`` positions each, each
  written atomically, with ``input_ids`` (chunks, ctx) int32 when the tokens are known and the
  fields of :func:`kldiv.cache.sparsify` of shape (chunks, ctx, K), (chunks, ctx) or
  (chunks, ctx, M). Position t of a chunk holds the teacher's distribution of the token after
  ``input_ids[t]``.

Resuming: a run into a ``DIR`` whose header has the same settings (teacher, tokens digest, K, M,
T, ctx, seed, shard size) skips the shards already there (complete, as they are written
atomically); other settings are an error. The tail samples of chunk c use the generator seeded
``seed + c``, so a resumed cache equals an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from .._atomic import save_atomic, write_text_atomic
from .._progress import progress_bar
from ._sparse import FIELDS, bytes_per_position, sparsify

FORMAT = "kldiv-sparse-teacher-cache"
VERSION = 1
HEADER = "cache.json"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tokenizer_identity(model_dir):
    """Class, name, vocabulary size and a digest of the vocabulary of the directory's tokenizer."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.fspath(model_dir))
    except Exception:  # no tokenizer there: say so in the header
        return None
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {"class": type(tok).__name__, "name_or_path": str(tok.name_or_path),
            "vocab_size": len(tok), "vocab_sha256": digest}


def _teacher_identity(teacher, path):
    if getattr(teacher, "kind", None) == "model":
        cfg = teacher.model.config
        cfg_file = os.path.join(os.fspath(path), "config.json")
        return {"kind": "model", "name": str(getattr(cfg, "_name_or_path", "") or path),
                "revision": getattr(cfg, "_commit_hash", None),
                "config_sha256": _sha256_file(cfg_file) if os.path.isfile(cfg_file) else None,
                "model_type": getattr(cfg, "model_type", None)}
    return {"kind": "logits", "name": os.path.abspath(os.fspath(path)), "revision": None,
            "file_sha256": _sha256_file(path)}


def build_cache(teacher, out, *, top_k, tokens=None, text=None, tail_samples=0, temperature=None,
                ctx=None, chunks_per_shard=16, batch=1, seed=0, dtype="float32", device=None,
                progress=None):
    """Write the cache of ``teacher`` (model directory or logits file) into ``out``.

    Returns the final header (a dict; ``"bytes_per_token"`` and ``"dense_float32_fraction"``
    are the measured storage). See :mod:`kldiv.cache.writer` for the layout.
    """
    import torch

    from ..eval.runner import HFModel, open_model, tokenize_text
    from ..io import load_tokens

    for name, v, lo in (("--top-k", top_k, 1), ("--tail-samples", tail_samples, 0),
                        ("--batch", batch, 1), ("--shard-chunks", chunks_per_shard, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if temperature is not None and not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a positive finite number, got {temperature!r}")
    if ctx is not None and ctx < 2:
        raise ValueError(f"--ctx must be >= 2, got {ctx}")
    if tokens is not None and text is not None:
        raise ValueError("give either --text or --tokens, not both")
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")

    model = open_model(teacher, side="reference", dtype=dtype, device=device)
    try:
        is_model = isinstance(model, HFModel)
        tok_id = None
        if text is not None:
            if not is_model:
                raise ValueError("--text needs a model directory with a tokenizer; with a logits "
                                 "file as TEACHER, give --tokens")
            ids, _ = tokenize_text(text, teacher)
        elif tokens is not None:
            ids = load_tokens(tokens).astype(np.int64)
        else:
            ids = None
            if is_model:
                raise ValueError("need --text FILE or --tokens FILE to run the teacher on")
        if is_model:
            tok_id = _tokenizer_identity(teacher)
        V = int(model.n_vocab)
        if top_k > V:
            raise ValueError(f"--top-k {top_k} exceeds the vocabulary size {V}")
        if is_model:
            ctx = 512 if ctx is None else int(ctx)
            n_chunks = ids.size // ctx
            if n_chunks < 1:
                raise ValueError(f"the text has {ids.size} tokens, fewer than one chunk of --ctx {ctx}")
            if ids.size and (ids.min() < 0 or ids.max() >= V):
                raise ValueError(f"token ids must lie in [0, {V}); got {ids.min()} .. {ids.max()}")
        else:
            n_rows = int(model.src.n_rows)
            ctx = min(512, n_rows) if ctx is None else int(ctx)
            n_chunks = n_rows // ctx
            if n_chunks < 1:
                raise ValueError(f"{model.name}: {n_rows} rows, fewer than one chunk of --ctx {ctx}")
            if ids is not None and ids.size < n_chunks * ctx:
                raise ValueError(f"--tokens: {ids.size} tokens for {n_chunks * ctx} rows of "
                                 f"{model.name}; need one token per row")
        tokens_digest = (hashlib.sha256(ids[: n_chunks * ctx].astype("<i8").tobytes()).hexdigest()
                         if ids is not None else None)
        settings = {"top_k": int(top_k), "tail_samples": int(tail_samples),
                    "temperature": None if temperature is None else float(temperature),
                    "ctx": int(ctx), "n_chunks": int(n_chunks), "seed": int(seed),
                    "chunks_per_shard": int(chunks_per_shard), "tokens_sha256": tokens_digest}
        teacher_info = _teacher_identity(model, teacher)
        header = {
            "format": FORMAT, "version": VERSION, "complete": False,
            "settings": settings,
            "teacher": teacher_info,
            "tokenizer": tok_id,
            "vocab_size": V,
            "log_probs": ("raw: log_softmax(logits)" if temperature is None else
                          f"processed: log_softmax(logits / {float(temperature)!r})"),
            "temperature_applied": None if temperature is None else float(temperature),
            "tail_proposal": "teacher tail p_i / r, i.i.d. with replacement; weight r / M",
            "has_input_ids": ids is not None,
            "fields": list(FIELDS),
        }
        os.makedirs(out, exist_ok=True)
        hpath = os.path.join(out, HEADER)
        if os.path.exists(hpath):
            try:
                with open(hpath, encoding="utf-8") as fh:
                    old = json.load(fh)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{hpath}: unreadable header ({exc}); use a fresh --out") from None
            same = (old.get("format") == FORMAT and old.get("settings") == settings
                    and old.get("teacher", {}).get("name") == teacher_info["name"])
            if not same:
                raise ValueError(f"--out {out}: holds a cache with other settings or another "
                                 f"teacher; use a fresh directory")
        else:
            write_text_atomic(hpath, json.dumps(header, indent=1) + "\n")

        n_shards = -(-n_chunks // chunks_per_shard)
        todo = [s for s in range(n_shards) if not os.path.exists(os.path.join(out, shard_name(s)))]
        bar = progress_bar(progress, n_chunks, desc="kldiv cache", unit="chunk")
        if bar is not None:
            bar.update((n_shards - len(todo)) * chunks_per_shard if todo else n_chunks)
        try:
            for s in todo:
                c0 = s * chunks_per_shard
                c1 = min(n_chunks, c0 + chunks_per_shard)
                parts = {f: [] for f in FIELDS}
                for b0 in range(c0, c1, batch):
                    b1 = min(c1, b0 + batch)
                    if is_model:
                        x = ids[b0 * ctx: b1 * ctx].reshape(b1 - b0, ctx)
                        z = model.block(x, 0, ctx, b0)
                    else:
                        z = model.block(np.zeros((b1 - b0, 1)), 0, ctx, b0)
                    z = torch.as_tensor(np.asarray(z) if not torch.is_tensor(z) else z).cpu()
                    z = z.reshape(b1 - b0, ctx, -1)
                    for c in range(b0, b1):
                        g = torch.Generator().manual_seed(int(seed) + c)
                        f = sparsify(z[c - b0], top_k, tail_samples, temperature=temperature,
                                     generator=g)
                        for k in FIELDS:
                            parts[k].append(f[k])
                    if bar is not None:
                        bar.update(b1 - b0)
                tensors = {k: torch.stack(v).contiguous() for k, v in parts.items()}
                if ids is not None:
                    tensors["input_ids"] = torch.as_tensor(
                        ids[c0 * ctx: c1 * ctx].reshape(c1 - c0, ctx).astype(np.int32))
                meta = {"first_chunk": str(c0), "n_chunks": str(c1 - c0)}
                from safetensors.torch import save_file

                save_atomic(os.path.join(out, shard_name(s)),
                            lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
        finally:
            if bar is not None:
                bar.close()
        shards = [shard_name(s) for s in range(n_shards)]
        total = sum(os.path.getsize(os.path.join(out, f)) for f in shards)
        n_pos = n_chunks * ctx
        header["complete"] = True
        header["shards"] = shards
        header["positions"] = n_pos
        header["bytes_on_disk"] = total
        header["bytes_per_token"] = total / n_pos
        header["bytes_per_token_payload"] = bytes_per_position(top_k, tail_samples, ids is not None)
        header["dense_float32_bytes_per_token"] = 4 * V
        header["dense_float32_fraction"] = total / n_pos / (4 * V)
        write_text_atomic(hpath, json.dumps(header, indent=1) + "\n")
        return header
    finally:
        model.close()
