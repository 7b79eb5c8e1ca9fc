"""Importance of one Mixture-of-Experts checkpoint at every layout, in one 4-process torchrun launch (run
by tests/importance/test_moe_importance_multirank.py, which compares the results): EP1 (DP4), EP2, EP4,
TP2+SP, TP2+SP x EP2 and EP2 x PP2. Every rank writes what it computed, so ranks are compared too.

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/multirank/moe_importance_layouts.py OUT
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
from megatron_minitron.model.build import build_model, unwrap  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from tests.multirank import synthetic  # noqa: E402

# every layer MoE (so `ffn` is absent), 4 experts top-2, a shared expert
ARCH = preset("tiny-moe", moe_shared_expert_ffn_hidden_size=32)
SEQ, MBS, SAMPLES = 32, 2, 16  # whole rounds of micro-batch x DP4, as EP > 1 needs
CFG = ImportanceConfig(micro_batch_size=MBS, lm_loss=True, block_sizes=(2,), lm_loss_samples=8)
LAYOUTS = {
    "ep1": ParallelConfig(),
    "ep2": ParallelConfig(expert_parallel=2),
    "ep4": ParallelConfig(expert_parallel=4),
    "tp2_sp": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
    "tp2_sp_ep2": ParallelConfig(tensor_parallel=2, sequence_parallel=True, expert_parallel=2),
    "ep2_pp2": ParallelConfig(pipeline_parallel=2, expert_parallel=2),
}


def main(out: Path) -> None:
    rt = initialize(ParallelConfig(expert_parallel=2), seed=7)
    model = build_model(ARCH, rt)
    with torch.no_grad():  # a sharper router than at initialisation: tokens disagree on their top-k
        for name, param in unwrap(model).named_parameters():
            if "router" in name:
                param.mul_(20)
    ckpt.save_checkpoint(out / "model", model=model, arch=ARCH, runtime=rt, iteration=None)
    info, data = ckpt.resolve(out / "model"), synthetic.examples(SAMPLES, SEQ, ARCH.vocab_size, seed=4)
    for name, parallel in LAYOUTS.items():
        rt = initialize(parallel)
        model = build_model(ARCH, rt, moe_dispatcher="allgather")
        ckpt.load_checkpoint(info, model=model)

        def batches():
            return micro_batches(data, SAMPLES, micro_batch_size=MBS, dp_rank=rt.dp_rank, dp_size=rt.data_parallel)

        tensors, loss = collect(model, rt, ARCH, batches, SAMPLES, SEQ, CFG, use_te=False, log=lambda _: None)
        torch.save({**tensors, "lm_loss": torch.tensor(loss)}, out / f"scores_{name}_rank{rt.rank}.pt")
        torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    shutdown()
