"""kldiv.eval.metrics: the streaming drift metric against float64 NumPy/SciPy and exact rationals."""
from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from kldiv.compare import compare
from kldiv.eval import DriftMetric, batch_kl
from kldiv.eval._exact import ExactSum, Moments, QuantileStore, two_product


def logits(n=60, v=40, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((n, v)) * 2).astype(np.float32)
    b = (a + rng.standard_normal((n, v)) * scale).astype(np.float32)
    t = rng.integers(0, v, n)
    return a, b, t


def oracle(a, b, t):
    """Per-row quantities in float64 with SciPy (independent of kldiv)."""
    lp = scipy.special.log_softmax(a.astype(np.float64), axis=1)
    lq = scipy.special.log_softmax(b.astype(np.float64), axis=1)
    p, q = np.exp(lp), np.exp(lq)
    m = 0.5 * (p + q)
    rows = np.arange(len(t))
    return {
        "kl": scipy.special.rel_entr(p, q).sum(1),
        "reverse_kl": scipy.special.rel_entr(q, p).sum(1),
        "js": 0.5 * (scipy.special.rel_entr(p, m).sum(1) + scipy.special.rel_entr(q, m).sum(1)),
        "same": a.argmax(1) == b.argmax(1),
        "dp": q[rows, t] - p[rows, t],
        "nll_ref": -lp[rows, t], "nll_oth": -lq[rows, t],
        "rc": a.argmax(1) == t, "oc": b.argmax(1) == t,
        "top5": np.array([len(set(np.argsort(-x)[:5]) & set(np.argsort(-y)[:5])) / 5 for x, y in zip(a, b)]),
    }


def se(x):
    x = np.asarray(x, np.float64)
    return math.sqrt(np.var(x) / (x.size - 1))


def test_metric_against_scipy():
    a, b, t = logits()
    m = DriftMetric()
    m.update(a, b, tokens=t)
    s = m.compute()
    o = oracle(a, b, t)
    for key in ("kl", "reverse_kl", "js"):
        assert s[key]["mean"] == pytest.approx(o[key].mean(), rel=1e-5)
        assert s[key]["mean_err"] == pytest.approx(se(o[key]), rel=1e-4)
        assert s[key]["max"] == pytest.approx(o[key].max(), rel=1e-5)
        assert s[key]["quantiles"]["90.0%"] == pytest.approx(np.quantile(o[key], 0.9), rel=1e-5)
    assert s["same_top"]["share"] == o["same"].mean()
    assert s["flips"]["top1_changed"]["share"] == pytest.approx(1 - o["same"].mean(), rel=1e-15)
    assert s["flips"]["correct_to_wrong"]["count"] == int((o["rc"] & ~o["oc"]).sum())
    assert s["flips"]["wrong_to_correct"]["count"] == int((~o["rc"] & o["oc"]).sum())
    assert s["delta_p"]["mean"] == pytest.approx(o["dp"].mean(), rel=1e-5, abs=1e-9)
    assert s["delta_p"]["rms"] == pytest.approx(math.sqrt(np.mean(o["dp"] ** 2)), rel=1e-5)
    assert s["topk_overlap"]["5"]["mean"] == pytest.approx(o["top5"].mean(), rel=1e-12)
    p = s["perplexity"]
    assert p["ppl_ref"] == pytest.approx(math.exp(o["nll_ref"].mean()), rel=1e-6)
    assert p["ppl_other"] == pytest.approx(math.exp(o["nll_oth"].mean()), rel=1e-6)
    d = o["nll_oth"] - o["nll_ref"]
    assert p["ln_ppl_ratio_err"] == pytest.approx(se(d), rel=1e-4)  # var(a - b) = ea^2 + eb^2 - 2 cov


def test_metric_matches_compare_report():
    """Same per-token values as kldiv.compare: the statistics agree to float64 rounding."""
    a, b, t = logits(n=80, seed=1)
    m = DriftMetric()
    m.update(a, b, tokens=t)
    s = m.compute()
    r = compare(a, b, tokens=t, reverse=True, js=True).summary()
    for key in ("kl", "reverse_kl", "js", "delta_p"):
        for f in ("mean", "mean_err", "max", "min", "median"):
            assert s[key][f] == pytest.approx(r[key][f], rel=1e-12, abs=1e-300), (key, f)
        assert s[key]["quantiles"] == pytest.approx(r[key]["quantiles"], rel=1e-12)
    assert s["delta_p"]["rms"] == pytest.approx(r["delta_p"]["rms"], rel=1e-12)
    assert s["delta_p"]["rms_err"] == pytest.approx(r["delta_p"]["rms_err"], rel=1e-9)
    for f, v in r["perplexity"].items():
        assert s["perplexity"][f] == pytest.approx(v, rel=1e-9), f
    assert s["same_top"]["share"] == r["same_top"]["share"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=5), st.integers(0, 2**31))
