"""The KL's extra memory is bounded by the chunk, not by the number of tokens (CPU allocator events
recorded by torch.profiler); the forward KL's gradient buffer, written during the forward pass, is
allocated only when autograd will want it."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_minitron.distill.losses import top_k_kl, vocab_parallel_kl

VOCAB = 4096


def peak_bytes(fn) -> int:
    """Highest net allocation while fn runs, from the profiler's allocation/free events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocations: the measurement itself is broken"
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def bf16_logits(tokens: int):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(tokens, VOCAB, generator=g).bfloat16().requires_grad_(True)
    return student, torch.randn(tokens, VOCAB, generator=g).bfloat16()


@pytest.mark.parametrize("reverse", [False, True])
def test_peak_memory_follows_the_chunk_not_the_tokens(reverse):
    chunk, chunk_bytes = 16, 16 * VOCAB * 4  # one fp32 chunk x V array
    for tokens in (256, 1024):
        student, teacher = bf16_logits(tokens)
        vocab_parallel_kl(student, teacher, chunk_size=chunk, reverse=reverse).sum().backward()  # warm up
        forward = peak_bytes(lambda: vocab_parallel_kl(student, teacher, chunk_size=chunk, reverse=reverse))
        both = peak_bytes(lambda: vocab_parallel_kl(student, teacher, chunk_size=chunk,
                                                    reverse=reverse).sum().backward())

        def without_autograd():
            with torch.no_grad():
                vocab_parallel_kl(student, teacher, chunk_size=chunk, reverse=reverse)

        evaluation = peak_bytes(without_autograd)
        grad_bytes = student.numel() * student.element_size()  # the gradient itself is unavoidable
        per_token = 64 * tokens  # [2, N] statistics, the loss, its gradient
        held = 0 if reverse else grad_bytes  # the forward KL writes its gradient in the forward pass
        assert forward <= held + 5 * chunk_bytes + per_token, (tokens, forward)
        assert evaluation <= 5 * chunk_bytes + per_token, (tokens, evaluation)  # no gradient without autograd
        assert both <= grad_bytes + 5 * chunk_bytes + per_token, (tokens, both)
    unchunked = peak_bytes(lambda: vocab_parallel_kl(student, teacher, chunk_size=tokens, reverse=reverse))
    assert unchunked >= 3 * tokens * VOCAB * 4  # the same code without chunks holds whole fp32 copies


def test_top_k_never_makes_a_vocabulary_sized_fp32_copy():
    student, teacher = bf16_logits(1024)
    top_k_kl(student, teacher, k=32, chunk_size=16).sum().backward()
    forward = peak_bytes(lambda: top_k_kl(student, teacher, k=32, chunk_size=16))
    assert forward <= 1024 * 32 * 4 * 16  # a few [N, k] arrays
