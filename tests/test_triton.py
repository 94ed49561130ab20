"""The Triton kernels (kldiv.backends.triton_kernels) in Triton's interpreter, on CPU tensors.

TRITON_INTERPRET=1 runs the kernels' Python on NumPy, about 0.15 s per row and call, so the
sizes are small (a handful of rows, V up to ~1100 to cover the block loop). References are
independent: torch.autograd on the float64 textbook formula for values and gradients of
ordinary rows, and the core in float64 for edge rows (-inf, escapes, huge offsets).
"""
import math
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is decorated (decorated lazily)
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import kldiv  # noqa: E402
from kldiv.backends import triton_kernels as tk  # noqa: E402

if not tk.cpu_ready():  # triton imported before TRITON_INTERPRET was set: no interpreter
    pytest.skip("Triton's interpreter is not active in this process (TRITON_INTERPRET=1 must "
                "be set before triton is imported)", allow_module_level=True)

FNS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "jeffreys": kldiv.jeffreys_div,
       "js": kldiv.js_div}
L = dict(p_space="logits", q_space="logits")


def _naive64(x, y, T, kind):
    """Rows of the textbook formula in float64 (differentiable)."""
    lp = torch.log_softmax(x / T, -1)
    lq = torch.log_softmax(y / T, -1)
    if kind == "js":  # beta = 1/2
        lm = torch.logsumexp(torch.stack([lp, lq]), 0) - math.log(2)
        return 0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)
    f = (lp.exp() * (lp - lq)).sum(-1)
    r = (lq.exp() * (lq - lp)).sum(-1)
    return {"forward": f, "reverse": r, "jeffreys": f + r}[kind]


def _rows_and_grads(x, y, T, kind, scale=None, ones=False):
    xa = x.detach().clone().requires_grad_(True)
    ya = y.detach().clone().requires_grad_(True)
    n = x.shape[0]
    s = torch.ones(n, dtype=torch.float64) if scale is None else scale
    rows = tk.kl_rows(xa, ya, s, T, kind)
    # distinct per-row upstream gradients (or ones: a "sum" reduction's)
    g = torch.ones(n, dtype=torch.float64) if ones else torch.arange(1, n + 1, dtype=torch.float64)
    (rows * g).sum().backward()
    return rows.detach(), xa.grad, ya.grad, g


def _ref(x, y, T, kind, g, scale=None):
    x64 = x.detach().double().requires_grad_(True)
    y64 = y.detach().double().requires_grad_(True)
    rows = _naive64(x64, y64, T, kind)
    if scale is not None:
        rows = rows * scale
    (rows * g).sum().backward()
    # values: the float64 core (the float64 textbook formula itself cancels near KL = 1e-10)
    val = FNS[kind](x.detach().double(), y.detach().double(), temperature=T, **L)
    if scale is not None:
        val = val * scale
    return val, x64.grad, y64.grad


def _rowerr(a, b):
    a = a.double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-300)).max().item()


