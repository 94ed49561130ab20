"""The Triton kernels on far rows, in Triton's interpreter (CPU tensors): float32 gradients where
one entry holds nearly all of a side's mass, and huge-KL rows whose mass sits far from the other
side's maximum.

References are independent of kldiv's algebra: torch.autograd on the float64 textbook formula
(tests/torch_reference.py's ``naive_row``) for ordinary logits, and the textbook values and
gradients in mpmath (60 digits on exactly converted inputs) where float64 itself loses the
answer (logits of 1e20..3e38: 2 - 3e38 and -1 - 3e38 are one float64 number).

Sizes are small (the interpreter runs ~0.2-0.7 s per row and launch).
"""
import math
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is decorated (decorated lazily)
torch = pytest.importorskip("torch")
pytest.importorskip("triton")
mpmath = pytest.importorskip("mpmath")

from kldiv.backends import triton_kernels as tk  # noqa: E402

from torch_reference import naive_row  # noqa: E402

if not tk.cpu_ready():  # triton imported before TRITON_INTERPRET was set: no interpreter
    pytest.skip("Triton's interpreter is not active in this process (TRITON_INTERPRET=1 must "
                "be set before triton is imported)", allow_module_level=True)


def _kernel(kind, x, y, beta=0.5, space="logits"):
    """Rows and the gradients of their sum with respect to both inputs, through the kernel."""
    xa = x.detach().clone().requires_grad_(True)
    ya = y.detach().clone().requires_grad_(True)
    rows = tk.kl_rows(xa, ya, torch.ones(x.shape[0], dtype=torch.float64), 1.0, kind, beta,
                      space, space)
    rows.sum().backward()
    return rows.detach(), xa.grad, ya.grad


def _autograd64(kind, x, y, beta=0.5, space="logits"):
    """Per-row gradients of the float64 textbook formula (torch.autograd)."""
    gx, gy = [], []
    for i in range(x.shape[0]):
        a = x[i].double().requires_grad_(True)
        b = y[i].double().requires_grad_(True)
        ga, gb = torch.autograd.grad(naive_row(kind, a, b, space, space, 1.0, beta), (a, b))
        gx.append(ga)
        gy.append(gb)
    return torch.stack(gx), torch.stack(gy)


def _mp_row(kind, x, y, beta=0.5):
    """Value and gradients of one row of logits (T = 1) from the textbook formulas in mpmath.

    p = softmax(x), q = softmax(y); KL(p || q) = sum p (log p - log q), with
    dKL/dx = p (l - E_p[l]) (l = log p - log q) and dKL/dy = q - p; JS = beta KL(p || m) +
    (1 - beta) KL(q || m), m = beta p + (1 - beta) q, with dJS/dx = beta p (g - E_p[g]),
    g = log(p / m), and dJS/dy = (1 - beta) q (h - E_q[h]), h = log(q / m).
    """
    with mpmath.workdps(60):
        X = [mpmath.mpf(float(v)) for v in x]
        Y = [mpmath.mpf(float(v)) for v in y]

        def logsoftmax(v):
            m = max(v)
            lse = m + mpmath.log(mpmath.fsum(mpmath.exp(t - m) for t in v))
            return [t - lse for t in v]

        lp, lq = logsoftmax(X), logsoftmax(Y)
        p = [mpmath.exp(t) for t in lp]
        q = [mpmath.exp(t) for t in lq]

        def kl(p, lp, lq):
            l_ = [a - b for a, b in zip(lp, lq)]
            E = mpmath.fsum(a * b for a, b in zip(p, l_))
            return E, [a * (b - E) for a, b in zip(p, l_)]

        if kind == "js":
            B = mpmath.mpf(beta)
            lm = [mpmath.log(B * a + (1 - B) * b) for a, b in zip(p, q)]
            g = [a - b for a, b in zip(lp, lm)]
            h = [a - b for a, b in zip(lq, lm)]
            Eg = mpmath.fsum(a * b for a, b in zip(p, g))
            Eh = mpmath.fsum(a * b for a, b in zip(q, h))
            v = B * Eg + (1 - B) * Eh
            gx = [B * a * (b - Eg) for a, b in zip(p, g)]
            gy = [(1 - B) * a * (b - Eh) for a, b in zip(q, h)]
        else:
            vf, gfx = kl(p, lp, lq)
            vr, gry = kl(q, lq, lp)
            gfy = [b - a for a, b in zip(p, q)]
            grx = [a - b for a, b in zip(p, q)]
            v, gx, gy = {"forward": (vf, gfx, gfy), "reverse": (vr, grx, gry),
                         "jeffreys": (vf + vr, [a + b for a, b in zip(gfx, grx)],
                                      [a + b for a, b in zip(gfy, gry)])}[kind]
        f = [float(v)], [float(t) for t in gx], [float(t) for t in gy]
    return (torch.tensor(f[0], dtype=torch.float64)[0], torch.tensor(f[1], dtype=torch.float64),
            torch.tensor(f[2], dtype=torch.float64))


