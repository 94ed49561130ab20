"""A sparse teacher cache (`kldiv cache`) as the reference of `kldiv eval` and `kldiv compare`:
the certified bounds bracket the dense float64 KL, and the exact statistics equal the dense ones.

Tiny random Llama models built here (no download); the truth is computed from plain transformers
forward passes in float64.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from kldiv.cli import main  # noqa: E402

V, CTX, N_CHUNKS, K, M = 97, 16, 4, 8, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer, models as tkm, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("eval_cache")
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      initializer_range=0.5)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg).eval()
    teacher.save_pretrained(root / "teacher")
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(V - 1)}}
    tk = Tokenizer(tkm.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    tok.save_pretrained(root / "teacher")
    # the candidate: the teacher with its second layer dropped (a real drift, same tokenizer)
    cfg1 = LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1})
    cand = LlamaForCausalLM(cfg1)
    cand.load_state_dict({k: v for k, v in teacher.state_dict().items() if ".layers.1." not in k})
    cand.save_pretrained(root / "cand")
    tok.save_pretrained(root / "cand")
    # a candidate with another tokenizer (same size, other words)
    shutil.copytree(root / "cand", root / "cand_othertok")
    vocab2 = {"<unk>": 0, **{f"x{i}": i + 1 for i in range(V - 1)}}
    tk2 = Tokenizer(tkm.WordLevel(vocab=vocab2, unk_token="<unk>"))
    tk2.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk2, unk_token="<unk>").save_pretrained(root / "cand_othertok")
    # a candidate with another vocabulary size
    LlamaForCausalLM(LlamaConfig(**{**cfg1.to_dict(), "vocab_size": V + 3})).save_pretrained(root / "cand_v100")
    ids = np.random.default_rng(0).integers(1, V, N_CHUNKS * CTX)
    np.save(root / "tokens.npy", ids)
    (root / "text.txt").write_text(" ".join(f"w{i - 1}" for i in ids))
    for name, extra in (("cache", []), ("cache_t2", ["--temperature", "2"])):
        argv = ["cache", str(root / "teacher"), "--tokens", str(root / "tokens.npy"), "--top-k", str(K),
                "--tail-samples", str(M), "--ctx", str(CTX), "--shard-chunks", "3", "--out",
                str(root / name), "--no-progress", "--quiet", *extra]
        assert main(argv) == 0
    # dense float64 logits from plain forward passes, every position of every chunk
    chunks = torch.as_tensor(ids.reshape(N_CHUNKS, CTX), dtype=torch.long)
    with torch.no_grad():
        t = teacher(input_ids=chunks).logits.double()
        c = cand.eval()(input_ids=chunks).logits
    np.save(root / "cand_logits.npy", c.reshape(-1, V).numpy())
    return {"root": root, "ids": ids, "teacher": t, "cand": c.double()}


def dense_kl(t, s, T=1.0):
    lp = torch.log_softmax(t / T, -1)
    lq = torch.log_softmax(s / T, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _cands(path):
    return json.loads(path.read_text())["candidates"]


def _check_brackets(c, truth, tol=1e-6):
    """Mean, min, max and every quantile of the truth lie within the certified bounds."""
    lo, hi = c["kl_lower"], c["kl_upper"]
    assert lo["mean"] <= truth.mean() + tol <= hi["mean"] + 2 * tol
    assert lo["min"] <= truth.min() + tol and truth.min() <= hi["min"] + tol
    assert lo["max"] <= truth.max() + tol and truth.max() <= hi["max"] + tol
    for q, v in lo["quantiles"].items():
        f = float(q.rstrip("%")) / 100
        tq = np.quantile(truth, f)
        assert v <= tq + tol and tq <= hi["quantiles"][q] + tol, q
    assert lo["mean"] < hi["mean"]  # a real interval on this teacher (K << V)


@pytest.mark.parametrize("window", ["half", "all"])
def test_eval_with_cache_reference_brackets_dense_kl(setup, tmp_path, capsys, window):
    root = setup["root"]
    out = tmp_path / "e.json"
    argv = ["eval", str(root / "cache"), str(root / "cand"), "--json", str(out), "--no-progress"]
    if window == "all":
        argv.append("--all-positions")
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "certified bounds" in text and "Not computable" in text and "Reverse" not in text
    assert "PPL(ref)" in text.split("Not computable")[1]  # named only among what cannot be computed
    first, stop = (CTX // 2, CTX - 1) if window == "half" else (0, CTX - 1)
    t = setup["teacher"][:, first:stop].reshape(-1, V)
    s = setup["cand"][:, first:stop].reshape(-1, V)
    truth = dense_kl(t, s).numpy()
    (c,) = _cands(out)
    assert c["n_tokens"] == truth.size
    _check_brackets(c, truth)
    # the sampled-tail estimate is unbiased: within 5 standard errors of the truth
    est = c["kl_sampled"]
    assert abs(est["mean"] - truth.mean()) <= 5 * est["mean_err"] + 1e-6
    # exact statistics against the dense rows
    same = (t.argmax(-1) == s.argmax(-1)).double().mean().item()
    assert c["same_top"]["share"] == pytest.approx(same, abs=1e-12)
    ia, ib = torch.topk(t, 5).indices, torch.topk(s, 5).indices
    ov = (ia[:, :, None] == ib[:, None, :]).any(-1).double().sum(-1).mean().item() / 5
    assert c["topk_overlap"]["5"]["mean"] == pytest.approx(ov, abs=1e-12)
    nxt = torch.as_tensor(setup["ids"].reshape(N_CHUNKS, CTX)[:, first + 1:stop + 1].reshape(-1))
    lq = torch.log_softmax(s, -1)
    nll = -lq[torch.arange(nxt.numel()), nxt]
    assert c["perplexity"]["ppl_other"] == pytest.approx(nll.mean().exp().item(), rel=1e-9)
    rc, oc = t.argmax(-1) == nxt, s.argmax(-1) == nxt
    assert c["flips"]["correct_to_wrong"]["count"] == int((rc & ~oc).sum())
    assert c["flips"]["wrong_to_correct"]["count"] == int((~rc & oc).sum())
    in_top = (torch.topk(t, K).indices == nxt[:, None]).any(-1).double().mean().item()
    assert c["next_token_in_ref_topk"]["share"] == pytest.approx(in_top, abs=1e-12)
    assert "ppl_ref" not in c.get("perplexity", {}) and "delta_p" not in c and "reverse_kl" not in c
    if window == "half":  # --text is tokenized with the cache's recorded tokenizer and checked
        out2 = tmp_path / "e2.json"
        assert main(["eval", str(root / "cache"), str(root / "cand"), "--text", str(root / "text.txt"),
                     "--json", str(out2), "--no-progress", "--quiet"]) == 0
        assert _cands(out2)[0]["kl_lower"] == c["kl_lower"]
        # a candidate given as a logits file of the scored rows gives the same numbers
        np.save(tmp_path / "scored.npy", setup["cand"][:, first:stop].reshape(-1, V).float().numpy())
        out3 = tmp_path / "e3.json"
        assert main(["eval", str(root / "cache"), str(tmp_path / "scored.npy"), "--json", str(out3),
                     "--no-progress", "--quiet"]) == 0
        c3 = _cands(out3)[0]
        for key in ("kl_lower", "kl_upper"):
            assert c3[key]["mean"] == pytest.approx(c[key]["mean"], rel=1e-6)
        assert c3["same_top"] == c["same_top"]


def test_compare_with_cache_reference_and_temperature(setup, tmp_path, capsys):
    root = setup["root"]
    t = setup["teacher"].reshape(-1, V)
    s = setup["cand"].reshape(-1, V)
    for cache, T in (("cache", 1.0), ("cache_t2", 2.0)):
        out = tmp_path / f"{cache}.json"
        assert main(["compare", str(root / cache), str(root / "cand_logits.npy"), "--json", str(out),
                     "--no-progress"]) == 0
        text = capsys.readouterr().out
        assert "certified bounds" in text
        if T != 1.0:
            assert "temperature" in text
        (c,) = _cands(out)
        truth = dense_kl(t, s, T).numpy()  # every cached position (the teacher at T, the candidate at T)
        assert c["n_tokens"] == truth.size
        _check_brackets(c, truth, tol=1e-5)
        # next tokens from the cache's input_ids: the text continues across chunks, the last has none
        assert c["perplexity"]["n_tokens"] == truth.size - 1
        nxt = torch.as_tensor(setup["ids"][1:])
        nll = -torch.log_softmax(s[:-1], -1)[torch.arange(nxt.numel()), nxt]
        assert c["perplexity"]["ppl_other"] == pytest.approx(nll.mean().exp().item(), rel=1e-5)


def test_per_row_bounds_hold_against_dense(setup):
    from kldiv.eval.sparse import CacheReference, sparse_row_values

    ref = CacheReference(setup["root"] / "cache")
    t = setup["teacher"]
    s = setup["cand"]
    for c in range(N_CHUNKS):
        vals = sparse_row_values(ref.chunk(c), s[c].float().numpy())
        truth = dense_kl(t[c], s[c]).numpy()
        assert (vals["kl_lower"] <= truth + 1e-6).all() and (truth <= vals["kl_upper"] + 1e-6).all()
        assert (vals["top_ref"] == t[c].argmax(-1).numpy()).all()


def one_line_error(capsys, argv, match):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 1, (argv, err)
    assert "Traceback" not in err
    assert match in err, err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) == 1, err


def test_bad_cache_inputs_one_line(setup, tmp_path, capsys):
    root = setup["root"]
    cache, cand, npy = str(root / "cache"), str(root / "cand"), str(root / "cand_logits.npy")
    notcache = tmp_path / "notcache"
    notcache.mkdir()
    (notcache / "cache.json").write_text("{broken")
    other = tmp_path / "other"
    other.mkdir()
    (other / "cache.json").write_text(json.dumps({"format": "something-else"}))
    damaged = tmp_path / "damaged"
    shutil.copytree(root / "cache", damaged)
    h = json.loads((damaged / "cache.json").read_text())
    del h["vocab_size"]
    (damaged / "cache.json").write_text(json.dumps(h))
    badshard = tmp_path / "badshard"
    shutil.copytree(root / "cache", badshard)
    (badshard / "shard-00000.safetensors").write_bytes(b"\x00" * 40)
    np.save(tmp_path / "rows.npy", np.zeros((10, V), np.float32))
    np.save(tmp_path / "v5.npy", np.zeros((N_CHUNKS * CTX, 5), np.float32))
    np.save(tmp_path / "wrongtok.npy", (setup["ids"] % (V - 1)) + 1)
    capsys.readouterr()
    cases = [
        (["eval", str(notcache), cand], "notcache"),
        (["eval", str(other), cand], "not a kldiv teacher cache"),
        (["eval", str(damaged), cand], "damaged"),
        (["eval", str(badshard), cand], "shard-00000.safetensors"),
        (["eval", cache, str(root / "cand_v100")], f"{cache}: the cache's vocabulary has {V}"),
        (["eval", cache, str(root / "cand_othertok")], "another tokenizer"),
        (["eval", cache, cand, "--ctx", "8"], "--ctx 8 differs"),
        (["eval", cache, cand, "--plot", str(tmp_path / "x.png")], "--plot"),
        (["eval", cache, cand, "--save-reference", str(tmp_path / "r.npy")], "--save-reference"),
        (["eval", cache, cand, "--bos", "1"], "--bos 1"),
        (["eval", cand, cache], "REFERENCE only"),
        (["eval", cache, cand, "--tokens", str(tmp_path / "wrongtok.npy")], "differ from the input_ids"),
        (["compare", str(notcache), npy], "notcache"),
        (["compare", cache, str(tmp_path / "rows.npy")], "rows.npy: 10 rows"),
        (["compare", cache, str(tmp_path / "v5.npy")], "v5.npy: vocabulary of 5"),
        (["compare", cache, npy, "--reverse"], "--reverse"),
        (["compare", cache, npy, "--js"], "--js"),
        (["compare", cache, npy, "--json", str(tmp_path)], "is a directory"),
    ]
    for argv, match in cases:
        one_line_error(capsys, [*argv, "--no-progress", "--quiet"], match)
    assert not (tmp_path / "r.npy").exists()
