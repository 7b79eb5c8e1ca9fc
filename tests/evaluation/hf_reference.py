"""lm-eval's own Hugging Face backend on an exported model, in a fresh interpreter (transformers'
from_pretrained misbehaves in a process that built a megatron model: see tests/hf/models.py).

    python tests/evaluation/hf_reference.py HF_DIR INCLUDE_DIR OUT.json TASK[,TASK] LIMIT BATCH
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(model_dir: str, include: str, out: str, tasks: str, limit: str, batch: str) -> None:
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
    with open(out, "w") as stream:
        json.dump(body, stream, default=handle_non_serializable)


if __name__ == "__main__":
    main(*sys.argv[1:])
