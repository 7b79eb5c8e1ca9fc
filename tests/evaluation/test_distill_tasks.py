"""`minitron distill --eval-tasks`: task scores of the student in metrics.jsonl and the progress log at the
interval and at the end (a TP=2 run under torchrun), equal to `minitron evaluate --tasks` on the saved student."""

from __future__ import annotations

import json

from megatron_minitron.evaluation.builtin import CONTINUATION_TASK
from tests.conftest import torchrun
from tests.evaluation.conftest import OFFLINE
from tests.evaluation.test_tasks import evaluate

KEY = f"{CONTINUATION_TASK}/acc_mutual_info"


def test_task_scores_during_distillation(tiny_teacher, data_cache, tmp_path):
    save = tmp_path / "student"
    out = torchrun("-m", "megatron_minitron", "distill", "--teacher", tiny_teacher, "--student", tiny_teacher,
                   "--save", save, "--tp", "2", "--cache-dir", data_cache, "--train-iters", "4", "--seq-length", "64",
                   "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "0",
                   "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "2",
                   "--eval-tasks", CONTINUATION_TASK,
                   "--eval-tasks-interval", "2", "--eval-tasks-limit", "24", nproc=2, timeout=900, env=OFFLINE)
    records = [r for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "tasks"]
    assert [r["iteration"] for r in records] == [2, 4]
    assert all(0.0 <= r[KEY] <= 1.0 and f"{CONTINUATION_TASK}/acc" in r for r in records)
    assert "tasks at iter 2:" in out and "tasks at iter 4:" in out and KEY in out
    proc = evaluate("--load", str(save), "--tasks", CONTINUATION_TASK, "--limit", "24", "--out", str(tmp_path / "eval"),
                    cache=data_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = json.loads((tmp_path / "eval" / "results.json").read_text())["results"][CONTINUATION_TASK]
    assert final["acc_mutual_info,none"] == records[-1][KEY]
    assert final["acc,none"] == records[-1][f"{CONTINUATION_TASK}/acc"]
