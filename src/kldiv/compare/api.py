"""``compare(reference, other)``: stream two logits files through the row kernel into a Report."""
from __future__ import annotations

import os
import warnings

import numpy as np

from .._progress import progress_bar
from ..io import load_tokens, open_logits
from . import kernel as K
from .report import Report

_CHUNK_BYTES = 32 << 20  # per side and block: bounded memory whatever the number of tokens
_LLAMACPP_CUT = -16.0    # llama.cpp drops reference terms with log-probability <= -16
_SPACES = ("logits", "log_probs", "probs")


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
            force_fallback=False, llamacpp=None, ref_space="logits", other_space="logits",
            _names=None) -> Report:
    """Per-token divergence of ``other`` from ``reference``, streamed over two logits files.

    .. math::

        \\mathrm{KL}_t = \\sum_i p_{t,i} \\log \\frac{p_{t,i}}{q_{t,i}},\\qquad
        p_t = \\mathrm{softmax}(\\text{reference}_t),\\ q_t = \\mathrm{softmax}(\\text{other}_t)

    for every row t (one token position), with the same accurate formula as
    ``kldiv.kl_div(p, q, p_space="logits", q_space="logits")``, plus the top-1 agreement and, when
    the actual next tokens are known, ``delta_p = q_t(token) - p_t(token)``.

    With a llama.cpp KL base file as the reference (``llamacpp=None``, the default, decides
    from the reference's format), the statistics are llama.cpp's own: the reference row is the
    stored log-probabilities ``l_i`` as they are, not renormalised, and terms with
    ``l_i <= -16`` are left out,

    .. math::

        \\mathrm{KL}^{\\text{llama.cpp}}_t = \\sum_{i:\\, l_i > -16} e^{l_i} (l_i - \\log q_{t,i}),

    the token's reference probability is its stored value ``e^{l_token}``, and the quantiles are
    interpolated in float32 as llama.cpp does, so that ``llama-perplexity --kl-divergence``
    prints the same numbers. ``llamacpp=False`` gives kldiv's variant (the decoded reference row
    renormalised, entries below the stored window probability 0); ``llamacpp=True`` applies
    llama.cpp's rule to a reference of log-probabilities in another format. Reverse KL and JS
    always use the renormalised reference (for a KL base file: the decoded window renormalised,
    whatever ``llamacpp`` says). The reverse KL against a llama.cpp KL base file is refused: the
    file does not hold the reference's probabilities below its window, and KL(other ||
    reference) is unbounded above over what it allows (see ``reverse`` below).

    Args:
        reference, other: paths to .npy / .safetensors / llama.cpp KL base files (recognised by
            content; mixed formats are fine), or in-memory arrays of shape (rows, vocab) or
            (..., vocab). Row counts and vocabulary sizes must agree.
        tokens: the token that followed each row: a path (.npy or text) or an int array of
            length rows. Defaults to the tokens stored in a llama.cpp KL base file, if any.
        reverse: also compute KL(other || reference) per token. Not with a llama.cpp KL base
            file as reference (ValueError): it keeps each row only within 16 nats of its largest
            log-probability, so the reference's probability of the other tokens is unknown
            (anything below the window's floor) and the reverse KL is unbounded above; decoded
            as probability 0 it would be +inf on nearly every row of a real model.
        js: also compute the Jensen-Shannon divergence (beta = 1/2, nats; in the compiled kernel
            for float32 rows with finite logits, the core's cancellation-free float64 algebra
            for the others and for float64 inputs: full relative accuracy at any JS).
        skip_nan: skip rows that contain NaN (counted in the report) instead of raising.
        key, other_key: tensor names inside safetensors files with several tensors.
        threads: worker threads of the compiled kernel (default: all cores).
        progress: show a progress bar (default: only when stderr is a terminal and CI is unset).
        chunk_rows: rows per block (default: about 32 MB per side).
        force_fallback: use the NumPy kernel even when the compiled one is available.
        llamacpp: llama.cpp's statistics (see above); default: when the reference is a
            llama.cpp KL base file.
        ref_space, other_space: what each file holds: "logits" (default; log-probabilities
            are logits too), "log_probs" (the same, said explicitly) or "probs" (probabilities,
            logged block by block). A "logits" file whose rows look like probabilities
            (values in [0, 1], rows summing to 1) gets a warning.

    Returns:
        A :class:`~kldiv.compare.report.Report`.

    Raises:
        ValueError naming the file and row: truncated/corrupt files, wrong magic, mismatched
        shapes, files without rows, NaN/+inf logits (unless ``skip_nan`` for NaN), negative
        probabilities, tokens outside the vocabulary.

    Edge cases: a row where the other model gives probability 0 (logit -inf) to a token the
    reference supports has KL = +inf; -inf logits are allowed otherwise.

    >>> import numpy as np
    >>> ref = np.log([[0.5, 0.5], [0.9, 0.1]])
    >>> oth = np.log([[0.25, 0.75], [0.9, 0.1]])
    >>> r = compare(ref, oth)
    >>> r.kl.round(6).tolist()   # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.143841; identical rows: 0
    [0.143841, 0.0]
    """
    names = {"key": "key=", "other_key": "other_key=", "tokens": "tokens"}
    names.update(_names or {})
    for label, space in (("ref_space", ref_space), ("other_space", other_space)):
        if space not in _SPACES:
            raise ValueError(f"{names.get(label, label)} must be one of {', '.join(_SPACES)}, got {space!r}")
    ref = open_logits(reference, key=key, side="reference", key_name=names["key"])
    try:
        oth = open_logits(other, key=other_key, side="other", key_name=names["other_key"])
    except BaseException:
        if ref is not reference:
            ref.close()
        raise
    try:
        if llamacpp is None:
            llamacpp = ref.format == "llama.cpp-kld"
        return _compare(ref, oth, tokens, reverse, js, skip_nan, threads, progress, chunk_rows,
                        force_fallback, bool(llamacpp), (ref_space, other_space), names)
    finally:
        if ref is not reference:
            ref.close()
        if oth is not other:
            oth.close()


