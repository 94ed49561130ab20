"""Regressions from the outside audit (notes/audit.md), findings 1 and 4.

1. NumPy fast path (``kldiv._ext._divrows``): a one-category support on one side, the other side's
   logit there 1e17..1e308 (float64) / up to 3e38 (float32) below its maximum, temperature != 1:
   the kernel's log-space fallback returned 0 (an FMA contracted ``(x - c) / T - top`` into the
   product's rounding error, and exp of that was 0 or +inf). Reference: mpmath on the exact inputs.
4. ``kldiv.torch.kl_div_inplace`` checks its arguments like ``kldiv.kl_div`` (same error messages,
   taken from the core itself, not copied), and ``validate=False`` lets a nan row show as nan.
"""
from __future__ import annotations

import mpmath
import numpy as np
import pytest

import kldiv

FNS = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
       "jeffreys": kldiv.jeffreys_div}
TEMPS = [0.5, 1.5, 3.0, 7.0, 100.0]


def _mp_log_probs(x, space, T):
    """Normalised log-probabilities of one row from the exact stored inputs (None: probability 0)."""
    xs = [mpmath.mpf(float(v)) if np.isfinite(v) else None for v in x]
    if space == "probs":
        ls = [mpmath.log(v) / T if v is not None and v > 0 else None for v in xs]
    else:
        ls = [v / T if v is not None else None for v in xs]
    m = max(v for v in ls if v is not None)
    z = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in ls if v is not None))
    return [v - z if v is not None else None for v in ls]


def _mp_kl(lp, lq):
    s = mpmath.mpf(0)
    for a, b in zip(lp, lq):
        if a is None:
            continue
        if b is None:
            return mpmath.inf
        s += mpmath.exp(a) * (a - b)
    return s


def mp_div(kind, p, q, p_space, q_space, T, beta=0.5):
    with mpmath.workdps(40):
        lp, lq = _mp_log_probs(p, p_space, T), _mp_log_probs(q, q_space, T)
        if kind == "forward":
            return float(_mp_kl(lp, lq))
        if kind == "reverse":
            return float(_mp_kl(lq, lp))
        if kind == "jeffreys":
            return float(_mp_kl(lp, lq) + _mp_kl(lq, lp))
        pe = [mpmath.exp(a) if a is not None else mpmath.mpf(0) for a in lp]
        qe = [mpmath.exp(b) if b is not None else mpmath.mpf(0) for b in lq]
        lm = [mpmath.log(beta * a + (1 - beta) * b) if a + b > 0 else None for a, b in zip(pe, qe)]
        return float(beta * _mp_kl(lp, lm) + (1 - beta) * _mp_kl(lq, lm))


def _one_hot_rows(dtype, gap, k, how, rng):
    """p one-hot at category k (``how``: -inf logits, log-probabilities, or probabilities), q
    logits with q_k = -gap and the others moderate."""
    v = 4
    q = rng.uniform(-3.0, 3.0, v)
    q[k] = -gap
    if how == "probs":
        p = np.zeros(v)
        p[k] = 1.0
        space = "probs"
    else:
        p = np.full(v, -np.inf)
        p[k] = 0.0 if how == "log_probs" else 2.5
        space = how
    return p.astype(dtype), q.astype(dtype), space


CASES = [(np.float64, g) for g in (1e17, 1e18, 1e20, 1e100, 1e200, 1e300, 1e308)]
CASES += [(np.float32, g) for g in (1e17, 1e20, 1e30, 1e37, 3e38)]


