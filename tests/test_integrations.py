"""kldiv.integrations: TRL hooks (checked against TRL's own losses and the dense float64 formula)
and the Hugging Face Trainer with LinearKLDivLoss, on tiny random models (no downloads)."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def dense_rows(t, s, beta, T=1.0):
    """TRL's generalised JSD written out in float64 (beta 0: KL(t||s), 1: KL(s||t))."""
    lt = torch.log_softmax(t.double() / T, -1)
    ls = torch.log_softmax(s.double() / T, -1)
    pt, ps = lt.exp(), ls.exp()
    if beta == 0:
        return (pt * (lt - ls)).sum(-1)
    if beta == 1:
        return (ps * (ls - lt)).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (lt - m.log())).sum(-1) + (1 - beta) * (ps * (ls - m.log())).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_generalized_jsd_loss_dense_reference(beta, T):
    from kldiv.integrations.trl import generalized_jsd_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 30, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 30, generator=g, dtype=torch.float64) * 3
    lab = torch.randint(0, 30, (2, 5), generator=g)
    lab[0, :2] = -100
    keep = lab != -100
    ref = dense_rows(t, s, beta, T)[keep]
    got = generalized_jsd_loss(s, t, labels=lab, beta=beta, temperature=T)
    torch.testing.assert_close(got, ref.mean(), rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(got, s)
    (g2,) = torch.autograd.grad(ref.mean(), s)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(generalized_jsd_loss(s, t, labels=lab, beta=beta, temperature=T,
                                                    num_items_in_batch=torch.tensor(4)), ref.sum() / 4)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(s, t, beta=1.5)


def test_generalized_jsd_loss_equals_trl_gkd():
    """TRL's own function is the reference: every beta, temperature, reduction, with and without
    labels and num_items_in_batch (float64, so the two agree to rounding)."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    from kldiv.integrations.trl import generalized_jsd_loss, use_kldiv

    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, 50, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 4, 50, generator=g, dtype=torch.float64) * 2
    lab = torch.randint(0, 50, (3, 4), generator=g)
    lab[1] = -100
    lab[0, :2] = -100
    reductions = [(r, None) for r in ("batchmean", "sum", "mean", "none")] + [("none", 5)]
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for T, labels in ((1.0, None), (1.5, None), (1.5, lab)):
            for red, nib in reductions:  # num_items_in_batch overrides the reduction
                kw = dict(labels=labels, beta=beta, temperature=T, reduction=red,
                          num_items_in_batch=nib)
                a = gkd.GKDTrainer.generalized_jsd_loss(s, t, **kw)
                b = generalized_jsd_loss(s, t, **kw)
                assert b.shape == a.shape, kw
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(s, t, reduction="avg")

    class Sub(gkd.GKDTrainer):
        pass

    use_kldiv(Sub)
    assert Sub.generalized_jsd_loss is generalized_jsd_loss
    assert gkd.GKDTrainer.generalized_jsd_loss is not generalized_jsd_loss


def test_chunked_divergence_loss_equals_trl_distillation():
    dt = pytest.importorskip("trl.trainer.distillation_trainer")
    from kldiv.integrations.trl import chunked_divergence_loss, use_kldiv

    g = torch.Generator().manual_seed(2)
    B, L, Hs, Ht, V = 2, 6, 8, 12, 40
    hs = torch.randn(B, L, Hs, generator=g, requires_grad=True)
    ht = torch.randn(B, L, Ht, generator=g)
    Ws = torch.randn(V, Hs, generator=g, requires_grad=True)
    Wt = torch.randn(V, Ht, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    for beta in (0.0, 0.5, 1.0):
        kw = dict(student_logit_scale=0.7, teacher_logit_scale=1.3, teacher_final_logit_softcapping=5.0,
                  temperature=2.0)
        ref, ref_ent, ref_n = dt._chunked_divergence_loss(hs, ht, Ws, Wt, mask, beta, **kw)
        got, ent, n = chunked_divergence_loss(hs, ht, Ws, Wt, mask, beta, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
        assert int(n) == int(ref_n) == 10
        g_ref = torch.autograd.grad(ref, (hs, Ws))
        g_got = torch.autograd.grad(got, (hs, Ws))
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    old = dt._chunked_divergence_loss
    try:
        use_kldiv(dt.DistillationTrainer)
        assert dt._chunked_divergence_loss is chunked_divergence_loss
    finally:
        dt._chunked_divergence_loss = old
    with pytest.raises(TypeError, match="not a TRL distillation trainer"):
        use_kldiv(int)


# ------------------------------------------------------------------------------------------
# Hugging Face Trainer with LinearKLDivLoss

V, CTX = 61, 12


def tiny(layers, hidden, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=32, initializer_range=0.5)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        self.ids = torch.as_tensor(np.random.default_rng(seed).integers(0, V, (n, CTX)))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(CTX, dtype=torch.long)}


def _args(tmp_path, steps):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
        learning_rate=3e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0)


def test_linear_distillation_loss_equals_dense_kl():
    from kldiv.integrations.hf import linear_distillation_loss

    student, teacher = tiny(1, 16, 0), tiny(2, 16, 1)
    ids = torch.as_tensor(np.random.default_rng(3).integers(0, V, (2, CTX)))
    am = torch.ones(2, CTX, dtype=torch.long)
    am[1, 9:] = 0
    labels = ids.clone()
    labels[0, :3] = -100
    got = linear_distillation_loss(student, {"input_ids": ids, "attention_mask": am, "labels": labels},
                                   teacher_model=teacher)
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=am).logits
    s = student(input_ids=ids, attention_mask=am).logits
    keep = torch.zeros_like(am, dtype=torch.bool)  # HF: position t predicts labels[t + 1]
    keep[:, :-1] = labels[:, 1:] != -100
    keep &= am == 1
    ref = dense_rows(t, s, 0.0)[keep].mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(got, student.lm_head.weight)[0]
    g2 = torch.autograd.grad(ref, student.lm_head.weight)[0]
    torch.testing.assert_close(g1.double(), g2.double(), rtol=1e-4, atol=1e-6)


def test_hf_trainer_distils_from_model_and_from_cache(tmp_path):
    from kldiv.cache import TeacherCache, build_cache
    from kldiv.integrations.hf import DistillationTrainer, linear_distillation_loss

    teacher, student = tiny(2, 16, 1), tiny(1, 16, 0)
    ds = Tokens(16)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, 6), train_dataset=ds)
    batch = {k: torch.stack([ds[i][k] for i in range(16)]) for k in ds[0]}
    with torch.no_grad():
        before = float(linear_distillation_loss(student, batch, teacher_model=teacher))
    tr.train()
    with torch.no_grad():
        after = float(linear_distillation_loss(student, batch, teacher_model=teacher))
    assert after < before
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(np.isfinite(losses))

    # the same student trained from a cache of the teacher (top-k + tail bucket target)
    teacher.save_pretrained(tmp_path / "teacher")
    np.save(tmp_path / "tok.npy", ds.ids.numpy().reshape(-1))
    build_cache(tmp_path / "teacher", tmp_path / "cache", top_k=8, tail_samples=2,
                tokens=tmp_path / "tok.npy", ctx=CTX)
    cache = TeacherCache(tmp_path / "cache")
    student2 = tiny(1, 16, 0)
    tr2 = DistillationTrainer(model=student2, args=_args(tmp_path, 4), train_dataset=cache)
    tr2.train()
    losses = [h["loss"] for h in tr2.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="teacher_model"):
        linear_distillation_loss(student2, {"input_ids": ds.ids[:2]})
