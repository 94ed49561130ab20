"""kldiv.torch.linear_kl_div: the divergence fused with the output layer.

References, all independent of the chunked code: torch autograd on the naive float64 formula with
the logits materialised (written out below), and the float64 core (``kldiv.kl_div`` and family)
on the full logits. The top-k convention is pinned against a hand-written K+1-bucket formula.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from kldiv.torch import linear_kl_div  # noqa: E402
from kldiv.backends.torch_linear import auto_chunk_size  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

F64 = torch.float64
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def make(n, h, v, dtype, seed, *, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=F64).to(dtype)
    W = (torch.randn(v, h, generator=g, dtype=F64) * scale / math.sqrt(h)).to(dtype)
    b = (torch.randn(v, generator=g, dtype=F64) * 0.5).to(dtype) if bias else None
    t = (torch.randn(n, v, generator=g, dtype=F64) * 2.0).to(dtype)
    return hid, W, b, t


def naive(kind, hid, W, b, t, *, space="logits", beta=0.5, T=1.0, keep=None, reduction="mean",
          t2=False):
    """The textbook formula in float64 on the materialised logits (autograd gives the grads)."""
    z = hid.to(F64) @ W.to(F64).T
    if b is not None:
        z = z + b.to(F64)
    lq = torch.log_softmax(z / T, -1)
    lp = torch.log_softmax(t.to(F64) / T, -1)  # log_probs / T renormalised = logits / T
    p, q = lp.exp(), lq.exp()
    if kind == "forward":
        rows = (p * (lp - lq)).sum(-1)
    elif kind == "reverse":
        rows = (q * (lq - lp)).sum(-1)
    else:
        lm = torch.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
        rows = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        cnt = keep.sum()
    else:
        cnt = rows.numel()
    out = rows.sum() / cnt if reduction == "mean" else rows.sum()
    return out * T**2 if t2 else out


def leaves(dtype, hid, W, b):
    out = [hid.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)]
    out.append(None if b is None else b.detach().clone().requires_grad_(True))
    return out


def grads_of(loss, xs):
    xs = [x for x in xs if x is not None]
    return torch.autograd.grad(loss, xs)


def rel(a, b):
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_close(got, ref, tol, what=""):
    assert rel(got, ref) <= tol, f"{what}: relative error {rel(got, ref):.3g} > {tol:g}"


# ----------------------------------------------------------------------------------------------
# dense teachers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
@pytest.mark.parametrize("space", ["logits", "log_probs"])
def test_dense_against_naive_float64(dtype, kind, space):
    hid, W, b, t = make(37, 16, 50, dtype, seed=1)
    if space == "log_probs":
        t = torch.log_softmax(t.to(F64), -1).to(dtype)
    beta = 0.3 if kind == "js" else 0.5
    h1, W1, b1 = leaves(dtype, hid, W, b)
    loss = linear_kl_div(h1, W1, t, bias=b1, target_space=space, divergence=kind, beta=beta,
                         chunk_size=8)  # 8 does not divide 37
    h2, W2, b2 = leaves(F64, hid.to(F64), W.to(F64), b.to(F64))
    ref = naive(kind, h2, W2, b2, t, space=space, beta=beta)
    assert loss.dtype == dtype
    assert_close(loss, ref, TOL[dtype], "loss")
    for name, g, r in zip("hWb", grads_of(loss, [h1, W1, b1]), grads_of(ref, [h2, W2, b2])):
        assert g.dtype == dtype
        assert_close(g, r, TOL[dtype], name)


@pytest.fixture(params=["default", "torch-rows", "standin"])
def row_path(request, monkeypatch):
    """Run a test through each way the per-chunk divergence can be computed."""
    import contextlib

    from kldiv.backends import torch_linear

    if request.param == "standin":
        monkeypatch.setattr(torch_linear, "_rows_function",
                            lambda: (torch_linear._standin_rows_with_grad, None))
        return contextlib.nullcontext()
    if request.param == "torch-rows":
        from kldiv.backends import torch_fused

        return torch_fused._extension(False)  # the fused module's pure-torch path
    return contextlib.nullcontext()


@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
def test_dense_against_core_on_full_logits(kind, row_path):
    hid, W, b, t = make(29, 12, 40, F64, seed=2)
    fn = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div}[kind]
    h1, W1, b1 = leaves(F64, hid, W, b)
    with row_path:
        loss = linear_kl_div(h1, W1, t, bias=b1, divergence=kind, chunk_size=5, temperature=1.7,
                             t2_scale=True, reduction="sum")
    h2, W2, b2 = leaves(F64, hid, W, b)
    ref = fn(t, h2 @ W2.T + b2, p_space="logits", q_space="logits", reduction="sum",
             temperature=1.7, t2_scale=True)
    assert_close(loss, ref, 1e-9, "loss")
    for name, g, r in zip("hWb", grads_of(loss, [h1, W1, b1]), grads_of(ref, [h2, W2, b2])):
        assert_close(g, r, 1e-9, name)


def test_float32_against_core_float64_with_temperature():
    hid, W, b, t = make(45, 24, 64, torch.float32, seed=3, scale=3.0)
    h1, W1, b1 = leaves(torch.float32, hid, W, b)
    loss = linear_kl_div(h1, W1, t, bias=b1, temperature=2.0)  # automatic chunk size
    h2, W2, b2 = leaves(F64, hid.to(F64), W.to(F64), b.to(F64))
    ref = kldiv.kl_div(t.to(F64), h2 @ W2.T + b2, p_space="logits", q_space="logits",
                       reduction="mean", temperature=2.0)
    assert_close(loss, ref, 1e-5, "loss")
    for name, g, r in zip("hWb", grads_of(loss, [h1, W1, b1]), grads_of(ref, [h2, W2, b2])):
        assert_close(g, r, 1e-5, name)


def test_no_bias_and_leading_dims():
    hid, W, _, t = make(24, 8, 30, F64, seed=4, bias=False)
    h1, W1, _ = leaves(F64, hid.view(4, 6, 8), W, None)
    loss = linear_kl_div(h1, W1, t.view(4, 6, 30), divergence="reverse",
                         chunk_size=7)
    h2, W2, _ = leaves(F64, hid, W, None)
    ref = naive("reverse", h2, W2, None, t)
    assert_close(loss, ref, 1e-9, "loss")
    gh, gw = grads_of(loss, [h1, W1])
    rh, rw = grads_of(ref, [h2, W2])
    assert gh.shape == (4, 6, 8)
    assert_close(gh.reshape(24, 8), rh, 1e-9, "h")
    assert_close(gw, rw, 1e-9, "W")


def test_gradient_of_hidden_only_and_of_weight_only():
    hid, W, b, t = make(20, 8, 30, F64, seed=5)
    h1 = hid.clone().requires_grad_(True)
    loss = linear_kl_div(h1, W, t, bias=b, chunk_size=6)
    (gh,) = torch.autograd.grad(loss, h1)
    h2 = hid.clone().requires_grad_(True)
    (rh,) = torch.autograd.grad(naive("forward", h2, W, b, t), h2)
    assert_close(gh, rh, 1e-9, "h")
    W1 = W.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(linear_kl_div(hid, W1, t, bias=b, chunk_size=6), W1)
    W2 = W.clone().requires_grad_(True)
    (rw,) = torch.autograd.grad(naive("forward", hid, W2, b, t), W2)
    assert_close(gw, rw, 1e-9, "W")


def test_upstream_gradient_is_applied_and_no_grad_value():
    hid, W, b, t = make(15, 8, 20, F64, seed=6)
    h1, W1, b1 = leaves(F64, hid, W, b)
    loss = linear_kl_div(h1, W1, t, bias=b1, chunk_size=4)
    (3.0 * loss).backward()
    h2, W2, b2 = leaves(F64, hid, W, b)
    ref = naive("forward", h2, W2, b2, t)
    (3.0 * ref).backward()
    for g, r in ((h1.grad, h2.grad), (W1.grad, W2.grad), (b1.grad, b2.grad)):
        assert_close(g, r, 1e-9, "scaled")
    with torch.no_grad():
        v = linear_kl_div(h1, W1, t, bias=b1)
    assert_close(v, ref, 1e-9, "no_grad")
    with pytest.raises(RuntimeError, match="once"):
        loss2 = linear_kl_div(h1, W1, t, bias=b1)
        loss2.backward(retain_graph=True)
        loss2.backward()


# ----------------------------------------------------------------------------------------------
# masks and ignore_index


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mask_and_ignore_index(reduction):
    hid, W, b, t = make(30, 8, 25, F64, seed=7)
    g = torch.Generator().manual_seed(8)
    mask = torch.rand(30, generator=g) > 0.3
    labels = torch.randint(0, 25, (30,), generator=g)
    labels[::4] = -100
    keep = mask & (labels != -100)
    t_bad = t.clone()
    t_bad[~keep] = math.nan  # skipped rows are never read (and never checked)
    h1, W1, b1 = leaves(F64, hid.view(5, 6, 8), W, b)
    loss = linear_kl_div(h1, W1, t_bad.view(5, 6, 25), bias=b1,
                         mask=mask.view(5, 6), labels=labels.view(5, 6), reduction=reduction,
                         chunk_size=4)
    h2, W2, b2 = leaves(F64, hid, W, b)
    ref = naive("forward", h2, W2, b2, t, keep=keep, reduction=reduction)
    assert_close(loss, ref, 1e-9, "loss")
    gh, gw, gb = grads_of(loss, [h1, W1, b1])
    rh, rw, rb = grads_of(ref, [h2, W2, b2])
    assert torch.all(gh.reshape(30, 8)[~keep] == 0)
    for name, gg, r in zip("hWb", (gh.reshape(30, 8), gw, gb), (rh, rw, rb)):
        assert_close(gg, r, 1e-9, name)


def test_custom_ignore_index_and_all_masked():
    hid, W, b, t = make(12, 8, 20, F64, seed=9)
    labels = torch.arange(12) % 3  # rows with label 0 ignored
    h1, W1, b1 = leaves(F64, hid, W, b)
    loss = linear_kl_div(h1, W1, t, bias=b1, labels=labels, ignore_index=0)
    h2, W2, b2 = leaves(F64, hid, W, b)
    ref = naive("forward", h2, W2, b2, t, keep=labels != 0)
    assert_close(loss, ref, 1e-9, "loss")
    h3, W3, b3 = leaves(F64, hid, W, b)
    none = linear_kl_div(h3, W3, t, bias=b3, mask=torch.zeros(12, dtype=torch.bool))
    assert float(none.detach()) == 0.0  # mean over no row: 0, as the core
    none.backward()
    assert not h3.grad.any() and not W3.grad.any() and not b3.grad.any()


# ----------------------------------------------------------------------------------------------
# half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_upcast_per_chunk(dtype):
    hid, W, b, t = make(33, 32, 70, dtype, seed=10)
    h1, W1, b1 = leaves(dtype, hid, W, b)
    loss = linear_kl_div(h1, W1, t, bias=b1, divergence="js", chunk_size=10)
    # reference: the exact float64 values of the half-precision inputs
    h2, W2, b2 = leaves(F64, hid.to(F64), W.to(F64), b.to(F64))
    ref = naive("js", h2, W2, b2, t.to(F64))
    assert loss.dtype == torch.float32
    assert_close(loss, ref, 1e-5, "loss")  # float32 accumulation, no half-precision logits
    for name, g, r in zip("hWb", grads_of(loss, [h1, W1, b1]), grads_of(ref, [h2, W2, b2])):
        assert g.dtype == dtype
        # the gradients are rounded once to the input's half precision at the end
        assert_close(g, r, 2 * torch.finfo(dtype).eps, name)


# ----------------------------------------------------------------------------------------------
# top-k teachers: the K+1-bucket convention


def topk_reference(kind, z, idx, lp, beta=0.5, T=1.0):
    """The convention written out in float64 probabilities: K listed categories + one rest."""
    q = torch.softmax(z.to(F64) / T, -1)
    p_k = lp.to(F64).exp()
    q_k = torch.gather(q, -1, idx)
    p_b = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)

    def kl(a, c):
        return torch.where(a > 0, a * torch.log(a / c), torch.zeros_like(a)).sum(-1)

    if kind == "forward":
        return kl(p_b, q_b)
    if kind == "reverse":
        return kl(q_b, p_b)
    m = beta * p_b + (1 - beta) * q_b
    return beta * kl(p_b, m) + (1 - beta) * kl(q_b, m)


def topk_teacher(n, v, k, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=F64) * 3
    lp_full = torch.log_softmax(logits, -1)
    lp, idx = torch.topk(lp_full, k, -1)
    perm = torch.argsort(torch.rand(n, k, generator=g), -1)  # order within a row is irrelevant
    return torch.gather(idx, -1, perm), torch.gather(lp, -1, perm).to(dtype)


@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_convention(kind, dtype):
    hid, W, b, _ = make(26, 12, 40, dtype, seed=11)
    idx, lp = topk_teacher(26, 40, 5, seed=12, dtype=dtype)
    h1, W1, b1 = leaves(dtype, hid, W, b)
    loss = linear_kl_div(h1, W1, (idx, lp), bias=b1, divergence=kind, beta=0.4, chunk_size=7,
                         temperature=1.5)
    h2, W2, b2 = leaves(F64, hid.to(F64), W.to(F64), b.to(F64))
    ref = topk_reference(kind, h2 @ W2.T + b2, idx, lp, beta=0.4, T=1.5).mean()
    tol = TOL[dtype]
    assert_close(loss, ref, tol, "loss")
    for name, g, r in zip("hWb", grads_of(loss, [h1, W1, b1]), grads_of(ref, [h2, W2, b2])):
        assert_close(g, r, tol, name)


def test_topk_with_all_categories_equals_dense_log_probs():
    hid, W, b, t = make(10, 8, 12, F64, seed=13)
    lp = torch.log_softmax(t, -1)
    idx = torch.argsort(torch.rand(10, 12, generator=torch.Generator().manual_seed(1)), -1)
    a = linear_kl_div(hid, W, (idx, torch.gather(lp, -1, idx)), bias=b, divergence="reverse")
    ref = naive("reverse", hid, W, b, lp, space="log_probs")
    assert_close(a, ref, 1e-9, "K = V")


def test_topk_teacher_with_no_mass_left_and_masked_rows():
    hid, W, b, _ = make(9, 8, 15, F64, seed=14)
    idx, lp = topk_teacher(9, 15, 4, seed=15)
    lp = lp - torch.logsumexp(lp, -1, keepdim=True)  # the teacher's mass is all in its top-4
    mask = torch.arange(9) % 2 == 0
    loss = linear_kl_div(hid.view(3, 3, 8), W, (idx.view(3, 3, 4), lp.view(3, 3, 4)), bias=b,
                         mask=mask.view(3, 3))
    rows = topk_reference("forward", hid @ W.T + b, idx, lp)
    assert_close(loss, rows[mask].mean(), 1e-9, "rest bucket of mass 0")
    rev = linear_kl_div(hid, W, (idx, lp), bias=b, divergence="reverse")
    assert math.isinf(float(rev))  # the student has mass where the teacher has none


# ----------------------------------------------------------------------------------------------
# chunking, properties, errors


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 20), chunk=st.integers(1, 25), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["forward", "reverse", "js"]))
def test_any_chunk_size_gives_the_naive_value(n, chunk, seed, kind):
    hid, W, b, t = make(n, 6, 11, F64, seed=seed)
    loss = linear_kl_div(hid, W, t, bias=b, divergence=kind, chunk_size=chunk)
    assert float(loss) >= 0
    assert_close(loss, naive(kind, hid, W, b, t), 1e-9, "loss")


def test_auto_chunk_size_bounds():
    c = auto_chunk_size(8192, 128256, 2048)
    assert 16 <= c < 8192 // 4  # chunks of logits stay a fraction of the N x V tensor
    assert auto_chunk_size(5, 100, 8) == 5  # small inputs: one chunk
    assert auto_chunk_size(8192, 128256, 2048, divergence="js", topk=20) >= 16


def test_errors_name_the_argument():
    hid, W, b, t = make(6, 4, 5, F64, seed=16)
    with pytest.raises(ValueError, match="reduction"):
        linear_kl_div(hid, W, t, reduction="none")
    with pytest.raises(ValueError, match="divergence"):
        linear_kl_div(hid, W, t, divergence="jensen")
    with pytest.raises(ValueError, match="beta"):
        linear_kl_div(hid, W, t, divergence="js", beta=1.0)
    with pytest.raises(ValueError, match="weight"):
        linear_kl_div(hid, W.T, t)
    with pytest.raises(ValueError, match="target"):
        linear_kl_div(hid, W, t[:, :4])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_kl_div(hid, W, t, chunk_size=0)
    with pytest.raises(TypeError, match="mask"):
        linear_kl_div(hid, W, t, mask=torch.ones(6))
    bad = t.clone()
    bad[4, 2] = math.nan
    with pytest.raises(ValueError, match="target: contains nan at row 4"):
        linear_kl_div(hid, W, bad, chunk_size=3)
    with pytest.raises(ValueError, match="log-probabilities"):
        linear_kl_div(hid, W, t, target_space="log_probs")
    idx, lp = topk_teacher(6, 5, 2, seed=17)
    with pytest.raises(ValueError, match="repeat"):
        linear_kl_div(hid, W, (idx[:, [0, 0]], lp))
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        linear_kl_div(hid, W, (idx + 5, lp))
    with pytest.raises(ValueError, match="sum to"):
        linear_kl_div(hid, W, (idx, lp * 0.0))
    with pytest.raises(TypeError, match="integer"):
        linear_kl_div(hid, W, (idx.to(F64), lp))


def test_matches_numpy_scipy_on_one_row():
    """One row by scipy.special.rel_entr on probabilities, an oracle outside torch."""
    from scipy.special import rel_entr, softmax

    hid, W, b, t = make(1, 5, 7, F64, seed=18)
    z = (hid @ W.T + b).numpy()
    expected = rel_entr(softmax(t.numpy(), -1), softmax(z, -1)).sum()
    np.testing.assert_allclose(float(linear_kl_div(hid, W, t, bias=b)), expected, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# softcap, logit_scale, vocab_size (issue 15 item 2): against torch autograd on the float64
# naive formula with the model's transform written out on the materialised logits


class _Tanh64(torch.autograd.Function):
    """tanh whose derivative is 1 / cosh(u)^2: torch's own backward forms 1 - tanh(u)^2, which
    in float64 is one ulp (2e-16) for every |u| above ~18 (the true value is 4 e^{-2|u|}), a
    wrong reference for saturated logits."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return torch.tanh(u)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return g / torch.cosh(u) ** 2


