"""The three logits formats: detection, memory-mapped block reads, atomic writes.

The llama.cpp KL-divergence base file's layout, its decoder and its encoder live in
:mod:`kldiv.io.llamacpp`; :class:`KldSource` reads such a file through it. A reference read
from one decodes the entries below each row's 16-nat window as ``-inf`` (probability 0), the
other side as the stored window floor (a large but finite log-ratio instead of an infinite KL).

Every reader checks the sizes its header declares against the file's size before it allocates
anything, and reports a bad file as a one-line ``ValueError`` naming the file (a file of the
wrong dtype raises :class:`FileDtypeError`, both a ``TypeError`` and a ``ValueError``).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct

import numpy as np

from .._atomic import atomic_path
from .llamacpp import (
    HEADER_BYTES,
    KLD_MAGIC,
    bad_headers,
    decode_rows,
    file_size,
    kld_next_tokens,
    kld_scored_per_chunk,
    row_headers,
    row_width,
)

NPY_MAGIC = b"\x93NUMPY"


class FileDtypeError(TypeError, ValueError):
    """A file holds values of a type that cannot be logits (or token ids): integer, boolean,
    complex or object logits, float token ids. Both a TypeError and a ValueError."""

_ST_DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # decoded by shifting into float32
    "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
}
_ST_NAMES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
             np.dtype("<i4"): "I32", np.dtype("<i8"): "I64"}


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
        if arr.shape[-1] == 0:
            raise ValueError(f"{name}: shape {arr.shape}: the vocabulary (last dimension) is empty; "
                             f"a distribution needs at least one category")
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
        """Map ``shape`` (rows, width) of ``dtype`` at ``offset``, the size checked first."""
        self._fh = open(self.path, "rb")
        size = os.fstat(self._fh.fileno()).st_size
        itemsize = np.dtype(dtype).itemsize
        row_bytes = math.prod(shape[1:]) * itemsize  # Python integers: no overflow
        nbytes = shape[0] * row_bytes
        if offset + nbytes > size:
            full = max(0, (size - offset) // max(row_bytes, 1))
            self._fh.close()
            raise ValueError(
                f"{self.path}: truncated file: the header promises {offset + nbytes} bytes "
                f"({shape[0]} rows), the file has {size}; row {full} is the first incomplete row"
            )
        self._offset = offset
        self._row_bytes = row_bytes
        if nbytes == 0:
            self._mm = None
            self._arr = np.zeros(shape, dtype)
            return
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._arr = np.frombuffer(self._mm, dtype=dtype, count=shape[0] * math.prod(shape[1:]),
                                  offset=offset).reshape(shape)

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


def _check_shape(path, shape, what="logits"):
    """(rows, vocab) of an array shape from a file header: >= 2 dimensions, none negative,
    at least one category; Python integers, so that a huge product cannot overflow."""
    if len(shape) < 2:
        raise ValueError(f"{path}: {what} must have at least 2 dimensions (rows, vocab), got shape {shape}")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise ValueError(f"{path}: corrupt header: shape {shape} has a negative or non-integer dimension")
    if shape[-1] == 0:
        raise ValueError(f"{path}: shape {shape}: the vocabulary (last dimension) is empty; "
                         f"a distribution needs at least one category")
    return math.prod(shape[:-1]), shape[-1]


def _as_compute(block):
    """float64 rows stay float64 (the NumPy float64 kernel keeps their precision); every other
    floating type becomes float32 (the compiled kernel's input)."""
    dt = np.float64 if block.dtype == np.float64 else np.float32
    return np.ascontiguousarray(block, dtype=dt)


def _read_npy_header(path, fh):
    """(shape, fortran_order, dtype, data offset) of an open .npy file; ValueError naming it."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except Exception as exc:  # numpy raises ValueError, SyntaxError or TokenError here
        raise ValueError(f"{path}: corrupt .npy header: {exc}") from None
    return tuple(shape), fortran, dtype, fh.tell()


class NpySource(_MappedSource):
    format = "npy"

    def __init__(self, path):
        path = os.fspath(path)
        with open(path, "rb") as fh:
            shape, fortran, dtype, offset = _read_npy_header(path, fh)
        if dtype.kind != "f":
            raise FileDtypeError(f"{path}: logits must be floating point, got dtype {dtype} "
                                 f"(convert it, e.g. np.save(path, x.astype(np.float32)))")
        rows, vocab = _check_shape(path, shape)
        if fortran and len(shape) > 1:
            raise ValueError(f"{path}: Fortran-ordered .npy arrays are not supported; save it C-ordered")
        super().__init__(path, rows, vocab)
        self._map(offset, dtype, (rows, vocab))

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

    def __init__(self, path, key=None, *, key_name="key"):
        path = os.fspath(path)
        base, header = _read_safetensors_header(path)
        names = [k for k in header if k != "__metadata__"]
        if key is None:
            if len(names) == 1:
                key = names[0]
            elif "logits" in names:
                key = "logits"
            else:
                raise ValueError(f"{path}: holds tensors {sorted(names)}; choose one with {key_name}")
        if key not in header or key == "__metadata__":
            raise ValueError(f"{path}: no tensor named {key!r}; it holds {sorted(names)}")
        info = header[key]
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors entry for {key!r}: {info!r}") from None
        if dtype_name not in ("F32", "F16", "F64", "BF16"):
            raise FileDtypeError(f"{path}: tensor {key!r} has dtype {dtype_name}; logits must be "
                                 f"F32, F16, BF16 or F64")
        dtype = _ST_DTYPES[dtype_name]
        rows, vocab = _check_shape(path, shape, f"tensor {key!r}")
        if (not all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end))
                or not 0 <= begin <= end or end - begin != rows * vocab * dtype.itemsize):
            raise ValueError(f"{path}: corrupt safetensors entry for {key!r}: offsets {begin}..{end} "
                             f"do not match shape {shape} of {dtype_name}")
        super().__init__(path, rows, vocab)
        self.key = key
        self._bf16 = dtype_name == "BF16"
        self._map(base + begin, dtype, (rows, vocab))

    def read(self, start, stop):
        block = self._arr[start:stop]
        if self._bf16:
            return (block.astype(np.uint32) << 16).view(np.float32)
        return _as_compute(block)


class KldSource(_MappedSource):
    """llama.cpp's KL-divergence base file (layout in :mod:`kldiv.io.llamacpp`).

    ``below_window``: "drop" decodes the entries below a full 16-nat window as ``-inf``
    (probability 0), "floor" as their stored value (the one llama.cpp reads). ``n_ctx``,
    ``n_chunk`` and ``all_tokens`` (the whole token table) come from the header.
    """

    format = "llama.cpp-kld"

    def __init__(self, path, *, below_window="drop"):
        path = os.fspath(path)
        if below_window not in ("drop", "floor"):
            raise ValueError(f"below_window must be 'drop' or 'floor', got {below_window!r}")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(HEADER_BYTES)
            if head[:8] == KLD_MAGIC and len(head) < HEADER_BYTES:
                raise ValueError(f"{path}: truncated file: {size} bytes, a llama.cpp KL-divergence "
                                 f"base file's header alone has {HEADER_BYTES}")
            if len(head) < HEADER_BYTES or head[:8] != KLD_MAGIC:
                raise ValueError(f"{path}: not a llama.cpp KL-divergence base file "
                                 f"(expected magic {KLD_MAGIC!r} and a 20-byte header, found "
                                 f"{head[:8]!r}, {size} bytes)")
            n_ctx, n_vocab, n_chunk = struct.unpack("<3i", head[8:20])
            if n_ctx < 3 or n_vocab < 1 or n_chunk < 1:
                raise ValueError(f"{path}: corrupt header: n_ctx={n_ctx}, n_vocab={n_vocab}, "
                                 f"n_chunk={n_chunk} (need n_ctx >= 3, n_vocab >= 1, n_chunk >= 1)")
            # every size from the header is checked against the file before anything is read
            ntok = n_ctx * n_chunk
            expected = file_size(n_ctx, n_vocab, n_chunk)
            if HEADER_BYTES + 4 * ntok > size:
                raise ValueError(f"{path}: truncated file: token table of {4 * ntok} bytes promised "
                                 f"by the header (n_ctx={n_ctx}, n_chunk={n_chunk}), the file has "
                                 f"{max(0, size - HEADER_BYTES)} after the header ({expected} bytes "
                                 f"expected in all)")
            if size > expected:
                raise ValueError(f"{path}: corrupt file: {size - expected} unexpected bytes after the last row "
                                 f"(header: n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk})")
            raw = fh.read(4 * ntok)
        self.n_ctx, self.n_chunk = n_ctx, n_chunk
        self.all_tokens = np.frombuffer(raw, dtype="<i4").astype(np.int32)
        rows = n_chunk * kld_scored_per_chunk(n_ctx)
        super().__init__(path, rows, n_vocab, tokens=kld_next_tokens(self.all_tokens, n_ctx))
        self.below_window = below_window
        self._nv = row_width(n_vocab)
        self._map(HEADER_BYTES + 4 * ntok, np.dtype("<u2"), (rows, self._nv))

    def read_raw(self, start, stop):
        """The stored rows [start, stop) as (rows, nv) uint16, their headers checked."""
        raw = self._arr[start:stop]
        bad = bad_headers(*row_headers(raw))
        if bad.any():
            r = int(np.argmax(bad))
            scale, lo = row_headers(raw[r : r + 1])
            raise ValueError(f"{self.path}: corrupt row {start + r}: scale={float(scale[0])!r}, "
                             f"min_log_prob={float(lo[0])!r}")
        return raw

    def read(self, start, stop):
        return decode_rows(self.read_raw(start, stop), self.n_vocab, self.below_window)

    def read_stored(self, start, stop):
        """The stored log-probabilities ``scale * u + min_log_prob`` of rows [start, stop), as
        llama.cpp reads them (the window floor for entries below the window, never -inf)."""
        return decode_rows(self.read_raw(start, stop), self.n_vocab, "floor")

    def stored_log_probs(self, start, stop, cols):
        """The stored log-probability of one column per row, as llama.cpp reads it (float32
        ``scale * u + min_log_prob``, the window floor below the window, never -inf)."""
        raw = self.read_raw(start, stop)
        scale, lo = row_headers(raw)
        u = raw[np.arange(stop - start), 4 + np.asarray(cols, dtype=np.int64)]
        return ((u.astype(np.float32) * scale).astype(np.float32) + lo).astype(np.float64)


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


def _check_input_path(path, what="file"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, expected a {what}")


def open_logits(source, *, key=None, side="reference", below_window=None,
                key_name="key=") -> LogitsSource:
    """Open a logits file (format from its first bytes) or wrap an in-memory array.

    ``key`` picks the tensor of a safetensors file holding several (``key_name`` is how an
    error message names that argument). ``side`` ("reference" or "other") decides how a
    llama.cpp KL base file decodes entries below its 16-nat window: probability 0 (``-inf``)
    for a reference, the stored window floor for the other side; ``below_window`` ("drop" or
    "floor") overrides it.

    >>> import numpy as np
    >>> src = open_logits(np.zeros((3, 5)))
    >>> src.n_rows, src.n_vocab, src.read(0, 2).shape
    (3, 5, (2, 5))
    """
    if isinstance(source, LogitsSource):
        return source
    if side not in ("reference", "other"):
        raise ValueError(f"side must be 'reference' or 'other', got {side!r}")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        _check_input_path(path, "logits file (.npy, .safetensors or llama.cpp KL base)")
        kind = _sniff(path)
        if kind == "npy":
            return NpySource(path)
        if kind == "safetensors":
            return SafetensorsSource(path, key=key, key_name=key_name)
        if below_window is None:
            below_window = "drop" if side == "reference" else "floor"
        return KldSource(path, below_window=below_window)
    return ArraySource(source)


def load_tokens(path, n_rows=None):
    """Token ids, one per row (the token that actually followed that position).

    Accepts .npy (any integer array, flattened), or text with whitespace/comma separated ids.
    A bad file is a one-line ValueError naming it (a float .npy: :class:`FileDtypeError`).
    """
    path = os.fspath(path)
    _check_input_path(path, "token file (.npy or text)")
    with open(path, "rb") as fh:
        head = fh.read(6)
        if head == NPY_MAGIC:
            fh.seek(0)
            shape, fortran, dtype, offset = _read_npy_header(path, fh)
            if dtype.kind not in "iu":
                raise FileDtypeError(f"{path}: tokens must be integers, got dtype {dtype}")
            if any(not isinstance(d, int) or d < 0 for d in shape):
                raise ValueError(f"{path}: corrupt header: shape {shape} has a negative dimension")
            n = math.prod(shape)
            size = os.fstat(fh.fileno()).st_size
            if offset + n * dtype.itemsize > size:
                raise ValueError(f"{path}: truncated file: the header promises {n} token ids "
                                 f"({offset + n * dtype.itemsize} bytes), the file has {size}")
            t = np.fromfile(fh, dtype=dtype, count=n)
            if fortran:
                t = t.reshape(shape[::-1]).T
            t = t.reshape(-1)
        else:
            fh.seek(0)
            data = fh.read()
    if head != NPY_MAGIC:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a token file: neither .npy nor text (binary data); "
                             f"token ids are a .npy of integers or whitespace-separated text") from None
        try:
            t = np.array([int(w) for w in text.replace(",", " ").split()], dtype=np.int64)
        except ValueError as exc:
            raise ValueError(f"{path}: tokens must be integers: {exc}") from None
        except OverflowError:
            raise ValueError(f"{path}: token ids out of the int64 range") from None
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
