"""kldiv under torch.compile on the CPU: one graph, no warnings, the C kernel as one operator.

Every public divergence called inside a compiled function must trace with ``fullgraph=True``
(no graph break), without a UserWarning, with the C kernel registered as ``kldiv::cpu_rows``
(backends/torch_ops.py) in the graph; the compiled values and gradients, row by row, must equal
the eager call's and torch.autograd's on the textbook float64 formula, on rows with -inf
entries (masked categories) and a logit offset of 1e30. Compilation is slow: few, small shapes,
and the ``aot_eager`` backend (Dynamo and AOTAutograd, whose fake tensors and traced backward
are what an operator must get right) except for one Inductor run.
"""
from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
import importlib.util  # noqa: E402

# torch._dynamo is imported by the tests that compile, not at collection (seconds in every
# pytest-xdist worker, which all collect this file)
if importlib.util.find_spec("torch._dynamo") is None:  # pragma: no cover
    pytest.skip("torch._dynamo is not available", allow_module_level=True)

import kldiv  # noqa: E402
from kldiv.backends import torch_fast as tfa  # noqa: E402
from torch_reference import naive_row  # noqa: E402

pytestmark = pytest.mark.skipif(tfa._EXT is None, reason="C extension kldiv._ext._fused not built")

FUNCS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
         "jeffreys": kldiv.jeffreys_div}
OP = "kldiv.cpu_rows"


def _recording_backend(graphs, inner="aot_eager"):
    """A backend that keeps Dynamo's graph (to look for the operator) and runs ``inner``."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(inner)(gm, example_inputs)

    return backend


def _ops_in(graphs):
    return [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]


def _compiled(fn, graphs, inner="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=_recording_backend(graphs, inner))


def _inputs(dtype, kind):
    """(6, 7) teacher and student logits: -inf entries (both sides, and the teacher's alone
    where KL(p || q) stays finite), a teacher row offset by 1e30, a student row of 1e30s."""
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(6, 7, generator=g, dtype=torch.float64) * 2)
    b = a + torch.randn(6, 7, generator=g, dtype=torch.float64)
    a[0, 1] = b[0, 1] = -math.inf
    a[1, [0, 4]] = b[1, [0, 4]] = -math.inf
    if kind == "forward":
        a[2, 3] = -math.inf  # p = 0 where q > 0: finite KL(p || q)
    a[3] = a[3] + 1e30  # one uniform side after rounding (float32 too), the other not
    b[4] = b[4] * 1e15 + 1e30  # logits 1e30 apart from nothing, spaced 1.4e14 (float64)
    return a.to(dtype), b.to(dtype)


# ----------------------------------------------------------------------------------------------
# one graph, the operator in it, no warnings; values and gradients per row


@pytest.mark.parametrize("kind", list(FUNCS))
def test_every_kind_compiles_to_one_graph_with_the_kernel_op(kind):
    fn = FUNCS[kind]

    def loss(t, s):
        return fn(t, s, p_space="logits", q_space="logits", reduction="none")

    a, b = _inputs(torch.float64, kind)
    graphs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        compiled = _compiled(loss, graphs)
        t1, s1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        v = compiled(t1, s1)
    ops = _ops_in(graphs)
    assert len(graphs) == 1 and OP in ops, ops
    assert len(ops) <= 6, ops  # the operator, a reshape and a cast: no traced formula
    up = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    g = torch.autograd.grad((v * up).sum(), (t1, s1))
    # the eager call: the same kernel, the same numbers
    t2, s2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    e = loss(t2, s2)
    ge = torch.autograd.grad((e * up).sum(), (t2, s2))
    torch.testing.assert_close(v, e, rtol=1e-15, atol=0)
    for x, y in zip(g, ge):
        torch.testing.assert_close(x, y, rtol=1e-15, atol=0)
    # torch.autograd on the float64 textbook formula, row by row
    for r in range(6):
        ar, br = a[r].clone().requires_grad_(), b[r].clone().requires_grad_()
        ref = naive_row(kind, ar, br, "logits", "logits")
        gr = torch.autograd.grad(ref, (ar, br))
        assert math.isfinite(float(ref.detach()))
        torch.testing.assert_close(v[r], ref.detach(), rtol=1e-9, atol=1e-12, msg=f"row {r}")
        for x, y in zip(g, gr):
            torch.testing.assert_close(x[r] / up[r], y, rtol=1e-8, atol=1e-11, msg=f"row {r}")


def test_inductor_float32_mean_equals_eager_and_float64_formula():
    """The real compiler (Inductor, C++ code) around the operator: float32, the mean."""
    def loss(t, s):
        return kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean")

    a, b = _inputs(torch.float32, "forward")
    graphs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        compiled = _compiled(loss, graphs, inner="inductor")
        s1 = b.clone().requires_grad_()
        v = compiled(a, s1)
        v.backward()
    assert OP in _ops_in(graphs)
    s2 = b.clone().requires_grad_()
    e = loss(a, s2)
    e.backward()
    torch.testing.assert_close(v.detach(), e.detach(), rtol=1e-7, atol=0)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-7, atol=0)
    a64, b64 = a.double(), b.double().requires_grad_()
    ref = torch.stack([naive_row("forward", a64[r], b64[r], "logits", "logits")
                       for r in range(6)]).mean()
    ref.backward()
    torch.testing.assert_close(v.detach().double(), ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(s1.grad.double(), b64.grad, rtol=1e-5, atol=1e-8)


def test_options_under_compile_equal_eager():
    """Input spaces, mask, weight, temperature, t2_scale and another axis through the op."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    b = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [True, True, True, False],
                         [False, True, True, True]])
    w = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.5
    pa = torch.softmax(a, 1)
    lb = torch.log_softmax(b, 1)
    pa[~mask[:, None, :].expand_as(pa)] = math.nan  # masked rows may hold anything

    def loss(p, lq):
        return (kldiv.kl_div(p, lq, p_space="probs", q_space="log_probs", axis=1,
                             reduction="mean", mask=mask, weight=w)
                + kldiv.reverse_kl(p, lq, p_space="probs", q_space="log_probs", axis=1,
                                   temperature=1.5, t2_scale=True, reduction="sum", mask=mask)
                + kldiv.js_div(p, lq, p_space="probs", q_space="log_probs", axis=1,
                               beta=0.3, mask=mask, reduction="sum"))

    graphs = []
    compiled = _compiled(loss, graphs)
    p1, q1 = pa.clone().requires_grad_(), lb.clone().requires_grad_()
    v = compiled(p1, q1)
    g1 = torch.autograd.grad(v, (p1, q1))
    assert _ops_in(graphs).count(OP) == 3
    p2, q2 = pa.clone().requires_grad_(), lb.clone().requires_grad_()
    e = loss(p2, q2)
    g2 = torch.autograd.grad(e, (p2, q2))
    torch.testing.assert_close(v, e, rtol=1e-13, atol=0)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(torch.nan_to_num(x), torch.nan_to_num(y), rtol=1e-12,
                                   atol=1e-15)