def _capped(z, cap, scale):
    """The model's forward, written out: cap * tanh(scale * z / cap); -inf stays -inf."""
    s = 1.0 if scale is None else scale
    if cap is None:
        return z * s
    u = s * z / cap
    finite = z != -math.inf
    return torch.where(finite, cap * _Tanh64.apply(torch.where(finite, u, 0.0)), z)


def naive_cap(kind, hid, W, b, t, *, cap=(None, None), scale=(None, None), vocab=None,
              space="logits", beta=0.5, T=1.0, keep=None):
    """Rows (float64, autograd) of the naive formula with the caps and the vocabulary cut."""
    V = W.shape[0] if vocab is None else vocab
    z = hid.to(F64) @ W.to(F64)[:V].T
    if b is not None:
        z = z + b.to(F64)[:V]
    naive_cap.logits = z  # the raw logits (for the float32 floor of weight's rows)
    z = _capped(z, cap[1], scale[1])
    tt = t.to(F64)[:, :V]
    if space == "logits":
        tt = _capped(tt, cap[0], scale[0])
    lq = torch.log_softmax(z / T, -1)
    lp = torch.log_softmax(tt / T, -1)
    p, q = lp.exp(), lq.exp()
    if kind == "forward":
        rows = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
    elif kind == "reverse":
        rows = (q * (lq - lp)).sum(-1)
    else:
        lm = torch.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
        rows = (beta * torch.where(p > 0, p * (lp - lm), torch.zeros_like(p)).sum(-1)
                + (1 - beta) * (q * (lq - lm)).sum(-1))
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        return rows.sum() / keep.sum()
    return rows.mean()


