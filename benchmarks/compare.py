"""`kldiv compare` throughput and memory, side by side with naive NumPy and with merely reading.

Two float32 .npy logits files of N x V (default 8000 x 32000, 1 GB each) are written to a
temporary directory (or --dir) and read once so that they sit in the page cache. Then, in
rounds (each method once per round, so that a shared machine's load weighs on all alike):

- ``read``: read both files through, 500 rows at a time, into one reused buffer
  (``readinto``): the floor for anything that looks at every byte;
- ``naive numpy``: per 500-row block of the two memory-mapped files, ``lp = x - logsumexp(x)``
  for both, then ``sum(exp(lp_ref) * (lp_ref - lp_other))`` (float32, the usual script);
- ``kldiv compare``: ``kldiv.compare(file_a, file_b)`` (compiled row kernel, all cores, the full
  report: KL, top-1 agreement, reference top-1 probability; exact statistics at the end), also
  with one thread, and with the reverse KL and the Jensen-Shannon divergence added.

Printed: median seconds, GB/s of logits (both files), and ratios. Targets (issue 5): kldiv >= 10x
the naive code, and no slower than 1.5x the read. Then the peak resident memory of
``kldiv.compare`` in a fresh process at two sizes (N and N/4 rows): it must not grow with N
beyond the per-token vectors (a few bytes per token). Timings on a shared machine are noisy:
compare ratios within one run.

    python benchmarks/compare.py             # 8000 x 32000 (needs 2 GB of disk, ~1-2 minutes)
    python benchmarks/compare.py --quick     # tiny smoke run for CI
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

BLOCK = 500


def write_pair(directory, n, v, seed=0, via_memmap=False):
    """Two .npy files (reference, other = reference + small noise), written block by block.

    By default the files are written with ``write`` system calls, as ``np.save`` (and torch's and
    safetensors' savers) write them; Linux then caches them in large folios, which a memory map
    maps cheaply. ``via_memmap=True`` writes through a memory map instead (``np.lib.format.
    open_memmap``): the page cache then holds 4 KB pages, and mapping them costs the kernel about
    0.1 CPU-s per GB more (for every method that maps the files, naive NumPy included).
    """
    rng = np.random.default_rng(seed)
    paths = [os.path.join(directory, f"{name}_{n}x{v}.npy") for name in ("ref", "other")]
    header = {"descr": "<f4", "fortran_order": False, "shape": (n, v)}
    if via_memmap:
        outs = [np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(n, v)) for p in paths]
    else:
        outs = [open(p, "wb") for p in paths]
        for f in outs:
            np.lib.format.write_array_header_1_0(f, header)
    try:
        for s in range(0, n, 1000):
            e = min(n, s + 1000)
            a = (rng.standard_normal((e - s, v), dtype=np.float32) * 3)
            blocks = (a, a + rng.standard_normal((e - s, v), dtype=np.float32) * 0.05)
            for out, blk in zip(outs, blocks):
                if via_memmap:
                    out[s:e] = blk
                else:
                    out.write(blk.tobytes())
    finally:
        for out in outs:
            out.flush()
            if not via_memmap:
                out.close()
    del outs
    return paths


def read_files(paths, vocab):
    """Read both files completely, 500 rows at a time, into one reused buffer."""
    view = memoryview(bytearray(BLOCK * vocab * 4))
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while True:
                k = fh.readinto(view)
                if not k:
                    break
                total += k
    return total


def naive_numpy(paths):
    a = np.load(paths[0], mmap_mode="r")
    b = np.load(paths[1], mmap_mode="r")
    out = np.empty(a.shape[0], np.float32)
    for s in range(0, a.shape[0], BLOCK):
        x = np.asarray(a[s:s + BLOCK])
        y = np.asarray(b[s:s + BLOCK])
        mx = x.max(1, keepdims=True)
        lp = x - (mx + np.log(np.exp(x - mx).sum(1, keepdims=True)))
        my = y.max(1, keepdims=True)
        lq = y - (my + np.log(np.exp(y - my).sum(1, keepdims=True)))
        out[s:s + BLOCK] = (np.exp(lp) * (lp - lq)).sum(1)
    return out


def kldiv_compare(paths, threads=None, **kw):
    import kldiv

    return kldiv.compare(paths[0], paths[1], progress=False, threads=threads, **kw).kl


def _peak_mb():
    """Peak resident set size of this process in MB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_rss(paths):
    """Run in a fresh process: peak RSS (MB) before and after one kldiv.compare call."""
    import kldiv.compare  # noqa: F401  (import cost is part of the baseline)

    try:  # reset the high-water mark (Linux): ru_maxrss would include the parent's at fork
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _peak_mb()
    r = kldiv.compare.compare(paths[0], paths[1], progress=False)
    after = _peak_mb()
    print(f"{before:.1f} {after:.1f} {r.n_tokens}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--quick", action="store_true", help="400 x 2000, 2 rounds (smoke run)")
    ap.add_argument("--memmap-written", action="store_true",
                    help="write the files through a memory map (4 KB page cache pages: mapping "
                         "them costs more) instead of with write() as np.save does")
    ap.add_argument("--child-rss", nargs=2, metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_rss:
        child_rss(args.child_rss)
        return 0
    if args.quick:
        args.rows, args.vocab, args.repeats = 400, 2000, 2

    from kldiv.compare import kernel

    own_dir = args.dir is None
    directory = tempfile.mkdtemp(prefix="kldiv-bench-") if own_dir else args.dir
    os.makedirs(directory, exist_ok=True)
    try:
        n, v = args.rows, args.vocab
        small_n = max(1, n // 4)
        paths = write_pair(directory, n, v, via_memmap=args.memmap_written)
        small = write_pair(directory, small_n, v, seed=1, via_memmap=args.memmap_written)
        gb = 2 * n * v * 4 / 1e9
        print(f"kldiv compare benchmark: {n} x {v} float32, two files, {gb:.2f} GB of logits; "
              f"{os.cpu_count()} CPUs; compiled kernel: {'yes' if kernel.extension() else 'NO (NumPy fallback)'}")
        read_files(paths, v)  # into the page cache
        methods = {
            "read (readinto)": lambda: read_files(paths, v),
            "naive numpy": lambda: naive_numpy(paths),
            "kldiv compare": lambda: kldiv_compare(paths),
            "kldiv compare, 1 thread": lambda: kldiv_compare(paths, threads=1),
            "kldiv + reverse + JS": lambda: kldiv_compare(paths, reverse=True, js=True),
        }
        times = {k: [] for k in methods}
        cpu = {k: [] for k in methods}
        check_naive = naive_numpy(paths)
        check_kldiv = kldiv_compare(paths)
        for _ in range(args.repeats):
            for name, fn in methods.items():
                c = time.process_time()
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        med = {k: statistics.median(t) for k, t in times.items()}
        mcpu = {k: statistics.median(t) for k, t in cpu.items()}
        base = med["kldiv compare"]
        print(f"\nwall time (median of {args.repeats}) and CPU time (all threads of this process):")
        print(f"{'method':<26} {'wall s':>8} {'GB/s':>7} {'wall / kldiv':>13} {'CPU s':>8} {'GB/CPU-s':>9}")
        for name in methods:
            print(f"{name:<26} {med[name]:8.3f} {gb / med[name]:7.2f} {med[name] / base:13.2f} "
                  f"{mcpu[name]:8.3f} {gb / max(mcpu[name], 1e-9):9.2f}")
        print(f"\nkldiv vs naive numpy: {med['naive numpy'] / base:.1f}x faster in wall time, "
              f"{mcpu['naive numpy'] / mcpu['kldiv compare']:.1f}x less CPU (target >= 10x)")
        print(f"kldiv / read, wall:  {base / med['read (readinto)']:.2f} (target <= 1.5; kldiv uses "
              f"all cores, the read one)")
        print(f"kldiv / read, CPU:   {mcpu['kldiv compare'] / mcpu['read (readinto)']:.2f} "
              f"(total work; on a loaded machine the wall ratio is noisy)")
        rel = np.abs(check_naive.astype(np.float64) - check_kldiv) / np.maximum(check_kldiv, 1e-30)
        print(f"naive float32 vs kldiv per-token KL: median relative difference {np.median(rel):.1e}, "
              f"max {rel.max():.1e} (mean KL {check_kldiv.mean():.2e}; the naive float32 code "
              f"loses accuracy through cancellation)")

        print("\npeak resident memory of kldiv.compare in a fresh process:")
        print(f"{'rows':>8} {'GB of logits':>13} {'baseline MB':>12} {'peak MB':>9} {'extra MB':>9}")
        for p, rows in ((small, small_n), (paths, n)):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-rss", *p],
                                 capture_output=True, text=True, check=True).stdout.split()
            before, after = float(out[0]), float(out[1])
            print(f"{rows:>8} {2 * rows * v * 4 / 1e9:13.2f} {before:12.1f} {after:9.1f} {after - before:9.1f}")
    finally:
        if own_dir and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
