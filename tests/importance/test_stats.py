"""The streaming statistics reproduce the 3x3 aggregation grid computed from stored activations,
whatever the micro-batching and however the sequence is split (sequence parallelism)."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_minitron.importance import stats


def _stream(activations: torch.Tensor, micro_batch: int, seq_chunks: int) -> torch.Tensor:
    """Raw statistics of activations [samples, seq, channels] fed micro-batch by micro-batch, each
    seen as `seq_chunks` sequence slices whose partial sums are added (what SP does over TP)."""
    n, s, c = activations.shape
    raw = torch.zeros(c, stats.RAW_WIDTH, dtype=torch.float64)
    for start in range(0, n, micro_batch):
        x = activations[start:start + micro_batch].transpose(0, 1)  # megatron's [s, b, c]
        # through a reused work buffer holding another chunk's leftovers, as the hooks call it
        work = torch.full((s, x.shape[1], c), float("nan"))
        sums = sum(stats.sequence_sums(chunk, work[:len(chunk)]) for chunk in x.chunk(seq_chunks, dim=0))
        raw += stats.raw_update(stats.sequence_aggregates(sums, s))
    return raw


@pytest.mark.parametrize("seq, batch", list(itertools.product(stats.AGGREGATIONS, stats.AGGREGATIONS)))
def test_streamed_statistics_equal_the_definition(seq, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 16, 7, generator=g) * torch.linspace(0.1, 3, 7) + torch.linspace(-1, 1, 7)
    expected = stats.reference_scores(x, seq=seq, batch=batch)
    for micro_batch, chunks in ((1, 1), (3, 2), (10, 4)):
        got = stats.aggregate(_stream(x, micro_batch, chunks), 10, seq=seq, batch=batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_whole_sequence_aggregates_skip_the_sums_and_agree():
    """The hooks' shortcut for unsplit sequences equals the aggregates of the sums, including the
    variance of a channel whose mean is 1e3 times its spread (where fp32 squares would cancel)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 5, generator=g) * torch.tensor([1.0, 0.1, 1e-3, 2.0, 0.5])
    x = x + torch.tensor([0.0, 5.0, 1.0, -3.0, 0.2])
    partials = stats.sequence_partials(x)
    expected = stats.sequence_aggregates(stats.partial_sums(partials, 64), 64)
    got = stats.whole_sequence_aggregates(partials, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    exact = x.double().var(0, unbiased=False)
    torch.testing.assert_close(got[..., 2], exact, rtol=1e-4, atol=0)


def test_aggregations_along_other_axes_equal_the_channel_last_ones():
    """The expert statistics' layout (samples and aggregations before a last, contiguous channel
    axis) gives the same numbers as the default [batch, ..., channels, 3] one, moved."""
    g = torch.Generator().manual_seed(2)
    sums = torch.rand(2, 3, 4, 3, 7, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 1.0])[:, None]
    sums[..., 0, :] -= 0.5  # sum x may be negative, sum x^2 and sum |x| not
    seq = stats.sequence_aggregates(sums, 5, dim=3)
    expected_seq = stats.sequence_aggregates(sums.movedim(3, -1), 5)
    torch.testing.assert_close(seq.movedim(3, -1), expected_seq, rtol=1e-12, atol=0)
    got = stats.raw_update(seq, batch=2, dim=3)  # [2, 3, 6, 7]
    expected = stats.raw_update(expected_seq.movedim(2, 0))  # samples first, aggregations last: [2, 3, 7, 6]
    torch.testing.assert_close(got.movedim(2, -1), expected, rtol=1e-12, atol=0)


def test_the_paper_default_ranks_channels_by_mean_then_l2():
    """seq = mean|x|, batch = L2: a channel with larger |activations| in every sample ranks higher."""
    x = torch.ones(4, 8, 3) * torch.tensor([0.5, -2.0, 1.0])
    scores = stats.aggregate(_stream(x, 2, 1), 4)
    assert torch.argsort(scores, descending=True).tolist() == [1, 2, 0]
    torch.testing.assert_close(scores, torch.tensor([0.5, 2.0, 1.0]) * 2)  # sqrt(4 samples) = 2


def test_unknown_aggregation_is_named():
    with pytest.raises(ValueError, match="batch aggregation 'median' is unknown; choose one of mean, l2, var"):
        stats.aggregate(torch.zeros(3, 6), 2, batch="median")
