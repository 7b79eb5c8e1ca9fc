"""The KL against cached teacher targets (distill/cached_kl.py), single process: with K = the vocabulary it is
online distillation's KL (values and gradients); with K < V it is the K + 1-bin KL computed by autograd from a
float64 log-softmax; the targets themselves are the teacher's sorted top-k and the exact remaining mass."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.distill.cached_kl import cached_kl, cached_kl_and_lm, teacher_top_k
from megatron_minitron.distill.losses import vocab_parallel_kl

SHAPE = (5, 3, 40)


def _logits(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*SHAPE, generator=g, dtype=torch.float64).mul_(3).to(dtype) for _ in range(2)]


def binned_reference(student, teacher, k, *, temperature=1.0, reverse=False):
    """K + 1-bin KL by autograd: the teacher's top-k tokens each a bin, everything else one bin."""
    log_s = (student.double() / temperature).log_softmax(-1)
    log_t = (teacher.double() / temperature).log_softmax(-1)
    top = log_t.topk(k, dim=-1).indices
    rest = torch.ones_like(log_s, dtype=torch.bool).scatter_(-1, top, False)

    def bins(log_p):
        outside = torch.where(rest, log_p, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([log_p.gather(-1, top), outside], dim=-1)

    s_bins, t_bins = bins(log_s), bins(log_t)
    p, q = (s_bins, t_bins) if reverse else (t_bins, s_bins)
    return torch.where(p > float("-inf"), p.exp() * (p - q), 0.0).sum(-1)


def test_top_k_is_sorted_with_the_exact_rest():
    _, teacher = _logits()
    ids, logp, log_rest = teacher_top_k(teacher, k=7, temperature=2.0, chunk_size=4)
    log_t = (teacher / 2.0).log_softmax(-1)
    assert torch.equal(ids, log_t.topk(7, dim=-1).indices)
    assert torch.allclose(logp.double(), log_t.gather(-1, ids), atol=1e-6)
    rest = 1 - log_t.gather(-1, ids).exp().sum(-1)
    assert torch.allclose(log_rest.double().exp(), rest, rtol=1e-5)


def test_ties_are_broken_by_the_smaller_id():
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0, 5.0, -1.0]])
    ids, _, _ = teacher_top_k(logits, k=4)
    assert ids.tolist() == [[1, 3, 4, 2]]


