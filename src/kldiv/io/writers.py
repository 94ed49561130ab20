"""Streaming writers for logits files, and :func:`convert_logits` between the formats kldiv reads.

The writers of :mod:`kldiv.io.formats` (``save_npy``, ``save_safetensors``, ``save_llamacpp_kld``)
take a whole array. The classes here take the rows block by block, so that a file larger than
memory can be written (or converted) in bounded memory:

=========================  ===========================  ===================================
writer                     output                       dtypes
=========================  ===========================  ===================================
:class:`NpyWriter`         ``.npy`` (C order)           float16, float32, float64
:class:`SafetensorsWriter`  ``.safetensors``, one tensor  float16, bfloat16, float32, float64
:class:`LlamaCppKldWriter`  llama.cpp KL-divergence base  uint16 log-probabilities (fixed)
=========================  ===========================  ===================================

Each is a context manager: the header is written on entry, ``write(block)`` appends rows, and on a
clean exit (every promised row written) the temporary file beside the target replaces it
atomically; on an error, or with rows missing, the temporary file is removed and an existing
target is left as it was.

>>> import os, tempfile, numpy as np
>>> from kldiv.io import NpyWriter, open_logits
>>> path = os.path.join(tempfile.mkdtemp(), "out.npy")
>>> x = np.arange(12, dtype=np.float32).reshape(4, 3)
>>> with NpyWriter(path, (4, 3), dtype="float16") as w:
...     w.write(x[:3])          # any number of rows at a time
...     w.write(x[3:])
>>> np.load(path).dtype, bool((np.load(path) == x).all())
(dtype('float16'), True)

:func:`convert_logits` (``kldiv convert`` on the command line) reads any format
:func:`~kldiv.io.open_logits` reads and writes any of the three.
"""
from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass

import numpy as np

from .._atomic import atomic_path
from .._progress import progress_bar
from .formats import LogitsSource, load_tokens, open_logits
from .llamacpp import KLD_MAGIC, encode_rows, kld_scored_per_chunk, row_width

FORMATS = ("npy", "safetensors", "llamacpp")
# output suffix -> format (llama.cpp's perplexity tool takes any file name; these are the usual ones)
SUFFIXES = {".npy": "npy", ".safetensors": "safetensors",
            ".kld": "llamacpp", ".bin": "llamacpp", ".dat": "llamacpp"}
_DTYPES = ("float16", "bfloat16", "float32", "float64")
_ST_NAME = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
_BLOCK_BYTES = 32 << 20  # float32 bytes per block read from the input: bounded memory


def output_format(path, to=None, *, _names=None) -> str:
    """The output format for ``path``: ``to`` if given, else from the file's suffix.

    >>> output_format("base.kld"), output_format("x.bin"), output_format("x.dat", to="npy")
    ('llamacpp', 'llamacpp', 'npy')
    """
    names = _arg_names(_names)
    if to is not None:
        if to not in FORMATS:
            raise ValueError(f"{names['to']} {to!r}: unknown output format; "
                             f"choose one of {', '.join(FORMATS)}")
        return to
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in SUFFIXES:
        return SUFFIXES[ext]
    known = ", ".join(SUFFIXES)
    what = f"suffix {ext!r}" if ext else "no suffix"
    raise ValueError(f"{os.fspath(path)}: cannot tell the output format from its name ({what}); "
                     f"name it {known}, or set {names['to']} (npy, safetensors or llamacpp)")


def _arg_names(names):
    """How errors name the arguments: Python keywords, or the command line's options."""
    out = {"to": "to", "dtype": "dtype", "n_ctx": "n_ctx", "tokens": "tokens"}
    out.update(names or {})
    return out


def _check_dtype(dtype, fmt, names=None) -> None:
    names = _arg_names(names)
    if dtype is None:
        return
    if fmt == "llamacpp":
        raise ValueError(f"{names['dtype']} applies to .npy and .safetensors output only; llama.cpp's "
                         f"format always stores uint16-quantised log-probabilities")
    if dtype not in _DTYPES:
        raise ValueError(f"{names['dtype']} {dtype!r}: unknown dtype; choose one of {', '.join(_DTYPES)}")
    if dtype == "bfloat16" and fmt == "npy":
        raise ValueError(f"{names['dtype']} bfloat16: .npy has no bfloat16 (NumPy has no such type); "
                         f"use float16 or float32, or write .safetensors, which stores BF16")


def _first_bad_row(bad_rows, start):
    return start + int(np.argmax(bad_rows))


