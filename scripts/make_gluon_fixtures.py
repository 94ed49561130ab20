"""Record MXNet Gluon's KLDivLoss (values and gradients) as test fixtures for ``kldiv.gluon``.

This script runs under a real MXNet, never under kldiv's own environment. MXNet 1.x needs
``numpy<1.24``, so it lives in a separate virtual environment outside the repository::

    python3 -m venv /work/mxvenv
    /work/mxvenv/bin/pip install "mxnet==1.9.1" "numpy<1.24"
    /work/mxvenv/bin/python scripts/make_gluon_fixtures.py      # -> tests/fixtures/gluon/mxnet_1_9_1.npz

    python3 -m venv /work/mxvenv18
    /work/mxvenv18/bin/pip install "mxnet==1.8.0.post0" "numpy<1.24"
    /work/mxvenv18/bin/python scripts/make_gluon_fixtures.py    # -> tests/fixtures/gluon/mxnet_1_8_0.npz

Each case stores the inputs exactly as MXNet saw them (``pred``, ``label``, optional
``sample_weight``), a seeded random head gradient ``head``, MXNet's output ``out`` and the
gradients of ``sum(head * out)`` with respect to ``pred`` and ``label`` from ``mx.autograd``.
Non-finite results (the tutorial's dist_4 cases) are stored as MXNet returns them. The metadata
(``__meta__``, a JSON string) records the MXNet, NumPy and Python versions, the source of
MXNet's ``KLDivLoss.hybrid_forward``, the aggregation it uses ("sum" or "mean", read from that
source) and the parameters of every case. The file is written atomically.
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import platform
import sys
import tempfile

import numpy as np

SEED = 20261125
DTYPES = ("float32", "float64")  # float16: the tutorial cases only

# The MXNet Gluon tutorial's distributions (a behaviour spec: KLDivLoss(pred=log(dist_a), label=dist_b)).
DIST = {
    "dist_1": [0.2, 0.5, 0.2, 0.1],
    "dist_2": [0.3, 0.4, 0.1, 0.2],
    "dist_3": [0.1, 0.1, 0.1, 0.7],
    "dist_4": [0.0, 0.9, 0.0, 0.1],
}
TUTORIAL_LOGITS = [0.39056206, 1.3068528, 0.39056206, -0.30258512]


def _log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _softmax(x, axis):
    return np.exp(_log_softmax(x, axis))


def random_cases(rng):
    """Seeded random cases: (name, params, pred, label, sample_weight) in float64."""
    cases = []

    def add(name, shape, *, from_logits, axis=-1, batch_axis=0, weight=None, sw_shape=None,
            zero_frac=0.0, scale=1.0):
        logits = rng.normal(scale=scale, size=shape)
        label = _softmax(rng.normal(scale=1.5, size=shape), axis)
        if zero_frac:
            label = np.where(rng.random(shape) < zero_frac, 0.0, label)
            label = label / label.sum(axis=axis, keepdims=True)
        pred = logits if not from_logits else _log_softmax(logits, axis)
        sw = None if sw_shape is None else rng.uniform(0.25, 2.0, size=sw_shape)
        params = dict(from_logits=from_logits, axis=axis, batch_axis=batch_axis, weight=weight)
        cases.append((name, params, pred, label, sw))

    s3 = (3, 2, 5)
    add("logprobs_3d_axis-1_batch0", s3, from_logits=True)
    add("logits_3d_axis-1_batch0", s3, from_logits=False)
    add("logprobs_3d_axis1_batch0", s3, from_logits=True, axis=1)
    add("logits_3d_axis1_batch0", s3, from_logits=False, axis=1)
    add("logprobs_3d_axis-1_batch1", s3, from_logits=True, batch_axis=1)
    add("logits_3d_axis-1_batch1", s3, from_logits=False, batch_axis=1)
    add("logits_3d_axis1_batch1", s3, from_logits=False, axis=1, batch_axis=1)
    add("logits_3d_axis1_batch-1", s3, from_logits=False, axis=1, batch_axis=-1)
    add("logits_3d_sw_per_sample", s3, from_logits=False, sw_shape=(3, 1, 1))
    add("logits_3d_sw_per_position", s3, from_logits=False, sw_shape=(1, 2, 1))
    add("logits_3d_sw_full", s3, from_logits=False, sw_shape=s3)
    add("logits_3d_sw_batch1", s3, from_logits=False, batch_axis=1, sw_shape=(1, 2, 1))
    add("logprobs_3d_weight", s3, from_logits=True, weight=0.37)
    add("logits_3d_weight_and_sw", s3, from_logits=False, weight=2.5, sw_shape=(3, 1, 1))
    add("logits_3d_zero_labels", s3, from_logits=False, zero_frac=0.4)
    add("logits_3d_large", s3, from_logits=False, scale=40.0)
    add("logits_2d", (6, 7), from_logits=False)
    add("logprobs_2d_batch1", (6, 7), from_logits=True, axis=0, batch_axis=1)
    add("logits_4d_axis2", (2, 3, 4, 2), from_logits=False, axis=2)
    add("logprobs_1d", (5,), from_logits=True)
    return cases


def tutorial_cases(mx, dtype):
    """The tutorial's comparisons; pred is log(dist_a) computed by MXNet in ``dtype``."""
    out = []
    pairs = [("dist_1", "dist_2"), ("dist_1", "dist_3"), ("dist_1", "dist_1"),
             ("dist_4", "dist_1"), ("dist_4", "dist_4"), ("dist_1", "dist_4")]
    for a, b in pairs:
        pred = mx.nd.array([DIST[a]], dtype=dtype).log().asnumpy()
        label = np.array([DIST[b]], dtype=dtype)
        out.append((f"tutorial_{a}_vs_{b}", dict(from_logits=True, axis=-1, batch_axis=0, weight=None),
                    pred, label, None))
    out.append(("tutorial_logits_vs_dist_2", dict(from_logits=False, axis=-1, batch_axis=0, weight=None),
                np.array([TUTORIAL_LOGITS], dtype=dtype), np.array([DIST["dist_2"]], dtype=dtype), None))
    return out


