"""Run a reference model and candidates side by side over a text, streaming the comparison.

The scoring window is llama.cpp's (``llama-perplexity --kl-divergence``): the tokens are cut
into non-overlapping chunks of ``ctx`` tokens (a partial last chunk is dropped); each chunk is
one forward pass, and the outputs at positions ``ctx // 2 .. ctx - 2`` are scored, each
predicting the next token of the chunk (``ctx - 1 - ctx // 2`` rows per chunk, the rows of a
llama.cpp KL base file). ``score="all"`` scores positions ``0 .. ctx - 2`` instead.

Memory: one batch of ``batch`` chunks is in flight at a time: the reference's logits of that
batch and one candidate's (never the whole text's), plus the metrics' per-token values for
exact quantiles (8 bytes per token and quantity up to ``max_exact`` tokens). On a GPU the
logits stay on the device and the per-row statistics are computed there (kldiv's core);
on the CPU they go through the compiled row kernel of ``kldiv compare``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from .._progress import progress_bar
from ..compare.api import _llamacpp_cut, _llamacpp_rows  # llama.cpp's KL rule, defined once there
from .metrics import DriftMetric, row_values, top_indices

DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def scored_positions(ctx: int, score: str = "half") -> tuple[int, int]:
    """``(first, stop)``: the scored positions of a chunk are ``first .. stop - 1``.

    >>> scored_positions(512), scored_positions(512, "all")
    ((256, 511), (0, 511))
    """
    if score == "half":
        return ctx // 2, ctx - 1
    if score == "all":
        return 0, ctx - 1
    raise ValueError(f"score must be 'half' (llama.cpp's window) or 'all', got {score!r}")


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_model_dir(path) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def disk_size(path) -> int | None:
    """Bytes of a model's weight files (or of a logits file), None if unknown."""
    try:
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                       if f.endswith(_WEIGHT_SUFFIXES))
        return os.path.getsize(path)
    except OSError:
        return None


class HFModel:
    """A Hugging Face causal LM from a local directory (or hub id), run with torch."""

    kind = "model"

    def __init__(self, path, *, dtype="float32", device=None):
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise ValueError(f"{path}: running a model needs torch and transformers "
                             f"(pip install 'kldiv[eval]'): {exc}") from None
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.torch = torch
        self.name = os.fspath(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"--device {self.device!r}: {_first_line(exc)}") from None
        import transformers

        major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
        dkw = "dtype" if major_minor >= (4, 56) else "torch_dtype"  # renamed in 4.56
        try:
            model = AutoModelForCausalLM.from_pretrained(self.name, **{dkw: getattr(torch, dtype)})
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"{self.name}: cannot load a causal language model: {_first_line(exc)}") from None
        try:
            self.model = model.to(self.device).eval()
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"{self.name}: cannot move the model to {self.device}: {_first_line(exc)}") from None
        self.n_vocab = int(model.config.vocab_size)
        self.size = disk_size(self.name)
        import inspect

        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.forward_seconds = 0.0

    def block(self, ids: np.ndarray, first: int, stop: int, chunk0: int) -> np.ndarray:
        """Logits at positions ``first .. stop - 1`` of each row of ``ids`` (B, ctx): (B * rows, V)."""
        torch = self.torch
        t0 = time.perf_counter()
        x = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        kw = {}
        ctx = ids.shape[1]
        if self._keep and first > 0:
            kw["logits_to_keep"] = ctx - first  # positions first .. ctx - 1 only (the lm head's work halves)
        with torch.inference_mode():
            try:
                logits = self.model(input_ids=x, use_cache=False, **kw).logits
            except (RuntimeError, IndexError, ValueError, TypeError) as exc:  # e.g. ctx beyond the positions
                limit = getattr(self.model.config, "max_position_embeddings", None)
                hint = f" (the model has {limit} positions; --ctx is {ctx})" if limit and ctx > limit else ""
                raise ValueError(f"{self.name}: forward pass failed{hint}: {_first_line(exc)}") from None
            off = ctx - logits.shape[1]
            out = logits[:, first - off:stop - off, :].float()
            if out.shape[-1] != self.n_vocab:
                self.n_vocab = int(out.shape[-1])
            out = out.reshape(-1, out.shape[-1])
            if out.device.type == "cpu":
                out = out.numpy()  # the compiled row kernel's input
            # on an accelerator the logits stay there: row_values computes on the device
        if self.device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.forward_seconds += time.perf_counter() - t0
        return out

    def close(self):
        self.model = None


