"""A divergence fused with the output layer: the student's N x V logits are never held in full.

Distillation losses sit on top of a language model's output layer, ``logits = hidden @ W.T + b``
with a vocabulary of 32k to 256k. Materialising the logits (and their log-softmax, and their
gradient) costs several N x V float32 tensors. :func:`linear_kl_div` walks over the rows in chunks
instead; per chunk it makes the logits (float32 accumulation, half-precision inputs upcast for that
chunk only), the divergence and its gradient with respect to the logits, and turns that gradient
into the gradients of ``hidden`` (per chunk), ``weight`` and ``bias`` (accumulated over chunks)
right away. The backward pass then only scales what the forward pass made.

The divergence of each chunk is the core's (``kldiv._core.divergence``), computed by
``kldiv.backends.torch_fused.divergence_rows_with_grad`` (its C kernel, or its pure-torch path).
Should that module be unavailable, a private stand-in runs the core's row function under autograd
here. A top-k teacher is compared over K + 1 buckets (see :func:`linear_kl_div`), built in place
in the chunk's logits with an analytic gradient.
"""
from __future__ import annotations

import math

import torch

from .._core.validation import (
    check_beta, check_option, check_positive_finite, normalization_tolerance, validation_enabled,
)

__all__ = ["linear_kl_div", "auto_chunk_size", "topk_rest_tolerance"]

DIVERGENCES = ("forward", "reverse", "js")
TARGET_SPACES = ("logits", "log_probs")

#: extra memory the function aims at, as a fraction of one float32 N x V logits tensor
MEMORY_FRACTION = 0.2
#: fewest rows per chunk: below this the rank-C update of grad_weight (a read and a write of
#: V x H per chunk) and the matmuls with few rows run slowly (measured here: 16 rows 3x
#: slower than 1024, 128 rows about 25% slower)
MIN_CHUNK_ROWS = 256


# ----------------------------------------------------------------------------------------------
# the per-chunk divergence


def _standin_rows_with_grad(kind, p, q, *, p_space, q_space, temperature=1.0, beta=0.5,
                           need_grad_p=False, need_grad_q=True, grad_scale=None, out_q=None):
    """Fallback for ``torch_fused.divergence_rows_with_grad``: the core's rows under autograd."""
    from .._core import divergence as D
    from .._core._xp import namespace

    dt = torch.promote_types(p.dtype, q.dtype)
    dt = dt if dt in (torch.float32, torch.float64) else torch.float32
    with torch.enable_grad():
        Q = q.detach().to(dt).requires_grad_(True)
        xp = namespace(Q)
        rows = D.divergence_rows(kind, xp, p.detach().to(dt), Q, p_space, q_space, temperature,
                                 beta)
        s = torch.ones_like(rows) if grad_scale is None else grad_scale.to(dt)
        loss = torch.where(s != 0, rows * s, torch.zeros_like(rows)).sum()
        (g,) = torch.autograd.grad(loss, Q)
    if out_q is not None:
        out_q.copy_(g)
        g = out_q
    return rows.detach(), None, g


def _rows_function():
    """(row function, its internal chunk in elements or None when it does not chunk itself)."""
    try:
        from . import torch_fused
    except ImportError:  # pragma: no cover - depends on the other backend being present
        return _standin_rows_with_grad, None
    return torch_fused.divergence_rows_with_grad, getattr(torch_fused, "_CHUNK_ELEMENTS", 1 << 19)


def _rows_function_for(device):
    """The row function for tensors on ``device``: the Triton kernel where
    ``kldiv.backends.triton_kernels`` takes the device (CUDA tensors when Triton imports; CPU
    tensors in its interpreter with ``KLDIV_BACKEND=triton``), else torch_fused's."""
    try:
        from . import triton_kernels as tk
    except ImportError:  # pragma: no cover
        tk = None
    if tk is not None and tk.wanted_device(device):
        return tk.divergence_rows_with_grad
    return _rows_function()[0]


def _row_function_has_kernel(kind, device, dtype):
    """Whether the row function will use its C kernel (no temporaries of the chunk's size)."""
    try:
        from . import torch_fused
    except ImportError:  # pragma: no cover
        return False
    return (getattr(torch_fused, "_EXT", None) is not None and kind in ("forward", "reverse")
            and device.type == "cpu" and dtype in (torch.float32, torch.float64))


# the core's row function under autograd keeps about this many chunk-sized temporaries alive
# (measured with ru_maxrss: 43 for "forward", 46 for "reverse", 99 for "js" in float32)
_CORE_TEMPORARIES = {"forward": 48, "reverse": 48, "js": 100}


def auto_chunk_size(n_rows, vocab, hidden_size, *, divergence="forward", dtype=torch.float32,
                    topk=None, device="cpu", softcap=False):
    """Rows per chunk so that the extra memory stays near ``MEMORY_FRACTION`` of the logits.

    The budget is ``MEMORY_FRACTION * n_rows * vocab * 4`` bytes (a fraction of one float32
    logits tensor). A chunk of C rows holds its logits (C x V in the compute dtype; the gradient
    overwrites them), C x H for the hidden chunk and its gradient, and the divergence's own
    temporaries: none of the chunk's size in the C kernel, about 50 tensors of the row function's
    internal chunk (2**19 elements) in its pure-torch path, about 50-100 C x V tensors for the
    core under autograd (the stand-in); with a top-k target the divergence works on K + 1 columns
    only and the buckets are made in place in the logits. At least ``MIN_CHUNK_ROWS`` rows (matmul
    speed), at most ``n_rows``. ``softcap``: the student's logits are soft-capped (the cap's
    derivative is one more C x V tensor).
    """
    item = 8 if dtype == torch.float64 else 4
    budget = MEMORY_FRACTION * n_rows * vocab * 4
    _, inner = _rows_function()
    per_row = vocab * item + 3 * hidden_size * item
    if softcap:  # the cap's derivative: a second C x V tensor
        per_row += vocab * item
    width = vocab if not topk else topk + 1
    fixed = 0
    if inner is None:  # stand-in: temporaries scale with the chunk
        per_row += width * item * _CORE_TEMPORARIES[divergence]
    elif topk or not _row_function_has_kernel(divergence, torch.device(device), dtype):
        fixed = 50 * max(1, inner // max(width, 1)) * width * item
    rows = int((budget - fixed) // per_row)
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, rows)))


