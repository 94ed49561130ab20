"""JS of close rows in ``kldiv compare``, ``row_values`` and ``DriftMetric`` (audit 2, finding F-C).

The compare kernel's float64 JS (float64 inputs, float32 rows with a -inf logit, rows with huge
logits) was the textbook formula with a clip at 0: 3x off at JS 1e-17, exactly 0 on some rows at
1e-19. Reference: 50-digit mpmath on the exact float inputs (float32 values taken exactly).
"""
import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kldiv
from kldiv.compare import kernel as K
from kldiv.eval.metrics import row_values
from kldiv.metrics import DriftMetric


def mp_js(a, b):
    """Per-row JS (beta 1/2, nats) of logits rows, mpmath on the exact inputs: 50 digits beyond
    the logits' magnitude (1e30 + 1.6 needs 31 digits before the first one of the result)."""
    out = []
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for x, y in zip(a.tolist(), b.tolist()):
        big = max([1.0] + [abs(t) for t in x + y if abs(t) != np.inf])
        with mpmath.workdps(50 + int(np.log10(big))):
            def logp(row):
                fin = [mpmath.mpf(v) for v in row if v != -np.inf]
                m = max(fin)
                z = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in fin))
                return [None if v == -np.inf else mpmath.mpf(v) - z for v in row]

            lp, lq = logp(x), logp(y)
            s = mpmath.mpf(0)
            for u, w in zip(lp, lq):
                pu = mpmath.exp(u) if u is not None else mpmath.mpf(0)
                qw = mpmath.exp(w) if w is not None else mpmath.mpf(0)
                lm = mpmath.log((pu + qw) / 2)
                if u is not None:
                    s += pu * (u - lm)
                if w is not None:
                    s += qw * (w - lm)
            out.append(float(s / 2))
    return np.array(out)


def close_rows(rng, n, v, eps, dtype=np.float64):
    a = rng.standard_normal((n, v)).astype(dtype)
    b = (a + eps * rng.standard_normal((n, v))).astype(dtype)
    return a, b


