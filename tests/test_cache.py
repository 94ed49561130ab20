"""kldiv.cache: sparse teacher cache, its losses (bucket KL, sampled-tail estimator) and bounds.

References are independent: dense float64 KL written out with torch.softmax / log_softmax
(and numpy sorting for the top-k), torch.autograd on the dense formula for gradients.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from kldiv.cache import (TeacherCache, bucket_kl, build_cache, bytes_per_position, kl_bounds,
                         linear_bucket_kl, sampled_kl, sparsify)
from kldiv.cli import main as cli_main


def dense_kl(t_logits, s_logits):
    lp = torch.log_softmax(t_logits.double(), -1)
    lq = torch.log_softmax(s_logits.double(), -1)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def rand(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------------
# sparsify


@pytest.mark.parametrize("T", [None, 0.5, 2.0])
def test_sparsify_fields_against_numpy(T):
    z = rand((7, 40), 0)
    f = sparsify(z, 5, 3, temperature=T, generator=torch.Generator().manual_seed(1))
    zz = z.numpy() / (1.0 if T is None else T)
    lp = zz - zz.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    order = np.argsort(-lp, -1)[:, :5]
    assert np.array_equal(np.sort(f["topk_ids"].numpy(), -1), np.sort(order, -1))
    np.testing.assert_allclose(f["topk_logprobs"].numpy(), np.take_along_axis(lp, f["topk_ids"].numpy().astype(int), -1), rtol=1e-6)
    p = np.exp(lp)
    mask = np.ones_like(p, bool)
    np.put_along_axis(mask, order, False, -1)
    tail = (p * mask).sum(-1)
    np.testing.assert_allclose(np.exp(f["tail_logmass"].numpy()), tail, rtol=1e-6)
    # sampled tail tokens lie outside the top-k, carry their log-probs and weights r / M
    tid = f["tail_ids"].numpy()
    assert not np.isin(tid[0], order[0]).any()
    np.testing.assert_allclose(f["tail_logprobs"].numpy(), np.take_along_axis(lp, tid.astype(int), -1), rtol=1e-6)
    np.testing.assert_allclose(f["tail_weights"].numpy(), np.repeat(tail[:, None] / 3, 3, 1), rtol=1e-6)


def test_sparsify_edges():
    # K = V: empty tail, zero weights; a row with -inf entries in the tail
    z = torch.tensor([[0.0, 1.0, -math_inf(), 2.0]])
    f = sparsify(z, 4, 2)
    assert torch.isinf(f["tail_logmass"]).all() and (f["tail_weights"] == 0).all()
    f = sparsify(z, 3, 5)  # the tail is the single -inf entry: probability 0
    assert (f["tail_weights"] == 0).all()
    with pytest.raises(ValueError, match="--top-k"):
        sparsify(z, 5)
    with pytest.raises(ValueError, match="nan"):
        sparsify(torch.tensor([[0.0, float("nan")]]), 1)


def math_inf():
    return float("inf")


def test_storage_under_one_percent():
    assert bytes_per_position(64, 12) / (32000 * 4) < 0.01


# ------------------------------------------------------------------------------------------
# losses


def test_bucket_kl_against_dense_buckets_and_linear():
    t, s = rand((6, 30), 2), rand((6, 30), 3)
    f = sparsify(t, 4)
    got = bucket_kl(s, f, reduction="none")
    # reference: K + 1 bucket distributions from the dense float64 probabilities
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    ids = f["topk_ids"].long()
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    P = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    Q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    ref = (P * (P.log() - Q.log())).sum(-1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the same through linear_kl_div's top-k target (student logits never materialised)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 8, generator=g, dtype=torch.float64)
    W = torch.randn(30, 8, generator=g, dtype=torch.float64)
    f64 = {k: v.double() if v.is_floating_point() else v for k, v in f.items()}
    torch.testing.assert_close(linear_bucket_kl(h, W, f64), bucket_kl(h @ W.T, f64), rtol=1e-9, atol=1e-12)


def test_sampled_kl_is_unbiased_value_and_gradient():
    # dense float64 reference; many independent draws; the mean is within 5 standard errors
    V, K, M, R = 50, 5, 4, 3000
    t = rand((1, V), 5, 2.0)
    s = rand((1, V), 6, 2.0).requires_grad_(True)
    ref = dense_kl(t, s)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s)
    f = sparsify(t.expand(R, V), K, M, generator=torch.Generator().manual_seed(7))
    f = {k: v.double() if v.is_floating_point() else v for k, v in f.items()}
    S = s.detach().expand(R, V).clone().requires_grad_(True)
    est = sampled_kl(S, f, reduction="none")
    (g,) = torch.autograd.grad(est.sum(), S)
    e = est.detach()
    se = e.std() / R**0.5
    assert se > 0  # the tail is really sampled
    assert abs(e.mean() - ref[0]) < 5 * se
    gse = g.std(0) / R**0.5
    # (1e-6: the cache stores float32; the deterministic top-k coordinates have gse = 0)
    assert ((g.mean(0) - ref_grad[0]).abs() <= 5 * gse + 1e-6).all()
    # and the bucket loss (no sampling) is biased low here: it is a lower bound
    assert bucket_kl(s.detach(), sparsify(t, K), reduction="none")[0] < ref[0] - 10 * se
    # the cross-entropy variant has the same gradient
    ce = sampled_kl(S, f, reduction="sum", cross_entropy=True)
    (g2,) = torch.autograd.grad(ce, S)
    torch.testing.assert_close(g2, g)


def test_losses_reductions_mask_temperature():
    t, s = rand((2, 3, 20), 8), rand((2, 3, 20), 9)
    f = sparsify(t.reshape(6, 20), 3, 2, generator=torch.Generator().manual_seed(0))
    f = {k: v.reshape(2, 3, *v.shape[1:]) for k, v in f.items()}
    rows = bucket_kl(s, f, reduction="none")
    assert rows.shape == (2, 3)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    torch.testing.assert_close(bucket_kl(s, f, mask=mask), rows[mask].mean())
    torch.testing.assert_close(bucket_kl(s, f, temperature=2.0, reduction="none"),
                               bucket_kl(s / 2, f, reduction="none"))
    with pytest.raises(ValueError, match="reduction"):
        sampled_kl(s, f, reduction="batchmean")


# ------------------------------------------------------------------------------------------
# bounds


def _check_bounds(t, s, K, tol=1e-9):
    lp = torch.log_softmax(t, -1)
    a, ids = torch.topk(lp, K)
    lo, hi = kl_bounds(s, ids, a)
    full = dense_kl(t, s)
    assert (lo <= full + tol * (1 + full.abs())).all(), (lo - full)
    assert (full <= hi + tol * (1 + full.abs())).all(), (full - hi)
    torch.testing.assert_close(lo, bucket_kl(s, sparsify(t, K), reduction="none"), rtol=1e-5, atol=1e-6)
    return lo, hi, full


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [0.1, 30.0])
def test_bounds_hold_random(seed, scale):
    V = [2, 7, 64, 300][seed]
    t, s = rand((16, V), 10 + seed, scale), rand((16, V), 20 + seed, scale)
    for K in {1, max(1, V // 4), V - 1, V}:
        _check_bounds(t, s, K)


def test_bounds_hold_property():
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=25, deadline=None)
    @hyp.given(V=st.integers(1, 60), kfrac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
               ts=st.sampled_from([1e-3, 1.0, 10.0, 100.0]), ss=st.sampled_from([1e-3, 1.0, 10.0, 100.0]),
               shift=st.sampled_from([0.0, -1e3, 1e4]))
    def check(V, kfrac, seed, ts, ss, shift):
        K = max(1, min(V, round(kfrac * V)))
        t, s = rand((3, V), seed, ts) + shift, rand((3, V), seed + 1, ss) - shift
        _check_bounds(t, s, K, tol=1e-7)

    check()


def test_bounds_tight_on_adversarial_teachers():
    V, K = 40, 4
    s = rand((1, V), 30, 2.0)
    lq = torch.log_softmax(s, -1)[0]
    # teacher: 4 large tokens; its tail mass split as the student's tail (lower bound attained)
    top = torch.tensor([0.4, 0.2, 0.1, 0.05], dtype=torch.float64)
    top_ids = torch.argsort(lq, descending=True)[:K]  # any K tokens
    rest = torch.ones(V, dtype=torch.bool)
    rest[top_ids] = False
    r = 1 - top.sum()
    p = torch.zeros(V, dtype=torch.float64)
    p[top_ids] = top
    q = lq.exp()
    p[rest] = r * q[rest] / q[rest].sum()
    if p[rest].max() <= top.min():
        lo, hi, full = _check_bounds(p.log()[None], s, K)
        torch.testing.assert_close(lo, full, rtol=1e-10, atol=1e-12)
    # teacher: the tail mass on the student's least likely tail tokens, 0.05 each (upper attained)
    p = torch.zeros(V, dtype=torch.float64)
    p[top_ids] = top
    tail_order = [int(i) for i in torch.argsort(lq) if rest[i]]
    left = float(r)
    for i in tail_order:
        m = min(0.05, left)
        p[i] = m
        left -= m
        if left <= 0:
            break
    # (tail entries tie with the smallest top-k entry: give the top-k set explicitly)
    lo, hi = kl_bounds(s, top_ids[None], top.log()[None])
    full = dense_kl(torch.log(p)[None], s)
    assert lo <= full
    torch.testing.assert_close(hi, full, rtol=1e-10, atol=1e-12)
    assert hi - lo > 0.1  # truncation can hide this much here


def test_bounds_edges():
    # the student gives a tail token probability 0: the upper bound is +inf, the lower finite
    t = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0, 0.0, -float("inf")]], dtype=torch.float64)
    lo, hi, full = _check_bounds(t, s, 2)
    assert torch.isinf(hi).all() and torch.isinf(full).all() and torch.isfinite(lo).all()
    # large shifts of both logits change nothing
    t, s = rand((4, 30), 40), rand((4, 30), 41)
    lp = torch.log_softmax(t, -1)
    a, ids = torch.topk(lp, 3)
    b1 = kl_bounds(s, ids, a)
    b2 = kl_bounds(s + 1e4, ids, a)
    torch.testing.assert_close(b1, b2, rtol=1e-9, atol=1e-9)
    # temperature divides the student's logits
    torch.testing.assert_close(kl_bounds(s, ids, a, temperature=3.0), kl_bounds(s / 3.0, ids, a))


# ------------------------------------------------------------------------------------------
# writer, reader, CLI


V, CTX = 97, 16


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tokenizers import Tokenizer, models as tkm, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cache_teacher")
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      initializer_range=0.5)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(root / "teacher")
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(V - 1)}}
    tk = Tokenizer(tkm.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(root / "teacher")
    ids = np.random.default_rng(0).integers(1, V, 5 * CTX + 3)
    np.save(root / "tokens.npy", ids)
    (root / "text.txt").write_text(" ".join(f"w{i - 1}" for i in ids))
    return root


def _dense_teacher_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return m(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.double()


def test_cli_cache_model_then_reader_and_resume(teacher, tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["cache", str(teacher / "teacher"), "--tokens", str(teacher / "tokens.npy"), "--top-k", "8",
            "--tail-samples", "4", "--ctx", str(CTX), "--shard-chunks", "2", "--batch", "2",
            "--temperature", "2", "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "bytes/token" in text
    h = json.loads((out / "cache.json").read_text())
    assert h["complete"] and h["vocab_size"] == V and h["temperature_applied"] == 2.0
    assert h["tokenizer"]["vocab_size"] == V and h["tokenizer"]["vocab_sha256"]
    assert h["teacher"]["kind"] == "model" and h["teacher"]["config_sha256"]
    assert len(h["shards"]) == 3 and h["positions"] == 5 * CTX
    cache = TeacherCache(out)
    assert len(cache) == 5
    ids = np.load(teacher / "tokens.npy")[: 5 * CTX].reshape(5, CTX)
    dense = _dense_teacher_logits(teacher / "teacher", ids) / 2.0
    lp = torch.log_softmax(dense, -1)
    batches = list(cache.batches(2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    b = batches[1]
    assert torch.equal(b["input_ids"], torch.as_tensor(ids[2:4]))
    ref_top = torch.topk(lp[2:4], 8).values
    torch.testing.assert_close(b["topk_logprobs"].double(), ref_top, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["tail_logmass"].double(),
                               torch.log1p(-ref_top.exp().sum(-1)), rtol=1e-4, atol=1e-4)
    # bounds of the dense teacher from the cache: they hold against a student
    s = rand((2, CTX, V), 50)
    lo, hi = kl_bounds(s, b["topk_ids"], b["topk_logprobs"].double(), tail_logmass=b["tail_logmass"])
    full = dense_kl(dense[2:4], s)
    assert (lo <= full + 1e-4).all() and (full <= hi + 1e-4).all()
    # resume: drop a shard and mark the header incomplete (an interrupted run); same bytes back
    from safetensors.torch import load_file

    before = {f: load_file(out / f) for f in h["shards"]}
    os.remove(out / h["shards"][1])
    h2 = dict(h, complete=False)
    (out / "cache.json").write_text(json.dumps(h2))
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(out)
    assert cli_main(argv) == 0
    for f in h["shards"]:
        after = load_file(out / f)
        assert after.keys() == before[f].keys()
        assert all(torch.equal(after[k], before[f][k]) for k in after)
    # other settings into the same directory: a one-line error
    assert cli_main(argv[:-3] + ["--top-k", "4", "--out", str(out), "--no-progress"]) == 1
    assert "other settings" in capsys.readouterr().err


def test_cli_cache_text_and_logits_file(teacher, tmp_path, capsys):
    out = tmp_path / "t"
    assert cli_main(["cache", str(teacher / "teacher"), "--text", str(teacher / "text.txt"), "--top-k", "3",
                     "--ctx", str(CTX), "--out", str(out), "--no-progress", "--quiet"]) == 0
    h = json.loads((out / "cache.json").read_text())
    assert h["temperature_applied"] is None and h["log_probs"].startswith("raw")
    c = TeacherCache(out)
    np.testing.assert_array_equal(c[0]["input_ids"].numpy(), np.load(teacher / "tokens.npy")[:CTX])
    # a logits file as TEACHER (rows = positions)
    z = rand((3 * CTX, V), 60).float().numpy()
    np.save(tmp_path / "z.npy", z)
    out2 = tmp_path / "f"
    assert cli_main(["cache", str(tmp_path / "z.npy"), "--top-k", "5", "--tail-samples", "2", "--ctx",
                     str(CTX), "--out", str(out2), "--no-progress", "--quiet"]) == 0
    c2 = TeacherCache(out2)
    assert len(c2) == 3 and "input_ids" not in c2[0]
    ref = torch.topk(torch.log_softmax(torch.as_tensor(z, dtype=torch.float64), -1), 5)
    torch.testing.assert_close(c2[1]["topk_logprobs"].double(), ref.values[CTX:2 * CTX], rtol=1e-5, atol=1e-5)
    capsys.readouterr()


def test_measured_storage_at_k64_m12_v32000(tmp_path, capsys):
    Vb = 32000
    z = rand((2 * 32, Vb), 70).float().numpy()
    np.save(tmp_path / "big.npy", z)
    h = build_cache(tmp_path / "big.npy", tmp_path / "big", top_k=64, tail_samples=12, ctx=32)
    assert h["bytes_per_token_payload"] == 660
    assert h["dense_float32_fraction"] < 0.01, h["dense_float32_fraction"]


@pytest.mark.parametrize("argv,match", [
    (["--top-k", "0"], "--top-k"),
    (["--top-k", "3", "--temperature", "0"], "--temperature"),
    (["--top-k", "3", "--tail-samples", "-1"], "--tail-samples"),
    (["--top-k", "500"], "vocabulary"),
    (["--top-k", "3", "--ctx", "1000"], "fewer than one chunk"),
])
def test_cli_bad_inputs_one_line(teacher, tmp_path, capsys, argv, match):
    rc = cli_main(["cache", str(teacher / "teacher"), "--tokens", str(teacher / "tokens.npy"),
                   "--out", str(tmp_path / "o"), "--no-progress", *argv])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (transformers' own weight-loading bar may come first)
    assert rc == 1 and last.startswith("kldiv cache: error:") and match in last, err
    assert "Traceback" not in err


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cache.json"):
        TeacherCache(tmp_path)
    (tmp_path / "cache.json").write_text("{}")
    with pytest.raises(ValueError, match="not a kldiv teacher cache"):
        TeacherCache(tmp_path)