# ----------------------------------------------------------------------------------------------
# input handling


def _flat_rows(x, rows_shape, n, name, last):
    """``x`` of shape rows_shape + (last,) or (n, last) as (n, last)."""
    if tuple(x.shape[:-1]) == tuple(rows_shape) or (x.dim() == 2 and x.shape[0] == n):
        if x.shape[-1] != last:
            raise ValueError(f"{name}: expected {last} entries on the last axis, got {x.shape[-1]}")
        return x.reshape(n, last)
    raise ValueError(
        f"{name}: shape {tuple(x.shape)} does not match the rows of hidden {tuple(rows_shape)} "
        f"(expected {tuple(rows_shape) + (last,)} or {(n, last)})"
    )


def _row_tensor(x, rows_shape, n, name):
    try:
        return torch.broadcast_to(x, rows_shape).reshape(n)
    except RuntimeError:
        raise ValueError(
            f"{name}: shape {tuple(x.shape)} does not broadcast to the rows of hidden "
            f"{tuple(rows_shape)}"
        ) from None


def _bad_rows_message(bad, rows):
    idx = torch.nonzero(bad).flatten()
    first = int(rows[int(idx[0])]) if rows is not None else int(idx[0])
    more = f" (and {idx.numel() - 1} more in this chunk)" if idx.numel() > 1 else ""
    return f"row {first}{more}"


def _check_dense_chunk(t, space, rows, eps, cut=False):
    """Value checks of a chunk of the dense teacher; ``rows``: the global row numbers.

    ``cut``: the columns were cut at ``vocab_size``; log-probabilities then need a mass of at
    most 1 on the kept columns (not exactly 1)."""
    top = t.amax(-1)  # one pass: nan propagates, +inf and all--inf rows are not finite
    if bool(torch.isfinite(top).all()):
        if space == "log_probs":
            tol = normalization_tolerance(eps, t.shape[-1])
            lse = torch.logsumexp(t, -1)
            off = ((lse > tol) if cut else (lse.abs() > tol)) | (top > tol)
            if bool(off.any()):
                what = ("<= 0 with probabilities summing to at most 1 on the first vocab_size "
                        "columns" if cut else "<= 0 with logsumexp 0")
                raise ValueError(
                    f"target: log-probabilities must be {what} within {tol:.1e}; "
                    f"{_bad_rows_message(off, rows)} is not (pass target_space='logits')"
                )
        return
    nan = torch.isnan(t).any(-1)
    if bool(nan.any()):
        raise ValueError(f"target: contains nan at {_bad_rows_message(nan, rows)}")
    pinf = (t == math.inf).any(-1)
    if bool(pinf.any()):
        raise ValueError(f"target: contains +inf at {_bad_rows_message(pinf, rows)}")
    empty = (t == -math.inf).all(-1)
    if bool(empty.any()):
        raise ValueError(
            f"target: {_bad_rows_message(empty, rows)} is -inf everywhere: that is no distribution"
        )  # a row maximum that is not finite is one of the three cases above


def _check_topk(idx, lp, V, eps):
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"target: top-k indices must be an integer tensor, got dtype {idx.dtype}")
    if not lp.dtype.is_floating_point:
        raise TypeError(f"target: top-k log-probs must be floating point, got dtype {lp.dtype}")
    if idx.shape != lp.shape:
        raise ValueError(
            f"target: top-k indices and log-probs have shapes {tuple(idx.shape)} and "
            f"{tuple(lp.shape)}; they must be equal"
        )
    K = idx.shape[-1]
    if not 1 <= K <= V:
        raise ValueError(f"target: top-k with K = {K}; need 1 <= K <= vocabulary size {V}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
        raise ValueError(
            f"target: top-k indices must lie in [0, {V}); got values from {int(idx.min())} "
            f"to {int(idx.max())}"
        )
    s = torch.sort(idx, -1).values
    dup = (s[..., 1:] == s[..., :-1]).any(-1)
    if bool(dup.any()):
        raise ValueError(
            f"target: top-k indices repeat within {_bad_rows_message(dup.reshape(-1), None)}; "
            "each row needs K distinct categories"
        )
    tol = normalization_tolerance(eps, K)
    bad = torch.isnan(lp).any(-1) | (lp > tol).any(-1) | (torch.logsumexp(lp, -1) > tol)
    if bool(bad.any()):
        raise ValueError(
            "target: top-k log-probs must be <= 0, not nan, and their probabilities must sum to "
            f"at most 1 (within {tol:.1e}); {_bad_rows_message(bad.reshape(-1), None)} is not"
        )


def _side_option(name, value, teacher_logits, positive=True):
    """``softcap`` / ``logit_scale`` as (teacher's, student's): None skips a side.

    A number applies to every logits-space side (the student always; the teacher when it is a
    dense tensor of logits); a pair ``(teacher_value, student_value)`` sets each side, either
    may be None. A value for a teacher given as log-probabilities (or top-k) is refused."""
    def one(v, who):
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a number, None or a pair (teacher, student) of "
                            f"those, got {v!r}{who}")
        v = float(v)
        if not math.isfinite(v) or v == 0.0 or (positive and v < 0.0):
            need = "positive and finite" if positive else "finite and nonzero"
            raise ValueError(f"{name}: must be {need}, got {v!r}{who}")
        return v

    if value is None:
        return None, None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}: a pair (teacher_value, student_value) has 2 entries, "
                             f"got {len(value)}")
        t, st = one(value[0], " for the teacher"), one(value[1], " for the student")
        if t is not None and not teacher_logits:
            raise ValueError(
                f"{name}: the teacher is given as log-probabilities (target_space='log_probs' "
                f"or a top-k pair), not logits; pass ({name}=(None, {st!r})) or the teacher's logits"
            )
        return t, st
    v = one(value, "")
    return (v if teacher_logits else None), v