def row_rel(got, ref, floor=None):
    """Largest normwise relative error over the rows (rows whose reference is 0 must be 0);
    ``floor``: per-row lower bounds of the scale."""
    got, ref = got.detach().to(F64), ref.detach().to(F64)
    nr = ref.norm(dim=-1)
    if floor is not None:
        nr = torch.maximum(nr, floor)
    err = (got - ref).norm(dim=-1)
    zero = nr == 0
    assert bool((err[zero] == 0).all()), "rows with a zero reference gradient are not zero"
    return float((err[~zero] / nr[~zero]).max()) if bool((~zero).any()) else 0.0


def check_against_naive(dtype, hid, W, b, t, tol, **kw):
    ref_kw = dict(kw)
    lk = {}
    for k in ("softcap", "logit_scale"):
        v = ref_kw.pop(k, None)
        lk[k] = v
    space = kw.get("target_space", "logits")
    teacher_logits = space == "logits"

    def pair(v):
        if v is None:
            return (None, None)
        if isinstance(v, tuple):
            return v
        return (v if teacher_logits else None, v)

    h1, W1, b1 = leaves(dtype, hid, W, b)
    loss = linear_kl_div(h1, W1, t, bias=b1, **kw)
    h2, W2, b2 = leaves(F64, hid.to(F64), W.to(F64), None if b is None else b.to(F64))
    ref = naive_cap(kw.get("divergence", "forward"), h2, W2, b2, t, cap=pair(lk["softcap"]),
                    scale=pair(lk["logit_scale"]), vocab=kw.get("vocab_size"), space=space,
                    beta=kw.get("beta", 0.5), T=kw.get("temperature", 1.0))
    assert_close(loss, ref, tol, "loss")
    # a row of weight's gradient is sum_r g_rj h_r over the tokens: where those terms cancel,
    # float32 accumulation (any matmul's) errs relative to sum_r |g_rj| |h_r|, not to the sum;
    # in float32 that sum (times 0.1) is the floor of the per-row scale
    floor = None
    if dtype == torch.float32:
        (gz,) = torch.autograd.grad(ref, naive_cap.logits, retain_graph=True)
        floor = 0.1 * (gz.abs().T @ h2.detach().abs()).norm(dim=-1)
        floor = torch.cat([floor, floor.new_zeros(W.shape[0] - floor.shape[0])])
    got = grads_of(loss, [h1, W1, b1])
    want = grads_of(ref, [h2, W2, b2])
    for name, g, r in zip("hWb", got, want):
        if name == "b":
            assert_close(g, r, tol, name)
        else:  # per row: of hidden (per token) and of weight (per vocabulary entry)
            e = row_rel(g, r, None if name == "h" else floor)
            assert e <= tol, f"{name}: per-row relative error {e:.3g} > {tol:g}"
    return loss, got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
