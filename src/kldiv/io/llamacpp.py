"""llama.cpp's KL-divergence base format: layout, and the one encoder and decoder of its rows.

``llama-perplexity --kl-divergence-base FILE`` writes it (``tools/perplexity/perplexity.cpp``),
little-endian:

==========================  =====================================================================
``char[8]``                 magic ``_logits_``
``int32`` x 3               ``n_ctx``, ``n_vocab``, ``n_chunk`` (llama.cpp reads ``n_ctx`` unsigned)
``int32[n_chunk * n_ctx]``  the evaluated token ids
rows                        per chunk, ``n_ctx - 1 - n_ctx // 2`` rows (the scored second half of
                            the context, position ``n_ctx // 2 + i`` predicting the token after
                            it); each row is ``nv = 2 * ((n_vocab + 1) // 2) + 4`` uint16:
                            ``float32 scale``, ``float32 min_log_prob``, ``n_vocab`` uint16
                            values, padding to an even count
==========================  =====================================================================

**Decoding.** A stored value ``u`` means the log-probability ``scale * u + min_log_prob``
(float32 arithmetic). llama.cpp's encoder keeps a 16-nat window below the row's maximum logit:
``lo = max(min logit, max logit - 16)``, ``scale = (max - lo) / 65535``,
``u = nearest_int((logit - lo) / scale)`` for logits above ``lo`` and 0 otherwise, and
``min_log_prob = lo - max - log(sum exp(logit - max))``; the quantisation error is at most
``scale / 2 <= 1.3e-4`` nats inside the window. In a row whose window is full
(``65535 * scale ~ 16``) the entries with ``u = 0`` lie at or below the window: their stored
value is the window floor, their true log-probability anything below it. :func:`decode_rows`
gives them as ``-inf`` (``below_window="drop"``: probability 0) or as the stored floor
(``"floor"``, the value llama.cpp itself reads).

**Encoding** (:func:`encode_rows`), per row ``x``:

1. a row of *log-probabilities* (its probabilities sum to 1 within the format's own
   quantisation, 1.5e-4 relative, allowing for the mass of entries at or below the window: at
   most ``exp(max - 16)`` each, ``-inf`` included) is stored as given, without renormalising;
   a row that is exactly the decoding of a stored row (both ``below_window`` modes) gets that
   stored row back bit for bit, so that read -> write -> read is the identity;
2. any other row is taken as *logits* and encoded as llama.cpp encodes them (float32
   arithmetic, round half to even as its ``nearest_int``).

This module imports neither of the other ``kldiv.io`` modules: the reader
(:mod:`kldiv.io.formats`) and the writer (:mod:`kldiv.io.writers`) both use it.
"""
from __future__ import annotations

import numpy as np

KLD_MAGIC = b"_logits_"
WINDOW = 16.0
HEADER_BYTES = 20
_FULL = np.float32(WINDOW - 1e-3)    # 65535 * scale at least this: the window is full
_NORM_TOL = 1.5e-4                   # relative: 1.22e-4 (half a step of a full window) + rounding


def kld_scored_per_chunk(n_ctx: int) -> int:
    """Rows that llama.cpp stores per chunk of ``n_ctx`` tokens: ``n_ctx - 1 - n_ctx // 2``.

    >>> kld_scored_per_chunk(512)
    255
    """
    return n_ctx - 1 - n_ctx // 2