def _near(V, levels, seed=0, scale=3.0):
    """Rows whose KL is about each level: q's logits = p's plus noise of size sqrt(2 KL)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(levels), V, generator=gen) * scale
    e = torch.randn(len(levels), V, generator=gen)
    y = x + e * torch.tensor([math.sqrt(2 * k) for k in levels])[:, None]
    return x, y


def test_op_registered_at_import():
    # a first call inside torch.compile must find the op: Dynamo cannot trace its registration
    assert tk._OP is not None and hasattr(torch.ops.kldiv, "triton_kl_rows")


@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys"])
def test_values_and_gradients_float32_all_kl_levels(kind):
    # KL from 1e-2 down to 1e-9, odd V, temperature != 1
    x, y = _near(37, [1e-2, 1e-5, 1e-7, 1e-9], seed=1)
    T = 0.7
    rows, gx, gy, g = _rows_and_grads(x, y, T, kind)
    r64, gx64, gy64 = _ref(x, y, T, kind, g)
    assert torch.allclose(rows, r64, rtol=1e-6, atol=0)
    assert _rowerr(gx, gx64) < 1e-5
    assert _rowerr(gy, gy64) < 1e-5


def test_block_loop_large_odd_V():
    # V = 2 * 1024 + 77: three blocks of the interpreter's block size, the last one partial
    x, y = _near(2125, [1e-3, 1e-8], seed=2)
    rows, gx, gy, g = _rows_and_grads(x, y, 1.0, "forward")
    r64, gx64, gy64 = _ref(x, y, 1.0, "forward", g)
    assert torch.allclose(rows, r64, rtol=1e-6, atol=0)
    assert _rowerr(gx, gx64) < 1e-5 and _rowerr(gy, gy64) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    x, y = _near(53, [1e-2, 1e-4, 1e-6], seed=3, scale=2.0)
    x, y = x.to(dtype), y.to(dtype)  # the reference sees the same rounded inputs
    # upstream gradient 1 (a sum or a mean: the row scale is applied before the rounding; a
    # per-row upstream gradient multiplies the rounded gradient once more)
    rows, gx, gy, g = _rows_and_grads(x, y, 1.0, "forward", ones=True)
    assert gx.dtype == dtype and gy.dtype == dtype
    r64, gx64, gy64 = _ref(x, y, 1.0, "forward", g)
    ok = r64 > 0
    assert torch.allclose(rows[ok], r64[ok], rtol=2e-6, atol=1e-12)
    # only the rounding of the written gradient to the input dtype remains (float16's
    # subnormals included): at most twice the error of the float64 gradient rounded to it
    # (Triton's interpreter truncates float32 -> bfloat16/float16; the GPU rounds to nearest)
    for got, ref in ((gx, gx64), (gy, gy64)):
        best = _rowerr(ref.to(dtype), ref)
        assert _rowerr(got, ref) <= 2 * best + torch.finfo(dtype).eps / 4


def test_edge_rows_against_float64_core():
    inf = math.inf
    f32 = torch.finfo(torch.float32)
    x = torch.tensor([
        [0.0, 1.0, -inf, 2.0, 0.5],  # -inf in p: q's mass off p's support
        [0.0, 1.0, 2.0, 3.0, 4.0],  # -inf in q where p > 0: +inf, zero gradient
        [-1e30, -1e30, -1e30, -1e30, -1e30],  # masked-style constant row: uniform p
        [1e30, 1e30, -1e30, 0.0, 1e30],  # huge offset on p's side
        [f32.min, 0.0, 1.0, f32.min, 2.0],  # finfo.min masking
        [1.0, 2.0, 3.0, 4.0, 5.0],  # identical rows: exactly 0
    ])
    y = torch.tensor([
        [0.3, 1.0, 0.0, 2.0, -inf],
        [0.0, 1.0, -inf, 3.0, 4.0],
        [0.0, 1.0, 2.0, 3.0, 4.0],
        [0.0, 5.0, 10.0, 1.0, 2.0],
        [0.0, 1.0, 1.5, 3.0, 2.0],
        [1.0, 2.0, 3.0, 4.0, 5.0],
    ])
    # row 0: p has support on entry 4 where q is -inf: +inf as well (escape)
    rows, gx, gy, g = _rows_and_grads(x, y, 1.0, "forward")
    ref = kldiv.kl_div(x.double(), y.double(), **L)
    assert torch.isinf(rows[0]) and torch.isinf(rows[1])
    assert torch.isinf(ref[0]) and torch.isinf(ref[1])
    for r in (0, 1):
        assert (gx[r] == 0).all() and (gy[r] == 0).all()
    assert torch.allclose(rows[2:], ref[2:], rtol=1e-6, atol=0)
    assert rows[5] == 0
    # gradients of the finite rows against the float64 core's autograd
    with kldiv.torch.fused(False):
        x64 = x.double().requires_grad_(True)
        y64 = y.double().requires_grad_(True)
        r64 = kldiv.kl_div(x64, y64, **L)
        (torch.where(torch.isfinite(r64), r64, 0) * g).sum().backward()
    assert _rowerr(gx[2:], x64.grad[2:]) < 1e-5
    assert _rowerr(gy[2:5], y64.grad[2:5]) < 1e-5
    assert (gy[5] == 0).all() and (gx[5] == 0).all()


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_js_values_and_gradients(beta):
    """JS (beta) against the float64 core: KL-levels rows and edge rows (q's or p's zeros,
    a 1e30 offset, disjoint supports: log 2 at beta = 1/2 with zero gradient)."""
    inf = math.inf
    x, y = _near(13, [1e-2, 1e-6, 1e-9], seed=4)
    x = torch.cat([x[:, :5], torch.tensor([
        [0.0, 1, -inf, 2, 0.5], [0.0, 1, 2, 3, 4], [1e30, 1e30, -1e30, 0, 1e30],
        [0, -inf, -inf, -inf, -inf]])])
    y = torch.cat([y[:, :5], torch.tensor([
        [0.3, 1, 0, 2, -inf], [0.0, 1, -inf, 3, 4], [0.0, 5, 10, 1, 2],
        [-inf, 0, 1, 2, 3]])])
    T = 0.7
    xa = x.clone().requires_grad_(True)
    ya = y.clone().requires_grad_(True)
    rows = tk.kl_rows(xa, ya, torch.ones(7, dtype=torch.float64), T, "js", beta)
    g = torch.arange(1, 8, dtype=torch.float64)
    (rows * g).sum().backward()
    x64 = x.double().requires_grad_(True)
    y64 = y.double().requires_grad_(True)
    with kldiv.torch.fused(False):
        ref = kldiv.js_div(x64, y64, beta=beta, temperature=T, **L)
    (ref * g).sum().backward()
    assert torch.allclose(rows, ref.detach(), rtol=1e-6, atol=0)
    for got, want in ((xa.grad, x64.grad), (ya.grad, y64.grad)):
        # rows whose exact gradient is 0 (q proportional to p on q's support, disjoint
        # supports): the float64 core leaves ~1e-18 there, the kernel float32 rounding (below
        # 1e-5 of the other rows' gradients, ~1e-2)
        scale = want.norm(dim=-1, keepdim=True)
        zero_rows = (scale < 1e-12)[:, 0]
        assert (got[zero_rows].abs() < 1e-7).all()
        assert _rowerr(got[~zero_rows], want[~zero_rows]) < 1e-5


@pytest.mark.parametrize("flip", [False, True])
def test_jeffreys_infinite_row_has_zero_gradient(flip):
    """One direction +inf (either one): the row is +inf and its gradient 0 (the core's)."""
    inf = math.inf
    x = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([[0.0, -inf, 1.0], [0.5, 1.0, 1.5]])
    if flip:
        x, y = y, x
    rows, gx, gy, g = _rows_and_grads(x, y, 1.0, "jeffreys")
    assert torch.isinf(rows[0]) and (gx[0] == 0).all() and (gy[0] == 0).all()
    r64, gx64, gy64 = _ref(x[1:], y[1:], 1.0, "jeffreys", g[1:])
    assert torch.allclose(rows[1:], r64, rtol=1e-6)
    assert _rowerr(gx[1:], gx64) < 1e-5 and _rowerr(gy[1:], gy64) < 1e-5


def test_rows_without_a_distribution_are_nan():
    # no support, or a nan entry: nan (never a made-up finite number; the hook's value checks
    # send such rows to the core, which names the problem). A span beyond float32 is no such
    # row: the wide pass computes it (tests/test_triton_masks.py)
    inf = math.inf
    x = torch.tensor([[-inf, -inf, -inf], [0.0, math.nan, 1.0], [3e38, -3e38, 0.0]])
    y = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.99, 0.42, 0.0]])
    rows = tk.kl_rows(x, y, torch.ones(3, dtype=torch.float64))
    assert torch.isnan(rows[:2]).all() and not torch.isnan(rows[2])


