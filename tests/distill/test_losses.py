"""Distillation losses against plain single-process references (float64, full vocabulary)."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.distill import losses
from megatron_minitron.distill.losses import hidden_cosine_loss, hidden_mse_loss, top_k_kl, vocab_parallel_kl
from megatron_minitron.training.losses import masked_sum
from tests.distill.reference import kl_reference

SHAPE = (5, 3, 37)  # [s, b, V]: 15 tokens, an odd vocabulary


def logits(*shape, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def value_and_grad(fn, student, teacher, upstream):
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, teacher)
    (loss * upstream).sum().backward()
    return loss.detach(), student.grad


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [4, None])
def test_kl_equals_reference_fp64(reverse, temperature, chunk_size):
    student, teacher, upstream = logits(*SHAPE), logits(*SHAPE, seed=1), logits(*SHAPE[:-1], seed=2)
    ours = value_and_grad(lambda s, t: vocab_parallel_kl(s, t, temperature=temperature, reverse=reverse,
                                                         chunk_size=chunk_size), student, teacher, upstream)
    ref = value_and_grad(lambda s, t: kl_reference(s, t, temperature=temperature, reverse=reverse),
                         student, teacher, upstream)
    assert ours[0].shape == SHAPE[:-1] and ours[0].dtype == torch.float32
    assert ours[1].dtype == torch.float64
    # the loss is fp32 by contract; the gradient is computed in fp32 and stored in the input dtype
    assert rel(ours[0], ref[0]) <= 1e-6 and rel(ours[1], ref[1]) <= 1e-6
    assert (ours[0] > 0).all()


@pytest.mark.parametrize("reverse", [False, True])
def test_kl_fp32_within_1e5_of_reference(reverse):
    student, teacher, upstream = logits(*SHAPE, dtype=torch.float32), logits(*SHAPE, dtype=torch.float32, seed=1), \
        logits(*SHAPE[:-1], seed=2)
    ours = value_and_grad(lambda s, t: vocab_parallel_kl(s, t, reverse=reverse, chunk_size=2), student, teacher,
                          upstream)
    ref = value_and_grad(lambda s, t: kl_reference(s, t, reverse=reverse), student, teacher, upstream)
    assert rel(ours[0], ref[0]) <= 1e-5 and rel(ours[1], ref[1]) <= 1e-5


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("top_k", [None, 4])
def test_backward_passes_gradcheck_in_fp64(reverse, top_k, monkeypatch):
    """Finite differences of the loss itself, with the working precision switched to float64 for this
    check, so the hand-written backward is checked without any reference implementation."""
    monkeypatch.setattr(losses, "COMPUTE_DTYPE", torch.float64)
    student = logits(3, 2, 7).requires_grad_(True)
    teacher = logits(3, 2, 7, seed=1)
    kwargs = dict(temperature=2.0, reverse=reverse, chunk_size=2)
    fn = (lambda s: vocab_parallel_kl(s, teacher, **kwargs)) if top_k is None else \
        (lambda s: top_k_kl(s, teacher, k=top_k, **kwargs))
    assert fn(student).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (student,))


def test_temperature_squared_scaling():
    student, teacher = logits(*SHAPE), logits(*SHAPE, seed=1)
    plain = vocab_parallel_kl(student, teacher, temperature=2.0)
    scaled = vocab_parallel_kl(student, teacher, temperature=2.0, scale_by_temperature_squared=True)
    torch.testing.assert_close(scaled, 4.0 * plain)
    torch.testing.assert_close(top_k_kl(student, teacher, k=5, temperature=2.0, scale_by_temperature_squared=True),
                               4.0 * top_k_kl(student, teacher, k=5, temperature=2.0))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("k", [1, 5, 37])
def test_top_k_equals_reference(reverse, k):
    student, teacher, upstream = logits(*SHAPE), logits(*SHAPE, seed=1), logits(*SHAPE[:-1], seed=2)
    ours = value_and_grad(lambda s, t: top_k_kl(s, t, k=k, temperature=2.0, reverse=reverse, chunk_size=4),
                          student, teacher, upstream)
    ref = value_and_grad(lambda s, t: kl_reference(s, t, temperature=2.0, reverse=reverse, k=k),
                         student, teacher, upstream)
    assert rel(ours[0], ref[0]) <= 1e-6 and rel(ours[1], ref[1]) <= 1e-6
    if k == 1:  # one token renormalised is probability 1 on both sides
        assert ours[0].abs().max() < 1e-7 and ours[1].abs().max() < 1e-7
    else:  # only the teacher's top-k tokens of each row receive gradient
        outside = torch.ones_like(student, dtype=torch.bool).scatter_(-1, teacher.topk(k, dim=-1).indices, False)
        assert (ours[1][outside] == 0).all()
    if k == SHAPE[-1]:  # the whole vocabulary is plain KL
        full = vocab_parallel_kl(student, teacher, temperature=2.0, reverse=reverse)
        assert rel(ours[0], full) <= 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_written_by_the_forward_equals_the_recomputed_one_bit_for_bit(temperature):
    """The forward KL writes its gradient during the forward pass and the first backward scales it;
    a second backward (retain_graph) recomputes it from the saved log-sum-exps as the reverse KL
    always does: the two must agree exactly, for an upstream gradient that is not all ones."""
    student = logits(7, 5, 64, dtype=torch.float32).requires_grad_(True)
    teacher, upstream = logits(7, 5, 64, dtype=torch.float32, seed=1), logits(7, 5, dtype=torch.float32, seed=2)
    loss = vocab_parallel_kl(student, teacher, temperature=temperature, chunk_size=3)
    (written,) = torch.autograd.grad(loss, student, upstream, retain_graph=True)
    (recomputed,) = torch.autograd.grad(loss, student, upstream)
    assert torch.equal(written, recomputed)
    assert rel(written, value_and_grad(lambda s, t: kl_reference(s, t, temperature=temperature), student.double(),
                                       teacher, upstream.double())[1]) <= 1e-5


def test_chunking_does_not_change_results():
    student, teacher = logits(7, 5, 64, dtype=torch.float32), logits(7, 5, 64, dtype=torch.float32, seed=1)
    upstream = logits(7, 5, seed=2)
    for reverse in (False, True):
        whole = value_and_grad(lambda s, t: vocab_parallel_kl(s, t, reverse=reverse, chunk_size=35), student, teacher,
                               upstream)
        for chunk in (1, 3, 8, 1000, None):
            part = value_and_grad(lambda s, t: vocab_parallel_kl(s, t, reverse=reverse, chunk_size=chunk), student,
                                  teacher, upstream)
            torch.testing.assert_close(part, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [vocab_parallel_kl, lambda s, t, **kw: top_k_kl(s, t, k=8, **kw)])
def test_bf16_logits(fn):
    """bf16 in: the math runs in fp32 on the same (rounded) values, so against a float64 reference of
    those values the loss is fp32-accurate; against the unrounded logits only bf16-accurate."""
    exact_student, exact_teacher = logits(*SHAPE, scale=2.0), logits(*SHAPE, seed=1, scale=2.0)
    student, teacher = exact_student.bfloat16(), exact_teacher.bfloat16()
    upstream = logits(*SHAPE[:-1], seed=2)
    ref_fn = kl_reference if fn is vocab_parallel_kl else lambda s, t: kl_reference(s, t, k=8)
    loss, grad = value_and_grad(lambda s, t: fn(s, t, chunk_size=4), student, teacher, upstream)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    ref_loss, ref_grad = value_and_grad(ref_fn, student.double(), teacher.double(), upstream)
    assert rel(loss, ref_loss) <= 1e-5
    assert rel(grad, ref_grad) <= 1e-2  # the gradient is rounded to bf16 on the way out (8 bits)
    assert rel(loss, ref_fn(exact_student, exact_teacher)) <= 5e-2


def test_student_equal_to_teacher_gives_zero_at_a_large_vocabulary():
    """A 256k padded vocabulary, spread-out logits: every form of the loss is ~0, and so is its gradient."""
    teacher = logits(4, 262144, dtype=torch.bfloat16, scale=8.0)
    for kwargs in ({}, {"reverse": True}, {"temperature": 2.0}):
        loss, grad = value_and_grad(lambda s, t: vocab_parallel_kl(s, t, **kwargs), teacher, teacher,
                                    torch.ones(4, dtype=torch.float64))
        assert loss.abs().max() < 1e-6 and grad.float().abs().max() < 1e-6, kwargs
    assert top_k_kl(teacher, teacher, k=64).abs().max() < 1e-6


def test_teacher_receives_no_gradient():
    student, teacher = logits(*SHAPE).requires_grad_(True), logits(*SHAPE, seed=1).requires_grad_(True)
    hidden_s, hidden_t = logits(4, 2, 6).requires_grad_(True), logits(4, 2, 6, seed=1).requires_grad_(True)
    total = (vocab_parallel_kl(student, teacher).sum() + vocab_parallel_kl(student, teacher, reverse=True).sum()
             + top_k_kl(student, teacher, k=4).sum() + hidden_cosine_loss(hidden_s, hidden_t).sum()
             + hidden_mse_loss(hidden_s, hidden_t).sum())
    total.backward()
    assert teacher.grad is None and hidden_t.grad is None
    assert student.grad.abs().sum() > 0 and hidden_s.grad.abs().sum() > 0


def test_hidden_losses_equal_references():
    student, teacher = logits(4, 2, 6).requires_grad_(True), logits(4, 2, 6, seed=1)
    cos = hidden_cosine_loss(student, teacher)
    dot = (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
    assert cos.shape == (4, 2)
    torch.testing.assert_close(cos, (1 - dot).float())
    torch.testing.assert_close(hidden_mse_loss(student, teacher), ((student - teacher) ** 2).mean(-1).float())
    # cosine ignores scale (the reason to prefer it across layers of different norms); MSE does not
    assert hidden_cosine_loss(3.0 * teacher, teacher).abs().max() < 1e-6
    assert hidden_cosine_loss(-teacher, teacher).sub(2).abs().max() < 1e-6
    assert hidden_mse_loss(teacher, teacher).abs().max() == 0


def test_masked_tokens_are_excluded():
    student, teacher = logits(*SHAPE), logits(*SHAPE, seed=1)
    mask = torch.rand(SHAPE[:-1], generator=torch.Generator().manual_seed(3)) > 0.4
    student = student.requires_grad_(True)
    per_token = vocab_parallel_kl(student, teacher)
    total, count = masked_sum(per_token, mask)
    total.backward()
    assert int(count) == int(mask.sum()) and count.dtype == torch.int32
    torch.testing.assert_close(total, kl_reference(student, teacher)[mask].sum().float())
    assert (student.grad[~mask] == 0).all() and (student.grad[mask] != 0).any()


def test_fully_masked_micro_batch_gives_zero_and_finite_zero_grads():
    student = logits(*SHAPE).requires_grad_(True)
    hidden = logits(5, 3, 6).requires_grad_(True)
    mask = torch.zeros(SHAPE[:-1])
    total, count = masked_sum(vocab_parallel_kl(student, logits(*SHAPE, seed=1)), mask)
    total_h, _ = masked_sum(hidden_cosine_loss(hidden, torch.zeros(5, 3, 6)), mask)  # 0/0 cosine at zero teacher
    (total + total_h).backward()
    assert total.item() == 0 and count.item() == 0 and total_h.item() == 0
    assert torch.equal(student.grad, torch.zeros_like(student)) and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_masked_sum_keeps_nan_at_masked_positions_out():
    loss = torch.tensor([[1.0, float("nan")], [2.0, float("inf")]], requires_grad=True)
    total, count = masked_sum(loss, torch.tensor([[1, 0], [1, 0]]))
    total.backward()
    assert total.item() == 3.0 and count.item() == 2
    assert torch.equal(loss.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


@pytest.mark.parametrize("call, message", [
    (lambda: vocab_parallel_kl(torch.zeros(2, 4), torch.zeros(2, 5)), "differ in shape"),
    (lambda: vocab_parallel_kl(torch.zeros(2, 4), torch.zeros(2, 4), temperature=0.0), "temperature"),
    (lambda: vocab_parallel_kl(torch.zeros(2, 4), torch.zeros(2, 4), chunk_size=0), "chunk_size"),
    (lambda: top_k_kl(torch.zeros(2, 4), torch.zeros(2, 4), k=5), "k must be"),
    (lambda: hidden_cosine_loss(torch.zeros(2, 3), torch.zeros(2, 4)), "map the student"),
    (lambda: masked_sum(torch.zeros(3, 2), torch.ones(2, 3)), "transpose"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_reported_cross_entropy_equals_torch(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(*SHAPE, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=g)
    expected = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), reduction="none")
    for chunk_size in (None, 1, 4):
        got = losses.reported_cross_entropy(logits, labels, chunk_size=chunk_size)
        assert got.dtype == torch.float32 and got.shape == labels.shape
        torch.testing.assert_close(got.double().flatten(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"labels \(5, 2\) do not match logits \(5, 3, 37\)"):
        losses.reported_cross_entropy(logits, labels[:, :2])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_kl_and_lm_is_the_kl_and_the_cross_entropy(reverse, temperature, dtype):
    """The LM loss that rides on the KL's pass is torch's cross entropy at τ = 1 (whatever τ the KL takes),
    and the KL and its gradient stay bit for bit those of vocab_parallel_kl."""
    g = torch.Generator().manual_seed(4)
    student, teacher = (logits(*SHAPE, seed=seed).to(dtype) for seed in (5, 6))
    upstream = logits(*SHAPE[:-1], seed=7)
    labels = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=g)
    expected = torch.nn.functional.cross_entropy(student.double().flatten(0, 1), labels.flatten(), reduction="none")
    for chunk_size in (None, 1, 4):
        options = dict(temperature=temperature, reverse=reverse, chunk_size=chunk_size)
        kl, grad = value_and_grad(lambda s, t: vocab_parallel_kl(s, t, **options), student, teacher, upstream)
        leaf = student.detach().clone().requires_grad_(True)
        kl_too, lm = losses.vocab_parallel_kl_and_lm(leaf, teacher, labels, **options)
        (kl_too * upstream).sum().backward()
        assert torch.equal(kl_too.detach(), kl) and torch.equal(leaf.grad, grad)
        assert lm.dtype == torch.float32 and lm.shape == labels.shape and not lm.requires_grad
        torch.testing.assert_close(lm.double().flatten(), expected, rtol=1e-6, atol=1e-6)
        with torch.no_grad():  # as in validation: no gradient buffer, the same LM loss
            assert torch.equal(losses.vocab_parallel_kl_and_lm(student, teacher, labels, **options)[1], lm)
    with pytest.raises(ValueError, match=r"labels \(5, 2\) do not match student logits \(5, 3, 37\)"):
        losses.vocab_parallel_kl_and_lm(student, teacher, labels[:, :2])
