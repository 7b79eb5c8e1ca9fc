"""lm-eval tasks and greedy generation of a dense checkpoint at TP2 (x DP2) and TP2xPP2 and of a
Mixture-of-Experts one at EP2 (x DP4) and TP2+SP x EP2, in one 4-process torchrun launch (run by
tests/evaluation/test_crosscheck.py, which compares them with lm-eval's own `hf` backend).

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/multirank/eval_layouts.py \
        OUT CKPT PROMPTS MOE_CKPT MOE_PROMPTS CACHE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from tests.evaluation.layouts import evaluate_and_generate  # noqa: E402

LAYOUTS = {"tp2": ParallelConfig(tensor_parallel=2), "tp2_pp2": ParallelConfig(tensor_parallel=2, pipeline_parallel=2)}
MOE_LAYOUTS = {"moe_ep2": ParallelConfig(expert_parallel=2),
               "moe_tp2_sp_ep2": ParallelConfig(tensor_parallel=2, sequence_parallel=True, expert_parallel=2)}


def main(out: Path, ckpt: Path, prompts: Path, moe_ckpt: Path, moe_prompts: Path, cache: Path) -> None:
    cases = [(layout, parallel, ckpt, prompts) for layout, parallel in LAYOUTS.items()]
    cases += [(layout, parallel, moe_ckpt, moe_prompts) for layout, parallel in MOE_LAYOUTS.items()]
    for layout, parallel, model, model_prompts in cases:
        runtime = initialize(parallel)
        result = evaluate_and_generate(runtime, model, cache, json.loads(model_prompts.read_text()), batch_size=3)
        if result is not None:
            (out / f"{layout}.json").write_text(json.dumps(result))
        torch.distributed.barrier()


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:7]))
    shutdown()
