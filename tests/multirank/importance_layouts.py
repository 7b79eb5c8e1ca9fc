"""Importance of one checkpoint at every layout, in one 4-process torchrun launch (run by
tests/importance/test_importance_multirank.py, which compares the results).

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/multirank/importance_layouts.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.importance.calibration import micro_batches  # noqa: E402
from megatron_minitron.importance.run import ImportanceConfig, collect  # noqa: E402
from megatron_minitron.model import checkpoint as ckpt  # noqa: E402
from megatron_minitron.model.build import build_model  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from tests.multirank import synthetic  # noqa: E402

ARCH = preset("tiny")
SEQ, MBS, SAMPLES = 32, 2, 13  # 7 micro-batches, the last one of a single sample
CFG = ImportanceConfig(micro_batch_size=MBS, ffn_source="pre", lm_loss=True, block_sizes=(2, 3))
LAYOUTS = {
    "dp4": ParallelConfig(),
    "tp2_dp2": ParallelConfig(tensor_parallel=2),
    "pp2_dp2": ParallelConfig(pipeline_parallel=2),
    "tp2_pp2": ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
    "tp2_sp_dp2": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
    "pp2_uneven_dp2": ParallelConfig(pipeline_parallel=2, first_stage_layers=1, last_stage_layers=3),
}


def main(out: Path) -> None:
    rt = initialize(ParallelConfig(tensor_parallel=2), seed=7)
    ckpt.save_checkpoint(out / "model", model=build_model(ARCH, rt), arch=ARCH, runtime=rt, iteration=None)
    info, data = ckpt.resolve(out / "model"), synthetic.examples(SAMPLES, SEQ, ARCH.vocab_size, seed=4)
    for name, parallel in LAYOUTS.items():
        rt = initialize(parallel)
        model = build_model(ARCH, rt)
        ckpt.load_checkpoint(info, model=model)

        def batches():
            return micro_batches(data, SAMPLES, micro_batch_size=MBS, dp_rank=rt.dp_rank, dp_size=rt.data_parallel)

        tensors, loss = collect(model, rt, ARCH, batches, SAMPLES, SEQ, CFG, use_te=False, log=lambda _: None)
        if rt.rank == 0:
            torch.save({**tensors, "lm_loss": torch.tensor(loss)}, out / f"scores_{name}.pt")
        torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    shutdown()
