"""kl_terms in float32 on peaked rows (audit 3): the dominant term p_top log(p_top / q_top) is
log of the normaliser, taken as log1p of the mass off the row's maximum (was log of a sum near 1
rounded to float32: 4e-4..1e-3 relative off). Reference: the 50-digit oracle (tests/oracle.py)
on the exact float32 inputs, per term."""
import numpy as np
import pytest
import torch

import kldiv
import oracle


def mpmath_log_w(v):
    import mpmath

    return mpmath.log(v) if v > 0 else mpmath.mpf(-1e300)


def _rows():
    rng = np.random.default_rng(5)
    out = [(np.array([0.0, 1.0, 0.0, 0.0], np.float32), np.array([0.0, 10.0, 0.0, 0.0], np.float32),
            "probs", "logits", 1.0),
           (np.array([3.77141446e-19, 1.0, 1.00624525e-28, 1.36664085e-12], np.float32),
            np.array([10002.246, 10025.5, 10014.986, 10014.968], np.float32), "probs", "logits", 1.0)]
    for i in range(10):
        V = int(rng.integers(2, 9))
        a = (rng.standard_normal(V) * 3).astype(np.float32)
        a[0] += 12 + 4 * i % 9  # a peak on both sides
        b = (a + rng.standard_normal(V).astype(np.float32) * 0.5 + [1e4, 0, -7][i % 3]).astype(
            np.float32)
        T = [1.0, 0.5, 2.0][i % 3]
        out.append((a, b, "logits", ["logits", "log_probs"][i % 2] if i % 3 != 2 else "logits",
                    T))
    return out


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_peaked_terms_per_entry(lib):
    for a, b, ps, qs, T in _rows():
        if qs == "log_probs":
            b = (b - np.log(np.exp((b - b.max()).astype(np.float64)).sum()) - b.max()).astype(
                np.float32)
        ref = np.array([float(v) for v in oracle.terms(a, b, ps, qs, T)])
        x, y = (a, b) if lib == "numpy" else (torch.from_numpy(a), torch.from_numpy(b))
        got = np.asarray(kldiv.kl_terms(x, y, p_space=ps, q_space=qs, temperature=T,
                                        validate=False), dtype=np.float64)
        # each term's own float32 rounding: p_i (log p_i - log q_i) from logs of size |log p_i|
        # (a difference that may cancel), so the bound is eps (p_i (|log p_i| + |log q_i|) + |t_i|);
        # the dominant term's log p_top, log q_top are tiny, so there it is relative
        lp = np.array([float(mpmath_log_w(v)) for v in oracle.distribution(a, ps, T)])
        lq = np.array([float(mpmath_log_w(v)) for v in oracle.distribution(b, qs, T)])
        bound = 16 * 2.0**-24 * (np.exp(lp) * (np.abs(lp) + np.abs(lq)) + np.abs(ref))
        assert (np.abs(got - ref) <= bound).all(), (a, b, ps, qs, T, got, ref)