def test_merge_equals_one_pass(cuts, seed):
    a, b, t = logits(n=40, v=12, seed=seed % 1000, scale=1.0)
    edges = sorted(set([0, 40, *cuts]))
    one = DriftMetric(max_exact=25)  # crosses into the sketch regime
    one.update(a, b, tokens=t)
    parts = []
    for s, e in zip(edges[:-1], edges[1:]):
        m = DriftMetric(max_exact=25)
        m.update(a[s:e], b[s:e], tokens=t[s:e])
        parts.append(m)
    total = parts[0]
    for m in parts[1:]:
        total.merge(m)
    assert total.state_dict() == one.state_dict()
    assert json.dumps(total.compute(), default=str) == json.dumps(one.compute(), default=str)


def test_state_dict_roundtrip_json():
    a, b, t = logits(n=30)
    m = DriftMetric()
    m.update(a, b, tokens=t)
    st_ = json.loads(json.dumps(m.state_dict()))
    m2 = DriftMetric.from_state_dict(st_)
    assert m2.state_dict() == m.state_dict()
    assert m2.compute()["kl"] == m.compute()["kl"]


def test_exact_sum_against_fractions():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-200, 200, 500),
                        [5e-324, -2.5e-310, 0.0, 1e308, 1e308, -1e308]])
    s = ExactSum()
    for piece in np.array_split(x, 7):
        s.add(piece)
    exact = sum((Fraction(v) for v in x), Fraction(0))
    assert s.fraction() == exact
    assert s.value() == float(exact)
    s.add([np.inf])
    assert s.value() == math.inf
    s.add([-np.inf])
    assert math.isnan(s.value())


def test_two_product_is_exact():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(300) * 10.0 ** rng.integers(-100, 100, 300)
    y = rng.standard_normal(300) * 10.0 ** rng.integers(-100, 100, 300)
    p, e = two_product(x, y)
    for pi, ei, xi, yi in zip(p, e, x, y):
        assert Fraction(pi) + Fraction(ei) == Fraction(xi) * Fraction(yi)


def test_moments_variance_exact_under_cancellation():
    x = 1e8 + np.random.default_rng(5).random(1000)
    m = Moments()
    m.add(x)
    fx = [Fraction(v) for v in x]
    mu = sum(fx) / len(fx)
    assert m.variance() == float(sum((v - mu) ** 2 for v in fx) / len(fx))
    assert m.mean() == float(mu)


def test_sketch_quantile_error_bound():
    rng = np.random.default_rng(6)
    z = np.concatenate([rng.standard_normal(3000) * np.exp(2 * rng.standard_normal(3000)), np.zeros(50)])
    fr = (0.999, 0.99, 0.9, 0.75, 0.5, 0.25, 0.1, 0.01, 0.001)
    q = QuantileStore(max_exact=100, alpha=1e-3)
    q.add(z)
    assert not q.exact
    got = q.quantiles(fr, z.min(), z.max())
    s = np.sort(z)
    for f in fr:
        pos = f * (z.size - 1)
        i0 = int(pos)
        w = pos - i0
        exact = (1 - w) * s[i0] + w * s[min(i0 + 1, z.size - 1)]
        bound = 1e-3 * ((1 - w) * abs(s[i0]) + w * abs(s[min(i0 + 1, z.size - 1)])) * (1 + 1e-9)
        assert abs(got[f"{100 * f:.1f}%"] - exact) <= bound + 1e-300


def test_infinite_kl_reported():
    a = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    b = np.array([[0.0, -np.inf], [np.log(0.9), np.log(0.1)]])
    m = DriftMetric(topk=(1,))
    m.update(a, b)
    s = m.compute()
    assert s["kl"]["mean"] == math.inf and s["kl"]["max"] == math.inf
    assert s["kl"]["min"] == pytest.approx(0.0, abs=1e-12)


def test_mask_and_shapes():
    a, b, t = logits(n=24)
    mask = np.arange(24) % 3 != 0
    m = DriftMetric()
    m.update(a.reshape(4, 6, -1), b.reshape(4, 6, -1), tokens=t.reshape(4, 6), mask=mask.reshape(4, 6))
    ref = DriftMetric()
    ref.update(a[mask], b[mask], tokens=t[mask])
    assert m.state_dict() == ref.state_dict()


