"""kldiv's C kernel as one torch operator, for ``torch.compile`` on the CPU.

Under ``torch.compile`` the torch fast path (``torch_fast``) cannot call the C kernel directly:
Dynamo traces Python, and a raw pointer call is no graph node. Traced as plain torch operations
instead, the accurate formula (a few dozen elementwise operations, and as many again for its
derivative) compiled to code 1.5-1.7x slower than the compiled naive formula at 256 x 1000 and
32 x 32000 (``python benchmarks/large_vocab.py --n 256 --v 1000 --methods "torch.compile,kldiv
compiled"``; docs/performance.md has the numbers). Here the kernel is registered as the operator
``kldiv::cpu_rows`` (``torch.library.custom_op``): Dynamo and Inductor see one opaque node
with known output shapes (``register_fake``) and a derivative (``register_autograd``), and at
run time the node is exactly the eager call (``torch_fast._kernel_rows``): the same values and
gradients, to the bit, as ``kldiv.kl_div`` without compile.

The operator, for x, y of shape (n, V) (categories last) and per-row factors ``c`` (mask,
weights, the mean's normalisation; None: all ones) times ``c_const`` (``1/n`` for an unmasked
mean, ``T**2`` with ``t2_scale``):

- returns ``rows_r = c_r c_const D_r`` (float64, (n,)) with ``D`` the divergence of each row
  ("forward", "reverse", "js", "jeffreys"; each side "probs", "log_probs" or "logits", at a
  temperature), and, in the same kernel walk, the gradients of ``sum_r rows_r`` with respect
  to x and y (input dtypes; empty when not wanted);
- its first-order derivative hands those gradients over, times the incoming per-row gradient;
  when autograd records the backward pass itself (``create_graph=True``, possible under
  ``backend="eager"``) the gradients are recomputed in differentiable torch operations
  (``torch_fast._grads_torch``): second derivatives stay exact;
- value checks (``validate``, read when the node runs, not when it is traced) come from the
  kernel's own walk, as in eager mode. Rows the kernel leaves alone (a nan, +inf, no finite
  entry) and failed checks go to the core inside the node: it raises its named error, or
  computes the rows and their derivatives itself, as eager mode does.

Masked rows (``keep`` false, or a factor of 0) are skipped by the kernel: value 0, gradient 0.
"""
import contextlib
from typing import Optional

import torch

from .._core.validation import validation_enabled
from .torch_fused import _compute_dtype

__all__ = ["bind", "usable", "divergence"]

_FAST = []  # the torch fast path's module (torch_fast binds itself: no import circle)


def bind(torch_fast):
    """Called by ``kldiv.backends.torch_fast`` at import: the kernel driver (``_kernel_rows``),
    its call description (``_Spec``) and the differentiable gradients (``_grads_torch``)."""
    _FAST[:] = [torch_fast]


def _tf():
    return _FAST[0]


_SPECS: dict = {}  # call signature -> torch_fast._Spec (its cached scales and tolerances)


def _spec(kind, p_space, q_space, T, beta, dt, n, V, c_const):
    key = (kind, p_space, q_space, T, beta, dt, n, V, c_const)
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) > 256:
            _SPECS.clear()
        spec = _SPECS[key] = _tf()._Spec(kind, p_space, q_space, T, beta, "none", dt, 1, n, V,
                                         c_const, (n,))
    return spec


def _plain(x):
    """x without a lazy negation or conjugation bit (the kernel reads raw memory)."""
    if x.is_neg():
        x = x.resolve_neg()
    return x.resolve_conj() if x.is_conj() else x


def _scaled(rows, c, c_const):
    """rows_r c_r c_const (float64, (n,); ``rows`` is overwritten)."""
    if c is not None:
        rows = rows.mul_(c.to(torch.float64))
    return rows.mul_(c_const) if c_const != 1.0 else rows


