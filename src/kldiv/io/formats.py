"""The three logits formats: detection, memory-mapped block reads, atomic writes.

llama.cpp's KL-divergence base file (``llama-perplexity --kl-divergence-base FILE`` writes it,
``tools/perplexity/perplexity.cpp``), little-endian:

==========================  =====================================================================
``char[8]``                 magic ``_logits_``
``int32`` x 3               ``n_ctx``, ``n_vocab``, ``n_chunk``
``int32[n_chunk * n_ctx]``  the evaluated token ids
rows                        per chunk, ``n_ctx - 1 - n_ctx // 2`` rows (the scored second half of
                            the context, position ``n_ctx // 2 + i`` predicting the token after
                            it); each row is ``nv = 2 * ((n_vocab + 1) // 2) + 4`` uint16:
                            ``float32 scale``, ``float32 min_log_prob``, ``n_vocab`` uint16
                            values, padding to an even count
==========================  =====================================================================

A stored value ``u`` decodes to the log-probability ``scale * u + min_log_prob``. The writer keeps a
16-nat window below the row's maximum logit: ``lo = max(min logit, max logit - 16)``,
``scale = (max - lo) / 65535``, ``u = round((logit - lo) / scale)`` for logits above ``lo`` and 0
otherwise, so the quantisation error is at most ``scale / 2 <= 1.3e-4`` nats inside the window.
Entries at or below the window (``u = 0`` in a row whose window is full) are decoded as ``-inf``
(probability 0) for a reference, and as the window floor for the other side (so that a token
below the window costs a large but finite log-ratio instead of an infinite KL). llama.cpp itself
drops reference entries with log-probability <= -16 and does not renormalise; kldiv renormalises
the decoded row (it is handled as logits), which differs from llama.cpp by at most the mass
below the window.
"""
from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np

from .._atomic import atomic_path

KLD_MAGIC = b"_logits_"
NPY_MAGIC = b"\x93NUMPY"
_WINDOW = 16.0

_ST_DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # decoded by shifting into float32
    "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
}
_ST_NAMES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
             np.dtype("<i4"): "I32", np.dtype("<i8"): "I64"}


def kld_scored_per_chunk(n_ctx: int) -> int:
    """Rows that llama.cpp stores per chunk of ``n_ctx`` tokens: ``n_ctx - 1 - n_ctx // 2``.

    >>> kld_scored_per_chunk(512)
    255
    """
    return n_ctx - 1 - n_ctx // 2


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