def run_case(mx, params, pred, label, sw, head):
    loss_fn = mx.gluon.loss.KLDivLoss(**params)
    p = mx.nd.array(pred, dtype=pred.dtype)
    lab = mx.nd.array(label, dtype=label.dtype)
    p.attach_grad()
    lab.attach_grad()
    args = [p, lab] + ([] if sw is None else [mx.nd.array(sw, dtype=sw.dtype)])
    with mx.autograd.record():
        out = loss_fn(*args)
    out.backward(mx.nd.array(head, dtype=head.dtype))
    return out.asnumpy(), p.grad.asnumpy(), lab.grad.asnumpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gluon"))
    args = ap.parse_args(argv)

    import mxnet as mx

    src = inspect.getsource(mx.gluon.loss.KLDivLoss.hybrid_forward)
    if "F.sum(loss" in src:
        aggregate = "sum"
    elif "F.mean(loss" in src:
        aggregate = "mean"
    else:
        raise SystemExit("unrecognised KLDivLoss.hybrid_forward:\n" + src)

    arrays = {}
    meta_cases = {}
    rng = np.random.default_rng(SEED)
    base = random_cases(rng)
    all_cases = []
    for dtype in DTYPES:
        all_cases += [(n, prm, p.astype(dtype), lab.astype(dtype),
                       None if sw is None else sw.astype(dtype)) for n, prm, p, lab, sw in base]
        all_cases += tutorial_cases(mx, dtype)
    # float16 only for the tutorial's pairs: 1e-12 rounds to 0 there, so zero labels give nan.
    all_cases += tutorial_cases(mx, "float16")
    for name, params, pred, label, sw in all_cases:
        dtype = str(pred.dtype)
        key = f"{name}__{dtype}"
        out_shape = (pred.shape[params["batch_axis"] % pred.ndim],)
        head = rng.uniform(0.5, 1.5, size=out_shape).astype(dtype)
        out, gpred, glabel = run_case(mx, params, pred, label, sw, head)
        arrays.update({f"{key}__pred": pred, f"{key}__label": label, f"{key}__head": head,
                       f"{key}__out": out, f"{key}__grad_pred": gpred, f"{key}__grad_label": glabel})
        if sw is not None:
            arrays[f"{key}__sample_weight"] = sw
        meta_cases[key] = dict(params, dtype=dtype, sample_weight=sw is not None)

    meta = {
        "mxnet_version": mx.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "aggregate": aggregate,
        "hybrid_forward_source": src,
        "generator": "scripts/make_gluon_fixtures.py",
        "command": " ".join([sys.executable] + sys.argv),
        "seed": SEED,
        "cases": meta_cases,
    }
    arrays["__meta__"] = np.array(json.dumps(meta, indent=1, sort_keys=True))

    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "mxnet_" + mx.__version__.replace(".", "_").split("_post")[0] + ".npz")
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {path}: {len(meta_cases)} cases, {os.path.getsize(path)} bytes, "
          f"MXNet {mx.__version__} aggregates by {aggregate}")


if __name__ == "__main__":
    main()