def test_masked_rows_scale_zero_whatever_they_hold():
    x = torch.tensor([[0.0, 1.0, 2.0], [math.nan, -math.inf, math.inf]])
    y = torch.tensor([[1.0, 0.0, 2.0], [math.inf, math.nan, 0.0]])
    s = torch.tensor([0.5, 0.0], dtype=torch.float64)
    rows, gx, gy, g = _rows_and_grads(x, y, 1.0, "forward", scale=s)
    assert rows[1] == 0 and (gx[1] == 0).all() and (gy[1] == 0).all()
    r64, gx64, gy64 = _ref(x[:1], y[:1], 1.0, "forward", g[:1], scale=s[:1])
    assert torch.allclose(rows[:1], r64, rtol=1e-6)
    assert _rowerr(gx[:1], gx64) < 1e-5 and _rowerr(gy[:1], gy64) < 1e-5


def test_retain_graph_second_backward():
    """backward twice (retain_graph): the same gradients each time."""
    x, y = _near(6, [1e-2, 1e-5], seed=6)
    xa = x.clone().requires_grad_(True)
    ya = y.clone().requires_grad_(True)
    rows = tk.kl_rows(xa, ya, torch.ones(2, dtype=torch.float64), 1.0, "forward")
    loss = (rows * torch.tensor([2.0, 3.0], dtype=torch.float64)).sum()
    loss.backward(retain_graph=True)
    g1 = (xa.grad.clone(), ya.grad.clone())
    loss.backward()
    assert torch.equal(xa.grad, 2 * g1[0]) and torch.equal(ya.grad, 2 * g1[1])


def test_second_derivatives_create_graph():
    x, y = _near(7, [1e-2, 1e-4], seed=5)
    xa = x.clone().requires_grad_(True)
    ya = y.clone().requires_grad_(True)
    rows = tk.kl_rows(xa, ya, torch.ones(2, dtype=torch.float64), 1.0, "forward")
    (gy,) = torch.autograd.grad(rows.sum(), ya, create_graph=True)
    v = torch.linspace(-1, 1, 7).expand(2, 7)
    (hv,) = torch.autograd.grad((gy * v).sum(), ya)
    y64 = y.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(_naive64(x.double(), y64, 1.0, "forward").sum(), y64,
                                 create_graph=True)
    (hv64,) = torch.autograd.grad((g64 * v.double()).sum(), y64)
    assert _rowerr(hv, hv64) < 1e-5


def test_public_functions_take_the_triton_path(monkeypatch):
    """KLDIV_BACKEND=triton with TRITON_INTERPRET=1 sends CPU tensors here (read per call)."""
    calls = []
    real = tk.kl_rows

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tk, "kl_rows", counting)
    monkeypatch.setenv("KLDIV_BACKEND", "triton")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 9, generator=gen)
    y = torch.randn(3, 2, 9, generator=gen)
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    w = torch.tensor([[1.0, 2.0], [0.5, 1.0], [3.0, 1.0]])
    for kind, fn in FNS.items():
        xa = x.clone().requires_grad_(True)
        ya = y.clone().requires_grad_(True)
        before = len(calls)
        v = fn(xa, ya, mask=mask, weight=w, reduction="mean", temperature=2.0, **L)
        assert len(calls) == before + 1, kind
        v.backward()
        x64 = x.double().requires_grad_(True)
        y64 = y.double().requires_grad_(True)
        rows = _naive64(x64, y64, 2.0, kind) * (w.double() * mask)
        ref = rows.sum() / (w.double() * mask).sum()
        ref.backward()
        with monkeypatch.context() as m:
            m.setenv("KLDIV_BACKEND", "torch")
            ref = fn(x.double(), y.double(), mask=mask, weight=w, reduction="mean",
                     temperature=2.0, **L)
        assert v.dtype == torch.float32
        assert abs(v.item() - ref.item()) <= 1e-6 * ref.item()
        assert _rowerr(xa.grad.reshape(6, 9), x64.grad.reshape(6, 9)) < 1e-5
        assert _rowerr(ya.grad.reshape(6, 9), y64.grad.reshape(6, 9)) < 1e-5
    # a row with no support goes to the core, which raises its error naming p
    bad = x.clone()
    bad[0, 0] = -math.inf
    with pytest.raises(ValueError, match="p"):
        kldiv.kl_div(bad, y, **L)
    # log-probabilities: bfloat16 values against the float64 core; unnormalised ones go to the
    # core, whose error names p
    lp = torch.log_softmax(x[:, 0], -1).to(torch.bfloat16)
    lq = torch.log_softmax(y[:, 0], -1).to(torch.bfloat16)
    before = len(calls)
    v = kldiv.kl_div(lp, lq, p_space="log_probs", q_space="log_probs")
    assert len(calls) == before + 1 and v.dtype == torch.float32
    ref = kldiv.kl_div(lp.double(), lq.double(), **L)  # the same rounded inputs, renormalised
    assert torch.allclose(v.double(), ref, rtol=2e-6, atol=0)
    with pytest.raises(ValueError, match="p: log-probabilities"):
        kldiv.kl_div(lp.float() + 0.1, lq.float(), p_space="log_probs", q_space="log_probs")
    # "torch" (or "auto" on CPU) never takes this path
    monkeypatch.setenv("KLDIV_BACKEND", "torch")
    before = len(calls)
    kldiv.kl_div(x, y, **L)
    assert len(calls) == before
    assert not tk.wanted(x, y)


