"""`kldiv eval` on tiny random transformers models built here (no download), against `kldiv compare`
on logits dumped by a plain transformers forward pass."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kldiv.cli import main  # noqa: E402
from kldiv.compare import compare  # noqa: E402

V, CTX, N_CHUNKS = 1000, 16, 4
PNG = b"\x89PNG\r\n\x1a\n"


def _quantize_4bit(w, group=32):
    """Round weights to 4-bit symmetric groups (absmax scale per group of ``group`` inputs)."""
    shape = w.shape
    g = w.reshape(-1, group)
    scale = g.abs().amax(1, keepdim=True).clamp_min(1e-12) / 7
    return (torch.clamp(torch.round(g / scale), -8, 7) * scale).reshape(shape)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tokenizers import Tokenizer, models as tkm, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("eval_models")
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(root / "ref")
    # tokenizer: a word-level vocabulary w0..w997 with <s> (BOS) first
    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i + 2 for i in range(V - 2)}}
    tk = Tokenizer(tkm.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>").save_pretrained(root / "ref")
    # candidates: 4-bit group-rounded linear weights; bfloat16 weights; one layer dropped
    q4 = LlamaForCausalLM(cfg)
    sd = {k: (_quantize_4bit(v) if v.ndim == 2 and "proj" in k else v.clone()) for k, v in ref.state_dict().items()}
    q4.load_state_dict(sd)
    q4.save_pretrained(root / "q4")
    bf = LlamaForCausalLM(cfg)
    bf.load_state_dict(ref.state_dict())
    bf.to(torch.bfloat16).save_pretrained(root / "bf16")
    cfg1 = LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1})
    drop = LlamaForCausalLM(cfg1)
    drop.load_state_dict({k: v for k, v in ref.state_dict().items() if ".layers.1." not in k})
    drop.save_pretrained(root / "drop")
    rng = np.random.default_rng(0)
    ids = rng.integers(2, V, N_CHUNKS * CTX + 5)  # a partial last chunk is dropped
    np.save(root / "tokens.npy", ids)
    (root / "tokens.txt").write_text(", ".join(map(str, ids)))
    (root / "text.txt").write_text(" ".join(f"w{i - 2}" for i in ids))
    return root


def dump(path, ids, first, stop, bos=None):
    """Plain transformers forward, chunk by chunk: the scored rows' float32 logits."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    chunks = np.asarray(ids[: N_CHUNKS * CTX]).reshape(N_CHUNKS, CTX).copy()
    if bos is not None:
        chunks[:, 0] = bos
    out = []
    with torch.no_grad():
        for c in chunks:
            out.append(m(torch.as_tensor(c[None], dtype=torch.long)).logits[0, first:stop].numpy())
    return np.concatenate(out)


def next_tokens(ids, first, stop):
    return np.asarray(ids[: N_CHUNKS * CTX]).reshape(N_CHUNKS, CTX)[:, first + 1:stop + 1].reshape(-1)


KEYS = ("kl", "reverse_kl", "js", "delta_p")


def kldiv_compare(ref, oth, **kw):
    """kldiv compare's report with kldiv's renormalised KL (what eval computes for a file reference)."""
    import inspect

    if "llamacpp" in inspect.signature(compare).parameters:
        kw["llamacpp"] = False
    # no reverse KL against a llama.cpp KL base file: compare refuses it (unbounded above)
    kld = str(ref).endswith(".kld")
    return compare(ref, oth, reverse=not kld, js=True, **kw).summary()


def assert_same_stats(cand, rep, rel=2e-4):
    """The eval JSON's statistics equal kldiv compare's to the digits llama.cpp prints (%.6f, %)."""
    assert cand["n_tokens"] == rep["n_tokens"]
    for key in KEYS:
        if key not in rep:  # the reverse KL against a llama.cpp KL base file: null in eval's JSON
            assert cand[key] is None, key
            continue
        for f in ("mean", "max", "min", "median"):
            assert cand[key][f] == pytest.approx(rep[key][f], rel=rel, abs=5e-7), (key, f)
        assert cand[key]["mean_err"] == pytest.approx(rep[key]["mean_err"], rel=1e-3, abs=5e-7), key
        for q, v in rep[key]["quantiles"].items():
            assert cand[key]["quantiles"][q] == pytest.approx(v, rel=rel, abs=5e-7), (key, q)
    for f, v in rep["perplexity"].items():
        if f not in cand["perplexity"]:  # a statistic compare gained since
            continue
        assert cand["perplexity"][f] == pytest.approx(v, rel=1e-3, abs=5e-7), f
    assert cand["same_top"]["share"] == pytest.approx(rep["same_top"]["share"], abs=1e-12)


