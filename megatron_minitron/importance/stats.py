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


def sequence_moments(x: torch.Tensor, work: Optional[torch.Tensor] = None,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The activation-sized part of `sequence_sums`, for one chunk of the sequence of a megatron
    activation [seq, batch, channels]: fp32 [3, batch * channels] (written to `out` when given)
    holding, per sample and channel, the mean over the chunk, the variance about that mean, and the
    sum of |x|.

    The mean and variance come from the batch-norm statistics kernel (`torch.batch_norm_update_stats`
    on the [seq, batch * channels] view: one pass for the means, one for the squares about them, both
    vectorised over the contiguous channels). The variance about the chunk's own mean keeps the
    variance of large-mean channels, which a plain fp32 sum of squares would lose to cancellation.
    On one CPU thread at [256, 4, 384] this function takes about 190 us, where the fp32 sums of
    shifted values, squares and |x| it replaced took 340 us. Everything touching the full activation
    stays fp32, and it runs four operations: each has a fixed cost, so the small fp64 steps that
    follow run batched over many calls, later (`partial_sums`, `whole_sequence_aggregates`).

    work: a contiguous fp32 tensor of x's shape for |x| (overwritten), else a fresh one. The hooks pass
    one buffer they keep: a fresh activation-sized tensor can be fresh pages from the kernel, and once
    the allocator had handed such memory back, faulting it in cost 3x the arithmetic."""
    x = x if x.dtype == torch.float32 else x.float()
    x = x.view(x.shape[0], -1) if x.is_contiguous() else x.reshape(x.shape[0], -1)
    out = torch.empty(3, x.shape[1], dtype=torch.float32, device=x.device) if out is None else out
    if x.shape[0] == 0:  # an empty chunk contributes nothing
        return out.zero_()
    work = torch.empty(x.shape, dtype=torch.float32, device=x.device) if work is None else work.view(x.shape)
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    out[0].copy_(mean)
    out[1].copy_(var)
    torch.sum(torch.abs(x, out=work), 0, out=out[2])
    return out


def sequence_partials(x: torch.Tensor, work: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`sequence_moments` as [3, batch, channels]: mean, variance about it, sum |x|."""
    return sequence_moments(x, work).view(3, *x.shape[1:])


def partial_sums(partials: torch.Tensor, n) -> torch.Tensor:
    """From `sequence_partials` [..., 3, batch, channels] of chunks of n tokens (an int, or a tensor
    broadcasting against [..., batch, channels]) to fp64 sums [..., batch, channels, 3]: sum x,
    sum x^2, sum |x|. Sums of the chunks of a sequence add up to the sums of the whole sequence."""
    mean, var, absolute = partials.double().unbind(-3)
    return torch.stack([n * mean, n * (var + mean.square()), absolute], dim=-1)


def sequence_sums(x: torch.Tensor, work: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample sums over the sequence (or a chunk of it) of a megatron activation [seq, batch,
    channels]: [batch, channels, 3] holding sum x, sum x^2 and sum |x| as fp64 values."""
    return partial_sums(sequence_partials(x, work), x.shape[0])


def sequence_aggregates(sums: torch.Tensor, seq_length: int, *, dim: int = -1) -> torch.Tensor:
    """From full-sequence sums [batch, channels, 3] to the per-sample seq aggregations
    [batch, channels, 3] in AGGREGATIONS order: mean|x|, L2, variance. `dim`: the axis of the three
    sums and of the result's three values, when not the last (a contiguous channel axis after it
    keeps every operation vectorised)."""
    total, square, absolute = sums.unbind(dim)
    mean = total / seq_length
    var = (square / seq_length - mean.square()).clamp(min=0)
    return torch.stack([absolute / seq_length, square.clamp(min=0).sqrt(), var], dim=dim)


def whole_sequence_aggregates(partials: torch.Tensor, seq_length) -> torch.Tensor:
    """`sequence_aggregates` straight from the `sequence_partials` [..., 3, batch, channels] of whole
    sequences of seq_length tokens (an int, or a tensor broadcasting against [..., batch, channels]),
    without the sums: [..., batch, channels, 3] fp64. Fewer operations, and the variance is the one
    computed about the sequence's own mean."""
    mean, var, absolute = partials.double().unbind(-3)
    return torch.stack([absolute / seq_length, (seq_length * (var + mean.square())).sqrt(), var], dim=-1)


def raw_update(seq_values: torch.Tensor, *, batch: int = 0, dim: int = -1) -> torch.Tensor:
    """The contribution of one micro-batch [batch, ..., channels, 3] to the raw statistics [..., channels, 6].
    `batch` and `dim`: the axes of the samples and of the three aggregations, when elsewhere; the six
    statistics take the aggregations' place among the remaining axes."""
    seq_values = seq_values.double()
    batch, dim = batch % seq_values.dim(), dim % seq_values.dim()
    dim -= batch < dim  # the aggregations' axis once the samples are summed away
    out = torch.stack([seq_values.sum(batch), seq_values.square().sum(batch)], dim=dim + 1)  # [..., 3, 2, ...]
    return out.flatten(dim, dim + 1)


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
