"""High-precision reference values for the KL family, independent of kldiv's code.

Inputs are taken EXACTLY: every float (float16, bfloat16, float32, float64) is converted to an
mpmath number without rounding, then everything is computed with ``mp.dps = 50`` digits from the
textbook definitions (no cancellation-avoiding tricks are needed at that precision; the
precision grows with the dynamic range of the inputs, so subnormals next to 1 are exact too):

    probs:      p_i / sum_j p_j           (kldiv renormalises probability rows; so does the oracle)
    probs, T:   p_i^(1/T) / sum_j p_j^(1/T)
    log space:  x_i / T - log sum_j exp(x_j / T)   ("log_probs" and "logits" alike)
    KL(p || q) = sum_i p_i log(p_i / q_i), with p_i = 0 -> 0 and p_i > 0 = q_i -> +inf

``kl_extended`` is a fast reference for large vocabularies (V = 32000 and up, where mpmath takes
seconds per row): the same textbook formula on logits, in NumPy's extended precision
(``np.longdouble``, 64-bit mantissa on x86-64). The tests check it against the mpmath oracle on
smaller rows; where the platform has no extended precision it falls back to mpmath.
"""
from __future__ import annotations

import mpmath
import numpy as np

DPS = 50
SPACES = ("probs", "log_probs", "logits")


def _mp_row(x):
    return [mpmath.mpf(float(v)) for v in np.asarray(x, dtype=np.float64).ravel()]


#: cap on the digits added for a row's dynamic range: masses more than 10^-RANGE_CAP below the
#: largest one cannot change a float64 result (its smallest subnormal is 5e-324)
RANGE_CAP = 400


def _dps(*rows, log_space=False, temperature=1.0):
    """Working digits: ``DPS`` plus the dynamic range of the distributions, so that a row sum
    such as 1 + 5e-324 is exact and tiny masses are not lost next to a mass of almost 1.

    For probabilities the range is max/min of the positive entries; for log-space inputs it is
    exp(max - min) of the finite entries divided by T (logits 200 apart mean masses 1e-87
    apart), capped at ``RANGE_CAP`` digits, plus the digits of the largest magnitude |x / T|
    (a logit of 1e30 needs 30 digits before its fraction starts), so that huge logits and
    huge shifts are taken exactly too.
    """
    extra = 0  # range digits (doubled below)
    mag = 0  # digits of the largest magnitude
    t = float(temperature)
    for x in rows:
        x = np.asarray(x, dtype=np.float64)
        if log_space:
            f = x[np.isfinite(x)]
            if f.size:
                rng = (float(f.max()) - float(f.min())) / t  # float: no overflow warning
                rng_digits = rng / np.log(10) + 1 if np.isfinite(rng) else RANGE_CAP
                extra = max(extra, int(min(RANGE_CAP, rng_digits)))
                big = float(np.max(np.abs(f))) / t
                mag = max(mag, int(np.log10(max(big, 1.0))) + 1)
            continue
        a = np.abs(x)
        a = a[np.isfinite(a) & (a > 0)]
        if a.size:
            rng = int(np.log10(a.max()) - np.log10(a.min())) + 1
            extra = max(extra, min(RANGE_CAP, int(rng / min(t, 1.0)) + 1))
    return DPS + 2 * extra + mag


def _dps_for(p, q=None, p_space="probs", q_space="probs", temperature=1.0):
    """Digits for a pair of rows in their spaces (the temperature included)."""
    d = _dps(p, log_space=p_space != "probs", temperature=temperature)
    if q is not None:
        d = max(d, _dps(q, log_space=q_space != "probs", temperature=temperature))
    return d


def distribution(x, space="probs", temperature=1.0):
    """The normalised distribution of one row as a list of mpf (0 entries stay exactly 0)."""
    with mpmath.workdps(max(mpmath.mp.dps, _dps_for(x, None, space, "probs", temperature))):
        v = _mp_row(x)
        t = mpmath.mpf(float(temperature))
        if space == "probs":
            if t != 1:
                v = [mpmath.power(a, 1 / t) if a > 0 else mpmath.mpf(0) for a in v]
            s = mpmath.fsum(v)
            return [a / s for a in v]
        if space not in ("log_probs", "logits"):
            raise ValueError(space)
        v = [a / t if a != -mpmath.inf else a for a in v]
        m = max(v)
        lse = m + mpmath.log(mpmath.fsum(mpmath.exp(a - m) for a in v if a != -mpmath.inf))
        return [mpmath.exp(a - lse) if a != -mpmath.inf else mpmath.mpf(0) for a in v]


def _kl_dist(P, Q):
    terms = []
    for a, b in zip(P, Q):
        if a == 0:
            continue
        if b == 0:
            return mpmath.inf
        terms.append(a * mpmath.log(a / b))
    return mpmath.fsum(terms)


def kl(p, q, p_space="probs", q_space="probs", temperature=1.0):
    """KL(p || q) of one pair of rows, as an mpf with (at least) ``DPS`` digits."""
    with mpmath.workdps(_dps_for(p, q, p_space, q_space, temperature)):
        return _kl_dist(distribution(p, p_space, temperature), distribution(q, q_space, temperature))


def reverse_kl(p, q, p_space="probs", q_space="probs", temperature=1.0):
    """KL(q || p)."""
    return kl(q, p, q_space, p_space, temperature)


def jeffreys(p, q, p_space="probs", q_space="probs", temperature=1.0):
    """KL(p || q) + KL(q || p)."""
    with mpmath.workdps(_dps_for(p, q, p_space, q_space, temperature)):
        return kl(p, q, p_space, q_space, temperature) + reverse_kl(p, q, p_space, q_space,
                                                                    temperature)


