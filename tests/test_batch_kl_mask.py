"""kldiv.metrics.batch_kl with a mask: masked-out rows are left out of the checks and of the
mean (audit 3, F8: a nan or all -inf padding row that the mask leaves out raised ValueError).

References: mpmath (50 digits) KL of the kept rows on the exact float inputs; gradients against
torch.autograd of the float64 textbook formula on the kept rows.
"""
import math

import mpmath
import numpy as np
import pytest

from kldiv.metrics import batch_kl

torch = pytest.importorskip("torch")

mpmath.mp.dps = 50


def _mp_kl(a, b):
    a = [mpmath.mpf(float(x)) for x in a]
    b = [mpmath.mpf(float(x)) for x in b]
    la = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in a))
    lb = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in b))
    return mpmath.fsum(mpmath.exp(x - la) * ((x - la) - (y - lb)) for x, y in zip(a, b))


def _mp_mean(ref, oth, keep):
    rows = [(r, o) for r, o, k in zip(ref.reshape(-1, ref.shape[-1]), oth.reshape(-1, oth.shape[-1]),
                                      keep.reshape(-1)) if k]
    return float(mpmath.fsum(_mp_kl(r, o) for r, o in rows) / len(rows))


def _batch(seed=0, shape=(2, 5, 7)):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(shape) * 3
    oth = rng.standard_normal(shape) * 3
    ref[0, 0] += 1e30                      # a shifted row (kept)
    return ref, oth


PADDING = [np.nan, -np.inf, np.inf]


@pytest.mark.parametrize("pad", PADDING)
def test_batch_kl_skips_masked_rows_numpy(pad):
    ref, oth = _batch()
    mask = np.ones(ref.shape[:-1], bool)
    mask[0, 3] = mask[1, 4] = mask[1, 0] = False
    ref[0, 3] = pad
    oth[1, 4] = pad
    ref[1, 0, 2] = np.nan                  # one bad entry in a masked row
    keep_ref = np.where(mask[..., None], ref, 0.0)
    keep_oth = np.where(mask[..., None], oth, 0.0)
    want_f = _mp_mean(keep_ref, keep_oth, mask)
    want_r = _mp_mean(keep_oth, keep_ref, mask)
    f, r = batch_kl(ref, oth, mask=mask, direction="both")
    assert float(f) == pytest.approx(want_f, rel=1e-14)
    assert float(r) == pytest.approx(want_r, rel=1e-14)
    # a mask that broadcasts (one per position, shared by the batch)
    pos = np.array([True, False, True, True, False])
    ref2, oth2 = _batch(1)
    ref2[:, 1] = pad
    oth2[:, 4] = pad
    want = _mp_mean(np.where(pos[:, None], ref2, 0.0), np.where(pos[:, None], oth2, 0.0),
                    np.broadcast_to(pos, ref2.shape[:-1]))
    assert float(batch_kl(ref2, oth2, mask=pos)) == pytest.approx(want, rel=1e-14)


def test_batch_kl_masked_rows_torch_values_and_gradients():
    ref, oth = _batch(2)
    mask = np.ones(ref.shape[:-1], bool)
    mask[0, 1] = mask[1, 2] = False
    ref[0, 1] = np.nan
    ref[1, 2] = -np.inf
    oth[0, 1] = -np.inf
    ta = torch.tensor(ref, requires_grad=True)
    tb = torch.tensor(oth, requires_grad=True)
    value = batch_kl(ta, tb, mask=torch.from_numpy(mask))
    value.backward()
    keep_ref = np.where(mask[..., None], ref, 0.0)
    keep_oth = np.where(mask[..., None], oth, 0.0)
    assert float(value.detach()) == pytest.approx(_mp_mean(keep_ref, keep_oth, mask), rel=1e-14)
    # torch.autograd of the float64 textbook formula on the kept rows
    a2 = torch.tensor(keep_ref, requires_grad=True)
    b2 = torch.tensor(keep_oth, requires_grad=True)
    lp, lq = torch.log_softmax(a2, -1), torch.log_softmax(b2, -1)
    m = torch.from_numpy(mask)
    ((lp.exp() * (lp - lq)).sum(-1)[m]).mean().backward()
    assert torch.allclose(ta.grad, a2.grad, rtol=1e-10, atol=1e-15)
    assert torch.allclose(tb.grad, b2.grad, rtol=1e-10, atol=1e-15)
    assert not ta.grad[~m].any() and not tb.grad[~m].any()


def test_batch_kl_all_masked_is_nan():
    ref, oth = _batch(3, (3, 4))
    ref[1] = np.nan
    none = np.zeros(3, bool)
    assert math.isnan(float(batch_kl(ref, oth, mask=none)))
    ta = torch.tensor(ref, requires_grad=True)
    value = batch_kl(ta, torch.tensor(oth), mask=torch.from_numpy(none))
    assert math.isnan(float(value.detach()))
    value.backward()
    assert torch.equal(ta.grad, torch.zeros_like(ta))   # no 0 / 0 in the backward pass


def test_batch_kl_masked_rows_jax():
    jnp = pytest.importorskip("jax.numpy")
    ref, oth = _batch(4)
    ref = ref.astype(np.float32)
    oth = oth.astype(np.float32)
    ref[0, 0] = 0.0                        # float32: no 1e30 shift here
    mask = np.ones(ref.shape[:-1], bool)
    mask[1, 1] = False
    ref[1, 1] = np.nan
    want = _mp_mean(np.where(mask[..., None], ref, 0), np.where(mask[..., None], oth, 0), mask)
    got = float(batch_kl(jnp.asarray(ref), jnp.asarray(oth), mask=jnp.asarray(mask)))
    assert got == pytest.approx(want, rel=2e-6)


def test_topk_ks_must_be_integers_at_least_one():
    """Audit 3, F15: k = 0 gave nan, a negative k a raw NumPy error, k = 2.5 a top-2 overlap
    under the key 'top2.5'; DriftMetric(topk=(2.5,)) was accepted as 2."""
    from kldiv.metrics import DriftMetric, row_values, topk_overlap

    a = np.random.default_rng(0).standard_normal((3, 5))
    for ks in [(0,), (-2,), (2.5,), (True,), (2, 0)]:
        with pytest.raises(ValueError, match=r"ks: every k must be an integer >= 1"):
            topk_overlap(a, a, ks=ks)
        with pytest.raises(ValueError, match=r"topk: every k must be an integer >= 1"):
            DriftMetric(topk=ks)
        with pytest.raises(ValueError, match=r"topk: every k must be an integer >= 1"):
            row_values(a, a, topk=ks)
    # integers (NumPy's included) keep working; k beyond V counts the whole row
    b = a.copy()
    b[:, [0, 1]] = b[:, [1, 0]]
    out = topk_overlap(a, b, ks=(np.int64(1), 5, 9))
    top1 = (np.argmax(a, 1) == np.argmax(b, 1)).astype(float)
    assert np.array_equal(out["top1_overlap"], top1)
    assert np.array_equal(out["top5_overlap"], np.ones(3))
    assert np.array_equal(out["top9_overlap"], np.ones(3))
