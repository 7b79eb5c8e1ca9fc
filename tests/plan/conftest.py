"""Scores built in memory for plan tests: hand-made or random tensors of the right shapes."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.config import ArchConfig
from megatron_minitron.importance.scores import Scores, ScoresManifest


def scores_for(arch: ArchConfig, *, seed: int = 0, ties: bool = False, block_sizes: tuple[int, ...] = (),
               lm_loss: bool = True, **overrides: torch.Tensor) -> Scores:
    """Scores of `arch`: random values (small integers when ties=True, so many are equal), any
    tensor replaced by an override."""
    arch = arch.explicit()
    g = torch.Generator().manual_seed(seed)
    L = arch.num_layers

    def values(*shape):
        if ties:
            return torch.randint(0, 3, shape, generator=g).float()
        return torch.rand(shape, generator=g)

    tensors = {"heads": values(L, arch.num_attention_heads), "query_groups": values(L, arch.query_groups),
               "ffn": values(L, arch.ffn_hidden_size), "hidden": values(arch.hidden_size), "layers_bi": values(L)}
    if lm_loss:
        tensors["layers_lm_loss"] = values(L)
    if block_sizes:
        table = torch.full((len(block_sizes), L), float("nan"))
        for j, k in enumerate(block_sizes):
            table[j, : L - k + 1] = 5 + torch.rand(L - k + 1, generator=g)
        tensors["blocks_lm_loss"] = table
    tensors.update(overrides)
    manifest = ScoresManifest(architecture=arch.to_json(), arch_fingerprint=arch.fingerprint(), checkpoint="ckpt/x",
                              iteration=7, data={}, num_samples=8, seq_length=16, micro_batch_size=2, seed=1,
                              block_sizes=tuple(block_sizes))
    return Scores(tensors=tensors, manifest=manifest)


@pytest.fixture
def make_scores():
    return scores_for
