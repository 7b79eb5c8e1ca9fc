"""Two data-parallel ranks (gloo, under torchrun) build the embedded-corpus datasets once and each
takes its slice of every global batch (tests/multirank/data_ranks.py does the rank side)."""

from __future__ import annotations

import os
from itertools import islice

import torch

from tests.conftest import REPO, torchrun
from tests.multirank.data_ranks import MICRO_BATCH, STEPS, config as _config

WORLD_SIZE = 2


def test_two_ranks_build_once_and_split_each_global_batch(tmp_path) -> None:
    from megatron_minitron.data.loader import batch_iterator, build_datasets

    cache_dir = str(tmp_path / "cache")
    torchrun(REPO / "tests/multirank/data_ranks.py", cache_dir, nproc=WORLD_SIZE, timeout=600)
    # Exactly one default tokenizer and one tokenized copy per corpus split were written.
    assert len(os.listdir(os.path.join(cache_dir, "tokenizers"))) == 1
    assert len(os.listdir(os.path.join(cache_dir, "embedded"))) == 4

    train, _, _ = build_datasets(_config(cache_dir), None, (64, 8, 0))
    reference = list(
        islice(
            batch_iterator(train, micro_batch_size=MICRO_BATCH * WORLD_SIZE, dp_rank=0, dp_size=1),
            STEPS,
        )
    )
    per_rank = [torch.load(os.path.join(cache_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]
    for step, global_batch in enumerate(reference):
        assert torch.equal(
            global_batch["tokens"], torch.cat([per_rank[r][step] for r in range(WORLD_SIZE)])
        )