def _cap_teacher(t, cap, scale):
    """``cap * tanh(scale * t / cap)`` (or ``scale * t``), out of place; -inf entries (masked
    categories) stay -inf."""
    if cap is None:
        out = t * scale if scale is not None else t
    else:
        s = 1.0 if scale is None else scale
        out = torch.tanh(t * (s / cap)).mul_(cap)
    return torch.where(t == -math.inf, t, out)


def _cap_student(z, cap, scale):
    """``z <- cap * tanh(scale * z / cap)`` (or ``scale * z``) in place, returning dz'/dz.

    The derivative is ``scale * sech(u)^2`` with ``u = scale * z / cap``, computed as
    ``1 / cosh(u)^2`` from u itself (no ``1 - tanh^2`` cancellation where tanh is near +-1;
    0 where cosh overflows); a number (``scale``) without a cap; None for the identity."""
    if cap is None:
        if scale is None or scale == 1.0:
            return None
        z.mul_(scale)
        return scale
    s = 1.0 if scale is None else scale
    z.mul_(s / cap)
    d = torch.cosh(z).square_().reciprocal_()
    if s != 1.0:
        d.mul_(s)
    z.tanh_().mul_(cap)
    return d


# ----------------------------------------------------------------------------------------------
# the chunked forward pass that also makes the gradients


class _Plan:
    """Everything the chunk loop needs, checked and flattened."""


def _logits(h, weight, bias, cdt, vblock):
    """h (C x H, cdt) @ weight.T + bias, in cdt; half weights upcast by blocks of rows."""
    if weight.dtype == cdt:
        if bias is None:
            return h @ weight.T
        return torch.addmm(bias.to(cdt), h, weight.T)
    V = weight.shape[0]
    z = torch.empty(h.shape[0], V, dtype=cdt, device=h.device)
    for v0 in range(0, V, vblock):
        v1 = min(V, v0 + vblock)
        z[:, v0:v1] = h @ weight[v0:v1].to(cdt).T
    if bias is not None:
        z += bias.to(cdt)
    return z


def _backprop_chunk(g, h, weight, cdt, vblock, gw_acc, need_w, gh_out=None):
    """Given g = dL/dlogits (C x V): returns dL/dh (C x H) (written into ``gh_out`` when given,
    whatever the weight's dtype) and adds g.T @ h into gw_acc."""
    if weight.dtype == cdt:
        gh = g @ weight if gh_out is None else torch.mm(g, weight, out=gh_out)
        if need_w:
            gw_acc.addmm_(g.T, h)
        return gh
    V = weight.shape[0]
    # the weight in another dtype, cast a block at a time: accumulate into gh_out where given
    # (the caller then keeps no return value), else into a fresh buffer
    gh = (torch.zeros(h.shape[0], weight.shape[1], dtype=cdt, device=h.device)
          if gh_out is None else gh_out.zero_())
    for v0 in range(0, V, vblock):
        v1 = min(V, v0 + vblock)
        gb = g[:, v0:v1]
        gh.addmm_(gb, weight[v0:v1].to(cdt))
        if need_w:
            gw_acc[v0:v1].addmm_(gb.T, h)
    return gh


class _TopkStudent:
    """The student's log-probabilities over K+1 buckets, made in place in the chunk's logits.

    Buckets: the K indexed categories and the rest. With z' = z / T, e_j = exp(z'_j - m) on the
    complement of the K indices (m: the complement's maximum) and s_c = sum of e_j::

        lse_c = m + log s_c,   lse = logaddexp(lse_c, logsumexp_k z'_k)
        log q_k = z'_k - lse,  log q_rest = lse_c - lse

    (the rest is summed exactly over the complement: no ``1 - sum`` cancellation). Given the
    gradient g_b of the loss with respect to the K+1 bucket log-probabilities (S = sum of g_b),
    the gradient with respect to z' is, written once per row::

        d/dz'_j = e_j (g_rest / s_c - S exp(m - lse))       for j outside the K indices
        d/dz'_k = g_k - S exp(z'_k - lse)                     for the K indices

    which overwrites the logits in place: the chunk needs no second C x V tensor.
    """

    def __init__(self, z, idx, temperature):
        if temperature != 1.0:
            z.div_(temperature)
        self.z, self.idx, self.T = z, idx, temperature
        zk = torch.gather(z, -1, idx)
        self.rest = idx.shape[-1] < z.shape[-1]
        lse_k = torch.logsumexp(zk, -1, keepdim=True)
        if self.rest:
            z.scatter_(-1, idx, -math.inf)
            m = z.amax(-1, keepdim=True)
            s_c = z.sub_(m).exp_().sum(-1, keepdim=True)  # z now holds e_j (0 on the K)
            lse_c = m + torch.log(s_c)
            lse = torch.logaddexp(lse_c, lse_k)
            self.m, self.s_c = m, s_c
            self.log_q = torch.cat([zk - lse, lse_c - lse], -1)
        else:
            lse = lse_k
            self.log_q = zk - lse
        self.zk, self.lse = zk, lse

    def grad(self, g_b):
        """Overwrite the chunk's logits with d loss / d z (z before the temperature)."""
        z, K = self.z, self.idx.shape[-1]
        S = g_b.sum(-1, keepdim=True)
        if self.rest:
            z.mul_(g_b[:, K:] / self.s_c - S * torch.exp(self.m - self.lse))
        else:
            z.zero_()
        z.scatter_(-1, self.idx, g_b[:, :K] - S * torch.exp(self.zk - self.lse))
        if self.T != 1.0:
            z.div_(self.T)
        return z