def assert_rel(got, ref, rtol, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert (got >= 0).all(), what
    err = np.abs(got - ref) / np.where(ref > 0, ref, 1.0)
    assert err.max() <= rtol, (what, float(err.max()), int(np.argmax(err)))


@pytest.mark.parametrize("eps", [1e-2, 1e-5, 1e-8, 1e-10, 1e-12])
def test_float64_close_rows_full_accuracy(eps):
    """JS from 1e-5 down to 1e-25, float64: js_rows, row_stats, row_values, the core."""
    rng = np.random.default_rng(int(-np.log10(eps)))
    a, b = close_rows(rng, 4, 40, eps)
    ref = mp_js(a, b)
    assert ref.min() > 0
    assert_rel(K.js_rows(a, b), ref, 1e-14, "js_rows")
    assert_rel(K.row_stats(a, b, js=True).js, ref, 1e-14, "row_stats")
    assert_rel(row_values(a, b)["js"], ref, 1e-14, "row_values")


def test_no_clipped_rows():
    """300 float64 rows at JS ~ 1e-19 (15 of them used to come back exactly 0)."""
    rng = np.random.default_rng(0)
    a, b = close_rows(rng, 300, 50, 1e-9)
    got = K.row_stats(a, b, js=True).js
    assert (got > 0).all()
    # the statistic of all rows against mpmath on a sample (the reference is slow)
    idx = np.arange(0, 300, 20)
    assert_rel(got[idx], mp_js(a[idx], b[idx]), 1e-14, "row_stats 300 rows")


def adversarial_rows():
    """Masks (-1e30, -inf on one or both sides), offsets (1e5, 1e30), scales, V = 1, far rows."""
    rng = np.random.default_rng(5)
    V = 16
    rows = []
    for eps in (1e-6, 1e-12):
        a = rng.standard_normal(V)
        b = a + eps * rng.standard_normal(V)
        rows += [(a, b), (a, b + 1e5), (a, b + 1e30), (a * 1e3, b * 1e3)]
        a2, b2 = a.copy(), b.copy()
        a2[3] = b2[3] = -1e30
        rows.append((a2.copy(), b2.copy()))
        a2[5] = b2[5] = -np.inf
        rows.append((a2.copy(), b2.copy()))
        a3 = a2.copy()
        a3[7] = -np.inf
        rows.append((a3, b2.copy()))
        b3 = b2.copy()
        b3[9] = -np.inf
        rows.append((a3.copy(), b3))
        a4 = a.copy()
        a4[0] = -1e30
        rows.append((a4, b))
    pad = lambda x: np.concatenate([x, np.full(V - len(x), -np.inf)])  # noqa: E731
    for x, y in [([0.0, -np.inf], [-np.inf, 0.0]), ([3.0], [-5.0]), ([0.0, 1, 2], [40.0, -30, 1]),
                 ([0.0, 1, 2], [1e300, -1e300, 1]), ([1.7e308, -1.7e308], [-1.7e308, 1.7e308]),
                 ([0.0, -np.inf, 3], [0.0, -np.inf, 3]), ([0.0, -800.0], [-np.inf, 0.0]),
                 ([-800.0, 0.0], [0.0, -np.inf]), ([0.0, 1, 3], [1e20, 1e20 + 1, 1e20 + 3])]:
        rows.append((pad(np.array(x)), pad(np.array(y))))
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def test_adversarial_float64_rows():
    a, b = adversarial_rows()
    ref = mp_js(a, b)
    got = K.js_rows(a, b)
    same = (a == b) | (np.isinf(a) & np.isinf(b))
    ref = np.where(same.all(1), 0.0, ref)  # identical rows: exactly 0 (mpmath: 1e-62 noise)
    assert_rel(got, ref, 1e-14, "js_rows adversarial")
    assert (got[same.all(1)] == 0).all()
    assert_rel(K.row_stats(a, b, js=True).js, ref, 1e-14, "row_stats (huge rows redone)")


@pytest.mark.parametrize("fallback", [False, True])
def test_float32_rows_with_minus_inf_and_huge_logits(fallback):
    """Float32 rows with a -inf logit or a -1e30 mask (the C kernel leaves both to js_rows)."""
    rng = np.random.default_rng(11)
    a, b = close_rows(rng, 6, 64, 1e-6, np.float32)
    a[:3, 5] = b[:3, 5] = -np.inf  # JS ~ 1e-13: 2.4e-4 off before
    a[3:, 7] = b[3:, 7] = np.float32(-1e30)
    c, d = close_rows(rng, 2, 64, 1e-3, np.float32)  # masked, JS ~ 1e-8: the double kernel's
    c[:, 9] = d[:, 9] = np.float32(-1e30)
    a, b = np.concatenate([a, c]), np.concatenate([b, d])
    ref = mp_js(a, b)
    r = K.row_stats(a, b, js=True, force_fallback=fallback)
    assert_rel(r.js, ref, 1e-13, "float32 row_stats")
    assert_rel(row_values(a, b)["js"], ref, 1e-13, "float32 row_values")


def test_drift_metric_and_compare_api():
    """DriftMetric's JS statistics and kldiv.compare(..., js=True) on the same float64 rows."""
    rng = np.random.default_rng(2)
    a, b = close_rows(rng, 12, 30, 1e-10)
    a[:4, 2] = b[:4, 2] = -np.inf
    ref = mp_js(a, b)
    m = DriftMetric()
    m.update(a[:5], b[:5])
    m.update(a[5:], b[5:])
    s = m.compute()["js"]
    assert abs(s["mean"] - ref.mean()) <= 1e-14 * ref.mean()
    assert s["min"] == pytest.approx(ref.min(), rel=1e-14)
    assert s["max"] == pytest.approx(ref.max(), rel=1e-14)
    rep = kldiv.compare(a, b, js=True, reverse=True)
    assert_rel(rep.js, ref, 1e-14, "compare api")
    # float32 files holding the same rows (the C kernel, -inf rows redone)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    assert_rel(kldiv.compare(a32, b32, js=True).js, mp_js(a32, b32), 1e-13, "compare float32")


def test_torch_cpu_rows_go_through_the_kernel():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    a, b = close_rows(rng, 3, 20, 1e-11)
    ref = mp_js(a, b)
    assert_rel(row_values(torch.from_numpy(a), torch.from_numpy(b))["js"], ref, 1e-14, "torch cpu")


@settings(max_examples=25, deadline=None)
@given(v=st.integers(1, 8), seed=st.integers(0, 2**32 - 1),
       log_eps=st.floats(-13, 0),
       offset=st.sampled_from([0.0, 3.0, -1e4, 1e15, -1e30, 7e300]),
       mask=st.sampled_from([None, -np.inf, -1e30]), f32=st.booleans())
def test_property_against_mpmath(v, seed, log_eps, offset, mask, f32):
    """Random close rows (JS from ~1e-27 up), one side offset, masked entries on both sides or
    on one: js_rows matches mpmath on the exact inputs and is symmetric (beta = 1/2)."""
    rng = np.random.default_rng(seed)
    dt = np.float32 if f32 else np.float64
    a = (rng.standard_normal(v) * 3).astype(dt)
    b = (a + 10.0**log_eps * rng.standard_normal(v) + offset).astype(np.float64)
    if f32 and abs(offset) > 1e38:
        offset = 3e38 * np.sign(offset)  # the float32 range
        b = a + 10.0**log_eps * rng.standard_normal(v) + offset
    b = b.astype(dt)
    if mask is not None and v > 1:
        a[0] = dt(mask)
        b[0 if rng.random() < 0.5 else 1] = dt(mask)
    a, b = a[None], b[None]
    ref = mp_js(a, b)
    got, back = K.js_rows(a, b), K.js_rows(b, a)
    if ref[0] < 1e-40:  # b - a constant on the support (an exact shift): JS is exactly 0
        assert got[0] == 0 and back[0] == 0
        return
    assert_rel(got, ref, 1e-13, "js_rows")
    assert_rel(back, ref, 1e-13, "js_rows swapped")
