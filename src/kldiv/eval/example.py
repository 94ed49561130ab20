"""Tiny random models for trying ``kldiv eval`` without a download (docs/eval.md's worked example).

``python -m kldiv.eval.example DIR`` writes into DIR:

- ``ref/``: a 2-layer Llama (hidden 32, vocabulary 1000) in float32, with a word-level
  tokenizer (words ``w0`` .. ``w997``, BOS ``<s>``);
- ``q4/``: the same with every linear weight rounded to 4-bit groups of 32 (absmax scale);
- ``bf16/``: the same weights stored in bfloat16;
- ``drop/``: the second layer dropped;
- ``text.txt``: 4096 words of random text, ``tokens.txt``: the same as token ids.

Needs torch, transformers and tokenizers (``pip install "kldiv[eval]"``); takes a few seconds.
"""
from __future__ import annotations

import os
import sys

VOCAB = 1000


def _quantize_4bit(w, group=32):
    import torch

    g = w.reshape(-1, group)
    scale = g.abs().amax(1, keepdim=True).clamp_min(1e-12) / 7
    return (torch.clamp(torch.round(g / scale), -8, 7) * scale).reshape(w.shape)


def make_tiny_models(directory, *, seed: int = 0, n_words: int = 4096) -> dict:
    """Write the tiny reference, its three candidates and a text into ``directory``; return paths."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2)
    torch.manual_seed(seed)
    ref = LlamaForCausalLM(cfg).eval()
    paths = {k: os.path.join(d, k) for k in ("ref", "q4", "bf16", "drop")}
    ref.save_pretrained(paths["ref"])
    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>").save_pretrained(paths["ref"])
    sd = ref.state_dict()
    q4 = LlamaForCausalLM(cfg)
    q4.load_state_dict({k: _quantize_4bit(v) if v.ndim == 2 and "proj" in k else v for k, v in sd.items()})
    q4.save_pretrained(paths["q4"])
    bf = LlamaForCausalLM(cfg)
    bf.load_state_dict(sd)
    bf.to(torch.bfloat16).save_pretrained(paths["bf16"])
    drop = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1}))
    drop.load_state_dict({k: v for k, v in sd.items() if ".layers.1." not in k})
    drop.save_pretrained(paths["drop"])
    ids = np.random.default_rng(seed).integers(2, VOCAB, n_words)
    paths["text"] = os.path.join(d, "text.txt")
    with open(paths["text"], "w", encoding="utf-8") as fh:
        fh.write(" ".join(f"w{i - 2}" for i in ids) + "\n")
    paths["tokens"] = os.path.join(d, "tokens.txt")
    with open(paths["tokens"], "w", encoding="utf-8") as fh:
        fh.write(" ".join(map(str, ids)) + "\n")
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m kldiv.eval.example DIR", file=sys.stderr)
        return 2
    for k, p in make_tiny_models(argv[0]).items():
        print(f"{k:>6}: {p}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
