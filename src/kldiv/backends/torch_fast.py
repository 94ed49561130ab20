"""The torch fast path of the whole family, at every size: kldiv's "pre" hook for torch tensors.

``kldiv.kl_div`` (and ``reverse_kl``, ``js_div``, ``jeffreys_div``) on torch tensors lands here
first, with the user's arguments untouched. The common calls (every input space, every
reduction, mask, weight, temperature, any axis, with or without gradients) are answered by one
``torch.autograd.Function``:

- its forward pass computes the per-row values without an autograd graph, and, when a gradient
  will be needed, the first derivatives in the same walk: on CPU float32/float64 for the whole
  family by the C kernel (``kldiv._ext._fused.rows_ex``: three passes per row for KL, four for
  JS, OpenMP over rows). Probabilities at temperature 1 go in as they are (the kernel takes
  their logarithms itself and returns the gradient with respect to them); inputs of another
  dtype or layout, and probabilities at a temperature, are converted a chunk of rows at a time,
  so that no extra N x V tensor is made. Other devices: a few torch operations or the core's
  own row function;
- its backward pass hands those gradients over (first order), or, when autograd records the
  backward pass itself (``create_graph=True``: Hessian-vector products, TRPO's Fisher-vector
  products) or runs it a second time (``retain_graph=True``), recomputes the analytic gradients
  from the saved inputs in differentiable torch operations: second (and higher) derivatives are
  exact at every size. No size threshold changes which derivatives exist.

Value checks cost no extra pass where the kernel runs: it reports every row with a nan, +inf or
no finite entry (or a negative probability), and at temperature 1 it returns each row's sum of
probabilities or logsumexp from the same walk; rows within half the tolerance of the border are
checked again exactly as the core checks them (see ``_stats_off``). Whenever anything is off,
or the call is unusual (broadcast shapes, weights that need a gradient, extreme temperatures,
tensor subclasses), the hook answers ``NotImplemented`` and the core runs: it raises its own
error or computes the value itself. The core defines the semantics; this only goes faster.

Under ``torch.compile`` (CPU tensors, kernel built) the C kernel is one opaque operator,
``kldiv::cpu_rows`` (``backends/torch_ops.py``): one graph, no graph break, no warning, and the
eager call's values and gradients; its value checks run when the graph runs. Without the
kernel (other devices) the Function's torch operations are traced instead and Inductor fuses
them (no checks there).
"""
from __future__ import annotations

import math
import os as _os
import sys as _sys

import torch

from .._core import dispatch as _dispatch
from .._core.validation import normalization_tolerance as _tolerance
from .._core.validation import validation_enabled as _validation_enabled
from .._core.divergence import _PHI_COEFS, _SMALL
from . import torch_fused as _fused_mod
from .torch_fused import grad_buffer as _grad_buffer

__all__ = ["divergence", "T_RANGE"]

_SPACES = frozenset(("probs", "log_probs", "logits"))
_REDUCTIONS = frozenset(("none", "sum", "mean"))
_KINDS = frozenset(("forward", "reverse", "js", "jeffreys"))
_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

#: temperatures this path takes; outside, the core decides (it documents the limits)
T_RANGE = (1.0 / 64.0, 64.0)

# elements per chunk of rows where inputs are converted (probabilities to logarithms, dtypes):
# at least _CHUNK, at most 1/_CHUNK_PARTS of the input (fewer Python steps on large inputs), so
# that the chunk's few temporaries stay under a tenth of one input tensor from 512 x 32000 up
_CHUNK = 1 << 16
_CHUNK_PARTS = 48


