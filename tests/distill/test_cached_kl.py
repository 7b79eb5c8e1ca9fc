"""The KL against cached teacher targets (distill/cached_kl.py), single process: with K = the vocabulary it is
online distillation's KL (values and gradients); with K < V it is the K + 1-bin KL computed by autograd from a
float64 log-softmax; the targets themselves are the teacher's sorted top-k and the exact remaining mass."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.distill.cached_kl import cached_kl, teacher_top_k
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