def _as_logits(block, space, src, start):
    """A block of ``space`` values as logits: probabilities are logged (negative ones are errors)."""
    if space != "probs":
        return block
    neg = (block < 0).any(1)
    if neg.any():
        r = start + int(np.argmax(neg))
        raise ValueError(f"{src.name}: row {r} has negative probabilities (read as probabilities)")
    with np.errstate(divide="ignore"):
        return np.log(block)


def _warn_if_probabilities(block, src, option):
    """Warn when a file read as logits holds rows that look like probabilities."""
    if block.size == 0 or block.shape[1] < 2:
        return
    with np.errstate(invalid="ignore"):
        looks = bool(((block >= 0) & (block <= 1)).all()) and bool(
            (np.abs(block.sum(1, dtype=np.float64) - 1) < 1e-3).all())
    if looks:
        warnings.warn(f"{src.name}: its rows look like probabilities (values in [0, 1] summing to 1) "
                      f"but are read as logits, which gives a wrong KL; if they are, say so with "
                      f"{option} probs", UserWarning, stacklevel=4)


def _warn_if_not_log_probs(block, src):
    """llama.cpp's statistics take log-probabilities: warn when the reference's rows are not,
    i.e. when the terms it keeps (log-probability > -16) do not sum to 1 less at most what the
    others may hold (exp(-16) each)."""
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        kept = np.where(np.isfinite(block) & (block > _LLAMACPP_CUT), block, -np.inf)
        m = np.maximum(kept.max(1), _LLAMACPP_CUT)
        total = np.exp(m) * np.exp(kept - m[:, None]).sum(1, dtype=np.float64)
        room = (~(block > _LLAMACPP_CUT)).sum(1) * np.exp(_LLAMACPP_CUT)
        off = (total > 1.01) | (total < 0.99 - room)
    if off.any():
        r = int(np.argmax(off))
        warnings.warn(f"{src.name}: llama.cpp's statistics take log-probabilities, but row {r}'s "
                      f"probabilities sum to {total[r]:.4g}; leave out --llamacpp for logits",
                      UserWarning, stacklevel=4)


def _llamacpp_cut(a_raw, tok):
    """The reference block for llama.cpp's statistics: (a, top, top_index_of_empty, lp_tok).

    ``a`` is ``a_raw`` with the log-probabilities <= -16 set to -inf (NaN kept, so that the
    kernel still reports it); a row with nothing kept becomes a placeholder of zeros (its KL is
    0, set by :func:`_llamacpp_rows`). ``top`` is each row's largest stored value, ``lp_tok`` the
    stored value of each row's token (NaN for a token outside the vocabulary).
    """
    n, v = a_raw.shape
    top = a_raw.max(1).astype(np.float64)
    lp = None
    if tok is not None:
        inrange = (tok >= 0) & (tok < v)
        lp = np.where(inrange, a_raw[np.arange(n), np.where(inrange, tok, 0)].astype(np.float64), np.nan)
    empty = top <= _LLAMACPP_CUT
    top_empty = a_raw[empty].argmax(1) if empty.any() else None
    a = np.where(a_raw <= _LLAMACPP_CUT, a_raw.dtype.type(-np.inf), a_raw)
    if top_empty is not None:
        a[empty] = 0
    return a, top, top_empty, lp


