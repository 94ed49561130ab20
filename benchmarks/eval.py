"""`kldiv eval`: peak memory against text length (must be flat) and the comparison's share of time.

A random Llama model (default: 4 layers, hidden 256, vocabulary 32000) is built with
`transformers` and saved to a temporary directory as the reference, with a candidate whose linear
weights are rounded to 4-bit groups. Then:

1. peak memory: ``kldiv.eval.evaluate`` runs in a fresh process on texts of K, 4K and 16K chunks of
   ``--ctx`` tokens; the growth of the peak resident memory (VmHWM, reset after the models are
   loaded) must not scale with the text: one batch of logits per model is in memory at a time,
   plus 8 bytes per scored token and kept quantity (exact quantiles);
2. time: the comparison (per-row statistics, top-k overlap, accumulation) against the models'
   forward passes, from the same runs (``timing`` in the result). Issue 14's target: at most 5%
   of the forward time on real models; a tiny random model's forward pass is far cheaper than a
   real one's per token, so its share here is an upper bound.

    python benchmarks/eval.py            # 4 layers x 256, V = 32000, ctx 512, 4, 16 and 64 chunks
    python benchmarks/eval.py --quick    # a small smoke run for CI
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def _peak_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(directory, layers, hidden, vocab, ctx):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), max_position_embeddings=ctx,
                      initializer_range=0.1)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    ref.save_pretrained(os.path.join(directory, "ref"))

    def q4(w, group=32):
        g = w.reshape(-1, group)
        s = g.abs().amax(1, keepdim=True).clamp_min(1e-12) / 7
        return (torch.clamp(torch.round(g / s), -8, 7) * s).reshape(w.shape)

    cand = LlamaForCausalLM(cfg)
    cand.load_state_dict({k: q4(v) if v.ndim == 2 and "proj" in k else v for k, v in ref.state_dict().items()})
    cand.save_pretrained(os.path.join(directory, "q4"))


def child(directory, chunks, ctx, batch):
    """In a fresh process: load, reset the peak, evaluate, print peak growth and timing as JSON."""
    import numpy as np

    from kldiv.eval import evaluate
    from kldiv.eval.runner import HFModel

    HFModel(os.path.join(directory, "ref"))  # warm the imports
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, chunks * ctx)
    # one chunk first: one-time allocations (torch's kernels, thread pools) are not the text's
    evaluate(os.path.join(directory, "ref"), [os.path.join(directory, "q4")], tokens=ids[:ctx],
             ctx=ctx, batch=batch, progress=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _peak_mb()
    res = evaluate(os.path.join(directory, "ref"), [os.path.join(directory, "q4")], tokens=ids,
                   ctx=ctx, batch=batch, progress=False)
    after = _peak_mb()
    t = res.summary()["timing"]
    print(json.dumps({"before": before, "after": after, "timing": t,
                      "tokens": res.summary()["candidates"][0]["n_tokens"]}))


def run_child(directory, chunks, ctx, batch):
    out = subprocess.run([sys.executable, __file__, "--child", directory, str(chunks), str(ctx), str(batch)],
                         capture_output=True, text=True, check=True, env=dict(os.environ, TQDM_DISABLE="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4, help="the short text's chunks (the long one: 4x)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        d, c, x, b = args.child
        child(d, int(c), int(x), int(b))
        return 0
    if args.quick:
        args.layers, args.hidden, args.ctx, args.chunks = 2, 64, 64, 1
    vocab = 32000
    with tempfile.TemporaryDirectory(prefix="kldiv-eval-bench-") as d:
        build(d, args.layers, args.hidden, vocab, args.ctx)
        rows = []
        for chunks in (args.chunks, 4 * args.chunks, 16 * args.chunks):
            r = run_child(d, chunks, args.ctx, args.batch)
            rows.append((chunks, r))
        print(f"kldiv eval benchmark: Llama {args.layers} layers x {args.hidden}, V = {vocab}, "
              f"ctx {args.ctx}, batch {args.batch}; {os.cpu_count()} CPUs")
        print(f"\n{'chunks':>6} {'tokens':>7} {'scored':>7} {'peak growth MB':>15} {'forward s':>10} "
              f"{'compare s':>10} {'compare/forward':>16} {'tok/s':>8}")
        for chunks, r in rows:
            t = r["timing"]
            fwd = sum(t["forward_seconds"].values())
            print(f"{chunks:6d} {chunks * args.ctx:7d} {r['tokens']:7d} {r['after'] - r['before']:15.1f} "
                  f"{fwd:10.2f} {t['compare_seconds']:10.2f} {100 * t['compare_share_of_forward']:15.1f}% "
                  f"{t['tokens_per_second']:8.0f}")
        g = [r["after"] - r["before"] for _, r in rows]
        print(f"\npeak growth with a 4x and 16x longer text: {g[0]:.1f} MB -> {g[1]:.1f} MB -> {g[2]:.1f} MB "
              f"(one batch of logits: {args.batch * args.ctx * vocab * 4 / 2**20:.0f} MB per model at most)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
