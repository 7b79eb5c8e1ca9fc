"""Deterministic random-token micro-batches for multi-rank tests: sample i is the same tensor
whatever the data-parallel layout, so layouts can be compared step for step."""

from __future__ import annotations

from typing import Iterator

import torch


def sample(index: int, seq_length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Tokens [seq_length + 1] of global sample `index`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randint(0, vocab, (seq_length + 1,), generator=g)


def example(index: int, seq_length: int, vocab: int, seed: int = 0) -> dict:
    """Global sample `index` in megatron's GPTDataset form (tokens, labels, loss_mask, position_ids)."""
    toks = sample(index, seq_length, vocab, seed)
    return {"tokens": toks[:-1], "labels": toks[1:], "loss_mask": torch.ones(seq_length),
            "position_ids": torch.arange(seq_length)}


def examples(count: int, seq_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Samples 0..count-1 in GPTDataset form."""
    return [example(i, seq_length, vocab, seed) for i in range(count)]


def batches(start: int, *, micro_batch_size: int, dp_rank: int, dp_size: int, seq_length: int, vocab: int,
            seed: int = 0) -> Iterator[dict]:
    """This DP rank's micro-batches: each global step of micro_batch_size x dp_size consecutive
    samples gives rank r the slice [r*mbs, (r+1)*mbs) (megatron's pretraining sampler)."""
    index = start
    while True:
        first = index + dp_rank * micro_batch_size
        toks = torch.stack([sample(first + j, seq_length, vocab, seed) for j in range(micro_batch_size)])
        yield {"tokens": toks[:, :-1], "labels": toks[:, 1:], "loss_mask": torch.ones(micro_batch_size, seq_length),
               "position_ids": torch.arange(seq_length).expand(micro_batch_size, seq_length)}
        index += micro_batch_size * dp_size
