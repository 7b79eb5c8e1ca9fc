"""lm-eval tasks and greedy generation of one checkpoint at TP2 (x DP2) and TP2xPP2, in one 4-process torchrun
launch (run by tests/evaluation/test_crosscheck.py, which compares them with lm-eval's own `hf` backend).

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/multirank/eval_layouts.py \
        OUT CKPT CACHE PROMPTS
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


def main(out: Path, ckpt: Path, cache: Path, prompts: Path) -> None:
    for layout, parallel in LAYOUTS.items():
        runtime = initialize(parallel)
        result = evaluate_and_generate(runtime, ckpt, cache, json.loads(prompts.read_text()), batch_size=3)
        if result is not None:
            (out / f"{layout}.json").write_text(json.dumps(result))
        torch.distributed.barrier()


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:5]))
    shutdown()