def test_softcap_and_logit_scale_against_naive(dtype, kind):
    hid, W, b, t = make(23, 12, 41, dtype, seed=30, scale=6.0)  # logits up to ~20: tanh bends
    check_against_naive(dtype, hid, W, b, t * 4, TOL[dtype], divergence=kind, softcap=7.5,
                        logit_scale=0.8, temperature=0.7, chunk_size=6, beta=0.3)


@pytest.mark.parametrize("opts", [
    dict(softcap=(None, 5.0)),                       # student capped, teacher as given
    dict(softcap=(3.0, None)),                       # teacher capped only
    dict(softcap=(3.0, 9.0), logit_scale=(2.0, 0.5)),
    dict(logit_scale=0.25),                          # both sides scaled, no cap
    dict(logit_scale=(None, 3.0), temperature=2.5),
    dict(logit_scale=-0.5, softcap=4.0),            # a negative scale (allowed, as the core)
])
def test_softcap_pairs_per_side(opts):
    hid, W, b, t = make(13, 8, 29, F64, seed=31, scale=4.0)
    check_against_naive(F64, hid, W, b, t * 3, 1e-9, chunk_size=5, **opts)


def test_softcap_number_skips_a_log_probs_teacher_and_pair_refuses_it():
    hid, W, b, t = make(9, 6, 17, F64, seed=32, scale=5.0)
    lp = torch.log_softmax(t * 3, -1)
    # a number applies to the logits-space side only: the student
    check_against_naive(F64, hid, W, b, lp, 1e-9, target_space="log_probs", softcap=4.0)
    with pytest.raises(ValueError, match="softcap: the teacher is given as log-probabilities"):
        linear_kl_div(hid, W, lp, target_space="log_probs", softcap=(4.0, 4.0))
    idx, tlp = topk_teacher(9, 17, 4, seed=33)
    with pytest.raises(ValueError, match="logit_scale"):
        linear_kl_div(hid, W, (idx, tlp), logit_scale=(2.0, None))


