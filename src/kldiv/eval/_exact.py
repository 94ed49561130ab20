"""Exactly mergeable accumulators: exact float64 sums, exact variances, and a quantile store.

``ExactSum`` keeps the *exact* sum of every float64 value added (as integers per binary
exponent), so that the result does not depend on how the values were split into batches or
processes: ``a.merge(b)`` is bit for bit one pass over the concatenation. Squares and products
are added exactly too (Dekker's error-free product: ``x * y = p + e`` with ``p = fl(x y)``), so
the variance ``(n S2 - S1^2) / n^2`` is the variance of the float64 values, rounded once.

``QuantileStore`` keeps the values themselves while there are at most ``max_exact`` of them
(exact quantiles, the same interpolation as llama.cpp) and beyond that a DDSketch (logarithmic
buckets, relative accuracy ``alpha``): merging adds bucket counts, so it is exact too, in the
sense that a merged sketch equals the sketch of one pass.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

_PIECE = 1 << 25  # values per bincount: integer partial sums stay below 2**53 (exact in float64)
_SPLIT = 134217729.0  # 2**27 + 1, Dekker's splitter for float64


class ExactSum:
    """The exact sum of float64 values (held as integers per binary exponent), mergeable.

    Infinities and NaN are counted apart: the sum is +inf / -inf / NaN as IEEE addition would
    give it. ``value()`` rounds the exact sum to the nearest float64 once.

    >>> s = ExactSum(); s.add(np.array([1e16, 1.0, -1e16])); s.value()   # naive float64 sum: 0.0
    1.0
    """

    __slots__ = ("parts", "pinf", "ninf", "nan")

    def __init__(self):
        self.parts: dict[int, int] = {}  # exponent k -> integer c: the sum holds c * 2**k
        self.pinf = self.ninf = self.nan = 0

    def add(self, x) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size == 0:
            return
        fin = np.isfinite(x)
        if not fin.all():
            self.nan += int(np.isnan(x).sum())
            self.pinf += int((x == np.inf).sum())
            self.ninf += int((x == -np.inf).sum())
            x = x[fin]
        for s in range(0, x.size, _PIECE):
            self._add_finite(x[s:s + _PIECE])

    def _add_finite(self, x) -> None:
        if x.size == 0:
            return
        m, e = np.frexp(x)  # x = m 2**e, |m| in [0.5, 1): m 2**53 is an integer
        mi = (m * 9007199254740992.0).astype(np.int64)
        hi = mi >> 26  # mi = hi 2**26 + lo, |hi| < 2**27, 0 <= lo < 2**26
        lo = mi - (hi << 26)
        e0 = int(e.min())
        idx = (e - e0).astype(np.intp)
        shi = np.bincount(idx, weights=hi.astype(np.float64))  # exact: |partial sums| < 2**52
        slo = np.bincount(idx, weights=lo.astype(np.float64))
        parts = self.parts
        for k in np.flatnonzero((shi != 0) | (slo != 0)):
            c = (int(shi[k]) << 26) + int(slo[k])
            key = e0 + int(k) - 53
            parts[key] = parts.get(key, 0) + c

    def merge(self, other: "ExactSum") -> "ExactSum":
        for k, c in other.parts.items():
            self.parts[k] = self.parts.get(k, 0) + c
        self.pinf += other.pinf
        self.ninf += other.ninf
        self.nan += other.nan
        return self

    def special(self) -> float | None:
        """inf, -inf or nan when infinities/NaN were added, else None."""
        if self.nan or (self.pinf and self.ninf):
            return math.nan
        if self.pinf:
            return math.inf
        if self.ninf:
            return -math.inf
        return None

    def fraction(self) -> Fraction:
        """The exact sum of the finite values as a Fraction."""
        if not self.parts:
            return Fraction(0)
        k0 = min(self.parts)
        total = sum(c << (k - k0) for k, c in self.parts.items())
        return Fraction(total) * Fraction(2) ** k0

    def value(self) -> float:
        sp = self.special()
        if sp is not None:
            return sp
        return _to_float(self.fraction())

    def state(self) -> dict:
        return {"parts": {str(k): hex(c) for k, c in self.parts.items() if c},
                "pinf": self.pinf, "ninf": self.ninf, "nan": self.nan}

    @classmethod
    def from_state(cls, st: dict) -> "ExactSum":
        s = cls()
        s.parts = {int(k): int(c, 16) for k, c in st["parts"].items()}
        s.pinf, s.ninf, s.nan = int(st["pinf"]), int(st["ninf"]), int(st["nan"])
        return s


def _to_float(f: Fraction) -> float:
    try:
        return float(f)  # correctly rounded (integer true division)
    except OverflowError:
        return math.inf if f > 0 else -math.inf


def two_product(x, y):
    """``(p, e)`` with ``p = fl(x * y)`` and ``p + e = x * y`` exactly (Dekker), elementwise.

    Exact unless a product under- or overflows (|x y| below ~1e-292 or above ~1e300): there
    ``e`` is 0 (an error below 1e-300, or the infinite product carries the sum anyway).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        p = x * y
        cx = _SPLIT * x
        xh = cx - (cx - x)
        xl = x - xh
        cy = _SPLIT * y
        yh = cy - (cy - y)
        yl = y - yh
        e = ((xh * yh - p) + xh * yl + xl * yh) + xl * yl
    ok = np.isfinite(e) & np.isfinite(p) & (np.abs(x) < 1e150) & (np.abs(y) < 1e150)
    return p, np.where(ok, e, 0.0)