def test_the_whole_vocabulary_leaves_no_rest():
    _, teacher = _logits()
    _, logp, log_rest = teacher_top_k(teacher, k=SHAPE[-1])
    assert torch.isneginf(log_rest).all()
    assert torch.allclose(logp.exp().sum(-1).double(), torch.ones(SHAPE[:-1], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_with_k_equal_to_the_vocabulary_it_is_the_online_kl(reverse):
    student, teacher = _logits(torch.float32)
    targets = teacher_top_k(teacher, k=SHAPE[-1])
    upstream = torch.randn(SHAPE[:-1], generator=torch.Generator().manual_seed(3))
    results = []
    for fn in (lambda s: cached_kl(s, *targets, reverse=reverse, chunk_size=4),
               lambda s: vocab_parallel_kl(s, teacher, reverse=reverse, chunk_size=4)):
        s = student.clone().requires_grad_(True)
        loss = fn(s)
        (loss * upstream).sum().backward()
        results.append((loss.detach(), s.grad))
    (cached, cached_grad), (online, online_grad) = results
    # the same fp32 operations in the same order (the KL summed by token id, as online): bit for bit
    assert torch.equal(cached, online)
    assert torch.equal(cached_grad, online_grad)


@pytest.mark.parametrize("k,reverse,temperature", [(1, False, 1.0), (7, False, 2.0), (7, True, 1.0),
                                                   (39, True, 0.5)])
def test_top_k_with_the_rest_term_matches_autograd(k, reverse, temperature):
    student, teacher = _logits()
    targets = teacher_top_k(teacher, k=k, temperature=temperature)
    upstream = torch.randn(SHAPE[:-1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s = student.clone().requires_grad_(True)
    loss = cached_kl(s, *targets, temperature=temperature, reverse=reverse, scale_by_temperature_squared=True,
                     chunk_size=4)
    (loss * upstream).sum().backward()
    r = student.clone().requires_grad_(True)
    ref = binned_reference(r, teacher, k, temperature=temperature, reverse=reverse) * temperature**2
    (ref * upstream).sum().backward()
    # the cached log-probabilities are fp32: ~1e-7 relative on the targets
    assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert (s.grad - r.grad).abs().max() <= 1e-5 * r.grad.abs().max()
    assert (ref > 0).all()


def test_mismatched_targets_are_refused():
    student, teacher = _logits()
    ids, logp, rest = teacher_top_k(teacher[:2], k=3)
    with pytest.raises(ValueError, match="do not match student logits"):
        cached_kl(student, ids, logp, rest)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_lm_loss_from_the_same_pass_is_the_cross_entropy(temperature):
    """The student's LM loss (temperature 1 whatever the KL's τ) against log_softmax in float64; the KL is
    cached_kl's, and the LM loss carries no gradient."""
    student, teacher = _logits(torch.float32)
    targets = teacher_top_k(teacher, k=7, temperature=temperature)
    labels = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=torch.Generator().manual_seed(5))
    s = student.clone().requires_grad_(True)
    kl, lm = cached_kl_and_lm(s, *targets, labels, temperature=temperature, chunk_size=4)
    expected = -student.double().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lm.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(kl.detach(), cached_kl(student, *targets, temperature=temperature, chunk_size=4))
    assert not lm.requires_grad and kl.requires_grad


@pytest.mark.parametrize("reverse", [False, True])
def test_a_sequence_first_gradient_is_the_same_gradient_laid_out_for_the_output_layer(reverse):
    """GPTModel returns [b, s, V] logits as a transposed copy of its output layer's [s, b, V]: with
    sequence_first the gradient reaching the output layer is contiguous (no copy in its backward) and holds
    the same values, bit for bit."""
    g = torch.Generator().manual_seed(6)
    output = torch.randn(3, 5, 40, generator=g).mul_(3)  # [s, b, V]
    targets = teacher_top_k(torch.randn(5, 3, 40, generator=g), k=7)
    upstream = torch.randn(5, 3, generator=g)
    grads = []
    for sequence_first in (False, True):
        out = output.clone().requires_grad_(True)
        seen = []
        out.register_hook(lambda grad: seen.append(grad))
        kl, _ = cached_kl_and_lm(out.transpose(0, 1).contiguous(), *targets, torch.zeros(5, 3, dtype=torch.long),
                                 reverse=reverse, chunk_size=2, sequence_first=sequence_first)
        (kl * upstream).sum().backward()
        grads.append(seen[0])
    assert grads[1].is_contiguous()
    assert torch.equal(grads[0], grads[1])


def test_a_16_bit_student_gets_the_gradient_to_its_precision():
    """bf16 logits: the values of an fp32 run on the same (rounded) logits, the gradient to bf16 rounding
    (stored before the upstream scale, one rounding more than online's)."""
    student, teacher = _logits(torch.float32)
    targets = teacher_top_k(teacher, k=7)
    upstream = torch.randn(SHAPE[:-1], generator=torch.Generator().manual_seed(7))
    runs = []
    for dtype in (torch.bfloat16, torch.float32):
        s = student.to(torch.bfloat16).to(dtype).requires_grad_(True)
        loss = cached_kl(s, *targets, chunk_size=4)
        (loss * upstream).sum().backward()
        runs.append((loss.detach(), s.grad))
    (loss16, grad16), (loss32, grad32) = runs
    assert grad16.dtype == torch.bfloat16 and torch.equal(loss16, loss32)
    assert (grad16.float() - grad32).abs().max() <= 2 * 2**-8 * grad32.abs().max()


def test_a_second_backward_is_refused():
    student, teacher = _logits(torch.float32)
    s = student.clone().requires_grad_(True)
    loss = cached_kl(s, *teacher_top_k(teacher, k=3)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