def test_softcap_huge_hidden_saturates_with_exact_gradients():
    # hidden states 1e3 times too large: most logits sit deep in tanh's saturation (derivative
    # ~e^-2|u|, 0 in float32 beyond |u| ~ 44), a few near 0; values and per-row gradients
    hid, W, b, t = make(11, 8, 37, torch.float32, seed=34)
    hid = hid * 1e3
    hid[3] = hid[3] * 1e6  # one row of 1e9: every logit saturated, its gradient ~0
    check_against_naive(torch.float32, hid, W, b, t, 1e-5, softcap=30.0, chunk_size=4)
    hid64 = hid.to(F64)
    check_against_naive(F64, hid64, W.to(F64), b.to(F64), t.to(F64), 1e-9, softcap=30.0,
                        divergence="reverse", chunk_size=4)


@pytest.mark.parametrize("kind", ["forward", "js"])
def test_softcap_masked_teacher_logits_stay_masked(kind):
    hid, W, b, t = make(10, 6, 19, torch.float32, seed=35, scale=3.0)
    t = t * 10
    t[:, ::3] = -math.inf  # masked categories: no mass whatever the cap
    t[4, 2:] = -math.inf  # one category left (column 1)
    _, got = check_against_naive(torch.float32, hid, W, b, t, 1e-5, divergence=kind,
                                 softcap=20.0, temperature=3.0, chunk_size=3)
    assert all(bool(torch.isfinite(g).all()) for g in got)