#: the floor of a top-k teacher's rest tolerance (:func:`topk_rest_tolerance`): a left-out mass
#: ``1 - sum_k exp(log_probs_k)`` at or below the row's tolerance is taken as exactly 0 (the
#: teacher's extra bucket is empty: the reverse KL is then +inf wherever the student puts mass
#: outside the K indices). 2^-40 (about 9.1e-13) is far above the error of the evaluation below
#: (about 1e-28) and above the rounding residue of a top-k teacher renormalised in float64
#: (``log_softmax`` of the top-k logits: about 1e-16 times the logits' magnitude); it is the
#: whole tolerance of float64 log-probs.
TOPK_REST_TOL = 2.0**-40


def _all_finite(x):
    return bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())  # one pass; nan propagates


def topk_rest_tolerance(lp):
    """Per row (shape (rows, 1), float64): the largest left-out mass that rounding can leave in
    top-k log-probs ``lp`` (rows, K) stored in their dtype, which are then taken as complete.

    ``max(TOPK_REST_TOL, u (1 + 2 sum_k p_k |lp_k|) + 4 u' sqrt(K))`` with u the storage dtype's
    unit roundoff (2^-53 float64, 2^-24 float32, 2^-11 float16, 2^-8 bfloat16) and
    u' = min(u, 2^-24). Rounding a log-probability to its dtype moves it by at most u |lp_k|, so
    its probability by about u |lp_k| relative: the sum of the stored probabilities of a
    distribution that summed to 1 is off by at most ``u sum_k p_k |lp_k|`` (taken twice, plus u),
    and the renormalisation itself (a sum of K exponentials and its log, in float32 or better)
    adds a few units of u' sqrt(K) (measured: about 1e-5 for float32 ``log_softmax`` over
    K = 32000, where this gives 4.3e-5). float64 log-probs keep ``TOPK_REST_TOL`` (the other terms
    stay below it up to K ~ 4e6), so a teacher renormalised in float32 and stored in float64 has
    real mass: the stored values cannot tell its residue from mass.

    >>> import torch
    >>> lp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, -1.0]]), -1)  # float32, renormalised
    >>> abs(1 - float(lp.double().exp().sum())) <= float(topk_rest_tolerance(lp))
    True
    >>> float(topk_rest_tolerance(lp.double())) == TOPK_REST_TOL
    True
    """
    u = torch.finfo(lp.dtype).eps / 2
    u2 = min(u, 2.0**-24)
    x = lp.to(torch.float64)
    s = torch.where(x > -math.inf, torch.exp(x) * -x, torch.zeros_like(x)).sum(-1, keepdim=True)
    return torch.clamp(u * (1 + 2 * s) + 4 * u2 * math.sqrt(lp.shape[-1]), min=TOPK_REST_TOL)


_EXP_N = 1024  # table entries of _exp_dd (2^(j/1024) in double-double)
_EXP_TABLES = {}


def _exp_dd_table(device):
    """ln2 / N in three parts (the first two of 31 bits: k times them is exact for |k| < 2^22)
    and 2^(j/N) as hi + lo, computed once per device with 60-digit decimals."""
    t = _EXP_TABLES.get(device)
    if t is None:
        from decimal import Decimal, localcontext

        with localcontext() as ctx:
            ctx.prec = 60
            ln2 = Decimal(2).ln()

            def split31(v):
                m, e = math.frexp(float(v))
                f = math.ldexp(round(m * 2**31), e - 31)
                return f, v - Decimal(f)

            l1, rem = split31(ln2 / _EXP_N)
            l2, rem = split31(rem)
            hi, lo = [], []
            for j in range(_EXP_N):
                v = (ln2 * j / _EXP_N).exp()
                hi.append(float(v))
                lo.append(float(v - Decimal(hi[-1])))
        f64 = dict(dtype=torch.float64, device=device)
        t = (l1, l2, float(rem), torch.tensor(hi, **f64), torch.tensor(lo, **f64))
        _EXP_TABLES[device] = t
    return t


def _two_sum(a, b):
    s = a + b
    z = s - a
    return s, (a - (s - z)) + (b - z)


def _two_prod(a, b):
    p = a * b
    t = 134217729.0 * a  # Dekker's split (2^27 + 1)
    ah = t - (t - a)
    t = 134217729.0 * b
    bh = t - (t - b)
    al, bl = a - ah, b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _exp_dd(x):
    """exp(x) of float64 x <= 0 as hi + lo, within 3e-27 relative for x >= -600 (double-double:
    x = k ln2 / 1024 + r exactly, exp(r) - 1 by its series to r^7 with r^2 exact, times the
    table's 2^(k mod 1024 / 1024)); below -700 and at -inf the plain exp (lo = 0)."""
    l1, l2, l3, t_hi, t_lo = _exp_dd_table(x.device)
    plain = ~(x >= -700.0)
    xf = torch.where(plain, torch.zeros_like(x), x)
    k = torch.round(xf * (_EXP_N / math.log(2.0)))
    s, t = _two_sum(xf - k * l1, -(k * l2))  # both products exact, the difference too
    rh, rl = _two_sum(s, t - k * l3)
    sq, sq_l = _two_prod(rh, rh)
    poly = 1 / 6 + rh * (1 / 24 + rh * (1 / 120 + rh * (1 / 720 + rh * (1 / 5040))))
    eh, el = _two_sum(rh, 0.5 * sq)
    eh, el = _two_sum(eh, el + ((0.5 * sq_l + rh * rl) + rh * sq * poly + rl))
    ki = k.to(torch.int64)
    j = torch.remainder(ki, _EXP_N)
    th, tl = t_hi[j], t_lo[j]
    ph, pl = _two_prod(th, eh)  # 2^(j/N) (1 + E)
    hi, lo = _two_sum(th, ph)
    hi, lo = _two_sum(hi, lo + (pl + th * el + tl + tl * eh))
    q = torch.div(ki - j, _EXP_N, rounding_mode="floor")
    hi, lo = torch.ldexp(hi, q), torch.ldexp(lo, q)
    return torch.where(plain, torch.exp(x), hi), torch.where(plain, torch.zeros_like(x), lo)