def _narrow(block, dtype, start, name):
    """``block`` as ``dtype``; a finite value that does not fit (becomes inf) is an error."""
    x = np.asarray(block)
    if dtype == "bfloat16":
        out = _to_bfloat16(x)
        back = (out.astype(np.uint32) << 16).view(np.float32)
    else:
        with np.errstate(over="ignore"):
            out = x.astype(np.dtype(dtype).newbyteorder("<"), copy=False)
        back = out
    if out.dtype != x.dtype or dtype == "bfloat16":
        lost = np.isfinite(x) & ~np.isfinite(back)
        if lost.any():
            r = _first_bad_row(lost.any(axis=1), start)
            c = int(np.argmax(lost[r - start]))
            raise ValueError(f"{name}: row {r} has a logit ({x[r - start, c]!r} at column {c}) outside "
                             f"the range of {dtype}; choose a wider dtype")
    return np.ascontiguousarray(out)


def _to_bfloat16(x) -> np.ndarray:
    """float -> bfloat16 bits (uint16), rounding to nearest even as torch and JAX do; NaN stays NaN."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        r[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)  # quiet NaN
    return r.astype("<u2", copy=False)


class _StreamWriter:
    """Header on entry, rows by ``write``, atomic replace on a complete and clean exit."""

    _suffix = ".tmp"

    def __init__(self, path, n_rows: int, n_vocab: int, *, name: str = "logits"):
        self.path = os.fspath(path)
        self.n_rows = int(n_rows)
        self.n_vocab = int(n_vocab)
        self.name = name
        self.rows_written = 0
        self.bytes_written = 0
        self._fh = None
        self._stack = None

    def _header(self) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _encode(self, block: np.ndarray, start: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self):
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.path, suffix=self._suffix))
            self._fh = stack.enter_context(open(tmp, "wb"))
            self._put(self._header())
        except BaseException as exc:
            stack.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack = stack
        return self

    def _put(self, data) -> None:
        self._fh.write(data)
        self.bytes_written += len(data)

    def write(self, block) -> None:
        """Append rows: ``block`` of shape (rows, n_vocab), any floating dtype."""
        if self._fh is None:
            raise RuntimeError(f"{type(self).__name__} writes inside a `with` block only")
        x = np.asarray(block)
        if x.ndim != 2 or x.shape[1] != self.n_vocab:
            raise ValueError(f"{self.name}: blocks must have shape (rows, {self.n_vocab}), got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{self.name}: logits must be floating point, got dtype {x.dtype}")
        if self.rows_written + x.shape[0] > self.n_rows:
            raise ValueError(f"{self.name}: {self.rows_written + x.shape[0]} rows written, the header "
                             f"promises {self.n_rows}")
        self._put(self._encode(x, self.rows_written))
        self.rows_written += x.shape[0]

    def __exit__(self, et, ev, tb):
        stack, self._stack = self._stack, None
        if et is None:
            try:
                if self.rows_written != self.n_rows:
                    raise ValueError(f"{self.name}: {self.rows_written} rows written, the header "
                                     f"promises {self.n_rows}; {self.path} not written")
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except BaseException as exc:
                self._fh = None
                stack.__exit__(type(exc), exc, exc.__traceback__)  # removes the temporary file
                raise
        self._fh = None
        return stack.__exit__(et, ev, tb)


class NpyWriter(_StreamWriter):
    """Write a ``.npy`` array of ``shape`` (``(rows, vocab)`` or ``(..., vocab)``) row block by
    row block, atomically. ``dtype``: float16, float32 (default) or float64; a finite input value
    outside the dtype's range is an error naming its row. NaN and infinities are stored as they are.
    """

    _suffix = ".npy"

    def __init__(self, path, shape, dtype="float32", *, name="logits"):
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(f"shape must be (rows, vocab) or (..., vocab), got {shape}")
        dtype = str(np.dtype(dtype)) if dtype != "bfloat16" else dtype
        _check_dtype(dtype, "npy")
        self.shape, self.dtype = shape, dtype
        super().__init__(path, int(np.prod(shape[:-1], dtype=np.int64)), shape[-1], name=name)

    def _header(self) -> bytes:
        import io

        d = {"descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype).newbyteorder("<")),
             "fortran_order": False, "shape": self.shape}
        buf = io.BytesIO()
        try:
            np.lib.format.write_array_header_1_0(buf, d)
        except ValueError:  # header over 64 KiB (a very long shape): version 2.0
            buf = io.BytesIO()
            np.lib.format.write_array_header_2_0(buf, d)
        return buf.getvalue()

    def _encode(self, block, start):
        return _narrow(block, self.dtype, start, self.name).tobytes()


class SafetensorsWriter(_StreamWriter):
    """Write a ``.safetensors`` file holding one tensor ``key`` of ``shape``, row block by row
    block, atomically (the ``safetensors`` package itself needs the whole tensor in memory).
    ``dtype``: float16, bfloat16 (rounded to nearest even), float32 (default) or float64;
    ``metadata``: a dict stored as strings in the header's ``__metadata__``.
    """

    _suffix = ".safetensors"

    def __init__(self, path, shape, dtype="float32", *, key="logits", metadata=None, name="logits"):
        import json

        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(f"shape must be (rows, vocab) or (..., vocab), got {shape}")
        dtype = str(np.dtype(dtype)) if dtype != "bfloat16" else dtype
        _check_dtype(dtype, "safetensors")
        if not key or key == "__metadata__":
            raise ValueError(f"invalid tensor name {key!r}")
        self.shape, self.dtype, self.key = shape, dtype, str(key)
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        header = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        header[self.key] = {"dtype": _ST_NAME[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        self._text = text + b" " * (-len(text) % 8)  # data starts 8-byte aligned
        super().__init__(path, int(np.prod(shape[:-1], dtype=np.int64)), shape[-1], name=name)

    def _header(self) -> bytes:
        return struct.pack("<Q", len(self._text)) + self._text

    def _encode(self, block, start):
        return _narrow(block, self.dtype, start, self.name).tobytes()


class LlamaCppKldWriter(_StreamWriter):
    """Write llama.cpp's KL-divergence base file (``llama-perplexity --kl-divergence-base``) row
    block by row block, atomically; the layout is described in :mod:`kldiv.io.formats`.

    ``tokens``: the ``n_chunk * n_ctx`` evaluated token ids (they fix ``n_chunk``); the rows are
    the ``n_chunk * (n_ctx - 1 - n_ctx // 2)`` scored positions, chunk after chunk. Each row is
    stored as uint16 log-probabilities over the 16 nats below its maximum. ``-inf`` logits
    (probability 0) are allowed and stored below the window; NaN, ``+inf`` or a row without a
    finite logit is an error naming the row.

    Rows of normalised log-probabilities are stored as given, not renormalised (a row read
    from such a file is written back bit for bit); other rows are logits, encoded as llama.cpp
    encodes them (:func:`kldiv.io.llamacpp.encode_rows`).
    """

    _suffix = ".kld"

    def __init__(self, path, n_vocab: int, *, tokens, n_ctx: int, name="logits"):
        n_ctx, n_vocab = int(n_ctx), int(n_vocab)
        per = kld_scored_per_chunk(n_ctx)
        if n_ctx < 3:
            raise ValueError(f"n_ctx must be >= 3 (llama.cpp scores n_ctx - 1 - n_ctx // 2 rows per "
                             f"chunk), got {n_ctx}")
        if not 1 <= n_vocab <= 2**31 - 1:
            raise ValueError(f"n_vocab must be in [1, 2**31 - 1], got {n_vocab}")
        tok = np.asarray(tokens)
        if tok.size and not np.issubdtype(tok.dtype, np.integer):
            raise TypeError(f"tokens: expected integer token ids, got dtype {tok.dtype}")
        tok = tok.reshape(-1)
        if tok.size == 0 or tok.size % n_ctx:
            raise ValueError(f"tokens: {tok.size} ids is not a whole number (>= 1) of chunks of "
                             f"n_ctx = {n_ctx} tokens")
        if tok.min() < 0 or tok.max() >= n_vocab:
            i = int(np.argmax((tok < 0) | (tok >= n_vocab)))
            raise ValueError(f"tokens: id {int(tok[i])} at position {i} is outside the vocabulary "
                             f"[0, {n_vocab})")
        self.n_ctx, self.n_chunk = n_ctx, tok.size // n_ctx
        self.tokens = tok.astype("<i4")
        self._nv = row_width(n_vocab)
        super().__init__(path, self.n_chunk * per, n_vocab, name=name)

    def _header(self) -> bytes:
        return KLD_MAGIC + struct.pack("<3i", self.n_ctx, self.n_vocab, self.n_chunk) + self.tokens.tobytes()

    def write_stored(self, raw) -> None:
        """Append rows already in the stored form, (rows, nv) uint16 as a KL base file holds
        them (:meth:`kldiv.io.formats.KldSource.read_raw`): copied bit for bit."""
        if self._fh is None:
            raise RuntimeError(f"{type(self).__name__} writes inside a `with` block only")
        raw = np.asarray(raw)
        if raw.dtype != np.uint16 or raw.ndim != 2 or raw.shape[1] != self._nv:
            raise ValueError(f"{self.name}: stored rows must be uint16 of shape (rows, {self._nv}), "
                             f"got {raw.dtype} {raw.shape}")
        if self.rows_written + raw.shape[0] > self.n_rows:
            raise ValueError(f"{self.name}: {self.rows_written + raw.shape[0]} rows written, the "
                             f"header promises {self.n_rows}")
        self._put(np.ascontiguousarray(raw, dtype="<u2").tobytes())
        self.rows_written += raw.shape[0]

    def _encode(self, block, start):
        x = np.asarray(block, dtype=np.float32)  # llama.cpp encodes float32 logits
        nan = np.isnan(x).any(axis=1)
        pinf = (x == np.inf).any(axis=1)
        empty = ~np.isfinite(x).any(axis=1)
        bad = nan | pinf | empty
        if bad.any():
            r = _first_bad_row(bad, start)
            what = "NaN" if nan[r - start] else "+inf" if pinf[r - start] else "no finite"
            raise ValueError(f"{self.name}: row {r} has {what} logits; llama.cpp's format needs "
                             f"finite logits (-inf, probability 0, is allowed)")
        return encode_rows(x, self._nv).tobytes()


def _stored_dtype(src: LogitsSource) -> str:
    """The dtype the input stores its values in (bfloat16 for BF16 safetensors; float32 for a
    llama.cpp file, whose decoded log-probabilities are float32)."""
    if getattr(src, "_bf16", False):
        return "bfloat16"
    arr = getattr(src, "_arr", None) if src.format in ("npy", "safetensors") else getattr(src, "_a", None)
    if arr is not None and arr.dtype.kind == "f" and str(arr.dtype.newbyteorder("=")) in _DTYPES:
        return str(arr.dtype.newbyteorder("="))
    return "float32"


@dataclass
class ConvertResult:
    """What :func:`convert_logits` wrote; ``str(result)`` is the one-line summary."""

    path: str
    format: str          # "npy", "safetensors" or "llamacpp"
    dtype: str           # stored dtype ("uint16 log-probs" for llama.cpp)
    n_rows: int
    n_vocab: int
    nbytes: int          # size of the written file
    source: str
    source_format: str
    n_ctx: int | None = None
    n_chunk: int | None = None

    def __str__(self) -> str:
        what = {"npy": f".npy {self.dtype}", "safetensors": f"safetensors {self.dtype}",
                "llamacpp": f"llama.cpp KL base (n_ctx {self.n_ctx}, {self.n_chunk} chunks)"}[self.format]
        return (f"{self.path}: {self.n_rows} rows x {self.n_vocab} vocab, {what}, "
                f"{self.nbytes} bytes written (from {self.source_format} {self.source})")


def convert_logits(source, path, *, to=None, dtype=None, key=None, out_key="logits",
                   tokens=None, n_ctx=None, below_window="drop", metadata=None,
                   chunk_rows=None, progress=None, _names=None) -> ConvertResult:
    """Convert logits between .npy, .safetensors and llama.cpp's KL-divergence base format.

    Streams block by block (about 32 MB of float32 rows at a time) into an atomically written
    ``path``. ``kldiv convert`` on the command line.

    Args:
        source: a file :func:`~kldiv.io.open_logits` reads (.npy, .safetensors, llama.cpp KL base,
            recognised by content), an array of shape (rows, vocab) or (..., vocab), or a
            :class:`~kldiv.io.LogitsSource`.
        path: the output file. Its format is ``to`` ("npy", "safetensors" or "llamacpp"), else
            its suffix: ``.npy``, ``.safetensors``, ``.kld``/``.bin``/``.dat`` (llama.cpp).
        dtype: for .npy and .safetensors: "float16", "float32", "float64", or "bfloat16"
            (safetensors only). Default: the input's own dtype (float32 for a llama.cpp input;
            float32 for a bfloat16 input written to .npy). Not allowed for llama.cpp output.
        key: the tensor of a .safetensors input that holds several; ``out_key``: the tensor
            name written to a .safetensors output (default "logits"); ``metadata``: its
            ``__metadata__``.
        tokens: llama.cpp output only: the ``n_chunk * n_ctx`` evaluated token ids (an int
            array or a .npy / text file, see :func:`~kldiv.io.load_tokens`). Default: the token
            table of a llama.cpp input.
        n_ctx: llama.cpp output only: the context size; the input's rows must be
            ``n_chunk * (n_ctx - 1 - n_ctx // 2)``. Default: that of a llama.cpp input
            (required otherwise).
        below_window: how a llama.cpp input's entries below its 16-nat window are decoded:
            "drop" (``-inf``, probability 0, as ``kldiv compare`` reads a reference) or "floor"
            (the stored window floor, as it reads the other side).
        chunk_rows: rows per block (default: about 32 MB of float32).
        progress: show a progress bar (default: only when stderr is a terminal and CI is unset).

    Returns:
        A :class:`ConvertResult` (``str()`` of it is a one-line summary).

    Raises:
        ValueError naming the argument and what was expected: unknown output suffix, a dtype the
        format cannot store, missing or wrong ``n_ctx`` / ``tokens``, a row count that is not a
        whole number of chunks; naming the row: NaN/+inf rows for llama.cpp output, values
        outside a narrower dtype's range. Nothing is left at ``path`` (an existing file is kept).

    NaN and infinite logits are copied as they are into .npy and .safetensors.

    >>> import os, tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> x = np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32)
    >>> r = convert_logits(x, os.path.join(d, "base.kld"), tokens=np.arange(16) % 10, n_ctx=8)
    >>> r.n_chunk, r.n_rows                 # n_ctx 8: 3 scored rows per chunk, 2 chunks
    (2, 6)
    >>> r = convert_logits(os.path.join(d, "base.kld"), os.path.join(d, "lp.safetensors"),
    ...                    dtype="bfloat16")
    >>> r.format, r.dtype, r.n_rows, r.n_vocab
    ('safetensors', 'bfloat16', 6, 10)
    """
    names = _arg_names(_names)
    fmt = output_format(path, to, _names=_names)
    _check_dtype(dtype, fmt, _names)
    if below_window not in ("drop", "floor"):
        raise ValueError(f"below_window must be 'drop' or 'floor', got {below_window!r}")
    if fmt != "llamacpp":
        extra = [names[k] for k, v in (("n_ctx", n_ctx), ("tokens", tokens)) if v is not None]
        if extra:
            verb = "only apply" if len(extra) > 1 else "only applies"
            raise ValueError(f"{' and '.join(extra)} {verb} to llama.cpp output, not {fmt}")
    src = open_logits(source, key=key, side="reference" if below_window == "drop" else "other")
    try:
        return _convert(src, os.fspath(path), fmt, dtype, out_key, tokens, n_ctx, metadata,
                        chunk_rows, progress, names)
    finally:
        if src is not source:
            src.close()


def _llamacpp_layout(src, tokens, n_ctx, names):
    """(tokens, n_ctx) for a llama.cpp output, checked against the input's rows."""
    src_ctx = getattr(src, "n_ctx", None)
    if n_ctx is None:
        if src_ctx is None:
            raise ValueError(
                f"{names['n_ctx']} is required for llama.cpp output: the context size the logits "
                f"were computed with (each chunk of n_ctx tokens stores its last "
                f"n_ctx - 1 - n_ctx // 2 positions); {src.name} is not a llama.cpp file that "
                f"could supply it")
        n_ctx = src_ctx
    n_ctx = int(n_ctx)
    if n_ctx < 3:
        raise ValueError(f"{names['n_ctx']} must be >= 3 (llama.cpp stores n_ctx - 1 - n_ctx // 2 "
                         f"rows per chunk), got {n_ctx}")
    if src_ctx is not None and n_ctx != src_ctx:
        raise ValueError(f"{names['n_ctx']} {n_ctx} contradicts the n_ctx {src_ctx} of {src.name}: "
                         f"its rows are the scored positions of its own chunks; leave it out")
    per = kld_scored_per_chunk(n_ctx)
    if src.n_rows == 0 or src.n_rows % per:
        k = max(1, src.n_rows // per)
        raise ValueError(
            f"{src.name} has {src.n_rows} rows, not a whole number of chunks: with "
            f"{names['n_ctx']} {n_ctx} llama.cpp stores {per} scored rows per chunk (positions "
            f"{n_ctx // 2}..{n_ctx - 2} of each chunk of {n_ctx} tokens), so the rows must be a "
            f"multiple of {per} (such as {k * per} or {(k + 1) * per}); check {names['n_ctx']}")
    n_chunk = src.n_rows // per
    expect = n_chunk * n_ctx
    if tokens is None:
        tok = getattr(src, "all_tokens", None)
        if tok is None:
            raise ValueError(
                f"{names['tokens']} is required for llama.cpp output: the {n_chunk} * {n_ctx} = "
                f"{expect} evaluated token ids (llama-perplexity evaluates the other model on "
                f"them); {src.name} is not a llama.cpp file that could supply them")
        label = f"{src.name} (token table)"
    else:
        if isinstance(tokens, (str, os.PathLike)):
            label = os.fspath(tokens)
            tok = load_tokens(tokens)
        else:
            label = names["tokens"]
            tok = np.asarray(tokens)
            if tok.size and not np.issubdtype(tok.dtype, np.integer):
                raise TypeError(f"{label}: expected integer token ids, got dtype {tok.dtype}")
            tok = tok.reshape(-1)
    if tok.shape[0] != expect:
        hint = ""
        if tok.shape[0] == src.n_rows:
            hint = (" (it has one id per row, like the next-token file of `kldiv compare`; this "
                    "format stores every evaluated token, the first half of each chunk too)")
        raise ValueError(f"{label}: {tok.shape[0]} token ids, expected n_chunk * n_ctx = "
                         f"{n_chunk} * {n_ctx} = {expect}{hint}")
    v = src.n_vocab
    out = (tok < 0) | (tok >= v)
    if out.any():
        i = int(np.argmax(out))
        raise ValueError(f"{label}: token id {int(tok[i])} at position {i} is outside the "
                         f"vocabulary [0, {v})")
    return tok, n_ctx


def _convert(src, path, fmt, dtype, out_key, tokens, n_ctx, metadata, chunk_rows, progress, names):
    n, v = src.n_rows, src.n_vocab
    if fmt == "llamacpp":
        tok, n_ctx = _llamacpp_layout(src, tokens, n_ctx, names)
        writer = LlamaCppKldWriter(path, v, tokens=tok, n_ctx=n_ctx, name=src.name)
        stored = "uint16 log-probs"
    else:
        stored = dtype or _stored_dtype(src)
        if fmt == "npy" and stored == "bfloat16":
            stored = "float32"  # widened exactly: .npy has no bfloat16
        if fmt == "npy":
            writer = NpyWriter(path, (n, v), stored, name=src.name)
        else:
            writer = SafetensorsWriter(path, (n, v), stored, key=out_key, metadata=metadata,
                                       name=src.name)
    rows_per = int(chunk_rows) if chunk_rows else max(1, _BLOCK_BYTES // (4 * max(v, 1)))
    if fmt == "llamacpp" and not chunk_rows:
        rows_per = max(1, rows_per // 4)  # the encoder makes a few float64 temporaries per block
    # llama.cpp to llama.cpp: the stored rows are copied as they are (lossless)
    raw = getattr(src, "read_raw", None) if fmt == "llamacpp" else None
    bar = progress_bar(progress, n, desc="kldiv convert", unit="row")
    try:
        with writer:
            for s in range(0, n, rows_per):
                e = min(n, s + rows_per)
                if raw is not None:
                    writer.write_stored(raw(s, e))
                else:
                    writer.write(src.read(s, e))
                src.release(s, e)
                if bar is not None:
                    bar.update(e - s)
    finally:
        if bar is not None:
            bar.close()
    return ConvertResult(path=path, format=fmt, dtype=stored, n_rows=n, n_vocab=v,
                         nbytes=os.path.getsize(path), source=src.name, source_format=src.format,
                         n_ctx=getattr(writer, "n_ctx", None), n_chunk=getattr(writer, "n_chunk", None))


def save_llamacpp_kld(path, logits, *, tokens, n_ctx: int, chunk_rows: int = 1024) -> None:
    """Write logits in llama.cpp's KL-divergence base format (``--kl-divergence-base``), atomically.

    ``logits``: (n_chunk * (n_ctx - 1 - n_ctx // 2), n_vocab) float logits (or normalised
    log-probabilities, stored as given), the scored positions of each chunk in order (see
    :func:`kldiv.io.kld_scored_per_chunk`); ``-inf`` (probability 0) is allowed, NaN, ``+inf``
    and rows without a finite logit are errors naming the row. ``tokens``: the n_chunk * n_ctx
    evaluated token ids. Each row is stored as log-probabilities quantised to uint16 over the 16
    nats below its maximum (llama.cpp's encoding). Streams through :class:`LlamaCppKldWriter`
    (as ``kldiv convert`` does).
    """
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