def test_softcap_with_temperature_near_limits_and_float32_shift():
    hid, W, b, t = make(7, 6, 23, torch.float32, seed=36, scale=4.0)
    t = t + 3e37  # a huge common offset on the teacher: tanh maps it to +cap, uniform teacher
    check_against_naive(torch.float32, hid, W, b, t, 1e-5, softcap=(None, 15.0),
                        temperature=1e-3, chunk_size=7)
    hid, W, b, t = make(7, 6, 23, torch.float32, seed=37, scale=4.0)
    check_against_naive(torch.float32, hid, W, b, t, 1e-5, softcap=15.0, temperature=1e3)


@pytest.mark.parametrize("space", ["logits", "log_probs"])
def test_vocab_size_mismatched_widths(space):
    # the student's layer has 47 rows (padded), the teacher 43 columns; they share 40
    hid, W, b, t = make(15, 8, 47, F64, seed=38)
    t = torch.randn(15, 43, generator=torch.Generator().manual_seed(39), dtype=F64) * 2
    if space == "log_probs":
        t = torch.log_softmax(t, -1)  # mass beyond 40: renormalised on the kept columns
    for kind in ("forward", "reverse", "js"):
        loss, (gh, gW, gb) = check_against_naive(F64, hid, W, b, t, 1e-9, divergence=kind,
                                                 vocab_size=40, target_space=space,
                                                 chunk_size=4, softcap=6.0)
        assert bool((gW[40:] == 0).all()) and bool((gb[40:] == 0).all())