@pytest.mark.parametrize("bad, msg", [
    (lambda a, b, t: (np.where(np.arange(a.shape[1]) == 3, np.nan, a), b, t), "reference_logits: row 0 has NaN"),
    (lambda a, b, t: (a, np.full_like(b, -np.inf), t), "other_logits: row 0 has no finite"),
    (lambda a, b, t: (a, b, t + 1000), "tokens: id"),
    (lambda a, b, t: (a, b[:, :-1], t), "same shape"),
    (lambda a, b, t: (a, b, t.astype(float)), "integer token ids"),
])
def test_errors_name_the_argument(bad, msg):
    a, b, t = logits(n=5)
    a, b, t = bad(a, b, t)
    with pytest.raises((ValueError, TypeError), match=msg):
        DriftMetric().update(a, b, tokens=t)


def test_torch_and_jax_inputs():
    torch = pytest.importorskip("torch")
    a, b, t = logits(n=20)
    ref = DriftMetric()
    ref.update(a, b, tokens=t)
    m = DriftMetric()
    m.update(torch.from_numpy(a), torch.from_numpy(b), tokens=torch.from_numpy(t))
    assert m.state_dict() == ref.state_dict()
    jnp = pytest.importorskip("jax.numpy")
    m = DriftMetric()
    m.update(jnp.asarray(a), jnp.asarray(b), tokens=jnp.asarray(t))
    assert m.state_dict() == ref.state_dict()
    # bfloat16 torch logits are widened to float32
    m = DriftMetric()
    m.update(torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16())
    assert m.n == 20


def test_batch_kl():
    torch = pytest.importorskip("torch")
    a, b, _ = logits(n=10, v=7)
    o = oracle(a, b, np.zeros(10, int))
    mask = np.arange(10) < 6
    assert float(batch_kl(a, b)) == pytest.approx(o["kl"].mean(), rel=1e-5)
    assert float(batch_kl(a, b, mask=mask)) == pytest.approx(o["kl"][:6].mean(), rel=1e-5)
    f, r = batch_kl(a, b, direction="both")
    assert float(r) == pytest.approx(o["reverse_kl"].mean(), rel=1e-5)
    ta = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(b, dtype=torch.float64)
    val = batch_kl(ta, tb, mask=torch.from_numpy(mask))
    val.backward()
    # autograd of the naive float64 formula
    ta2 = ta.detach().clone().requires_grad_(True)
    lp, lq = torch.log_softmax(ta2, 1), torch.log_softmax(tb, 1)
    naive = ((lp.exp() * (lp - lq)).sum(1)[torch.from_numpy(mask)]).mean()
    naive.backward()
    assert torch.allclose(ta.grad, ta2.grad, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="direction"):
        batch_kl(a, b, direction="sideways")



def test_sync_over_gloo_equals_one_pass(tmp_path):
    """Two processes, each with half the tokens: after sync() both hold one pass over all data."""
    pytest.importorskip("torch")
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    from _eval_sync_worker import data, worker  # a small module: the children import only it

    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b, t = data()
    one = DriftMetric(max_exact=30)
    one.update(a, b, tokens=t)
    expect = json.loads(json.dumps(one.state_dict()))
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == expect


@pytest.mark.parametrize("v", [1, 3, 12, 700, 2048, 5003])
def test_top_indices_against_argsort(v):
    from kldiv.eval.metrics import top_indices

    rng = np.random.default_rng(v)
    x = rng.standard_normal((9, v)).astype(np.float32)
    x[:, rng.integers(0, v, 3)] = -np.inf
    x[0] = 0.0  # all tied: any k entries are a valid top-k
    for k in (1, 5, 10):
        got = top_indices(x, k)
        ke = min(k, v)
        assert got.shape == (9, ke)
        ref = np.argsort(-x[1:], axis=1, kind="stable")[:, :ke]
        assert np.array_equal(got[1:], ref)
        assert len(set(got[0].tolist())) == ke
        # non-contiguous inputs (a column slice, Fortran order) give the same indices
        assert np.array_equal(top_indices(np.asfortranarray(x), k)[1:], ref)
        wide = np.repeat(x, 2, axis=1)[:, ::2]
        assert np.array_equal(top_indices(wide, k)[1:], ref)


