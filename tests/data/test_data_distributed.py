"""Two-process (gloo) check of build_datasets + batch_iterator under torch.distributed.

Opt-in because each spawned process imports megatron-core (~10 s on a small machine):
run with ``MINITRON_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os
from itertools import islice

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("MINITRON_SLOW_TESTS") != "1", reason="set MINITRON_SLOW_TESTS=1 to run"
)

WORLD_SIZE = 2
MICRO_BATCH = 2
STEPS = 3


def _config(cache_dir: str):
    from megatron_minitron.data.loader import DataConfig

    return DataConfig(seq_length=16, cache_dir=cache_dir, default_vocab_size=1000)


def _worker(rank: int, cache_dir: str, store_path: str) -> None:
    """One data-parallel rank: build the embedded-corpus datasets and save its micro-batches."""
    from megatron_minitron.data.loader import batch_iterator, build_datasets

    store = torch.distributed.FileStore(store_path, WORLD_SIZE)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE)
    try:
        train, _, _ = build_datasets(_config(cache_dir), None, (64, 8, 0))
        batches = list(
            islice(
                batch_iterator(
                    train, micro_batch_size=MICRO_BATCH, dp_rank=rank, dp_size=WORLD_SIZE
                ),
                STEPS,
            )
        )
        torch.save(
            [batch["tokens"] for batch in batches], os.path.join(cache_dir, f"rank{rank}.pt")
        )
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_build_once_and_split_each_global_batch(tmp_path) -> None:
    from megatron_minitron.data.loader import batch_iterator, build_datasets

    cache_dir = str(tmp_path / "cache")
    torch.multiprocessing.spawn(
        _worker, args=(cache_dir, str(tmp_path / "store")), nprocs=WORLD_SIZE, join=True
    )
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
