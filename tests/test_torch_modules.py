"""nn.Module losses (issue 15 item 1): the functional calls' values and gradients, under
torch.compile, DistributedDataParallel and FSDP (gloo on CPU).

References are independent of kldiv: the float64 naive formulas with torch.autograd.
"""
import math
import os
import socket

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import kldiv.torch as kt  # noqa: E402


def naive(kind, t, s, T=1.0):
    lp, lq = F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    p, q = lp.exp(), lq.exp()
    if kind == "forward":
        return (p * (lp - lq)).sum(-1)
    if kind == "reverse":
        return (q * (lq - lp)).sum(-1)
    lm = torch.log(0.5 * p + 0.5 * q)
    return 0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1)


MODULES = {"forward": kt.KLDivLoss, "reverse": kt.ReverseKLLoss, "js": kt.JSDivLoss}


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_value_and_gradient_match_naive_float64(kind, reduction):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 3
    s = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    loss_fn = MODULES[kind](p_space="logits", q_space="logits", temperature=1.5,
                            reduction=reduction)
    out = loss_fn(t, s)
    s_ref = s.detach().clone().requires_grad_(True)
    rows = naive(kind, t, s_ref, 1.5)
    ref = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-10, atol=1e-14)


def test_mask_and_weight_are_forward_arguments():
    t = torch.randn(4, 5, dtype=torch.float64)
    s = torch.randn(4, 5, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True])
    w = torch.tensor([1.0, 5.0, 2.0, 0.5], dtype=torch.float64)
    out = kt.KLDivLoss(p_space="logits", q_space="logits")(t, s, mask=mask, weight=w)
    rows = naive("forward", t, s)
    keep = mask.double() * w
    torch.testing.assert_close(out, (rows * keep).sum() / keep.sum(), rtol=1e-12, atol=0)


def test_modules_hold_no_state_and_report_options():
    m = kt.JSDivLoss(beta=0.25, p_space="logits", q_space="logits")
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    assert "beta=0.25" in repr(m) and "p_space='logits'" in repr(m)
    assert m.state_dict() == {}


@pytest.mark.parametrize("bad, match", [
    (dict(reduction="batchmean"), "reduction"),
    (dict(p_space="prob"), "p_space"),
])
def test_bad_options_name_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        kt.KLDivLoss(**bad)


@pytest.mark.parametrize("beta, exc", [("half", TypeError), (1.0, ValueError), (0, ValueError)])
def test_js_beta_checked(beta, exc):
    with pytest.raises(exc, match="beta"):
        kt.JSDivLoss(beta=beta)


def test_linear_module_matches_dense_naive():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 9, generator=g, dtype=torch.float64)
    loss = kt.LinearKLDivLoss(temperature=2.0, t2_scale=True)(h, W, t)
    h2 = h.detach().clone().requires_grad_(True)
    W2 = W.detach().clone().requires_grad_(True)
    ref = naive("forward", t, h2 @ W2.T, 2.0).mean() * 4.0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-10, atol=1e-14)


def test_linear_module_labels_ignore_index():
    h = torch.randn(4, 3, dtype=torch.float64)
    W = torch.randn(6, 3, dtype=torch.float64)
    t = torch.randn(4, 6, dtype=torch.float64)
    labels = torch.tensor([1, -100, 2, -100])
    out = kt.LinearKLDivLoss()(h, W, t, labels=labels)
    rows = naive("forward", t, h @ W.T)
    torch.testing.assert_close(out, rows[[0, 2]].mean(), rtol=1e-12, atol=0)


def test_module_under_torch_compile():
    loss_fn = kt.KLDivLoss(p_space="logits", q_space="logits")
    t = torch.randn(8, 11)
    s = torch.randn(8, 11, requires_grad=True)
    compiled = torch.compile(lambda a, b: loss_fn(a, b), backend="eager")
    out = compiled(t, s)
    out.backward()
    s_ref = s.detach().double().requires_grad_(True)
    ref = naive("forward", t.double(), s_ref).mean()
    ref.backward()
    assert abs(float(out.detach()) - float(ref.detach())) <= 1e-6 * float(ref.detach())
    torch.testing.assert_close(s.grad.double(), s_ref.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# DDP and FSDP with gloo on CPU: the distributed gradient equals the single-process one


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 10, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _worker(rank, world, port, wrap, out_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _Student().double()
        x = torch.randn(8, 6, dtype=torch.float64)
        teacher = torch.randn(8, 10, dtype=torch.float64) * 2
        sl = slice(rank * 4, rank * 4 + 4)  # each rank its half of the batch
        if wrap == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
            loss = kt.KLDivLoss(p_space="logits", q_space="logits")(teacher[sl], wrapped(x[sl]))
            loss.backward()
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        elif wrap == "fsdp":
            from torch.distributed.fsdp import fully_shard

            fully_shard(model.body)
            fully_shard(model)
            loss = kt.KLDivLoss(p_space="logits", q_space="logits")(teacher[sl], model(x[sl]))
            loss.backward()
            grads = {k: p.grad.full_tensor().detach().clone()
                     for k, p in model.named_parameters()}
        else:  # the fused output layer, data-parallel by hand (the layer takes the weight)
            hidden = torch.tanh(model.body(x[sl]))
            loss = kt.LinearKLDivLoss()(hidden, model.head.weight, teacher[sl])
            loss.backward()
            for p in model.parameters():  # the all-reduce DDP would do
                dist.all_reduce(p.grad)
                p.grad /= world
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        if rank == 0:
            torch.save(grads, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _single_process_grads():
    torch.manual_seed(0)
    model = _Student().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    teacher = torch.randn(8, 10, dtype=torch.float64) * 2
    # DDP averages gradients over ranks: the mean of the two half-batch means is the full mean
    naive("forward", teacher, model(x)).mean().backward()
    return {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("wrap", ["ddp", "fsdp", "linear-ddp"])
def test_distributed_wrappers_gloo(wrap, tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo not available")
    out = str(tmp_path / "grads.pt")
    mp.start_processes(_worker, args=(2, _free_port(), wrap, out), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(out)
    ref = _single_process_grads()
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-13, msg=k)


def test_js_module_bound():
    out = kt.JSDivLoss(reduction="sum")(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert abs(float(out) - math.log(2)) < 1e-6


def test_first_call_inside_torch_compile_fullgraph(tmp_path):
    """A fresh process whose very first kldiv call is traced by torch.compile(fullgraph=True):
    the torch fast path must already be loaded (Dynamo cannot trace an import)."""
    import subprocess
    import sys

    script = tmp_path / "first_call.py"
    script.write_text(
        "import warnings, torch, kldiv\n"
        "def f(t, s):\n"
        "    return kldiv.kl_div(t, s, p_space='logits', q_space='logits', reduction='mean')\n"
        "t = torch.randn(8, 5); s = torch.randn(8, 5, requires_grad=True)\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error', UserWarning)\n"
        "    out = torch.compile(f, fullgraph=True, backend='aot_eager')(t, s)\n"
        "out.backward()\n"
        "p, q = torch.softmax(t.double(), -1), torch.softmax(s.detach().double(), -1)\n"
        "ref = (p * (p / q).log()).sum(-1).mean()\n"
        "assert abs(float(out.detach()) - float(ref)) < 1e-6, (out, ref)\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
