"""lm-eval's own Hugging Face backend on an exported model, in a fresh interpreter (transformers'
from_pretrained misbehaves in a process that built a megatron model: see tests/hf/models.py).

    python tests/evaluation/hf_reference.py HF_DIR INCLUDE_DIR OUT.json TASK[,TASK] LIMIT BATCH PROMPTS.json

PROMPTS.json: {"tokens": [[ids]], "max_new_tokens": N, "texts": [str], "gen_kwargs": {...}}. OUT.json gets lm-eval's
results and per-document responses, transformers' greedy `generate` of each token prompt ("generate"), and the hf
backend's generate_until of each text prompt ("generate_until").
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def generations(model_dir: str, prompts: dict) -> tuple[list[list[int]], list[str]]:
    import torch
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = []
    for ids in prompts["tokens"]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=prompts["max_new_tokens"], do_sample=False)
        tokens.append(out[0, len(ids):].tolist())
    lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", add_bos_token=False, batch_size=4)
    requests = [Instance(request_type="generate_until", doc={}, arguments=(text, dict(prompts["gen_kwargs"])), idx=0)
                for text in prompts["texts"]]
    return tokens, lm.generate_until(requests)


def main(model_dir: str, include: str, out: str, tasks: str, limit: str, batch: str, prompts_file: str) -> None:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    results = simple_evaluate(
        model="hf", model_args={"pretrained": model_dir, "dtype": "float32", "device": "cpu", "add_bos_token": False},
        tasks=tasks.split(","), limit=int(limit), batch_size=int(batch), log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=include, include_defaults=False))
    body = {"results": results["results"],
            "samples": {t: [{"doc_id": s["doc_id"], "resps": s["resps"]} for s in samples]
                        for t, samples in results["samples"].items()}}
    with open(prompts_file) as stream:
        body["generate"], body["generate_until"] = generations(model_dir, json.load(stream))
    with open(out, "w") as stream:
        json.dump(body, stream, default=handle_non_serializable)


if __name__ == "__main__":
    main(*sys.argv[1:])
