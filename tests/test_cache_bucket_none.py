"""kldiv.cache bucket_kl's accuracy and linear_bucket_kl's reductions (audit 4 L1).

bucket_kl on float32 student logits was the textbook sum of exp(a_k) (a_k - log q_k) in float32:
2e-3 relative at bucket-KL 8e-5. Reference: the same bucket formula on the same stored (float32)
teacher fields and the same student logits, in 50-digit mpmath."""
import math

import mpmath
import numpy as np
import pytest
import torch

from kldiv.cache import bucket_kl, sparsify
from kldiv.cache.estimators import linear_bucket_kl

N, V, K, H = 3, 200, 16, 16


def _case():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, H, dtype=torch.float64, generator=g) * 0.3
    h = torch.randn(N, H, dtype=torch.float64, generator=g)
    batch = sparsify(h @ W.T, K)
    eps = torch.tensor([1e-2, 1e-3, 1e-4], dtype=torch.float64)[:, None]
    s = (h + eps * torch.randn(N, H, dtype=torch.float64, generator=g)) @ W.T
    return batch, s


def _mp_bucket(z, ids, a, logr, T):
    """sum_k e^{a_k} (a_k - log q_k) + r (log r - log Q_rest), the fields as stored."""
    with mpmath.workdps(50):
        out = []
        for zi, ii, ai, li in zip(z, ids, a, logr):
            x = [mpmath.mpf(float(v)) / T for v in zi]
            lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in x))
            top = set(int(j) for j in ii)
            rest = mpmath.log(mpmath.fsum(mpmath.exp(x[j]) for j in range(len(x)) if j not in top))
            val = mpmath.fsum(mpmath.exp(mpmath.mpf(float(ak))) * (mpmath.mpf(float(ak)) - (x[int(j)] - lse))
                              for ak, j in zip(ai, ii))
            lr = mpmath.mpf(float(li))
            val += mpmath.exp(lr) * (lr - (rest - lse))
            out.append(float(val))
        return np.array(out)


_REF = {}


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_bucket_kl_against_mpmath_on_the_stored_fields(dt, T):
    batch, s = _case()
    z = s.to(dt)
    key = (dt, T)
    if key not in _REF:
        _REF[key] = _mp_bucket(z.double().numpy(), batch["topk_ids"].numpy(),
                               batch["topk_logprobs"].double().numpy(),
                               batch["tail_logmass"].double().numpy(), T)
    ref = _REF[key]
    got = bucket_kl(z, batch, temperature=T, reduction="none")
    assert got.dtype == dt and got.shape == (N,)
    err = np.abs(got.double().numpy() - ref)
    # relative, plus the formula's own rounding (the stored fields do not sum to 1 exactly: a
    # KL below ~1e-7 is of the size of that mismatch, and the value may be negative there)
    rtol, atol = (1e-5, 1e-10) if dt == torch.float32 else (1e-12, 1e-15)
    assert np.all(err <= rtol * np.abs(ref) + atol), (got, ref)


def test_linear_bucket_kl_refuses_none_naming_reduction():
    batch, s = _case()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(V, H, generator=g)
    h = torch.randn(N, H, generator=g)
    with pytest.raises(ValueError, match="reduction.*'none'.*bucket_kl"):
        linear_bucket_kl(h, W, batch, reduction="none")
    # the reductions it takes equal bucket_kl on the materialised logits
    want = bucket_kl((h @ W.T).double(), batch, reduction="sum")
    got = linear_bucket_kl(h.double(), W.double(), batch, reduction="sum")
    assert math.isclose(float(got), float(want), rel_tol=1e-6)