def js(p, q, beta=0.5, p_space="probs", q_space="probs", temperature=1.0):
    """beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q."""
    with mpmath.workdps(_dps_for(p, q, p_space, q_space, temperature)):
        P = distribution(p, p_space, temperature)
        Q = distribution(q, q_space, temperature)
        b = mpmath.mpf(float(beta))
        M = [b * a + (1 - b) * c for a, c in zip(P, Q)]
        return b * _kl_dist(P, M) + (1 - b) * _kl_dist(Q, M)


def terms(p, q, p_space="probs", q_space="probs", temperature=1.0):
    """Per-category p_i log(p_i / q_i) (0 where p_i = 0, +inf where p_i > 0 = q_i)."""
    with mpmath.workdps(_dps_for(p, q, p_space, q_space, temperature)):
        P = distribution(p, p_space, temperature)
        Q = distribution(q, q_space, temperature)
        out = []
        for a, b in zip(P, Q):
            out.append(mpmath.mpf(0) if a == 0 else mpmath.inf if b == 0 else a * mpmath.log(a / b))
        return out


_FUNCS = {"kl": kl, "reverse_kl": reverse_kl, "jeffreys": jeffreys, "js": js}


def rows(func, p, q, **kw):
    """Apply an oracle function to every row (last axis) of two broadcastable arrays; float64."""
    f = _FUNCS[func] if isinstance(func, str) else func
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = np.broadcast_arrays(p, q)
    out = np.empty(p.shape[:-1])
    for idx in np.ndindex(*p.shape[:-1]):
        out[idx] = float(f(p[idx], q[idx], **kw))
    return out


# ----------------------------------------------------------------------------------------------
# fast reference for large rows

HAVE_EXTENDED = np.finfo(np.longdouble).eps < 1e-18


def _log_softmax_ld(x):
    x = np.asarray(x).astype(np.float64).astype(np.longdouble)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def kl_extended(a, b):
    """KL(softmax(a) || softmax(b)) per row for logits ``a``, ``b`` (last axis), as float64.

    Textbook formula ``sum p (log p - log q)`` in ``np.longdouble`` (about 19 digits), taking the
    inputs exactly. Relative error about 1e-9 at KL = 1e-9 for V = 32000 (tested against
    ``kl``). Falls back to the mpmath oracle where longdouble is plain double.
    """
    if not HAVE_EXTENDED:  # pragma: no cover - platform dependent
        return rows(kl, a, b, p_space="logits", q_space="logits")
    la = _log_softmax_ld(a)
    lb = _log_softmax_ld(b)
    return np.sum(np.exp(la) * (la - lb), axis=-1).astype(np.float64)


def js_extended(a, b, beta=0.5):
    """JS_beta(softmax(a), softmax(b)) per row in ``np.longdouble`` (textbook formula)."""
    if not HAVE_EXTENDED:  # pragma: no cover - platform dependent
        return rows(js, a, b, beta=beta, p_space="logits", q_space="logits")
    la = _log_softmax_ld(a)
    lb = _log_softmax_ld(b)
    P, Q = np.exp(la), np.exp(lb)
    bt = np.longdouble(beta)
    lm = np.log(bt * P + (1 - bt) * Q)
    return (bt * np.sum(P * (la - lm), -1) + (1 - bt) * np.sum(Q * (lb - lm), -1)).astype(
        np.float64)


def value_grad_log(kind, lp, lq, beta=0.5, prec=1400):
    """(value, dD/du, dD/dv) in mpmath of the four kinds for the log-distributions ``lp``, ``lq``
    (mpmath lists, lp = log_softmax(u), lq = log_softmax(v)), at the caller's ``workprec(prec)``:
    the textbook formulas, derivatives with respect to the (already divided by T) logits u and v
    as p_i (g_i - E_p g) for a partial g = dD/dp_i. Entries below e^-(prec + 2000) are 0."""
    cut = -(prec + 2000)
    p = [mpmath.exp(a) if a > cut else mpmath.mpf(0) for a in lp]
    q = [mpmath.exp(a) if a > cut else mpmath.mpf(0) for a in lq]
    n = len(p)
    r = [lp[i] - lq[i] for i in range(n)]
    ep = mpmath.fsum(p[i] * r[i] for i in range(n))  # E_p r = KL(p || q)
    eq = mpmath.fsum(q[i] * r[i] for i in range(n))  # E_q r = -KL(q || p)
    if kind == "forward":
        return ep, [p[i] * (r[i] - ep) for i in range(n)], [q[i] - p[i] for i in range(n)]
    if kind == "reverse":
        return -eq, [p[i] - q[i] for i in range(n)], [q[i] * (eq - r[i]) for i in range(n)]
    if kind == "jeffreys":
        return (ep - eq, [p[i] * (r[i] - ep) + p[i] - q[i] for i in range(n)],
                [q[i] * (eq - r[i]) + q[i] - p[i] for i in range(n)])
    b = mpmath.mpf(beta)
    lm = []
    for i in range(n):
        a1, a2 = mpmath.log(b) + lp[i], mpmath.log(1 - b) + lq[i]
        hi, lo = max(a1, a2), min(a1, a2)
        lm.append(hi + mpmath.log1p(mpmath.exp(lo - hi)) if lo - hi > cut else hi)
    g = [b * (lp[i] - lm[i]) for i in range(n)]
    h = [(1 - b) * (lq[i] - lm[i]) for i in range(n)]
    eg = mpmath.fsum(p[i] * g[i] for i in range(n))
    eh = mpmath.fsum(q[i] * h[i] for i in range(n))
    return (eg + eh, [p[i] * (g[i] - eg) for i in range(n)],
            [q[i] * (h[i] - eh) for i in range(n)])