def row_width(n_vocab: int) -> int:
    """uint16 values per stored row: two float32 (scale, min_log_prob), the values, padding.

    >>> row_width(5), row_width(6)
    (10, 10)
    """
    return 2 * ((n_vocab + 1) // 2) + 4


def file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    """Bytes of a KL base file with this header (Python integers: no overflow).

    >>> file_size(8, 10, 2)    # 20 + 4 * 16 + 6 rows * 14 uint16 * 2
    252
    """
    return HEADER_BYTES + 4 * n_ctx * n_chunk + 2 * row_width(n_vocab) * n_chunk * kld_scored_per_chunk(n_ctx)


def kld_next_tokens(tokens, n_ctx: int):
    """The token each stored row predicts, from a KL base file's token table.

    Row ``i`` of chunk ``c`` is the model's output at position ``n_ctx // 2 + i`` of that chunk,
    so it predicts ``tokens[c * n_ctx + n_ctx // 2 + i + 1]``.

    >>> kld_next_tokens(list(range(8)), 4).tolist()   # chunks [0..3], [4..7]; first = 2, 1 row
    [3, 7]
    """
    t = np.asarray(tokens, dtype=np.int32).reshape(-1, n_ctx)
    first = n_ctx // 2
    return np.ascontiguousarray(t[:, first + 1 : n_ctx]).reshape(-1)


# ---------------------------------------------------------------------------------- decoding


def row_headers(raw):
    """(scale, min_log_prob) float32 vectors of stored rows ``raw`` (rows, nv) uint16."""
    head = np.ascontiguousarray(raw[:, :4]).view("<f4")
    return head[:, 0].astype(np.float32), head[:, 1].astype(np.float32)


def bad_headers(scale, lo):
    """Rows whose header no encoder writes: non-finite values, a negative scale or one wider
    than the 16-nat window (17 nats allowed, for rounding at huge logits), a positive
    min_log_prob, or a largest value ``65535 * scale + min_log_prob`` above 0.1 (it is minus the
    log of the row's sum, <= 0, up to rounding)."""
    with np.errstate(over="ignore", invalid="ignore"):
        top = scale.astype(np.float64) * 65535 + lo
        return ~(np.isfinite(scale) & (scale >= 0) & (scale <= np.float32(17 / 65535))
                 & np.isfinite(lo) & (lo <= 0) & (top <= 0.1))


def decode_rows(raw, n_vocab: int, below_window: str = "drop") -> np.ndarray:
    """float32 log-probabilities ``scale * u + min_log_prob`` of stored rows (rows, nv) uint16.

    ``below_window="drop"`` gives ``-inf`` for the entries of a full window with ``u = 0``,
    ``"floor"`` their stored value.

    >>> raw = encode_rows(np.log([[0.5, 0.25, 0.25]], dtype=np.float32), row_width(3))
    >>> np.exp(decode_rows(raw, 3)).round(4).tolist()
    [[0.5, 0.25, 0.25]]
    """
    scale, lo = row_headers(raw)
    u = raw[:, 4 : 4 + n_vocab]
    out = u.astype(np.float32)
    out *= scale[:, None]
    out += lo[:, None]
    if below_window == "drop":
        full = scale * np.float32(65535) >= _FULL
        out[(u == 0) & full[:, None]] = -np.inf
    return out


# ---------------------------------------------------------------------------------- encoding


def _decode(u, s, lo):
    """float32 ``fl(fl(u * s) + lo)``, the decoding of every reader (broadcasting)."""
    return (np.asarray(u, np.float32) * np.float32(s)).astype(np.float32) + np.float32(lo)


def _neighbours(v, k):
    """float32 values within ``k`` ulps of ``v``, nearest first."""
    v = np.float32(v)
    up, down = [v], [v]
    for _ in range(k):
        up.append(np.nextafter(up[-1], np.float32(np.inf)))
        down.append(np.nextafter(down[-1], np.float32(-np.inf)))
    out = [v]
    for a, b in zip(up[1:], down[1:]):
        out += [a, b]
    return out


def _exact_row(x):
    """The stored row (s, lo, u) whose decoding is exactly ``x`` (float32, ``-inf`` for entries
    dropped below a full window), or None."""
    fin = np.isfinite(x)
    if not fin.any() or np.isnan(x).any() or (x == np.inf).any():
        return None
    xf = x[fin]
    xmax = xf.max()
    dropped = not fin.all()
    if dropped:  # -inf entries are u = 0 of a full window: lo is not in the row, search for it
        # s is about 16 / 65535 (most often exactly its float32), the smallest finite entry
        # (u >= 1) pins it down further; where several (s, lo) decode to the same row (few
        # entries in the window), the most common s wins
        xk = xf.min()
        uk = np.rint((np.float64(xk) - (np.float64(xmax) - WINDOW)) / (WINDOW / 65535))
        ss = _neighbours(WINDOW / 65535, 3)
        if 1 <= uk < 65535:
            ss = ss + _neighbours((np.float64(xmax) - np.float64(xk)) / (65535 - uk), 6)
        pairs = [(lo, s) for s in ss
                 for lo in _neighbours(np.float64(xmax) - 65535 * np.float64(s), 3)]
    else:
        lo = xf.min()
        if xmax == lo:
            pairs = [(lo, np.float32(0))]
        else:
            pairs = [(lo, s) for s in _neighbours((np.float64(xmax) - np.float64(lo)) / 65535, 4)]
    sample = xf if xf.size <= 64 else xf[np.linspace(0, xf.size - 1, 64).astype(np.int64)]
    for lo, s in pairs:
        if lo > 0 or s < 0 or (dropped and s * np.float32(65535) < _FULL):
            continue
        if s == 0:
            if (xf == lo).all() and not dropped:
                return s, lo, np.zeros(x.shape, np.uint16)
            continue
        if _decode(65535, s, lo) != xmax:
            continue
        first = 1 if dropped else 0
        u = np.rint((sample.astype(np.float64) - np.float64(lo)) / np.float64(s))
        if ((u < first) | (u > 65535)).any() or (_decode(u, s, lo) != sample).any():
            continue
        u = np.rint((xf.astype(np.float64) - np.float64(lo)) / np.float64(s))
        if ((u < first) | (u > 65535)).any() or (_decode(u, s, lo) != xf).any():
            continue
        out = np.zeros(x.shape, np.uint16)
        out[fin] = u.astype(np.uint16)
        return s, lo, out
    return None


def _normalised(x, mx, e, sum_exp):
    """Rows whose probabilities sum to 1 within the format's quantisation, counting what the
    entries at or below the window (``-inf`` included) may hold: at most ``exp(mx - 16)`` each.
    ``e = exp(x - mx)`` (float32) and ``sum_exp`` its row sums are the encoder's own."""
    low = x <= (mx - _FULL)[:, None]
    n_low = low.sum(1)
    low_sum = np.where(low, e, np.float32(0)).sum(1, dtype=np.float64) if n_low.any() else 0.0
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        scale = np.exp(mx.astype(np.float64))
        inside = scale * (sum_exp - low_sum)
        room = n_low * scale * np.exp(-float(_FULL))
        return (inside <= 1 + _NORM_TOL) & (inside >= 1 - room - _NORM_TOL) & (mx <= _NORM_TOL)


def encode_rows(logits, nv: int) -> np.ndarray:
    """Stored rows (rows, nv) uint16 for float32 rows of logits or log-probabilities.

    Rows of normalised log-probabilities are stored as given (the decoding of a stored row gets
    that row back exactly); other rows are logits, encoded as llama.cpp encodes them. Callers
    check first that every row is finite or ``-inf`` with at least one finite entry.

    >>> lp = np.log(np.array([[0.7, 0.2, 0.1]], np.float32))
    >>> raw = encode_rows(lp, row_width(3))
    >>> bool((encode_rows(decode_rows(raw, 3), row_width(3)) == raw).all())   # read, write: same
    True
    """
    x = np.ascontiguousarray(logits, dtype=np.float32)
    n, v = x.shape
    mx = x.max(1)
    mn = np.maximum(x.min(1), mx - np.float32(WINDOW))
    with np.errstate(under="ignore"):
        e = np.exp(x - mx[:, None])
    sum_exp = e.sum(1, dtype=np.float64)
    given = _normalised(x, mx, e, sum_exp)
    del e
    lse = np.log(sum_exp).astype(np.float32)
    # llama.cpp: min_log_prob = lo - max - log_sum_exp; a normalised row as given: lo
    min_lp = np.where(given, mn, (mn - mx - lse).astype(np.float32)).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535.0)).astype(np.float32)
    out = np.zeros((n, nv), np.uint16)
    head = np.empty((n, 2), np.float32)
    head[:, 0], head[:, 1] = scale, min_lp
    out[:, :4] = head.view(np.uint16)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale > 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
        q = np.rint(inv[:, None] * (x - mn[:, None]))  # round half to even, as llama.cpp's nearest_int
    q = np.where(x > mn[:, None], q, 0.0)
    out[:, 4 : 4 + v] = np.clip(q, 0, 65535).astype(np.uint16)
    for r in np.flatnonzero(given):  # a stored row read back: that very row
        exact = _exact_row(x[r])
        if exact is not None:
            s, lo, u = exact
            head = np.array([s, lo], np.float32).view(np.uint16)
            out[r, :4] = head
            out[r, 4 : 4 + v] = u
            out[r, 4 + v :] = 0
    return out
