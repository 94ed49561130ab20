"""kldiv.integrations.hf on realistic set-ups (audit 4, F5): gradient accumulation, the student's
final-logit transform (Gemma-2 soft-cap, Cohere logit_scale, Granite logits_scaling) and
completion-only labels in Hugging Face's convention. Tiny random models built from configs (no
downloads); references in float64 from the models' own ``.logits`` through torch.autograd."""
import os
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, CTX = 64, 8


def llama(seed, layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      initializer_range=0.5)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def batch_with_labels(n, seed):
    """Completion-only labels: prompts of different lengths at -100, right padding (mask 0, -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, CTX), generator=g)
    am = torch.ones(n, CTX, dtype=torch.long)
    labels = ids.clone()
    for i in range(n):
        prompt, pad = (2 + 3 * i) % 6, i % 3
        labels[i, :prompt] = -100
        if pad:
            am[i, CTX - pad:] = 0
            labels[i, CTX - pad:] = -100
    return ids, am, labels


def kl_rows64(student, teacher, ids, am):
    """Per-position forward KL(teacher || student) in float64 from the models' own logits."""
    ls = torch.log_softmax(student(input_ids=ids, attention_mask=am).logits.double(), -1)
    with torch.no_grad():
        lt = torch.log_softmax(teacher(input_ids=ids, attention_mask=am).logits.double(), -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def hf_kept(am, labels):
    """Positions whose next token is labelled (HF: logits[:, t] predicts labels[:, t + 1])."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep & (am == 1)


def rel_grad_errors(got, ref):
    return {n: float((got[n].double() - ref[n]).norm() / ref[n].norm()) for n in ref}


# ------------------------------------------------------------------------------------------
# F5a: gradient accumulation


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids, am, labels):
        self.ids, self.am, self.labels = ids, am, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.am[i], "labels": self.labels[i]}


def _accumulated(tmp_path, student, teacher, ds, per_device, ga):
    """Run one optimizer step (lr 0) and return the gradients the optimizer saw and the logged loss."""
    from kldiv.integrations.hf import DistillationTrainer

    grads = {}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            for n, p in student.named_parameters():
                grads[n] = p.grad.detach().clone()

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"ga{ga}"), max_steps=1, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=ga, learning_rate=0.0, max_grad_norm=0.0, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                             callbacks=[Grab()])
    tr.train()
    loss = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return grads, loss[0]


def test_gradient_accumulation_equals_full_batch(tmp_path):
    ids, am, labels = batch_with_labels(4, 0)
    teacher = llama(1)
    student = llama(0)
    ref_model = llama(0).double()
    keep = hf_kept(am, labels)
    assert len({int(k.sum()) for k in keep}) > 1  # micro-batch counts differ: mean of means is off
    rows = kl_rows64(ref_model, teacher.double(), ids, am)
    ref = rows[keep].mean()
    ref_grads = dict(zip([n for n, _ in ref_model.named_parameters()],
                         torch.autograd.grad(ref, list(ref_model.parameters()))))
    ds = Rows(ids, am, labels)
    for per_device, ga in ((4, 1), (2, 2)):
        grads, logged = _accumulated(tmp_path, student, teacher, ds, per_device, ga)
        errs = rel_grad_errors(grads, ref_grads)
        assert max(errs.values()) < 1e-4, (ga, errs)
        assert logged == pytest.approx(float(ref.detach()), rel=1e-4), ga


def test_compute_loss_scaling_flags():
    """The loss is divided by num_items_in_batch and the Trainer told it is scaled for GA."""
    from kldiv.integrations.hf import linear_distillation_loss

    student, teacher = llama(0).double(), llama(1).double()
    ids, am, labels = batch_with_labels(2, 1)
    inputs = {"input_ids": ids, "attention_mask": am, "labels": labels}
    rows = kl_rows64(student, teacher, ids, am)[hf_kept(am, labels)]
    got = linear_distillation_loss(student, inputs, teacher_model=teacher,
                                   num_items_in_batch=torch.tensor(23))
    torch.testing.assert_close(got, rows.sum() / 23, rtol=1e-12, atol=0)
    got = linear_distillation_loss(student, inputs, teacher_model=teacher)
    torch.testing.assert_close(got, rows.mean(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------
# F5b: the student's final-logit transform


def _gemma(seed, cap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       max_position_embeddings=32, final_logit_softcapping=cap)
    torch.manual_seed(seed)
    m = Gemma2ForCausalLM(cfg).double()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # logits of a few units: the cap matters
    return m


def _other(kind, seed, value):
    cfg_kw = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if kind == "cohere":
        C = pytest.importorskip("transformers.models.cohere.modeling_cohere")
        cfg = C.CohereConfig(logit_scale=value, **cfg_kw)
        cls = C.CohereForCausalLM
    else:
        G = pytest.importorskip("transformers.models.granite.modeling_granite")
        cfg = G.GraniteConfig(logits_scaling=value, **cfg_kw)
        cls = G.GraniteForCausalLM
    torch.manual_seed(seed)
    return cls(cfg).double()


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_student_final_logit_transform(kind):
    from kldiv.integrations.hf import final_logit_transform, linear_distillation_loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "gemma2":  # different caps: each side's own, the teacher's not applied twice
            student, teacher = _gemma(0, 2.0), _gemma(1, 1.0)
            assert final_logit_transform(student) == (2.0, None)
        elif kind == "cohere":
            student, teacher = _other(kind, 0, 3.0), _other(kind, 1, 0.5)
            assert final_logit_transform(student) == (None, 3.0)
        else:
            student, teacher = _other(kind, 0, 0.25), _other(kind, 1, 2.0)
            assert final_logit_transform(student) == (None, 4.0)
    ids, am, labels = batch_with_labels(2, 2)
    got = linear_distillation_loss(student, {"input_ids": ids, "attention_mask": am, "labels": labels},
                                   teacher_model=teacher)
    ref = kl_rows64(student, teacher, ids, am)[hf_kept(am, labels)].mean()
    assert float(ref.detach()) > 0.01
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    params = [p for p in student.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(got, params)
    g2 = torch.autograd.grad(ref, params)
    for a, b in zip(g1, g2):
        assert float((a - b).norm()) <= 1e-9 * float(b.norm()) + 1e-300


def test_unknown_output_transform_is_refused():
    from kldiv.integrations.hf import linear_distillation_loss

    class Doubled(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    student = Doubled(llama(0).config)
    ids = torch.randint(0, V, (1, CTX))
    with pytest.raises(ValueError, match="not its backbone's last hidden state"):
        linear_distillation_loss(student, {"input_ids": ids}, teacher_model=llama(1))
    assert student.training  # the check's eval() is undone


# ------------------------------------------------------------------------------------------
# F5c: labels in Hugging Face's convention


def test_completion_only_labels_hf_convention():
    from kldiv.integrations.hf import linear_distillation_loss

    student, teacher = llama(0).double(), llama(1, layers=2).double()
    ids, am, labels = batch_with_labels(3, 3)
    rows = kl_rows64(student, teacher, ids, am)
    # independent: position t counts when the token it predicts, t + 1, is labelled
    want = [float(rows[i, t].detach()) for i in range(3) for t in range(CTX - 1)
            if labels[i, t + 1] != -100 and am[i, t] == 1]
    ref = rows.new_tensor(want).mean()
    got = linear_distillation_loss(student, {"input_ids": ids, "attention_mask": am, "labels": labels},
                                   teacher_model=teacher)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    # a padding-free collator's shift_labels are used as given
    shift = torch.full_like(labels, -100)
    shift[:, :-1] = labels[:, 1:]
    got2 = linear_distillation_loss(student, {"input_ids": ids, "attention_mask": am,
                                              "shift_labels": shift}, teacher_model=teacher)
    torch.testing.assert_close(got2, ref, rtol=1e-10, atol=0)


def test_loss_fn_checks():
    import kldiv.torch
    from kldiv.integrations.hf import linear_distillation_loss

    ids = torch.randint(0, V, (1, CTX))
    with pytest.raises(ValueError, match="softcap"):
        linear_distillation_loss(llama(0), {"input_ids": ids}, teacher_model=llama(1),
                                 loss_fn=kldiv.torch.LinearKLDivLoss(softcap=30.0))
    with pytest.raises(TypeError, match="LinearKLDivLoss"):
        linear_distillation_loss(llama(0), {"input_ids": ids}, teacher_model=llama(1),
                                 loss_fn=lambda *a, **k: 0)
