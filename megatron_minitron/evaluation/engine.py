"""Scoring and greedy generation of token sequences with a megatron model at any TP/PP/EP/DP.

One process drives: global rank 0 holds the requests (lm-eval runs there only). For each call it
broadcasts the work over the control group; every replica (a data-parallel one, or a whole
expert-parallel group of a Mixture-of-Experts model, whose ranks exchange tokens and so must run the
same batches) takes an interleaved share of the rows, sorted longest first so the shares and the
batches inside them are balanced and little padding is wasted; each replica runs its share in batches
through megatron's forward schedule; the first tensor- and expert-parallel rank of each replica's last
pipeline stage sends its results back to the driver. The other ranks wait in `follow()` until the
driver calls `stop()`.

The pure parts (padding, the log-probability of a continuation, sharing rows) need no process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

STOP, SCORE, GENERATE = "stop", "score", "generate"
"""Commands the driver broadcasts."""


@dataclass(frozen=True, kw_only=True)
class ScoreRow:
    """One sequence whose last tokens are scored."""

    tokens: tuple[int, ...]
    """Context then continuation, already cut to at most max_length + 1 tokens (the last one is only a target)."""
    continuation: int
    """How many trailing tokens are scored (at least 1)."""


@dataclass(frozen=True, kw_only=True)
class GenerationRow:
    """One greedy generation."""

    context: tuple[int, ...]
    """Prompt tokens (at least 1)."""
    max_new_tokens: int
    """Stop after this many new tokens."""
    stop: tuple[str, ...] = ()
    """Stop once the decoded new text contains one of these strings."""


def share(count: int, rank: int, size: int) -> list[int]:
    """Positions (into a longest-first order) that data-parallel replica `rank` of `size` handles."""
    return list(range(rank, count, size))


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices sorted by length, longest first (ties keep their order): batches of similar lengths."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def pad_batch(sequences: Sequence[Sequence[int]], *, multiple: int, pad: int) -> torch.Tensor:
    """[batch, length] right-padded with `pad` to the longest sequence rounded up to `multiple`. Right padding
    leaves every real position's causal logits unchanged."""
    longest = max(len(s) for s in sequences)
    longest = -(-longest // multiple) * multiple
    out = torch.full((len(sequences), longest), pad, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def continuation_score(logits: torch.Tensor, row: ScoreRow) -> tuple[float, bool]:
    """(sum of log-probabilities of the row's continuation, whether each continuation token is the argmax),
    from the logits [length, vocab] of the row's input tokens (row.tokens[:-1])."""
    n, k = len(row.tokens) - 1, row.continuation
    targets = torch.tensor(row.tokens[n + 1 - k:], dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits[n - k:n].float(), dim=-1)
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    return float(picked.sum()), bool((logprobs.argmax(-1) == targets).all())


class Engine:
    """A loaded model and its process groups; `score`/`generate` on the driver, `follow` elsewhere."""

    def __init__(self, *, model, runtime, control_group, vocab_size: int, batch_size: int, max_length: int, pad: int,
                 eod: int, detokenize: Callable[[Sequence[int]], str]) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model, self.runtime, self.control_group = model, runtime, control_group
        self.vocab_size, self.batch_size, self.max_length = vocab_size, batch_size, max_length
        self.pad, self.eod, self.detokenize = pad, eod, detokenize
        pp_size = runtime.parallel.pipeline_parallel
        self._last_stage_rank = (torch.distributed.get_global_rank(runtime.pp_group, pp_size - 1)
                                 if pp_size > 1 else runtime.rank)

    @property
    def is_driver(self) -> bool:
        return self.runtime.rank == 0

    # ------------------------------------------------------------------------------------ driver side
    def score(self, rows: Sequence[ScoreRow]) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each row, in order (driver only)."""
        for row in rows:
            if row.continuation < 1 or len(row.tokens) - 1 > self.max_length or row.continuation >= len(row.tokens):
                raise ValueError(f"a scoring row needs 1 <= continuation < len(tokens) <= max_length + 1 "
                                 f"({self.max_length + 1}); got {row.continuation} of {len(row.tokens)} tokens")
        return self._dispatch(SCORE, list(rows))

    def generate(self, rows: Sequence[GenerationRow]) -> list[list[int]]:
        """The greedy new tokens of each row, in order (driver only)."""
        for row in rows:
            if not row.context or len(row.context) >= self.max_length:
                raise ValueError(f"a generation context needs 1 to {self.max_length - 1} tokens, got "
                                 f"{len(row.context)}")
        return self._dispatch(GENERATE, list(rows))

    def stop(self) -> None:
        """Release the followers (driver only)."""
        torch.distributed.broadcast_object_list([(STOP, None)], src=0, group=self.control_group)

    # ------------------------------------------------------------------------------------ every rank
    def follow(self) -> None:
        """Serve the driver's commands until it stops (every rank but the driver)."""
        while True:
            message = [None]
            torch.distributed.broadcast_object_list(message, src=0, group=self.control_group)
            command, rows = message[0]
            if command == STOP:
                return
            self._run(command, rows)

    def _dispatch(self, command: str, rows: list):
        torch.distributed.broadcast_object_list([(command, rows)], src=0, group=self.control_group)
        return self._run(command, rows)

    def _run(self, command: str, rows: list):
        """This replica's share of `rows`; the driver gets every row's result back, in order."""
        rt = self.runtime
        lengths = [len(r.tokens) if command == SCORE else len(r.context) + r.max_new_tokens for r in rows]
        order = longest_first(lengths)
        mine = [order[p] for p in share(len(order), rt.replica_rank, rt.replicas)]
        work = self._score_rows if command == SCORE else self._generate_rows
        results = []
        for start in range(0, len(mine), self.batch_size):
            batch = mine[start:start + self.batch_size]
            results.extend(zip(batch, work([rows[i] for i in batch])))
        sender = rt.is_last_stage and rt.tp_rank == 0 and rt.ep_rank == 0  # one rank per replica
        gathered = [None] * rt.world_size if self.is_driver else None
        torch.distributed.gather_object(results if sender else None, gathered, dst=0, group=self.control_group)
        if not self.is_driver:
            return None
        out = [None] * len(rows)
        for part in gathered:
            for index, result in part or ():
                out[index] = result
        missing = [i for i, r in enumerate(out) if r is None]
        if missing:
            raise RuntimeError(f"no replica returned results for rows {missing[:10]}")
        return out

    def _logits(self, sequences: Sequence[Sequence[int]]) -> Optional[torch.Tensor]:
        """Logits [batch, length, vocab] (cut to the real vocabulary) on the last stage, None elsewhere."""
        from megatron_minitron.model.forward import forward_logits

        tokens = pad_batch(sequences, multiple=self.runtime.parallel.tensor_parallel, pad=self.pad)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        logits = forward_logits(self.model, tokens, positions, self.runtime)
        return None if logits is None else logits[..., :self.vocab_size]

    def _score_rows(self, rows: list[ScoreRow]) -> list[tuple[float, bool]]:
        logits = self._logits([r.tokens[:-1] for r in rows])
        if logits is None:
            return [None] * len(rows)
        return [continuation_score(logits[i], row) for i, row in enumerate(rows)]

    def _generate_rows(self, rows: list[GenerationRow]) -> list[list[int]]:
        """Greedy decoding, the whole prefix recomputed each step (no KV cache); every rank of the replica
        decides the same way when a row is done, from the same tokens."""
        new: list[list[int]] = [[] for _ in rows]
        active = list(range(len(rows)))
        while active:
            sequences = [list(rows[i].context) + new[i] for i in active]
            logits = self._logits(sequences)
            picked = torch.zeros(len(active), dtype=torch.long, device=self.runtime.device)
            if logits is not None:
                ends = torch.tensor([len(s) - 1 for s in sequences], device=logits.device)
                picked = logits[torch.arange(len(active), device=logits.device), ends].argmax(-1).to(picked.device)
            if self.runtime.parallel.pipeline_parallel > 1:
                torch.distributed.broadcast(picked, src=self._last_stage_rank, group=self.runtime.pp_group)
            for i, token in zip(active, picked.tolist()):
                new[i].append(int(token))
            active = [i for i in active if not self._done(rows[i], new[i])]
        return new

    def _done(self, row: GenerationRow, new: list[int]) -> bool:
        if new[-1] == self.eod or len(new) >= row.max_new_tokens or len(row.context) + len(new) >= self.max_length:
            return True
        if row.stop:
            text = self.detokenize(new)
            return any(s in text for s in row.stop)
        return False
