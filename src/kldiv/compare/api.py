"""``compare(reference, other)``: stream two logits files through the row kernel into a Report."""
from __future__ import annotations

import os

import numpy as np

from .._progress import progress_bar
from ..io import load_tokens, open_logits
from . import kernel as K
from .report import Report

_CHUNK_BYTES = 32 << 20  # per side and block: bounded memory whatever the number of tokens


def _status_error(code: int, row: int, ref, oth, tok_name) -> str:
    parts = []
    if code & (K.NAN_REF | K.PINF_REF | K.EMPTY_REF):
        what = ("NaN" if code & K.NAN_REF else "+inf" if code & K.PINF_REF else "no finite")
        parts.append(f"{ref.name}: row {row} has {what} logits")
    if code & (K.NAN_OTHER | K.PINF_OTHER | K.EMPTY_OTHER):
        what = ("NaN" if code & K.NAN_OTHER else "+inf" if code & K.PINF_OTHER else "no finite")
        parts.append(f"{oth.name}: row {row} has {what} logits")
    if code & K.BAD_TOKEN:
        parts.append(f"{tok_name}: token of row {row} is outside the vocabulary [0, {ref.n_vocab})")
    return "; ".join(parts)


def compare(reference, other, *, tokens=None, reverse=False, js=False, skip_nan=False,
            key=None, other_key=None, threads=None, progress=None, chunk_rows=None,
            force_fallback=False) -> Report:
    """Per-token divergence of ``other`` from ``reference``, streamed over two logits files.

    .. math::

        \\mathrm{KL}_t = \\sum_i p_{t,i} \\log \\frac{p_{t,i}}{q_{t,i}},\\qquad
        p_t = \\mathrm{softmax}(\\text{reference}_t),\\ q_t = \\mathrm{softmax}(\\text{other}_t)

    for every row t (one token position), with the same accurate formula as
    ``kldiv.kl_div(p, q, p_space="logits", q_space="logits")``, plus the top-1 agreement and, when
    the actual next tokens are known, ``delta_p = q_t(token) - p_t(token)``.

    Args:
        reference, other: paths to .npy / .safetensors / llama.cpp KL base files (recognised by
            content; mixed formats are fine), or in-memory arrays of shape (rows, vocab) or
            (..., vocab). Row counts and vocabulary sizes must agree.
        tokens: the token that followed each row: a path (.npy or text) or an int array of
            length rows. Defaults to the tokens stored in a llama.cpp KL base file, if any.
        reverse: also compute KL(other || reference) per token.
        js: also compute the Jensen-Shannon divergence (beta = 1/2, nats; in the compiled kernel
            for rows with finite logits, float64 NumPy code for the others).
        skip_nan: skip rows that contain NaN (counted in the report) instead of raising.
        key, other_key: tensor names inside safetensors files with several tensors.
        threads: worker threads of the compiled kernel (default: all cores).
        progress: show a progress bar (default: only when stderr is a terminal and CI is unset).
        chunk_rows: rows per block (default: about 32 MB per side).
        force_fallback: use the NumPy kernel even when the compiled one is available.

    Returns:
        A :class:`~kldiv.compare.report.Report`.

    Raises:
        ValueError naming the file and row: truncated/corrupt files, wrong magic, mismatched
        shapes, NaN/+inf logits (unless ``skip_nan`` for NaN), tokens outside the vocabulary.

    Edge cases: a row where the other model gives probability 0 (logit -inf) to a token the
    reference supports has KL = +inf; -inf logits are allowed otherwise.

    >>> import numpy as np
    >>> ref = np.log([[0.5, 0.5], [0.9, 0.1]])
    >>> oth = np.log([[0.25, 0.75], [0.9, 0.1]])
    >>> r = compare(ref, oth)
    >>> r.kl.round(6).tolist()   # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.143841; identical rows: 0
    [0.143841, 0.0]
    """
    ref = open_logits(reference, key=key, side="reference")
    oth = open_logits(other, key=other_key, side="other")
    try:
        return _compare(ref, oth, tokens, reverse, js, skip_nan, threads, progress, chunk_rows,
                        force_fallback)
    finally:
        if ref is not reference:
            ref.close()
        if oth is not other:
            oth.close()