class LogitsSource:
    """A matrix of ``n_rows`` distributions over ``n_vocab`` categories, read in blocks of rows.

    Attributes: ``path`` (str or None for an in-memory array), ``format`` ("npy", "safetensors",
    "llama.cpp-kld", "array"), ``n_rows``, ``n_vocab``, ``tokens`` (the next token of each row,
    when the file stores them, else None). ``read(start, stop)`` returns float32 logits (or
    log-probabilities, which are logits too) of shape (stop - start, n_vocab); ``release(start,
    stop)`` lets the operating system drop the pages of rows already used. Blocks are float32,
    except for float64 inputs, which stay float64.
    """

    format = "array"

    def __init__(self, path, n_rows, n_vocab, tokens=None):
        self.path = None if path is None else os.fspath(path)
        self.n_rows = int(n_rows)
        self.n_vocab = int(n_vocab)
        self.tokens = tokens

    @property
    def name(self) -> str:
        return self.path if self.path is not None else "<array>"

    def read(self, start: int, stop: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def release(self, start: int, stop: int) -> None:
        """Drop memory-mapped pages of rows [start, stop) from this process (no-op by default)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.format} {self.name!r} rows={self.n_rows} vocab={self.n_vocab}>"


class ArraySource(LogitsSource):
    """An in-memory array of logits (rows, vocab) or (..., vocab)."""

    format = "array"

    def __init__(self, array, name="<array>"):
        arr = np.asarray(array)
        if arr.ndim < 2:
            raise ValueError(f"{name}: logits must have at least 2 dimensions (rows, vocab), got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.floating)):
            raise TypeError(f"{name}: logits must be floating point, got dtype {arr.dtype}")
        self._a = arr.reshape(-1, arr.shape[-1])
        super().__init__(None, self._a.shape[0], self._a.shape[1])
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def read(self, start, stop):
        return _as_compute(self._a[start:stop])


class _MappedSource(LogitsSource):
    """Rows of a file mapped read-only; pages are released after use to bound resident memory."""

    def _map(self, offset, dtype, shape):
        self._fh = open(self.path, "rb")
        size = os.fstat(self._fh.fileno()).st_size
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset + nbytes > size:
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            full = max(0, (size - offset) // max(row_bytes, 1))
            self._fh.close()
            raise ValueError(
                f"{self.path}: truncated file: the header promises {offset + nbytes} bytes "
                f"({shape[0]} rows), the file has {size}; row {full} is the first incomplete row"
            )
        if nbytes == 0:
            self._mm = None
            self._arr = np.zeros(shape, dtype)
            return
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._arr = np.frombuffer(self._mm, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        self._offset = offset
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize

    def release(self, start, stop):
        mm = getattr(self, "_mm", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = self._offset + start * self._row_bytes
        hi = self._offset + stop * self._row_bytes
        page = mmap.PAGESIZE
        lo = (lo // page) * page
        hi = min((hi // page) * page, len(mm))
        if hi > lo:
            try:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):  # advisory only
                pass

    def close(self):
        self._arr = None
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive; the mapping goes when it does
                pass
            self._mm = None
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()
            self._fh = None


def _as_compute(block):
    """float64 rows stay float64 (the NumPy float64 kernel keeps their precision); every other
    floating type becomes float32 (the compiled kernel's input)."""
    dt = np.float64 if block.dtype == np.float64 else np.float32
    return np.ascontiguousarray(block, dtype=dt)


class NpySource(_MappedSource):
    format = "npy"

    def __init__(self, path):
        path = os.fspath(path)
        with open(path, "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            except Exception as exc:  # numpy raises ValueError, SyntaxError or TokenError here
                raise ValueError(f"{path}: corrupt .npy header: {exc}") from None
            offset = fh.tell()
        if fortran and len(shape) > 1:
            raise ValueError(f"{path}: Fortran-ordered .npy arrays are not supported; save it C-ordered")
        if dtype.kind != "f":
            raise TypeError(f"{path}: logits must be floating point, got dtype {dtype}")
        if len(shape) < 2:
            raise ValueError(f"{path}: logits must have at least 2 dimensions (rows, vocab), got shape {shape}")
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        super().__init__(path, rows, shape[-1])
        self._map(offset, dtype, (rows, shape[-1]))

    def read(self, start, stop):
        return _as_compute(self._arr[start:stop])


def _read_safetensors_header(path):
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path}: corrupt safetensors header length {n} (file has {size} bytes)")
        text = fh.read(n)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    return 8 + n, header


class SafetensorsSource(_MappedSource):
    format = "safetensors"

    def __init__(self, path, key=None):
        path = os.fspath(path)
        base, header = _read_safetensors_header(path)
        names = [k for k in header if k != "__metadata__"]
        if key is None:
            if len(names) == 1:
                key = names[0]
            elif "logits" in names:
                key = "logits"
            else:
                raise ValueError(f"{path}: holds tensors {sorted(names)}; choose one with key=")
        if key not in header or key == "__metadata__":
            raise ValueError(f"{path}: no tensor named {key!r}; it holds {sorted(names)}")
        info = header[key]
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors entry for {key!r}: {info!r}") from None
        if dtype_name not in ("F32", "F16", "F64", "BF16"):
            raise TypeError(f"{path}: tensor {key!r} has dtype {dtype_name}; logits must be F32, F16, BF16 or F64")
        dtype = _ST_DTYPES[dtype_name]
        if len(shape) < 2:
            raise ValueError(f"{path}: tensor {key!r} must have at least 2 dimensions (rows, vocab), got {shape}")
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{path}: corrupt safetensors entry for {key!r}: offsets {begin}..{end} "
                             f"do not match shape {shape} of {dtype_name}")
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        super().__init__(path, rows, shape[-1])
        self.key = key
        self._bf16 = dtype_name == "BF16"
        self._map(base + begin, dtype, (rows, shape[-1]))

    def read(self, start, stop):
        block = self._arr[start:stop]
        if self._bf16:
            return (block.astype(np.uint32) << 16).view(np.float32)
        return _as_compute(block)


class KldSource(_MappedSource):
    """llama.cpp's KL-divergence base file (see the module docstring for the layout)."""

    format = "llama.cpp-kld"

    def __init__(self, path, *, below_window="drop"):
        path = os.fspath(path)
        if below_window not in ("drop", "floor"):
            raise ValueError(f"below_window must be 'drop' or 'floor', got {below_window!r}")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(20)
            if len(head) < 20 or head[:8] != KLD_MAGIC:
                raise ValueError(f"{path}: not a llama.cpp KL-divergence base file "
                                 f"(expected magic {KLD_MAGIC!r}, found {head[:8]!r})")
            n_ctx, n_vocab, n_chunk = struct.unpack("<3i", head[8:20])
            if n_ctx < 2 or n_vocab < 1 or n_chunk < 1:
                raise ValueError(f"{path}: corrupt header: n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk}")
            ntok = n_ctx * n_chunk
            raw = fh.read(4 * ntok)
            if len(raw) != 4 * ntok:
                raise ValueError(f"{path}: truncated file: token table needs {4 * ntok} bytes after the header, "
                                 f"the file has {max(0, size - 20)}")
        self.n_ctx, self.n_chunk = n_ctx, n_chunk
        self.all_tokens = np.frombuffer(raw, dtype="<i4").astype(np.int32)
        rows = n_chunk * kld_scored_per_chunk(n_ctx)
        super().__init__(path, rows, n_vocab, tokens=kld_next_tokens(self.all_tokens, n_ctx))
        self.below_window = below_window
        self._nv = 2 * ((n_vocab + 1) // 2) + 4
        offset = 20 + 4 * ntok
        expected = offset + rows * self._nv * 2
        if size > expected:
            raise ValueError(f"{path}: corrupt file: {size - expected} unexpected bytes after the last row "
                             f"(header: n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk})")
        self._map(offset, np.dtype("<u2"), (rows, self._nv))

    def read(self, start, stop):
        raw = self._arr[start:stop]
        head = np.ascontiguousarray(raw[:, :4]).view("<f4")
        scale, lo = head[:, 0].astype(np.float32), head[:, 1].astype(np.float32)
        bad = ~(np.isfinite(scale) & (scale >= 0) & np.isfinite(lo) & (lo <= 0))
        if bad.any():
            r = start + int(np.argmax(bad))
            raise ValueError(f"{self.path}: corrupt row {r}: scale={scale[r - start]!r}, "
                             f"min_log_prob={lo[r - start]!r}")
        u = raw[:, 4 : 4 + self.n_vocab]
        out = u.astype(np.float32)
        out *= scale[:, None]
        out += lo[:, None]
        if self.below_window == "drop":
            full = scale * np.float32(65535) >= np.float32(_WINDOW - 1e-3)
            out[(u == 0) & full[:, None]] = -np.inf
        return out

    def stored_log_probs(self, start, stop, cols):
        """The stored log-probability ``scale * u + min_log_prob`` of one column per row, as
        llama.cpp reads it (the window floor for entries below the window, never -inf)."""
        raw = self._arr[start:stop]
        head = np.ascontiguousarray(raw[:, :4]).view("<f4")
        u = raw[np.arange(stop - start), 4 + np.asarray(cols, dtype=np.int64)]
        return (head[:, 0].astype(np.float64) * u + head[:, 1]).astype(np.float64)


def _sniff(path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(KLD_MAGIC):
        return "llama.cpp-kld"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise ValueError(f"{path}: unknown format: not a .npy, .safetensors or llama.cpp KL-divergence "
                     f"base file (first bytes {head[:8]!r})")


def open_logits(source, *, key=None, side="reference") -> LogitsSource:
    """Open a logits file (format from its first bytes) or wrap an in-memory array.

    ``key`` picks the tensor of a safetensors file holding several. ``side`` ("reference" or
    "other") decides how a llama.cpp KL base file decodes entries below its 16-nat window:
    probability 0 for a reference, the window floor for the other side.

    >>> import numpy as np
    >>> src = open_logits(np.zeros((3, 5)))
    >>> src.n_rows, src.n_vocab, src.read(0, 2).shape
    (3, 5, (2, 5))
    """
    if isinstance(source, LogitsSource):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        kind = _sniff(path)
        if kind == "npy":
            return NpySource(path)
        if kind == "safetensors":
            return SafetensorsSource(path, key=key)
        return KldSource(path, below_window="drop" if side == "reference" else "floor")
    return ArraySource(source)


def load_tokens(path, n_rows=None):
    """Token ids, one per row (the token that actually followed that position).

    Accepts .npy (any integer array, flattened), or text with whitespace/comma separated ids.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head == NPY_MAGIC:
        t = np.load(path, allow_pickle=False)
        if not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"{path}: tokens must be integers, got dtype {t.dtype}")
        t = t.reshape(-1)
    else:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().replace(",", " ")
        try:
            t = np.array([int(w) for w in text.split()], dtype=np.int64)
        except ValueError as exc:
            raise ValueError(f"{path}: tokens must be integers: {exc}") from None
    if n_rows is not None and t.shape[0] != n_rows:
        raise ValueError(f"{path}: {t.shape[0]} tokens for {n_rows} rows (one token per row expected)")
    if t.size and (t.min() < np.iinfo(np.int32).min or t.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{path}: token ids out of the int32 range")
    return t.astype(np.int32)


# ---------------------------------------------------------------------------------- writers


def save_npy(path, array) -> None:
    """Write ``array`` to ``path`` as .npy, atomically."""
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array), allow_pickle=False)


def save_safetensors(path, tensors: dict, *, metadata: dict | None = None) -> None:
    """Write a dict of NumPy arrays to a .safetensors file, atomically.

    Supported dtypes: float32, float16, float64, int32, int64 (little-endian, C order).
    """
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    off = 0
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if np.dtype(dt) not in _ST_NAMES:
            raise TypeError(f"tensor {name!r}: unsupported dtype {a.dtype} for safetensors")
        a = a.astype(np.dtype(dt).newbyteorder("<"), copy=False)
        header[str(name)] = {"dtype": _ST_NAMES[np.dtype(dt)], "shape": list(a.shape),
                             "data_offsets": [off, off + a.nbytes]}
        arrays.append(a)
        off += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with atomic_path(path, suffix=".safetensors") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(text)))
            fh.write(text)
            for a in arrays:
                fh.write(a.tobytes())


def _kld_encode_rows(logits: np.ndarray, nv: int) -> np.ndarray:
    """llama.cpp's uint16 encoding of float32 logits rows (float32 arithmetic as in llama.cpp)."""
    x = np.ascontiguousarray(logits, dtype=np.float32)
    n, v = x.shape
    mx = x.max(1)
    mn = np.maximum(x.min(1), mx - np.float32(_WINDOW))
    sum_exp = np.exp(x - mx[:, None]).astype(np.float64).sum(1)
    lse = np.log(sum_exp).astype(np.float32)
    min_lp = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535.0)).astype(np.float32)
    out = np.zeros((n, nv), np.uint16)
    head = np.empty((n, 2), np.float32)
    head[:, 0], head[:, 1] = scale, min_lp
    out[:, :4] = head.view(np.uint16)
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
    q = np.rint(inv[:, None] * (x - mn[:, None]))  # round half to even, as llama.cpp's nearest_int
    q = np.where(x > mn[:, None], q, 0.0)
    out[:, 4 : 4 + v] = np.clip(q, 0, 65535).astype(np.uint16)
    return out


def save_llamacpp_kld(path, logits, *, tokens, n_ctx: int, chunk_rows: int = 1024) -> None:
    """Write logits in llama.cpp's KL-divergence base format (``--kl-divergence-base``), atomically.

    ``logits``: (n_chunk * (n_ctx - 1 - n_ctx // 2), n_vocab) float logits, the scored
    positions of each chunk in order (see :func:`kld_scored_per_chunk`); ``-inf`` (probability 0)
    is allowed, NaN, ``+inf`` and rows without a finite logit are errors naming the row.
    ``tokens``: the n_chunk * n_ctx evaluated token ids. Each row is stored as log-probabilities
    quantised to uint16 over the 16 nats below its maximum (llama.cpp's encoding). Streams
    through :class:`kldiv.io.writers.LlamaCppKldWriter` (as ``kldiv convert`` does).
    """
    from .writers import LlamaCppKldWriter

    src = open_logits(logits)
    n_rows, n_vocab = src.n_rows, src.n_vocab
    per = kld_scored_per_chunk(n_ctx)
    if n_ctx < 2 or per < 1:
        raise ValueError(f"n_ctx must be >= 3 (llama.cpp scores n_ctx - 1 - n_ctx // 2 rows per chunk), got {n_ctx}")
    if n_rows % per:
        raise ValueError(f"logits: {n_rows} rows is not a whole number of chunks of {per} scored rows (n_ctx={n_ctx})")
    n_chunk = n_rows // per
    tok = np.asarray(tokens).reshape(-1)
    if tok.shape[0] != n_chunk * n_ctx:
        raise ValueError(f"tokens: expected n_chunk * n_ctx = {n_chunk * n_ctx} ids, got {tok.shape[0]}")
    with LlamaCppKldWriter(path, n_vocab, tokens=tok, n_ctx=n_ctx, name=src.name) as out:
        for s in range(0, n_rows, chunk_rows):
            out.write(src.read(s, min(n_rows, s + chunk_rows)))