def test_vocab_size_is_not_zero_padding():
    # Qwen-style: teacher 11 columns, student 13; the padded-zero-logit mistake gives the two
    # padding columns real mass (e^0 each): a different, wrong number
    hid, W, b, _ = make(6, 5, 13, F64, seed=40)
    t = torch.randn(6, 11, generator=torch.Generator().manual_seed(41), dtype=F64) * 3 - 4
    loss = linear_kl_div(hid, W[:11], t, bias=b[:11])  # the truth: the shared vocabulary
    cut = linear_kl_div(hid, W, t, bias=b, vocab_size=11)
    assert_close(cut, loss, 1e-12, "vocab_size")
    padded = torch.cat([t, torch.zeros(6, 2, dtype=F64)], -1)
    mistake = linear_kl_div(hid, W, padded, bias=b)
    assert abs(float(mistake) - float(loss)) > 1e-2
    with pytest.raises(ValueError, match="vocab_size"):
        linear_kl_div(hid, W, t, bias=b)  # widths differ, no vocab_size: refused, named


def test_vocab_size_with_topk_and_float32_weight_rows():
    hid, W, b, _ = make(12, 6, 30, torch.float32, seed=42)
    idx, lp = topk_teacher(12, 25, 5, seed=43)  # indices below 25
    h1, W1, b1 = leaves(torch.float32, hid, W, b)
    loss = linear_kl_div(h1, W1, (idx, lp), bias=b1, vocab_size=25, softcap=(None, 4.0),
                         chunk_size=5)
    h2, W2, b2 = leaves(F64, hid.to(F64), W.to(F64), b.to(F64))
    z = 4.0 * torch.tanh((h2 @ W2[:25].T + b2[:25]) / 4.0)
    lq = torch.log_softmax(z, -1)
    p = lp.to(F64).exp()
    qk = torch.gather(lq, -1, idx).exp()
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = 1 - qk.sum(-1)
    rows = (p * (p.log() - qk.log())).sum(-1) + torch.where(
        p_rest > 0, p_rest * (p_rest.log() - q_rest.log()), torch.zeros_like(p_rest))
    ref = rows.mean()
    assert_close(loss, ref, 1e-5, "loss")
    got, want = grads_of(loss, [h1, W1, b1]), grads_of(ref, [h2, W2, b2])
    for name, g, r in zip("hWb", got, want):
        assert row_rel(g if g.dim() == 2 else g[None], r if r.dim() == 2 else r[None]) <= 1e-5
    assert bool((got[1][25:] == 0).all())
    with pytest.raises(ValueError, match=r"in \[0, 20\)"):
        linear_kl_div(hid, W, (idx, lp), vocab_size=20)


