"""The README's migration table, checked: each peer's call and the kldiv call that gives its number.

Peers are computed by the peers themselves where installed (torch, scipy, optax) and by the
formula their documentation states otherwise (Keras: clip to [1e-7, 1], sum y_true log(y_true /
y_pred) over the last axis, mean over the batch).
"""
import numpy as np
import pytest
import scipy.special
import scipy.stats

import kldiv

rng = np.random.default_rng(20261125)
N, V = 6, 7
p = rng.dirichlet(np.ones(V), size=N)  # reference / target
q = rng.dirichlet(np.ones(V), size=N)  # model / prediction


def test_scipy_rel_entr_and_entropy():
    assert np.allclose(kldiv.kl_div(p, q), scipy.special.rel_entr(p, q).sum(-1), rtol=1e-13)
    assert np.allclose(kldiv.kl_div(p.T, q.T, axis=0), scipy.stats.entropy(p.T, q.T, axis=0))
    assert np.allclose(kldiv.kl_div(p, q), scipy.special.kl_div(p, q).sum(-1), rtol=1e-12)


def test_torch_kl_div_reductions():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    lq = torch.from_numpy(np.log(q))
    pt = torch.from_numpy(p)
    # torch reads (model log-probs, target); "batchmean" is the KL per row for 2-D inputs
    assert np.isclose(F.kl_div(lq, pt, reduction="batchmean").item(),
                      float(kldiv.kl_div(p, np.log(q), q_space="log_probs", reduction="mean")))
    # torch's default "mean" divides by N * V: kldiv's per-distribution mean over V
    assert np.isclose(F.kl_div(lq, pt, reduction="mean").item(),
                      float(kldiv.kl_div(p, q, reduction="mean")) / V)
    assert np.isclose(F.kl_div(lq, pt, reduction="sum").item(),
                      float(kldiv.kl_div(p, q, reduction="sum")))
    # log_target=True: both in log space
    assert np.isclose(
        F.kl_div(lq, torch.log(pt), reduction="batchmean", log_target=True).item(),
        float(kldiv.kl_div(np.log(p), np.log(q), p_space="log_probs", q_space="log_probs",
                           reduction="mean")))
    # 3-D (B, T, V): batchmean divides by B only, kldiv's mean is per token
    p3, q3 = p.reshape(2, 3, V), q.reshape(2, 3, V)
    t = F.kl_div(torch.from_numpy(np.log(q3)), torch.from_numpy(p3), reduction="batchmean").item()
    assert np.isclose(t, float(kldiv.kl_div(p3, q3, reduction="sum")) / 2)
    assert np.isclose(t / 3, float(kldiv.kl_div(p3, q3, reduction="mean")))


def test_keras_documented_formula():
    yt, yp = np.clip(p, 1e-7, 1), np.clip(q, 1e-7, 1)
    keras_value = np.mean(np.sum(yt * np.log(yt / yp), axis=-1))
    assert np.isclose(keras_value, float(kldiv.kl_div(p, q, reduction="mean")))


def test_optax_if_installed():
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    v = optax.losses.kl_divergence(jnp.log(jnp.asarray(q)), jnp.asarray(p))
    assert np.allclose(np.asarray(v), kldiv.kl_div(p, np.log(q), q_space="log_probs"), rtol=1e-5)


def test_gluon_true_kl_relation():
    from kldiv.gluon import KLDivLoss

    mean = KLDivLoss(from_logits=True)(np.log(q), p)  # model first, target second, mean over V
    assert np.allclose(np.asarray(mean) * V, kldiv.kl_div(p, q), rtol=1e-9)
    logits = np.log(q) + 3.0
    val = KLDivLoss(from_logits=False, aggregate="sum")(logits, p)
    assert np.allclose(np.asarray(val), kldiv.kl_div(p, logits, q_space="logits"), rtol=1e-9)