def test_eval_equals_compare_on_dumped_logits(models, tmp_path, capsys):
    ids = np.load(models / "tokens.npy")
    first, stop = CTX // 2, CTX - 1
    out = tmp_path / "o" / "eval.json"
    rc = main(["eval", str(models / "ref"), str(models / "q4"), str(models / "bf16"), str(models / "drop"),
               "--tokens", str(models / "tokens.npy"), "--ctx", str(CTX), "--batch", "3",
               "--json", str(out), "--plot", str(tmp_path / "o" / "eval.png"),
               "--save-reference", str(tmp_path / "ref.kld"), "--no-progress", "--resamples", "200"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Mean    KLD" in text and "Top-5 overlap" in text and "Paired: q4 - bf16" in text
    data = json.loads(out.read_text())
    assert (tmp_path / "o" / "eval.png").read_bytes()[:8] == PNG
    a = dump(models / "ref", ids, first, stop)
    np.save(tmp_path / "ref.npy", a)
    t = next_tokens(ids, first, stop)
    kl_means = {}
    for name, cand in zip(("q4", "bf16", "drop"), data["candidates"]):
        b = dump(models / name, ids, first, stop)
        rep = kldiv_compare(a, b, tokens=t)
        assert_same_stats(cand, rep)
        kl_means[name] = cand["kl"]["mean"]
        # flips against the actual next token, from the dumped logits
        rc_, oc_ = a.argmax(1) == t, b.argmax(1) == t
        assert cand["flips"]["correct_to_wrong"]["count"] == int((rc_ & ~oc_).sum())
        assert cand["flips"]["wrong_to_correct"]["count"] == int((~rc_ & oc_).sum())
        top5 = [len(set(np.argsort(-x)[:5]) & set(np.argsort(-y)[:5])) / 5 for x, y in zip(a, b)]
        assert cand["topk_overlap"]["5"]["mean"] == pytest.approx(np.mean(top5), abs=1e-12)
    assert kl_means["bf16"] < kl_means["q4"] < kl_means["drop"]
    assert len(data["paired"]) == 3 and data["settings"]["chunks"] == N_CHUNKS
    # the saved llama.cpp file is the reference next time (no forward pass), same numbers: with
    # kldiv's renormalised KL, and with llama.cpp's own statistics (the default, as kldiv compare)
    q4_logits = dump(models / "q4", ids, first, stop)
    out2 = tmp_path / "eval2.json"
    assert main(["eval", str(tmp_path / "ref.kld"), str(models / "q4"), "--json", str(out2),
                 "--no-progress", "--quiet", "--renormalize"]) == 0
    rep = kldiv_compare(str(tmp_path / "ref.kld"), q4_logits)
    assert_same_stats(json.loads(out2.read_text())["candidates"][0], rep)
    import inspect

    if "llamacpp" in inspect.signature(compare).parameters:
        assert main(["eval", str(tmp_path / "ref.kld"), str(models / "q4"), "--json", str(out2),
                     "--no-progress", "--quiet"]) == 0
        got = json.loads(out2.read_text())
        assert got["settings"]["statistics"] == "llama.cpp"
        rep = compare(str(tmp_path / "ref.kld"), q4_logits, js=True).summary()
        assert rep["statistics"] == "llama.cpp"
        assert_same_stats(got["candidates"][0], rep)
    # an .npy reference with the scored rows
    out3 = tmp_path / "eval3.json"
    assert main(["eval", str(tmp_path / "ref.npy"), str(models / "q4"), "--tokens", str(models / "tokens.txt"),
                 "--ctx", str(CTX), "--json", str(out3), "--no-progress", "--quiet"]) == 0
    assert_same_stats(json.loads(out3.read_text())["candidates"][0], data["candidates"][0] | {"n_tokens": data["candidates"][0]["n_tokens"]})


def test_all_positions_and_text_with_bos(models, tmp_path):
    ids = np.load(models / "tokens.npy")
    out = tmp_path / "all.json"
    assert main(["eval", str(models / "ref"), str(models / "q4"), "--text", str(models / "text.txt"),
                 "--ctx", str(CTX), "--all-positions", "--json", str(out), "--no-progress", "--quiet",
                 "--save-reference", str(tmp_path / "ref_all.npy")]) == 0
    data = json.loads(out.read_text())
    # the tokenizer adds <s> (id 1) first: text tokens are [1, ids...]; llama.cpp's BOS starts each chunk
    toks = np.concatenate([[1], ids])
    first, stop = 0, CTX - 1
    a = dump(models / "ref", toks, first, stop, bos=1)
    b = dump(models / "q4", toks, first, stop, bos=1)
    rep = kldiv_compare(a, b, tokens=next_tokens(toks, first, stop))
    assert data["settings"]["bos"] == 1 and data["settings"]["scored_per_chunk"] == CTX - 1
    assert_same_stats(data["candidates"][0], rep)
    assert len(data["candidates"][0]["kl_by_position"]) == CTX - 1
    np.testing.assert_allclose(np.load(tmp_path / "ref_all.npy"), a, rtol=1e-5, atol=1e-5)
    ch = data["candidates"][0]["chunks"]
    assert ch["tokens"] == [CTX - 1] * N_CHUNKS
    kl = rep["kl"]["mean"] * rep["n_tokens"]
    assert sum(ch["kl_sum"]) == pytest.approx(kl, rel=1e-4)


def test_progress_bar_reports_tokens_per_second(models, capsys):
    pytest.importorskip("tqdm")
    from kldiv.eval import evaluate

    res = evaluate(str(models / "ref"), [str(models / "bf16")], tokens=str(models / "tokens.npy"),
                   ctx=CTX, chunks=2, progress=True)
    err = capsys.readouterr().err
    assert "kldiv eval" in err and "tok/s" in err
    assert res.summary()["candidates"][0]["n_tokens"] == 2 * (CTX - 1 - CTX // 2)
    t = res.summary()["timing"]
    assert t["compare_seconds"] > 0 and t["compare_share_of_forward"] is not None


def one_line_error(capsys, argv, match):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    assert match in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 or rc == 2, err


def test_bad_inputs_one_line_errors(models, tmp_path, capsys):
    ref, q4 = str(models / "ref"), str(models / "q4")
    tok = str(models / "tokens.npy")
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    np.save(tmp_path / "big.npy", np.array([5, V + 3] * 40))
    np.save(tmp_path / "short.npy", np.arange(5))
    np.save(tmp_path / "rows.npy", np.zeros((7, V), np.float32))
    np.save(tmp_path / "v10.npy", np.zeros((4 * 7, 10), np.float32))
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=CTX, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    gpt2 = str(tmp_path / "gpt2")
    capsys.readouterr()
    cases = [
        ([ref, str(tmp_path / "missing"), "--tokens", tok], "no such model directory or logits file"),
        ([ref, str(tmp_path / "noconfig"), "--tokens", tok], "without config.json"),
        ([ref, str(tmp_path / "broken"), "--tokens", tok], "broken"),
        ([ref, q4, "--tokens", str(tmp_path / "big.npy"), "--ctx", str(CTX)], "outside the vocabulary"),
        ([ref, q4, "--tokens", str(tmp_path / "short.npy"), "--ctx", str(CTX)], "fewer than one chunk"),
        ([ref, q4, "--tokens", tok, "--ctx", "2"], "--ctx must be >= 3"),
        ([ref, q4, "--tokens", tok, "--batch", "0"], "--batch must be >= 1"),
        ([ref, q4, "--tokens", tok, "--plot", str(tmp_path / "x.jpg")], "*.png"),
        ([ref, q4, "--tokens", tok, "--ctx", str(CTX), "--save-reference", str(tmp_path / "r.txt")],
         "--save-reference"),
        ([ref, q4], "need --text FILE or --tokens FILE"),
        ([str(tmp_path / "rows.npy"), q4, "--tokens", tok, "--ctx", str(CTX)], "rows.npy: 7 rows"),
        ([str(tmp_path / "v10.npy"), q4, "--tokens", tok, "--ctx", str(CTX)], "vocabulary sizes differ"),
        ([ref, q4, "--tokens", tok, "--bos", "x"], "--bos must be"),
        ([ref, q4, "--tokens", str(tmp_path / "nope.npy")], "nope.npy: no such file"),
        ([ref, q4, "--tokens", tok, "--text", "t.txt"], "not allowed with argument"),
        ([q4, str(tmp_path / "rows.npy"), "--tokens", tok, "--ctx", str(CTX)], "rows.npy: 7 rows"),
        ([gpt2, gpt2, "--tokens", tok, "--ctx", str(2 * CTX)], f"forward pass failed (the model has {CTX} positions"),
        ([ref, q4, "--tokens", tok, "--device", "nonsense"], "--device 'nonsense'"),
        ([ref, q4, "--text", str(models / "tokens.txt"), "--ctx", str(CTX), "--bos", "none"], None),
    ]
    for argv, match in cases:
        if match is None:  # not an error: a text of ids read as words is all <unk> (id 0)
            assert main(["eval", *argv, "--no-progress", "--quiet"]) == 0
            continue
        one_line_error(capsys, ["eval", *argv, "--no-progress", "--quiet"], match)
    assert not (tmp_path / "r.txt").exists()
