"""What every layout runs (TP1 in the test process, TP2 and TP2xPP2 under torchrun): the built-in tasks through
lm-eval, then greedy generation of the prompts, through the engine (tokens) and through lm-eval's generate_until
(text with stop strings)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tests.evaluation import models


def evaluate_and_generate(runtime, ckpt: Path, cache: Path, prompts: dict, *, batch_size: int) -> Optional[dict]:
    """{"samples": {task: per-document records}, "results": ..., "generate": [...], "generate_until": [...]} on
    global rank 0, None elsewhere. Every rank calls this."""
    import torch
    from lm_eval.api.instance import Instance

    from megatron_minitron.data.tokenizer import TokenizerRef
    from megatron_minitron.evaluation.engine import GenerationRow
    from megatron_minitron.evaluation.lm import MegatronLM
    from megatron_minitron.evaluation.run import TaskConfig, evaluate_tasks, load_engine
    from megatron_minitron.model import checkpoint as ckpt_io

    info = ckpt_io.resolve(ckpt)
    ref = TokenizerRef.from_json(info.tokenizer)
    cfg = TaskConfig(tasks=models.TASKS, limit=models.LIMIT, batch_size=batch_size, cache_dir=str(cache),
                     log_samples=True, bootstrap_iters=0)
    results = evaluate_tasks(info, ref, runtime, cfg)
    control = torch.distributed.new_group(backend="gloo")
    engine, tokenizer = load_engine(info, ref, runtime, control_group=control, batch_size=batch_size)
    if runtime.rank != 0:
        engine.follow()
        return None
    try:
        rows = [GenerationRow(context=tuple(ids), max_new_tokens=prompts["max_new_tokens"])
                for ids in prompts["tokens"]]
        tokens = engine.generate(rows)
        lm = MegatronLM(engine=engine, tokenizer=tokenizer)
        requests = [Instance(request_type="generate_until", doc={}, arguments=(text, dict(prompts["gen_kwargs"])),
                             idx=0) for text in prompts["texts"]]
        texts = lm.generate_until(requests)
    finally:
        engine.stop()
    samples = {task: [{"doc_id": s["doc_id"], "resps": s["resps"]} for s in records]
               for task, records in results["samples"].items()}
    return {"results": results["results"], "samples": samples, "generate": tokens, "generate_until": texts}