@pytest.mark.parametrize("dtype,gap", CASES)
@pytest.mark.parametrize("how", ["logits", "log_probs", "probs"])
def test_one_hot_against_huge_gap_matches_mpmath(dtype, gap, how):
    rng = np.random.default_rng(int(gap % 9973) + len(how))
    for i, T in enumerate(TEMPS):
        for k in (3 * (i % 2),):  # the support first or last
            p, q, p_space = _one_hot_rows(dtype, gap, k, how, rng)
            for kind, fn in FNS.items():
                for a, b, sa, sb in ((p, q, p_space, "logits"), (q, p, "logits", p_space)):
                    want = mp_div(kind, a, b, sa, sb, T)
                    got = fn(a[None], b[None], p_space=sa, q_space=sb, temperature=T)
                    assert got.dtype == dtype
                    got = float(got[0])
                    ctx = (kind, sa, sb, T, gap, k, dtype.__name__)
                    with np.errstate(over="ignore"):
                        beyond = not np.isfinite(np.asarray(want, dtype))
                    if beyond:  # beyond the dtype's range
                        assert got == np.inf, ctx
                    else:
                        assert got == pytest.approx(want, rel=2e-6 if dtype == np.float32 else 1e-12,
                                                    abs=1e-12), ctx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_audit_repro_values(dtype):
    if dtype == np.float64:
        p, q, T = np.array([[0.0, -np.inf]]), np.array([[-1e20, -1.0]]), 1.5
        want = (1e20 - 1.0) / 1.5
    else:
        p = np.array([[0.0, -np.inf]], np.float32)
        q = np.array([[-3e38, -1.0]], np.float32)
        T = 7.0
        want = (float(np.float32(-1.0)) - float(np.float32(-3e38))) / 7.0
    got = kldiv.kl_div(p, q, p_space="logits", q_space="logits", temperature=T)
    assert float(got[0]) == pytest.approx(want, rel=1e-6)
    got = kldiv.reverse_kl(q, p, p_space="logits", q_space="logits", temperature=T)
    assert float(got[0]) == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------ finding 4: kl_div_inplace

torch = pytest.importorskip("torch")
from kldiv.torch import kl_div_inplace  # noqa: E402

KINDS_T = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
           "jeffreys": kldiv.jeffreys_div}


def _core_error(fn, *a, **kw):
    with pytest.raises((ValueError, TypeError)) as exc:
        fn(*a, **kw)
    return exc.type, str(exc.value)


def _inplace_error(*a, **kw):
    with pytest.raises((ValueError, TypeError)) as exc:
        kl_div_inplace(*a, **kw)
    return exc.type, str(exc.value)


def _as_inplace(msg):
    """The core's message for its argument q, for kl_div_inplace's q_logits."""
    return msg.replace("q: ", "q_logits: ", 1) if msg.startswith("q: ") else msg


@pytest.mark.parametrize("w", [[1.0, -1.0, 1.0], [1.0, float("nan"), 1.0], [1.0, float("inf"), 1.0],
                               [-0.5, 1.0, 1.0]])
def test_bad_weight_raises_the_core_error(w):
    torch.manual_seed(0)
    p, q = torch.randn(3, 5), torch.randn(3, 5)
    want = _core_error(kldiv.kl_div, p, q, p_space="logits", q_space="logits",
                       weight=torch.tensor(w), reduction="mean")
    q2 = q.clone()
    assert _inplace_error(p, q2, weight=torch.tensor(w)) == want
    assert torch.equal(q2, q)  # refused before the overwrite
    # an integer weight: the core's TypeError too
    want = _core_error(kldiv.kl_div, p, q, p_space="logits", q_space="logits",
                       weight=torch.tensor([1, 2, 3]))
    assert _inplace_error(p, q.clone(), weight=torch.tensor([1, 2, 3])) == want


def _bad_rows(dtype):
    torch.manual_seed(1)
    good = torch.randn(4, 6, dtype=dtype)
    cases = []
    for what in ("nan", "+inf", "empty"):
        bad = good.clone()
        if what == "nan":
            bad[1, 2] = float("nan")
            bad[3, 0] = float("nan")
        elif what == "+inf":
            bad[2, 5] = float("inf")
        else:
            bad[0] = float("-inf")
        cases.append(bad)
    return good, cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", list(KINDS_T))
