"""Full Hessians (both arguments together, mixed entries included) at a float32 subnormal
probability, torch through the core, against torch.autograd's Hessian of the float64 textbook
formula on the same inputs (normal numbers in float64).

Every entry is the true value (within 1e-5 of the largest finite entry of its row), or +-inf of
its sign where the true value exceeds float32, with the documented exceptions (module docstring
of kldiv._core.divergence, "Second derivatives"), where a wrong +-inf or a nan is allowed:
- KL(a || b) where 1 / b_i overflows (b_i < 1 / finfo.max = 2.9e-39; forward KL: b = q;
  reverse KL: b = p): the row d/dz (dKL/db_i). The mixed entry d/da_i is nan (its true value,
  about -1 / b_i, overflows), and an entry whose true value is a product of 1 / b_i with a tiny
  factor (-2.5 at p_i = 2e-39, q_i = 5e-39) can come out +-inf. Its column is right.
- Jeffreys: the row d/dz (dJ/dz_i) of a subnormal entry z_i (either side): nan. Its column is
  right.
JS has no exception. These pin the behaviour: a nan or a wrong entry anywhere else fails.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402

from torch_reference import core_only, naive_row  # noqa: E402

FN = {"forward": kldiv.kl_div, "reverse": kldiv.reverse_kl, "js": kldiv.js_div,
      "jeffreys": kldiv.jeffreys_div}
TINY = float(np.float32(1e-45))
ROWS = [
    ([0.7, 0.3, 1e-40], [0.2, 0.5, 0.3]),  # p subnormal
    ([0.5, 0.25, 0.25], [1.0, 1e-45, 3e-45]),  # q subnormal (two entries)
    ([1.0, TINY, 2 * TINY], [0.5, 0.25, 0.25]),  # p's smallest subnormals
    ([0.5, 0.5, 2e-39], [0.3, 0.7, 5e-39]),  # both, within a factor of 3
]


def _exempt(kind, x, y):
    """Boolean (2n, 2n): the documented entries (rows: the derivative taken first;
    torch.autograd.functional.hessian gives H[i, j] = d/dz_j (dF/dz_i))."""
    n = len(x)
    tiny = float(np.finfo(np.float32).tiny)
    inv_over = 1.0 / float(np.finfo(np.float32).max)
    A = np.zeros((2 * n, 2 * n), bool)
    for i in range(n):
        xi, yi = float(np.float32(x[i])), float(np.float32(y[i]))
        if kind == "forward" and 0 < yi < inv_over:
            A[n + i, :] = True
        if kind == "reverse" and 0 < xi < inv_over:
            A[i, :] = True
        if kind == "jeffreys":
            if 0 < xi < tiny:
                A[i, :] = True
            if 0 < yi < tiny:
                A[n + i, :] = True
    return A


@pytest.mark.parametrize("row", range(len(ROWS)))
@pytest.mark.parametrize("kind", list(FN))
def test_full_hessian(kind, row):
    x, y = ROWS[row]
    n = len(x)

    def f(z):
        with core_only():
            return FN[kind](z[:n], z[n:], validate=False)

    z = torch.tensor(x + y, dtype=torch.float32)
    H = torch.autograd.functional.hessian(f, z).double().numpy()
    R = torch.autograd.functional.hessian(
        lambda w: naive_row(kind, w[:n], w[n:], "probs", "probs"), z.double()).numpy()
    fmax = float(np.finfo(np.float32).max)
    exempt = _exempt(kind, x, y)
    assert not (np.isnan(H) & ~exempt).any(), (kind, row, np.argwhere(np.isnan(H) & ~exempt))
    check = ~exempt
    over = (np.abs(R) > fmax) & check
    np.testing.assert_array_equal(H[over], np.sign(R[over]) * math.inf,
                                  err_msg=f"{kind} row {row}")
    fin = check & ~over
    scale = np.max(np.where(np.abs(R) > fmax, 0, np.abs(R)), axis=1, keepdims=True)
    err = np.where(fin, np.abs(H - R), 0)
    assert np.all(err <= 1e-5 * scale + 1e-30), (kind, row, H, R)