def _one_minus_sum(v):
    """1 - sum(v) over the last axis (keepdim) of values in [0, 1], without rounding error in the
    sum: Rump's extraction at two powers of two (the high parts' sums are exact; what is left,
    below 2^-100 relative, is summed plainly). 1 - s1 is exact where s1 is near 1."""
    bits = math.ceil(math.log2(max(v.shape[-1], 1))) + 1
    sigma = 2.0**bits  # >= 2 * (number of parts)
    h1 = (v + sigma) - sigma
    v1 = v - h1  # exact, |v1| <= sigma 2^-53
    sigma2 = sigma * 2.0 ** (bits - 53)
    h2 = (v1 + sigma2) - sigma2
    v2 = v1 - h2
    s1, s2 = h1.sum(-1, keepdim=True), h2.sum(-1, keepdim=True)
    return ((1.0 - s1) - s2) - v2.sum(-1, keepdim=True)


def _topk_rest_mass(lp, cdt=torch.float64):
    """The teacher's left-out mass ``1 - sum_k exp(lp_k)`` per row, float64 of shape (rows, 1).

    Computed from the stored values (any float dtype, converted exactly to float64) with the
    sum free of rounding error (:func:`_one_minus_sum`): with float64 exponentials first (about
    2^-52 absolute, from their rounding), then, on the rows where that is not enough for the
    compute dtype ``cdt`` (a mass below 2^-20 for float32, below 1/4 for float64), with
    double-double ones (:func:`_exp_dd`): about 1e-28 absolute, so every mass above
    :data:`TOPK_REST_TOL` keeps the compute dtype's full relative accuracy (in the compute dtype
    a float32 mass of 1.5e-8 was 0).
    """
    x = lp.to(torch.float64)
    rest = _one_minus_sum(torch.exp(x))
    fine = rest < (0.25 if cdt == torch.float64 else 2.0**-20)
    rows = torch.nonzero(fine.reshape(-1)).flatten()
    if rows.numel():
        hi, lo = _exp_dd(x.index_select(0, rows))
        rest.index_copy_(0, rows, _one_minus_sum(torch.cat([hi, lo], -1)))
    return rest


def _topk_teacher_buckets(lp, V, cdt):
    """The teacher's K + 1 bucket log-probabilities: the K stored ones and log of the left-out
    mass (:func:`_topk_rest_mass`; -inf at or below the row's :func:`topk_rest_tolerance`, as for
    a teacher that sums to 1 within its dtype's rounding or to a little more). A deterministic
    function of the stored values and their dtype."""
    if lp.shape[-1] == V:
        return lp.to(cdt)
    # (on the CPU for MPS, which has no float64: K values per row)
    lp_h = lp.cpu() if lp.device.type == "mps" else lp
    r = _topk_rest_mass(lp_h, cdt)
    tol = topk_rest_tolerance(lp_h)
    log_r = torch.where(r > tol, torch.log(torch.clamp(r, min=TOPK_REST_TOL)),
                        torch.full_like(r, -math.inf))
    log_r = torch.where(torch.isnan(r), r, log_r)  # a nan teacher row (validate=False) stays nan
    return torch.cat([lp.to(cdt), log_r.to(dtype=cdt, device=lp.device)], -1)


