"""``kldiv cache``: run a teacher once and store its sparse next-token distributions for distillation."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache",
        help="offline sparse teacher cache (top-k + sampled tail) for distillation",
        description=(
            "Run TEACHER (a Hugging Face causal LM directory, or a logits file that `kldiv compare` "
            "reads) over the tokens in chunks of --ctx positions and store, per position, the top-k "
            "token ids and log-probs, the tail mass, and --tail-samples tail tokens drawn by "
            "importance sampling with their weights (unbiased KL estimates, arXiv 2503.16870), in "
            "safetensors shards with a provenance header (cache.json). Shards are written "
            "atomically; rerun the same command to resume an interrupted run."
        ),
    )
    p.add_argument("teacher", metavar="TEACHER", help="model directory or logits file (.npy, .safetensors, llama.cpp KL base)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="FILE", help="text file, tokenized with the teacher's tokenizer")
    src.add_argument("--tokens", metavar="FILE", help="token ids: .npy of int, or text with whitespace/comma separated ids")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="teacher tokens kept exactly per position")
    p.add_argument("--tail-samples", type=int, default=0, metavar="M",
                   help="tail tokens sampled per position with importance weights (default 0; 12 is the paper's)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="store log_softmax(logits / T) (default: no temperature; recorded in the header)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="positions per chunk (default 512, or the logits file's rows if fewer)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--shard-chunks", type=int, default=16, metavar="C", help="chunks per shard (default 16)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="chunks per forward pass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tail samples (default 0)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the teacher runs in (default float32)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..cache import build_cache

    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    h = build_cache(args.teacher, args.out, top_k=args.top_k, tokens=args.tokens, text=args.text,
                    tail_samples=args.tail_samples, temperature=args.temperature, ctx=args.ctx,
                    chunks_per_shard=args.shard_chunks, batch=args.batch, seed=args.seed,
                    dtype=args.dtype, device=args.device,
                    progress=False if args.no_progress else None)
    if not args.quiet:
        st = h["settings"]
        print(f"cache: {args.out}  ({h['positions']} positions, {st['n_chunks']} chunks of {st['ctx']}, "
              f"K = {st['top_k']}, M = {st['tail_samples']}, V = {h['vocab_size']})")
        print(f"storage: {h['bytes_per_token']:.1f} bytes/token on disk "
              f"({h['bytes_per_token_payload']} payload); dense float32 logits: "
              f"{h['dense_float32_bytes_per_token']} bytes/token; ratio {100 * h['dense_float32_fraction']:.3f}%")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(None))