class Moments:
    """Count, exact sum and exact sum of squares of float64 values, and the exact min and max.

    ``mean()`` and ``variance()`` are the mean and population variance of the values added,
    rounded once from exact rationals, so the same for any split into batches.
    """

    __slots__ = ("n", "s1", "s2", "lo", "hi")

    def __init__(self):
        self.n = 0
        self.s1 = ExactSum()
        self.s2 = ExactSum()
        self.lo = math.inf
        self.hi = -math.inf

    def add(self, x) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size == 0:
            return
        self.n += int(x.size)
        self.s1.add(x)
        p, e = two_product(x, x)
        self.s2.add(p)
        self.s2.add(e)
        with np.errstate(invalid="ignore"):
            if np.isnan(x).any():
                self.lo = self.hi = math.nan
            elif not (math.isnan(self.lo)):
                self.lo = min(self.lo, float(x.min()))
                self.hi = max(self.hi, float(x.max()))

    def merge(self, o: "Moments") -> "Moments":
        self.n += o.n
        self.s1.merge(o.s1)
        self.s2.merge(o.s2)
        if math.isnan(self.lo) or math.isnan(o.lo):
            self.lo = self.hi = math.nan
        else:
            self.lo, self.hi = min(self.lo, o.lo), max(self.hi, o.hi)
        return self

    def mean(self) -> float:
        if self.n == 0:
            return math.nan
        sp = self.s1.special()
        if sp is not None:
            return sp
        return _to_float(self.s1.fraction() / self.n)

    def variance(self) -> float:
        """Population variance (divides by n)."""
        if self.n == 0:
            return math.nan
        if self.s1.special() is not None or self.s2.special() is not None:
            return math.nan
        s1, s2 = self.s1.fraction(), self.s2.fraction()
        return _to_float(max(self.n * s2 - s1 * s1, Fraction(0)) / (self.n * self.n))

    def mean_and_error(self) -> tuple[float, float]:
        """Mean and llama.cpp's standard error sqrt(var / (n - 1)) (nan for n < 2)."""
        m = self.mean()
        if self.n < 2 or not math.isfinite(m):
            return m, math.nan
        return m, math.sqrt(self.variance() / (self.n - 1))

    def state(self) -> dict:
        return {"n": self.n, "s1": self.s1.state(), "s2": self.s2.state(),
                "lo": _enc(self.lo), "hi": _enc(self.hi)}

    @classmethod
    def from_state(cls, st: dict) -> "Moments":
        m = cls()
        m.n = int(st["n"])
        m.s1 = ExactSum.from_state(st["s1"])
        m.s2 = ExactSum.from_state(st["s2"])
        m.lo, m.hi = _dec(st["lo"]), _dec(st["hi"])
        return m