def _run(hidden, weight, bias, plan):
    """Loss and gradients (hidden, weight, bias), chunk by chunk."""
    rows_fn = _rows_function_for(hidden.device)
    base_fn = _rows_function()[0]
    cdt, n, V = plan.cdt, plan.n, plan.V  # V: the columns kept (vocab_size)
    V_all = weight.shape[0]
    dev = hidden.device
    h2 = hidden.reshape(n, hidden.shape[-1])
    H = h2.shape[1]
    keep_idx = plan.keep_idx  # None: every row counts
    n_keep = n if keep_idx is None else keep_idx.numel()
    need_h, need_w, need_b = plan.need
    need_any = need_h or need_w or need_b
    gh_full = torch.zeros(n, H, dtype=hidden.dtype, device=dev) if need_h else None
    gw_acc = None
    if need_w:
        gw_full = torch.zeros(V_all, H, dtype=cdt if weight.dtype != cdt else weight.dtype,
                              device=dev)
        gw_acc = gw_full[:V]  # rows at or beyond vocab_size get no gradient
    gb_full = torch.zeros(V_all, dtype=cdt, device=dev) if need_b else None
    gb_acc = None if gb_full is None else gb_full[:V]
    total = torch.zeros((), dtype=cdt, device=dev)
    scale = plan.scale_mean / n_keep if plan.reduction == "mean" and n_keep else plan.scale_mean
    C = plan.chunk
    vblock = max(1, (C * V) // max(H, 1))
    bias_c = None if bias is None else bias.detach()[:V]
    w = weight.detach()[:V]
    t_cap, s_cap = plan.softcap
    t_scale, s_scale = plan.logit_scale
    t_apply = t_cap is not None or (t_scale is not None and t_scale != 1.0)
    for i in range(0, n_keep, C):
        if keep_idx is None:
            sl = slice(i, min(i + C, n))
            rows_g = None
            h = h2[sl].detach()
        else:
            rows_g = keep_idx[i:i + C]
            h = h2.detach().index_select(0, rows_g)
        c = h.shape[0]
        h = h.to(cdt)
        z = _logits(h, w, bias_c, cdt, vblock)
        dz = _cap_student(z, s_cap, s_scale)  # z is now the model's (capped, scaled) logits
        s = torch.full((c,), scale, dtype=cdt, device=dev)
        if plan.topk is None:
            t = plan.target[sl] if rows_g is None else plan.target.index_select(0, rows_g)
            if t.shape[-1] != V:
                t = t[:, :V]
            if plan.validate:
                _check_dense_chunk(t, plan.target_space, rows_g if rows_g is not None
                                   else torch.arange(i, i + c), plan.eps, cut=plan.cut)
            t = t.to(cdt)
            if t_apply:
                t = _cap_teacher(t, t_cap, t_scale)
            t = t.contiguous()
            rows, _, g = rows_fn(plan.kind, t, z, p_space=plan.rows_space,
                                 q_space="logits", temperature=plan.temperature, beta=plan.beta,
                                 need_grad_p=False, need_grad_q=need_any, grad_scale=s,
                                 out_q=z if need_any else None)
            if rows_fn is not base_fn and plan.validate:
                # rows the Triton kernel could not hold are nan (its gradient too, written
                # over the logits): made again from h and computed by the torch row function
                bad = torch.nonzero(torch.isnan(rows) & (s != 0)).flatten()
                if bad.numel():
                    zb = _logits(h.index_select(0, bad), w, bias_c, cdt, vblock)
                    _cap_student(zb, s_cap, s_scale)
                    rb, _, gb = base_fn(plan.kind, t.index_select(0, bad), zb,
                                        p_space=plan.rows_space, q_space="logits",
                                        temperature=plan.temperature, beta=plan.beta,
                                        need_grad_p=False, need_grad_q=need_any,
                                        grad_scale=s.index_select(0, bad),
                                        out_q=zb if need_any else None)
                    rows = rows.index_copy(0, bad, rb.to(rows.dtype))
                    if need_any:
                        g.index_copy_(0, bad, gb.to(g.dtype))
        else:
            ti, tl = plan.topk
            if rows_g is None:
                ti, tl = ti[sl], tl[sl]
            else:
                ti, tl = ti.index_select(0, rows_g), tl.index_select(0, rows_g)
            ti = ti.to(torch.int64)
            p_b = _topk_teacher_buckets(tl, V, cdt)
            student = _TopkStudent(z, ti, plan.temperature)
            rows, _, g_b = rows_fn(plan.kind, p_b, student.log_q, p_space="log_probs",
                                   q_space="log_probs", temperature=1.0, beta=plan.beta,
                                   need_grad_p=False, need_grad_q=need_any, grad_scale=s)
            if rows_fn is not base_fn and plan.validate:
                bad = torch.nonzero(torch.isnan(rows) & (s != 0)).flatten()
                if bad.numel():  # as above (the bucket log-probs were not overwritten)
                    rb, _, gb = base_fn(plan.kind, p_b.index_select(0, bad),
                                        student.log_q.index_select(0, bad),
                                        p_space="log_probs", q_space="log_probs",
                                        temperature=1.0, beta=plan.beta, need_grad_p=False,
                                        need_grad_q=need_any, grad_scale=s.index_select(0, bad))
                    rows = rows.index_copy(0, bad, rb.to(rows.dtype))
                    if need_any:
                        g_b = g_b.index_copy(0, bad, gb.to(g_b.dtype))
            if need_any:
                g = student.grad(g_b)
            del student
        total = total + rows.sum() * scale if c else total
        if need_any and dz is not None:
            g.mul_(dz)  # through the cap and the scale: d loss / d raw logits
        dz = None
        if need_any:
            direct = need_h and rows_g is None and gh_full.dtype == cdt
            gh = _backprop_chunk(g, h, w, cdt, vblock, gw_acc, need_w,
                                 gh_full[sl] if direct else None)
            if need_b:
                gb_acc += g.sum(0)
            if need_h and not direct:
                if rows_g is None:
                    gh_full[sl] = gh
                else:
                    gh_full.index_copy_(0, rows_g, gh.to(gh_full.dtype))
        z = g = None  # g is z's buffer: free it before the next chunk's logits exist
    gw = None if gw_acc is None else gw_full.to(weight.dtype)
    gb = None if gb_acc is None else gb_full.to(bias.dtype)
    gh = None if gh_full is None else gh_full.view(hidden.shape)
    return total, gh, gw, gb


class _LinearDivergence(torch.autograd.Function):
    """loss = reduce(divergence(target, hidden @ W.T + b)); gradients made by forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan):
        loss, gh, gw, gb = _run(hidden, weight, bias, plan)
        ctx.grads = (gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_kl_div: backward can run once only (its gradients are handed to "
                "autograd without a copy); call linear_kl_div again to backpropagate again"
            )
        grads, ctx.grads = ctx.grads, None
        one = g.device.type == "cpu" and float(g) == 1.0
        out = []
        for t in grads:
            if t is None or one:
                out.append(t)
            else:
                out.append(t.mul_(g.to(t.dtype)))
        return out[0], out[1], out[2], None


# ----------------------------------------------------------------------------------------------
# the public function


def linear_kl_div(hidden, weight, target, *, bias=None, target_space="logits",
                  divergence="forward", beta=0.5, temperature=1.0, t2_scale=False,
                  reduction="mean", mask=None, labels=None, ignore_index=-100, softcap=None,
                  logit_scale=None, vocab_size=None, chunk_size=None, validate=None):
    r"""Divergence between a teacher and the student ``hidden @ weight.T + bias``, chunk by chunk.

    .. math:: \mathrm{loss} = \operatorname{reduce}_r\, D\big(p_r \,\|\, \mathrm{softmax}(
              (h_r W^\top + b) / T)\big)

    with ``D`` the forward KL ``KL(p || q)`` (``divergence="forward"``), the reverse KL
    ``KL(q || p)`` (``"reverse"``) or the generalised Jensen-Shannon divergence
    ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q`` (``"js"``, as
    ``kldiv.js_div(teacher, student, beta=beta)``); p is the teacher, q the student. The values are
    the core's (``kldiv.kl_div`` and family on the full logits), with its edges: teacher entries of
    -inf contribute 0 to the forward KL; the reverse KL is +inf where the teacher has a zero.

    The student's logits are never materialised in full: per chunk of rows, the logits are made
    with float32 accumulation (bfloat16/float16 ``hidden`` and ``weight`` are upcast for that
    chunk only; float64 stays float64), then the divergence and its gradient with respect to the
    logits, which is turned into the gradients with respect to ``hidden`` (per chunk), ``weight``
    and ``bias`` (accumulated) at once. ``backward`` only scales them. No gradient reaches
    ``target`` (the teacher is a constant). Extra memory: one chunk of logits and the row
    function's temporaries, about ``MEMORY_FRACTION`` (0.2) of one float32 N x V tensor with the
    automatic ``chunk_size``, plus the gradients themselves (float32 accumulators for ``weight`` and
    ``bias`` when these are half precision).

    Top-k teachers. ``target=(indices, log_probs)``, both of shape (N, K) (or rows shape + (K,)):
    the teacher's log-probabilities on K distinct categories per row, as offline distillation
    pipelines store them. The divergence is taken over K + 1 buckets: the K listed categories and
    ONE extra bucket holding everything else. The teacher's extra bucket has the mass it left out,
    ``1 - sum_k exp(log_probs_k)``, computed from the stored values whatever their dtype in
    double-double arithmetic (to about 1e-28 absolute: a float64 mass of 1e-12 keeps every
    digit), and taken as exactly 0 when it is within what rounding to the storage dtype can leave
    (:func:`topk_rest_tolerance`): ``max(2^-40, u (1 + 2 sum_k p_k |log_probs_k|) +
    4 u' sqrt(K))``, u the unit roundoff of the log-probs' dtype, u' = min(u, 2^-24); 2^-40 for
    float64, about 1e-6 for float32 at K = 8, 1e-2 for bfloat16. So a teacher renormalised over
    its top K (``log_softmax`` of the top-k logits, in any dtype) has an empty extra bucket
    whatever the sign of its rounding residue: the forward KL and JS are those of the stored
    distribution, the reverse KL is +inf wherever the student puts mass outside the K indices.
    A larger left-out mass is the teacher's (finite reverse KL); a smaller one cannot be told
    from rounding in that dtype (store the log-probs in float64 to keep it). The student's
    extra bucket has its mass outside the K indices, ``1 - sum_k q(indices_k)`` (computed as a
    log-sum-exp over the complement, no cancellation). With K = V there is no extra bucket.
    ``temperature`` then divides the student's logits only: the stored teacher log-probs are
    used as given (store them at the temperature you want).

    Args:
      hidden: (N, H) or (..., H) student hidden states; float32, float64, bfloat16 or float16.
      weight: (V, H) output-layer weight (``torch.nn.Linear(H, V).weight``).
      target: the teacher: a tensor (N, V) or (..., V) of logits or log-probabilities
        (``target_space``), or a pair ``(indices, log_probs)`` of shape (N, K) (see above).
      bias: optional (V,) output-layer bias.
      target_space: ``"logits"`` or ``"log_probs"`` for a dense ``target``.
      divergence: ``"forward"``, ``"reverse"`` or ``"js"``.
      beta: the Jensen-Shannon mixture weight, strictly between 0 and 1 (``"js"`` only).
      temperature: divides the student's and the (dense) teacher's logits before the softmax.
      t2_scale: multiply the loss by ``temperature**2`` (the usual distillation factor).
      reduction: ``"mean"`` (over the rows that count; 0 when none does) or ``"sum"``.
      mask: optional boolean tensor of the rows shape: false rows are skipped (no matmul, no
        divergence, zero gradient) and not counted by the mean.
      labels: optional integer tensor of the rows shape; rows whose label equals
        ``ignore_index`` are skipped like masked rows. Row-aligned: row t is skipped when
        ``labels[t] == ignore_index``. Hugging Face's ``labels`` are aligned with ``input_ids``
        (the hidden state at t predicts ``labels[t + 1]``): pass ``hidden[:, :-1]`` with
        ``labels[:, 1:]`` (``kldiv.integrations.hf`` does this shift itself).
      ignore_index: the label value of skipped rows (default -100, as PyTorch's losses).
      softcap: logit soft-capping as the model's forward applies it (Gemma-2's
        ``final_logit_softcapping``): the logits become ``softcap * tanh(logit_scale * z /
        softcap)``, with the gradients through it (into hidden, weight and bias). A number
        applies to every logits-space side: the student always, the teacher when ``target``
        holds logits; a pair ``(teacher_value, student_value)`` sets each side (None skips
        one). Teacher entries of -inf (masked categories) stay -inf. Applied before the
        temperature.
      logit_scale: a finite nonzero factor on the logits (``logit_scale * z``, or inside the
        cap as above); number or pair as ``softcap``. softcap must be positive and finite.
      vocab_size: the vocabulary both sides share: columns at or beyond it are excluded on
        both sides (the student's extra rows of ``weight``/``bias`` get no gradient; the
        teacher's extra columns are never read), so the teacher and the student may have
        different widths (Qwen's 151936 and 152064). Both widths must be at least
        ``vocab_size``. The excluded columns carry no probability: this is not the same as
        padding the narrower side with zero logits, which gives the padding real mass. None
        (default): both widths must be equal.
      chunk_size: rows per chunk; None picks it from N, V and H (:func:`auto_chunk_size`).
      validate: check values (teacher nan/+inf/normalisation, finite hidden and weight, top-k
        indices in range and distinct); None follows ``kldiv.set_validation``. The dense
        teacher is checked chunk by chunk as it is read, masked rows are never read.

    Returns:
      A 0-d tensor in the compute dtype (float32, or float64 when an input is float64).

    Example (the value is KL(p || q) written out by hand on the materialised logits):

    >>> import torch
    >>> from kldiv.torch import linear_kl_div
    >>> g = torch.Generator().manual_seed(0)
    >>> h = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    >>> W = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    >>> t = torch.randn(6, 5, generator=g, dtype=torch.float64)
    >>> loss = linear_kl_div(h, W, t, chunk_size=4)
    >>> p, logq = torch.softmax(t, -1), torch.log_softmax(h @ W.T, -1)
    >>> by_hand = (p * (p.log() - logq)).sum(-1).mean()
    >>> bool(torch.allclose(loss, by_hand))
    True
    >>> loss.backward(); by_hand.backward()   # h.grad and W.grad now hold the sum of both
    >>> h.grad.shape, W.grad.shape
    (torch.Size([6, 4]), torch.Size([5, 4]))
    """
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("hidden and weight: expected torch tensors")
    check_option("divergence", divergence, DIVERGENCES)
    check_option("reduction", reduction, ("mean", "sum"))
    check_option("target_space", target_space, TARGET_SPACES)
    temperature = check_positive_finite("temperature", temperature)
    beta = check_beta(beta) if divergence == "js" else 0.5  # beta weighs JS only
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__} {x!r}")
        if x is not None and not x.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape (N, H) or (..., H), got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected shape (V, {hidden.shape[-1]}) to match hidden's last axis, got "
            f"{tuple(weight.shape)}"
        )
    V, H = weight.shape
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias: expected shape ({V},), got {tuple(bias.shape)}")
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size: expected a positive int or None, got {vocab_size!r}")
        if not 1 <= vocab_size <= V:
            raise ValueError(
                f"vocab_size: must lie in [1, {V}] (the student's vocabulary, weight.shape[0]), "
                f"got {vocab_size}"
            )
        V = vocab_size
    rows_shape = tuple(hidden.shape[:-1])
    n = math.prod(rows_shape)
    plan = _Plan()
    plan.n, plan.V, plan.kind, plan.beta = n, V, divergence, beta
    plan.cut = False
    plan.temperature, plan.reduction, plan.target_space = temperature, reduction, target_space
    plan.scale_mean = temperature**2 if t2_scale else 1.0
    plan.validate = validation_enabled(validate)

    floats = [hidden.dtype, weight.dtype] + ([bias.dtype] if bias is not None else [])
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError("target: a top-k target is a pair (indices, log_probs)")
        ti, tl = target
        if not isinstance(ti, torch.Tensor) or not isinstance(tl, torch.Tensor):
            raise TypeError("target: top-k indices and log-probs must be torch tensors")
        if ti.shape != tl.shape:
            _check_topk(ti, tl, V, 0.0)  # raises the shape message
        K = ti.shape[-1] if ti.dim() else 0
        ti = _flat_rows(ti, rows_shape, n, "target (top-k indices)", K)
        tl = _flat_rows(tl, rows_shape, n, "target (top-k log-probs)", K)
        floats.append(tl.dtype)
        plan.topk, plan.target = (ti, tl), None
        topk_k = K
    elif isinstance(target, torch.Tensor):
        if not target.dtype.is_floating_point:
            raise TypeError(f"target: expected a floating-point tensor, got dtype {target.dtype}")
        Vt = target.shape[-1] if target.dim() else 0
        if vocab_size is None and Vt != V:
            raise ValueError(
                f"target: the teacher has {Vt} columns and the student {V} (weight.shape[0]); "
                f"pass vocab_size=N to compare the first N columns of both"
            )
        if vocab_size is not None and Vt < V:
            raise ValueError(
                f"vocab_size: {V} is more than the teacher's {Vt} columns (target.shape[-1])"
            )
        plan.target = _flat_rows(target.detach(), rows_shape, n, "target", Vt)
        plan.cut = target_space == "log_probs" and Vt > V
        plan.topk = None
        floats.append(target.dtype)
        topk_k = None
    else:
        raise TypeError(
            f"target: expected a tensor of teacher logits/log-probs or a pair (indices, "
            f"log_probs), got {type(target).__name__}"
        )
    cdt = torch.float64 if torch.float64 in floats else torch.float32
    plan.cdt = cdt
    teacher_logits = plan.topk is None and target_space == "logits"
    plan.softcap = _side_option("softcap", softcap, teacher_logits)
    plan.logit_scale = _side_option("logit_scale", logit_scale, teacher_logits, positive=False)
    # log-probabilities cut at vocab_size are renormalised on the kept columns (the row
    # function's "logits" space does exactly that; "log_probs" would be the same math)
    plan.rows_space = "logits" if (plan.cut or teacher_logits) else target_space
    plan.eps = torch.finfo(plan.target.dtype if plan.topk is None else plan.topk[1].dtype).eps

    keep = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask: expected a boolean tensor of the rows shape")
        keep = _row_tensor(mask.to(hidden.device), rows_shape, n, "mask")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point:
            raise TypeError("labels: expected an integer tensor of the rows shape")
        lab = _row_tensor(labels.to(hidden.device), rows_shape, n, "labels") != ignore_index
        keep = lab if keep is None else keep & lab
    plan.keep_idx = None if keep is None else torch.nonzero(keep).flatten()

    if plan.validate:
        for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            if x is not None and x.numel() and not _all_finite(x):
                if name == "hidden" and plan.keep_idx is not None and (
                        plan.keep_idx.numel() == 0 or _all_finite(
                            hidden.reshape(n, H).index_select(0, plan.keep_idx))):
                    continue  # only rows that the mask / labels leave out (padding) hold it
                where = " (in rows that count)" if name == "hidden" and keep is not None else ""
                raise ValueError(f"{name}: contains nan or inf{where}")
        if plan.topk is not None:
            ti, tl = plan.topk
            if plan.keep_idx is not None:
                ti, tl = ti.index_select(0, plan.keep_idx), tl.index_select(0, plan.keep_idx)
            _check_topk(ti, tl, V, plan.eps)
    elif plan.topk is not None and plan.topk[0].dtype.is_floating_point:
        raise TypeError(f"target: top-k indices must be an integer tensor, got dtype "
                        f"{plan.topk[0].dtype}")

    if chunk_size is None:
        chunk_size = auto_chunk_size(n, V, H, divergence=divergence, dtype=cdt, topk=topk_k,
                                     device=hidden.device,
                                     softcap=plan.softcap[1] is not None)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    plan.chunk = int(chunk_size)
    grad_on = torch.is_grad_enabled()
    plan.need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                 grad_on and bias is not None and bias.requires_grad)
    if not any(plan.need):
        with torch.no_grad():
            return _run(hidden, weight, bias, plan)[0]
    return _LinearDivergence.apply(hidden, weight, bias, plan)
