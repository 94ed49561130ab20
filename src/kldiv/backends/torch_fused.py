"""Memory-bounded fused divergences for torch: rows in chunks, gradients made in the forward pass.

The obvious ``F.kl_div(log_softmax(s), log_softmax(t))`` keeps several N x V tensors alive for its
backward pass. Here the forward pass walks over the rows (in chunks, or row by row in the C kernel
``kldiv._ext._fused``), computes each row's divergence and, in the same pass, its gradient with
respect to the raw inputs (logits or log-probabilities). Nothing of size N x V is kept but the
gradients themselves; with :func:`kl_div_inplace` the student's gradient is even written over its
own logits, so that the extra memory is near zero.

Semantics are the core's (``kldiv._core.divergence``): the same accurate, cancellation-free
algorithm, the same edges (p_i = 0 contributes 0, p_i > 0 = q_i gives +inf with zero gradient),
the same reductions (``kldiv._core.reduction``). Two implementations sit behind one function:

- the C kernel (CPU, contiguous rows, float32/float64, kinds "forward" and "reverse",
  temperatures in [1e-30, 1e30]): three passes per row (maxima; normalisers and the p-weighted
  mean log-ratio; the series, then the gradients), a vectorised polynomial ``exp``, OpenMP
  over rows with ``torch.get_num_threads()`` threads;
- pure torch for every other case (any device): for forward and reverse KL the same algebra in
  torch operations on chunks of rows (``_kl_torch``), for JS and Jeffreys the core's own row
  function under ``torch.enable_grad()`` and ``torch.autograd.grad``.

Any input magnitude: each side is centred on its own maximum and the log-ratio is formed from
exact differences (TwoSum), so that logits of 1e30, masking with -1e30 or ``finfo.min`` on either
side, or a common offset of one side cost no accuracy. Rows that the input's precision cannot
carry (values spanning more than the dtype holds; a probability that underflows there against a
log-ratio beyond 2**20, whose product may still matter; temperatures outside [1e-30, 1e30])
are recomputed in float64, and what float64 cannot carry either goes to the core. A nan or +inf
in a row that counts (possible with ``validate=False``) gives nan, value and gradient: a
diverged model is never hidden behind a plausible number. Sums and means come back in the
compute dtype (at least float32; float64 when either input is).

Near convergence the gradient keeps full relative accuracy: ``q_i - p_i`` is formed as
``p_i expm1(d'_i - KL)`` from the series already evaluated for the value, not as a difference
of two softmaxes (about 5e-7 per row in float32 at KL = 1e-9, against 1e-3 that way).

Derivatives: the fused path gives first derivatives only (the gradient is computed before the
backward pass is known). Differentiating its backward again (``create_graph=True``) raises a
clear error. ``kldiv.kl_div`` therefore takes the fused path only where that cannot hurt: when no
gradient is being recorded, or when the inputs are large (at least ``2**20`` elements; Hessian-
vector products on such inputs are rare), and never while ``torch.compile`` traces. Switch it off
with ``set_fused(False)`` (or ``with fused(False):``) to get the core's fully differentiable path.
A fused loss can be backpropagated once: its gradient buffer is handed to autograd without a copy.

Gradient memory: on the CPU a gradient of 1 MiB and up reuses the memory of an earlier
one once nothing references it any more (``grad_buffer``): a fresh 500 MB tensor per step costs
as much as the kernel, in page faults and in the zeroing the operating system does on first
touch. ``release_grad_buffers()`` frees what is kept (at most two buffers per dtype).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import threading

import torch

from .._core import dispatch as _dispatch
from .._core import divergence as _div
from .._core._xp import namespace
from .._core._xp import logsumexp as _logsumexp
from .._core.validation import (
    check_beta,
    check_option,
    check_positive_finite,
    check_values,
    validation_enabled,
)

__all__ = [
    "fused_divergence", "divergence_rows_with_grad", "kl_div_inplace", "set_fused", "fused",
    "fused_enabled", "FUSED_MIN_ELEMENTS", "grad_buffer", "release_grad_buffers",
]

KINDS = ("forward", "reverse", "js", "jeffreys")
LOG_SPACES = ("logits", "log_probs")

#: with gradients recorded, ``kldiv.kl_div`` takes the fused path from this many elements on
FUSED_MIN_ELEMENTS = 1 << 20

_ENABLED = contextvars.ContextVar("kldiv_fused", default=True)
_USE_EXTENSION = contextvars.ContextVar("kldiv_fused_extension", default=True)

# elements per chunk in the pure-torch path (each chunk makes ~20 temporaries of its size)
_CHUNK_ELEMENTS = 1 << 20


def set_fused(enabled: bool) -> None:
    """Let ``kldiv.kl_div`` (and the family) take the fused torch path, or not (default: on).

    Off, every torch input goes through the core (fully differentiable, second derivatives
    included, but it keeps several N x V tensors for the backward pass). The switch is read
    per call outside ``torch.compile``; a compiled function keeps the path it was traced with.

    >>> set_fused(False); fused_enabled()
    False
    >>> set_fused(True); fused_enabled()
    True
    """
    _ENABLED.set(bool(enabled))


def fused_enabled() -> bool:
    """Whether the fused torch path may be taken (see :func:`set_fused`).

    >>> fused_enabled()
    True
    """
    return _ENABLED.get()


@contextlib.contextmanager
def fused(enabled: bool):
    """Context manager: ``with fused(False): ...`` computes through the core inside.

    >>> with fused(False):
    ...     fused_enabled()
    False
    """
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


@contextlib.contextmanager
def _extension(enabled: bool):
    """Testing aid: ``with _extension(False):`` forces the pure-torch chunked path."""
    token = _USE_EXTENSION.set(bool(enabled))
    try:
        yield
    finally:
        _USE_EXTENSION.reset(token)


def _load_extension():
    try:
        from .._ext import _fused
    except ImportError:
        return None
    return _fused if hasattr(_fused, "rows") else None


_EXT = _load_extension()


# ----------------------------------------------------------------------------------------------
# gradient buffers reused across steps

#: on the CPU, gradients of at least this many bytes come from ``grad_buffer``'s cache: from
#: 1 MiB up a fresh buffer is glibc's to place, and where it lands on memory just returned to
#: the system (the heap trimmed, or a chunk above the mmap threshold) every one of its pages
#: faults again on the kernel's first write; 32 x 32000 float32 (4 MB) swung between runs
#: by that (issue 12)
GRAD_CACHE_MIN_BYTES = 1 << 20
_GRAD_CACHE: dict = {}  # (dtype, device) -> [flat tensors], at most _GRAD_CACHE_SLOTS each
_GRAD_CACHE_SLOTS = 2
_GRAD_LOCK = threading.Lock()


def _storage_refs(t):
    """(C++ references to ``t``'s storage, Python references to its storage object)."""
    so = t.untyped_storage()
    return torch._C._storage_Use_Count(so._cdata), sys.getrefcount(so)


_TENSOR_ONLY = _storage_refs(torch.empty(1))  # a tensor that nothing else references


def _unshared(buf):
    """Whether nothing but this cache references ``buf``'s memory: no other reference to the
    tensor itself (a DLPack export), no view or tensor sharing its storage (a ``.grad``, a
    NumPy export), no Python object of its storage kept by anyone."""
    if buf._use_count() != 1:
        return False
    c, r = _storage_refs(buf)
    return c <= _TENSOR_ONLY[0] and r <= _TENSOR_ONLY[1]


_ITEMSIZE: dict = {}  # dtype -> bytes per element


def grad_buffer(shape, dtype, device="cpu"):
    """An uninitialised tensor of ``shape`` to receive a gradient that is written in full.

    On the CPU, from ``GRAD_CACHE_MIN_BYTES`` (1 MiB) up, the memory of a gradient handed out
    by an earlier call is reused once nothing references it any more (the training loop has
    dropped it: ``optimizer.zero_grad()`` sets ``.grad`` to None, or the layer below consumed
    it): a fresh 500 MB tensor costs as much as the kernel itself, in page faults and in the
    zeroing the operating system does on first touch. A buffer that anything still references
    (a view, a ``.grad``, a storage object, an export to NumPy or DLPack) is never handed out;
    at most two buffers per dtype are kept, and ``release_grad_buffers()`` drops them. Elsewhere
    (CUDA has its own caching allocator) and for small sizes: ``torch.empty``.

    >>> g = grad_buffer((4096, 8192), torch.float32)
    >>> ptr = g.data_ptr(); del g                      # dropped by the caller: reusable
    >>> grad_buffer((4096, 8192), torch.float32).data_ptr() == ptr
    True
    >>> h = grad_buffer((4096, 8192), torch.float32)   # still held: a different buffer
    >>> grad_buffer((4096, 8192), torch.float32).data_ptr() == h.data_ptr()
    False
    >>> release_grad_buffers()
    """
    device = torch.device(device)
    n = 1
    for s in shape:
        n *= int(s)
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is None:
        itemsize = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or n * itemsize < GRAD_CACHE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (dtype, device)
    with _GRAD_LOCK:
        slots = _GRAD_CACHE.setdefault(key, [])
        for buf in slots:
            if n <= buf.numel() <= 2 * n and _unshared(buf):
                return buf[:n].view(shape)
        buf = torch.empty(n, dtype=dtype, device=device)
        if len(slots) >= _GRAD_CACHE_SLOTS:
            free = [i for i, b in enumerate(slots) if _unshared(b)]
            slots.pop(free[0] if free else 0)
        slots.append(buf)
        return buf.view(shape)


def release_grad_buffers():
    """Drop the gradient buffers that ``grad_buffer`` keeps for reuse (their memory is freed
    once nothing else references it).

    >>> release_grad_buffers()
    """
    with _GRAD_LOCK:
        _GRAD_CACHE.clear()


# ----------------------------------------------------------------------------------------------
# one chunk of rows


def _compute_dtype(*tensors):
    dt = torch.promote_types(tensors[0].dtype, tensors[1].dtype)
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def _check_kind_spaces(kind, p_space, q_space):
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if p_space not in LOG_SPACES:
        raise ValueError(f"p_space: the fused path takes 'logits' or 'log_probs', got {p_space!r}")
    if q_space not in LOG_SPACES:
        raise ValueError(f"q_space: the fused path takes 'logits' or 'log_probs', got {q_space!r}")


def _torch_rows(kind, p, q, p_space, q_space, temperature, beta, need_p, need_q, scale,
                dtype=None):
    """The core's row function on a small 2-D chunk, with gradients by autograd."""
    dt = _compute_dtype(p, q) if dtype is None else dtype
    with torch.enable_grad():
        P = p.detach().to(dt).requires_grad_(need_p)
        Q = q.detach().to(dt).requires_grad_(need_q)
        xp = namespace(P)
        rows = _div.divergence_rows(kind, xp, P, Q, p_space, q_space, temperature, beta)
        leaves = [t for t, need in ((P, need_p), (Q, need_q)) if need]
        grads = []
        if leaves:
            s = torch.ones_like(rows) if scale is None else scale.to(dt)
            # zero-scale rows get zero gradient even when their value is inf
            loss = torch.where(s != 0, rows * s, torch.zeros_like(rows)).sum()
            grads = list(torch.autograd.grad(loss, leaves))
    gp = grads.pop(0) if need_p else None
    gq = grads.pop(0) if need_q else None
    return rows.detach(), gp, gq


# temperatures inside this range run in the input's precision (C kernel or torch chunks); outside
# it (1/T or the scaled log-ratios would leave float32's range) every row is computed in float64
_T_RANGE = (1e-30, 1e30)
_RISK_D = float(1 << 20)


def _moderate(temperature):
    return _T_RANGE[0] <= float(temperature) <= _T_RANGE[1]


def _kl_torch(x, y, temperature, need_x, need_y, scale):
    """KL(p || q) per row of a 2-D chunk with analytic gradients: the C kernel's algebra in torch.

    ``x``, ``y`` (p's and q's log-space values) are in the compute dtype. Each side is centred
    on its own maximum, the log-ratio is formed as ``((y - x) + (max x - max y)) / T`` with both
    differences exact (TwoSum), so that a huge offset of one side (-1e30, finfo.min) cannot
    swallow the other side's values; KL = log(1 + E_p[phi(d')]) - log q(S) as in the core.
    Rows the algebra does not cover in this dtype come back as nan, with zero gradients: nan,
    +inf or all -inf input, values spanning more than the dtype holds, and an underflowed p_i
    meeting a log-ratio beyond 2**20 (p_i |d_i| may still matter). Gradients are those of
    ``sum_r scale[r] * KL_r``; rows with KL = +inf (p_i > 0 = q_i) get zero gradients.
    """
    dt = x.dtype
    T = float(temperature)
    floor = 87.0 if dt == torch.float32 else 708.0
    ninf, inf = -math.inf, math.inf
    px = x > ninf
    py = y > ninf
    inS = px & py
    dense = bool(inS.all())
    mx = x.amax(-1, keepdim=True)
    my = y.amax(-1, keepdim=True)
    if dense:
        lo = torch.minimum(x.amin(-1, keepdim=True), y.amin(-1, keepdim=True))
    else:
        lo = torch.minimum(torch.where(px, x, inf).amin(-1, keepdim=True),
                           torch.where(py, y, inf).amin(-1, keepdim=True))
    # nan (amax propagates it), +inf, all -inf, or a span that overflows the dtype
    bad = ~torch.isfinite(torch.maximum(mx, my) - lo)[:, 0]
    mx = torch.where(torch.isfinite(mx), mx, 0.0)
    my = torch.where(torch.isfinite(my), my, 0.0)
    a = (x - mx) / T  # <= 0; -inf off p's support
    b = (y - my) / T
    # the raw log-ratio relative to its value at an entry r where x is largest:
    # D_i = (y_i - x_i) - (y_r - x_r) (d = (D + Dref) / T with Dref = y_r - max y), from exact
    # differences (TwoSum): neither side's magnitude nor the distance between the maxima
    # swallows what varies where p lives
    yr = y.gather(-1, x.argmax(-1, keepdim=True))
    yr = torch.where(yr > ninf, yr, mx)  # y_r = -inf: the row escapes (+inf) anyway
    d0h = yr - mx
    d0b = d0h - yr
    d0l = (yr - (d0h - d0b)) + (-mx - d0b)
    Dref = yr - my
    s = y - x
    bb = s - y
    e = (y - (s - bb)) + (-x - bb)
    D = (s - d0h) + (e - d0l)
    del s, bb, e
    if not dense:
        D = torch.where(inS, D, 0.0)
    ep = torch.exp(a)
    eq = torch.exp(b)
    # wild rows: log-ratios beyond 2**20 (T tiny, or values of 1e30): guards against 0 * inf
    wild = bool((D.abs().amax() / T) > _RISK_D) if D.numel() else False
    B = None
    if wild:
        # entries whose p_i underflows here (but not by far) against a huge log-ratio: a bound
        # on the neglected sum of p_i |d_i| (times Zx), checked against the KL below
        ad = D.abs() / T
        r = (a > -(floor + 250.0)) & (a < -floor) & (ad > _RISK_D) & inS
        B = torch.where(r, torch.exp(torch.where(r, a + torch.log(ad), 0.0)), 0.0)
        B = B.sum(-1, keepdim=True)
        del ad, r
    Zx = ep.sum(-1, keepdim=True)
    Zy = eq.sum(-1, keepdim=True)
    p_ = ep.div_(Zx)
    muR = (p_ * D).sum(-1, keepdim=True)  # E_p[D], raw units: a convex combination, finite
    bad = bad | ~(torch.isfinite(Zx) & torch.isfinite(Zy) & torch.isfinite(muR))[:, 0]
    esc = (px & ~py).any(-1) & ~bad
    if B is not None:  # what was neglected must not show at the dtype's precision
        kest = (torch.log(Zy) - torch.log(Zx) - (muR + Dref) / T).clamp_min(0.0)
        rel = 2.0**-30 if dt == torch.float32 else 2.0**-60
        risk = (B / Zx > rel * kest)[:, 0]
        bad = bad | (risk & ~esc)
    if dense:
        log_qS = torch.zeros_like(Zy)
    else:
        qo = torch.where(px, 0.0, eq).sum(-1, keepdim=True) / Zy
        qS = torch.where(inS, eq, 0.0).sum(-1, keepdim=True) / Zy
        use = qo < 0.5
        log_qS = torch.where(use, torch.log1p(-torch.where(use, qo, 0.0)), torch.log(qS))
    lc = -torch.log(Zx) - (muR + Dref) / T  # p_i e^{d'_i} = e^{lc} e^{b_i}
    huge = lc > floor - 30.0
    c = torch.exp(torch.where(huge, 0.0, lc))
    Dc = D.sub_(muR)  # centred, raw units: finite
    if not dense:
        Dc = torch.where(inS, Dc, 0.0)
    dc = Dc / T  # d' (+-inf only in wild rows, where p_i = 0)
    small = dc.abs() < _div._SMALL
    z = torch.where(small, dc, 0.0)
    coefs = _div._PHI_COEFS if dt == torch.float64 else _div._PHI_COEFS[:9]
    ser = torch.full_like(z, coefs[-1])
    for k in reversed(coefs[:-1]):
        ser.mul_(z).add_(k)
    phi = ser.mul_(z).mul_(z)  # phi(d') by the series (0 where not small)
    pe = c * eq  # p e^{d'}
    big = torch.addcmul(pe, p_, 1 + dc, value=-1.0)  # p e^{d'} - p (1 + d')
    if wild:
        big = torch.where(p_ > 0, big, pe)
    term = torch.where(small, phi * p_, big)
    if not dense:
        term = torch.where(inS, term, 0.0)
    acc = term.sum(-1, keepdim=True)
    del big, term, pe, dc
    kl = torch.where(huge, lc + torch.log(Zy), torch.log1p(acc) - log_qS)
    g = torch.ones_like(Zx[:, 0]) if scale is None else scale.to(dt)
    g = torch.where(esc | bad, 0.0, g)[:, None]
    gx = gy = None
    if need_y:  # (q - p) g / T
        # near convergence q_i - p_i = p_i expm1(d'_i - KL) = p_i ((d' + phi(d')) E + M) with
        # E = e^-KL, M = expm1(-KL): full relative accuracy where a difference of two
        # softmaxes keeps only eps / |d'| (the series' entries); elsewhere q - p directly
        w = torch.where(torch.isnan(kl), 0.0, -kl)  # -inf: E = 0, M = -1 (q - p = -p)
        qp = eq.div_(Zy).sub_(p_)
        near = (z.add_(phi)).mul_(torch.exp(w)).add_(torch.expm1(w)).mul_(p_)
        sel = small if dense else small & inS
        gy = torch.where(sel, near, qp).mul_(g).div_(T)
        del qp, near, sel
    del phi, z, small
    kl = kl[:, 0]
    kl = torch.where(esc, inf, kl)
    kl = torch.where(bad, math.nan, kl)
    if need_x:  # -p d' g / T with d' = Dc / T (finite unless the true value overflows)
        gx = (p_ * Dc).div_(T).mul_(g).div_(-T)
        if wild:  # p_i = 0 against an infinite d'_i: 0
            gx = torch.where(p_ > 0, gx, 0.0)
    return kl, gx, gy


def _kl_kind(kind, p, q, temperature, need_p, need_q, scale, dt):
    """``_kl_torch`` for "forward" (KL(p || q)) or "reverse" (KL(q || p)) in dtype ``dt``."""
    x, y, nx, ny = (p, q, need_p, need_q) if kind == "forward" else (q, p, need_q, need_p)
    rows, gx, gy = _kl_torch(x.to(dt), y.to(dt), temperature, nx, ny, scale)
    return (rows, gx, gy) if kind == "forward" else (rows, gy, gx)


def _resolve(kind, p, q, temperature, beta, need_p, need_q, scale, idx, rows, gp, gq):
    """Rows ``idx`` that the fast algebra declined (nan): recompute them in place.

    nan or +inf input (possible with ``validate=False``): value nan, gradients nan, so that a
    diverged model is never hidden. The others: the fast algebra in float64 (forward and
    reverse KL), then the core's row function in float64 for what remains (all -inf rows,
    float64 values spanning more than float64 holds).
    """
    pi, qi = p.index_select(0, idx), q.index_select(0, idx)
    si = None if scale is None else scale.index_select(0, idx)
    f64 = torch.float64
    nan_in = (torch.isnan(pi) | torch.isnan(qi) | (pi == math.inf) | (qi == math.inf)).any(-1)
    r = torch.full((idx.numel(),), math.nan, dtype=f64, device=p.device)
    g1 = torch.full(pi.shape, math.nan, dtype=f64, device=p.device) if need_p else None
    g2 = torch.full(qi.shape, math.nan, dtype=f64, device=p.device) if need_q else None
    todo = torch.nonzero(~nan_in).flatten()
    if todo.numel():
        pt, qt = pi.index_select(0, todo), qi.index_select(0, todo)
        st = None if si is None else si.index_select(0, todo)
        if kind in ("forward", "reverse"):
            rt, h1, h2 = _kl_kind(kind, pt, qt, temperature, need_p, need_q, st, f64)
        else:
            rt = torch.full((todo.numel(),), math.nan, dtype=f64, device=p.device)
            h1 = h2 = None
        left = torch.nonzero(torch.isnan(rt)).flatten()
        if left.numel():
            sl = None if st is None else st.index_select(0, left)
            cr, c1, c2 = _torch_rows(kind, pt.index_select(0, left), qt.index_select(0, left),
                                     "logits", "logits", temperature, beta, need_p, need_q, sl,
                                     dtype=f64)
            rt = rt.index_copy(0, left, cr)
            h1 = c1 if h1 is None else h1.index_copy(0, left, c1)
            h2 = c2 if h2 is None else h2.index_copy(0, left, c2)
        r.index_copy_(0, todo, rt)
        if need_p:
            g1.index_copy_(0, todo, h1)
        if need_q:
            g2.index_copy_(0, todo, h2)
    rows.index_copy_(0, idx, r.to(rows.dtype))
    if need_p:
        gp.index_copy_(0, idx, g1.to(gp.dtype))
    if need_q:
        gq.index_copy_(0, idx, g2.to(gq.dtype))


def _chunk(kind, p, q, p_space, q_space, temperature, beta, need_p, need_q, scale):
    """One chunk by the fastest pure-torch route; declined rows are resolved by ``_resolve``."""
    if kind not in ("forward", "reverse"):
        return _torch_rows(kind, p, q, p_space, q_space, temperature, beta, need_p, need_q, scale)
    dt = _compute_dtype(p, q) if _moderate(temperature) else torch.float64
    rows, gp, gq = _kl_kind(kind, p, q, temperature, need_p, need_q, scale, dt)
    redo = torch.nonzero(torch.isnan(rows)).flatten()
    if redo.numel():
        _resolve(kind, p, q, temperature, beta, need_p, need_q, scale, redo, rows, gp, gq)
    return rows, gp, gq


def _chunk_rows(V):
    return max(1, _CHUNK_ELEMENTS // max(V, 1))


def _use_c(kind, p, q, out_p, out_q, temperature):
    if _EXT is None or not _USE_EXTENSION.get() or kind not in ("forward", "reverse"):
        return False
    if not _moderate(temperature):
        return False
    ts = [p, q] + [t for t in (out_p, out_q) if t is not None]
    for t in ts:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
            return False
        if t.dim() != 2 or t.stride(-1) != 1 or t.is_conj() or t.is_neg():
            return False
    return p.dtype == q.dtype and all(t.dtype == p.dtype for t in ts)


def divergence_rows_with_grad(kind, p, q, **kw):
    """Per-row divergence of a 2-D chunk and the gradients (see :func:`_divergence_rows_with_grad`).

    Rows where either side has no support at all (every entry -inf: not a distribution, which
    only ``validate=False`` lets through) come back as nan with nan gradients, as in the core.
    """
    rows, gp, gq = _divergence_rows_with_grad(kind, p, q, **kw)
    inf_rows = torch.nonzero(torch.isinf(rows)).flatten()  # escapes: rare, looked at closely
    if inf_rows.numel():
        sp, sq = p.index_select(0, inf_rows), q.index_select(0, inf_rows)
        empty = ~((sp > -math.inf).any(-1) & (sq > -math.inf).any(-1))
        if bool(empty.any()):
            bad = inf_rows[empty]
            rows = rows.index_fill(0, bad, math.nan)
            for g in (gp, gq):
                if g is not None:
                    g.index_fill_(0, bad, math.nan)
    return rows, gp, gq


def _divergence_rows_with_grad(kind, p, q, *, p_space, q_space, temperature=1.0, beta=0.5,
                              need_grad_p=False, need_grad_q=True, grad_scale=None,
                              out_p=None, out_q=None):
    """Per-row divergence of a 2-D chunk and the gradients of ``sum_r grad_scale[r] * rows[r]``.

    Args:
      kind: "forward" (KL(p || q)), "reverse" (KL(q || p)), "js" (generalised Jensen-Shannon
        with mixture weight ``beta``) or "jeffreys" (KL(p || q) + KL(q || p)).
      p, q: tensors of shape (rows, V) on one device, in log space (``p_space``/``q_space``:
        "logits" or "log_probs"); any floating dtype, half precision is upcast here (per call).
      temperature: divides both inputs before the log-softmax.
      need_grad_p, need_grad_q: which gradients to compute.
      grad_scale: optional 1-D tensor (rows,) of weights; None means 1 for every row. Rows
        whose weight is 0 are skipped: their value is reported as 0 and their gradient is 0.
      out_p, out_q: optional tensors of shape (rows, V) to receive the gradients (they may be
        ``p`` or ``q`` themselves: the gradient then overwrites the input).

    Returns:
      ``(rows, grad_p, grad_q)``: ``rows`` of shape (rows,) in the compute dtype (float32 or
      float64), the gradients with respect to the raw inputs ``p`` and ``q`` (None when not
      requested), in the input's dtype (or ``out_p``/``out_q`` when given; otherwise from
      ``grad_buffer``, memory that may be reused by a later call once nothing references it).
      Rows with value +inf (p_i > 0 = q_i for "forward") get a zero gradient, as in the core.
      A row with a nan or +inf entry (and a weight other than 0) gives nan, value and gradient.
      Any magnitude and any positive finite temperature: what the input's precision cannot
      carry is recomputed in float64 (see the module docstring). A value or gradient beyond the
      dtype's range comes back as +-inf (for instance KL = 6e38 in float32), never as nan.

    >>> import torch
    >>> s = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    >>> t = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    >>> rows, _, g = divergence_rows_with_grad("forward", t, s, p_space="logits", q_space="logits")
    >>> p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    >>> bool(torch.allclose(rows, (p * (p / q).log()).sum(-1)))  # KL(p || q) by hand
    True
    >>> bool(torch.allclose(g, q - p))  # d KL / d student logits = q - p
    True
    """
    _check_kind_spaces(kind, p_space, q_space)
    if p.dim() != 2 or q.dim() != 2 or p.shape != q.shape:
        raise ValueError(
            f"p and q: expected two 2-D tensors of one shape (rows, V), got {tuple(p.shape)} "
            f"and {tuple(q.shape)}"
        )
    n, V = p.shape
    if grad_scale is not None and tuple(grad_scale.shape) != (n,):
        raise ValueError(f"grad_scale: expected shape ({n},), got {tuple(grad_scale.shape)}")
    dt = _compute_dtype(p, q)
    if kind == "jeffreys":
        return _jeffreys_rows(p, q, p_space, q_space, temperature, need_grad_p, need_grad_q,
                              grad_scale, out_p, out_q)
    if _use_c(kind, p, q, out_p, out_q, temperature):
        return _c_rows(kind, p, q, temperature, need_grad_p, need_grad_q, grad_scale,
                       out_p, out_q)
    rows = torch.zeros(n, dtype=dt, device=p.device)
    gp = gq = None
    if need_grad_p:
        gp = out_p if out_p is not None else grad_buffer(p.shape, p.dtype, p.device)
    if need_grad_q:
        gq = out_q if out_q is not None else grad_buffer(q.shape, q.dtype, q.device)
    if grad_scale is not None:
        active = torch.nonzero(grad_scale != 0).flatten()
        idle = torch.nonzero(grad_scale == 0).flatten()
        for g in (gp, gq):
            if g is not None and idle.numel():
                g.index_fill_(0, idle, 0)
        if active.numel() == n:
            active = None
    else:
        active = None
    step = _chunk_rows(V)
    total = n if active is None else active.numel()
    for i in range(0, total, step):
        if active is None:
            sl = slice(i, min(i + step, n))
            pc, qc = p[sl], q[sl]
            sc = None if grad_scale is None else grad_scale[sl]
        else:
            sl = active[i:i + step]
            pc, qc = p.index_select(0, sl), q.index_select(0, sl)
            sc = grad_scale.index_select(0, sl)
        r, g1, g2 = _chunk(kind, pc, qc, p_space, q_space, temperature, beta,
                           need_grad_p, need_grad_q, sc)
        if active is None:
            rows[sl] = r
            if gp is not None:
                gp[sl] = g1
            if gq is not None:
                gq[sl] = g2
        else:
            rows.index_copy_(0, sl, r)
            if gp is not None:
                gp.index_copy_(0, sl, g1.to(gp.dtype))
            if gq is not None:
                gq.index_copy_(0, sl, g2.to(gq.dtype))
    return rows, gp, gq


def _jeffreys_rows(p, q, p_space, q_space, temperature, need_p, need_q, grad_scale, out_p,
                   out_q):
    """Jeffreys = KL(p || q) + KL(q || p): both halves by the KL route (the C kernel where it
    applies), chunk by chunk of rows; the reverse half first into a chunk-sized scratch, so that
    ``out_q`` (or ``out_p``) may be the input itself. Both halves are non-negative: their sum
    keeps their relative accuracy. Rows where the supports differ are +inf with zero gradients
    (the core's rule)."""
    n, V = p.shape
    dt = _compute_dtype(p, q)
    gp = (out_p if out_p is not None else grad_buffer((n, V), p.dtype, p.device)) if need_p \
        else None
    gq = (out_q if out_q is not None else grad_buffer((n, V), q.dtype, q.device)) if need_q \
        else None
    rows = torch.empty(n, dtype=dt, device=p.device)
    kw = dict(p_space=p_space, q_space=q_space, temperature=temperature, need_grad_p=need_p,
              need_grad_q=need_q)
    step = _chunk_rows(V)
    for i in range(0, n, step):
        sl = slice(i, min(i + step, n))
        sc = None if grad_scale is None else grad_scale[sl]
        # the supports differ: +inf with zero gradient (a sum beyond the dtype is +inf too,
        # with its true gradient); read before out_q / out_p may overwrite the input
        esc = ((p[sl] > -math.inf) != (q[sl] > -math.inf)).any(-1, keepdim=True)
        r2, t_p, t_q = divergence_rows_with_grad("reverse", p[sl], q[sl], grad_scale=sc, **kw)
        r1, _, _ = divergence_rows_with_grad(
            "forward", p[sl], q[sl], grad_scale=sc, out_p=None if gp is None else gp[sl],
            out_q=None if gq is None else gq[sl], **kw)
        r = r1.to(dt) + r2.to(dt)
        rows[sl] = r
        for g, t in ((gp, t_p), (gq, t_q)):
            if g is not None:
                g[sl] = torch.where(esc, 0.0, g[sl] + t.to(g.dtype))
    return rows, gp, gq


def _c_rows(kind, p, q, temperature, need_p, need_q, grad_scale, out_p, out_q):
    """The C kernel on two CPU tensors (rows, V) of one dtype with unit stride along V."""
    n, V = p.shape
    dt = p.dtype
    gp = gq = None
    if need_p:
        gp = out_p if out_p is not None else grad_buffer((n, V), dt)
    if need_q:
        gq = out_q if out_q is not None else grad_buffer((n, V), dt)
    rows = torch.empty(n, dtype=torch.float64)
    if n == 0:
        return rows.to(dt), gp, gq
    # KL(q || p) is the kernel's KL(x || y) with x = q, y = p
    x, y, gx, gy = (p, q, gp, gq) if kind == "forward" else (q, p, gq, gp)
    scale = None
    if grad_scale is not None:
        scale = grad_scale.detach().to(device="cpu", dtype=torch.float64).contiguous()
    _EXT.rows(
        dt == torch.float64, n, V, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
        1.0 / float(temperature), 0 if scale is None else scale.data_ptr(), rows.data_ptr(),
        0 if gx is None else gx.data_ptr(), 0 if gx is None else gx.stride(0),
        0 if gy is None else gy.data_ptr(), 0 if gy is None else gy.stride(0),
        torch.get_num_threads(),
    )
    redo = torch.nonzero(torch.isnan(rows)).flatten()
    if redo.numel():  # rows the kernel leaves to Python (nan/inf input, extreme ranges)
        _resolve(kind, p, q, temperature, 0.5, need_p, need_q, scale, redo, rows, gp, gq)
    return rows.to(dt), gp, gq


# ----------------------------------------------------------------------------------------------
# the autograd Function behind kldiv.kl_div's fused path


def _row_scale(n, reduction, mask, weight, dtype, device, differentiable=False):
    """Per-row factors c_r with value = sum_r c_r * rows_r (``kldiv._core.reduction``);
    ``differentiable``: as a function of ``weight`` (kl_div_inplace's weight gradient)."""
    c = torch.ones(n, dtype=dtype, device=device)
    keep = None
    if mask is not None:
        keep = mask.reshape(n).to(device)
    if weight is not None:
        w = weight if differentiable else weight.detach()
        w = w.reshape(n).to(device=device, dtype=dtype)
        # (differentiable: weight-0 rows stay in c, value 0, so that d/dw = the row there)
        pos = w >= 0 if differentiable else w > 0
        keep = pos if keep is None else keep & pos
        c = torch.where(keep, w, torch.zeros_like(w))
    elif keep is not None:
        c = keep.to(dtype)
    if reduction == "mean":
        den = c.sum()
        c = torch.where(den > 0, c / torch.where(den > 0, den, torch.ones_like(den)),
                        torch.zeros_like(c))
    return c


def _fused_forward(ctx, p, q, kind, p_space, q_space, scale, temperature, beta, inplace,
                   box=None):
    need_p = ctx.needs_input_grad[0]
    need_q = ctx.needs_input_grad[1] or inplace
    V = p.shape[-1]
    p2 = p.reshape(-1, V)
    q2 = q.view(-1, V) if inplace else q.reshape(-1, V)
    rows, gp, gq = divergence_rows_with_grad(
        kind, p2, q2, p_space=p_space, q_space=q_space, temperature=temperature,
        beta=beta, need_grad_p=need_p, need_grad_q=need_q, grad_scale=scale,
        out_q=q2 if inplace else None,
    )
    # summed in float64, returned in the compute dtype: at least float32, the promoted dtype
    # of mixed inputs (a float16 sum over many rows would overflow; issue 11 item 2)
    value = (rows.double() * scale.double()).sum()
    if box is not None:  # the per-row values, for kl_div_inplace's weight gradient
        box.append(rows.detach())
    ctx.grads = (None if gp is None else gp.view(p.shape),
                 None if gq is None else gq.view(q.shape))
    return value.to(_compute_dtype(p, q))


def _fused_backward(ctx, g):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "kldiv fused path: first derivatives only; to differentiate twice "
            "(create_graph=True) call kldiv.torch.set_fused(False) or use inputs smaller "
            f"than {FUSED_MIN_ELEMENTS} elements"
        )
    if ctx.grads is None:
        raise RuntimeError(
            "kldiv fused path: backward can run once only (the gradient buffer is handed "
            "to autograd without a copy); use kldiv.torch.set_fused(False) for retain_graph"
        )
    gp, gq = ctx.grads
    ctx.grads = None
    if g.device.type != "cpu" or float(g) != 1.0:
        for t in (gp, gq):
            if t is not None:
                t.mul_(g.to(t.dtype))
    return gp, gq


class _FusedDivergence(torch.autograd.Function):
    """value = sum_r c_r * rows_r; the gradients are computed by forward and kept for backward."""

    @staticmethod
    def forward(ctx, p, q, kind, p_space, q_space, scale, temperature, beta):
        return _fused_forward(ctx, p, q, kind, p_space, q_space, scale, temperature, beta, False)

    @staticmethod
    def backward(ctx, g):
        gp, gq = _fused_backward(ctx, g)
        return gp, gq, None, None, None, None, None, None


class _FusedDivergenceInplace(torch.autograd.Function):
    """As _FusedDivergence, with q's gradient written over q. One output (the value): q is not
    returned as a dirty output, which torch refuses for a view (``s.view(-1, V)``, ``s[0]``) in
    a Function with more than one output; its version counter is bumped instead, so that a
    producer that saved q (``torch.tanh``'s output) still reports the overwrite at backward."""

    @staticmethod
    def forward(ctx, p, q, kind, p_space, q_space, scale, temperature, beta, box):
        value = _fused_forward(ctx, p, q, kind, p_space, q_space, scale, temperature, beta, True,
                               box)
        torch.autograd.graph.increment_version(q)
        return value

    @staticmethod
    def backward(ctx, g):
        gp, gq = _fused_backward(ctx, g)
        return gp, gq, None, None, None, None, None, None, None


class _RowsDot(torch.autograd.Function):
    """0 in value; gradient ``rows`` with respect to ``c``: sum_r c_r rows_r's derivative in c
    with the per-row values as constants (kl_div_inplace's weight gradient, chained by autograd
    through c = the weight over the rows that count, or its normalised form for "mean")."""

    @staticmethod
    def forward(ctx, c, rows):
        ctx.save_for_backward(rows)
        return torch.zeros((), dtype=c.dtype, device=c.device)

    @staticmethod
    def backward(ctx, g):
        (rows,) = ctx.saved_tensors
        return g * rows.to(g.dtype), None


def _rows_count(p):
    n = 1
    for s in p.shape[:-1]:
        n *= s
    return n


def fused_divergence(kind, p, q, *, p_space, q_space, reduction, mask, weight, temperature,
                     beta):
    """The core's hook (``kldiv.backends.try_fast_divergence``); NotImplemented when not taken.

    Inputs as the core leaves them: categories last, float32/float64, mask and weight broadcast
    to the row shape. Returns a 0-d tensor equal to the core's ``sum``/``mean`` reduction.
    """
    if not _ENABLED.get() or kind not in KINDS or reduction not in ("sum", "mean"):
        return NotImplemented
    if p_space not in LOG_SPACES or q_space not in LOG_SPACES:
        return NotImplemented
    if p.shape != q.shape or p.dim() < 1 or p.device != q.device:
        return NotImplemented
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        return NotImplemented
    try:
        if torch.compiler.is_compiling():
            return NotImplemented
    except AttributeError:  # pragma: no cover - old torch
        pass
    recording = torch.is_grad_enabled() and (p.requires_grad or q.requires_grad)
    if recording and p.numel() < FUSED_MIN_ELEMENTS:
        return NotImplemented
    n = _rows_count(p)
    dt = _compute_dtype(p, q)
    scale = _row_scale(n, reduction, mask, weight, dt, p.device)
    if not recording:
        with torch.no_grad():
            V = p.shape[-1]
            rows, _, _ = divergence_rows_with_grad(
                kind, p.reshape(-1, V), q.reshape(-1, V), p_space=p_space, q_space=q_space,
                temperature=temperature, beta=beta, need_grad_p=False, need_grad_q=False,
                grad_scale=scale)
            return (rows.double() * scale.double()).sum().to(dt)
    return _FusedDivergence.apply(p, q, kind, p_space, q_space, scale, temperature, beta)


def kl_div_inplace(p, q_logits, *, p_space="logits", q_space="logits", kind="forward",
                   reduction="mean", mask=None, weight=None, temperature=1.0, beta=0.5,
                   validate=None):
    """KL(p || q) (or another ``kind``) whose gradient overwrites ``q_logits``' own buffer.

    .. math:: \\mathrm{KL}(p \\,\\|\\, q) = \\sum_i p_i \\log \\frac{p_i}{q_i}

    The loss is computed row by row and the gradient with respect to ``q_logits`` is written
    over ``q_logits`` during this call, so the extra memory is near zero (no N x V tensor is
    allocated). **Danger**: after this call ``q_logits`` no longer holds the logits but the
    gradient (times the upstream gradient once ``backward`` has run); use it only when the
    logits are needed for this loss alone, as in a distillation step. ``q_logits`` must be a
    tensor that autograd allows to modify in place (a non-leaf, such as a layer's output, or a
    tensor that does not require grad), or a view of one (``s.view(-1, V)``, ``s[0]``: only
    the viewed rows are overwritten); the gradient reaches its producers by ``backward()``.
    Its memory must not overlap itself: an expanded ``q_logits`` (stride 0, one row shared by
    several) cannot hold one gradient per row and is refused (ValueError).

    Args:
      p: the reference (teacher) in ``p_space`` ("logits" or "log_probs"), shape (..., V).
      q_logits: the model (student) in ``q_space``, same shape; overwritten.
      kind: "forward" (KL(p || q)), "reverse" (KL(q || p)), "js", "jeffreys".
      reduction: "sum" or "mean" (mean over the rows where ``mask`` is true, weighted by
        ``weight``; 0 when no row counts). Masked rows cost nothing.
      mask, weight: optional per-row arrays of shape (...) (broadcastable). A ``weight``
        that requires grad gets its gradient (as in ``kldiv.kl_div``: the per-row values for
        "sum", their difference from the mean over the weights' sum for "mean"; 0 for rows of
        weight 0 or masked).
      temperature: divides both inputs; beta: the Jensen-Shannon mixture weight.
      validate: value checks as in ``kldiv.kl_div`` (None: the ``kldiv.set_validation`` /
        ``kldiv.validation`` setting, on by default): nan, +inf or all -inf rows of ``p`` or
        ``q_logits`` (masked rows excepted), log-probabilities that do not normalise, and
        negative, nan or inf weights raise the same ValueError as ``kldiv.kl_div``, naming
        the argument. ``q_logits`` and the weights are checked before ``q_logits`` is
        overwritten (a pass over ``q_logits``, two for log-probabilities); ``p`` as logits
        after the kernel, only when its value comes out nan (``q_logits`` then holds the
        gradient). With ``validate=False`` a nan in a row that counts makes the value nan
        (never a plausible number).

    Returns:
      A 0-d tensor; the value equals ``kldiv.kl_div(p, q_logits, ...)`` before the overwrite.

    The gradient is stored in ``q_logits``' own dtype (it is written over it): in float16,
    gradient entries below about 6e-8 (float16's smallest subnormal) flush to 0, so rows
    whose gradient is that small come back all zero (autograd on a float16 leaf rounds the
    same way). bfloat16 keeps float32's range. Use float32 logits where such gradients matter.

    >>> import torch
    >>> t = torch.tensor([[2.0, 1.0, 0.0]]); h = torch.tensor([[1.0, 0.0, 3.0]], requires_grad=True)
    >>> s = h * 1.0                      # the student's logits, needed for this loss only
    >>> p, q = torch.softmax(t, -1), torch.softmax(s.detach(), -1)
    >>> expected = float((p * (p / q).log()).sum())  # KL(p || q) by hand, before the overwrite
    >>> loss = kl_div_inplace(t, s)
    >>> abs(loss.item() - expected) < 1e-6
    True
    >>> loss.backward()
    >>> bool(torch.allclose(h.grad, q - p))
    True
    """
    if not isinstance(q_logits, torch.Tensor) or not isinstance(p, torch.Tensor):
        raise TypeError("kl_div_inplace: p and q_logits must be torch tensors")
    check_option("reduction", reduction, ("sum", "mean"))
    _check_kind_spaces(kind, p_space, q_space)
    temperature = check_positive_finite("temperature", temperature)
    beta = check_beta(beta) if kind == "js" else 0.5  # beta weighs JS only
    if p.shape != q_logits.shape:
        raise ValueError(
            f"p and q_logits: shapes {tuple(p.shape)} and {tuple(q_logits.shape)} differ"
        )
    if not q_logits.dtype.is_floating_point or not p.dtype.is_floating_point:
        raise TypeError("p and q_logits: expected floating-point tensors")
    base = q_logits._base if q_logits._is_view() else None
    if q_logits.requires_grad and (q_logits.is_leaf or (base is not None and base.is_leaf)):
        raise ValueError(
            "q_logits: a leaf tensor that requires grad (or a view of one) cannot be "
            "overwritten; pass the output of the layer that makes the logits (a non-leaf), or "
            "use kldiv.kl_div"
        )
    if _overlaps(q_logits):
        raise ValueError(
            "q_logits: its memory overlaps itself (an expanded tensor, stride 0, or rows that "
            "share elements), so it cannot receive its own gradient; pass a tensor with one "
            "element per entry (for example q_logits.contiguous()), or use kldiv.kl_div"
        )
    try:
        q_logits.view(-1, q_logits.shape[-1])
    except RuntimeError:
        raise ValueError(
            "q_logits: must be viewed as (rows, V) without a copy (it receives its own "
            "gradient); make it contiguous first"
        ) from None
    rows_shape = tuple(p.shape[:-1])
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a boolean tensor, got dtype {mask.dtype}")
        mask = torch.broadcast_to(mask, rows_shape)
    if weight is not None:
        weight = torch.as_tensor(weight, device=p.device)
        if not weight.dtype.is_floating_point:
            raise TypeError(
                f"weight: expected a real floating-point array, got dtype {weight.dtype}; "
                "convert it first (for example x.float())"
            )
        weight = torch.broadcast_to(weight, rows_shape)
    check = validation_enabled(validate)
    p_later = False
    if check:
        if weight is not None:
            with torch.no_grad():
                if not bool(torch.all(torch.isfinite(weight) & (weight >= 0))):
                    raise ValueError("weight: must be finite and >= 0")
                zero_weight = bool(torch.any(weight == 0))
        # q_logits is checked now (it is overwritten); p's logits after the kernel, from its
        # value: a nan, +inf or all -inf row of p that counts makes it nan (a row of weight 0
        # does not count there, but kldiv.kl_div refuses it: checked now, as log-probabilities)
        p_later = p_space == "logits" and not (weight is not None and zero_weight)
        _check_values_of(q_logits, "q_logits", q_space, mask)
        if not p_later:
            _check_values_of(p, "p", p_space, mask)
    n = _rows_count(p)
    dt = _compute_dtype(p, q_logits)
    scale = _row_scale(n, reduction, mask, weight, dt, p.device)
    # a weight that requires grad: d value / d w from the per-row values (as kldiv.kl_div;
    # 0 where the row is masked, or where w = 0 and the row is inf or nan)
    w_grad = weight is not None and weight.requires_grad and torch.is_grad_enabled()
    box = [] if w_grad else None
    zero_rows = None
    if w_grad:  # rows of weight 0 (the kernel skips them): their values, before q is overwritten
        with torch.no_grad():
            z = weight.detach().reshape(n) == 0
            if mask is not None:
                z = z & mask.reshape(n)
            zero_rows = torch.nonzero(z).flatten()
            if zero_rows.numel():
                V = p.shape[-1]
                zero_vals = divergence_rows_with_grad(
                    kind, p.detach().reshape(-1, V).index_select(0, zero_rows),
                    q_logits.detach().reshape(-1, V).index_select(0, zero_rows),
                    p_space=p_space, q_space=q_space, temperature=temperature, beta=beta,
                    need_grad_p=False, need_grad_q=False)[0]
    value = _FusedDivergenceInplace.apply(p, q_logits, kind, p_space, q_space, scale,
                                          temperature, beta, box)
    if w_grad:
        c = _row_scale(n, reduction, mask, weight, dt, p.device, differentiable=True)
        rows = box[0].to(dt)
        if zero_rows.numel():
            rows = rows.index_copy(0, zero_rows, zero_vals.to(dt))
        rows = torch.where(torch.isfinite(rows) | (scale != 0), rows, torch.zeros_like(rows))
        value = value + _RowsDot.apply(c, rows).to(value.dtype)
    if p_later and bool(torch.isnan(value.detach())):
        _check_values_of(p, "p", p_space, mask)  # raises p's error (q_logits is overwritten)
    return value


def _overlaps(t):
    """Whether two entries of the tensor ``t`` may share memory (stride 0 on a dimension of
    size > 1, or rows that interleave: each stride, by size, must clear the span of the
    smaller one). Unusual interleaved layouts that do not overlap are counted as overlapping."""
    if torch._debug_has_internal_overlap(t) == 1:
        return True
    dims = sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    span = 1
    for st, sz in dims:
        if st < span:
            return True
        span = st * sz
    return False


def _check_values_of(x, name, space, mask):
    """``kldiv.kl_div``'s value checks of one input of ``kl_div_inplace`` (the core's own
    function and messages)."""
    try:
        with torch.no_grad():
            check_values(namespace(x), name, x.detach(), space, torch.finfo(x.dtype).eps,
                         _logsumexp, rows=mask)
    except ValueError as exc:  # the hints name the option: q_space, not q_logits_space
        raise ValueError(str(exc).replace("q_logits_space", "q_space")) from None


_dispatch.register("torch", "post", fused_divergence)
