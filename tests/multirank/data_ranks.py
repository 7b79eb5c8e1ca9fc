"""Two data-parallel ranks build the embedded-corpus datasets and save their micro-batches; run by
tests/data/test_data_distributed.py.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/multirank/data_ranks.py CACHE_DIR
"""

from __future__ import annotations

import os
import sys
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.data.loader import DataConfig, batch_iterator, build_datasets  # noqa: E402

MICRO_BATCH, STEPS = 2, 3


def config(cache_dir: str) -> DataConfig:
    return DataConfig(seq_length=16, cache_dir=cache_dir, default_vocab_size=1000)


if __name__ == "__main__":
    cache_dir = sys.argv[1]
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        train, _, _ = build_datasets(config(cache_dir), None, (64, 8, 0))
        batches = list(islice(batch_iterator(train, micro_batch_size=MICRO_BATCH, dp_rank=rank, dp_size=world),
                              STEPS))
        torch.save([batch["tokens"] for batch in batches], os.path.join(cache_dir, f"rank{rank}.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