def test_torch_compile_fullgraph():
    """The op traces (fake implementation, autograd formula) without graph breaks."""
    x, y = _near(11, [1e-3, 1e-6], seed=9)

    def f(a, b):
        return tk.kl_rows(a, b, torch.ones(2, dtype=torch.float64), 1.0, "forward").sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xa = x.clone().requires_grad_(True)
    ya = y.clone().requires_grad_(True)
    v = cf(xa, ya)
    v.backward()
    x64 = x.double().requires_grad_(True)
    y64 = y.double().requires_grad_(True)
    _naive64(x64, y64, 1.0, "forward").sum().backward()
    r = kldiv.kl_div(x.double(), y.double(), reduction="sum", **L)
    assert abs(v.item() - r.item()) <= 1e-6 * r.item()
    assert _rowerr(xa.grad, x64.grad) < 1e-5 and _rowerr(ya.grad, y64.grad) < 1e-5


def test_torch_compile_fullgraph_through_kl_div(monkeypatch):
    """kldiv.kl_div under torch.compile(fullgraph=True) traces the Triton op (CPU, interpreter)."""
    monkeypatch.setenv("KLDIV_BACKEND", "triton")
    x, y = _near(9, [1e-3, 1e-6], seed=11)
    kldiv.kl_div(x, y, **L)  # the torch backend module is loaded eagerly, once
    seen = []
    real = tk.kl_rows

    def tracing(*a, **k):
        seen.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tk, "kl_rows", tracing)

    def f(a, b):
        return kldiv.kl_div(a, b, reduction="mean", **L)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xa = x.clone().requires_grad_(True)
    ya = y.clone().requires_grad_(True)
    v = cf(xa, ya)
    v.backward()
    assert seen  # traced through the Triton path
    x64 = x.double().requires_grad_(True)
    y64 = y.double().requires_grad_(True)
    (_naive64(x64, y64, 1.0, "forward").mean()).backward()
    r = kldiv.kl_div(x.double(), y.double(), reduction="mean", **L)
    assert abs(v.item() - r.item()) <= 1e-6 * r.item()
    assert _rowerr(ya.grad, y64.grad) < 1e-5 and _rowerr(xa.grad, x64.grad) < 1e-5


# ----------------------------------------------------------------------------------------------
# one pass for the statistics (online maxima), probabilities, linear_kl_div through the kernel


def _core_rows_grads(x, y, T, kind, g, xs="logits", ys="logits"):
    """The float64 core's rows and (autograd) gradients with respect to y: the reference."""
    y64 = y.detach().double().requires_grad_(True)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("KLDIV_BACKEND", "torch")
        rows = FNS[kind](x.detach().double(), y64, p_space=xs, q_space=ys, temperature=T)
        (rows * g).sum().backward()
    return rows.detach(), y64.grad


def test_online_maxima_long_rows_adversarial():
    # V = 2 * 1024 + 77 (three interpreter blocks, the last partial); each row raises its
    # maxima in a later block than the first, where the earlier sums must be rescaled and the
    # log-ratio's offset shifted exactly
    V, B = 2125, 1024
    gen = torch.Generator().manual_seed(11)
    f32 = torch.finfo(torch.float32)
    x = torch.randn(5, V, generator=gen) * 2
    y = x + torch.randn(5, V, generator=gen) * 1e-3  # KL ~ 5e-7
    x[0, :B] = -1e30  # masked first block on p's side, finfo.min on q's: nothing is swallowed
    y[0, :B] = f32.min
    x[1] = x[1] + torch.linspace(0, 40, V)  # the maximum moves in every block
    y[1] = y[1] + torch.linspace(0, 40, V)
    x[2, 2 * B:] += 3e37  # a huge offset of p's side in the last block only (p lives there)
    x[3, :B] = -math.inf  # -inf in p's first block: q's mass off p's support
    y[4, 2 * B + 5] = y[4].max() + 60.0  # q's maximum jumps late, far above (KL ~ 60)
    g = torch.arange(1, 6, dtype=torch.float64)
    ya = y.clone().requires_grad_(True)
    rows = tk.kl_rows(x, ya, torch.ones(5, dtype=torch.float64))
    (rows * g).sum().backward()
    ref, gref = _core_rows_grads(x, y, 1.0, "forward", g)
    assert torch.allclose(rows, ref, rtol=1e-6, atol=0), (rows, ref)
    assert _rowerr(ya.grad, gref) < 1e-5


