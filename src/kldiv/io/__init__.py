"""Readers and writers for logits files: .npy (memory-mapped), .safetensors, llama.cpp KL base.

Every reader returns a :class:`LogitsSource`: ``n_rows`` distributions over ``n_vocab`` categories,
read in blocks of rows (``read(start, stop)`` gives a float32 (rows, vocab) array), so that files
larger than memory stream through in bounded memory. The format is recognised from the first
bytes of the file, not from its name:

=====================  ===============================  ======================================
format                 first bytes                      rows
=====================  ===============================  ======================================
NumPy ``.npy``         ``\\x93NUMPY``                    a (rows, vocab) or (..., vocab) array
safetensors            8-byte header length, then ``{``  one tensor (``key=``), (..., vocab)
llama.cpp KL base      ``_logits_``                     the scored positions, uint16 log-probs
=====================  ===============================  ======================================

Writers (atomic: temporary file beside the target, then ``os.replace``): :func:`save_npy`,
:func:`save_safetensors`, :func:`save_llamacpp_kld` for whole arrays; :class:`NpyWriter`,
:class:`SafetensorsWriter`, :class:`LlamaCppKldWriter` (:mod:`kldiv.io.writers`) for rows block
by block, in bounded memory. llama.cpp's layout, encoder and decoder are in
:mod:`kldiv.io.llamacpp`, which the reader and the writer both import (dependencies point one
way: ``llamacpp`` <- ``formats`` <- ``writers``). :func:`convert_logits` converts between the three formats, e.g. to
export logits to llama.cpp's KL base file (``kldiv convert INPUT OUTPUT`` on the command line;
see docs/convert.md).
"""
from __future__ import annotations

from .formats import (
    FileDtypeError,
    LogitsSource,
    load_tokens,
    open_logits,
    save_npy,
    save_safetensors,
)
from .llamacpp import KLD_MAGIC, kld_next_tokens, kld_scored_per_chunk
from .writers import (
    ConvertResult,
    LlamaCppKldWriter,
    NpyWriter,
    SafetensorsWriter,
    convert_logits,
    save_llamacpp_kld,
)

__all__ = [
    "LogitsSource", "open_logits", "load_tokens", "save_npy", "save_safetensors",
    "save_llamacpp_kld", "kld_scored_per_chunk", "kld_next_tokens", "KLD_MAGIC",
    "NpyWriter", "SafetensorsWriter", "LlamaCppKldWriter", "convert_logits", "ConvertResult",
    "FileDtypeError",
]