def _chunk_rows(n, V):
    return max(1, max(_CHUNK, (n * V) // _CHUNK_PARTS) // V)

_NINF = -math.inf


def _load_kernel():
    try:
        from .._ext import _fused
    except ImportError:  # pragma: no cover - extension not built: torch operations only
        return None
    return _fused if hasattr(_fused, "rows") else None


_EXT = _load_kernel()

try:
    _functorch_active = torch._C._are_functorch_transforms_active
except AttributeError:  # pragma: no cover - other torch versions
    def _functorch_active():
        return False

def _vmap_active():
    """Whether a torch.func.vmap is among the active functorch transforms."""
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # pragma: no cover - other torch versions
        return False
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


_PUBLIC = {"forward": "kl_div", "reverse": "reverse_kl", "js": "js_div",
           "jeffreys": "jeffreys_div"}

try:
    _is_compiling = torch.compiler.is_compiling
except AttributeError:  # pragma: no cover - old torch
    def _is_compiling():
        return False


# ----------------------------------------------------------------------------------------------
# the Triton path (backends/triton_kernels.py, issue 16): CUDA tensors when triton imports, or
# CPU tensors with KLDIV_BACKEND=triton and TRITON_INTERPRET=1 (both read per call)


def _make_backend_env_check():
    """A function telling whether KLDIV_BACKEND is "triton" now: os.environ.get's answer, read
    from the dict that os.environ reads and writes (CPython's os.environ._data) without its
    per-call key encoding (a quarter of the everyday call's hook time at 64 x 10)."""
    env = _os.environ
    try:
        data, key, val = env._data, env.encodekey("KLDIV_BACKEND"), env.encodevalue("triton")
    except (AttributeError, TypeError):  # pragma: no cover - another Python
        return lambda: env.get("KLDIV_BACKEND") == "triton"
    return lambda: data.get(key) == val


_backend_env_is_triton = _make_backend_env_check()


def _triton_wanted(p, q):
    # p.is_cuda, not p.device.type: no device object and no string made on every call
    cuda = getattr(p, "is_cuda", None)
    if cuda is None or (not cuda and not _backend_env_is_triton()):
        return False
    from . import triton_kernels

    return triton_kernels.wanted(p, q)


def _triton_divergence(kind, p, q, **options):
    from . import triton_kernels

    return triton_kernels.divergence(kind, p, q, **options)


# ----------------------------------------------------------------------------------------------
# the hook


def divergence(kind, p, q, *, p_space, q_space, axis, reduction, mask, weight, temperature,
               t2_scale, validate, beta, **options):
    """The core's "pre" hook for torch: the value of ``kldiv.<kind>`` or NotImplemented.

    Same arguments and result as the public functions (``kind``: "forward", "reverse", "js",
    "jeffreys"); NotImplemented sends the call to the core unchanged. Options this hook does
    not know (a keyword a later core may pass) send the call to the core unless they are None.
    """
    if options and any(v is not None for v in options.values()):
        return NotImplemented
    if not _is_compiling() and not _fused_mod.fused_enabled():
        return NotImplemented  # set_fused(False) / fused(False): the core computes
    if _functorch_active():
        # torch.func transforms (grad, jacrev, hessian, ...): their wrapped tensors have no
        # storage for the kernel; the core's torch operations go through the transforms
        if _vmap_active():
            raise NotImplementedError(
                f"kldiv.{_PUBLIC[kind]}: torch.func.vmap is not supported (the divergences "
                "branch on the data: value checks, far and masked rows). Rows are already "
                "independent: call it once on the stacked batch (reduction='none' gives one "
                "value per row; torch.func.grad / jacrev / hessian of that call work)"
            )
        return NotImplemented
    if _triton_wanted(p, q):  # Triton kernels (backends/triton_kernels.py, issue 16)
        out = _triton_divergence(kind, p, q, p_space=p_space, q_space=q_space, axis=axis,
                                 reduction=reduction, mask=mask, weight=weight,
                                 temperature=temperature, t2_scale=t2_scale, validate=validate,
                                 beta=beta)
        if out is not NotImplemented:
            return out
    if mask is None and weight is None and not _is_compiling():
        # the everyday call (no mask, no weight, a signature seen before): no option parsing
        try:
            # is_cpu, not the device objects: the lane holds CPU signatures only
            key = (kind, p_space, q_space, reduction, temperature, t2_scale, beta, axis,
                   type(p), type(q), p.dtype, q.dtype, p.shape, q.shape, p.is_cpu, q.is_cpu)
            spec = _LANE.get(key)
        except (TypeError, AttributeError):
            key = spec = None
        if spec is not None and p.is_contiguous() and q.is_contiguous() and not (
                p.is_neg() or q.is_neg()) and _fused_mod._USE_EXTENSION.get():
            out = _lane(spec, p, q, validate)
            if out is not None:
                return out
    else:
        key = None
    if type(p) not in _TENSOR_TYPES or type(q) not in _TENSOR_TYPES:
        return NotImplemented
    if p_space not in _SPACES or q_space not in _SPACES or reduction not in _REDUCTIONS:
        return NotImplemented
    if kind not in _KINDS or p.dtype not in _FLOATS or q.dtype not in _FLOATS:
        return NotImplemented
    tt = type(temperature)
    if tt is not float and tt is not int:
        return NotImplemented
    T = float(temperature)
    if not T_RANGE[0] <= T <= T_RANGE[1]:
        return NotImplemented
    shape = p.shape
    nd = len(shape)
    if q.shape != shape or nd == 0 or type(axis) is not int or not -nd <= axis < nd:
        return NotImplemented
    dev = p.device
    if q.device != dev:
        return NotImplemented
    ax = axis % nd
    V = shape[ax]
    if V == 0:
        return NotImplemented
    n = 1
    for i, s in enumerate(shape):
        if i != ax:
            n *= s
    if n == 0:
        return NotImplemented
    compiling = _is_compiling()
    check = (not compiling) and _validation_enabled(validate)
    rows_shape = shape[:ax] + shape[ax + 1:]
    keep = None  # rows that count (mask and positive weight); None: all
    w = None
    if mask is not None:
        if type(mask) not in _TENSOR_TYPES or mask.dtype != torch.bool or mask.device != dev:
            return NotImplemented
        if mask.shape != rows_shape:
            try:
                mask = torch.broadcast_to(mask, rows_shape)
            except RuntimeError:
                return NotImplemented
        keep = mask.reshape(n)
    dt = torch.promote_types(p.dtype, q.dtype)
    if dt not in (torch.float32, torch.float64):
        dt = torch.float32
    if weight is not None:
        if type(weight) not in _TENSOR_TYPES or weight.dtype not in _FLOATS:
            return NotImplemented
        if weight.device != dev or (weight.requires_grad and torch.is_grad_enabled()):
            return NotImplemented
        if weight.shape != rows_shape:
            try:
                weight = torch.broadcast_to(weight, rows_shape)
            except RuntimeError:
                return NotImplemented
        w = weight.detach().reshape(n).to(dt)
        if check:
            # the core checks weights in every unmasked row; a zero weight would let the kernel
            # skip a row that the core checks: both are left to the core
            bad = ~(w > 0) | (w == math.inf)
            if keep is not None:
                bad = bad & keep
            if bool(bad.any()):
                return NotImplemented
    if kind == "js":
        beta = float(beta)
    # per-row factors c: value = sum_r c_r rows_r ("sum", "mean"), or rows_r c_r ("none")
    c = None
    if w is not None:
        pos = w > 0
        keep = pos if keep is None else (keep & pos)
        c = torch.where(keep, w, torch.zeros((), dtype=dt, device=dev))
    elif keep is not None:
        c = keep.to(dt)
    if reduction == "mean":
        if c is None:
            c_const = 1.0 / n
        else:
            den = c.sum()
            c = torch.where(den > 0, c / torch.where(den > 0, den, torch.ones_like(den)),
                            torch.zeros_like(c))
            c_const = 1.0
    else:
        c_const = 1.0
    if t2_scale:
        c_const *= T * T
    if ax != nd - 1:
        pm = torch.movedim(p, ax, -1)
        qm = torch.movedim(q, ax, -1)
    else:
        pm, qm = p, q
    spec = _Spec(kind, p_space, q_space, T, beta, reduction, dt, ax, n, V, c_const,
                 tuple(rows_shape))
    grad_on = torch.is_grad_enabled()
    need_p = grad_on and p.requires_grad
    need_q = grad_on and q.requires_grad
    if compiling:
        if _ops.usable(p, q):
            # the C kernel as one opaque operator (backends/torch_ops.py): the eager values
            # and gradients, checks (read at run time) included
            return _ops.divergence(spec, pm, qm, c, keep, w,
                                   None if validate is None else bool(validate), need_p, need_q)
        if kind == "js":
            return NotImplemented
        # traced: torch operations only (autograd and Inductor take it from here)
        return _reduce(_rows_traced(spec, pm, qm, keep), c, spec)
    use_kernel = (
        _EXT is not None and hasattr(_EXT, "rows_ex") and dev.type == "cpu"
        and _fused_mod._USE_EXTENSION.get()  # torch_fused._extension(False): no kernel
        and not (pm.is_neg() or qm.is_neg() or pm.is_conj() or qm.is_conj())
    )
    if (not use_kernel and n * V >= _fused_mod.FUSED_MIN_ELEMENTS
            and reduction in ("sum", "mean") and kind in _fused_mod.KINDS
            and p_space != "probs" and q_space != "probs"):
        # no kernel (another device, no C extension, or torch_fused._extension(False)) at a
        # large size: the fused module's chunked torch path (the core's "post" hook) keeps
        # the memory bounded; the whole-tensor torch operations below would hold many N x V
        # temporaries (14.75x one input at 4096 x 32000)
        return NotImplemented
    if (use_kernel and key is not None and ax == nd - 1 and p.dtype == q.dtype
            and p.dtype in (torch.float32, torch.float64)):
        # remember the signature: the next call with it takes _lane directly
        if len(_LANE) > 256:
            _LANE.clear()
        spec.gscale = torch.full((n,), c_const, dtype=torch.float64)
        _LANE[key] = spec
    with torch.no_grad():
        if use_kernel:
            res = _kernel_rows(spec, pm, qm, c, keep, need_p, need_q, check)
        else:
            res = _torch_rows(spec, pm, qm, keep, check)
    if res is None:
        return NotImplemented
    rows, gp, gq = res[:3]
    if use_kernel and c is None and spec.reduction != "none":
        total = res[3]  # as _lane does (the same bits on every call)
        value = _scalar(total * spec.c_const, spec.dtype)
    else:
        value = _reduce(rows, c, spec)
    if not (need_p or need_q):
        return value
    box = [value, gp, gq]
    return _Divergence.apply(p, q, c, keep, spec, box, False, use_kernel)


_LANE: dict = {}  # call signature -> _Spec, for the everyday calls (see _lane)


def _lane(spec, p, q, validate):
    """The everyday call: contiguous CPU float32/float64 inputs of one dtype, the category axis
    last, no mask, no weight, signature already checked. None: take the long way."""
    grad_on = torch.is_grad_enabled()
    need_p = grad_on and p.requires_grad
    need_q = grad_on and q.requires_grad
    check = _validation_enabled(validate)
    plan = spec.plan
    if plan is None:
        plan = spec.plan = _plan(spec)
    if plan:
        # one kernel call, its arguments worked out once per signature (see _plan)
        isd, code, swap, flags, inv_t, lims = plan
        n, V = spec.n, spec.V
        try:
            bufs = spec.pool.pop()  # atomic: a buffer pair is never shared between threads
        except IndexError:
            bufs = (torch.empty(n, dtype=torch.float64), torch.empty((n, 2), dtype=torch.float64))
        gp = _lane_gbuf(p) if need_p else None
        gq = _lane_gbuf(q) if need_q else None
        x, y, gx, gy = (q, p, gq, gp) if swap else (p, q, gp, gq)
        st = check and lims
        total, near = _EXT.rows_ex(
            isd, code, n, V, x.data_ptr(), V, y.data_ptr(), V, inv_t, spec.beta, flags,
            spec.gscale.data_ptr() if (need_p or need_q) and spec.c_const != 1.0 else 0,
            bufs[0].data_ptr(), 0 if gx is None else gx.data_ptr(), V,
            0 if gy is None else gy.data_ptr(), V, bufs[1].data_ptr() if st else 0,
            1 if n * V < _SERIAL_ELEMENTS else torch.get_num_threads(), *(lims if st else ()))
        spec.pool.append(bufs)
        if total != total or near:  # a row left to the core, or a check to look at closely
            return None
        value = _scalar(total * spec.c_const, spec.dtype)
        if not (need_p or need_q):
            return value
        return _lane_apply(p, q, [value, gp, gq, spec])
    res = _kernel_rows(spec, p.detach(), q.detach(), None, None, need_p, need_q, check,
                       pooled=spec.reduction != "none")
    if res is None:
        return None
    rows, gp, gq, total = res
    if spec.reduction == "none":
        value = rows.view(spec.rows_shape)
        if spec.c_const != 1.0:
            value = value * spec.c_const
        value = value.to(spec.dtype)
    else:
        value = _scalar(total * spec.c_const, spec.dtype)
    if not (need_p or need_q):
        return value
    return _lane_apply(p, q, [value, gp, gq, spec])



def _scalar(v, dt):
    """The reduced value v (a Python float) as a 0-d tensor of dtype dt: rounded as a float64
    tensor's conversion rounds it (beyond float32's range: +-inf; torch.scalar_tensor raises)."""
    try:
        return torch.scalar_tensor(v, dtype=dt)
    except RuntimeError:
        return torch.scalar_tensor(v, dtype=torch.float64).to(dt)

def _plan(spec):
    """The arguments of _lane's single kernel call, or False where _kernel_rows must run (rows
    that leave the call: reduction "none"; an input converted first: a dtype other than the
    kernel's, probabilities at a temperature; log-probabilities checked apart from the kernel
    at a temperature). Called once per signature (the lane's inputs have the spec's dtype)."""
    t1 = spec.T == 1.0
    dt = spec.dtype
    if spec.reduction == "none" or _kernel_dtype(None, None, spec.p_space, spec.q_space, dt,
                                                 False, spec.T) != dt:
        return False
    if not t1 and (spec.p_space != "logits" or spec.q_space != "logits"):
        return False
    flags = ((1 if spec.p_space == "probs" else 0) | (2 if spec.q_space == "probs" else 0)
             if t1 else 0)
    swap = spec.kind == "reverse"
    lims = ()
    if t1 and (spec.p_space != "logits" or spec.q_space != "logits"):
        tol = _tolerance(torch.finfo(dt).eps, spec.V)
        sides = [(1.0 if sp == "probs" else 0.0, math.inf if sp == "logits" else 0.5 * tol)
                 for sp in (spec.p_space, spec.q_space)]
        if swap:  # the kernel's x is q
            sides.reverse()
            flags = ((flags & 1) << 1) | ((flags >> 1) & 1)
        lims = sides[0] + sides[1]
    elif swap:
        flags = ((flags & 1) << 1) | ((flags >> 1) & 1)
    return (dt == torch.float64, _KIND_CODE[spec.kind], swap, flags, 1.0 / spec.T, lims)


class _Spec:
    """Everything about a call that is not a tensor (one object: cheap to carry)."""

    __slots__ = ("kind", "p_space", "q_space", "T", "beta", "reduction", "dtype", "axis", "n",
                 "V", "c_const", "rows_shape", "gscale", "stat_ref", "tols", "pool", "plan")

    def __init__(self, kind, p_space, q_space, T, beta, reduction, dtype, axis, n, V, c_const,
                 rows_shape):
        self.kind = kind
        self.p_space = p_space
        self.q_space = q_space
        self.T = T
        self.beta = beta
        self.reduction = reduction
        self.dtype = dtype
        self.axis = axis
        self.n = n
        self.V = V
        self.c_const = c_const
        self.rows_shape = rows_shape
        self.gscale = None
        self.stat_ref = None  # (targets, limits, tolerances) of _stats_off
        self.tols = None  # {(dtype, dtype): (tol_p, tol_q)}
        self.pool = []  # (rows, stats) buffers of _kernel_rows(pooled=True), free to take
        self.plan = None  # _lane's kernel call (see _plan); False: none


def _reduce(rows, c, spec):
    """The reduction of per-row values ``rows`` (n,) by the factors c (None: all ones)."""
    dt = spec.dtype
    if c is not None:
        rows = rows * c.to(rows.dtype)
    if spec.reduction == "none":
        out = rows.reshape(spec.rows_shape)
    else:
        out = rows.sum()
    if spec.c_const != 1.0:
        out = out * spec.c_const
    return out.to(dt) if out.dtype != dt else out


# ----------------------------------------------------------------------------------------------
# the autograd Function


class _Divergence(torch.autograd.Function):
    """The value (computed before ``apply`` or, under compile, here) with an analytic backward.

    ``box`` carries the precomputed value and first-order gradients (or None); first-order
    backward hands the gradients over once, every other backward recomputes them in
    differentiable torch operations from the saved inputs.
    """

    @staticmethod
    def forward(ctx, p, q, c, keep, spec, box, traced, kernel):
        ctx.spec = spec
        ctx.kernel = kernel
        ctx.set_materialize_grads(True)
        if traced:
            pm, qm = _moved(p, q, spec)
            rows = _rows_traced(spec, pm, qm, keep)
            value = _reduce(rows, c, spec)
            ctx.grads = None
        else:
            value = box[0]
            ctx.grads = (box[1], box[2])
            box.clear()
        ctx.save_for_backward(p, q, c, keep)
        return value

    @staticmethod
    def backward(ctx, g):
        grads = ctx.grads
        ctx.grads = None
        gp, gq = _backward(ctx, g, ctx.spec, grads, ctx.kernel)
        return gp, gq, None, None, None, None, None, None


class _LaneFunction(torch.autograd.Function):
    """_Divergence for the everyday call (_lane): fewer arguments, less to save."""

    @staticmethod
    def forward(ctx, p, q, box):
        ctx.box = box  # [value, grad_p, grad_q, spec]
        ctx.save_for_backward(p, q)
        return box[0]

    @staticmethod
    def backward(ctx, g):
        box = ctx.box
        gp, gq = box[1], box[2]
        box[1] = box[2] = None
        if gp is None and gq is None:
            grads = None
        elif (box[3].reduction != "none" and g.is_cpu and not torch.is_grad_enabled()
              and float(g) == 1.0):
            # the everyday first-order backward: the forward's gradients as they are (each is
            # there when its input needs one: both come from requires_grad at the forward;
            # the lane's category axis is last, nothing to move back)
            return gp, gq, None
        else:
            grads = (gp, gq)
        gp, gq = _backward(ctx, g, box[3], grads, True)
        return gp, gq, None


def _lane_apply_slow(p, q, box):
    return _LaneFunction.apply(p, q, box)


def _make_lane_apply():
    """``_LaneFunction.apply`` without its Python prologue (the everyday call's largest fixed
    cost after the kernel at small sizes): what ``torch.autograd.Function.apply`` does for a
    Function without ``setup_context`` when no functorch transform is active (the inputs
    unwrapped if dead, then the C ``apply``); under a transform, the full ``apply``. Falls back
    to ``apply`` itself where this torch lacks those internals."""
    try:
        c_apply = super(torch.autograd.Function, _LaneFunction).apply
        active = torch._C._are_functorch_transforms_active
        unwrap = torch._C._functorch.unwrap_if_dead
        if _LaneFunction.setup_context is not torch.autograd.Function.setup_context:
            return _lane_apply_slow  # pragma: no cover - the prologue would bind arguments
    except AttributeError:  # pragma: no cover - other torch versions
        return _lane_apply_slow

    def lane_apply(p, q, box):
        if active():
            return _LaneFunction.apply(p, q, box)
        return c_apply(unwrap(p), unwrap(q), box)

    return lane_apply


_lane_apply = _make_lane_apply()


def _saved(ctx):
    t = ctx.saved_tensors
    return t if len(t) == 4 else (t[0], t[1], None, None)


def _backward(ctx, g, spec, grads, kernel):
    """The gradients for both Functions: handed over, recomputed by the kernel, or recomputed
    in differentiable torch operations (create_graph)."""
    need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    first_order = not torch.is_grad_enabled()
    if first_order and grads is None and kernel:
        # a second first-order backward (retain_graph): the same kernel again, so that
        # repeated backward passes agree to the bit
        p, q, c, keep = _saved(ctx)
        pm, qm = _moved(p, q, spec)
        with torch.no_grad():
            res = _kernel_rows(spec, pm.detach(), qm.detach(), c, keep, need_p, need_q, False)
        if res is not None:
            grads = (res[1], res[2])
    if first_order and grads is not None and (
            (grads[0] is not None or not need_p) and (grads[1] is not None or not need_q)):
        gp, gq = grads
        if spec.reduction == "none":
            gr = g.reshape(spec.n, 1)
            gp = None if gp is None else _times_rows(gp, gr, spec)
            gq = None if gq is None else _times_rows(gq, gr, spec)
        elif not g.is_cpu or float(g) != 1.0:
            gp = None if gp is None else gp.mul_(g.to(gp.dtype))
            gq = None if gq is None else gq.mul_(g.to(gq.dtype))
        return (_unmove(gp, spec) if need_p else None, _unmove(gq, spec) if need_q else None)
    p, q, c, keep = _saved(ctx)
    pm, qm = _moved(p, q, spec)
    s = g.reshape(spec.n) if spec.reduction == "none" else g.reshape(1).expand(spec.n)
    s = s.to(spec.dtype)
    if c is not None:
        s = s * c
    if spec.c_const != 1.0:
        s = s * spec.c_const
    gp, gq = _grads_torch(spec, pm, qm, s, keep, need_p, need_q)
    gp = None if gp is None else _unmove(gp.reshape(pm.shape).to(p.dtype), spec)
    gq = None if gq is None else _unmove(gq.reshape(qm.shape).to(q.dtype), spec)
    return gp, gq


def _times_rows(g2, gr, spec):
    sh = g2.shape
    return (g2.reshape(spec.n, spec.V) * gr.to(g2.dtype)).reshape(sh)


def _moved(p, q, spec):
    if spec.axis != p.dim() - 1:
        return torch.movedim(p, spec.axis, -1), torch.movedim(q, spec.axis, -1)
    return p, q


def _unmove(g, spec):
    """A gradient in the moved layout (..., V) back to the caller's layout."""
    if g is None:
        return None
    if spec.axis != g.dim() - 1:
        return torch.movedim(g, -1, spec.axis)
    return g


# ----------------------------------------------------------------------------------------------
# values (and first-order gradients) without a graph: the C kernel


def _kernel_dtype(x, y, p_space, q_space, dt, force64=False, T=1.0):
    """The kernel's element type: float64 where a probability's logarithm needs it."""
    if dt == torch.float64 or force64:
        return torch.float64
    if (p_space == "probs" or q_space == "probs") and T != 1.0:
        # float32 probabilities at a temperature go in as logarithms: float64 ones keep the
        # log-ratio of close values as exact as the core's route does (at T = 1 the kernel takes
        # the probabilities themselves and forms log1p of their relative difference, or log p in
        # double against log-space input); a float32 log p would be off by 6e-8 |log p| before
        # the division by T, the whole log-ratio of a near-convergent row (5.8e-5 relative at
        # KL 1.4e-7, audit finding 2)
        return torch.float64
    return torch.float32


def _kernel_rows(spec, pm, qm, c, keep, need_p, need_q, check, force64=False, pooled=False):
    """Rows (float64, (n,)), gradients of sum_r c_r rows_r, and the rows' sum, by the C kernel.

    None means: a row the kernel leaves alone (nan, +inf, no finite entry, extreme ratios) or a
    failed check; the caller hands the whole call to the core.

    One loop over chunks of rows. A side goes to the kernel as it is (no pass of its own) when
    it has the kernel's dtype and unit stride; probabilities too at temperature 1 (the kernel
    takes them directly, and its gradient is with respect to them). Otherwise a chunk at a time
    is converted (dtype, layout; probabilities at a temperature to logarithms), so that no extra
    N x V tensor is made. At temperature 1 the value checks come from the kernel's own walk
    (each row's sum of probabilities or logsumexp, see ``_fused.rows_ex``), which also returns
    the rows' sum and whether any row's statistic lies near the border (only then are the
    statistics looked at here).

    ``pooled``: the rows do not leave this function (only their sum is used), so the row
    buffers are taken from (and given back to) ``spec.pool``: no allocation on repeated calls.
    """
    n, V = spec.n, spec.V
    x = pm.reshape(n, V)
    y = qm.reshape(n, V)
    T = spec.T
    t1 = T == 1.0
    kd = _kernel_dtype(x, y, spec.p_space, spec.q_space, spec.dtype, force64, T)
    scale = None if c is None else c.to(torch.float64).contiguous()
    if spec.c_const != 1.0 and (need_p or need_q):
        if scale is None:
            gscale = spec.gscale
            if gscale is None:
                gscale = spec.gscale = torch.full((n,), spec.c_const, dtype=torch.float64)
        else:
            gscale = scale * spec.c_const
    else:
        gscale = scale
    # row normalisers for the value checks (logits have none to check)
    need_stats = check and t1 and (spec.p_space != "logits" or spec.q_space != "logits")
    bufs = None
    if pooled:
        try:
            bufs = spec.pool.pop()  # atomic: a buffer pair is never shared between threads
        except IndexError:
            bufs = (torch.empty(n, dtype=torch.float64), torch.empty((n, 2), dtype=torch.float64))
        rows = bufs[0]
        stats = bufs[1] if need_stats else None
    else:
        rows = torch.empty(n, dtype=torch.float64)
        stats = torch.empty((n, 2), dtype=torch.float64) if need_stats else None
    gp = _gbuf(n, V, pm) if need_p else None
    gq = _gbuf(n, V, qm) if need_q else None
    sp_p = spec.p_space == "probs"
    sp_q = spec.q_space == "probs"
    flags = (1 if sp_p and t1 else 0) | (2 if sp_q and t1 else 0)
    # converted: a side that needs a pass before the kernel (log p at a temperature, dtype,
    # layout); logged: one fed as log p (its gradient comes back with respect to log p)
    log_p = sp_p and not t1
    log_q = sp_q and not t1
    conv_p = log_p or x.dtype != kd or x.stride(-1) != 1
    conv_q = log_q or y.dtype != kd or y.stride(-1) != 1
    step = _chunk_rows(n, V) if (conv_p or conv_q) else n
    own_p = need_p and not log_p and gp.dtype == kd
    own_q = need_q and not log_q and gq.dtype == kd
    tol_p = tol_q = 0.0
    if check:
        tk = (x.dtype, y.dtype)
        if spec.tols is None or spec.tols[0] != tk:
            spec.tols = (tk, _tolerance(torch.finfo(x.dtype).eps, V),
                         _tolerance(torch.finfo(y.dtype).eps, V))
        tol_p, tol_q = spec.tols[1], spec.tols[2]
    lims = None
    if need_stats:  # half the tolerance around 1 (sum of probabilities) or 0 (logsumexp)
        lims = tuple(v for sp, tol in ((spec.p_space, tol_p), (spec.q_space, tol_q))
                     for v in ((1.0 if sp == "probs" else 0.0),
                               (math.inf if sp == "logits" else 0.5 * tol)))
    checks = []
    redo = []
    total = 0.0
    near = False
    for i in range(0, n, step):
        j1 = min(i + step, n)
        m = j1 - i
        xs, ys = (x, y) if step == n else (x[i:j1], y[i:j1])
        if conv_p:
            xc, xl, xbad, xtiny = _to_log(xs, spec.p_space, kd, tol_p, check and not t1, log_p)
        else:
            xc = xl = xs
            xbad = xtiny = None
        if conv_q:
            yc, yl, ybad, ytiny = _to_log(ys, spec.q_space, kd, tol_q, check and not t1, log_q)
        else:
            yc = yl = ys
            ybad = ytiny = None
        gxc = gyc = None
        if need_p:
            gxc = (gp if step == n else gp[i:j1]) if own_p else torch.empty((m, V), dtype=kd)
        if need_q:
            gyc = (gq if step == n else gq[i:j1]) if own_q else torch.empty((m, V), dtype=kd)
        sc = None if gscale is None else (gscale if step == n else gscale[i:j1])
        rc = rows if step == n else rows[i:j1]
        stc = None if stats is None else (stats if step == n else stats[i:j1])
        tc, nc = _run(spec.kind, xl, yl, T, sc, rc, gxc, gyc, spec.beta, flags, stc, lims)
        total += tc
        near = near or nc
        if gxc is not None and not own_p:
            gp[i:j1] = _grad_to_input(gxc, xc, log_p)
        if gyc is not None and not own_q:
            gq[i:j1] = _grad_to_input(gyc, yc, log_q)
        for t in (xtiny, ytiny):
            if t is not None:
                redo.append(t)
        for b in (xbad, ybad):  # failed checks, and rows the kernel cannot take
            if b is not None:
                checks.append(b if keep is None else b & keep[i:j1])
    if check and not t1:  # log-probabilities that went in as they are: their check
        for side, space, conv in ((x, spec.p_space, conv_p), (y, spec.q_space, conv_q)):
            if space == "log_probs" and not conv:
                checks.append(_lse_off_chunked(side, keep, n, V))
    if redo and _has_tiny_probabilities(redo, x, y, spec):
        # a float32 probability below the float32 kernel's exponential range: all again in
        # float64 (rare; the core keeps such probabilities, and so must this path)
        if bufs is not None:
            spec.pool.append(bufs)
        return _kernel_rows(spec, pm, qm, c, keep, need_p, need_q, check, True)
    # total nan: a row the kernel leaves to the core (skipped rows are 0)
    ok = total == total and not (near and _stats_off(stats, x, y, spec, tol_p, tol_q, keep))
    if bufs is not None:
        spec.pool.append(bufs)
    if not ok:
        return None
    for b in checks:
        if bool(b.any()):
            return None
    if gp is not None and pm.dim() != 2:
        gp = gp.view(pm.shape[:-1] + (V,))
    if gq is not None and qm.dim() != 2:
        gq = gq.view(qm.shape[:-1] + (V,))
    return rows, gp, gq, total


def _lane_gbuf(t):
    """_gbuf for the lane's contiguous input ``t``: a buffer of t's shape (no view needed);
    below the cache's size ``torch.empty_like`` (half the cost of ``torch.empty`` with a shape
    and a dtype to parse at 64 x 10)."""
    if t.numel() * t.element_size() < _fused_mod.GRAD_CACHE_MIN_BYTES:
        return torch.empty_like(t)
    return _grad_buffer(t.shape, t.dtype)


def _gbuf(n, V, t):
    """A gradient buffer: small ones from torch.empty, large ones reused across steps."""
    if n * V * t.element_size() < _fused_mod.GRAD_CACHE_MIN_BYTES:
        return torch.empty((n, V), dtype=t.dtype)
    return _grad_buffer((n, V), t.dtype)


def _stats_off(stats, x, y, spec, tol_p, tol_q, keep):
    """The core's normalisation checks from the kernel's row statistics (temperature 1).

    A row whose statistic lies beyond half the tolerance is checked again exactly as the core
    does (its own sum or logsumexp of the input), so that the border between accepted and
    refused is the core's to the last bit; any such row off: True (the core raises)."""
    ref = spec.stat_ref
    if ref is None or ref[2] != (tol_p, tol_q):
        # per column: the expected statistic (1: sum of probabilities, 0: logsumexp) and half
        # the tolerance (logits: no check)
        tgt = [1.0 if sp == "probs" else 0.0 for sp in (spec.p_space, spec.q_space)]
        lim = [math.inf if sp == "logits" else 0.5 * tol
               for sp, tol in ((spec.p_space, tol_p), (spec.q_space, tol_q))]
        ref = spec.stat_ref = (torch.tensor(tgt, dtype=torch.float64),
                               torch.tensor(lim, dtype=torch.float64), (tol_p, tol_q))
    near = (stats - ref[0]).abs() > ref[1]  # nan (a row the kernel left) is not near
    if keep is not None:
        near = near & keep[:, None]
    if not bool(near.any()):
        return False
    sides = []
    if spec.p_space != "logits":
        sides.append((0, x, spec.p_space, tol_p))
    if spec.q_space != "logits":
        sides.append((1, y, spec.q_space, tol_q))
    for col, side, space, tol in sides:
        st = stats[:, col]
        dev = (st - 1.0).abs() if space == "probs" else st.abs()
        near = dev > 0.5 * tol
        if keep is not None:
            near = near & keep
        if not bool(near.any()):
            continue
        idx = near.nonzero().flatten()
        r = side.index_select(0, idx)
        if space == "probs":
            off = (r.sum(-1) - 1).abs() > tol
        else:
            off = torch.logsumexp(r, -1).abs() > tol
        if bool(off.any()):
            return True
    return False


def _has_tiny_probabilities(flags, x, y, spec):
    """Whether a candidate row (a row whose log has an entry below -87: zeros included) of a
    probability side holds a probability in (0, e^-87)."""
    cand = torch.cat(flags) if len(flags) > 1 else flags[0]
    if not bool(cand.any()):
        return False
    rows = cand.nonzero().flatten()
    for side, space in ((x, spec.p_space), (y, spec.q_space)):
        if space == "probs":
            r = side.index_select(0, rows)
            if bool(((r > 0) & (r < 1.7e-38)).any()):
                return True
    return False


_KIND_CODE = {"forward": 0, "reverse": 0, "js": 1, "jeffreys": 2}
_SERIAL_ELEMENTS = 1 << 15  # below this many elements the kernel runs on one thread


def _run(kind, x, y, T, scale, rows, gx, gy, beta=0.5, flags=0, stats=None, lims=None):
    """One kernel call: KL(p || q) ("forward"), KL(q || p) ("reverse"), JS_beta ("js") or
    Jeffreys (both KL directions in one call, "jeffreys") per row of x, y; flags: 1 = x holds
    probabilities, 2 = y does; stats: (n, 2) row normalisers; lims: (target, limit) of p's
    statistic then q's. Returns (sum of the rows, whether a row's statistic lies beyond its
    limit)."""
    if kind == "reverse":
        x, y, gx, gy = y, x, gy, gx
        flags = ((flags & 1) << 1) | ((flags >> 1) & 1)
        if stats is not None:  # the kernel writes x's then y's: swapped back below
            st = torch.empty_like(stats)
    n, V = x.shape
    # small calls on one thread: waking a team costs more than the work (and far more on a
    # loaded machine)
    threads = 1 if n * V < _SERIAL_ELEMENTS else torch.get_num_threads()
    if lims is None or stats is None:
        lims = ()
    elif kind == "reverse":  # the kernel's x is q
        lims = lims[2:] + lims[:2]
    out = _EXT.rows_ex(
        x.dtype == torch.float64, _KIND_CODE[kind], n, V, x.data_ptr(), x.stride(0),
        y.data_ptr(), y.stride(0), 1.0 / T, beta, flags,
        0 if scale is None else scale.data_ptr(), rows.data_ptr(),
        0 if gx is None else gx.data_ptr(), 0 if gx is None else gx.stride(0),
        0 if gy is None else gy.data_ptr(), 0 if gy is None else gy.stride(0),
        0 if stats is None else (st if kind == "reverse" else stats).data_ptr(), threads, *lims
    )
    if kind == "reverse" and stats is not None:
        stats[:, 0] = st[:, 1]
        stats[:, 1] = st[:, 0]
    return out


def _to_log(xc, space, kd, tol, check, as_log):
    """A chunk in the kernel's dtype and layout, as logarithms where ``as_log`` (probabilities at
    a temperature).

    Returns (converted input, kernel input, bad rows, rows the kernel's dtype cannot take)."""
    xk = xc.to(kd)
    # the kernel reads rows with unit stride along V (and torch.log below keeps its input's
    # layout): column-major or otherwise strided chunks are copied first
    if xk.stride(-1) != 1 or xk.stride(0) != xk.shape[1]:
        xk = xk.contiguous()
    if as_log:
        bad = (xk.sum(-1) - 1).abs() > tol if check else None
        lx = torch.log(xk)  # p < 0 and nan give nan: the kernel reports the row
        tiny = None
        if xc.dtype == torch.float64:
            # the kernel's exponential stops at e^-708: a float64 probability below ~1e-300
            # would count as 0 there (the core keeps it): such rows go to the core
            t = ((lx < -690.0) & (lx > _NINF)).any(-1)
            bad = t if bad is None else bad | t
        elif kd == torch.float32:
            # float32's exponential stops at e^-87 (its subnormals): float64 takes those. One
            # reduction finds the candidates (zeros too); the caller looks closer at those only
            tiny = lx.amin(-1) < -87.0
        return xk, lx, bad, tiny
    bad = None
    if check and space == "probs":
        bad = (xk.sum(-1) - 1).abs() > tol
    elif check and space == "log_probs":
        bad = _log_probs_off(xk, tol)
    return xk, xk, bad, None


def _log_probs_off(x, tol):
    """Rows whose logsumexp is off 0 by more than ``tol`` (the core's check for log-probabilities;
    with |lse| <= tol the maximum is <= tol too). No max shift is needed at lse ~ 0: rows where
    exp overflows or underflows as a whole are flagged and the core decides."""
    s = torch.exp(x).sum(-1)
    return (s < math.exp(-tol)) | (s > math.exp(tol))


def _grad_to_input(gl, xk, is_probs):
    """The gradient with respect to the input from the one with respect to its logarithm."""
    if not is_probs:
        return gl
    # d/dp = (d/d log p) / p; 0 where p = 0 (the core's one-sided convention)
    pos = xk > 0
    return torch.where(pos, gl / torch.where(pos, xk, torch.ones_like(xk)),
                       torch.zeros_like(gl))


def _lse_off_chunked(x, keep, n, V):
    """Rows of log-probabilities whose logsumexp is off 0 by more than the tolerance."""
    tol = _tolerance(torch.finfo(x.dtype).eps, V)
    step = _chunk_rows(n, V)
    if step >= n:
        off = _log_probs_off(x, tol)
    else:
        off = torch.cat([_log_probs_off(x[i:i + step], tol) for i in range(0, n, step)])
    return off if keep is None else off & keep


# ----------------------------------------------------------------------------------------------
# values without a graph and without the kernel


def _torch_rows(spec, pm, qm, keep, check):
    """Rows by torch operations (other devices, JS); None when a check fails or a row is nan."""
    n, V = spec.n, spec.V
    x = pm.reshape(n, V)
    y = qm.reshape(n, V)
    if check:
        for side, space in ((x, spec.p_space), (y, spec.q_space)):
            off = _row_flags(side, space, V)
            if keep is not None:
                off = off & keep
            if bool(off.any()):
                return None
    xd, yd = _safe_rows(x.to(spec.dtype), y.to(spec.dtype), keep, spec)
    if spec.kind == "js":
        from .._core import divergence as _div
        from array_api_compat import torch as xp

        rows = _div.divergence_rows("js", xp, xd, yd, spec.p_space, spec.q_space, spec.T,
                                    spec.beta)
    else:
        rows = _rows_kl_family(spec, xd, yd)
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    if bool(torch.isnan(rows).any()):
        return None
    return rows, None, None


def _rows_traced(spec, pm, qm, keep):
    """Rows under torch.compile: torch operations only, no checks, no synchronisation."""
    n, V = spec.n, spec.V
    x, y = _safe_rows(pm.reshape(n, V).to(spec.dtype), qm.reshape(n, V).to(spec.dtype), keep,
                      spec)
    rows = _rows_kl_family(spec, x, y)
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    return rows


def _row_flags(x, space, V):
    """The core's value checks as per-row flags, in one or two reductions."""
    if space == "probs":
        lo, hi = torch.aminmax(x, dim=-1)
        tol = _tolerance(torch.finfo(x.dtype).eps, V)
        return ~(lo >= 0) | ~(hi < math.inf) | ((x.sum(-1) - 1).abs() > tol)
    top = x.amax(-1)
    bad = ~(top < math.inf) | (top == _NINF)
    if space == "log_probs":
        tol = _tolerance(torch.finfo(x.dtype).eps, V)
        bad = bad | (torch.logsumexp(x, -1).abs() > tol)
    return bad


def _safe_rows(x, y, keep, spec):
    """Masked rows replaced by a uniform row on both sides (they may hold anything)."""
    if keep is None:
        return x, y
    k = keep[:, None]
    return (torch.where(k, x, _uniform(x, spec.p_space, spec.V)),
            torch.where(k, y, _uniform(y, spec.q_space, spec.V)))


def _uniform(x, space, V):
    if space == "probs":
        return torch.full((), 1.0 / V, dtype=x.dtype, device=x.device)
    if space == "log_probs":
        return torch.full((), -math.log(V), dtype=x.dtype, device=x.device)
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _log_input(x, space, T):
    """A side in log space before the temperature: log p for probabilities (-inf at 0)."""
    if space == "probs":
        pos = x > 0
        return torch.where(pos, torch.log(torch.where(pos, x, torch.ones_like(x))),
                           torch.full_like(x, _NINF))
    return x


def _rows_kl_family(spec, x, y):
    """KL / reverse / Jeffreys rows of two (n, V) inputs in the compute dtype, torch ops only."""
    a = _log_input(x, spec.p_space, spec.T)
    b = _log_input(y, spec.q_space, spec.T)
    both_probs = spec.p_space == "probs" and spec.q_space == "probs" and spec.T == 1.0
    if spec.kind == "forward":
        return _kl_rows(a, b, spec.T, x, y, both_probs)
    if spec.kind == "reverse":
        return _kl_rows(b, a, spec.T, y, x, both_probs)
    return _kl_rows(a, b, spec.T, x, y, both_probs) + _kl_rows(b, a, spec.T, y, x, both_probs)


def _log_ratio_raw(a, b, it, x, y, both_probs, inS):
    """log q_i - log p_i up to a row constant, on the common support (0 elsewhere).

    The difference of the raw inputs first, then the temperature (the core's order); for two
    probabilities within a factor 2, log1p of the exact relative difference."""
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    if both_probs:
        one = torch.ones((), dtype=a.dtype, device=a.device)
        ps = torch.where(inS, x, one)
        qs = torch.where(inS, y, one)
        near = (qs >= 0.5 * ps) & (qs <= 2 * ps)
        pn = torch.where(near, ps, one)
        qn = torch.where(near, qs, one)
        d = torch.where(near, torch.log1p((qn - pn) / pn), torch.log(qs) - torch.log(ps))
        return torch.where(inS, d, zero), zero, zero
    d, ma, mb = _raw_difference(a, b, inS)
    return (d * it if it != 1.0 else d), ma, mb


def _raw_difference(a, b, inS):
    """b_i - a_i on the common support up to a row constant (0 elsewhere), by the more accurate
    of two routes per entry: the raw difference minus the difference of the maxima (exact for
    close inputs), or the difference of the sides each centred on its own maximum (a logit of
    1e30 or -1e30 on one side must not swallow the other side's digits)."""
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    a_s = torch.where(inS, a, zero)
    b_s = torch.where(inS, b, zero)
    ma = torch.where(inS, a_s, torch.full_like(a_s, _NINF)).amax(-1, keepdim=True).detach()
    mb = torch.where(inS, b_s, torch.full_like(b_s, _NINF)).amax(-1, keepdim=True).detach()
    ma = torch.where(torch.isfinite(ma), ma, zero)
    mb = torch.where(torch.isfinite(mb), mb, zero)
    raw = (b_s - a_s) - (mb - ma)
    cen = (b_s - mb) - (a_s - ma)
    use_raw = ((b_s - a_s).abs() + (mb - ma).abs()) <= ((a_s - ma).abs() + (b_s - mb).abs())
    return torch.where(inS, torch.where(use_raw, raw, cen), zero), ma, mb


def _phi(z):
    coefs = _PHI_COEFS if z.dtype == torch.float64 else _PHI_COEFS[:9]
    acc = torch.full_like(z, coefs[-1])
    for k in reversed(coefs[:-1]):
        acc = acc * z + k
    return acc * z * z


def _kl_rows(a, b, T, x, y, both_probs):
    """KL(softmax(a/T) || softmax(b/T)) per row: the kernel's algebra in torch operations.

    KL = log(1 + sum_S p_i phi(d'_i)) - log q(S), d' the p-centred log-ratio on p's support S;
    past ~57 (float32) or ~678 (float64) KL = lc + log Zq instead (no cancellation there).
    """
    it = 1.0 / T
    dt = a.dtype
    zero = torch.zeros((), dtype=dt, device=a.device)
    pa = a > _NINF
    pb = b > _NINF
    inS = pa & pb
    esc = (pa & ~pb).any(-1)
    ma = a.amax(-1, keepdim=True)
    mb = b.amax(-1, keepdim=True)
    ma = torch.where(torch.isfinite(ma), ma, zero)
    mb = torch.where(torch.isfinite(mb), mb, zero)
    ea = torch.exp((a - ma) * it)
    eb = torch.exp((b - mb) * it)
    # d = (b - a) / T - (mb_S - ma_S) / T on the common support S (maxima over S)
    d, ma_S, mb_S = _log_ratio_raw(a, b, it, x, y, both_probs, inS)
    Za = ea.sum(-1, keepdim=True)
    Zb = eb.sum(-1, keepdim=True)
    mu = (ea * d).sum(-1, keepdim=True) / Za
    qo = torch.where(pa, zero, eb).sum(-1, keepdim=True) / Zb
    qS = torch.where(inS, eb, zero).sum(-1, keepdim=True) / Zb
    log_qS = torch.where(qo < 0.5, torch.log1p(-torch.where(qo < 0.5, qo, zero)), torch.log(qS))
    # p_i e^{d'_i} = e^{lc} eb_i; the maxima's difference taken before anything large
    lc = ((mb - mb_S) - (ma - ma_S)) * it - torch.log(Za) - mu
    huge = lc > (57.0 if dt == torch.float32 else 678.0)
    cc = torch.exp(torch.where(huge, zero, lc))
    P = ea / Za
    dc = torch.where(inS, d - mu, zero)
    small = dc.abs() < _SMALL
    ser = _phi(torch.where(small, dc, zero))
    term = torch.where(small, P * ser, cc * eb - P * (1 + dc))
    acc = torch.where(inS, term, zero).sum(-1, keepdim=True)
    kl = torch.where(huge, lc + torch.log(Zb), torch.log1p(acc) - log_qS)[:, 0]
    return torch.where(esc, torch.full_like(kl, math.inf), kl)


# ----------------------------------------------------------------------------------------------
# analytic gradients in differentiable torch operations


class _Side:
    __slots__ = ("S", "W", "lw", "raw", "top", "to_input")


def _anchored(v, S, top, it):
    """log-softmax(v / T) on the support S, anchored at the mode (the entry ``top``).

    With u_j = (v_j - v_top) / T and R = sum_{j != top} e^{u_j}: log w_top = -log1p(R),
    log w_j = u_j - log1p(R). The mode enters only through the differences u_j, so every
    derivative of these (and of anything built on them) is formed without 1 - w_top: at a
    saturated mode (w_top = 1 in the dtype) d log w_top / d v_top = R / (1 + R) / T keeps its
    digits where the plain log-softmax's 1 - w_top rounds to 0 (second derivatives, audit 3 F5).
    """
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    vt = torch.where(top, v, zero).sum(-1, keepdim=True)
    vt = torch.where(torch.isfinite(vt), vt, zero)
    u = torch.where(S & ~top, (v - vt) * it, torch.full_like(v, _NINF))
    L = torch.log1p(torch.exp(u).sum(-1, keepdim=True))
    lw = torch.where(S, torch.where(top, -L, u - L), zero)
    return lw, torch.where(S, torch.exp(lw), zero)


def _mode(x, S):
    """The row's largest entry on the support S (one per row; the first of ties), as a mask."""
    idx = torch.where(S, x, torch.full_like(x, _NINF)).detach().argmax(-1, keepdim=True)
    return torch.zeros_like(S).scatter_(-1, idx, True)


def _minus_rest(g, top):
    """A gradient that sums to 0 over the row, its entry at ``top`` formed as minus the sum of
    the others: exact where the entry's own formula cancels (a saturated mode), and so is its
    derivative (Hessian rows of the mode = minus the sum of the other rows)."""
    rest = torch.where(top, torch.zeros((), dtype=g.dtype, device=g.device), g)
    return torch.where(top, -rest.sum(-1, keepdim=True), rest)


def _side(x, space, it):
    """One side normalised with differentiable operations: support, probabilities, logs, the
    mode; anchored at the mode (_anchored) so that their derivatives do not cancel there."""
    s = _Side()
    dt = x.dtype
    zero = torch.zeros((), dtype=dt, device=x.device)
    one = torch.ones((), dtype=dt, device=x.device)
    if space == "probs":
        S = x > 0
        xs = torch.where(S, x, one)
        top = _mode(x, S)
        s.raw = torch.where(S, torch.log(xs), zero)
        if it == 1.0:
            # w_j = x_j / (x_top + r), w_top = 1 / (1 + r / x_top), r the others' sum
            xz = torch.where(S, x, zero)
            xt = torch.where(top, xz, zero).sum(-1, keepdim=True)
            r = torch.where(top, zero, xz).sum(-1, keepdim=True)
            Z = xt + r
            ratio = r / torch.where(xt > 0, xt, one)
            s.W = torch.where(top, 1 / (1 + ratio), xz / Z)
            s.lw = torch.where(S, torch.where(top, -torch.log1p(ratio), s.raw - torch.log(Z)),
                               zero)
        else:
            s.lw, s.W = _anchored(s.raw, S, top, it)
        s.S = S
        s.top = top
        s.to_input = lambda gl: torch.where(S, gl / xs, zero)
        return s
    S = x > _NINF
    top = _mode(x, S)
    s.lw, s.W = _anchored(x, S, top, it)
    s.raw = torch.where(S, x, zero)
    s.S = S
    s.top = top
    s.to_input = lambda gl: gl
    return s


def _d_raw(A, B, it, both_probs, x, y, C):
    """log(B_i / A_i) up to a row constant on C (0 elsewhere), as accurate as the inputs allow."""
    zero = torch.zeros((), dtype=A.raw.dtype, device=A.raw.device)
    if both_probs:
        one = torch.ones((), dtype=zero.dtype, device=zero.device)
        ps = torch.where(C, x, one)
        qs = torch.where(C, y, one)
        near = (qs >= 0.5 * ps) & (qs <= 2 * ps)
        pn = torch.where(near, ps, one)
        qn = torch.where(near, qs, one)
        d = torch.where(near, torch.log1p((qn - pn) / pn), torch.log(qs) - torch.log(ps))
        return torch.where(C, d, zero)
    d = _raw_difference(A.raw, B.raw, C)[0]
    return d * it if it != 1.0 else d


def _kl_grads(A, B, it, s, d, C, need_a, need_b):
    """Gradients (w.r.t. each side's log input) of sum_r s_r KL(A_r || B_r); s zero on inf rows.

    d/d log a = -s/T A (d - E_A d),   d/d log b = s/T (B - A), with B - A = A expm1(log B/A)
    on the common support (accurate near convergence: log B/A = d' + E_A[log B/A], the mean
    being -KL, taken at its accurate value with the derivative of its plain formula).
    """
    zero = torch.zeros((), dtype=A.W.dtype, device=A.W.device)
    sc = (s * it)[:, None]
    # d anchored at A's mode (0 there): E_A d then holds no large row constant to cancel
    d = torch.where(C, d - torch.where(A.top, d, zero).sum(-1, keepdim=True), zero)
    mu = (A.W * d).sum(-1, keepdim=True)
    dc = torch.where(C, d - mu, zero)
    ga = _minus_rest(-sc * A.W * dc, A.top) if need_a else None
    gb = None
    if need_b:
        # E_A[log B/A] (= -KL where finite), its derivative from the plain formula
        md = torch.where(C, A.W * (B.lw - A.lw), zero).sum(-1, keepdim=True)
        ld = dc + md
        # near convergence only (KL < 1/2); farther, B - A has no cancellation to fear and the
        # mean may be huge (a logit of -1e30 where A is not 0)
        # (and above -1: expm1's derivative, formed as expm1 + 1, would cancel below that,
        # where B - A itself has no cancellation)
        lo = (ld < 1) & (ld > -1) & (md > -0.5)
        t = torch.where(lo, A.W * torch.expm1(torch.where(lo, ld, zero)), B.W - A.W)
        gb = sc * torch.where(C, t, B.W)  # off A's support B - A = B (0 off B's support too)
        gb = _minus_rest(gb, B.top)
    return ga, gb


def _log_mix(c, d):
    """log(1 - c + c e^d), accurate near d = 0 and safe for large |d|; so is its derivative
    c e^d / (1 - c + c e^d): below d = -1 the sum of the two positive terms (expm1's derivative,
    formed as expm1(d) + 1, rounds to 0 for d below -17 in float32)."""
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    lo = d < 1
    mid = lo & (d > -1)
    ds = torch.where(mid, d, zero)
    dn = torch.where(lo, d, zero)
    dl = torch.where(lo, zero + 1, d)
    return torch.where(mid, torch.log1p(c * torch.expm1(ds)),
                       torch.where(lo, torch.log((1 - c) + c * torch.exp(dn)),
                                   math.log(c) + dl + torch.log1p((1 - c) / c * torch.exp(-dl))))


def _js_log_mix(A, C, dd, d, c):
    """log(m / a) on A's support (0 elsewhere) up to a row constant, for JS's gradient w.r.t. a.

    m = (1 - c) a + c o (o the other side: c = 1 - beta for p, beta for q), dd = log(o / a) on
    the common support C (0 off it), d the same up to a row constant (closer differences).
    The value is log(m_j / a_j) - log(m_k / a_k), k a's largest entry on C (the anchor): with
    rho = c o_k / m_k = sigmoid(dd_k + log(c / (1 - c))), log(1 - rho + rho e^(d_j - d_k)) on C
    and log(1 - rho) off it. The row constant (log(1 - c) where o << a, 0 near convergence)
    never enters, so y - E_a y keeps its digits where a's mass sits on entries that o lacks (far
    rows). Its derivative is that of log(m_j / a_j) itself (_log_mix of dd_j, the row constant
    held fixed: y - E_a y does not depend on it), which keeps its digits at a saturated mode of
    the other side (the anchored form's own derivative would cancel there).
    """
    zero = torch.zeros((), dtype=dd.dtype, device=dd.device)
    y = torch.where(C, _log_mix(c, dd), torch.full_like(dd, math.log1p(-c)))
    y = torch.where(A.S, y, zero)
    with torch.no_grad():
        lk = math.log(c) - math.log1p(-c)
        an = _mode(A.lw, C)
        dda = torch.where(an, dd, zero).sum(-1, keepdim=True)
        da = torch.where(an, d, zero).sum(-1, keepdim=True)
        lc = torch.nn.functional.logsigmoid(dda + lk)  # log rho
        loc = torch.nn.functional.logsigmoid(-(dda + lk))  # log(1 - rho)
        delta = torch.where(C, d - da, zero)
        mid = delta.abs() < 1
        w = torch.where(mid, torch.log1p(torch.exp(lc) * torch.expm1(delta)),
                        torch.logaddexp(loc, lc + delta))
        w = torch.where(C, w, torch.where(A.S, loc, zero))
    return (y - y.detach()) + w


def _span(v, it, S):
    """Per row: the spread of the finite entries of v on S, divided by T (+inf where it
    overflows)."""
    lo = torch.where(S, v, torch.full_like(v, math.inf)).amin(-1)
    hi = torch.where(S, v, torch.full_like(v, _NINF)).amax(-1)
    return torch.where(lo <= hi, (hi - lo) * it, torch.zeros_like(lo))


def _wide_rows(x, y, spec, it):
    """Whether some row's log-space differences leave the float range: a side's spread, or the
    two sides' difference, divided by T (float32 logits of +-3e38, finfo.min masks at T < 1).
    The differentiable formulas below anchor each side at its mode and difference the sides
    there; on such rows they meet inf - inf (a whole Hessian row of nan under create_graph).
    Known without tracing only; under tracing (torch.compile) False."""
    if not _concrete(x):
        return False
    with torch.no_grad():
        x, y = x.detach(), y.detach()
        wide = None
        for v, space in ((x, spec.p_space), (y, spec.q_space)):
            if space != "probs":
                S = torch.isfinite(v)
                w = ~torch.isfinite(_span(v, it, S))
                wide = w if wide is None else wide | w
        if spec.p_space != "probs" and spec.q_space != "probs":
            S = torch.isfinite(x) & torch.isfinite(y)
            w = ~torch.isfinite(_span(y - x, it, S))
            wide = w if wide is None else wide | w
        return wide is not None and bool(wide.any())


def _concrete(x):
    try:
        return not torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return True


def _core_grads(spec, x, y, s, keep, need_p, need_q):
    """The gradients of sum_r s_r rows_r from the core's rows (``divergence_rows``), in
    differentiable operations (create_graph): for batches with a row that ``_wide_rows``
    flags, where the core's exact log-ratio (TwoSum, in units of min(T, 1) / 4) keeps the
    first and second derivatives finite and right."""
    from .._core._xp import namespace
    from .._core.divergence import divergence_rows

    with torch.enable_grad():
        xin = x if (not need_p or x.requires_grad) else x.detach().requires_grad_()
        yin = y if (not need_q or y.requires_grad) else y.detach().requires_grad_()
        rows = divergence_rows(spec.kind, namespace(xin), xin, yin, spec.p_space, spec.q_space,
                               spec.T, spec.beta)
        if keep is not None:
            s = torch.where(keep, s, torch.zeros((), dtype=s.dtype, device=s.device))
        wrt = [v for v, need in ((xin, need_p), (yin, need_q)) if need]
        got = list(torch.autograd.grad((rows * s).sum(), wrt, create_graph=True,
                                       allow_unused=True))
    out = []
    for v, need in ((xin, need_p), (yin, need_q)):
        if not need:
            out.append(None)
            continue
        g = got.pop(0)
        out.append(torch.zeros_like(v) if g is None else g)
    return out[0], out[1]


def _grads_torch(spec, pm, qm, s, keep, need_p, need_q):
    """Gradients of sum_r s_r rows_r with respect to p and q, in differentiable operations."""
    n, V = spec.n, spec.V
    it = 1.0 / spec.T
    x = pm.reshape(n, V).to(spec.dtype)
    y = qm.reshape(n, V).to(spec.dtype)
    x, y = _safe_rows(x, y, keep, spec)
    if _wide_rows(x, y, spec, it):
        return _core_grads(spec, x, y, s, keep, need_p, need_q)
    P = _side(x, spec.p_space, it)
    Q = _side(y, spec.q_space, it)
    C = P.S & Q.S
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    both_probs = spec.p_space == "probs" and spec.q_space == "probs" and spec.T == 1.0
    p_esc = (P.S & ~Q.S).any(-1)
    q_esc = (Q.S & ~P.S).any(-1)
    kind = spec.kind
    if kind == "forward":
        s = torch.where(p_esc, zero, s)
    elif kind == "reverse":
        s = torch.where(q_esc, zero, s)
    elif kind == "jeffreys":
        s = torch.where(p_esc | q_esc, zero, s)
    if keep is not None:
        s = torch.where(keep, s, zero)
    gp = gq = None
    if kind in ("forward", "jeffreys"):
        d = _d_raw(P, Q, it, both_probs, x, y, C)
        gp, gq = _kl_grads(P, Q, it, s, d, C, need_p, need_q)
    if kind in ("reverse", "jeffreys"):
        d = _d_raw(Q, P, it, both_probs, y, x, C)
        g2q, g2p = _kl_grads(Q, P, it, s, d, C, need_q, need_p)
        gp = g2p if gp is None else (gp + g2p if g2p is not None else gp)
        gq = g2q if gq is None else (gq + g2q if g2q is not None else gq)
    if kind == "js":
        beta = spec.beta
        dd = torch.where(C, Q.lw - P.lw, zero)  # log q/p on the common support
        d = _d_raw(P, Q, it, both_probs, x, y, C)  # the same up to a row constant
        if need_p:
            y_ = _js_log_mix(P, C, dd, d, 1.0 - beta)  # log(m/p) on p's support, up to a constant
            ey = (P.W * y_).sum(-1, keepdim=True)
            gp = -(s * (beta * it))[:, None] * P.W * torch.where(P.S, y_ - ey, zero)
            gp = _minus_rest(gp, P.top)
        if need_q:
            z_ = _js_log_mix(Q, C, -dd, -d, beta)  # log(m/q) on q's support, likewise
            ez = (Q.W * z_).sum(-1, keepdim=True)
            gq = -(s * ((1.0 - beta) * it))[:, None] * Q.W * torch.where(Q.S, z_ - ez, zero)
            gq = _minus_rest(gq, Q.top)
    gp = P.to_input(gp) if (need_p and gp is not None) else None
    gq = Q.to_input(gq) if (need_q and gq is not None) else None
    return gp, gq


# imported here, not on first use: Dynamo cannot trace an import, nor the operator's
# registration (a first call inside torch.compile must find both)
from . import torch_ops as _ops  # noqa: E402

_ops.bind(_sys.modules[__name__])
_dispatch.register("torch", "pre", divergence)