def test_ignore_index_with_softcap_and_vocab_size():
    hid, W, b, t = make(16, 6, 21, F64, seed=44)
    labels = torch.arange(16) % 5
    labels[::3] = -100
    keep = labels != -100
    h1, W1, b1 = leaves(F64, hid, W, b)
    t2 = t * 3
    t2[~keep] = math.nan  # skipped rows are never read
    loss = linear_kl_div(h1, W1, t2[:, :19], bias=b1, labels=labels, vocab_size=19,
                         softcap=5.0, chunk_size=4)
    h2, W2, b2 = leaves(F64, hid, W, b)
    ref = naive_cap("forward", h2, W2, b2, (t * 3)[:, :19], cap=(5.0, 5.0), vocab=19, keep=keep)
    assert_close(loss, ref, 1e-9, "loss")
    for name, g, r in zip("hWb", grads_of(loss, [h1, W1, b1]), grads_of(ref, [h2, W2, b2])):
        assert_close(g, r, 1e-9, name)


def test_option_errors_name_the_argument():
    hid, W, b, t = make(6, 4, 5, F64, seed=45)
    for bad, exc in ((0.0, ValueError), (math.inf, ValueError), (math.nan, ValueError),
                     ("3", TypeError), (True, TypeError), ((1.0, 2.0, 3.0), ValueError)):
        for name in ("softcap", "logit_scale"):
            with pytest.raises(exc, match=name):
                linear_kl_div(hid, W, t, **{name: bad})
    with pytest.raises(ValueError, match="softcap: must be positive"):
        linear_kl_div(hid, W, t, softcap=-1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        linear_kl_div(hid, W, t, vocab_size=6)
    with pytest.raises(ValueError, match="vocab_size"):
        linear_kl_div(hid, W, t, vocab_size=0)
    with pytest.raises(TypeError, match="vocab_size"):
        linear_kl_div(hid, W, t, vocab_size=4.0)
    with pytest.raises(ValueError, match="vocab_size"):  # more than the teacher's columns
        linear_kl_div(hid, torch.cat([W, W]), t, vocab_size=7)