@pytest.mark.parametrize("v", [1000, 4099, 32000])
def test_top_indices_with_ties_are_a_valid_top_k(v):
    """Rows with many ties (few distinct values): the values taken equal the k largest values."""
    from kldiv.eval.metrics import top_indices

    rng = np.random.default_rng(v)
    x = rng.integers(-4, 3, (16, v)).astype(np.float32)
    x[3] = -np.inf
    x[3, [7, v - 1]] = 1.0
    for k in (1, 5, 10):
        got = top_indices(x, k)
        assert all(len(set(r.tolist())) == k for r in got)
        taken = np.take_along_axis(x, got, axis=1)
        assert np.array_equal(taken, -np.sort(-x, axis=1)[:, :k])
        assert (taken[:, 1:] <= taken[:, :-1]).all()  # largest first


def test_device_path_equals_kernel_path():
    """The torch path (used for accelerator tensors; forced here on the CPU) gives the same
    per-row values as the compiled kernel, and the same errors."""
    torch = pytest.importorskip("torch")
    from kldiv.eval.metrics import row_values

    a, b, t = logits(n=24, v=48, seed=9, scale=0.5)
    b[3, 5] = -np.inf  # q = 0 where p > 0: KL = inf on both paths
    k = row_values(a, b, t)
    d = row_values(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(t), _device_path=True)
    assert d.keys() == k.keys()
    for key in ("kl", "reverse_kl", "js", "lp_ref", "lp_other"):
        fin = np.isfinite(k[key])
        assert np.array_equal(fin, np.isfinite(d[key])) and np.array_equal(k[key][~fin], d[key][~fin])
        assert d[key][fin] == pytest.approx(k[key][fin], rel=2e-5, abs=1e-9), key
    for key in ("top_ref", "top_other", "token", "top5_overlap", "top10_overlap"):
        assert np.array_equal(k[key], d[key]), key
    mask = np.arange(24) % 2 == 0
    dm = row_values(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(t),
                    mask=torch.from_numpy(mask), _device_path=True)
    assert np.array_equal(dm["top_ref"], k["top_ref"][mask])
    a[7, 2] = np.nan
    with pytest.raises(ValueError, match="reference_logits: row 7 has NaN"):
        row_values(torch.from_numpy(a), torch.from_numpy(b), _device_path=True)
    with pytest.raises(ValueError, match="tokens: id"):
        row_values(torch.from_numpy(b), torch.from_numpy(b), torch.from_numpy(t + 100), _device_path=True)


def test_torchmetrics_adapter():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchmetrics")
    from kldiv.eval import TorchDriftMetric

    a, b, t = logits(n=30, seed=2)
    ta, tb, tt = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(t)
    one = DriftMetric()
    one.update(a, b, tokens=t)
    m = TorchDriftMetric()
    batch = m(ta[:10], tb[:10], tokens=tt[:10])           # forward: this batch's statistics
    first = DriftMetric()
    first.update(a[:10], b[:10], tokens=t[:10])
    assert batch == first.compute()
    m.update(ta[10:], tb[10:], tokens=tt[10:])
    assert m.drift.state_dict() == one.state_dict()      # forward accumulated the first batch
    assert m.compute() == one.compute()
    other = TorchDriftMetric()
    other.update(ta[:5], tb[:5], tokens=tt[:5])
    m.merge_state(other)
    assert m.drift.n == 35
    c = m.clone()
    m.reset()
    assert m.drift.n == 0 and c.drift.n == 35


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=0, max_size=40),
       st.integers(0, 40))
def test_exact_sum_and_moments_any_floats(xs, cut):
    """Exact sums of any finite doubles (subnormal to 1.8e308), split anywhere, against Fraction."""
    x = np.array(xs, dtype=np.float64)
    a, b = ExactSum(), ExactSum()
    a.add(x[:cut])
    b.add(x[cut:])
    a.merge(b)
    exact = sum((Fraction(v) for v in xs), Fraction(0))
    assert a.fraction() == exact
    try:
        expected = float(exact)  # correctly rounded
    except OverflowError:
        expected = math.inf if exact > 0 else -math.inf
    assert a.value() == expected
    m = Moments()
    small = x[np.abs(x) < 1e150]  # squares representable: the variance is exact
    m.add(small)
    if small.size:
        fx = [Fraction(v) for v in small]
        mu = sum(fx) / len(fx)
        var = sum((v - mu) ** 2 for v in fx) / len(fx)
        if all(abs(v) > 1e-140 or v == 0 for v in small):  # squares not subnormal: exact
            assert m.variance() == float(var)


def test_import_pulls_no_heavy_dependency():
    """kldiv.eval and its CLI module import torch, transformers, torchmetrics only when used."""
    import subprocess
    import sys

    code = ("import sys, kldiv.eval, kldiv.cli.eval_cmd; "
            "print(sorted(m for m in ('torch', 'transformers', 'torchmetrics', 'matplotlib', 'jax') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