@torch.library.custom_op("kldiv::cpu_rows", mutates_args=())
def cpu_rows(x: torch.Tensor, y: torch.Tensor, c: Optional[torch.Tensor],
             keep: Optional[torch.Tensor], w: Optional[torch.Tensor], kind: str, p_space: str,
             q_space: str, temperature: float, beta: float, c_const: float,
             validate: Optional[bool], need_x: bool, need_y: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled rows ``c_r c_const D_r`` (float64) of (n, V) inputs and the gradients of their
    sum (see the module docstring); ``w``: the raw row weights, for the value checks only."""
    tf = _tf()
    n, V = x.shape
    x = _plain(x)
    y = _plain(y)
    check = validation_enabled(validate)
    res = None
    if not (check and w is not None and _bad_weights(w, keep)):
        spec = _spec(kind, p_space, q_space, temperature, beta, _compute_dtype(x, y), n, V,
                     c_const)
        with torch.no_grad():
            res = tf._kernel_rows(spec, x, y, c, keep, need_x, need_y, check)
    if res is None:
        return _core_rows(x, y, c, keep, w, kind, p_space, q_space, temperature, beta, c_const,
                          check, need_x, need_y)
    rows, gx, gy = res[:3]
    return (_scaled(rows, c, c_const), x.new_empty((0,)) if gx is None else gx.view(n, V),
            y.new_empty((0,)) if gy is None else gy.view(n, V))


@cpu_rows.register_fake
def _(x, y, c, keep, w, kind, p_space, q_space, temperature, beta, c_const, validate, need_x,
      need_y):
    n, V = x.shape
    return (x.new_empty((n,), dtype=torch.float64),
            x.new_empty((n, V)) if need_x else x.new_empty((0,)),
            y.new_empty((n, V)) if need_y else y.new_empty((0,)))


def _bad_weights(w, keep):
    """Weights the fast path leaves to the core: not > 0 or +inf in a row that counts (the
    core refuses negative and non-finite ones, and keeps 0 * inf rows its own way)."""
    bad = ~(w > 0) | (w == float("inf"))
    if keep is not None:
        bad = bad & keep
    return bool(bad.any())


def _core_rows(x, y, c, keep, w, kind, p_space, q_space, T, beta, c_const, check, need_x,
               need_y):
    """The node's answer from the core (rows the kernel leaves alone, failed checks): the
    core's checks (its errors), rows and autograd derivatives, scaled as the kernel's."""
    from array_api_compat import torch as xp

    from .._core import divergence as _div

    n, V = x.shape
    with torch.enable_grad(), _autograd_dispatch():
        xr = x.detach().requires_grad_(need_x)
        yr = y.detach().requires_grad_(need_y)
        _, P, Q, mask, _, T = _div._prepare(xr, yr, p_space, q_space, -1, T, keep, w, check)
        P, Q = _div._finish(xp, P, Q, mask, p_space, q_space)
        rows = _div.divergence_rows(kind, xp, P, Q, p_space, q_space, T, beta).to(torch.float64)
        if keep is not None:
            rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype))
        rows = rows * (c_const if c is None else c.to(torch.float64) * c_const)
        ins = [t for t, need in ((xr, need_x), (yr, need_y)) if need]
        grads = torch.autograd.grad(rows.sum(), ins, allow_unused=True) if ins else ()
    it = iter(grads)
    gx = next(it) if need_x else None
    gy = next(it) if need_y else None
    return rows.detach(), _grad_out(gx, x, need_x), _grad_out(gy, y, need_y)


@contextlib.contextmanager
def _autograd_dispatch():
    """Autograd recording inside the operator's implementation, which runs below autograd
    (torch.library excludes its dispatch key there): the core's rows are differentiated."""
    key = torch._C.DispatchKey.AutogradFunctionality
    was = torch._C._dispatch_tls_is_dispatch_key_excluded(key)
    torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        yield
    finally:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)


def _grad_out(g, t, need):
    if not need:
        return t.new_empty((0,))
    return torch.zeros_like(t) if g is None else g.detach().contiguous()


def _setup_context(ctx, inputs, output):
    (x, y, c, keep, _w, kind, p_space, q_space, T, beta, c_const, _validate, _nx, _ny) = inputs
    ctx.spec = (kind, p_space, q_space, T, beta, c_const)
    ctx.save_for_backward(x, y, c, keep)
    ctx.grads = [output[1], output[2]]


def _backward(ctx, g_rows, _g_gx, _g_gy):
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    x, y, c, keep = ctx.saved_tensors
    gx, gy = ctx.grads
    n, V = x.shape
    if torch.is_grad_enabled():
        # create_graph: the gradient itself is differentiated; recomputed from the saved
        # inputs in differentiable torch operations (exact higher derivatives)
        kind, p_space, q_space, T, beta, c_const = ctx.spec
        spec = _spec(kind, p_space, q_space, T, beta, _compute_dtype(x, y), n, V, c_const)
        s = g_rows.to(spec.dtype)
        if c is not None:
            s = s * c.to(spec.dtype)
        if c_const != 1.0:
            s = s * c_const
        dx, dy = _tf()._grads_torch(spec, x, y, s, keep, need_x, need_y)
        dx = None if dx is None else dx.to(x.dtype)
        dy = None if dy is None else dy.to(y.dtype)
    else:
        # first order: the kernel's gradients (of sum_r rows_r), times each row's incoming
        # gradient (all ones for a plain sum or mean: one multiplication Inductor may do in
        # place)
        dx = gx * g_rows.to(gx.dtype)[:, None] if need_x else None
        dy = gy * g_rows.to(gy.dtype)[:, None] if need_y else None
    return (dx, dy) + (None,) * 12


cpu_rows.register_autograd(_backward, setup_context=_setup_context)


def usable(p, q):
    """Whether ``kldiv::cpu_rows`` can take these inputs (CPU tensors, the kernel built)."""
    ext = _tf()._EXT if _FAST else None
    return (ext is not None and hasattr(ext, "rows_ex") and p.device.type == "cpu"
            and q.device.type == "cpu")


def divergence(spec, pm, qm, c, keep, w, validate, need_p, need_q):
    """The value of the call described by ``spec`` (a ``torch_fast._Spec``) through the
    operator: traced by Dynamo as one node plus the reduction."""
    n, V = spec.n, spec.V
    x = pm.reshape(n, V)
    y = qm.reshape(n, V)
    beta = 0.5 if spec.beta is None else float(spec.beta)
    rows, _, _ = torch.ops.kldiv.cpu_rows(
        x, y, c, keep, w, spec.kind, spec.p_space, spec.q_space, spec.T, beta, spec.c_const,
        validate, need_p, need_q)
    out = rows.reshape(spec.rows_shape) if spec.reduction == "none" else rows.sum()
    return out.to(spec.dtype)