def _grad_ok(g, ref, tol=1e-5):
    """Normwise per row, with a floor for true gradients below float32's range (1e-62)."""
    err = (g.double() - ref).norm(dim=-1)
    return bool((err <= tol * ref.norm(dim=-1) + 1e-38).all()), (
        err / ref.norm(dim=-1).clamp_min(1e-300)).max().item()


def _saturated_rows(V, gen):
    """float32 logits of std 8, and rows where one entry holds all but ~1e-6 of a side's mass
    while the other side's maximum is elsewhere (JS near its bound: the gradient at that entry
    is y (1 - p_top) - sum_rest p y, a plain y - E_p[y] cancels)."""
    x, y = torch.randn(2, 4, V, generator=gen) * 8
    x[1, 0] = x[1].max() + 14  # p saturated at entry 0; there q is e^-8 of its maximum
    y[1, 0] = y[1].max() - 8
    y[2, 1] = y[2].max() + 14  # q saturated at entry 1; p is e^-8 of its maximum there
    x[2, 1] = x[2].max() - 8
    x[3, 0] = x[3].max() + 14  # p saturated; q's logit there 0.5 below q's maximum
    y[3, 0] = y[3].max() - 0.5
    return x, y


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_js_gradients_on_far_and_saturated_float32_rows(beta):
    # std-8 logits and saturated rows: the JS gradients were 1e-3 off per row (p's maximum)
    gen = torch.Generator().manual_seed(11)
    x, y = _saturated_rows(50, gen)
    rows, gx, gy = _kernel("js", x, y, beta)
    rx, ry = _autograd64("js", x, y, beta)
    for g, r in ((gx, rx), (gy, ry)):
        ok, worst = _grad_ok(g, r)
        assert ok, worst


def test_js_gradients_on_saturated_probability_rows():
    gen = torch.Generator().manual_seed(12)
    x, y = _saturated_rows(50, gen)
    P, Q = torch.softmax(x[1:3].double(), -1).float(), torch.softmax(y[1:3].double(), -1).float()
    rows, gx, gy = _kernel("js", P, Q, 0.5, "probs")
    rx, ry = _autograd64("js", P, Q, 0.5, "probs")
    for g, r in ((gx, rx), (gy, ry)):
        ok, worst = _grad_ok(g, r)
        assert ok, worst


def _far_rows(V, gen, at=2):
    """Rows [2, -1, big] against [0, -1, -200] (the big entry at index ``at``, small logits
    elsewhere): KL ~ big, the p side's mass far from q's maximum; the exact log-ratios of the
    entries with mass differ by O(1) while each is about -big (a shift by each side's own
    maximum rounds 2 - big and -1 - big to one number)."""
    bigs = (1e37, 1e3)
    a = torch.randn(len(bigs), V, generator=gen)
    b = torch.randn(len(bigs), V, generator=gen)
    for i, big in enumerate(bigs):
        a[i, :2] = torch.tensor([2.0, -1.0])
        b[i, :2] = torch.tensor([0.0, -1.0])
        a[i, at], b[i, at] = big, -200.0
    return a, b


