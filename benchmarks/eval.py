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

3. ``--overhead``: the comparison's cost on top of the forward passes, end to end, on a model
   of realistic shape (default: Llama, hidden 1024, 8 layers, MLP 2816, 16 heads, 4 KV heads,
   V = 32000, ctx 512: 156M parameters, ~0.6 GB in float32). In one process, rounds alternate
   between (a) the two models' forward passes alone (the same ``HFModel.block`` calls as
   ``kldiv eval``) and (b) ``kldiv.eval.evaluate`` on the same chunks with the same loaded
   models; the overhead is the median over rounds of wall(b) / wall(a) - 1 (interleaved, so
   that a shared machine's load affects both alike), next to the runner's own
   compare / forward share.

    python benchmarks/eval.py            # 4 layers x 256, V = 32000, ctx 512, 4, 16 and 64 chunks
    python benchmarks/eval.py --quick    # a small smoke run for CI
    python benchmarks/eval.py --overhead                     # hidden 1024 x 8 layers, V = 32000
    python benchmarks/eval.py --overhead --vocab 128256      # a Llama-3 vocabulary
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


def build(directory, layers, hidden, vocab, ctx, intermediate=None, kv_heads=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=kv_heads or max(1, hidden // 128), max_position_embeddings=ctx,
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
    ids = rng.integers(0, int(os.environ.get("KLDIV_BENCH_VOCAB", "32000")), chunks * ctx)
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


def overhead_child(directory, chunks, ctx, batch, rounds, vocab):
    """In a fresh process: interleaved rounds of forward passes alone and of evaluate (JSON)."""
    import time

    import numpy as np

    from kldiv.eval import evaluate
    from kldiv.eval.runner import HFModel, scored_positions

    ref = HFModel(os.path.join(directory, "ref"))
    cand = HFModel(os.path.join(directory, "q4"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, chunks * ctx)
    first, stop = scored_positions(ctx)

    def forward_only():
        c0_ = time.process_time()
        t0 = time.perf_counter()
        for c0 in range(0, chunks, batch):
            c1 = min(chunks, c0 + batch)
            x = ids[c0 * ctx:c1 * ctx].reshape(c1 - c0, ctx)
            a = ref.block(x, first, stop, c0)
            b = cand.block(x, first, stop, c0)
            del a, b
        return time.perf_counter() - t0, time.process_time() - c0_

    def full():
        c0_ = time.process_time()
        res = evaluate(ref, [cand], tokens=ids, ctx=ctx, batch=batch, progress=False, bos=None)
        cpu = time.process_time() - c0_
        t = res.summary()["timing"]
        return t["wall_seconds"], t["compare_seconds"], sum(t["forward_seconds"].values()), cpu

    forward_only(), full()  # warm-up: one-time allocations, thread pools
    out = []
    for r in range(rounds):
        if r % 2:
            e = full()
            f = forward_only()
        else:
            f = forward_only()
            e = full()
        out.append({"forward_only": f[0], "forward_only_cpu": f[1], "eval_wall": e[0], "compare_seconds": e[1],
                    "eval_forward": e[2], "eval_cpu": e[3]})
    print(json.dumps(out))


def overhead(args):
    vocab = args.vocab
    with tempfile.TemporaryDirectory(prefix="kldiv-eval-overhead-") as d:
        build(d, args.layers, args.hidden, vocab, args.ctx, args.intermediate, args.kv_heads)
        out = subprocess.run([sys.executable, __file__, "--overhead-child", d, str(args.chunks), str(args.ctx),
                              str(args.batch), str(args.rounds), str(vocab)],
                             capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        if out.returncode:
            sys.stderr.write(out.stderr)
            return out.returncode
        rows = json.loads(out.stdout.strip().splitlines()[-1])
    import statistics

    n_params = _n_params(args.layers, args.hidden, args.intermediate or 2 * args.hidden, vocab,
                         args.kv_heads or max(1, args.hidden // 128))
    print(f"kldiv eval overhead: Llama {args.layers} layers x {args.hidden} (MLP "
          f"{args.intermediate or 2 * args.hidden}), V = {vocab}, {n_params / 1e6:.0f}M parameters, "
          f"ctx {args.ctx}, {args.chunks} chunks of {args.ctx - 1 - args.ctx // 2} scored tokens, batch "
          f"{args.batch}; reference + one candidate; {args.rounds} interleaved rounds; {os.cpu_count()} CPUs")
    print(f"\n{'round':>5} {'forward only s':>15} {'eval s':>8} {'wall: eval/fwd - 1':>19} "
          f"{'CPU: eval/fwd - 1':>18} {'compare/forward':>16}")
    for i, r in enumerate(rows):
        print(f"{i:5d} {r['forward_only']:15.3f} {r['eval_wall']:8.3f} "
              f"{100 * (r['eval_wall'] / r['forward_only'] - 1):18.2f}% "
              f"{100 * (r['eval_cpu'] / r['forward_only_cpu'] - 1):17.2f}% "
              f"{100 * r['compare_seconds'] / r['eval_forward']:15.2f}%")
    med = statistics.median
    ov = med([r["eval_wall"] / r["forward_only"] - 1 for r in rows])
    ov_cpu = med([r["eval_cpu"] / r["forward_only_cpu"] - 1 for r in rows])
    share = med([r["compare_seconds"] / r["eval_forward"] for r in rows])
    print(f"\nmedians: forward only {med([r['forward_only'] for r in rows]):.3f} s, eval "
          f"{med([r['eval_wall'] for r in rows]):.3f} s; overhead eval / forward - 1: wall {100 * ov:.2f}%, "
          f"process CPU time {100 * ov_cpu:.2f}%; the runner's compare / forward time {100 * share:.2f}% "
          f"(target <= 5%)")
    return 0


def _n_params(layers, hidden, inter, vocab, kv):
    head = hidden // 64
    attn = hidden * hidden * 2 + 2 * hidden * (kv * hidden // head)
    return 2 * vocab * hidden + layers * (attn + 3 * hidden * inter + 2 * hidden) + hidden


def run_child(directory, chunks, ctx, batch, vocab=32000):
    out = subprocess.run([sys.executable, __file__, "--child", directory, str(chunks), str(ctx), str(batch)],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, TQDM_DISABLE="1", KLDIV_BENCH_VOCAB=str(vocab)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4, help="the short text's chunks (the long one: 4x)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2 x hidden; "
                    "--overhead: 2816 at hidden 1024)")
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5, help="--overhead: interleaved rounds")
    ap.add_argument("--overhead", action="store_true",
                    help="the comparison's cost on top of the forward passes, on a realistic model")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--overhead-child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        d, c, x, b = args.child
        child(d, int(c), int(x), int(b))
        return 0
    if args.overhead_child:
        d, *rest = args.overhead_child
        overhead_child(d, *map(int, rest))
        return 0
    if args.overhead:
        if args.quick:
            args.layers, args.hidden, args.ctx, args.chunks, args.rounds = 1, 64, 64, 1, 1
        else:
            if args.layers == 4 and args.hidden == 256:  # the defaults of the memory runs
                args.layers, args.hidden = 8, 1024
            if args.intermediate is None and args.hidden == 1024:
                args.intermediate, args.kv_heads = 2816, args.kv_heads or 4
            args.chunks = args.chunks if args.chunks != 4 else 2
        return overhead(args)
    if args.quick:
        args.layers, args.hidden, args.ctx, args.chunks = 2, 64, 64, 1
    vocab = args.vocab
    with tempfile.TemporaryDirectory(prefix="kldiv-eval-bench-") as d:
        build(d, args.layers, args.hidden, vocab, args.ctx)
        rows = []
        for chunks in (args.chunks, 4 * args.chunks, 16 * args.chunks):
            r = run_child(d, chunks, args.ctx, args.batch, vocab)
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
