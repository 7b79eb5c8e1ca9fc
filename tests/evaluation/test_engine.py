"""The engine's pure parts: right padding, a continuation's log-probability, sharing rows among replicas."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.evaluation.engine import ScoreRow, continuation_score, longest_first, pad_batch, share


def test_continuation_score_equals_a_direct_sum():
    torch.manual_seed(0)
    tokens = (5, 1, 7, 3, 2, 6)
    logits = torch.randn(len(tokens) - 1, 9)
    logprob, greedy = continuation_score(logits, ScoreRow(tokens=tokens, continuation=2))
    expected = sum(torch.log_softmax(logits[i - 1], -1)[tokens[i]] for i in (4, 5))
    assert logprob == pytest.approx(float(expected), rel=1e-6)
    assert greedy == all(int(logits[i - 1].argmax()) == tokens[i] for i in (4, 5))
    forced = logits.clone()
    forced[3, 2] = forced[4, 6] = 100.0
    assert continuation_score(forced, ScoreRow(tokens=tokens, continuation=2))[1] is True


def test_pad_batch_rounds_up_to_the_multiple():
    batch = pad_batch([[1, 2, 3], [4]], multiple=2, pad=0)
    assert batch.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]


def test_every_row_has_exactly_one_replica():
    order = longest_first([3, 9, 1, 9, 4])
    assert order == [1, 3, 4, 0, 2]
    shares = [share(len(order), rank, 3) for rank in range(3)]
    assert sorted(p for s in shares for p in s) == list(range(5))