def _compare(ref, oth, tokens, reverse, js, skip_nan, threads, progress, chunk_rows, force_fallback):
    if ref.n_vocab != oth.n_vocab:
        raise ValueError(f"vocabulary sizes differ: {ref.name} has {ref.n_vocab} categories per row, "
                         f"{oth.name} has {oth.n_vocab}")
    if ref.n_rows != oth.n_rows:
        hint = ""
        for src in (ref, oth):
            if getattr(src, "n_ctx", None):
                hint = (f" ({src.name} is a llama.cpp KL base file: it holds only the scored positions "
                        f"{src.n_ctx // 2}..{src.n_ctx - 2} of each chunk of {src.n_ctx} tokens, "
                        f"{src.n_ctx - 1 - src.n_ctx // 2} rows per chunk; the other file needs the same rows)")
        raise ValueError(f"row counts differ: {ref.name} has {ref.n_rows} rows, {oth.name} has "
                         f"{oth.n_rows}{hint}")
    n, v = ref.n_rows, ref.n_vocab
    tok_name = "tokens"
    if tokens is None:
        tok = ref.tokens if ref.tokens is not None else oth.tokens
        if tok is not None:
            tok_name = (ref if ref.tokens is not None else oth).name + " (token table)"
    elif isinstance(tokens, (str, os.PathLike)):
        tok_name = os.fspath(tokens)
        tok = load_tokens(tokens, n)
    else:
        tok = np.asarray(tokens)
        if not np.issubdtype(tok.dtype, np.integer):
            raise TypeError(f"tokens: expected integer token ids, got dtype {tok.dtype}")
        tok = tok.reshape(-1)
        if tok.shape[0] != n:
            raise ValueError(f"tokens: {tok.shape[0]} tokens for {n} rows (one token per row expected)")
    if tok is not None:
        tok = np.ascontiguousarray(tok, dtype=np.int32)

    f64 = ref.read(0, min(1, n)).dtype == np.float64 or oth.read(0, min(1, n)).dtype == np.float64
    numpy_path = force_fallback or f64 or K.extension() is None
    rows_per = chunk_rows or max(1, _CHUNK_BYTES // (4 * v))
    if numpy_path and not chunk_rows:
        rows_per = max(1, rows_per // 8)  # the float64 NumPy code makes ~10 temporaries per block
    kl = np.empty(n, np.float64)
    rkl = np.empty(n, np.float64) if reverse else None
    jsv = np.empty(n, np.float64) if js else None
    same = np.empty(n, bool)
    ptop = np.empty(n, np.float64)
    lpa = np.empty(n, np.float64) if tok is not None else None
    lpb = np.empty(n, np.float64) if tok is not None else None
    keep = np.ones(n, bool)

    bar = progress_bar(progress, n, desc="kldiv compare", unit="tok")
    try:
        for s in range(0, n, rows_per):
            e = min(n, s + rows_per)
            a = ref.read(s, e)
            b = oth.read(s, e)
            r = K.row_stats(a, b, tokens=None if tok is None else tok[s:e], reverse=reverse, js=js,
                            threads=threads, force_fallback=force_fallback)
            bad = np.flatnonzero(r.status)
            if bad.size:
                nan_only = (r.status[bad] & ~(K.NAN_REF | K.NAN_OTHER)) == 0
                if skip_nan and nan_only.all():
                    keep[s + bad] = False
                else:
                    i = bad[0] if not skip_nan else bad[~nan_only][0]
                    raise ValueError(_status_error(int(r.status[i]), s + int(i), ref, oth, tok_name))
            kl[s:e] = r.kl
            if reverse:
                rkl[s:e] = r.rkl
            if js:
                jsv[s:e] = r.js
            same[s:e] = r.top_ref == r.top_other
            ptop[s:e] = np.exp(-r.logz_ref)
            if tok is not None:
                lpa[s:e] = r.lp_ref_tok
                lpb[s:e] = r.lp_other_tok
                # a llama.cpp reference decodes entries below its window as probability 0; for the
                # token's own probability use the stored floor value, as llama.cpp does
                for src, lp in ((ref, lpa), (oth, lpb)):
                    floor = getattr(src, "stored_log_probs", None)
                    blk = lp[s:e]
                    low = np.flatnonzero(blk == -np.inf)
                    if floor is not None and low.size:
                        t = tok[s:e]
                        vals = floor(s, e, np.clip(t, 0, v - 1))
                        blk[low] = vals[low]
            ref.release(s, e)
            oth.release(s, e)
            if bar is not None:
                bar.update(e - s)
    finally:
        if bar is not None:
            bar.close()

    rows = np.flatnonzero(keep)
    sel = (lambda x: None if x is None else x[keep]) if not keep.all() else (lambda x: x)
    dp = nll_r = nll_o = None
    if tok is not None:
        la, lb = sel(lpa), sel(lpb)
        dp = np.exp(lb) - np.exp(la)
        nll_r, nll_o = -la, -lb
    kernel = "numpy-float64" if numpy_path else "c-float32"
    return Report(
        reference=ref.name, other=oth.name, n_vocab=v, n_rows=n,
        kl=sel(kl), rows=rows, same_top=sel(same), p_top_ref=sel(ptop),
        reverse_kl=sel(rkl), js=sel(jsv), delta_p=dp, nll_ref=nll_r, nll_other=nll_o,
        skipped_rows=np.flatnonzero(~keep), formats=(ref.format, oth.format), kernel=kernel,
    )