def test_value_checks_run_when_the_graph_runs():
    """Checks on (the default) raise the core's error from inside the compiled graph;
    validate=False computes (a log-probabilities row that does not sum to 1)."""
    def loss(t, s, validate):
        return kldiv.kl_div(t, s, p_space="logits", q_space="log_probs", reduction="sum",
                            validate=validate)

    t = torch.randn(4, 5, dtype=torch.float64)
    s = torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    s[2] += 0.5
    compiled = _compiled(loss, [])
    with pytest.raises(ValueError, match="q"):
        compiled(t, s, None)
    v = compiled(t, s, False)
    ref = sum(naive_row("forward", t[r], s[r], "logits", "logits") for r in range(4))
    torch.testing.assert_close(v, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["forward", "js"])
def test_rows_the_kernel_leaves_go_to_the_core_inside_the_graph(kind):
    """A nan and a +inf logit (the kernel leaves such rows to the core): with checks off the
    compiled call gives what the eager call gives (the core's rows and derivatives); with
    checks on, the core's error."""
    fn = FUNCS[kind]

    def loss(t, s, validate):
        return fn(t, s, p_space="logits", q_space="logits", reduction="none",
                  validate=validate)

    a, b = _inputs(torch.float64, "reverse")
    a[1, 2] = math.nan
    b[5, 0] = math.inf
    compiled = _compiled(loss, [])
    t1, s1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    v = compiled(t1, s1, False)
    g1 = torch.autograd.grad(torch.nan_to_num(v, posinf=0.0).sum(), (t1, s1))
    t2, s2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    e = loss(t2, s2, False)
    g2 = torch.autograd.grad(torch.nan_to_num(e, posinf=0.0).sum(), (t2, s2))
    assert bool(torch.isnan(v[1]))
    torch.testing.assert_close(v, e, rtol=1e-13, atol=0, equal_nan=True)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15, equal_nan=True)
    with pytest.raises(ValueError, match="p"):
        compiled(a, b, None)


def test_hessian_vector_products_under_the_eager_backend():
    """create_graph=True through the operator (backend="eager"): exact second derivatives."""
    def loss(t, s):
        return kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="sum")

    a, b = _inputs(torch.float64, "forward")
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    vec = torch.linspace(-1.0, 1.0, 42, dtype=torch.float64).reshape(6, 7)
    s1 = b.clone().requires_grad_()
    (g1,) = torch.autograd.grad(compiled(a, s1), s1, create_graph=True)
    (h1,) = torch.autograd.grad((g1 * vec).sum(), s1)
    for r in range(6):
        sr = b[r].clone().requires_grad_()
        (gr,) = torch.autograd.grad(naive_row("forward", a[r], sr, "logits", "logits"), sr,
                                    create_graph=True)
        (hr,) = torch.autograd.grad((gr * vec[r]).sum(), sr)
        torch.testing.assert_close(g1[r].detach(), gr.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(h1[r], hr, rtol=1e-8, atol=1e-11, msg=f"row {r}")