class FileLogits:
    """Logits read from a file that ``kldiv compare`` reads: its rows are the scored positions,
    chunk after chunk (as ``--save-reference`` writes them)."""

    kind = "logits"

    def __init__(self, path, *, side):
        from ..io import open_logits

        self.src = open_logits(path, side=side)
        self.name = self.src.name
        self.n_vocab = self.src.n_vocab
        self.size = disk_size(path)
        self.forward_seconds = 0.0
        self.n_ctx = getattr(self.src, "n_ctx", None)
        self.all_tokens = getattr(self.src, "all_tokens", None)
        self.rows_per_chunk = None  # set by evaluate

    def block(self, ids, first, stop, chunk0) -> np.ndarray:
        t0 = time.perf_counter()
        per = stop - first
        s = chunk0 * per
        e = s + ids.shape[0] * per
        out = np.asarray(self.src.read(s, e), dtype=np.float32)
        self.src.release(s, e)
        self.forward_seconds += time.perf_counter() - t0
        return out

    def token_floor(self, chunk0, n_chunks, per, tok):
        """llama.cpp's stored log-probability of each row's token (for -inf decoded entries)."""
        f = getattr(self.src, "stored_log_probs", None)
        if f is None:
            return None
        s = chunk0 * per
        return f(s, s + n_chunks * per, tok)

    def close(self):
        self.src.close()


def open_model(path, *, side, dtype="float32", device=None):
    """An :class:`HFModel` for a model directory (or hub id), a :class:`FileLogits` for a file
    (an already opened :class:`HFModel` / :class:`FileLogits` is returned as it is)."""
    if isinstance(path, (HFModel, FileLogits)):
        return path
    p = os.fspath(path)
    if os.path.isfile(p):
        return FileLogits(p, side=side)
    if _is_model_dir(p):
        return HFModel(p, dtype=dtype, device=device)
    if os.path.isdir(p) and os.path.isfile(os.path.join(p, "cache.json")):
        raise ValueError(f"{p}: a sparse teacher cache can be the REFERENCE only (it has no dense "
                         f"logits to score against another reference)")
    if os.path.isdir(p):
        raise ValueError(f"{p}: a directory without config.json (not a Hugging Face model directory)")
    if os.path.exists(p):
        raise ValueError(f"{p}: neither a model directory nor a logits file")
    if p.count("/") == 1 and not p.startswith((".", "/")) and not os.path.splitext(p)[1]:
        return HFModel(p, dtype=dtype, device=device)  # a hub id (needs the network or the cache)
    raise FileNotFoundError(f"{p}: no such model directory or logits file")


def tokenize_text(path, tokenizer_dir) -> tuple[np.ndarray, int | None]:
    """Token ids of a text file with the tokenizer of ``tokenizer_dir``, and its BOS id if the
    tokenizer puts one first (llama.cpp then starts every chunk with BOS)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such text file")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ValueError(f"--text needs transformers (pip install 'kldiv[eval]'): {exc}") from None
    try:
        tok = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{tokenizer_dir}: no usable tokenizer ({msg}); give the token ids with "
                         f"--tokens instead") from None
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    ids = np.asarray(tok(text, add_special_tokens=True)["input_ids"], dtype=np.int64)
    bos = tok.bos_token_id
    bos = int(bos) if bos is not None and ids.size and ids[0] == bos else None
    return ids, bos


@dataclass
class EvalData:
    """What :func:`evaluate` collects, for :class:`~kldiv.eval.result.EvalResult`."""

    reference: str
    candidates: list
    metrics: list
    chunk_tokens: np.ndarray      # (n_chunks,) scored tokens per chunk
    chunk_kl: np.ndarray          # (n_candidates, n_chunks) per-chunk KL sums
    chunk_flips: np.ndarray       # (n_candidates, n_chunks) tokens whose top-1 changed
    position_kl: np.ndarray       # (n_candidates, rows_per_chunk) KL summed over chunks
    settings: dict
    timing: dict
    sizes: list


def open_candidates(candidates, opened, *, dtype, device):
    """The candidates opened as models (``open_model``); those opened here are appended to
    ``opened`` (the caller closes them), models passed in stay the caller's."""
    cands = []
    for c in candidates:
        m = open_model(c, side="other", dtype=dtype, device=device)
        if m is not c:
            opened.append(m)
        cands.append(m)
    return cands