def _enc(x: float):
    return x if math.isfinite(x) else repr(x)


def _dec(x) -> float:
    return float(x)


class CrossSum:
    """Exact sum of x * y over pairs (for the covariance of two per-token quantities)."""

    __slots__ = ("s",)

    def __init__(self):
        self.s = ExactSum()

    def add(self, x, y) -> None:
        p, e = two_product(x, y)
        self.s.add(p)
        self.s.add(e)

    def merge(self, o: "CrossSum") -> "CrossSum":
        self.s.merge(o.s)
        return self


class QuantileStore:
    """Values kept exactly up to ``max_exact`` of them, a DDSketch of relative accuracy ``alpha``
    beyond (see :meth:`quantiles` for the error bound). Merging is exact in both regimes."""

    def __init__(self, max_exact: int = 1 << 20, alpha: float = 1e-3):
        if max_exact < 0:
            raise ValueError(f"max_exact must be >= 0, got {max_exact}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.max_exact = int(max_exact)
        self.alpha = float(alpha)
        self._gamma_log = math.log((1 + alpha) / (1 - alpha))
        self.n = 0
        self._kept: list[np.ndarray] | None = []
        # sketch: keys (int64) and counts of positive and negative values, plus zero/inf counts
        self._pk = np.zeros(0, np.int64)
        self._pc = np.zeros(0, np.int64)
        self._nk = np.zeros(0, np.int64)
        self._nc = np.zeros(0, np.int64)
        self._zero = self._pinf = self._ninf = 0

    @property
    def exact(self) -> bool:
        return self._kept is not None

    def add(self, x) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size == 0:
            return
        if np.isnan(x).any():
            raise ValueError("QuantileStore: NaN values have no quantile")
        self.n += int(x.size)
        if self._kept is not None:
            self._kept.append(x.copy())
            if self.n > self.max_exact:
                self._to_sketch()
        else:
            self._sketch_add(x)

    def _to_sketch(self) -> None:
        kept, self._kept = self._kept, None
        for a in kept:
            self._sketch_add(a)

    def _keys(self, x):
        return np.ceil(np.log(x) / self._gamma_log).astype(np.int64)

    def _sketch_add(self, x) -> None:
        self._zero += int((x == 0).sum())
        self._pinf += int((x == np.inf).sum())
        self._ninf += int((x == -np.inf).sum())
        fin = np.isfinite(x)
        pos = x[fin & (x > 0)]
        neg = -x[fin & (x < 0)]
        self._pk, self._pc = _merge_counts(self._pk, self._pc, self._keys(pos), np.ones(pos.size, np.int64))
        self._nk, self._nc = _merge_counts(self._nk, self._nc, self._keys(neg), np.ones(neg.size, np.int64))

    def merge(self, o: "QuantileStore") -> "QuantileStore":
        if (o.alpha, o.max_exact) != (self.alpha, self.max_exact):
            raise ValueError("cannot merge quantile stores with different max_exact/alpha")
        n = self.n + o.n
        if self._kept is not None and o._kept is not None and n <= self.max_exact:
            self._kept.extend(a.copy() for a in o._kept)
            self.n = n
            return self
        if self._kept is not None:
            self._to_sketch()
        self.n = n
        if o._kept is not None:
            for a in o._kept:
                self._sketch_add(a)
        else:
            self._pk, self._pc = _merge_counts(self._pk, self._pc, o._pk, o._pc)
            self._nk, self._nc = _merge_counts(self._nk, self._nc, o._nk, o._nc)
            self._zero += o._zero
            self._pinf += o._pinf
            self._ninf += o._ninf
        return self

    def values(self) -> np.ndarray | None:
        """All values (exact regime), else None."""
        if self._kept is None:
            return None
        return np.concatenate(self._kept) if self._kept else np.zeros(0)

    def histogram(self):
        """``(values, counts)`` in ascending order: the values themselves (counts 1) while exact,
        the sketch's bucket representatives otherwise."""
        if self._kept is not None:
            v = np.sort(self.values())
            return v, np.ones(v.size, np.int64)
        g = math.exp(self._gamma_log)
        rp = 2 * np.exp(self._pk * self._gamma_log) / (g + 1)
        rn = -2 * np.exp(self._nk * self._gamma_log) / (g + 1)
        vals = np.concatenate([[-np.inf], rn[::-1], [0.0], rp, [np.inf]])
        cnts = np.concatenate([[self._ninf], self._nc[::-1], [self._zero], self._pc, [self._pinf]])
        keep = cnts > 0
        return vals[keep], cnts[keep]

    def quantiles(self, fractions, lo=None, hi=None) -> dict[str, float]:
        """Quantiles by linear interpolation between the order statistics at ``f (n - 1)``.

        Exact regime: exactly llama.cpp's (and :func:`kldiv.compare.stats.quantiles`'s) values.
        Sketch regime: each order statistic ``x`` is replaced by its bucket's representative
        ``x'`` with ``|x' - x| <= alpha |x|`` (zeros and infinities exact; the first and last
        order statistics are the exact ``lo``/``hi`` when given), so the interpolated quantile is
        within ``alpha ((1 - w) |x_lo| + w |x_hi|)`` of the exact one.
        """
        from ..compare.stats import quantiles as exact_quantiles

        if self._kept is not None:
            return exact_quantiles(self.values(), fractions)
        out = {}
        vals, cnts = self.histogram()
        cum = np.cumsum(cnts)
        n = int(cum[-1]) if cum.size else 0
        for f in fractions:
            label = f"{100 * f:.1f}%"
            if n == 0:
                out[label] = math.nan
                continue
            pos = f * (n - 1)
            i0 = int(math.floor(pos))
            i1 = min(i0 + 1, n - 1)
            w = pos - i0

            def order(r):
                if r == 0 and lo is not None:
                    return lo
                if r == n - 1 and hi is not None:
                    return hi
                return float(vals[int(np.searchsorted(cum, r, side="right"))])

            a, b = order(i0), order(i1)
            out[label] = a if (a == b or w == 0) else (1 - w) * a + w * b
        return out

    def state(self) -> dict:
        st = {"max_exact": self.max_exact, "alpha": self.alpha, "n": self.n}
        if self._kept is not None:
            st["values"] = self.values().tolist()
        else:
            st["sketch"] = {"pk": self._pk.tolist(), "pc": self._pc.tolist(), "nk": self._nk.tolist(),
                            "nc": self._nc.tolist(), "zero": self._zero, "pinf": self._pinf,
                            "ninf": self._ninf}
        return st

    @classmethod
    def from_state(cls, st: dict) -> "QuantileStore":
        q = cls(int(st["max_exact"]), float(st["alpha"]))
        q.n = int(st["n"])
        if "values" in st:
            q._kept = [np.asarray(st["values"], dtype=np.float64)] if q.n else []
        else:
            s = st["sketch"]
            q._kept = None
            q._pk, q._pc = np.asarray(s["pk"], np.int64), np.asarray(s["pc"], np.int64)
            q._nk, q._nc = np.asarray(s["nk"], np.int64), np.asarray(s["nc"], np.int64)
            q._zero, q._pinf, q._ninf = int(s["zero"]), int(s["pinf"]), int(s["ninf"])
        return q


def _merge_counts(k1, c1, k2, c2):
    if k2.size == 0:
        return k1, c1
    keys, inv = np.unique(np.concatenate([k1, k2]), return_inverse=True)
    counts = np.zeros(keys.size, np.int64)
    np.add.at(counts, inv, np.concatenate([c1, c2]))
    return keys, counts