def test_bad_rows_raise_the_core_error(dtype, kind):
    good, cases = _bad_rows(dtype)
    fn = KINDS_T[kind]
    for bad in cases:
        for p, q, side in ((bad, good, "p"), (good, bad, "q")):
            want_t, want = _core_error(fn, p, q, p_space="logits", q_space="logits")
            q2 = q.clone()
            got_t, got = _inplace_error(p, q2, kind=kind)
            assert got_t is want_t and got == _as_inplace(want), (side, got, want)
            if side == "q":  # q_logits is checked before it is overwritten
                assert torch.equal(torch.isnan(q2), torch.isnan(q))
            # a zero weight on the bad row: the row does not count, kldiv.kl_div refuses it anyway
            w = torch.ones(4, dtype=torch.float32)
            w[~(torch.isfinite(bad).all(-1))] = 0.0
            want_t, want = _core_error(fn, p, q, p_space="logits", q_space="logits", weight=w,
                                       reduction="sum")
            got_t, got = _inplace_error(p, q.clone(), kind=kind, weight=w, reduction="sum")
            assert got_t is want_t and got == _as_inplace(want), (side, got, want)
            # masked rows may hold anything (as in kldiv.kl_div)
            rows_ok = ~(torch.isnan(bad).any(-1) | torch.isinf(bad).any(-1))
            v = kl_div_inplace(p, q.clone(), kind=kind, mask=rows_ok, reduction="sum")
            ref = fn(p.double(), q.double(), p_space="logits", q_space="logits", mask=rows_ok,
                     reduction="sum")
            assert float(v) == pytest.approx(float(ref), rel=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_log_probs_not_normalised_raises_the_core_error():
    torch.manual_seed(2)
    p, q = torch.randn(3, 7), torch.randn(3, 7)
    want = _core_error(kldiv.kl_div, p, q, p_space="log_probs", q_space="logits")
    assert _inplace_error(p, q.clone(), p_space="log_probs") == want
    want = _core_error(kldiv.kl_div, p, q, p_space="logits", q_space="log_probs")
    assert _inplace_error(p, q.clone(), q_space="log_probs") == (want[0], _as_inplace(want[1]))
    # normalised ones pass and give the core's value
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    v = kl_div_inplace(lp, lq.clone(), p_space="log_probs", q_space="log_probs")
    ref = kldiv.kl_div(lp.double(), lq.double(), p_space="log_probs", q_space="log_probs",
                       reduction="mean")
    assert float(v) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("beta", ["0.5", 0.0, 1.0, float("nan"), True])
def test_beta_checked_like_js_div(beta):
    torch.manual_seed(3)
    p, q = torch.randn(2, 4), torch.randn(2, 4)
    want = _core_error(kldiv.js_div, p, q, p_space="logits", q_space="logits", beta=beta)
    assert _inplace_error(p, q.clone(), kind="js", beta=beta) == want


@pytest.mark.parametrize("kind", list(KINDS_T))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_validate_false_lets_nan_show(kind, reduction):
    good, cases = _bad_rows(torch.float32)
    nan_rows = cases[0]
    for p, q in ((nan_rows, good), (good, nan_rows)):
        v = kl_div_inplace(p, q.clone(), kind=kind, reduction=reduction, validate=False)
        assert torch.isnan(v), (kind, reduction)
        with kldiv.validation(False):
            assert torch.isnan(kl_div_inplace(p, q.clone(), kind=kind, reduction=reduction))
    # validate=True wins over a global "off"
    with kldiv.validation(False):
        with pytest.raises(ValueError, match="contains nan"):
            kl_div_inplace(nan_rows, good.clone(), kind=kind, validate=True)


def test_docstring_states_validation_and_gradient_dtype():
    doc = kl_div_inplace.__doc__
    assert "validate" in doc and "own dtype" in doc and "float16" in doc