@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
def test_probability_teacher_through_the_kernel(kind, monkeypatch):
    # teacher probabilities (zeros included) against student logits, KL from 1e-2 to 1e-9,
    # a temperature, V odd; the logarithm of each probability is taken in float64 (hi + lo)
    monkeypatch.setenv("KLDIV_BACKEND", "triton")
    calls = []
    real = tk.kl_rows
    monkeypatch.setattr(tk, "kl_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = _near(37, [1e-2, 1e-5, 1e-7, 1e-9], seed=12)
    p = torch.softmax(x.double(), -1)
    p[0, ::7] = 0.0
    p = (p / p.sum(-1, keepdim=True)).float()
    ya = y.clone().requires_grad_(True)
    g = torch.arange(1, 5, dtype=torch.float64)
    v = FNS[kind](p, ya, p_space="probs", q_space="logits", temperature=0.8)
    assert len(calls) == 1
    (v * g).sum().backward()
    ref, gref = _core_rows_grads(p, y, 0.8, kind, g, xs="probs")
    fin = torch.isfinite(ref)
    assert bool((torch.isinf(v) == torch.isinf(ref)).all())
    assert torch.allclose(v.double()[fin], ref[fin], rtol=1e-6, atol=0)
    assert _rowerr(ya.grad[fin], gref[fin]) < 1e-5
    # V = 1: every divergence is 0, gradient 0
    one = FNS[kind](torch.ones(3, 1), torch.randn(3, 1), p_space="probs", q_space="logits")
    assert bool((one == 0).all())
    # unnormalised or negative probabilities go to the core, whose error names p
    with pytest.raises(ValueError, match="p"):
        FNS[kind](p * 1.5, y, p_space="probs", q_space="logits")
    # a gradient with respect to the probabilities: the kernel too (see below)
    before = len(calls)
    FNS[kind](p.clone().requires_grad_(True), y, p_space="probs", q_space="logits")
    assert len(calls) == before + 1


def _both_grads(kind, p, q, p_space, q_space, T, g, backend, **kw):
    """Value and gradients with respect to both inputs: through the kernel ("triton", the
    inputs as they are) or the float64 core itself ("core": no fast path, torch.autograd through
    the core's formula on the same inputs in float64, renormalised as the core does:
    validate=False so that half-precision rounding of a probability row's sum is no error)."""
    from kldiv._core import dispatch

    f64 = backend == "core"
    pa = (p.double() if f64 else p.clone()).requires_grad_(True)
    qa = (q.double() if f64 else q.clone()).requires_grad_(True)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("KLDIV_BACKEND", "torch" if f64 else backend)
        if f64:
            m.setattr(dispatch, "_HANDLERS", {})  # no hook: the core computes
            kw = dict(kw, validate=False)
        v = FNS[kind](pa, qa, p_space=p_space, q_space=q_space, temperature=T, **kw)
        (v * g).sum().backward()
    return v.detach(), pa.grad, qa.grad


def _probs(logits, zeros=(), tiny=(), dtype=torch.float32):
    """Rows of probabilities (float64 softmax, entries set to 0 or to a tiny value, rounded)."""
    P = torch.softmax(logits.double(), -1)
    for r, sl in zeros:
        P[r, sl] = 0.0
    for r, i, v in tiny:
        P[r, i] = v
    return (P / P.sum(-1, keepdim=True)).to(dtype)


def _count_kernel_calls(monkeypatch):
    calls = []
    real = tk.kl_rows
    monkeypatch.setattr(tk, "kl_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("kind", ["forward", "reverse", "jeffreys", "js"])
def test_gradients_with_respect_to_probabilities(kind, monkeypatch):
    """Probabilities that require grad, on either side or both, through the kernel (one
    launch per direction): the gradient with respect to the probabilities is the core's (the
    one of the renormalised distribution, 0 at a zero probability), KL from 1e-2 to 1e-9, zeros
    on both sides (an escaped row: +inf, zero gradients), T = 1 and T != 1, V odd."""
    calls = _count_kernel_calls(monkeypatch)
    x, y = _near(37, [1e-2, 1e-5, 1e-7, 1e-9], seed=21)
    P = _probs(x, zeros=[(0, slice(None, None, 7))])
    Q = _probs(y, zeros=[(1, slice(None, None, 5)), (0, slice(3, 4))])
    g = torch.arange(1, 5, dtype=torch.float64)
    mixed = ("probs", "logits", P, y) if kind in ("forward", "js") else ("logits", "probs", x, Q)
    for ps, qs, p, q, T in (("probs", "probs", P, Q, 1.0), mixed + (0.8,)):
        before = len(calls)
        v, gp, gq = _both_grads(kind, p, q, ps, qs, T, g, "triton")
        assert len(calls) == before + 1, (ps, qs)
        r, gp64, gq64 = _both_grads(kind, p, q, ps, qs, T, g, "core")
        fin = torch.isfinite(r)
        assert bool((torch.isinf(v) == torch.isinf(r)).all()) and v.dtype == torch.float32
        assert torch.allclose(v.double()[fin], r[fin], rtol=1e-6, atol=0), (ps, qs, T)
        assert _rowerr(gp[fin], gp64[fin]) < 1e-5, (ps, qs, T)
        assert _rowerr(gq[fin], gq64[fin]) < 1e-5, (ps, qs, T)
        # +inf rows: the core's zero gradients
        assert bool((gp[~fin] == gp64[~fin]).all()) and bool((gq[~fin] == gq64[~fin]).all())
        if ps == "probs":  # the core's convention at a zero probability: gradient 0
            assert bool((gp[P == 0] == 0).all())


def _naive_probs64(kind, Pr, Qr, T):
    """Rows of KL(p || q) ("forward") or JS (beta 1/2) of p = r^(1/T) renormalised (q alike),
    the textbook float64 formula (differentiable; 0 log 0 = 0, zero gradient at r_i = 0)."""
    def dist(r):
        pos = r > 0
        w = torch.where(pos, torch.where(pos, r, torch.ones_like(r)) ** (1.0 / T), 0.0)
        return w / w.sum(-1, keepdim=True), pos

    def xlogy(a, pos, b):
        return torch.where(pos, a * torch.log(torch.where(pos, a / b, torch.ones_like(a))), 0.0)

    p, pp = dist(Pr)
    q, qp = dist(Qr)
    if kind == "forward":
        return xlogy(p, pp, q).sum(-1)
    m = 0.5 * (p + q)
    return 0.5 * xlogy(p, pp, m).sum(-1) + 0.5 * xlogy(q, qp, m).sum(-1)


def test_probability_gradients_long_rows_mask_weight(monkeypatch):
    """V = 1100 (two interpreter blocks, the second partial), a masked row, weights, a mean;
    probabilities of 1e-40 and 1e-30 (below float32's exponential: the gradient with respect to
    them is formed from their float64 logarithm, not from an underflowed p_i / r_i), T = 1.3.
    Gradients against the float64 textbook formula (the float64 core's JS gradient at a 1e-40
    probability is off there: by beta at that entry), values against the float64 core."""
    calls = _count_kernel_calls(monkeypatch)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(3, 1100, generator=gen) * 2
    y = x + torch.randn(3, 1100, generator=gen) * torch.tensor([0.1, 0.003, 0.01])[:, None]
    P = _probs(x, zeros=[(0, slice(None, None, 7)), (2, slice(1030, None))],
               tiny=[(1, 3, 1e-40), (1, 1050, 1e-30)])
    Q = _probs(y, zeros=[(2, slice(None, None, 9))], tiny=[(0, 5, 1e-38)])
    mask = torch.tensor([True, True, False])  # row 2 (escaped) masked: 0, zero gradients
    w = torch.tensor([1.0, 2.5, 3.0])
    one = torch.tensor(1.0, dtype=torch.float64)
    sc = (w.double() * mask) / (w.double() * mask).sum()
    for kind, T in (("forward", 1.3), ("js", 1.0)):
        before = len(calls)
        v, gp, gq = _both_grads(kind, P, Q, "probs", "probs", T, one, "triton", mask=mask,
                                weight=w, reduction="mean")
        assert len(calls) == before + 1
        r, _, _ = _both_grads(kind, P, Q, "probs", "probs", T, one, "core", mask=mask,
                              weight=w, reduction="mean")
        assert abs(float(v) / float(r) - 1) <= 1e-6, kind
        P64 = P.double().requires_grad_(True)
        Q64 = Q.double().requires_grad_(True)
        rows = _naive_probs64(kind, P64, Q64, T)
        (torch.where(mask, rows, 0.0) * sc).sum().backward()
        assert _rowerr(gp[:2], P64.grad[:2]) < 1e-5 and _rowerr(gq[:2], Q64.grad[:2]) < 1e-5
        assert bool((gp[2] == 0).all()) and bool((gq[2] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probability_gradients_half_precision(dtype, monkeypatch):
    """Half-precision probabilities (their row sums off 1 by the rounding: renormalised, as the
    core does): values against the float64 core on the same rounded inputs, gradients written
    in the input dtype within twice the rounding of the float64 gradient to it (the
    interpreter truncates where the GPU rounds to nearest)."""
    calls = _count_kernel_calls(monkeypatch)
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(3, 53, generator=gen) * 2
    y = x + torch.randn(3, 53, generator=gen) * torch.tensor([0.1, 0.01, 0.001])[:, None]
    P = _probs(x, zeros=[(0, slice(None, None, 7))], dtype=dtype)
    Q = _probs(y, dtype=dtype)
    one = torch.tensor(1.0, dtype=torch.float64)
    for kind in ("forward", "js"):
        v, gp, gq = _both_grads(kind, P, Q, "probs", "probs", 1.0, one, "triton",
                                reduction="sum")
        r, gp64, gq64 = _both_grads(kind, P, Q, "probs", "probs", 1.0, one, "core",
                                    reduction="sum")
        assert gp.dtype == dtype and gq.dtype == dtype
        assert abs(float(v) / float(r) - 1) <= 2e-6
        for got, ref in ((gp, gp64), (gq, gq64)):
            best = _rowerr(ref.to(dtype), ref)
            assert _rowerr(got, ref) <= 2 * best + torch.finfo(dtype).eps / 4, kind
    assert len(calls) == 2


def test_probability_gradients_against_huge_logit_offsets(monkeypatch):
    """Student probabilities that require grad against teacher logits shifted by 1e30 and
    -3e37 (the exact log-ratio's offset cancels in float64 too) and a -inf logit meeting a zero
    probability, against the float64 core."""
    calls = _count_kernel_calls(monkeypatch)
    gen = torch.Generator().manual_seed(26)
    x = torch.randn(3, 23, generator=gen) * 2
    y = x + torch.randn(3, 23, generator=gen) * 0.01
    x[0] += 1e30
    x[1] -= 3e37
    x[2, 5] = -math.inf
    Q = _probs(y, zeros=[(2, slice(5, 6))])
    g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for kind in ("forward", "js"):
        v, gx, gq = _both_grads(kind, x, Q, "logits", "probs", 1.0, g, "triton")
        r, gx64, gq64 = _both_grads(kind, x, Q, "logits", "probs", 1.0, g, "core")
        assert torch.allclose(v.double(), r, rtol=1e-6, atol=0), kind
        assert _rowerr(gq, gq64) < 1e-5 and _rowerr(gx, gx64) < 1e-5, kind
    assert len(calls) == 2


def test_no_host_synchronisation_on_the_hot_path(monkeypatch):
    """With value checks off, no tensor is turned into a Python value between the call and the
    gradient (no .item(), no bool() of a device value, no data-dependent Python branch):
    probabilities with gradients, mask, weight and a mean, KL, JS and Jeffreys."""
    monkeypatch.setenv("KLDIV_BACKEND", "triton")
    calls = _count_kernel_calls(monkeypatch)
    gen = torch.Generator().manual_seed(24)
    x, y = torch.randn(3, 11, generator=gen), torch.randn(3, 11, generator=gen)
    P = torch.softmax(x, -1)
    mask = torch.tensor([True, False, True])
    w = torch.tensor([1.0, 2.0, 3.0])
    seen = []
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        real = getattr(torch.Tensor, name)

        def trap(self, *a, _real=real, _name=name, **k):
            seen.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, trap)
    Pa = P.clone().requires_grad_(True)
    ya = y.clone().requires_grad_(True)
    for fn in (kldiv.kl_div, kldiv.js_div, kldiv.jeffreys_div):
        fn(Pa, ya, q_space="logits", reduction="mean", mask=mask, weight=w,
           validate=False).backward()
    monkeypatch.undo()
    assert seen == [] and len(calls) == 3


def test_torch_compile_fullgraph_probability_gradients(monkeypatch):
    """torch.compile(fullgraph=True) through the op with a probabilities side that requires
    grad (the student's probabilities against the teacher's logits), gradients as the core's."""
    monkeypatch.setenv("KLDIV_BACKEND", "triton")
    calls = _count_kernel_calls(monkeypatch)
    x, y = _near(13, [1e-3, 1e-6], seed=25)
    x[0, 2] = -math.inf  # outside p's support: q's zero there is allowed (gradient 0)
    Q = _probs(y, zeros=[(0, slice(2, 3))])

    def f(a, b):
        return kldiv.kl_div(a, b, p_space="logits", q_space="probs", reduction="sum")

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    Qa = Q.clone().requires_grad_(True)
    v = cf(x, Qa)
    v.backward()
    assert calls  # traced through the Triton path
    one = torch.tensor(1.0, dtype=torch.float64)
    r, _, gq64 = _both_grads("forward", x, Q, "logits", "probs", 1.0, one, "core",
                             reduction="sum")
    assert abs(v.item() / r.item() - 1) <= 1e-6
    assert _rowerr(Qa.grad, gq64) < 1e-5 and bool((Qa.grad[0, 2] == 0).all())


def _linear_naive64(kind, hid, W, b, t, cap, T, beta=0.5):
    z = hid.double() @ W.double().T + b.double()
    z = cap * torch.tanh(z / cap)
    tt = torch.where(t == -math.inf, t.double(), cap * torch.tanh(t.double() / cap))
    lq = torch.log_softmax(z / T, -1)
    lp = torch.log_softmax(tt / T, -1)
    p, q = lp.exp(), lq.exp()
    if kind == "forward":
        rows = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
    elif kind == "reverse":
        rows = (q * (lq - lp)).sum(-1)
    else:
        lm = torch.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
        rows = (beta * torch.where(p > 0, p * (lp - lm), 0.0).sum(-1)
                + (1 - beta) * (q * (lq - lm)).sum(-1))
    return rows.mean()


@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
def test_linear_kl_div_through_the_kernel(kind, monkeypatch):
    """linear_kl_div's chunks through the kernel (its gradient written over the chunk's
    logits), with softcap and masked teacher entries, against autograd on the float64 naive
    formula (tanh's derivative there is 1 - tanh^2, exact enough at these |u| < 3)."""
    from kldiv.torch import linear_kl_div
    from kldiv.backends import torch_linear

    monkeypatch.setenv("KLDIV_BACKEND", "triton")
    assert torch_linear._rows_function_for(torch.device("cpu")) is tk.divergence_rows_with_grad
    gen = torch.Generator().manual_seed(13)
    hid = torch.randn(5, 6, generator=gen)
    W = torch.randn(37, 6, generator=gen)
    b = torch.randn(37, generator=gen) * 0.5
    t = torch.randn(5, 37, generator=gen) * 8
    if kind != "reverse":  # (the reverse KL is +inf where the teacher has a zero)
        t[:, ::4] = -math.inf
    h1, W1, b1 = (a.clone().requires_grad_(True) for a in (hid, W, b))
    loss = linear_kl_div(h1, W1, t, bias=b1, divergence=kind, softcap=12.0, temperature=0.7,
                         chunk_size=3, beta=0.3)
    h2, W2, b2 = (a.double().requires_grad_(True) for a in (hid, W, b))
    ref = _linear_naive64(kind, h2, W2, b2, t, 12.0, 0.7, beta=0.3)
    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
    got = torch.autograd.grad(loss, [h1, W1, b1])
    want = torch.autograd.grad(ref, [h2, W2, b2])
    assert _rowerr(got[0], want[0]) < 1e-5  # per token
    # per vocabulary entry (a weight row sums a few tokens' tiny entries: the JS kernel's
    # entries where log m/p is near its mean are float32-limited, ~4e-5 elementwise)
    assert _rowerr(got[1], want[1]) < (1e-5 if kind != "js" else 1e-4)
    assert _rowerr(got[2][None], want[2][None]) < 1e-5


@pytest.mark.parametrize("kind", ["reverse", "js"])
def test_online_series_long_rows_all_kl_levels(kind):
    # the series sum built in the same pass as the maxima, over three blocks whose maxima and
    # means differ (a trend along the row): values 1e-6, gradients 1e-5 per row, KL to 1e-9
    x, y = _near(2125, [1e-2, 1e-6, 1e-9], seed=14)
    trend = torch.linspace(-6, 6, 2125)
    x, y = x + trend, y + trend
    rows, gx, gy, g = _rows_and_grads(x, y, 1.3, kind)
    r64, gx64, gy64 = _ref(x, y, 1.3, kind, g)
    assert torch.allclose(rows, r64, rtol=1e-6, atol=0), (rows, r64)
    assert _rowerr(gx, gx64) < 1e-5 and _rowerr(gy, gy64) < 1e-5


_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kldiv.backends import triton_kernels as tk
tk._build()
common = {"S": "*fp64", "ROWS": "*fp64", "V": "i32", "sx": "i32", "sy": "i32", "sgx": "i32",
          "sgy": "i32", "inv_t": "fp32", "WANT_X": "constexpr", "WANT_Y": "constexpr",
          "BLOCK": "constexpr", "SINGLE": "constexpr", "XP": "constexpr", "YP": "constexpr",
          "FT": "constexpr", "DC": "constexpr", "WIDE": "constexpr"}
const = {"WANT_X": True, "WANT_Y": True, "BLOCK": 4096, "SINGLE": False,
         "FT": triton.language.float32, "DC": tk._D_CLAMP, "WIDE": False}
# the wide pass (float64, rows the float32 pass left nan): its own variants
wide = dict(const, BLOCK=1024, FT=triton.language.float64, DC=tk._D_WIDE, WIDE=True)
kl = dict(common, X="*fp32", Y="*bf16", PREV="*fp64", GX="*fp32", GY="*bf16", ACC="constexpr")
js = dict(common, X="*fp32", Y="*fp16", GX="*fp32", GY="*fp16", beta="fp32")
variants = {
    # KL: both sides probabilities with their gradients, accumulating (Jeffreys' second half)
    "kl": (tk._kl_rows_kernel, kl, dict(const, ACC=True, XP=True, YP=True)),
    # and logits (the float32 algebra: the gradients' reference at p's maximum)
    "kl_logits": (tk._kl_rows_kernel, kl, dict(const, ACC=False, XP=False, YP=False)),
    # JS: logits (the float32 algebra) and probabilities (the float64 one) on both sides (the
    # latter with q's gradient only: p's is the same code, and compiling it too costs ~25 s)
    "js": (tk._js_rows_kernel, js, dict(const, XP=False, YP=False)),
    "js_probs": (tk._js_rows_kernel, js, dict(const, XP=True, YP=True, WANT_X=False)),
    # the wide pass (its JS twin, "js_wide", shares its constexpr branches: ~45 s, not in CI)
    "kl_wide": (tk._kl_rows_kernel, kl, dict(wide, ACC=True, XP=False, YP=False)),
    "js_wide": (tk._js_rows_kernel, js, dict(wide, XP=False, YP=False)),
}
for name in sys.argv[1:]:
    fn, sig, c = variants[name]
    sig = {k: sig[k] for k in fn.arg_names}
    triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 8})
print("compiled")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check what the compiler does (a loop-carried variable
    that changes type, for one): compile the looping variants for sm_90 (Triton's bundled
    ptxas), logits and probabilities (with their gradients) on both sides, float32 and half
    precision, and the KL kernel's wide (float64) pass, in processes without TRITON_INTERPRET
    (two at once: the float64 JS variant takes the longest)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", _COMPILE] + names, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for names in (["kl", "kl_logits", "js"], ["js_probs", "kl_wide"])]
    for pr in procs:
        out, err = pr.communicate(timeout=600)
        if pr.returncode and "ptxas" in err and "not found" in err.lower():
            pytest.skip("no ptxas in this Triton install")
        assert pr.returncode == 0 and "compiled" in out, err[-3000:]


def test_linear_kl_div_kernel_long_rows_in_place_and_topk(monkeypatch):
    """Long rows (two interpreter blocks): the gradient overwrites the chunk's logits block by
    block; and a top-k teacher (its K + 1 bucket log-probabilities through the kernel)."""
    from kldiv.torch import linear_kl_div

    monkeypatch.setenv("KLDIV_BACKEND", "triton")
    gen = torch.Generator().manual_seed(15)
    hid = torch.randn(2, 5, generator=gen)
    W = torch.randn(1100, 5, generator=gen)
    t = torch.randn(2, 1100, generator=gen) * 3
    h1, W1 = hid.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss = linear_kl_div(h1, W1, t, softcap=(None, 9.0), chunk_size=2)
    h2, W2 = hid.double().requires_grad_(True), W.double().requires_grad_(True)
    z = 9.0 * torch.tanh((h2 @ W2.T) / 9.0)
    lp, lq = torch.log_softmax(t.double(), -1), torch.log_softmax(z, -1)
    ref = (lp.exp() * (lp - lq)).sum(-1).mean()
    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
    got, want = torch.autograd.grad(loss, [h1, W1]), torch.autograd.grad(ref, [h2, W2])
    assert _rowerr(got[0], want[0]) < 1e-5
    assert _rowerr(got[1].T, want[1].T) < 1e-5  # per hidden unit (the weight's columns)
    # top-k teacher: K = 3 of V = 20, against the K + 1 bucket formula by hand
    idx = torch.tensor([[0, 5, 7], [3, 1, 19]])
    tlp = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.6, 0.3, 0.05]]))
    W3 = W[:20].clone().requires_grad_(True)
    loss = linear_kl_div(hid, W3, (idx, tlp))
    W4 = W[:20].double().requires_grad_(True)
    lq = torch.log_softmax(hid.double() @ W4.T, -1)
    p = tlp.double().exp()
    qk = torch.gather(lq, -1, idx).exp()
    pr, qr = 1 - p.sum(-1), 1 - qk.sum(-1)
    ref = ((p * (p / qk).log()).sum(-1) + pr * (pr / qr).log()).mean()
    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
    (g,), (r,) = torch.autograd.grad(loss, [W3]), torch.autograd.grad(ref, [W4])
    assert _rowerr(g.T, r.T) < 1e-5