def _llamacpp_rows(r, top, top_empty):
    """llama.cpp's per-token KL from the kernel's results on the cut reference.

    The kernel saw ``a`` = the stored log-probabilities with those <= -16 set to -inf, i.e.
    p~ = softmax(a) = e^l / Z over the kept terms, Z = sum_kept e^l. Then
    sum_kept e^l (l - log q) = Z (KL(p~ || q) + log Z), with log Z = max(l) + logz_ref.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        log_z = top + r.logz_ref
        kl = np.exp(log_z) * (r.kl + log_z)
    kl = np.where(np.isinf(r.kl), r.kl, kl)
    if top_empty is not None:  # nothing kept: llama.cpp's sum is 0
        empty = top <= _LLAMACPP_CUT
        kl[empty] = 0.0
        r.top_ref[empty] = top_empty
    return kl


def _compare(ref, oth, tokens, reverse, js, skip_nan, threads, progress, chunk_rows, force_fallback,
             llamacpp, spaces, names):
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
    if ref.n_rows == 0:
        raise ValueError(f"nothing to compare: {ref.name} and {oth.name} have no rows")
    if reverse and ref.format == "llama.cpp-kld":
        raise ValueError(
            f"{names.get('reverse', 'reverse=True')}: {ref.name} is a llama.cpp KL base file, which keeps "
            f"each row's log-probabilities only within 16 nats of its largest; KL(other || reference) "
            f"needs the reference's probability of every token the other model gives mass to, and is "
            f"unbounded above over the values below the window (decoded as probability 0 it is +inf on "
            f"nearly every row). Use the reference's dense logits (.npy, .safetensors) for the reverse "
            f"KL; the forward KL and the JS divergence ({names.get('js', 'js=True')}) are computed as usual")
    n, v = ref.n_rows, ref.n_vocab
    tok_name = names["tokens"]
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
    # llama.cpp's statistics read the stored values of a KL base file (never -inf)
    read_ref = getattr(ref, "read_stored", ref.read) if llamacpp else ref.read

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
            a = _as_logits(read_ref(s, e), spaces[0], ref, s)
            b = _as_logits(oth.read(s, e), spaces[1], oth, s)
            if s == 0:
                for blk, src, space, opt in ((a, ref, spaces[0], names.get("ref_space", "ref_space=")),
                                             (b, oth, spaces[1], names.get("other_space", "other_space="))):
                    if space == "logits" and src.format != "llama.cpp-kld":
                        _warn_if_probabilities(blk, src, opt)
            tb = None if tok is None else tok[s:e]
            full = a  # the reference block that reverse KL and JS use (renormalised by the kernel)
            if llamacpp:
                if s == 0 and ref.format != "llama.cpp-kld":
                    _warn_if_not_log_probs(a, ref)
                if (reverse or js) and hasattr(ref, "read_stored"):  # the decoded window, not the floor
                    full = _as_logits(ref.read(s, e), spaces[0], ref, s)
                a, top, top_empty, lp_tok = _llamacpp_cut(a, tb)
            own = not llamacpp  # llama.cpp's cut reference serves its KL only
            r = K.row_stats(a, b, tokens=tb, reverse=reverse and own, js=js and own,
                            threads=threads, force_fallback=force_fallback)
            if not own and (reverse or js):
                r2 = K.row_stats(full, b, reverse=reverse, js=js, threads=threads,
                                 force_fallback=force_fallback)
                r.rkl, r.js = r2.rkl, r2.js
                r.status = r.status | r2.status
            bad = np.flatnonzero(r.status)
            if bad.size:
                nan_only = (r.status[bad] & ~(K.NAN_REF | K.NAN_OTHER)) == 0
                if skip_nan and nan_only.all():
                    keep[s + bad] = False
                else:
                    i = bad[0] if not skip_nan else bad[~nan_only][0]
                    raise ValueError(_status_error(int(r.status[i]), s + int(i), ref, oth, tok_name))
            if llamacpp:
                r.kl = _llamacpp_rows(r, top, top_empty)
            kl[s:e] = r.kl
            if reverse:
                rkl[s:e] = r.rkl
            if js:
                jsv[s:e] = r.js
            same[s:e] = r.top_ref == r.top_other
            with np.errstate(over="ignore"):
                ptop[s:e] = np.exp(top) if llamacpp else np.exp(-r.logz_ref)
            if tok is not None:
                lpa[s:e] = lp_tok if llamacpp else r.lp_ref_tok
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

    if not keep.any():
        raise ValueError(f"nothing to compare: all {n} rows have NaN logits and were skipped")
    rows = np.flatnonzero(keep)
    sel = (lambda x: None if x is None else x[keep]) if not keep.all() else (lambda x: x)
    dp = nll_r = nll_o = None
    if tok is not None:
        la, lb = sel(lpa), sel(lpb)
        with np.errstate(over="ignore", invalid="ignore"):
            dp = np.exp(lb) - np.exp(la)
        nll_r, nll_o = -la, -lb
    kernel = "numpy-float64" if numpy_path else "c-float32"
    return Report(
        reference=ref.name, other=oth.name, n_vocab=v, n_rows=n,
        kl=sel(kl), rows=rows, same_top=sel(same), p_top_ref=sel(ptop),
        reverse_kl=sel(rkl), js=sel(jsv), delta_p=dp, nll_ref=nll_r, nll_other=nll_o,
        skipped_rows=np.flatnonzero(~keep), formats=(ref.format, oth.format), kernel=kernel,
        llamacpp=llamacpp,
    )