@pytest.mark.parametrize("kind", ["forward", "js"])
def test_huge_kl_rows_mass_far_from_the_other_maximum(kind):
    # the big entry on either side (p's or q's); reverse KL and Jeffreys are the forward
    # kernel with the sides swapped (and accumulating), which the flipped rows take
    gen = torch.Generator().manual_seed(13)
    a, b = _far_rows(37, gen)
    # the row: the span 3e38 + 3.4e38 is beyond float32 (a log-ratio of 6.4e38
    # against p's mass): the float32 pass leaves it and the wide (float64) pass computes it
    e = torch.zeros(2, 37)
    e[0, :3] = torch.tensor([2.0, -1.0, 3e38])
    e[1, :3] = torch.tensor([0.0, -1.0, -3.4e38])
    x = torch.cat([a, b, e[:1], e[1:]])
    y = torch.cat([b, a, e[1:], e[:1]])
    rows, gx, gy = _kernel(kind, x, y)
    for i in range(x.shape[0]):
        v, rx, ry = _mp_row(kind, x[i].tolist(), y[i].tolist())
        assert abs(rows[i].item() - v.item()) <= 1e-6 * abs(v.item()), (i, rows[i], v)
        for g, r in ((gx[i:i + 1], rx[None]), (gy[i:i + 1], ry[None])):
            ok, worst = _grad_ok(g, r)
            assert ok, (i, worst)


@pytest.mark.parametrize("kind", ["reverse", "js"])
def test_huge_kl_rows_long(kind):
    # V = 1100: two interpreter blocks, the big entry in the second one (p's maximum, and
    # with it the gradients' reference, moves in a late block); max on either side
    gen = torch.Generator().manual_seed(14)
    a, b = _far_rows(1100, gen, at=1050)
    x = torch.cat([a[:1], b[1:]])
    y = torch.cat([b[:1], a[1:]])
    rows, gx, gy = _kernel(kind, x, y)
    for i in range(x.shape[0]):
        v, rx, ry = _mp_row(kind, x[i].tolist(), y[i].tolist())
        assert abs(rows[i].item() - v.item()) <= 1e-6 * abs(v.item()), (i, rows[i], v)
        for g, r in ((gx[i:i + 1], rx[None]), (gy[i:i + 1], ry[None])):
            ok, worst = _grad_ok(g, r)
            assert ok, (i, worst)


def test_huge_kl_rows_probabilities_against_logits():
    # a probability side (its float64 log-ratio) against logits of 1e37 / 30 on the other:
    # the gradient with respect to the side that holds all its mass at one entry is 0 (it was
    # the rounding of that entry's log-ratio, ~1e-7), the other side's exact
    gen = torch.Generator().manual_seed(15)
    a = torch.randn(2, 37, generator=gen)
    b = torch.randn(2, 37, generator=gen)
    a[:, :3] = torch.tensor([[2.0, -1.0, 1e37], [2.0, -1.0, 30.0]])
    b[:, :3] = torch.tensor([0.0, -1.0, -20.0])
    P = torch.softmax(b.double(), -1).float()
    for x, y, xs, ys in ((a, P, "logits", "probs"), (P, a, "probs", "logits")):
        xa = x.clone().requires_grad_(True)
        ya = y.clone().requires_grad_(True)
        rows = tk.kl_rows(xa, ya, torch.ones(2, dtype=torch.float64), 1.0, "forward", 0.5, xs,
                          ys)
        rows.sum().backward()
        for i in range(2):
            lx = x[i].double().log() if xs == "probs" else x[i].double()
            ly = y[i].double().log() if ys == "probs" else y[i].double()
            v, rx, ry = _mp_row("forward", lx.tolist(), ly.tolist())
            # with respect to normalised probabilities r: the gradient in log r over r
            rx = rx / x[i].double() if xs == "probs" else rx
            ry = ry / y[i].double() if ys == "probs" else ry
            assert abs(rows[i].item() - v.item()) <= 1e-6 * abs(v.item()), (i, rows[i], v)
            for g, r in ((xa.grad[i:i + 1], rx[None]), (ya.grad[i:i + 1], ry[None])):
                ok, worst = _grad_ok(g, r)
                assert ok, (xs, i, worst)