def test_single_category_rows(monkeypatch):
    # V = 1: every divergence is exactly 0 with zero gradients, whatever the logits (1e30,
    # finfo.min; a row spanning finfo.min .. finfo.max, beyond the float32 pass, through the
    # wide pass); -inf on one side alone is no distribution (nan, for the core to name)
    dtype = torch.bfloat16  # (its finfo.max is float32's, rounded)
    f = torch.finfo(dtype)
    x = torch.tensor([[0.0], [1e30], [f.min]]).to(dtype)
    y = torch.tensor([[5.0], [-1e30], [f.max]]).to(dtype)
    monkeypatch.setenv("KLDIV_BACKEND", "triton")
    for kind in ("forward", "reverse", "jeffreys", "js"):
        rows, gx, gy, _ = _rows_and_grads(x, y, 1.0, kind)
        assert bool((rows == 0).all()), (kind, rows)
        assert bool((gx == 0).all()) and bool((gy == 0).all())
        if kind in ("forward", "js"):  # (the interpreter is slow: two kinds suffice here)
            v = FNS[kind](x, y, **L)
            assert bool((v == 0).all()), (kind, v)
    rows = tk.kl_rows(torch.tensor([[-math.inf]]), torch.tensor([[0.0]]),
                      torch.ones(1, dtype=torch.float64))
    assert bool(torch.isnan(rows).all())


def test_gpu_benchmark_script_without_a_gpu(tmp_path, capsys):
    """benchmarks/gpu.py: --help; without CUDA a plain run says so (exit 2, nothing measured);
    --dry-run (a process of its own: it sets TRITON_INTERPRET before triton is imported) runs
    a row end to end at a tiny size with kldiv through the kernels in the interpreter, and
    writes strict JSON."""
    import importlib.util
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("_gpu_bench", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0 and "--dry-run" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert mod.main([]) == 2 and "no CUDA device" in capsys.readouterr().err
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(script), "--dry-run", "--only",
                        "kl_div 4 x 300 float32", "--json", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Triton kernels (in Triton's interpreter)" in r.stdout
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    res = row["results"]
    assert res["kldiv"]["grad_err"] < 1e-6 and res["torch eager"]["grad_err"] < 1e-3
