"""Gradient buffers reused across steps (``torch_fused.grad_buffer``; issue 12 item 7).

The fused path hands autograd a gradient it wrote itself; from 16 MiB up on the CPU the memory
of an earlier gradient is reused once nothing references it. These tests check that a buffer
somebody still holds (a ``.grad`` that accumulates, a kept view, a NumPy export) is never
overwritten, and that training loops get the same gradients as the core, step after step.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kldiv  # noqa: E402
from kldiv.backends import torch_fused as tf  # noqa: E402


@pytest.fixture(autouse=True)
def small_cache(monkeypatch):
    """Cache from 4 KiB (tests stay small), the fused post hook reached, a clean cache."""
    from kldiv._core import dispatch

    dispatch.handler("pre", torch.zeros(1), torch.zeros(1))
    monkeypatch.delitem(dispatch._HANDLERS, ("torch", "pre"), raising=False)
    monkeypatch.setattr(tf, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(tf, "GRAD_CACHE_MIN_BYTES", 4096)
    tf.release_grad_buffers()
    yield
    tf.release_grad_buffers()


L = dict(p_space="logits", q_space="logits")


def test_buffer_reused_only_when_unreferenced():
    g = tf.grad_buffer((64, 32), torch.float32)
    ptr = g.data_ptr()
    g.fill_(1.0)
    view = g[3]  # a view keeps the memory referenced
    del g
    h = tf.grad_buffer((64, 32), torch.float32)
    assert h.data_ptr() != ptr
    del view
    k = tf.grad_buffer((64, 32), torch.float32)
    assert k.data_ptr() == ptr  # dropped by everyone: reused
    a = k.numpy()  # a NumPy export holds the tensor
    del k
    assert tf.grad_buffer((64, 32), torch.float32).data_ptr() not in (ptr, h.data_ptr())
    a[0, 0] = 2.0
    st = h.untyped_storage()  # a storage object holds the memory
    ptr_h = h.data_ptr()
    del h
    assert tf.grad_buffer((64, 32), torch.float32).data_ptr() != ptr_h
    del st
    from torch.utils.dlpack import to_dlpack

    cap = to_dlpack(tf.grad_buffer((64, 32), torch.float32))  # a DLPack export holds it
    assert tf.grad_buffer((64, 32), torch.float32).data_ptr() != ptr_h
    del cap
    # smaller requests reuse a buffer up to twice their size, never a smaller one
    assert tf.grad_buffer((40, 32), torch.float32).data_ptr() == ptr_h
    assert tf.grad_buffer((64, 32), torch.float64).dtype == torch.float64
    tiny = tf.grad_buffer((2, 3), torch.float32)  # below the threshold: plain torch.empty
    assert tiny.shape == (2, 3)


def _naive_grad(t, s):
    s = s.detach().double().requires_grad_(True)
    lp = torch.log_softmax(t.double(), -1)
    lq = torch.log_softmax(s, -1)
    (g,) = torch.autograd.grad((lp.exp() * (lp - lq)).sum(-1).mean(), [s])
    return g


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("use_ext", [True, False])
def test_training_loop_gradients_step_after_step(set_to_none, use_ext):
    """Three steps of a loop: with .grad kept (accumulating) or dropped, on both kernels, the
    gradients equal the naive float64 ones; dropped gradients' memory is reused."""
    if use_ext and tf._EXT is None:
        pytest.skip("C extension not built")
    rng = np.random.default_rng(31)
    t = torch.tensor(rng.standard_normal((16, 300)), dtype=torch.float32)
    s = torch.tensor(rng.standard_normal((16, 300)), dtype=torch.float32, requires_grad=True)
    ptrs, acc = [], torch.zeros(16, 300, dtype=torch.float64)
    with tf._extension(use_ext):
        for step in range(3):
            if set_to_none:
                s.grad = None
            kldiv.kl_div(t, s, reduction="mean", **L).backward()
            ref = _naive_grad(t, s)
            acc = ref if set_to_none else acc + ref
            torch.testing.assert_close(s.grad.double(), acc, rtol=1e-5, atol=1e-7)
            ptrs.append(s.grad.data_ptr())
            with torch.no_grad():
                s -= 0.5 * s.grad  # the optimizer step changes the logits
    if set_to_none:
        assert ptrs[1] == ptrs[2]  # the dropped gradient's memory came back
    else:
        assert len(set(ptrs)) == 1  # .grad accumulated in place, never overwritten by a buffer


def test_two_losses_in_one_step_get_their_own_buffers():
    rng = np.random.default_rng(32)
    t = torch.tensor(rng.standard_normal((8, 256)), dtype=torch.float32)
    u = torch.tensor(rng.standard_normal((8, 256)), dtype=torch.float32)
    s = torch.tensor(rng.standard_normal((8, 256)), dtype=torch.float32, requires_grad=True)
    for _ in range(2):
        s.grad = None
        loss = kldiv.kl_div(t, s, reduction="mean", **L) + kldiv.reverse_kl(u, s, reduction="mean",
                                                                         **L)
        loss.backward()
        ss = s.detach().double().requires_grad_(True)
        lt, lu, ls = (torch.log_softmax(v, -1) for v in (t.double(), u.double(), ss))
        ref = (lt.exp() * (lt - ls)).sum(-1).mean() + (ls.exp() * (ls - lu)).sum(-1).mean()
        (g,) = torch.autograd.grad(ref, [ss])
        torch.testing.assert_close(s.grad.double(), g, rtol=1e-5, atol=1e-7)


def test_kept_gradient_is_never_overwritten():
    rng = np.random.default_rng(33)
    t = torch.tensor(rng.standard_normal((8, 256)), dtype=torch.float32)
    s = torch.tensor(rng.standard_normal((8, 256)), dtype=torch.float32, requires_grad=True)
    kldiv.kl_div(t, s, reduction="sum", **L).backward()
    kept = s.grad  # the user keeps the first step's gradient
    first = kept.clone()
    s.grad = None
    kldiv.kl_div(t.flip(-1), s, reduction="sum", **L).backward()
    assert s.grad.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, first)


def test_default_kl_div_reuses_a_dropped_gradient_and_never_a_held_one():
    """kldiv.kl_div's torch path (backends/torch_fast) takes its gradients from grad_buffer."""
    import torch.nn.functional as F

    import kldiv

    t = torch.randn(256, 32000)
    s = torch.randn(256, 32000, requires_grad=True)
    ref = (F.softmax(s.detach().double(), -1) - F.softmax(t.double(), -1)) / 256
    ptrs = []
    for _ in range(3):  # a training loop that drops .grad (zero_grad(set_to_none=True))
        s.grad = None
        kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean").backward()
        ptrs.append(s.grad.data_ptr())
        assert float((s.grad.double() - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    assert len(set(ptrs)) == 1
    held = s.grad  # still referenced: the next step must get other memory
    s.grad = None
    kldiv.kl_div(t, s, p_space="logits", q_space="logits", reduction="mean").backward()
    assert held.data_ptr() != s.grad.data_ptr()
    assert float((held.double() - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
