"""Activation statistics and their aggregation: plain tensor math, no processes, no megatron.

An importance score of a channel (a head, a neuron, a hidden channel) aggregates its activations
first over the sequence of each sample, then over the samples of the calibration set, each with one
of mean(|x|), L2 or variance (the Minitron paper's 3x3 grid, its Table 11). To let any of the nine
combinations be chosen after the forward passes, the collectors keep for each channel and each
sequence aggregation the sum and the sum of squares of the per-sample values over the batch:

    raw[..., 2*k]     = sum over samples of seq_k(sample)
    raw[..., 2*k + 1] = sum over samples of seq_k(sample)^2        k = 0 mean|x|, 1 l2, 2 var

Batch mean|.|, L2 and variance all follow from these two sums (seq values are never negative, so
mean|s| = mean s). The memory is 6 numbers per channel, whatever the number of tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

AGGREGATIONS = ("mean", "l2", "var")
"""Names of the aggregations, in the order of the raw statistics' last axis (seq) / batch."""
RAW_WIDTH = 2 * len(AGGREGATIONS)


def check_aggregation(name: str, *, axis: str) -> int:
    """Index of an aggregation name; a clear error for anything else."""
    if name not in AGGREGATIONS:
        raise ValueError(f"{axis} aggregation {name!r} is unknown; choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS.index(name)


def sequence_sums(x: torch.Tensor, work: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample sums over the sequence of a megatron activation [seq, batch, channels]:
    [batch, channels, 3] holding sum x, sum x^2 and sum |x| as fp64 values. Partial sums over
    sequence chunks (sequence parallelism) add up to the full-sequence sums.

    The variance over the sequence is later a difference of the first two, so the squares are summed
    about a shift (the chunk's first token, a typical value: no extra pass to find a mean) and moved
    back to zero in fp64, instead of a plain fp32 sum of squares that would lose the variance of
    large-mean channels to cancellation. Everything touching the full activation stays fp32 (a cast
    of it to fp64 alone would triple the hooks' cost).

    work: a contiguous fp32 tensor of x's shape to compute in (overwritten), else a fresh one. The
    hooks pass one buffer they keep: a fresh activation-sized tensor can be fresh pages from the
    kernel, and once the allocator had handed such memory back, faulting it in made this function
    3x slower than its arithmetic ([256, 4, 256] on one CPU thread: 1.4 ms against 0.4 ms; in a
    process where the allocator keeps the memory, the buffer saves about 5%)."""
    x = x.float()
    work = torch.empty(x.shape, dtype=torch.float32, device=x.device) if work is None else work
    n, shift = x.shape[0], x[0]
    torch.sub(x, shift, out=work)
    below = work.sum(0).double()
    work.square_()
    squares = work.sum(0).double()
    torch.abs(x, out=work)
    absolute = work.sum(0).double()
    shift = shift.double()
    squares += 2 * shift * below + n * shift.square()
    return torch.stack([below + n * shift, squares, absolute], dim=-1)


def sequence_aggregates(sums: torch.Tensor, seq_length: int) -> torch.Tensor:
    """From full-sequence sums [batch, channels, 3] to the per-sample seq aggregations
    [batch, channels, 3] in AGGREGATIONS order: mean|x|, L2, variance."""
    total, square, absolute = sums.unbind(-1)
    mean = total / seq_length
    var = (square / seq_length - mean.square()).clamp(min=0)
    return torch.stack([absolute / seq_length, square.clamp(min=0).sqrt(), var], dim=-1)


def raw_update(seq_values: torch.Tensor) -> torch.Tensor:
    """The contribution of one micro-batch [batch, ..., channels, 3] to the raw statistics [..., channels, 6]."""
    seq_values = seq_values.double()
    out = torch.stack([seq_values.sum(0), seq_values.square().sum(0)], dim=-1)  # [..., channels, 3, 2]
    return out.flatten(-2)


def aggregate(raw: torch.Tensor, num_samples: int, *, seq: str = "mean", batch: str = "l2") -> torch.Tensor:
    """Scores [...] from raw statistics [..., 6] of num_samples samples."""
    k = check_aggregation(seq, axis="sequence")
    b = check_aggregation(batch, axis="batch")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    total, square = raw[..., 2 * k].double(), raw[..., 2 * k + 1].double()
    if b == 0:
        return (total / num_samples).float()
    if b == 1:
        return square.clamp(min=0).sqrt().float()
    mean = total / num_samples
    return (square / num_samples - mean.square()).clamp(min=0).float()


def reference_scores(activations: torch.Tensor, *, seq: str = "mean", batch: str = "l2") -> torch.Tensor:
    """Scores computed directly from stored activations [samples, seq, channels] (for tests and
    small models): the definition the streaming statistics must reproduce."""
    x = activations.double()
    per_sample = {"mean": x.abs().mean(1), "l2": x.square().sum(1).sqrt(), "var": x.var(1, unbiased=False)}[seq]
    return {"mean": per_sample.mean(0), "l2": per_sample.square().sum(0).sqrt(),
            "var": per_sample.var(0, unbiased=False)}[batch].float()
