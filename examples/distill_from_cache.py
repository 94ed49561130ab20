"""Distil a small causal LM from an offline sparse teacher cache, on a CPU, in about a minute.

1. A tiny random teacher (a 2-layer Llama built from a config, no download) is saved and run
   once over random token chunks by ``kldiv.cache.build_cache`` (what ``kldiv cache`` does):
   per position its top-k token ids and log-probs, the tail mass and M importance-sampled tail
   tokens.
2. A smaller student (1 layer, narrower) is trained from the cache only, with the sampled-tail
   loss ``kldiv.cache.sampled_kl`` (an unbiased estimate of the full KL; ``--loss bucket``:
   the top-k + tail-bucket loss through ``linear_kl_div``, the student's logits never made).
3. On held-out chunks it reports the student's true KL to the teacher (dense, float64: the
   teacher is run again for this check only) and the certified bounds ``kldiv.cache.kl_bounds``
   computed from the cache alone, and draws them in a figure.

Run:  python examples/distill_from_cache.py --out /tmp/distill_cache   (``--smoke``: seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def _llama(vocab, hidden, layers, seed, ctx, init=0.4):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=ctx, initializer_range=init, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def dense_kl(t_logits, s_logits):
    lp = torch.log_softmax(t_logits.double(), -1)
    lq = torch.log_softmax(s_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="distill_from_cache_out", help="output directory")
    ap.add_argument("--smoke", action="store_true", help="a few seconds: tiny sizes, few steps")
    ap.add_argument("--loss", choices=("sampled", "bucket"), default="sampled")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--tail-samples", type=int, default=12)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from kldiv._atomic import save_atomic, write_text_atomic
    from kldiv.cache import TeacherCache, build_cache, kl_bounds, linear_bucket_kl, sampled_kl

    threads = torch.get_num_threads()
    # tiny matmuls: one thread (more only adds synchronisation, badly so on a loaded machine)
    torch.set_num_threads(1 if args.smoke else max(1, min(4, os.cpu_count() or 1)))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    from kldiv._atomic import save_atomic, write_text_atomic
    from kldiv.cache import TeacherCache, build_cache, kl_bounds, linear_bucket_kl, sampled_kl

    # many training chunks: with few, the student memorises them and its held-out KL rises
    V, ctx = (128, 16) if args.smoke else (256, 32)
    n_train, n_eval = (16, 4) if args.smoke else (1024, 16)
    steps = args.steps or (12 if args.smoke else 300)
    every = max(1, steps // (4 if args.smoke else 15))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    # 1. the teacher and its cache
    teacher = _llama(V, 64, 2, args.seed, ctx).eval()
    tdir = os.path.join(args.out, "teacher")
    teacher.save_pretrained(tdir)
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, V, (n_train + n_eval) * ctx)
    np.save(os.path.join(args.out, "tokens.npy"), ids)
    cdir = os.path.join(args.out, "cache")
    header = build_cache(tdir, cdir, top_k=args.top_k, tail_samples=args.tail_samples,
                         tokens=os.path.join(args.out, "tokens.npy"), ctx=ctx, seed=args.seed,
                         progress=False)
    cache = TeacherCache(cdir)
    train_idx = list(range(n_train))
    ev = [cache[i] for i in range(n_train, n_train + n_eval)]
    ev = {k: torch.stack([e[k] for e in ev]) for k in ev[0]}
    with torch.no_grad():  # the dense teacher, for the check only
        t_eval = teacher(input_ids=ev["input_ids"]).logits.double()

    # 2. the student, from the cache only
    student = _llama(V, 32, 1, args.seed + 1, ctx, init=0.02)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(args.seed)
    hist = {"step": [], "true_kl": [], "lower": [], "upper": [], "sampled_estimate": [],
            "train_loss": []}

    def evaluate(step, train_loss):
        student.eval()
        with torch.no_grad():
            s = student(input_ids=ev["input_ids"]).logits.double()
            lo, hi = kl_bounds(s, ev["topk_ids"], ev["topk_logprobs"],
                               tail_logmass=ev["tail_logmass"])
            est = sampled_kl(s, ev, reduction="mean")
        student.train()
        hist["step"].append(step)
        hist["true_kl"].append(float(dense_kl(t_eval, s).mean()))
        hist["lower"].append(float(lo.mean()))
        hist["upper"].append(float(hi.mean()))
        hist["sampled_estimate"].append(float(est))
        hist["train_loss"].append(train_loss)

    evaluate(0, float("nan"))
    B = 8 if args.smoke else 16
    for step in range(1, steps + 1):
        pick = torch.randint(0, n_train, (B,), generator=gen).tolist()
        items = [cache[train_idx[i]] for i in pick]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        if args.loss == "sampled":
            logits = student(input_ids=batch["input_ids"]).logits
            loss = sampled_kl(logits, batch)
        else:
            h = student.base_model(input_ids=batch["input_ids"]).last_hidden_state
            loss = linear_bucket_kl(h, student.lm_head.weight, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            evaluate(step, float(loss.detach()))

    # 3. report and figure
    width = [u - l for l, u in zip(hist["lower"], hist["upper"])]
    result = {
        "loss": args.loss, "vocab": V, "ctx": ctx, "top_k": args.top_k,
        "tail_samples": args.tail_samples, "steps": steps,
        "bytes_per_token": header["bytes_per_token"],
        "dense_float32_fraction": header["dense_float32_fraction"],
        "mean_tail_mass": float(ev["tail_logmass"].double().exp().mean()),
        "history": hist, "bound_width": width, "seconds": time.perf_counter() - t0,
    }
    write_text_atomic(os.path.join(args.out, "metrics.json"), json.dumps(result, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    st = hist["step"]
    ax.fill_between(st, hist["lower"], hist["upper"], alpha=0.2, label="certified bounds (from the cache)")
    ax.plot(st, hist["lower"], "C0--", lw=1, label="lower: top-k + tail bucket")
    ax.plot(st, hist["upper"], "C0:", lw=1, label="upper: tail on the student's least likely tokens")
    ax.plot(st, hist["true_kl"], "C3-", lw=2, label="true KL(teacher || student), dense")
    ax.plot(st, hist["sampled_estimate"], "C2.", label=f"sampled-tail estimate (M = {args.tail_samples})")
    ax.set_xlabel("step")
    ax.set_ylabel("KL (nats / token), held-out chunks")
    ax.set_title(f"student distilled from a top-{args.top_k} cache ({args.loss} loss), V = {V}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_atomic(os.path.join(args.out, "distill_from_cache.png"), lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    print(f"cache: {header['bytes_per_token']:.0f} bytes/token "
          f"({100 * header['dense_float32_fraction']:.2f}% of dense float32), mean tail mass "
          f"{result['mean_tail_mass']:.3f}")
    print(f"{'step':>6} {'true KL':>9} {'lower':>9} {'upper':>9} {'estimate':>9}")
    for i, s in enumerate(st):
        print(f"{s:6d} {hist['true_kl'][i]:9.4f} {hist['lower'][i]:9.4f} {hist['upper'][i]:9.4f} "
              f"{hist['sampled_estimate'][i]:9.4f}")
    print(f"{result['seconds']:.1f} s; figure {os.path.join(args.out, 'distill_from_cache.png')}")
    return result


if __name__ == "__main__":
    main()