def evaluate(reference, candidates, *, tokens=None, text=None, ctx=None, chunks=None,
             batch: int = 1, dtype: str = "float32", device=None, score: str = "half", bos="auto",
             save_reference=None, progress=None, topk=(5, 10), max_exact=None, threads=None,
             llamacpp=None):
    """Score each candidate against the reference on the same tokens; see :mod:`kldiv.eval.runner`.

    ``reference``/``candidates``: model directories (Hugging Face causal LMs) or logits files.
    ``tokens``: token ids (array or a .npy / text file); ``text``: a text file tokenized with the
    reference's tokenizer (the first candidate's when the reference is a file). A llama.cpp KL
    base file as reference brings its tokens and ``ctx`` (default ``ctx``: 512, llama.cpp's). ``bos``: "auto" (the tokenizer's BOS
    starts every chunk when it starts the text, as llama.cpp), None, or a token id.
    ``llamacpp``: with a llama.cpp KL base file as reference (the default decides from its
    format, as ``kldiv compare``), the forward KL and the reference's token probability are
    llama.cpp's own (stored log-probabilities as they are, terms <= -16 left out), so that the
    numbers equal ``kldiv compare``'s and ``llama-perplexity --kl-divergence``'s; False: kldiv's
    renormalised reference row.
    ``reference`` may also be a sparse teacher cache directory (``kldiv cache``): then the
    candidates run on its tokens and the result is a :class:`~kldiv.eval.sparse.CacheResult`
    (certified KL bounds and the statistics a top-k reference determines; see
    :mod:`kldiv.eval.sparse`).
    Returns an :class:`~kldiv.eval.result.EvalResult`.
    """
    from ..io import load_tokens
    from .result import EvalResult
    from .sparse import CacheReference, evaluate_cache, is_cache_dir

    if isinstance(candidates, (str, os.PathLike)):
        candidates = [candidates]
    if not candidates:
        raise ValueError("need at least one CANDIDATE")
    if isinstance(reference, CacheReference) or is_cache_dir(reference):
        # a sparse teacher cache (kldiv cache): certified KL bounds and what a top-k reference
        # determines (kldiv.eval.sparse); returns a CacheResult
        if save_reference is not None:
            raise ValueError(f"--save-reference: {os.fspath(getattr(reference, 'path', reference))} is a "
                             f"sparse teacher cache; it has no dense logits to save")
        if llamacpp:
            raise ValueError("llama.cpp's statistics need a llama.cpp KL base file as REFERENCE, "
                             "not a teacher cache")
        if batch < 1:
            raise ValueError(f"--batch must be >= 1, got {batch}")
        if chunks is not None and chunks < 1:
            raise ValueError(f"--chunks must be >= 1, got {chunks}")
        if tokens is not None and text is not None:
            raise ValueError("give either --text or --tokens, not both")
        return evaluate_cache(reference, candidates, tokens=tokens, text=text, ctx=ctx, chunks=chunks,
                              batch=batch, dtype=dtype, device=device, score=score, bos=bos,
                              progress=progress, topk=topk, max_exact=max_exact)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if chunks is not None and chunks < 1:
        raise ValueError(f"--chunks must be >= 1, got {chunks}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if tokens is not None and text is not None:
        raise ValueError("give either --text or --tokens, not both")

    opened = []  # closed at the end: the models opened here (not those passed in opened)
    try:
        ref = open_model(reference, side="reference", dtype=dtype, device=device)
        if ref is not reference:
            opened.append(ref)
        cands = open_candidates(candidates, opened, dtype=dtype, device=device)

        for m in (ref, *cands):  # a model passed in opened may have run before
            m.forward_seconds = 0.0

        # --- tokens and window --------------------------------------------------------------
        bos_id = None
        if tokens is None and text is None:
            if isinstance(ref, FileLogits) and ref.all_tokens is not None:
                ids = ref.all_tokens.astype(np.int64)
            else:
                raise ValueError("need --text FILE or --tokens FILE (or a llama.cpp KL base file as "
                                 "REFERENCE, which carries its tokens)")
        elif text is not None:
            tk = next((m.name for m in (ref, *cands) if isinstance(m, HFModel)), None)
            if tk is None:
                raise ValueError("--text needs a model directory with a tokenizer; with logits files "
                                 "only, give --tokens")
            ids, bos_id = tokenize_text(text, tk)
        elif isinstance(tokens, (str, os.PathLike)):
            ids = load_tokens(tokens).astype(np.int64)
        else:
            ids = np.asarray(tokens)
            if not np.issubdtype(ids.dtype, np.integer):
                raise TypeError(f"tokens: expected integer token ids, got dtype {ids.dtype}")
            ids = ids.reshape(-1).astype(np.int64)
        if bos == "auto":
            pass
        elif bos is None:
            bos_id = None
        else:
            bos_id = int(bos)

        if isinstance(ref, FileLogits) and ref.n_ctx:
            if ctx is not None and ctx != ref.n_ctx:
                raise ValueError(f"--ctx {ctx} differs from {ref.name}'s n_ctx = {ref.n_ctx}")
            ctx = ref.n_ctx
            if score != "half":
                raise ValueError(f"{ref.name}: a llama.cpp KL base file holds llama.cpp's window only; "
                                 f"--all-positions needs a model or an .npy/.safetensors reference")
            if tokens is not None or text is not None:
                n = min(ids.size, ref.all_tokens.size)
                if n < ref.all_tokens.size or not np.array_equal(ids[:n], ref.all_tokens[:n]):
                    raise ValueError(f"the given tokens differ from the token table of {ref.name}")
        if ctx is None:
            ctx = 512
        if ctx < 3:
            raise ValueError(f"--ctx must be >= 3, got {ctx}")
        lcpp = isinstance(ref, FileLogits) and ref.src.format == "llama.cpp-kld"
        if llamacpp and not lcpp:
            raise ValueError("llama.cpp's statistics need a llama.cpp KL base file as REFERENCE")
        lcpp = lcpp if llamacpp is None else bool(llamacpp)
        first, stop = scored_positions(ctx, score)
        per = stop - first
        n_avail = ids.size // ctx
        if n_avail < 1:
            raise ValueError(f"the text has {ids.size} tokens, fewer than one chunk of --ctx {ctx}")
        n_chunks = n_avail if chunks is None else min(chunks, n_avail)

        vocab = {m.name: m.n_vocab for m in (ref, *cands)}
        if len(set(vocab.values())) != 1:
            raise ValueError("vocabulary sizes differ: " + ", ".join(f"{k} has {v}" for k, v in vocab.items()))
        v = ref.n_vocab
        used = ids[: n_chunks * ctx]
        bad = (used < 0) | (used >= v)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"token id {int(used[i])} at position {i} is outside the vocabulary [0, {v})")
        for m in (ref, *cands):
            if isinstance(m, FileLogits):
                need = n_chunks * per
                if m.src.n_rows < need or m.src.n_rows % per:
                    raise ValueError(
                        f"{m.name}: {m.src.n_rows} rows, but {n_chunks} chunks of --ctx {ctx} need {need} "
                        f"rows ({per} scored positions per chunk"
                        + (", llama.cpp's window" if score == "half" else ", every position") + ")")

        # --- the loop ----------------------------------------------------------------------------
        kw = {} if max_exact is None else {"max_exact": max_exact}
        metrics = [DriftMetric(topk=topk, threads=threads, **kw) for _ in cands]
        k = len(cands)
        chunk_kl = np.zeros((k, n_chunks))
        chunk_flips = np.zeros((k, n_chunks))
        position_kl = np.zeros((k, per))
        writer = _open_writer(save_reference, v, used, ctx, n_chunks * per, score)
        t_cmp = 0.0
        bar = progress_bar(progress, n_chunks * ctx, desc="kldiv eval", unit="tok")
        t_start = time.perf_counter()
        try:
            if writer is not None:
                writer.__enter__()
            for c0 in range(0, n_chunks, batch):
                c1 = min(n_chunks, c0 + batch)
                chunk_ids = used[c0 * ctx:c1 * ctx].reshape(c1 - c0, ctx)
                fwd = chunk_ids.copy()
                if bos_id is not None:
                    fwd[:, 0] = bos_id
                nxt = np.ascontiguousarray(chunk_ids[:, first + 1:stop + 1]).reshape(-1)
                a = ref.block(fwd, first, stop, c0)
                if writer is not None:
                    writer.write(a if isinstance(a, np.ndarray) else a.cpu().numpy())
                floor = ref.token_floor(c0, c1 - c0, per, nxt) if isinstance(ref, FileLogits) else None
                t0 = time.perf_counter()
                ref_top = None  # the reference's top-k, once per batch for all candidates
                if isinstance(a, np.ndarray) and len(cands) > 1 and topk:
                    ref_top = top_indices(a, max(min(int(k), v) for k in topk))
                t_cmp += time.perf_counter() - t0
                a_cmp = a
                if lcpp:  # llama.cpp's reference: stored values, terms <= -16 left out
                    s0 = c0 * per
                    a_cmp, top, top_empty, lp_tok = _llamacpp_cut(ref.src.read_stored(s0, s0 + (c1 - c0) * per), nxt)
                for i, cand in enumerate(cands):
                    b = cand.block(fwd, first, stop, c0)
                    t0 = time.perf_counter()
                    vals = row_values(a_cmp, b, nxt, topk=metrics[i].topk, threads=threads,
                                      names=(ref.name, cand.name),
                                      ref_top=None if (not isinstance(b, np.ndarray) or lcpp) else ref_top)
                    if lcpp:
                        r = SimpleNamespace(kl=vals["kl"], logz_ref=vals["logz_ref"], top_ref=vals["top_ref"])
                        vals["kl"] = _llamacpp_rows(r, top, top_empty)
                        vals["lp_ref"] = lp_tok.copy()
                        # reverse KL and JS on the renormalised reference (the decoded window), as
                        # kldiv compare: llama.cpp's cut reference serves its KL only
                        full = row_values(a, b, topk=(), threads=threads, names=(ref.name, cand.name))
                        vals["reverse_kl"], vals["js"] = full["reverse_kl"], full["js"]
                    elif floor is not None:  # llama.cpp's stored value for a token below the window
                        low = vals["lp_ref"] == -np.inf
                        vals["lp_ref"][low] = floor[low]
                    if isinstance(cand, FileLogits):
                        cf = cand.token_floor(c0, c1 - c0, per, nxt)
                        if cf is not None:
                            low = vals["lp_other"] == -np.inf
                            vals["lp_other"][low] = cf[low]
                    metrics[i].update_values(vals)
                    klc = vals["kl"].reshape(c1 - c0, per)
                    chunk_kl[i, c0:c1] = klc.sum(axis=1)
                    chunk_flips[i, c0:c1] = (vals["top_ref"] != vals["top_other"]).reshape(c1 - c0, per).sum(axis=1)
                    position_kl[i] += klc.sum(axis=0)
                    t_cmp += time.perf_counter() - t0
                    del b
                del a
                if bar is not None:
                    bar.update((c1 - c0) * ctx)
            if writer is not None:
                writer.__exit__(None, None, None)
                writer = None
        except BaseException as exc:
            if writer is not None:
                writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t_start
        timing = {"wall_seconds": wall, "compare_seconds": t_cmp,
                  "forward_seconds": {m.name: m.forward_seconds for m in (ref, *cands)},
                  "tokens_per_second": n_chunks * ctx / wall if wall > 0 else None}
        fwd_total = sum(m.forward_seconds for m in (ref, *cands))
        timing["compare_share_of_forward"] = t_cmp / fwd_total if fwd_total > 0 else None
        settings = {"statistics": "llama.cpp" if lcpp else "kldiv", "ctx": ctx, "chunks": n_chunks, "chunks_available": n_avail, "batch": batch,
                    "dtype": dtype, "score": score, "scored_per_chunk": per, "first_scored": first,
                    "bos": bos_id, "n_vocab": v, "text_tokens": int(ids.size),
                    "save_reference": None if save_reference is None else os.fspath(save_reference)}
        data = EvalData(reference=ref.name, candidates=[m.name for m in cands], metrics=metrics,
                        chunk_tokens=np.full(n_chunks, per, np.int64), chunk_kl=chunk_kl,
                        chunk_flips=chunk_flips, position_kl=position_kl, settings=settings,
                        timing=timing, sizes=[m.size for m in cands])
        return EvalResult(data)
    finally:
        for m in opened:
            m.close()


def _open_writer(path, n_vocab, tokens, ctx, n_rows, score):
    """A streaming writer for ``--save-reference`` (format from the suffix), not yet entered."""
    if path is None:
        return None
    from ..io import LlamaCppKldWriter, NpyWriter, SafetensorsWriter
    from ..io.writers import SUFFIXES

    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in SUFFIXES:
        raise ValueError(f"--save-reference {os.fspath(path)}: cannot tell the format from the name; "
                         f"end it with {', '.join(SUFFIXES)}")
    fmt = SUFFIXES[ext]
    if fmt == "llamacpp":
        if score != "half":
            raise ValueError(f"{path}: llama.cpp's KL base format holds llama.cpp's window only "
                             f"(drop --all-positions, or save as .npy/.safetensors)")
        return LlamaCppKldWriter(path, n_vocab, tokens=tokens, n_ctx=ctx, name=os.fspath(path))
    if fmt == "npy":
        return NpyWriter(path, (n_rows, n_vocab), name=os.fspath(path))
    return SafetensorsWriter(path, (n_rows, n_vocab), name=os.fspath(path))
