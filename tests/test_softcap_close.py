"""``softcap`` / ``logit_scale`` on float32 logits of close distributions (audit 4 F3).

The transformed logits were rounded to float32 before the core differenced them: half an ulp
of the capped value (1e-6 at 30) in every difference, 6e-3 relative error at KL ~ 1e-9. They
are now formed in float64 (where the namespace has it) and the result cast back to float32.
Reference: 40-digit mpmath of ``cap * tanh(scale * x / cap)`` on the same float32 inputs, the
KL of the two softmaxes and its gradient with respect to each input (chain rule written out),
per row, at KL ~ 1e-9, 1e-7, 1e-5.
"""
import inspect

import mpmath
import numpy as np
import pytest

import kldiv
from kldiv._core import divergence as _div
from kldiv._core.options import apply_options

torch = pytest.importorskip("torch")

V = 48
_rng = np.random.default_rng(7)
A = (_rng.standard_normal((3, V)) * 6).astype(np.float32)
# one row per KL scale: differences of ~1e-4, 1e-3, 1e-2 give KL ~ 1e-9, 1e-7, 1e-5
B = (A + _rng.standard_normal((3, V)) * np.array([[1.2e-4], [1.2e-3], [1.2e-2]])).astype(np.float32)
OPTIONS = [dict(softcap=30.0), dict(softcap=20.0, logit_scale=0.7), dict(logit_scale=3.0)]

# the divergence casts its result back only with /work/notes/est_softcap_divergence.patch
_WIDE = "wide=True" in inspect.getsource(_div._divergence)
needs_patch = pytest.mark.xfail(not _WIDE, strict=True,
                                reason="kldiv._core.divergence does not call apply_options(wide=True)")


def _transform(x, softcap=None, logit_scale=None):
    x = mpmath.mpf(float(x))
    s = mpmath.mpf(1 if logit_scale is None else logit_scale)
    if softcap is None:
        return s * x, s
    c = mpmath.mpf(softcap)
    t = mpmath.tanh(s * x / c)
    return c * t, s * (1 - t * t)  # value, derivative


def _reference(opts):
    """Per row: KL(softmax(a') || softmax(b')), dKL/da, dKL/db (float64 from 40 digits)."""
    out = []
    with mpmath.workdps(40):
        for ra, rb in zip(A, B):
            ta = [_transform(x, **opts) for x in ra]
            tb = [_transform(x, **opts) for x in rb]
            za = mpmath.log(mpmath.fsum(mpmath.exp(v) for v, _ in ta))
            zb = mpmath.log(mpmath.fsum(mpmath.exp(v) for v, _ in tb))
            lp = [v - za for v, _ in ta]
            lq = [v - zb for v, _ in tb]
            kl = mpmath.fsum(mpmath.exp(x) * (x - y) for x, y in zip(lp, lq))
            ga = [mpmath.exp(x) * (x - y - kl) * d for x, y, (_, d) in zip(lp, lq, ta)]
            gb = [(mpmath.exp(y) - mpmath.exp(x)) * d for x, y, (_, d) in zip(lp, lq, tb)]
            out.append((float(kl), np.array(ga, dtype=float), np.array(gb, dtype=float)))
    return out


_REFS = {i: _reference(o) for i, o in enumerate(OPTIONS)}


def _check_values(got, ref, tol=1e-6):
    got = np.asarray(got, dtype=np.float64)
    want = np.array([r[0] for r in ref])
    assert 5e-10 < want.min() and want.max() < 1e-4  # the KL scales this test is about
    err = np.abs(got / want - 1)
    assert np.all(err < tol), (err, want)


def _check_grads(ga, gb, ref, tol=2e-6):
    """Per row: the largest error relative to the row's largest gradient entry."""
    for i, (_, ra, rb) in enumerate(ref):
        for g, r in ((ga[i], ra), (gb[i], rb)):
            err = np.max(np.abs(np.asarray(g, np.float64) - r)) / np.max(np.abs(r))
            assert err < tol, (i, err)


@needs_patch
@pytest.mark.parametrize("k", range(len(OPTIONS)))
def test_torch_values_and_row_gradients(k):
    a = torch.from_numpy(A).requires_grad_()
    b = torch.from_numpy(B).requires_grad_()
    out = kldiv.kl_div(a, b, p_space="logits", q_space="logits", **OPTIONS[k])
    assert out.dtype == torch.float32
    _check_values(out.detach().numpy(), _REFS[k])
    out.sum().backward()  # rows are independent: row i's gradient is its own KL's
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    _check_grads(a.grad.numpy(), b.grad.numpy(), _REFS[k])


@needs_patch
@pytest.mark.parametrize("k", range(len(OPTIONS)))
def test_numpy_values(k):
    out = kldiv.kl_div(A, B, p_space="logits", q_space="logits", **OPTIONS[k])
    assert out.dtype == np.float32
    _check_values(out, _REFS[k])
    mean = kldiv.kl_div(A, B, p_space="logits", q_space="logits", reduction="mean", **OPTIONS[k])
    assert mean.dtype == np.float32
    assert abs(float(mean) / np.mean([r[0] for r in _REFS[k]]) - 1) < 1e-6


@needs_patch
@pytest.mark.usefixtures("restore_jax_x64")
def test_jax_core_values_and_row_gradients():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)  # float64 is what the transform is formed in
    import jax.numpy as jnp

    a, b = jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32)
    opts = OPTIONS[0]

    def total(a, b):
        return kldiv.kl_div(a, b, p_space="logits", q_space="logits", reduction="sum", **opts)

    rows = kldiv.kl_div(a, b, p_space="logits", q_space="logits", **opts)
    assert rows.dtype == jnp.float32
    _check_values(rows, _REFS[0])
    ga, gb = jax.grad(total, argnums=(0, 1))(a, b)
    assert ga.dtype == jnp.float32
    _check_grads(np.asarray(ga), np.asarray(gb), _REFS[0])


@needs_patch
def test_half_inputs_give_float32():
    a16 = torch.from_numpy(A).half()
    b16 = torch.from_numpy(B).half()
    out = kldiv.kl_div(a16, b16, p_space="logits", q_space="logits", softcap=30.0)
    assert out.dtype == torch.float32
    ref = kldiv.kl_div(a16.double(), b16.double(), p_space="logits", q_space="logits", softcap=30.0)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-6, atol=0)


def test_apply_options_wide_keeps_the_transform_in_float64():
    """apply_options(wide=True): float32 logits transformed in float64 (to 1e-15 of mpmath),
    with the dtype to cast the divergence back to."""
    p, q, _, _, _, dt = apply_options(A, B, p_space="logits", q_space="logits", axis=-1,
                                      mask=None, softcap=30.0, wide=True)
    assert p.dtype == np.float64 and q.dtype == np.float64 and dt == np.float32
    with mpmath.workdps(40):
        want = np.array([[float(_transform(x, softcap=30.0)[0]) for x in row] for row in A])
    np.testing.assert_allclose(p, want, rtol=1e-15, atol=0)
    # without wide (the default), nothing changes: float32 out, five values
    assert apply_options(A, B, p_space="logits", q_space="logits", axis=-1, mask=None,
                         softcap=30.0)[0].dtype == np.float32
